"""The optimisation loop: init / step / fit.

`init` builds a FitState (family parameters, optimizer, generator, baseline state) and checks the model once;
`step` runs one stochastic-gradient step on the ELBO; `fit` is the thin loop a user could write from `step`,
plus the convergence test, callbacks, a progress bar and fault handling:

- a step whose ELBO estimate or gradient is NaN/inf is skipped (parameters untouched) and counted; after
  `max_consecutive_failures` such steps in a row the fit stops with a FitError that names the cause and keeps
  the fit so far in `err.result`.
- Ctrl-C (KeyboardInterrupt) returns the result so far, marked `interrupted=True`.
- `tol_rel_obj`: Stan ADVI's convergence test on the ELBO, on running means of the per-step estimates over
  windows of `check_every` steps: stop when the mean or the median of recent relative changes falls below it.
"""
import functools
import operator
import os
import sys
import time
import types
import warnings

import torch

from .checkpoint import Keeper, load_checkpoint, read_checkpoint, save_checkpoint, setting
from .errors import ConfigError, FitError, ReliabilityWarning
from .convergence import Adaptive, RelativeTolerance, q_settled
from .estimators import DEFAULT, draw, init_baseline_state, plan_for, resolve_estimator
from .estimators.plan import defers_check, estimate_parts
from .estimators.rao_blackwell import check_baseline, discover, rao_blackwellized
from .families import Discrete
from .family_names import resolve_family
from .data_forms import precision_notes
from .distributed import shard
from .subsample import check_subsample, minibatch, structure_rows, uses_cv
from .result import Result
from .record import Info, Record
from .state import FitState
from .saving import check_writable, describe
from .options import (_check_device, _check_particle_memory, _check_positive_int, _length_change, _positive_number,
                      _probe_count, _refuse_unknown, _rule, _schedule, default_particles)
from .update import clear_grads, overflow_limit, verdict
from .start import choose as choose_start
from .start import initial_loc

DEFAULT_DTYPE = torch.float64
START_DRAWS = 32   # discrete draws the MAP start averages the log density over (models with discrete latents)

__all__ = ["init", "step", "fit", "FitState"]

_OPTIMIZERS = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD,
               "rmsprop": torch.optim.RMSprop}


