"""Pathwise estimators of the continuous block: u = T_theta(eps) drawn differentiably (rsample).

    reparam  (Kingma & Welling 2014; Titsias & Lazaro-Gredilla 2014)
             g = grad [ mean_s log p(u_s(theta)) + H(q) ]    closed-form entropy H where the family has one
                                                            (family.entropy), else H = -mean_s log q(u_s(theta))
    stl      (sticking the landing, Roeder et al. 2017)
             g = grad mean_s [ log p(u_s(theta)) - log q_{stop(theta)}(u_s(theta)) ]   zero variance when q = p

Both need every latent continuous and a log-joint torch can differentiate (`requires`), or the plan says
why not. Reparam also serves as the continuous path of a mixed model (`terms`), beside score terms for the
discrete latents (estimator='auto'); STL has no such form (its score-free value needs all of q pathwise).
"""
import dataclasses

__all__ = ["Reparam", "STL", "whole_plan"]


def _entropy(particles, family, params):
    """H(q): closed form where the family has one, else -mean_s log q_theta(u_s(theta)) over the draws (a flow)."""
    if getattr(family, "entropy", None) is not None:
        return family.entropy(params)
    lq = particles.log_q_c if particles.log_q_c is not None else family.log_prob(params, particles.u)
    return -particles.average(lq)


class _Pathwise:
    pathwise = True

    def plan(self, model, report, num_particles):
        from ..errors import ConfigError
        from .record import Plan
        if model.discrete:
            raise ConfigError(f"estimator={self.name!r} needs every latent continuous, but {sorted(model.discrete)} "
                              f"are discrete; use estimator='auto' (pathwise for continuous, score for discrete) "
                              f"or 'score'")
        if not report.differentiable:
            raise ConfigError(f"estimator={self.name!r} needs gradients of the log-joint, but torch cannot "
                              f"differentiate model {model.name!r} in latent(s) {list(report.nondifferentiable)}; "
                              f"use estimator='score' (it needs only log-joint values) or 'auto'")
        return Plan(self, None, False)


@dataclasses.dataclass(frozen=True)
class Reparam(_Pathwise):
    """The reparameterization (pathwise) gradient with the closed-form entropy (a Monte Carlo one for a family
    without: -log q of the draws, differentiated through the draws and the parameters)."""

    name = "reparam"

    def alone(self, particles, family, params):
        return particles.average(particles.log_p) + _entropy(particles, family, params)

    def terms(self, particles, family, params):
        lq_c = family.log_prob(params, particles.u.detach())
        return particles.average(particles.log_p) + _entropy(particles, family, params), lq_c, None, []


@dataclasses.dataclass(frozen=True)
class STL(_Pathwise):
    """Sticking the landing: the pathwise gradient of log p - log q with q's parameters stopped in log q."""

    name = "stl"

    def alone(self, particles, family, params):
        frozen = {name: t.detach() for name, t in params.items()}
        return particles.average(particles.log_p - family.log_prob(frozen, particles.u))


def whole_plan(estimator, model, report):
    """The Plan of an estimator that computes the whole step for the discrete latents (ARM/DisARM, RELAX,
    Concrete): the continuous latents pathwise beside it, so the log-joint must be differentiable in them."""
    from ..errors import ConfigError
    from .record import Plan
    if model.dim and not report.differentiable:
        raise ConfigError(f"estimator={estimator.name!r} takes continuous latents pathwise, but torch cannot "
                          f"differentiate model {model.name!r} in {list(report.nondifferentiable)}: use "
                          f"estimator='score'")
    return Plan(Reparam() if model.dim else None, None, True, whole=estimator)
