"""Checkpoints of a running fit, to resume it exactly (file format, checksums and atomic writes:
bbvi/saving.py).

A checkpoint holds the family parameters, the optimizer state, the
generator state, the baseline state, the ELBO trace, the step and the fault counters: resuming from it gives
bit for bit the fit an uninterrupted run with the same seed would have given. `read_checkpoint` lets a resume
change the fit's length (`LENGTH`); bbvi.fit decides what such an extension means.
"""
import torch

from .errors import ConfigError
from .saving import FORMAT, atomic_save, check_signature, config_of, model_signature, plan_config, read

__all__ = ["save_checkpoint", "restore_checkpoint", "read_checkpoint", "load_checkpoint"]

LENGTH = ("steps", "max_steps")   # the settings a resume may change: how long the fit runs


def save_checkpoint(state, path, settings):
    atomic_save({
        "bbvi_format": FORMAT, "kind": "checkpoint", "model": model_signature(state.model),
        "family": config_of(state.family), "plan": plan_config(state.plan),
        "settings": {k: str(v) for k, v in settings.items()},
        "params": {g: {k: t.detach().cpu() for k, t in grp.items()} for g, grp in state.params.items()},
        "optimizer": state.optimizer.state_dict(), "generator": state.generator.get_state().cpu(),
        "baseline_state": {k: v.detach().cpu() for k, v in state.baseline_state.items()},
        "elbo": torch.stack(state.elbo).cpu() if state.elbo else torch.zeros(0),
        "step": state.step, "num_failed_steps": state.num_failed_steps,
        "num_rescaled_steps": state.num_rescaled_steps,
        "consecutive_failures": state.consecutive_failures,
        "num_bad_particles": int(state.num_bad_particles),
        "num_raised_steps": state.num_raised_steps, "last_exception": state.last_exception,
        "tracker": state.tracker.state_dict() if state.tracker is not None else {},
    }, path)


def read_checkpoint(state, path, settings, *, length_may_differ=False):
    """The checkpoint at `path`, checked against a freshly initialised FitState: the same model, family,
    estimator and settings, or a ConfigError says what differs. With `length_may_differ`, the fit's length
    (`steps`, `max_steps`) may differ: the caller decides whether that is an extension it can make."""
    ck = read(path, "checkpoint")
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
    return ck


def load_checkpoint(state, ck):
    """Put a checkpoint read by `read_checkpoint` into the FitState."""
    with torch.no_grad():
        for g, grp in state.params.items():
            for k, t in grp.items():
                t.copy_(ck["params"][g][k])
    state.optimizer.load_state_dict(ck["optimizer"])
    state.generator.set_state(ck["generator"].to(state.generator.get_state().device))
    ref = next(iter(state.leaves()))
    state.baseline_state = {k: v.to(ref.device) for k, v in ck["baseline_state"].items()}
    state.elbo = [e.to(ref.device) for e in ck["elbo"]]
    state.step = ck["step"]
    state.num_failed_steps = ck["num_failed_steps"]
    state.num_rescaled_steps = ck["num_rescaled_steps"]
    state.consecutive_failures = ck["consecutive_failures"]
    state.num_bad_particles = torch.tensor(ck["num_bad_particles"], dtype=torch.int64, device=ref.device)
    state.num_raised_steps, state.last_exception = ck["num_raised_steps"], ck["last_exception"]
    if state.tracker is not None:
        state.tracker.load_state_dict(ck["tracker"], ref.device)
    return state


def restore_checkpoint(state, path, settings):
    """Load the checkpoint at `path` into a freshly initialised FitState (same model, family, estimator and
    settings, or a ConfigError says what differs)."""
    return load_checkpoint(state, read_checkpoint(state, path, settings))
