"""The score-function estimator (log-derivative trick; Williams 1992; Ranganath et al. 2014, "Black Box
Variational Inference"):

    grad E_q[f] = E_q[f grad log q],    g = mean_s (f_s - b_s) grad log q(z_s),    z_s drawn without gradient

It needs only values of the log-joint, so it serves discrete latents and log-joints torch cannot differentiate.
`Score` is the estimator a user asks for; `ScorePath` is its behaviour for the continuous block inside a plan.
"""
import dataclasses

__all__ = ["Score", "ScorePath"]


@dataclasses.dataclass(frozen=True)
class Score:
    """Score-function terms for every latent, with `baseline` (None | 'ema' | 'loo' | 'cv' | a baseline)."""

    baseline: object = None

    def plan(self, model, report, num_particles):
        from .plan import Plan
        return Plan(ScorePath() if model.dim > 0 else None, self.baseline, bool(model.discrete))


@dataclasses.dataclass(frozen=True)
class ScorePath:
    """The continuous block through score terms: u drawn without gradient, log q_c(u) carries the score.

    The continuous-path protocol (see pathwise.py for the pathwise ones):
        name, pathwise (bool: draw u with rsample and log p with gradient)
        alone(particles, family, params) -> surrogate, or None to go through the score terms
        terms(particles, family, params) -> (carrier or None, log q_c (S,), score log q or None, score leaves)
    """

    name = "score"
    pathwise = False

    def alone(self, particles, family, params):
        return None

    def terms(self, particles, family, params):
        lq_c = family.log_prob(params, particles.u)
        return None, lq_c, lq_c, list(params.values())
