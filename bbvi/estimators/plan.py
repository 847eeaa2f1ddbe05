"""From what the user asked for to one step's surrogate.

`resolve_estimator` turns strings into estimator objects; an estimator's `plan(model, report, num_particles)`
decides, for one model, the `Plan`: the path of the continuous block (an object with the continuous-path
protocol of score.py, or None when there are no continuous latents), the baseline of the score terms, and
whether discrete latents are present (they always go through score terms). `estimate` runs a plan once.
"""
import dataclasses

import torch


from ..errors import ConfigError
from .antithetic import ARM, DisARM
from .concrete import Concrete
from .relax import RELAX
from .vimco import VIMCO
from .auto import Auto
from .baselines import CV, EMA, LOO, NoBaseline, resolve_baseline
from .particles import draw, evaluate, from_log_p, with_floor
from .rao_blackwell import score_terms
from .sums import sum_terms
from .pathwise import STL, Reparam
from .score import Score, ScorePath
from .record import Plan  # noqa: F401  (re-exported: the record every plan() returns)
from .trick import with_gradient

__all__ = ["Plan", "plan_for", "estimate", "estimate_parts", "defers_check", "resolve_estimator", "init_baseline_state", "with_gradient",
           "DEFAULT"]


class _Default:
    """The `baseline` argument left out: LOO for score terms, none for pathwise estimators."""

    def __repr__(self):
        return "DEFAULT"


DEFAULT = _Default()
_ESTIMATORS = {"score": Score, "reparam": Reparam, "stl": STL, "auto": Auto, "arm": ARM, "disarm": DisARM, "vimco": VIMCO,
               "concrete": Concrete, "relax": RELAX}
_NO_BASELINE = NoBaseline()


def _is_default(baseline):
    return baseline is DEFAULT or (isinstance(baseline, str) and baseline == "default")


def resolve_estimator(estimator, baseline=DEFAULT):
    """(estimator, baseline) as a user writes them -> an estimator object. baseline=DEFAULT picks LOO for the
    score terms; an explicit baseline with 'reparam'/'stl' is an error (they have no score term). Any object
    with a `plan(model, report, num_particles) -> Plan` method is an estimator."""
    if isinstance(estimator, str):
        if estimator.lower() not in _ESTIMATORS:
            raise ConfigError(f"estimator must be one of {sorted(_ESTIMATORS)} or a bbvi.Score/Reparam/STL/Auto "
                              f"object, got {estimator!r}")
        cls = _ESTIMATORS[estimator.lower()]
        if cls in (Reparam, STL, ARM, DisARM, VIMCO, Concrete, RELAX):
            if not (_is_default(baseline) or baseline in (None, "none")):
                raise ConfigError(f"baseline={baseline!r} applies to score-function terms only; "
                                  f"estimator={estimator!r} " + ("is pathwise" if cls in (Reparam, STL) else "takes no baseline")
                                  + ". Use estimator='score' or 'auto'.")
            return cls()
        return cls(baseline=LOO() if _is_default(baseline) else resolve_baseline(baseline))
    if isinstance(estimator, (Score, Auto)):
        if not _is_default(baseline):
            raise ConfigError("pass the baseline inside the estimator object (bbvi.Score(baseline=...)), not both")
        return dataclasses.replace(estimator, baseline=resolve_baseline(estimator.baseline))
    if isinstance(estimator, (Reparam, STL, ARM, DisARM, VIMCO, Concrete, RELAX)):
        if not (_is_default(baseline) or baseline is None):
            raise ConfigError(f"baseline={baseline!r} applies to score-function terms only; {estimator} has none")
        return estimator
    if not isinstance(estimator, (type, str)) and callable(getattr(estimator, "plan", None)):
        if not _is_default(baseline):
            raise ConfigError(f"pass the baseline inside the estimator object {estimator!r}, not both")
        return estimator
    raise ConfigError(f"estimator must be one of {sorted(_ESTIMATORS)} or a bbvi.Score/Reparam/STL/Auto object, "
                      f"got {estimator!r}")


def plan_for(estimator, model, report, num_particles):
    """Decide the plan for `model` given its CheckReport, or raise ConfigError when the request cannot work."""
    plan = estimator.plan(model, report, num_particles)
    need = getattr(plan.baseline, "min_particles", 1)
    if plan.has_score_terms and num_particles < need:
        if isinstance(plan.baseline, LOO):
            raise ConfigError(f"baseline='loo' needs num_particles >= 2 (got {num_particles}): the baseline of "
                              f"each particle is the mean of the others")
        raise ConfigError(f"baseline {plan.baseline!r} needs num_particles >= {need} (got {num_particles})")
    if plan.has_discrete and plan.continuous is not None and not hasattr(plan.continuous, "terms"):
        raise ConfigError(f"the {plan.path!r} path cannot be combined with score terms for discrete latents")
    return plan


