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
    """Score-function terms for every latent, with `baseline` (None | 'ema' | 'loo' | 'cv' | a baseline);
    `sum_over`: discrete latents whose score terms are replaced by exact sums over their support (sums.py)."""

    baseline: object = None
    sum_over: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "sum_over", _names(self.sum_over))

    def __repr__(self):
        return _repr(self)

    def plan(self, model, report, num_particles):
        from .record import Plan
        from .sums import check_sum_over
        return Plan(ScorePath() if model.dim > 0 else None, self.baseline, bool(model.discrete),
                    sum_over=check_sum_over(self.sum_over, model))


def _names(sum_over):
    """sum_over as a tuple of names ('tau' alone is one name, not three letters)."""
    return (sum_over,) if isinstance(sum_over, str) else tuple(sum_over)


def _repr(estimator):
    """Score(baseline=...) as before sum_over existed (a fit's settings compare equal on resume), sum_over when set."""
    tail = f", sum_over={tuple(estimator.sum_over)!r}" if estimator.sum_over else ""
    return f"{type(estimator).__name__}(baseline={estimator.baseline!r}{tail})"


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
