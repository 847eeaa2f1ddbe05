"""The stochastic-gradient algorithm (bbvi's default): `init` builds a FitState (family parameters, optimizer,
generator, baseline state) and checks the model once; `step` runs one stochastic-gradient step on the ELBO, the
guarded update and the adaptive rule's look at it. bbvi.fit drives it (bbvi/fit.py); a user may drive it too:
`state = bbvi.init(model); while not state.stop: bbvi.step(state)`.

A step whose ELBO estimate or gradient is NaN/inf is skipped (parameters untouched) and counted in the record
(bbvi.record); one whose gradient would overflow the optimizer's statistics is scaled down (bbvi.update).
"""
import inspect
import warnings

import torch

from ..errors import ConfigError, ReliabilityWarning
from ..convergence import Adaptive
from ..estimators import DEFAULT, draw, init_baseline_state, plan_for, resolve_estimator
from ..estimators.plan import defers_check, estimate_parts
from ..estimators.rao_blackwell import check_baseline, discover, rao_blackwellized
from ..families import Discrete
from ..family_names import resolve_family
from ..data_forms import precision_notes
from ..subsample import check_subsample, uses_cv
from ..data_view import DataView
from ..record import Info, Record
from ..state import FitState
from ..options import (check_init_options,
                      _probe_count, _refuse_unknown, _rule, _schedule, default_particles)
from ..natural import DEFAULT_LR, NaturalGradient, check_family
from ..model_check import NotFiniteStart
from ..update import clear_grads, gradient_norm, guards_for, rescale, verdict
from ..start import choose as choose_start
from ..start import finite_start, initial_discrete, initial_loc

START_DRAWS = 32   # discrete draws the MAP start averages the log density over (models with discrete latents)

__all__ = ["init", "step"]

extendable = True   # a resume may change its length (steps, max_steps): bbvi.fit's resume=

_OPTIMIZERS = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD,
               "rmsprop": torch.optim.RMSprop}