def init_baseline_state(plan, device, dtype):
    return (plan.baseline or _NO_BASELINE).init_state(device, dtype)


def estimate(plan, model, family, discrete, params, num_particles, generator, baseline_state, structure=None,
             step=None, guard=True, checked=True):
    """One Monte Carlo estimate at the current q with `num_particles` particles.

    Returns (surrogate, baseline_state, num_bad, error): `surrogate` is a scalar whose value is an ELBO estimate
    (reparam: mean log p + H(q), with the closed-form entropy; otherwise mean f) and whose gradient in
    `params` is the plan's gradient estimate; `num_bad` (0-dim tensor, or None when every particle was
    finite) counts particles with a NaN/inf log-joint, which were left out of the averages; `error` is the
    exception the log-joint raised for some particles (they count as NaN particles), or None. With a
    `structure` (a log-joint of factor terms; rao_blackwell.py) the score terms are Rao-Blackwellized. `step`: the
    fit's step number, for an estimator with a schedule (`takes_step`: Concrete's temperature); None outside a fit.
    `guard`: on the pathwise path, drop particles whose gradient is not finite (`_drop_nonfinite_gradients`;
    the identity when all are: bbvi.fit's step leaves it off and redoes a step whose gradient is not finite).
    `checked`: leave out the particles whose log-joint is not finite (`evaluate`); with checked=False (only where
    `defers_check(plan)`, and only for a caller that redoes a step whose estimate is not finite with checked=True,
    as bbvi.fit's step does) every particle counts, without a host read, and a NaN particle makes the estimate NaN."""
    value, carrier, baseline_state, num_bad, error = estimate_parts(
        plan, model, family, discrete, params, num_particles, generator, baseline_state, structure, step=step,
        guard=guard, checked=checked)
    return (carrier if value is None else with_gradient(value, carrier)), baseline_state, num_bad, error


def estimate_parts(plan, model, family, discrete, params, num_particles, generator, baseline_state,
                   structure=None, step=None, guard=True, checked=True, first_order=False):
    """`estimate`, its surrogate in two parts: (value, carrier, baseline_state, num_bad, error), `value` the ELBO
    estimate (detached) and `carrier` a scalar whose gradient is the estimate's, whatever its value; value=None
    where the carrier is the surrogate itself (its value the estimate's). bbvi.fit's step runs the backward on the
    carrier and keeps the value, without with_gradient's four operations. `first_order`: the score terms of
    bbvi's own NoBaseline/EMA/LOO (exactly those classes) through `first_order_term`, without the DiCE magic box: the same
    gradient, bit for bit, but no higher derivatives (bbvi.expectation needs those; a fit's step does not)."""
    if plan.whole is not None:
        whole = plan.whole
        if getattr(whole, "stateful", False):  # state of its own (RELAX's surrogate), kept like a baseline's
            surrogate, baseline_state, num_bad, error = whole.estimate(model, family, discrete, params, num_particles,
                                                                       generator, baseline_state)
            return None, surrogate, baseline_state, num_bad, error
        extra = {"step": step} if getattr(whole, "takes_step", False) else {}
        surrogate, num_bad, error = whole.estimate(model, family, discrete, params, num_particles, generator, **extra)
        return None, surrogate, baseline_state, num_bad, error
    if structure is not None and plan.has_score_terms and not plan.sum_over:  # exact sums replace it
        return _estimate_rao_blackwell(plan, model, family, discrete, params, num_particles, generator,
                                       baseline_state, structure)
    pc, pd = params["continuous"], params["discrete"]
    path = plan.continuous
    pathwise = path is not None and path.pathwise
    u, k, lq_draw = draw(model, family, discrete, params, num_particles, generator, pathwise=pathwise,
                         with_log_q=True)
    p = evaluate(model, u, k, grad=pathwise, checked=checked)
    if lq_draw is not None:
        p = dataclasses.replace(p, log_q_c=lq_draw)
    if pathwise and u.requires_grad and guard:
        p = _drop_nonfinite_gradients(p)
    if path is not None and not plan.has_discrete:
        alone = path.alone(p, family, pc)
        if alone is not None:
            return None, alone, baseline_state, p.num_bad, p.error

    # score terms (continuous on the score path, and/or discrete), possibly beside a pathwise part
    carrier = None   # the sum of the parts below (adding them to a zero would give the same bits, ops later)
    score_logq, score_params = None, []
    lq_c = None
    if path is not None:
        extra, lq_c, score_logq, score_params = path.terms(p, family, pc)
        carrier = _plus(carrier, extra)
    f = p.log_p.detach() if lq_c is None else p.log_p.detach() - lq_c.detach()
    if plan.has_discrete:
        lq_d = discrete.log_prob(pd, k)
        f = f - lq_d.detach()
        if plan.sum_over:  # those latents' terms are exact sums; the others keep score terms
            carrier = _plus(carrier, sum_terms(plan.sum_over, model, discrete, pd, u, k))
            lq_d = discrete.log_prob(pd, k, skip=plan.sum_over)
        if lq_d is not None:
            score_logq = lq_d if score_logq is None else score_logq + lq_d
            score_params = score_params + [t for n, t in pd.items() if n not in plan.sum_over]
    if p.infeasible is not None and (not pathwise or plan.has_discrete):  # -inf log-joint: push q away, do not
        p, f = with_floor(p, f)   # ignore it (beside a pathwise part: the discrete factors' score terms are floored)
    if p.mask is not None:
        f = f * p.mask
    elbo = p.average(f)
    if score_logq is not None:
        if p.mask is not None:
            score_logq = score_logq * p.mask
        baseline = plan.baseline or _NO_BASELINE
        # only bbvi's own classes: a subclass may override score_term, which its first_order_term would bypass
        score_term = baseline.first_order_term if first_order and type(baseline) in (NoBaseline, EMA, LOO) else None
        term, baseline_state = (score_term or baseline.score_term)(f, score_logq, score_params, p, elbo,
                                                                   baseline_state)
        carrier = _plus(carrier, term)
    if carrier is None:
        carrier = p.log_p.new_zeros(())
    return elbo.detach(), carrier, baseline_state, p.num_bad, p.error


