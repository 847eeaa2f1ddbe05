"""Checkpoints of a running fit, to resume it exactly (file format, checksums and atomic writes:
bbvi/saving.py).

A checkpoint holds the family parameters, the optimizer state, the
generator state, the baseline state, the ELBO trace, the step and the fault counters: resuming from it gives
bit for bit the fit an uninterrupted run with the same seed would have given. `read_checkpoint` lets a resume
change the fit's length (`LENGTH`); bbvi.fit decides what such an extension means.
"""
import functools
import hashlib
import numbers
import types

import torch

from .errors import ConfigError
from .saving import FORMAT, describe, atomic_save, check_signature, config_of, model_signature, plan_config, read

__all__ = ["save_checkpoint", "restore_checkpoint", "read_checkpoint", "load_checkpoint", "setting", "Keeper"]

LENGTH = ("steps", "max_steps")   # the settings a resume may change: how long the fit runs


def save_checkpoint(state, path, settings, ranks=None):
    """Write the fit's state to `path`; `ranks`: every rank's `FitState.rank_state_dict()` on a data-parallel
    fit."""
    atomic_save({
        "bbvi_format": FORMAT, "kind": "checkpoint", "model": model_signature(state.model),
        "family": config_of(state.family), "plan": plan_config(state.plan),
        "settings": {k: str(v) for k, v in settings.items()},
        **state.state_dict(),
        **({"ranks": ranks} if ranks is not None else {}),
    }, path)


def read_checkpoint(state, path, settings, *, length_may_differ=False):
    """The checkpoint at `path`, checked against a freshly initialised FitState: the same model, family,
    estimator and settings, every field a resume reads, parameters of the fit's shapes and a step that is the
    length of its ELBO trace, or a ConfigError says what differs. With `length_may_differ`, the fit's length
    (`steps`, `max_steps`) may differ: the caller decides whether that is an extension it can make."""
    ck = read(path, "checkpoint")
    _check_keys(ck, state, path)
    check_signature(ck["model"], state.model, path, same_data=True)
    if ck["family"] != config_of(state.family) or ck["plan"] != plan_config(state.plan):
        raise ConfigError(f"{path!r} was saved by a fit with family {ck['family']} and plan {ck['plan']}; this fit "
                          f"has {config_of(state.family)} and {plan_config(state.plan)}")
    now = {k: str(v) for k, v in settings.items()}
    differ = {k: (ck["settings"].get(k), now[k]) for k in now if ck["settings"].get(k) != now[k]
              and not (length_may_differ and k in LENGTH)}
    if differ:
        raise ConfigError(f"{path!r} was saved with other settings (saved, now): {differ}; resume with the same ones"
                          + (" (a longer fit: only steps, or max_steps for the adaptive rule, may grow)"
                             if length_may_differ else ""))
    _check_values(ck, state, path)
    return ck


def _check_keys(ck, state, path):
    """ConfigError naming the fields a resume reads that the checkpoint lacks."""
    needed = ["model", "family", "plan", "settings"] + [k for k in state.state_dict() if k != "order" and
                                                         not (k == "tracker" and state.tracker is None)]
    missing = [k for k in needed if k not in ck]
    if missing:
        raise ConfigError(f"{path!r} is not a usable bbvi checkpoint: it has no {missing} (a file bbvi writes has "
                          f"them all); use another checkpoint or start a new fit")


def _check_values(ck, state, path):
    """ConfigError naming what is wrong where a checkpoint holds a parameter of another shape than the fit's
    (copy_ would broadcast a 0-dim loc over every coordinate), or a step that is not the length of its ELBO trace
    (a step is one ELBO value). A file bbvi wrote passes: this and `_check_keys` guard a file written before
    checksums (read unchecked) or edited by hand."""
    bad = f"{path!r} is not a usable bbvi checkpoint:"
    for group, tensors in state.params.items():
        for name, t in tensors.items():
            saved = ck["params"].get(group, {}).get(name) if isinstance(ck["params"], dict) else None
            if not torch.is_tensor(saved) or saved.shape != t.shape:
                what = (f"has shape {tuple(saved.shape)}" if torch.is_tensor(saved) else
                        "is missing" if saved is None else f"is a {type(saved).__name__}")
                raise ConfigError(f"{bad} its params[{group!r}][{name!r}] {what}, but this fit's has shape "
                                  f"{tuple(t.shape)} (model {state.model.name!r}, family "
                                  f"{type(state.family).__name__})")
    step, elbo = ck["step"], ck["elbo"]
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ConfigError(f"{bad} its step is {step!r}, not a whole number >= 0")
    if not torch.is_tensor(elbo) or elbo.dim() != 1 or len(elbo) != step:
        length = f"{len(elbo)} values" if torch.is_tensor(elbo) and elbo.dim() == 1 else repr(elbo)[:60]
        raise ConfigError(f"{bad} its step is {step}, but its ELBO trace (one value per step) holds {length}")


