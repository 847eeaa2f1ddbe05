"""estimator='auto': pathwise (reparam) for the continuous latents of a log-joint torch can differentiate,
score terms for the discrete latents and for a log-joint it cannot; both at once in a mixed model."""
import dataclasses

from .pathwise import Reparam
from .score import ScorePath

__all__ = ["Auto"]


@dataclasses.dataclass(frozen=True)
class Auto:
    """Pathwise where it can work, score terms (with `baseline`) where it cannot."""

    baseline: object = None

    def plan(self, model, report, num_particles):
        from .plan import Plan
        path = (Reparam() if report.differentiable else ScorePath()) if model.dim > 0 else None
        return Plan(path, self.baseline, bool(model.discrete))
