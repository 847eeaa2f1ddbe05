"""ELBO gradient estimators as surrogate objectives, and the control-variate baselines of the score path.

With S particles from q and f_s = log p(x, z_s) - log q(z_s) (z_s from unconstrained u_s, the log-det-Jacobian
inside log p), the ELBO estimate is mean_s f_s. The estimators of its gradient in the variational parameters:

    score    (log-derivative trick, Williams 1992; Ranganath et al. 2014, "Black Box Variational Inference")
             g = mean_s (f_s - b_s) grad log q(z_s)          z_s drawn without gradient
    reparam  (pathwise, Kingma & Welling 2014; Titsias & Lazaro-Gredilla 2014)
             g = grad [ mean_s log p(T(loc + L eps_s)) + H(q) ]    closed-form Gaussian entropy H
    stl      (sticking the landing, Roeder et al. 2017)
             g = grad mean_s [ log p(u_s(θ)) - log q_{stop(θ)}(u_s(θ)) ]   zero variance when q = p
    auto     pathwise (reparam) for continuous latents of a log-joint torch can differentiate, score for the
             discrete latents and for a log-joint it cannot; both at once in a mixed model.

Discrete latents always go through the score term: g_φ = mean_s (f_s - b_s) grad_φ log q_φ(k_s).

Baselines b_s (score terms only; b_s never depends on z_s, so E[b_s grad log q(z_s)] = 0 and the mean is kept):
    None  b = 0
    ema   b = bias-corrected exponential moving average of past steps' mean f (decay 0.9)
    loo   b_s = mean_{j != s} f_j            (leave-one-out over particles; Kool et al. 2019)
    cv    per-coordinate optimal scaling a_d = Cov(f h_d, h_d) / Var(h_d), h = grad log q
          (Ranganath et al. 2014, eq. 10), estimated leave-one-out so that a for particle s never sees z_s.

Particles whose log-joint is NaN/inf are dropped from the step (their weight is zero) and counted.
"""
import dataclasses

import torch

from .errors import ConfigError

__all__ = ["Score", "Reparam", "STL", "Auto", "EMA", "LOO", "CV", "resolve_estimator", "estimate", "Plan"]


# ---- typed configuration (users may pass these instead of strings) ----------------------------------------
@dataclasses.dataclass(frozen=True)
class EMA:
    """b = exponential moving average of the ELBO estimate over past steps."""

    decay: float = 0.9

    def __post_init__(self):
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not (0.0 <= self.decay < 1.0):
            raise ConfigError(f"EMA decay must be in [0, 1), got {self.decay!r}")


@dataclasses.dataclass(frozen=True)
class LOO:
    """b_s = mean of f over the other particles (needs num_particles >= 2)."""


@dataclasses.dataclass(frozen=True)
class CV:
    """Per-coordinate optimal control-variate scaling (Ranganath et al. 2014), leave-one-out."""


@dataclasses.dataclass(frozen=True)
class Score:
    baseline: object = None


@dataclasses.dataclass(frozen=True)
class Reparam:
    pass


@dataclasses.dataclass(frozen=True)
class STL:
    pass


@dataclasses.dataclass(frozen=True)
class Auto:
    baseline: object = None


_BASELINES = {None: None, "none": None, "ema": EMA(), "loo": LOO(), "cv": CV()}
_ESTIMATORS = {"score": Score, "reparam": Reparam, "stl": STL, "auto": Auto}
DEFAULT = "default"


def _resolve_baseline(baseline):
    if isinstance(baseline, (EMA, LOO, CV)) or baseline is None:
        return baseline
    if isinstance(baseline, str) and baseline.lower() in _BASELINES:
        return _BASELINES[baseline.lower()]
    raise ConfigError(f"baseline must be None, 'ema', 'loo', 'cv' or a bbvi.EMA/LOO/CV object, got {baseline!r}")


