"""fit's and init's options: their checks and defaults (the particle count, the step-size schedule or the
adaptive rule, the device, the memory a fit needs, misspelt keywords, the loop's own options), and what a resume with a new length means
(`_length_change`). The values they check go into a FitState (fit.py)."""
import dataclasses
import math
import os

import torch

from .convergence import Adaptive
from .errors import ConfigError
from .family_names import resolve_family
from .saving import check_writable

DEFAULT_DTYPE = torch.float64


def _schedule(schedule, steps):
    """-> factor(t) multiplying the base learning rate at step t (0-based)."""
    if schedule in (None, "constant"):
        return lambda t: 1.0
    if schedule == "cosine":
        return lambda t: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))
    if schedule == "exponential":
        return lambda t: 0.01 ** (min(t, steps) / steps)
    if callable(schedule):
        for t in range(steps):  # a factor that is NaN or negative would turn ascent into silent descent
            try:
                v = float(schedule(t))
            except Exception as e:  # noqa: BLE001
                raise ConfigError(f"schedule({t}) raised {type(e).__name__}: {e}; schedule must map a step "
                                  f"t = 0..{steps - 1} to a factor >= 0 of the learning rate") from None
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"schedule({t}) = {v}: a learning-rate factor must be finite and >= 0 for every "
                                  f"step t = 0..{steps - 1}")
        return schedule
    raise ConfigError(f"schedule must be None, 'constant', 'cosine', 'exponential' or a callable t -> factor, "
                      f"got {schedule!r}")



def _positive_number(value):
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            and value > 0)


def _check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")



def _check_device(device):
    """ConfigError for a device a fit cannot run on: anything but the CPU, an existing CUDA device, or MPS where
    torch has it (e.g. 'meta', whose tensors hold no data, or a backend this torch was not built with)."""
    if device.type == "cpu" or (device.type == "mps" and torch.backends.mps.is_available()):
        return
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device={str(device)!r}, but torch sees {count} CUDA device(s) here (cuda:0 to "
                              f"cuda:{count - 1}); use one of them or device='cpu'")
        return
    usable = ["'cpu'"] + (["'cuda'"] if torch.cuda.is_available() else [])
    raise ConfigError(f"device={str(device)!r}: a fit runs on the CPU, a CUDA GPU or Apple's MPS where torch has "
                      f"them; {device.type!r} is not one of them or is not available here"
                      + (" ('meta' tensors hold no values to compute with)" if device.type == "meta" else "")
                      + f". Use device={' or '.join(usable)}")


def default_particles(family, num_particles):
    """num_particles as given, or the family's default when None: 16, a flow's 64 (its step is overhead-bound, so
    64 particles cost about what 16 do, and its Monte Carlo entropy term wants them)."""
    if num_particles is not None:
        return num_particles
    try:
        return getattr(resolve_family(family), "default_particles", 16)
    except ConfigError:
        return 16  # the family itself is refused later, with its own message