def init(model, family="meanfield", estimator="auto", baseline=DEFAULT, *, num_particles=None, lr=None,
         optimizer="adam", schedule="auto", steps=None, clip_grad=None, seed=0, device="cpu", dtype=None,
         init_values=None, init_strategy="auto", max_steps=None, subsample_size=None, subsample_cv=True, comm=None,
         **unknown):
    """Build the FitState: move the model's data to device/dtype (float64 by default), start q (bbvi.start:
    'auto' is the MAP/Laplace start where torch can differentiate the log-joint and the density has a mode, the
    zero start otherwise; `init_values` sets some continuous latents' starting values), check the log-joint once,
    choose the estimator's plan and the step-size rule (steps=None: bbvi.Adaptive; steps=N: `schedule`, cosine by
    default), build the optimizer. With `comm` (a data-parallel fit, bbvi.distributed): rank 0's start on every
    rank, this rank's shard of the plates, and its own generator (seeded seed + rank on ranks above 0)."""
    from .model import Model
    if unknown:
        _refuse_unknown("init", unknown, init)
    if not isinstance(model, Model):
        hint = (" (it looks like the log-joint itself: wrap it as bbvi.Model(log_joint, latents={...}))"
                if callable(model) else "")
        raise ConfigError(f"bbvi.fit needs a bbvi.Model, got {type(model).__name__}{hint}")
    num_particles = default_particles(family, num_particles)
    _check_positive_int("num_particles", num_particles)
    if steps is not None:
        _check_positive_int("steps", steps, minimum=0)
    if max_steps is not None:
        _check_positive_int("max_steps", max_steps)
    if lr is not None and not _positive_number(lr):
        raise ConfigError(f"lr must be a positive finite number, got {lr!r}")
    if clip_grad is not None and not _positive_number(clip_grad):
        raise ConfigError(f"clip_grad must be None or a positive number (max gradient norm), got {clip_grad!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    dtype = dtype or DEFAULT_DTYPE
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if torch.finfo(dtype).bits < 32:
        fi = torch.finfo(dtype)
        raise ConfigError(f"dtype={dtype} is too coarse for a fit: {fi.bits}-bit floats carry about "
                          f"{fi.resolution:g} relative precision, so ELBO differences and the transforms to "
                          f"constrained supports round away (in float16 a unit_interval latent could not leave "
                          f"[0.25, 0.75]). Use torch.float32 or torch.float64")
    if isinstance(seed, int) and not 0 <= seed < 2 ** 63:
        raise ConfigError(f"seed must be in [0, 2**63), got {seed}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a torch device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r}, but torch has no CUDA device here "
                          f"(torch {torch.__version__}); use device='cpu'")
    _check_device(device)
    _check_particle_memory(model, num_particles, device, dtype)
    family = resolve_family(family)
    estimator = resolve_estimator(estimator, baseline)
    natural = isinstance(optimizer, str) and optimizer == "natural"
    if natural:  # natural-gradient steps need the family and the parameter dict, not just the leaves
        from .natural import DEFAULT_LR, NaturalGradient, check_family
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
    rule = _rule(schedule, steps, lr, max_steps)
    factor = None if rule is not None else _schedule("cosine" if schedule == "auto" else schedule, max(steps, 1))

    for note in precision_notes(model.data, dtype):
        warnings.warn(f"{note}: pass dtype=torch.float64 to fit in double precision", UserWarning, stacklevel=3)
    model = model.to(device, dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    loc = torch.zeros(model.dim, device=device, dtype=dtype)
    if init_values:
        loc = initial_loc(model, init_values, loc)
    discrete = Discrete.for_model(model)
    params = {"continuous": family.init(model.dim, loc, generator) if model.dim else {},
              "discrete": discrete.init(device, dtype)}
    for group in params.values():
        for t in group.values():
            t.requires_grad_(True)

    with torch.no_grad():
        probe = _probe_count(model)
        u, k = draw(model, family, discrete, params, probe, generator)
        u[0] = loc
    report = model.check(u, k, particles=False)  # the particle check comes after the start (check_particles)
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
    shard_of = None
    if comm is not None:
        comm.broadcast([t.detach() for g in params.values() for t in g.values()] + list(model.preconditioner or ()))
        part, rows, batch = shard(model, batch, comm)
        factors = report.factors and tuple((name, rows[name][1] if name in rows else n) for name, n in report.factors)
        part_structure = structure
        if structure is not None:
            idx = {p: torch.arange(first, first + n) for p, (first, n) in rows.items()}
            part_structure = structure.select(structure_rows(report.factors, idx, structure.continuous.shape[0]))
        shard_of = types.SimpleNamespace(model=part, structure=part_structure, factors=factors)
        if comm.rank:
            generator.manual_seed(seed + comm.rank)
    leaves = [t for g in params.values() for t in g.values()]
    base_lr = rule.lr if rule is not None else (0.05 if lr is None else lr)
    opt = NaturalGradient(params, family, lr=base_lr) if natural else make_opt(leaves, lr=base_lr)
    state = FitState(model=model, family=family, discrete=discrete, plan=plan, report=report, params=params,
                     optimizer=opt, lr=float(base_lr), schedule=factor, generator=generator,
                     baseline_state=init_baseline_state(plan, device, dtype), num_particles=num_particles,
                     clip_grad=clip_grad, record=Record(torch.zeros((), dtype=torch.int64, device=device)),
                     start=start_info, structure=structure, batch=batch, comm=comm, shard=shard_of)
    if uses_cv(subsample_cv, batch, shard_of.model if shard_of else model, discrete, report, plan):
        state.anchor = None
    if rule is not None:
        state.tracker = rule.tracker(state)
        state.schedule = state.tracker.factor
    return state


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
    model, structure, factors = state.model, state.structure, state.report.factors
    if state.shard is not None:  # a data-parallel rank: its rows of every plate, their factors scaled by K
        model, structure, factors = state.shard.model, state.shard.structure, state.shard.factors
    if state.batch is not None:  # this step's rows of every plate, their factors scaled by N / B
        model, idx, state.order, state.anchor = minibatch(model, state.batch, state.order, state.generator,
                                                          state.anchor,
                                                          lambda: state.family.mean(state.params["continuous"]))
        if structure is not None:
            rows = structure_rows(factors, idx, structure.continuous.shape[0])
            structure = structure.select(rows)
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
        limit = overflow_limit(norm)
        torch._foreach_mul_([p.grad for p in state.leaves() if p.grad is not None], (limit / norm).item())
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
    if state.comm is not None:  # the ranks' mean gradient and ELBO estimate: the same update on every rank
        local = [p.grad is None for p in leaves]
        for p in leaves:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        value, num_bad = state.comm.average(value, [p.grad for p in leaves], num_bad)
        for p, none in zip(leaves, local):
            if none:
                p.grad = None
    grads = [p.grad for p in leaves if p.grad is not None] or [value.reshape(1) * 0]
    if state.clip_grad is not None:
        norm = torch.nn.utils.clip_grad_norm_(leaves, state.clip_grad)
    else:  # a sum of norms is finite exactly when every gradient entry is
        norm = functools.reduce(operator.add, torch._foreach_norm(grads))
    return value, baseline_state, num_bad, error, exception, norm


def fit(model, family="meanfield", estimator="auto", baseline=DEFAULT, *, num_particles=None, steps=None, lr=None,
        optimizer="adam", schedule="auto", clip_grad=None, tol_rel_obj=None, check_every=100, callbacks=(),
        progress=None, seed=0, device="cpu", dtype=None, init_values=None, max_consecutive_failures=100,
        checkpoint=None, checkpoint_every=500, resume=None, init_strategy="auto", max_steps=None, diagnose=True,
        subsample_size=None, subsample_cv=True, distributed=False, compile=False, **unknown):
    """Fit q to the posterior of `model` by stochastic gradient ascent on the ELBO.

    With no options it needs no tuning: the MAP/Laplace start where it exists (init_strategy='auto'), float64,
    the adaptive step-size rule with iterate averaging and a statistical stopping rule (steps=None, see
    bbvi.Adaptive; `max_steps` caps it, 20000 by default; status 'converged' or 'max_steps'), and at the end
    PSIS k-hat and a PSIS check of q's means and sds, with a bbvi.ReliabilityWarning when the fit cannot be
    trusted (`fit.reliability` holds what was checked; diagnose=False skips it).

    family: 'meanfield' | 'fullrank' | 'lowrank' | 'flow' (or bbvi.MeanField/FullRank/LowRank/Flow(...); a flow
    bends a full-rank Gaussian with coupling layers, lr 0.01 and 64 particles by default, bbvi.flows); discrete
    latents get mean-field Categorical factors. num_particles: draws per step, 16 by default (a flow: 64). estimator: 'auto' | 'score' | 'reparam' | 'stl' (or bbvi.Score(...)
    ...); baseline (score terms): None | 'ema' | 'loo' | 'cv', LOO by default. optimizer: 'adam' | 'adagrad' |
    'sgd' | 'rmsprop' | 'natural' (natural-gradient steps in q's Fisher geometry, meanfield/fullrank and
    Categorical factors, bbvi.natural; lr is then the step size rho, 0.3 by default) or a
    callable (params, lr) -> Optimizer. steps=N runs exactly N steps (status
    'completed') with lr (0.05 by default) and `schedule`: 'cosine' (the default with steps=N: lr decays to 2%
    over the steps) | None (constant) | 'exponential' | callable t -> lr factor | bbvi.Adaptive(...) (then N is
    its cap). clip_grad: max global gradient norm. tol_rel_obj: with steps=N, stop early when the ELBO's
    relative change (Stan ADVI's test) falls below it, checked every `check_every` steps. callbacks: callables
    (state) -> bool, called after every step; True stops the fit. progress: tqdm bar (default: when stderr is a
    terminal). init_strategy: 'auto' | 'zero' (q starts at unconstrained 0 or init_values, scales init_scale) |
    'map' (q starts at the MAP with Laplace scales, or a ConfigError says why it cannot). subsample_size: B
    rows of every plate per step (an int, or {plate: B}) for a model with plates (bbvi.Model(plates=...)): each
    step's ELBO and gradient are unbiased for the full data's (bbvi.subsample). subsample_cv: with minibatches,
    each plate factor gets a control variate, its first-order Taylor expansion at q's mean, re-anchored every
    epoch (one full-data evaluation at one point) and exact in expectation; it cuts the minibatch noise by orders
    of magnitude on large data (True by default; off for models with discrete latents and for Rao-Blackwellized
    score terms; bbvi.subsample.Control). distributed: True under torchrun
    (`torchrun --nproc_per_node=K script.py`, every rank calling bbvi.fit on the same model): each rank steps on
    its shard of the plates with particles of its own, gradients all-reduced (gloo on the CPU, NCCL on CUDA), the
    parameters identical on every rank; rank 0 writes checkpoints and runs the end-of-fit check
    (bbvi.distributed). compile: True runs each step as one torch.compile graph (bbvi.compiled; Gaussian
    families, reparam/stl/score+LOO, Adam, full data): the same results within rounding, a few times cheaper per
    step at small N once compiled (compiling takes seconds: worth it for long fits).

    checkpoint: a file path where the full fit state is written atomically (with a checksum) every
    `checkpoint_every` steps and when the fit ends (also on Ctrl-C); a path that cannot be written (a folder, a
    folder that is not writable) is a ConfigError before the first step, and a write that fails later is a
    FitError holding the fit so far. Ctrl-C (a KeyboardInterrupt anywhere in a step, also from the log-joint or a
    signal) returns, and checkpoints, the fit at the last completed step: a step it cuts short is undone.
    resume: a checkpoint path to continue from, with the same model and settings, reaching bit for bit the
    result of an uninterrupted fit; a corrupted file is a ConfigError. resume may also change how long the fit
    runs: a larger `steps` (or, with steps=None, a larger `max_steps`) extends it, also a finished one, to the
    new total. That is bit for bit a single fit of the new length when nothing depended on the old length
    (schedule None/'constant'/a callable t -> factor; an adaptive fit that had neither converged nor reached its
    cap); otherwise (the 'cosine' default and 'exponential' schedules depend on the total, so from the resumed
    step on they follow the new length's curve; an adaptive fit that had converged or reached max_steps goes on
    with a new level from its averaged q, at the next learning rate after convergence, at the same one after
    the cap) a UserWarning says why it differs. Either way `fit.settings['extended']` records it. A length
    below the steps already run is a ConfigError. Returns a bbvi Result.
    """
    from .model import Model
    if unknown:
        _refuse_unknown("fit", unknown, fit)
    if not isinstance(model, Model):
        init(model)  # raises the ConfigError that says what a model is
    if tol_rel_obj is not None and not _positive_number(tol_rel_obj):
        raise ConfigError(f"tol_rel_obj must be None or a positive number, got {tol_rel_obj!r}")
    if tol_rel_obj is not None and steps is None:
        raise ConfigError("tol_rel_obj (Stan ADVI's test) needs steps=N as its cap; steps=None already stops on "
                          "its own (bbvi.Adaptive)")
    _check_positive_int("check_every", check_every)
    _check_positive_int("max_consecutive_failures", max_consecutive_failures)
    _check_positive_int("checkpoint_every", checkpoint_every)
    for name, path in (("checkpoint", checkpoint), ("resume", resume)):
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"{name} must be a file path, got {path!r}")
    if checkpoint is not None:
        check_writable(checkpoint, "checkpoint")
    callbacks = tuple(callbacks)
    if not all(callable(c) for c in callbacks):
        raise ConfigError("callbacks must be callables (state) -> bool")
    num_particles = default_particles(family, num_particles)
    settings = dict(model=model.name, family=describe(resolve_family(family)), num_particles=num_particles,
                    steps=steps, lr=lr, optimizer=setting(optimizer), schedule=setting(schedule),
                    clip_grad=clip_grad, tol_rel_obj=tol_rel_obj, seed=seed, device=str(device),
                    init_strategy=init_strategy, max_steps=max_steps)
    if not isinstance(subsample_cv, bool):
        raise ConfigError(f"subsample_cv must be True or False, got {subsample_cv!r}")
    if subsample_size is not None:  # written only when set: checkpoints of full-data fits compare as before
        settings["subsample_size"] = subsample_size
        if subsample_cv:   # written only when on: checkpoints of plain minibatch fits compare as before
            settings["subsample_cv"] = True
    if not isinstance(distributed, bool):
        raise ConfigError(f"distributed must be True or False, got {distributed!r}")
    comm = None
    if distributed:
        from .distributed import connect
        comm, device = connect(device)
        settings["distributed"] = comm.world_size   # a checkpoint resumes on as many ranks
    grad_mode = torch.is_grad_enabled()
    began = time.perf_counter()
    state = init(model, family, estimator, baseline, num_particles=num_particles, lr=lr, optimizer=optimizer,
                 schedule=schedule, steps=steps, clip_grad=clip_grad, seed=seed, device=device, dtype=dtype,
                 init_values=init_values, init_strategy=init_strategy, max_steps=max_steps,
                 subsample_size=subsample_size, subsample_cv=subsample_cv, comm=comm)
    if not isinstance(compile, bool):
        raise ConfigError(f"compile must be True or False, got {compile!r}")
    if compile:
        from .compiled import CompiledStep
        state.compiled = CompiledStep(state)   # a ConfigError for what it does not cover
        settings["compile"] = True            # written only when set: checkpoints of eager fits compare as before
    start_s = time.perf_counter() - began
    objective = getattr(state.plan.whole, "objective", None)  # a step whose value is not the ELBO (VIMCO)
    if objective is not None:
        settings["objective"] = objective
    bias = getattr(state.plan.whole, "bias", None)  # an estimator biased by design (Concrete) says so
    if bias is not None:
        settings["bias"] = bias
    settings.update(estimator=describe(resolve_estimator(estimator, baseline)), plan=repr(state.plan),
                    dtype=str(next(iter(state.leaves())).dtype), start=state.start.strategy)
    tracker = state.tracker
    cap = tracker.rule.max_steps if tracker is not None else steps
    converged = RelativeTolerance(tol_rel_obj, check_every, cap)
    if resume is not None:
        ck = read_checkpoint(state, resume, settings, length_may_differ=True)
        change = _length_change(ck, resume, state, schedule=schedule, lr=lr, steps=steps, max_steps=max_steps)
        load_checkpoint(state, ck)
        if comm is not None:  # this rank's own generator, baseline and data order
            state.load_rank_state_dict(ck["ranks"][comm.rank])
        stops = [t for t in range(check_every, state.step + 1, check_every)  # replay the convergence test
                 if converged(state.elbo[:t])]
        notes = [ck["settings"]["extended"]] if "extended" in ck["settings"] else []
        if change is not None:
            done, name, old_cap, new_cap, reasons, reopen = change
            if stops and stops[0] <= done:
                reasons.append(f"tol_rel_obj's test (whose window depends on the length) passes at step {stops[0]} "
                               f"of a fit with {name}={new_cap}: a single fit would have stopped there")
            note = (f"resumed at step {done} with {name}={new_cap} (saved with {name}={old_cap}): "
                    + ("the same as a single fit with " + f"{name}={new_cap}" if not reasons else
                       f"not the same as a single fit with {name}={new_cap}: " + "; ".join(reasons)))
            if reasons:
                warnings.warn(f"bbvi.fit: resume={str(resume)!r} {note}", UserWarning, stacklevel=2)
            if reopen is not None:
                tracker.reopen(state, next_rate=reopen == "next")
            notes.append(note)
        if notes:
            settings["extended"] = " | then ".join(notes)
    show = (sys.stderr.isatty() if progress is None else bool(progress)) and (comm is None or comm.rank == 0)
    bar = None
    if show:
        from tqdm.auto import tqdm
        bar = tqdm(total=cap, initial=state.step, desc=f"bbvi {model.name}", leave=False)
    status = "completed" if tracker is None else "max_steps"
    callback_error = save_error = None
    keeper = Keeper()
    began = time.perf_counter()
    try:
        while state.step < cap and not (tracker is not None and tracker.converged):
            kept = keeper.keep(state)
            try:  # a step and the rule's look at it: done whole, or undone (Ctrl-C)
                step(state)
            except KeyboardInterrupt:
                keeper.undo(state, kept)
                raise
            if checkpoint is not None and state.step % checkpoint_every == 0:
                save_error = _write_checkpoint(state, checkpoint, settings)
                if save_error is not None:
                    status = "failed"
                    break
            if bar is not None:
                bar.update(1)
                if state.step % 50 == 0:
                    bar.set_postfix(elbo=f"{torch.stack(state.elbo[-50:]).nanmean().item():.4g}",
                                    **({"lr": f"{tracker.lr:.3g}"} if tracker is not None else {}))
            if state.consecutive_failures >= max_consecutive_failures:
                status = "failed"
                break
            try:
                stopped = any(bool(c(state)) for c in callbacks)
            except Exception as e:  # noqa: BLE001 - a user's callback must not lose the fit
                stopped, callback_error = True, e
            if comm is not None and callbacks:  # one rank's stop stops every rank
                stopped = comm.any(stopped)
            if callback_error is not None:
                status = "failed"
                break
            if stopped:
                status = "stopped by callback"
                break
            if converged(state.elbo) and q_settled(state, seed):
                status = "converged"
                break
            if state.stop:
                break
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        torch.set_grad_enabled(grad_mode)   # as it was, whatever a cut-short step left behind
        if bar is not None:
            bar.close()
    if tracker is not None and tracker.converged:
        status = "converged"
    if checkpoint is not None and save_error is None:
        save_error = _write_checkpoint(state, checkpoint, settings)
    result = Result.from_state(state, settings=settings, status=status, wall_time=time.perf_counter() - began,
                               start_time=start_s)
    if callback_error is not None:
        raise FitError(f"fit of model {model.name!r}: a callback raised {type(callback_error).__name__}: "
                       f"{callback_error} (after step {state.step}). The fit so far is in this error's .result"
                       + (f" and in the checkpoint {str(checkpoint)!r}" if checkpoint is not None else "") + ".",
                       result=result) from callback_error
    if save_error is not None:
        raise FitError(f"fit of model {model.name!r}: the checkpoint could not be written after step {state.step}: "
                       f"{save_error}. The fit so far is in this error's .result (save it elsewhere with "
                       f".result.save(path), or fit again with another checkpoint path).",
                       result=result) from save_error
    if status == "failed":
        raise FitError(f"fit of model {model.name!r} stopped at step {state.step}: {state.consecutive_failures} "
                       f"steps in a row failed; last cause: {state.last_failure}. {state.num_failed_steps} steps "
                       f"failed in all. The fit so far is in this error's .result.", result=result)
    unusable = _unusable_q(result)
    if unusable:
        result.status = "failed"
        raise FitError(f"fit of model {model.name!r} ended after {state.step} steps with a q that cannot be used: "
                       f"{unusable} ({state.num_failed_steps} steps failed; last cause: {state.last_failure or 'none'}). "
                       f"A step size too large blows q up: try a smaller lr, or steps=None (the adaptive rule). The "
                       f"fit is in this error's .result.", result=result)
    if diagnose and status != "interrupted":
        from .diagnostics import check_reliability
        if comm is None or comm.rank == 0:
            check_reliability(result)
        if comm is not None:  # rank 0's check (and warning) on the full data; its findings on every rank
            result.reliability = comm.share(result.reliability)
    return result


def _unusable_q(result):
    """'' when q's parameters are finite and its draws (64, from a generator of their own) are finite; else what
    is not."""
    bad = [f"{g}/{k}" for g, grp in result.params.items() for k, t in grp.items() if not bool(torch.isfinite(t).all())]
    if bad:
        return f"its parameters {bad} are NaN/inf"
    if result.model.dim:
        with torch.no_grad():
            u, _ = result.draw(64, seed=0)
            z, _ = result.model.constrain(u)
        worse = [k for k, v in z.items() if not bool(torch.isfinite(v).all())]
        if not bool(torch.isfinite(u).all()) or worse:
            return f"its draws of {worse or 'the unconstrained coordinates'} are NaN/inf"
    return ""


def _write_checkpoint(state, path, settings):
    """Write a checkpoint; the exception when that fails (the fit goes on to be returned in a FitError). On a
    data-parallel fit every rank calls it: rank 0 writes every rank's own state, and a failure fails every rank."""
    comm, error = state.comm, None
    ranks = comm.gather(state.rank_state_dict()) if comm is not None else None
    if comm is None or comm.rank == 0:
        try:
            save_checkpoint(state, path, settings, ranks=ranks)
        except Exception as e:  # noqa: BLE001 - a full disk or a removed folder must not lose the fit
            error = e
    if comm is not None and comm.any(error is not None) and error is None:
        error = OSError(f"rank 0 could not write {str(path)!r}")
    return error