def resolve_estimator(estimator, baseline=DEFAULT):
    """(estimator, baseline) as a user writes them -> a typed estimator object. baseline=DEFAULT picks LOO for
    the score terms; an explicit baseline with 'reparam'/'stl' is an error (they have no score term)."""
    if isinstance(estimator, str):
        if estimator.lower() not in _ESTIMATORS:
            raise ConfigError(f"estimator must be one of {sorted(_ESTIMATORS)} or a bbvi.Score/Reparam/STL/Auto "
                              f"object, got {estimator!r}")
        cls = _ESTIMATORS[estimator.lower()]
        if cls in (Reparam, STL):
            if baseline not in (DEFAULT, None, "none"):
                raise ConfigError(f"baseline={baseline!r} applies to score-function terms only; "
                                  f"estimator={estimator!r} is pathwise. Use estimator='score' or 'auto'.")
            return cls()
        return cls(baseline=LOO() if baseline is DEFAULT else _resolve_baseline(baseline))
    if isinstance(estimator, (Score, Auto)):
        if baseline is not DEFAULT:
            raise ConfigError("pass the baseline inside the estimator object (bbvi.Score(baseline=...)), not both")
        return dataclasses.replace(estimator, baseline=_resolve_baseline(estimator.baseline))
    if isinstance(estimator, (Reparam, STL)):
        if baseline not in (DEFAULT, None):
            raise ConfigError(f"baseline={baseline!r} applies to score-function terms only; {estimator} is pathwise")
        return estimator
    raise ConfigError(f"estimator must be one of {sorted(_ESTIMATORS)} or a bbvi.Score/Reparam/STL/Auto object, "
                      f"got {estimator!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one step computes: `path` for the continuous latents ('score' | 'reparam' | 'stl' | None when there
    are none) and the baseline of the score terms (discrete latents always, continuous ones on the score path)."""

    path: object
    baseline: object
    has_discrete: bool


def plan_for(estimator, model, report, num_particles):
    """Decide the plan for `model` given its CheckReport, or raise ConfigError when the request cannot work."""
    has_cont, has_disc = model.dim > 0, bool(model.discrete)
    if isinstance(estimator, (Reparam, STL)):
        name = "reparam" if isinstance(estimator, Reparam) else "stl"
        if has_disc:
            raise ConfigError(f"estimator={name!r} needs every latent continuous, but {sorted(model.discrete)} "
                              f"are discrete; use estimator='auto' (pathwise for continuous, score for discrete) "
                              f"or 'score'")
        if not report.differentiable:
            raise ConfigError(f"estimator={name!r} needs gradients of the log-joint, but torch cannot "
                              f"differentiate model {model.name!r} in latent(s) {list(report.nondifferentiable)}; "
                              f"use estimator='score' (it needs only log-joint values) or 'auto'")
        plan = Plan(name, None, False)
    elif isinstance(estimator, Auto):
        path = ("reparam" if report.differentiable else "score") if has_cont else None
        plan = Plan(path, estimator.baseline, has_disc)
    else:
        plan = Plan("score" if has_cont else None, estimator.baseline, has_disc)
    if isinstance(plan.baseline, LOO) and num_particles < 2 and (plan.path == "score" or has_disc):
        raise ConfigError(f"baseline='loo' needs num_particles >= 2 (got {num_particles}): the baseline of each "
                          f"particle is the mean of the others")
    return plan


def init_baseline_state(plan, device, dtype):
    if isinstance(plan.baseline, EMA):
        return {"value": torch.zeros((), device=device, dtype=dtype),
                "weight": torch.zeros((), device=device, dtype=dtype)}
    return {}


# ---- the estimate -----------------------------------------------------------------------------------------
def with_gradient(value, carrier):
    """The stop-gradient trick, in one place: a scalar whose value is `value` and whose gradient is the
    gradient of `carrier` (value + carrier - stop(carrier))."""
    return value.detach() + carrier - carrier.detach()


def _cv_carrier(f, mask, n, score_logq, params):
    """Ranganath et al.'s per-coordinate control variate, leave-one-out, returned as a linear carrier
    sum_d theta_d * g_d whose gradient is the estimate g (S x P per-particle scores, one batched backward)."""
    S = f.shape[0]
    eye = torch.eye(S, device=f.device, dtype=f.dtype)
    jac = torch.autograd.grad(score_logq, params, grad_outputs=eye, is_grads_batched=True, retain_graph=True,
                              allow_unused=True)
    carrier = 0
    for p, h in zip(params, jac):
        if h is None:
            continue
        h = h.reshape(S, -1) * mask[:, None]
        x = f[:, None] * h
        m = (n - 1).clamp_min(1)
        ex = (x.sum(0) - x) / m
        eh = (h.sum(0) - h) / m
        cov = ((x * h).sum(0) - x * h) / m - ex * eh
        var = ((h * h).sum(0) - h * h) / m - eh * eh
        a = torch.where(var > 1e-30, cov / var.clamp_min(1e-30), torch.zeros_like(var))
        g = ((f[:, None] - a) * h).sum(0) / n
        carrier = carrier + (p.reshape(-1) * g.detach()).sum()
    return carrier


def estimate(plan, model, family, discrete, params, num_particles, generator, baseline_state):
    """One Monte Carlo estimate at the current q with `num_particles` particles.

    Returns (surrogate, baseline_state, num_bad, error): `surrogate` is a scalar whose value is an ELBO estimate
    (reparam: mean log p + H(q), with the closed-form entropy; otherwise mean f) and whose gradient in
    `params` is the plan's gradient estimate; `num_bad` (0-dim tensor, or None when every particle was
    finite) counts particles with a NaN/inf log-joint, which were left out of the averages; `error` is the
    exception the log-joint raised for some particles (they count as NaN particles), or None."""
    pc, pd = params["continuous"], params["discrete"]
    S = num_particles
    pathwise = plan.path in ("reparam", "stl")
    if model.dim > 0:
        u = family.rsample(pc, S, generator) if pathwise else family.sample(pc, S, generator)
    else:
        u = next(iter(pd.values())).new_zeros(S, 0)
    k = discrete.sample(pd, S, generator) if plan.has_discrete else {}
    if pathwise:
        lp, error = model.log_density_guarded(u, k)
    else:
        with torch.no_grad():
            lp, error = model.log_density_guarded(u, k)
    if lp.dtype != u.dtype:
        lp = lp.to(u.dtype)
    valid = torch.isfinite(lp)
    if bool(valid.all()):  # the common case: plain means, no masking
        num_bad = None
        mask, n = None, float(S)
        average = torch.mean
    else:
        num_bad = S - valid.sum()
        mask = valid.to(lp.dtype)
        n = mask.sum()
        lp = torch.where(valid, lp, torch.zeros_like(lp))

        def average(x):
            return (mask * torch.where(valid, x, torch.zeros_like(x))).sum() / n

    if plan.path == "reparam" and not plan.has_discrete:
        return average(lp) + family.entropy(pc), baseline_state, num_bad, error
    if plan.path == "stl" and not plan.has_discrete:
        frozen = {name: t.detach() for name, t in pc.items()}
        return average(lp - family.log_prob(frozen, u)), baseline_state, num_bad, error

    # score terms (continuous on the score path, and/or discrete), possibly beside a pathwise part
    carrier = lp.new_zeros(())
    score_logq = None
    score_params = []
    if plan.path == "score":
        lq_c = family.log_prob(pc, u)
        score_logq, score_params = lq_c, list(pc.values())
    elif plan.path == "reparam":
        lq_c = family.log_prob(pc, u.detach())
        carrier = carrier + average(lp) + family.entropy(pc)
    elif plan.path == "stl":
        lq_c = family.log_prob({name: t.detach() for name, t in pc.items()}, u)
        carrier = carrier + average(lp - lq_c)
    else:
        lq_c = torch.zeros_like(lp)
    if plan.has_discrete:
        lq_d = discrete.log_prob(pd, k)
        score_logq = lq_d if score_logq is None else score_logq + lq_d
        score_params = score_params + list(pd.values())
        f = lp.detach() - lq_c.detach() - lq_d.detach()
    else:
        f = lp.detach() - lq_c.detach()
    if mask is not None:
        f = f * mask
        score_logq = score_logq * mask
    elbo = average(f)
    if isinstance(plan.baseline, CV):
        carrier = carrier + _cv_carrier(f, mask if mask is not None else torch.ones_like(f),
                                        torch.as_tensor(n, dtype=f.dtype, device=f.device), score_logq, score_params)
    else:
        if isinstance(plan.baseline, LOO):
            b = (f.sum() - f) / max(n - 1, 1) if mask is None else (f.sum() - f) / (n - 1).clamp_min(1)
            b = b if mask is None else b * mask
        elif isinstance(plan.baseline, EMA):
            st = baseline_state
            b = torch.where(st["weight"] > 0, st["value"] / st["weight"].clamp_min(1e-30),
                            torch.zeros_like(st["value"]))
            d = plan.baseline.decay
            ok = torch.isfinite(elbo)
            baseline_state = {"value": torch.where(ok, d * st["value"] + (1 - d) * elbo, st["value"]),
                              "weight": torch.where(ok, d * st["weight"] + (1 - d), st["weight"])}
        else:
            b = 0.0
        carrier = carrier + average((f - b) * score_logq)
    return with_gradient(elbo, carrier), baseline_state, num_bad, error
