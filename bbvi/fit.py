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
import dataclasses
import math
import os
import sys
import time

import torch

from .checkpoint import restore_checkpoint, save_checkpoint
from .errors import ConfigError, FitError
from .estimators import DEFAULT, estimate, init_baseline_state, plan_for, resolve_estimator
from .families import Discrete, resolve_family
from .result import Result

__all__ = ["init", "step", "fit", "FitState"]

_OPTIMIZERS = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD,
               "rmsprop": torch.optim.RMSprop}


def _schedule(schedule, steps):
    """-> factor(t) multiplying the base learning rate at step t (0-based)."""
    if schedule in (None, "constant"):
        return lambda t: 1.0
    if schedule == "cosine":
        return lambda t: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))
    if schedule == "exponential":
        return lambda t: 0.01 ** (min(t, steps) / steps)
    if callable(schedule):
        return schedule
    raise ConfigError(f"schedule must be None, 'constant', 'cosine', 'exponential' or a callable t -> factor, "
                      f"got {schedule!r}")


@dataclasses.dataclass
class FitState:
    """Everything that carries from one step to the next."""

    model: object
    family: object
    discrete: object
    plan: object
    report: object
    params: dict
    optimizer: torch.optim.Optimizer
    lr: float
    schedule: object
    generator: torch.Generator
    baseline_state: dict
    num_particles: int
    clip_grad: object
    step: int = 0
    elbo: list = dataclasses.field(default_factory=list)
    num_failed_steps: int = 0
    num_rescaled_steps: int = 0
    consecutive_failures: int = 0
    last_failure: str = ""
    num_bad_particles: object = 0

    def leaves(self):
        return list(self.params["continuous"].values()) + list(self.params["discrete"].values())


def _overflow_limit(t):
    """Largest gradient norm whose square stays far from overflowing t's dtype (1.8e16 for float32)."""
    return math.sqrt(torch.finfo(t.dtype).max) * 1e-3


def _positive_number(value):
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            and value > 0)


def _check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")