def load_checkpoint(state, ck):
    """Put a checkpoint read by `read_checkpoint` into the FitState."""
    state.load_state_dict(ck)
    return state


def restore_checkpoint(state, path, settings):
    """Load the checkpoint at `path` into a freshly initialised FitState (same model, family, estimator and
    settings, or a ConfigError says what differs)."""
    return load_checkpoint(state, read_checkpoint(state, path, settings))


def setting(value):
    """A stable text for the optimizer or schedule setting, compared on resume (also in another process): a
    name as it is, a class by its repr, a function by its module, qualified name and a hash of its code (never
    its memory address, which str() shows and which differs from process to process), a partial by its
    function and arguments, a configuration object by `saving.describe`."""
    if value is None or isinstance(value, (str, bool, int, float, type)):
        return str(value)
    if isinstance(value, functools.partial):
        return (f"functools.partial({', '.join(setting(v) for v in (value.func, *value.args))}"
                + "".join(f", {k}={setting(v)}" for k, v in value.keywords.items()) + ")")
    fn = getattr(value, "__func__", value)   # a bound method: its function
    code = getattr(fn, "__code__", None)
    if code is not None:
        h = hashlib.sha256(code.co_code)
        h.update(repr([c for c in code.co_consts if not isinstance(c, types.CodeType)]).encode())
        h.update(repr(code.co_names).encode())
        return f"<function {fn.__module__}.{fn.__qualname__} code {h.hexdigest()[:12]}>"
    if callable(value) and hasattr(value, "__qualname__"):   # a builtin function
        return f"<{getattr(value, '__module__', None)}.{value.__qualname__}>"
    return describe(value)


class Keeper:
    """Keeps, before each step, what the step and the adaptive rule's look at it change, so that a step a
    KeyboardInterrupt cuts short can be undone: the values of the parameters and of the optimizer's
    per-parameter state tensors (one foreach copy into buffers reused from step to step), which state tensors
    the optimizer holds, its groups' settings, and the rest a step changes (FitState.snapshot: the generator
    state, the step, the record's counters and trace length, the data's and the adaptive rule's state)."""

    def __init__(self):
        self.sources, self.targets, self.buffers = [], [], []

    def keep(self, state):
        opt = state.optimizer
        held = {p: dict(s) for p, s in opt.state.items()}
        live = state.leaves() + [v for s in held.values() for v in s.values() if torch.is_tensor(v)]
        if len(live) == len(self.sources) and all(a is b for a, b in zip(live, self.sources)):
            torch._foreach_copy_(self.buffers, self.targets)
        else:  # the first step, or the optimizer made new state tensors (Adam's first step, a restart)
            self.sources, self.targets = live, [t.detach() for t in live]
            self.buffers = [t.clone() for t in self.targets]
        return (held, [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
                state.snapshot())

    def undo(self, state, kept):
        """Put back what `keep` kept (again if a second Ctrl-C lands while doing it)."""
        held, groups, snap = kept
        while True:
            try:
                opt = state.optimizer
                opt.state.clear()
                opt.state.update({p: dict(s) for p, s in held.items()})
                with torch.no_grad():
                    torch._foreach_copy_(self.targets, self.buffers)
                for p in state.leaves():
                    p.grad = None
                for g, saved in zip(opt.param_groups, groups):
                    g.update(saved)
                state.restore(snap)
                return
            except KeyboardInterrupt:
                continue


def write_checkpoint(state, path, settings):
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