def _check_particle_memory(model, num_particles, device, dtype, work=8):
    """ConfigError when num_particles particles cannot fit in the device's memory: every step holds the (S, D)
    draws, their noise, the constrained values, gradients and the log-joint's own work (`work` copies, a lower
    bound), and for each discrete entry its (S, K) Gumbel noise."""
    from .families import _memory_bytes
    have = _memory_bytes(device)
    if have is None:
        return
    width = model.dim + sum(lat.numel * (k + 1) for lat, _, k in model.discrete.values())
    per_particle = max(width, 1) * (torch.finfo(dtype).bits // 8) * work
    need = num_particles * per_particle
    if need > have:
        fits = have // (2 * per_particle)
        raise ConfigError(f"num_particles={num_particles} needs at least {need / 2**30:.0f} GiB per step "
                          f"({num_particles} particles x {width} values x {torch.finfo(dtype).bits // 8} bytes x "
                          f"{work} working copies), more than this machine's {have / 2**30:.1f} GiB on "
                          f"{str(device)!r}: use num_particles <= {fits} (a few tens to a few thousand is usual)")


_ALIASES = {"n_particles": "num_particles", "particles": "num_particles", "num_samples": "num_particles",
            "step": "steps", "n_steps": "steps", "num_steps": "steps", "iterations": "steps", "n_iter": "steps",
            "learning_rate": "lr", "step_size": "lr", "random_seed": "seed", "rng_seed": "seed", "guide": "family"}


def _refuse_unknown(fn_name, unknown, fn):
    """ConfigError for keywords `fn` does not take, with the one meant where it can be guessed."""
    import difflib
    import inspect
    known = [p for p in inspect.signature(fn).parameters if p not in ("unknown", "model")]
    lines = []
    for key in unknown:
        if key == "init_scale":
            lines.append("init_scale is an option of the family: family=bbvi.MeanField(init_scale=...) (or "
                         "bbvi.FullRank / bbvi.LowRank)")
            continue
        guess = _ALIASES.get(key) or next(iter(difflib.get_close_matches(key, known, n=1, cutoff=0.6)), None)
        lines.append(f"{key}={unknown[key]!r}" + (f": did you mean {guess}=?" if guess else ""))
    raise ConfigError(f"bbvi.{fn_name}() got unknown keyword argument(s): " + "; ".join(lines)
                      + f". Its options: {', '.join(known)}")


def _probe_count(model):
    """How many particles the first-call check draws: 3, or the first prime above it that is no dimension of
    any data array, so that a log-joint broadcasting particles against data of that length cannot pass."""
    sizes = set()

    def collect(obj):
        if torch.is_tensor(obj) or hasattr(obj, "shape"):
            sizes.update(int(n) for n in getattr(obj, "shape", ()))
        elif isinstance(obj, dict):
            for v in obj.values():
                collect(v)
        elif isinstance(obj, (list, tuple)):
            sizes.add(len(obj))
            for v in obj:
                collect(v)
    collect(model.data)
    return next(p for p in (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47) if p not in sizes)


def _rule(schedule, steps, lr, max_steps):
    """The Adaptive rule where the fit uses one (steps=None, or schedule=bbvi.Adaptive(...)), else None."""
    if isinstance(schedule, Adaptive):
        if lr is not None:
            raise ConfigError("pass lr inside bbvi.Adaptive(lr=...), not both")
        cap = max_steps or steps
        return dataclasses.replace(schedule, max_steps=cap) if cap else schedule
    if steps is not None:
        if max_steps is not None:
            raise ConfigError("max_steps caps the adaptive rule (steps=None); with steps=N the fit runs N steps")
        return None
    if schedule != "auto":
        raise ConfigError(f"schedule={schedule!r} needs a step count: pass steps=N (steps=None, the default, uses "
                          f"the adaptive rule bbvi.Adaptive)")
    return Adaptive(**({} if lr is None else {"lr": lr}), **({} if max_steps is None else {"max_steps": max_steps}))



def _saved_int(text):
    return None if text in (None, "None") else int(text)


def _length_change(ck, path, state, *, schedule, lr, steps, max_steps):
    """None when the checkpoint's fit had this length (steps, max_steps); else (done, name, old cap, new cap,
    reasons the continued fit is not a single fit of the new length, how to reopen an adaptive fit that
    stopped), or a ConfigError when the length cannot change that way."""
    saved = ck["settings"]
    old_steps, old_max = _saved_int(saved.get("steps")), _saved_int(saved.get("max_steps"))
    if (old_steps, old_max) == (steps, max_steps):
        return None
    done, tracker = int(ck["step"]), state.tracker
    old_rule = _rule(schedule, old_steps, lr, old_max)
    if (old_rule is None) != (tracker is None):
        was = f"steps={old_steps}" + ("" if old_max is None else f", max_steps={old_max}")
        raise ConfigError(f"{path!r} was saved by a fit with {was}; this one has steps={steps}: a resume keeps the "
                          f"step-size rule (steps=N: a fixed number of steps; steps=None: bbvi.Adaptive). To run "
                          f"longer, resume with " + ("a larger steps=N" if old_rule is None else
                                                     "steps=None and a larger max_steps=M"))
    old_cap = old_steps if old_rule is None else old_rule.max_steps
    new_cap = steps if tracker is None else tracker.rule.max_steps
    name = "max_steps" if tracker is not None and max_steps is not None else "steps"
    if old_cap == new_cap:
        return None
    if new_cap < done:
        raise ConfigError(f"{path!r} holds a fit that has already run {done} steps; {name}={new_cap} is fewer. "
                          f"Resume with {name} >= {done} to run on (it was saved with {name}={old_cap}), or leave "
                          f"out resume= to start a new fit")
    reasons, reopen = [], None
    if tracker is None:
        sched = "cosine" if schedule == "auto" else schedule
        if isinstance(sched, str) and sched in ("cosine", "exponential") and done > 0:
            before, after = _schedule(sched, max(old_cap, 1))(done), state.schedule(done)
            reasons.append(f"the {sched!r} schedule depends on the total step count: steps 0..{done - 1} followed "
                           f"it over {old_cap} steps, the rest follow it over {new_cap} (at step {done} the "
                           f"learning-rate factor goes from {before:.3g} to {after:.3g})")
    elif bool(ck["tracker"].get("converged", False)):
        reopen = "next"
        reasons.append(f"it had converged at step {done} (the adaptive rule's test passed: a single fit with "
                       f"{name}={new_cap} stops there too, with this q); it goes on with a new level at the next "
                       f"learning rate (x{tracker.rule.decay}) from the averaged q, until the test passes again or "
                       f"{name}={new_cap}")
    elif done >= old_cap:
        reopen = "same"
        reasons.append(f"it had stopped at its cap {name}={old_cap}, where the adaptive rule replaced q by its "
                       f"last level's iterate average (a single fit with {name}={new_cap} would have gone on from "
                       f"the last iterate); it goes on with a new level at the same learning rate from that "
                       f"average")
    return done, name, old_cap, new_cap, reasons, reopen


def refuse_unused(method, options, defaults, why):
    """ConfigError naming the options in `options` (name -> value) that differ from `defaults` (name -> fit's
    default) and that `method` has no use for: `why` says what it does instead."""
    used = [f"{k}={v!r}" for k, v in options.items() if k in defaults and v is not defaults[k] and v != defaults[k]]
    if used:
        raise ConfigError(f"method={method!r} takes no {', '.join(used)}: {why}")


def check_init_options(model, num_particles, steps, max_steps, lr, clip_grad, seed, dtype, device):
    """ConfigError for a step option of the wrong kind or a fit that cannot fit in memory; (dtype, device), the
    dtype float64 where None and the device a torch.device."""
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
    return dtype, device


def full_rank_options(method, model, family, options, unused, why):
    """For an algorithm that fits a full-rank Gaussian over continuous latents (laplace, bam): ConfigError for the
    options it has no use for (`unused`, with fit's defaults; `why` says what it does instead), another family,
    or discrete latents; else the options left for sgd.init."""
    refuse_unused(method, options, unused, why)
    if family != "fullrank":
        raise ConfigError(f"method={method!r} fits a full-rank Gaussian (family='fullrank'), got family={family!r}")
    if model.discrete:
        raise ConfigError(f"method={method!r} fits a density over continuous latents; {sorted(model.discrete)} of "
                          f"model {model.name!r} are discrete: use method='sgd' (also what the default method='auto' "
                          f"runs there), which fits their factors too")
    return {k: v for k, v in options.items() if k not in unused}


def check_loop_options(tol_rel_obj, steps, check_every, max_consecutive_failures, checkpoint_every, checkpoint,
                        resume, callbacks, subsample_cv, distributed, compile):
    """ConfigError for a loop option of the wrong kind; the callbacks as a tuple."""
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
    if callable(callbacks):
        raise ConfigError(f"callbacks must be a list of callables (state) -> bool, got the callable "
                          f"{getattr(callbacks, '__name__', callbacks)!r} itself: pass callbacks=[it]")
    try:
        callbacks = tuple(callbacks)
    except TypeError:
        raise ConfigError(f"callbacks must be a list of callables (state) -> bool, got {callbacks!r}") from None
    if not all(callable(c) for c in callbacks):
        raise ConfigError("callbacks must be callables (state) -> bool")
    for name, value in (("subsample_cv", subsample_cv), ("distributed", distributed), ("compile", compile)):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r}")
    return callbacks