def defers_check(plan, structure=None):
    """Whether `estimate` may run this plan with checked=False: only bbvi's own continuous paths and baselines,
    whose ELBO value averages every particle, so that a particle with a non-finite log-joint shows in it (a user's
    path or baseline may read the particles' validity or keep state across calls); not a whole-step estimator or
    a Rao-Blackwellized step, which check their particles themselves."""
    return (plan.whole is None and structure is None
            and type(plan.continuous) in (type(None), Reparam, STL, ScorePath)
            and type(plan.baseline) in (type(None), EMA, LOO, CV))


def _plus(carrier, term):
    return term if carrier is None else carrier if term is None else carrier + term


def _drop_nonfinite_gradients(p):
    """A particle whose log-joint is finite but whose gradient is not (torch.where over a masked missing value,
    sqrt at 0) would make the whole step's gradient NaN. A hook on u zeroes such particles' gradient rows and
    rescales the others by n / (n - k), so the pathwise average is over the k fewer particles, and counts them
    as bad particles. With no such particle the gradient is unchanged bit for bit (and there is no host sync)."""
    num_bad = p.num_bad if p.num_bad is not None else torch.zeros((), dtype=torch.int64, device=p.u.device)
    valid, n = p.valid, p.n

    def hook(grad):
        rows = ~torch.isfinite(grad).all(-1)
        new = rows & valid
        k = new.sum()
        num_bad.add_(k)
        scale = n / (n - k.to(grad.dtype))
        return torch.where(rows[:, None], torch.zeros_like(grad), grad) * scale
    p.u.register_hook(hook)
    return dataclasses.replace(p, num_bad=num_bad)


def _estimate_rao_blackwell(plan, model, family, discrete, params, num_particles, generator, baseline_state,
                            structure):
    """`estimate` for a log-joint of factor terms: each coordinate's score term sees only its Markov blanket."""
    pc, pd = params["continuous"], params["discrete"]
    path = plan.continuous
    pathwise = path is not None and path.pathwise
    u, k = draw(model, family, discrete, params, num_particles, generator, pathwise=pathwise)
    if pathwise:
        terms, error = model.log_density_terms_guarded(u, k)
    else:
        with torch.no_grad():
            terms, error = model.log_density_terms_guarded(u, k)
    terms = terms.to(u.dtype)
    p = from_log_p(u, k, terms.sum(-1) + model.preconditioner_log_det(), error)
    terms = torch.where(p.valid[:, None], terms, torch.zeros_like(terms)).detach()
    carrier = p.log_p.new_zeros(())
    columns, f = [], p.log_p.detach()
    score_continuous = path is not None and not path.pathwise
    if path is not None:
        extra, lq_c, _, _ = path.terms(p, family, pc)
        if extra is not None:
            carrier = carrier + extra
        f = f - lq_c.detach()
        if score_continuous:
            per_coord = getattr(family, "coordinate_log_prob", None)
            columns.append(per_coord(pc, u) if per_coord is not None else lq_c[:, None])
    if plan.has_discrete:
        lq_d = discrete.entry_log_prob(pd, k)
        columns.append(lq_d)
        f = f - lq_d.detach().sum(-1)
    if p.mask is not None:
        f = f * p.mask
    elbo = p.average(f)
    term, baseline_state = score_terms(structure, p, terms, torch.cat(columns, 1), score_continuous,
                                       plan.baseline, baseline_state)
    return elbo.detach(), carrier + term, baseline_state, p.num_bad, p.error