def init(model, family="meanfield", estimator="auto", baseline=DEFAULT, *, num_particles=None, lr=None,
         optimizer="adam", schedule="auto", steps=None, clip_grad=None, seed=0, device="cpu", dtype=None,
         init_values=None, init_strategy="auto", max_steps=None, subsample_size=None, subsample_cv=True, comm=None,
         **unknown):
    """Build the FitState: move the model's data to device/dtype (float64 by default), start q (bbvi.start:
    'auto' is the MAP/Laplace start where torch can differentiate the log-joint and the density has a mode, the
    zero start otherwise; `init_values` sets some latents' starting values; particle 0 of a discrete latent not given starts at the
    first draw from q's uniform start at which the log-joint is finite), check the log-joint once,
    choose the estimator's plan and the step-size rule (steps=None: bbvi.Adaptive; steps=N: `schedule`, cosine by
    default), build the optimizer. With `comm` (a data-parallel fit, bbvi.distributed): rank 0's start on every
    rank, this rank's shard of the plates, and its own generator (seeded seed + rank on ranks above 0)."""
    from ..model import Model
    if unknown:
        _refuse_unknown("init", unknown, init)
    if not isinstance(model, Model):
        hint = (" (it looks like the log-joint itself: wrap it as bbvi.Model(log_joint, latents={...}))"
                if callable(model) else "")
        raise ConfigError(f"bbvi.fit needs a bbvi.Model, got {type(model).__name__}{hint}")
    num_particles = default_particles(family, num_particles)
    dtype, device = check_init_options(model, num_particles, steps, max_steps, lr, clip_grad, seed, dtype, device)
    family = resolve_family(family)
    estimator = resolve_estimator(estimator, baseline)
    make_opt, natural, lr = _optimizer(optimizer, family, lr, schedule)
    rule = _rule(schedule, steps, lr, max_steps)
    factor = None if rule is not None else _schedule("cosine" if schedule == "auto" else schedule, max(steps, 1))

    for note in precision_notes(model.data, dtype):
        warnings.warn(f"{note}: pass dtype=torch.float64 to fit in double precision", UserWarning, stacklevel=3)
    model = model.to(device, dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    discrete, params, loc, fixed = _initial_params(model, family, init_values, generator, device, dtype)
    u, k, report = _first_check(model, family, discrete, params, loc, fixed, generator, seed, device)
    plan = plan_for(estimator, model, report, num_particles)
    batch = check_subsample(subsample_size, model, report)
    structure = None
    if rao_blackwellized(report, plan):
        check_baseline(plan.baseline)
        structure = discover(model, discrete, report, u.detach()[:2], {n: v[:2] for n, v in k.items()},
                             report.differentiable)
    if plan.path == "score" and getattr(family, "score_path_warning", None):
        warnings.warn(family.score_path_warning, ReliabilityWarning, stacklevel=3)
    if discrete.spec:  # the MAP start averages over q_d's starting (uniform) factors: a generator of its own
        with torch.no_grad():
            k = discrete.sample(params["discrete"], START_DRAWS, torch.Generator(device=device).manual_seed(seed))
    model, start_info = choose_start(init_strategy, model, family, params, report, k)
    report = model.check_particles(report)
    data = DataView(model, structure, report.factors, batch)
    if comm is not None:
        comm.broadcast([t.detach() for g in params.values() for t in g.values()] + list(model.preconditioner or ()))
        data = data.sharded(comm)
        if comm.rank:
            generator.manual_seed(seed + comm.rank)
    leaves = [t for g in params.values() for t in g.values()]
    base_lr = rule.lr if rule is not None else (0.05 if lr is None else lr)
    opt = NaturalGradient(params, family, lr=base_lr) if natural else _made(make_opt(leaves, lr=base_lr), optimizer)
    state = FitState(model=model, family=family, discrete=discrete, plan=plan, report=report, params=params,
                     optimizer=opt, lr=float(base_lr), schedule=factor, generator=generator,
                     baseline_state=init_baseline_state(plan, device, dtype), num_particles=num_particles,
                     clip_grad=clip_grad, record=Record(torch.zeros((), dtype=torch.int64, device=device)),
                     start=start_info, structure=structure, data=data, comm=comm, guards=guards_for(comm))
    if uses_cv(subsample_cv, data.batch, data.model, discrete, report, plan):
        state.anchor = None
    if rule is not None:
        state.tracker = rule.tracker(state)
        state.schedule = state.tracker.factor
    return state


def _initial_params(model, family, init_values, generator, device, dtype):
    """(discrete, params, loc, fixed): q's discrete factors and its parameters at their start (continuous ones
    from family.init at loc, every tensor requiring grad), the continuous start loc (zeros, or `init_values`)
    and the discrete latents' given starting values."""
    loc = torch.zeros(model.dim, device=device, dtype=dtype)
    fixed = {}
    if init_values:
        loc = initial_loc(model, init_values, loc)
        fixed = initial_discrete(model, init_values, device)
    discrete = Discrete.for_model(model)
    params = {"continuous": family.init(model.dim, loc, generator) if model.dim else {},
              "discrete": discrete.init(device, dtype)}
    for group in params.values():
        for t in group.values():
            t.requires_grad_(True)
    return discrete, params, loc, fixed


def _first_check(model, family, discrete, params, loc, fixed, generator, seed, device):
    """(u, k, report): the log-joint checked once (model.check, the particle check left for after the start) on
    a probe's draws from q whose particle 0 is the start (loc and the `fixed` discrete values)."""
    with torch.no_grad():
        probe = _probe_count(model)
        u, k = draw(model, family, discrete, params, probe, generator)
        u[0] = loc
        for name, v in fixed.items():
            k[name][0] = v
    try:
        report = model.check(u, k, particles=False)  # the particle check comes after the start (check_particles)
    except NotFiniteStart:
        # a discrete latent's first draw may be where the posterior is 0 (an N-mixture's N below the largest
        # count): particle 0 takes the first of a few more draws at which the log density is finite
        if len(fixed) == len(model.discrete) or not finite_start(
                model, loc, k, fixed, torch.Generator(device=device).manual_seed(seed)):
            raise
        report = model.check(u, k, particles=False)
    return u, k, report


def _made(opt, optimizer):
    """The optimizer a callable `optimizer` made, if bbvi can step it: a torch.optim.Optimizer whose step needs no
    closure (one stochastic gradient per step), else a ConfigError saying what it returned."""
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(f"optimizer {optimizer!r} returned {type(opt).__name__} ({opt!r:.80}), not a "
                          f"torch.optim.Optimizer: a callable optimizer must return one, e.g. "
                          f"lambda params, lr: torch.optim.Adam(params, lr=lr)")
    closure = inspect.signature(opt.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ConfigError(f"optimizer {type(opt).__name__} needs a closure in its step (it re-evaluates the objective "
                          f"several times per step, as a line search on a deterministic loss does); bbvi's steps are "
                          f"one stochastic ELBO gradient each: use 'adam' (the default), 'adagrad', 'rmsprop', 'sgd' "
                          f"or a first-order torch.optim optimizer")
    return opt


def _optimizer(optimizer, family, lr, schedule):
    """(a callable (leaves, lr) -> torch optimizer, or None for natural-gradient steps; whether they are natural;
    lr, with the method's or the family's default where None and no adaptive rule sets it)."""
    natural = isinstance(optimizer, str) and optimizer == "natural"
    if natural:  # natural-gradient steps need the family and the parameter dict, not just the leaves
        check_family(family)
        make_opt = None
        if lr is None and not isinstance(schedule, Adaptive):
            lr = DEFAULT_LR  # rho, not Adam's 0.05 (measured in experiments/natural.py)
    else:
        make_opt = _OPTIMIZERS.get(optimizer) if isinstance(optimizer, str) else optimizer
        if make_opt is None or not callable(make_opt):
            raise ConfigError(f"optimizer must be one of {sorted(_OPTIMIZERS) + ['natural']} or a callable "
                              f"(params, lr) -> torch.optim.Optimizer, got {optimizer!r}")
    if lr is None and not natural and not isinstance(schedule, Adaptive):
        lr = getattr(family, "default_lr", None)  # a flow's conditioners want smaller steps than a Gaussian's 0.05
    return make_opt, natural, lr


GUARD_STEPS = 100


def step(state):
    """One step: estimate, check, update, then the adaptive rule's look at it (steps=None: its levels, averaging
    and stop). Returns the ELBO estimate (0-dim tensor, possibly NaN if skipped). `state.stop` turns True when the
    rule says the fit is done (converged, or max_steps), so a loop of one's own is
    `while not state.stop: bbvi.step(state)`; with a fixed step count (steps=N) the loop counts its own steps."""
    value = state.compiled(state, _update) if state.compiled is not None else _update(state)
    if state.tracker is not None:
        state.stop = state.tracker.observe(state)
    return value


def _update(state):
    """The step without the rule's look: estimate, check, update (the compiled step's eager fallback)."""
    opt = state.optimizer
    for group in opt.param_groups:
        group["lr"] = state.lr * state.schedule(state.step)
    model, structure, state.order, state.anchor = state.data.for_step(   # this step's rows (bbvi.data_view)
        state.order, state.anchor, state.generator, lambda: state.family.mean(state.params["continuous"]))
    # Two checks of the estimate change nothing where every particle and gradient is finite, at a host read or a
    # few ops per step, so the step first goes without them and, only when its estimate or gradient comes out
    # non-finite, is done again from the same generator state (the same particles) as it would have been with
    # them; each then stays on for GUARD_STEPS steps (a log-joint that is often NaN would otherwise pay every step
    # twice). The particles' check (`estimate`, checked=True) leaves out those whose log-joint is not finite; it
    # waits only for bbvi's own paths and baselines (`defers_check`), whose ELBO value averages every particle, so
    # that a non-finite one shows in it. The pathwise guard (guard=True) drops particles whose log-joint is finite
    # but whose gradient is not (one would make the whole gradient NaN). The result is the same bit for bit, for a
    # log-joint without side effects (a redone step calls it again: the global RNG, a call counter see it).
    defer = state.step >= state.check_until and defers_check(state.plan, structure)
    retry = state.plan.continuous is not None and state.plan.continuous.pathwise and state.step >= state.guard_until
    before = state.generator.get_state() if defer or retry else None
    value, baseline_state, num_bad, error, exception, norm = _gradient(state, model, structure, guard=not retry,
                                                                       checked=not defer)
    ok, huge, finite = verdict(value, norm)

    def again(guard):   # the step redone from the same generator state, with the particles' check
        state.generator.set_state(before)
        return _gradient(state, model, structure, guard=guard, checked=True)
    if defer and not ok:   # the step as it is with the particles' check
        state.check_until = state.step + GUARD_STEPS
        value, baseline_state, num_bad, error, exception, norm = again(guard=not retry)
        ok, huge, finite = verdict(value, norm)
    if retry and not ok and finite:   # a finite estimate, a gradient that is not: with the pathwise guard
        state.guard_until = state.step + GUARD_STEPS
        value, baseline_state, num_bad, error, exception, norm = again(guard=True)
        ok, huge, _ = verdict(value, norm)
    rescaled = ok and huge
    if rescaled:
        rescale(state.leaves(), norm)
    failure = ""
    if ok:
        opt.step()
        state.baseline_state = baseline_state
    elif not torch.isfinite(value):
        failure = (f"the ELBO estimate is {value.item()} ({int(num_bad or 0)} of {state.num_particles} particles "
                   f"had a NaN/inf log-joint" + (f"; the log-joint raised {exception}" if exception else "") + ")")
    else:
        failure = ("the ELBO gradient is NaN/inf (the log-joint's gradient overflows or is undefined at the drawn "
                   "particles; torch.where over NaN data, e.g. a masked missing value, has a NaN gradient: replace "
                   "the NaN before the where, torch.nan_to_num)")
    state.record.add(Info(elbo=value, ok=ok, rescaled=rescaled, num_bad=num_bad, raised=error is not None,
                          exception=exception, failure=failure))
    state.step += 1
    return value


def _gradient(state, model, structure, guard, checked=True):
    """Estimate at this step's particles, backward, and (data-parallel) average over the ranks: (the ELBO
    estimate (detached), baseline state, bad particles, the log-joint's exception or None, the text of what raised
    in the log-joint or its gradient ('' when nothing did), the gradient's norm, clipped with clip_grad)."""
    opt = state.optimizer
    clear_grads(opt)
    value, carrier, baseline_state, num_bad, error = estimate_parts(
        state.plan, model, state.family, state.discrete, state.params, state.num_particles, state.generator,
        state.baseline_state, structure, step=state.step, guard=guard, checked=checked, first_order=True)
    value = carrier.detach() if value is None else value
    exception = ""
    if error is not None:
        exception = (f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                     + (f" (at {error.bbvi_latents})" if getattr(error, "bbvi_latents", None) else ""))
    leaves = state.leaves()
    try:
        (-carrier).backward()
    except Exception as e:  # noqa: BLE001 - e.g. the backward of a Cholesky at an ill-conditioned particle
        clear_grads(opt)
        value = value * float("nan")
        exception = f"{type(e).__name__} in the gradient: {str(e).splitlines()[0] if str(e) else ''}"
    for guard in state.guards:   # bbvi.update: the ranks' mean on a data-parallel fit
        value, num_bad = guard(leaves, value, num_bad)
    norm = gradient_norm(leaves, value, state.clip_grad)
    return value, baseline_state, num_bad, error, exception, norm


