"""estimator='auto': pathwise (reparam) for the continuous latents of a log-joint torch can differentiate,
score terms for the discrete latents and for a log-joint it cannot; both at once in a mixed model."""
import dataclasses

from .pathwise import Reparam
from .score import ScorePath, _names, _repr

__all__ = ["Auto"]


@dataclasses.dataclass(frozen=True)
class Auto:
    """Pathwise where it can work, score terms (with `baseline`) where it cannot; `sum_over`: discrete latents
    whose score terms are replaced by exact sums over their support (sums.py)."""

    baseline: object = None
    sum_over: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "sum_over", _names(self.sum_over))

    def __repr__(self):
        return _repr(self)

    def plan(self, model, report, num_particles):
        from .record import Plan
        from .sums import check_sum_over
        path = (Reparam() if report.differentiable else ScorePath()) if model.dim > 0 else None
        return Plan(path, self.baseline, bool(model.discrete), sum_over=check_sum_over(self.sum_over, model))