def init(model, family="meanfield", estimator="auto", baseline=DEFAULT, *, num_particles=16, lr=0.05,
         optimizer="adam", schedule="cosine", steps=1000, clip_grad=None, seed=0, device="cpu", dtype=None,
         init_values=None, init_strategy="zero"):
    """Build the FitState: move the model's data to device/dtype, initialise q at `init_values` (a dict of
    constrained values for some continuous latents; others start at unconstrained 0) with small scales, check
    the log-joint once, choose the estimator's plan, build the optimizer. init_strategy='map' instead starts q at the
    MAP of the unconstrained density (L-BFGS from that point) with scales from its Hessian (Laplace): much
    faster on concentrated or badly scaled posteriors; needs a differentiable log-joint."""
    from .model import Model
    if not isinstance(model, Model):
        raise ConfigError(f"bbvi.fit needs a bbvi.Model, got {type(model).__name__}")
    _check_positive_int("num_particles", num_particles)
    _check_positive_int("steps", steps, minimum=0)
    if not _positive_number(lr):
        raise ConfigError(f"lr must be a positive finite number, got {lr!r}")
    if clip_grad is not None and not _positive_number(clip_grad):
        raise ConfigError(f"clip_grad must be None or a positive number (max gradient norm), got {clip_grad!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    dtype = dtype or torch.get_default_dtype()
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a torch device: {e}") from None
    family = resolve_family(family)
    estimator = resolve_estimator(estimator, baseline)
    make_opt = _OPTIMIZERS.get(optimizer) if isinstance(optimizer, str) else optimizer
    if make_opt is None or not callable(make_opt):
        raise ConfigError(f"optimizer must be one of {sorted(_OPTIMIZERS)} or a callable (params, lr) -> "
                          f"torch.optim.Optimizer, got {optimizer!r}")
    factor = _schedule(schedule, max(steps, 1))

    model = model.to(device, dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    loc = torch.zeros(model.dim, device=device, dtype=dtype)
    if init_values:
        loc = _initial_loc(model, init_values, loc)
    discrete = Discrete.for_model(model)
    params = {"continuous": family.init(model.dim, loc, generator) if model.dim else {},
              "discrete": discrete.init(device, dtype)}
    for group in params.values():
        for t in group.values():
            t.requires_grad_(True)

    with torch.no_grad():
        probe = 3
        u = family.sample(params["continuous"], probe, generator) if model.dim else loc.new_zeros(probe, 0)
        u[0] = loc
        k = discrete.sample(params["discrete"], probe, generator)
    report = model.check(u, k)
    plan = plan_for(estimator, model, report, num_particles)
    if init_strategy == "map":
        model = _laplace_start(model, family, params, report, k)
    elif init_strategy != "zero":
        raise ConfigError(f"init_strategy must be 'zero' or 'map', got {init_strategy!r}")
    leaves = [t for g in params.values() for t in g.values()]
    opt = make_opt(leaves, lr=lr)
    return FitState(model=model, family=family, discrete=discrete, plan=plan, report=report, params=params,
                    optimizer=opt,
                    lr=float(lr), schedule=factor, generator=generator,
                    baseline_state=init_baseline_state(plan, device, dtype), num_particles=num_particles,
                    clip_grad=clip_grad, num_bad_particles=torch.zeros((), dtype=torch.int64, device=device))


def _laplace_start(model, family, params, report, discrete_draw, max_iter=500):
    """The MAP of the unconstrained density (discrete latents held at one draw, L-BFGS) and its Hessian H.
    Returns the model preconditioned by (MAP, 1/sqrt(H_ii)), in whose whitened coordinates q starts at 0 with
    the Laplace covariance. ConfigError where the log-joint is not differentiable or H is not positive definite."""
    if not report.differentiable or model.dim == 0:
        raise ConfigError(f"init_strategy='map' needs a log-joint torch can differentiate in every continuous latent "
                          f"(model {model.name!r}: {list(report.nondifferentiable) or 'no continuous latents'})")
    k1 = {name: v[:1] for name, v in discrete_draw.items()}
    u = params["continuous"]["loc"].detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([u], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = -model.log_density(u[None], k1)[0]
        loss.backward()
        return loss

    opt.step(closure)
    u = u.detach()
    if not torch.isfinite(model.log_density(u[None], k1)).all():
        raise ConfigError(f"init_strategy='map': the optimiser left the support of model {model.name!r}")
    hess = torch.autograd.functional.hessian(lambda v: -model.log_density(v[None], k1)[0], u)
    hess = 0.5 * (hess + hess.T)
    if not bool(torch.isfinite(hess).all()) or torch.linalg.eigvalsh(hess).min() <= 0:
        raise ConfigError(f"init_strategy='map': the Hessian at the mode of model {model.name!r} is not positive "
                          f"definite (an improper posterior or a saddle); use init_strategy='zero'")
    scale = hess.diagonal().rsqrt()
    whitened = hess * scale[:, None] * scale[None, :]
    pc = params["continuous"]
    with torch.no_grad():
        new = family.init_from_precision({name: t.detach().clone() for name, t in pc.items()}, whitened)
        pc["loc"].zero_()
        for name, t in new.items():
            if name != "loc":
                pc[name].copy_(t)
    return model.preconditioned(u, scale)


def _initial_loc(model, init_values, loc):
    unknown = set(init_values) - {b.name for b in model.blocks}
    if unknown:
        raise ConfigError(f"init_values names {sorted(unknown)}, which are not continuous latents of "
                          f"model {model.name!r}")
    loc = loc.clone()
    for b in model.blocks:
        if b.name in init_values:
            v = torch.as_tensor(init_values[b.name], device=loc.device, dtype=loc.dtype)
            if tuple(v.shape) != b.shape:
                raise ConfigError(f"init_values[{b.name!r}] has shape {tuple(v.shape)}, latent has {b.shape}")
            uv = b.transform.inv(v[None]).reshape(-1)
            if not torch.isfinite(uv).all():
                raise ConfigError(f"init_values[{b.name!r}] = {v.tolist()} is outside the support "
                                  f"{model.latents[b.name].support}")
            loc[b.start:b.stop] = uv
    return loc


def step(state):
    """One step: estimate, check, update. Returns the ELBO estimate (0-dim tensor, possibly NaN if skipped)."""
    opt = state.optimizer
    for group in opt.param_groups:
        group["lr"] = state.lr * state.schedule(state.step)
    opt.zero_grad(set_to_none=True)
    surrogate, baseline_state, num_bad = estimate(state.plan, state.model, state.family, state.discrete,
                                                  state.params, state.num_particles, state.generator,
                                                  state.baseline_state)
    (-surrogate).backward()
    leaves = state.leaves()
    grads = [p.grad for p in leaves if p.grad is not None]
    if state.clip_grad is not None:
        norm = torch.nn.utils.clip_grad_norm_(leaves, state.clip_grad)
    else:  # a sum of norms is finite exactly when every gradient entry is
        norm = sum(torch._foreach_norm(grads))
    # One host sync: is the step finite, and is its gradient so large that the optimizer's squared-gradient
    # statistics would overflow (Adam's v = inf freezes every later update at m / sqrt(v) = 0)?
    limit = _overflow_limit(norm)
    ok, huge = torch.stack([torch.isfinite(surrogate.detach() + norm), norm > limit]).tolist()
    if ok and huge:
        torch._foreach_mul_(grads, (limit / norm).item())
        state.num_rescaled_steps += 1
    if num_bad is not None:
        state.num_bad_particles = state.num_bad_particles + num_bad
    if ok:
        opt.step()
        state.baseline_state = baseline_state
        state.consecutive_failures = 0
    else:
        state.num_failed_steps += 1
        state.consecutive_failures += 1
        state.last_failure = ("the ELBO estimate is " + str(surrogate.item()) +
                              f" ({int(num_bad or 0)} of {state.num_particles} particles had a NaN/inf log-joint)"
                              if not torch.isfinite(surrogate) else
                              "the ELBO gradient is NaN/inf (the log-joint's gradient overflows or is undefined "
                              "at the drawn particles)")
    elbo = surrogate.detach()
    state.elbo.append(elbo)
    state.step += 1
    return elbo


class _Convergence:
    """Stan ADVI's relative-tolerance test, applied to running means of the per-step ELBO estimates."""

    def __init__(self, tol, every, steps):
        self.tol, self.every = tol, every
        self.buffer_size = max(int(0.1 * steps / every), 2)
        self.previous, self.rel = None, []

    def __call__(self, elbo):
        if self.tol is None or len(elbo) % self.every:
            return False
        window = torch.stack(elbo[-self.every:])
        current = window[torch.isfinite(window)].mean().item()
        if self.previous is not None and math.isfinite(current):
            self.rel = (self.rel + [abs(current - self.previous) / max(abs(current), 1e-12)])[-self.buffer_size:]
        self.previous = current
        if len(self.rel) < 2:
            return False
        rel = torch.tensor(self.rel)
        return bool(rel.mean() < self.tol or rel.median() < self.tol)


def fit(model, family="meanfield", estimator="auto", baseline=DEFAULT, *, num_particles=16, steps=5000, lr=0.05,
        optimizer="adam", schedule="cosine", clip_grad=None, tol_rel_obj=None, check_every=100, callbacks=(),
        progress=None, seed=0, device="cpu", dtype=None, init_values=None, max_consecutive_failures=100,
        checkpoint=None, checkpoint_every=500, resume=None, init_strategy="zero"):
    """Fit q to the posterior of `model` by stochastic gradient ascent on the ELBO.

    family: 'meanfield' | 'fullrank' | 'lowrank' (or bbvi.MeanField/FullRank/LowRank(...)); discrete latents
    get mean-field Categorical factors. estimator: 'auto' | 'score' | 'reparam' | 'stl' (or bbvi.Score(...)
    ...); baseline (score terms): None | 'ema' | 'loo' | 'cv', LOO by default. optimizer: 'adam' | 'adagrad' |
    'sgd' | 'rmsprop' or a callable (params, lr) -> Optimizer; schedule: 'cosine' (default: lr decays to 2% over
    `steps`, which removes most of the final iterate's jitter) | None (constant) | 'exponential' |
    callable t -> lr factor. clip_grad: max global gradient norm. tol_rel_obj: stop early when the ELBO's
    relative change (Stan ADVI's test) falls below it, checked every `check_every` steps. callbacks: callables
    (state) -> bool, called after every step; True stops the fit. progress: tqdm bar (default: when stderr is a
    terminal). init_strategy: 'zero' (q starts at unconstrained 0, scales init_scale) or 'map' (q starts at the MAP
    with Laplace scales: for concentrated or badly scaled posteriors). checkpoint: a path where the full fit state is written atomically every `checkpoint_every`
    steps and when the fit ends (also on Ctrl-C); resume: a checkpoint path to continue from, with the same
    model and settings, reaching bit for bit the result of an uninterrupted fit. Returns a bbvi Result.
    """
    if tol_rel_obj is not None and not _positive_number(tol_rel_obj):
        raise ConfigError(f"tol_rel_obj must be None or a positive number, got {tol_rel_obj!r}")
    _check_positive_int("check_every", check_every)
    _check_positive_int("max_consecutive_failures", max_consecutive_failures)
    _check_positive_int("checkpoint_every", checkpoint_every)
    for name, path in (("checkpoint", checkpoint), ("resume", resume)):
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"{name} must be a file path, got {path!r}")
    callbacks = tuple(callbacks)
    if not all(callable(c) for c in callbacks):
        raise ConfigError("callbacks must be callables (state) -> bool")
    settings = dict(model=model.name, family=repr(resolve_family(family)), num_particles=num_particles,
                    steps=steps, lr=lr, optimizer=str(optimizer), schedule=str(schedule), clip_grad=clip_grad,
                    tol_rel_obj=tol_rel_obj, seed=seed, device=str(device), init_strategy=init_strategy)
    state = init(model, family, estimator, baseline, num_particles=num_particles, lr=lr, optimizer=optimizer,
                 schedule=schedule, steps=steps, clip_grad=clip_grad, seed=seed, device=device, dtype=dtype,
                 init_values=init_values, init_strategy=init_strategy)
    settings.update(estimator=repr(resolve_estimator(estimator, baseline)), plan=repr(state.plan),
                    dtype=str(next(iter(state.leaves())).dtype))
    converged = _Convergence(tol_rel_obj, check_every, steps)
    if resume is not None:
        restore_checkpoint(state, resume, settings)
        for t in range(check_every, state.step + 1, check_every):  # replay the convergence test's history
            converged(state.elbo[:t])
    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = None
    if show:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=state.step, desc=f"bbvi {model.name}", leave=False)
    status, start = "completed", time.perf_counter()
    try:
        while state.step < steps:
            step(state)
            if checkpoint is not None and state.step % checkpoint_every == 0:
                save_checkpoint(state, checkpoint, settings)
            if bar is not None:
                bar.update(1)
                if state.step % 50 == 0:
                    bar.set_postfix(elbo=f"{torch.stack(state.elbo[-50:]).nanmean().item():.4g}")
            if state.consecutive_failures >= max_consecutive_failures:
                status = "failed"
                break
            if any(bool(c(state)) for c in callbacks):
                status = "stopped by callback"
                break
            if converged(state.elbo):
                status = "converged"
                break
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        if bar is not None:
            bar.close()
    if checkpoint is not None:
        save_checkpoint(state, checkpoint, settings)
    result = Result.from_state(state, settings=settings, status=status, wall_time=time.perf_counter() - start)
    if status == "failed":
        raise FitError(f"fit of model {model.name!r} stopped at step {state.step}: {state.consecutive_failures} "
                       f"steps in a row failed; last cause: {state.last_failure}. {state.num_failed_steps} steps "
                       f"failed in all. The fit so far is in this error's .result.", result=result)
    return result
