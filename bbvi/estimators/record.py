"""The Plan: what one estimator decided for one model (the continuous block's path, the score terms' baseline,
whether discrete latents are present, a whole-step estimator, the latents summed over exactly). Apart from the
registry in plan.py, which imports every estimator, so that each estimator's plan() can build one without an
import cycle."""
import dataclasses
import math

from ..config import describe


@dataclasses.dataclass(frozen=True, repr=False)
class Plan:
    """What one step computes: `continuous`, the continuous block's path (ScorePath, Reparam, STL or any object
    with the continuous-path protocol; None when there are no continuous latents), the `baseline` of the score
    terms (None: no baseline), whether there are discrete latents, and `whole`: an estimator that computes the
    whole step itself (an object with `name` and `estimate(model, family, discrete, params, num_particles,
    generator) -> (surrogate, num_bad, error)`: ARM/DisARM's antithetic pairs, VIMCO's multi-sample bound; with
    `takes_step = True` it also gets `step=`, with `stateful = True` a state dict and returns (surrogate, state,
    num_bad, error): RELAX's surrogate network), else None; `sum_over`: discrete latents whose score terms are exact sums over their support (sums.py). `path` is the continuous path's name: 'score' | 'reparam' | 'stl' | None."""

    continuous: object
    baseline: object
    has_discrete: bool
    whole: object = None
    sum_over: tuple = ()

    @property
    def path(self):
        return None if self.continuous is None else self.continuous.name

    def evaluations(self, model, num_particles):
        """Log-joint evaluations per step: one per particle, and per particle one per value of every entry of the
        latents summed over exactly."""
        extra = sum(math.prod(model.discrete[n][0].shape) * model.discrete[n][2] for n in self.sum_over)
        return num_particles * (1 + extra)

    @property
    def has_score_terms(self):
        if self.whole is not None:
            return False
        return self.has_discrete or (self.continuous is not None and not self.continuous.pathwise)

    def __repr__(self):
        tail = "" if self.whole is None else f", whole={self.whole.name!r}"
        tail += f", sum_over={self.sum_over!r}" if self.sum_over else ""
        return (f"Plan(path={self.path!r}, baseline={describe(self.baseline)}, has_discrete={self.has_discrete!r}"
                f"{tail})")
