"""Saving and loading: checkpoints of a running fit (to resume it exactly) and fitted results.

Both are written with `torch.save` of plain containers of tensors, numbers and strings, read back with
`torch.load(weights_only=True)`: no user code is pickled, so the user passes the model again on loading.
Writes are atomic (a temporary file in the same folder, then `os.replace`), so a crash mid-write never leaves
a half-written file under the real name. A checkpoint holds the family parameters, the optimizer state, the
generator state, the baseline state, the ELBO trace, the step and the fault counters: resuming from it gives
bit for bit the fit an uninterrupted run with the same seed would have given.
"""
import dataclasses
import os

import torch

from . import estimators, families
from .errors import ConfigError

__all__ = ["save_checkpoint", "restore_checkpoint", "save_result", "load_result"]

FORMAT = 1


def _atomic_save(obj, path):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _read(path, kind):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"no {kind} file at {path!r}") from None
    except Exception as e:
        raise ConfigError(f"{path!r} is not a readable bbvi {kind} ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or obj.get("bbvi_format") != FORMAT or obj.get("kind") != kind:
        raise ConfigError(f"{path!r} is not a bbvi {kind} file (format {FORMAT})")
    return obj


def model_signature(model):
    """What a saved fit must agree on with the model it is loaded with."""
    return {"name": model.name, "latents": {k: [list(v.shape), str(v.support)] for k, v in model.latents.items()}}


def _check_signature(saved, model, path):
    now = model_signature(model)
    if saved != now:
        raise ConfigError(f"{path!r} was saved for model {saved['name']!r} with latents {saved['latents']}, but the "
                          f"model given is {now['name']!r} with latents {now['latents']}")


def _config(obj):
    return None if obj is None else {"type": type(obj).__name__, "fields": dataclasses.asdict(obj)}


def _family_from(cfg):
    return getattr(families, cfg["type"])(**cfg["fields"])


def _plan_from(cfg):
    b = cfg["baseline"]
    baseline = None if b is None else getattr(estimators, b["type"])(**b["fields"])
    return estimators.Plan(cfg["path"], baseline, cfg["has_discrete"])


def _plan_config(plan):
    return {"path": plan.path, "baseline": _config(plan.baseline), "has_discrete": plan.has_discrete}


# ---- checkpoints ----------------------------------------------------------------------------------------
def save_checkpoint(state, path, settings):
    _atomic_save({
        "bbvi_format": FORMAT, "kind": "checkpoint", "model": model_signature(state.model),
        "family": _config(state.family), "plan": _plan_config(state.plan),
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


def restore_checkpoint(state, path, settings):
    """Load the checkpoint at `path` into a freshly initialised FitState (same model, family, estimator and
    settings, or a ConfigError says what differs)."""
    ck = _read(path, "checkpoint")
    _check_signature(ck["model"], state.model, path)
    if ck["family"] != _config(state.family) or ck["plan"] != _plan_config(state.plan):
        raise ConfigError(f"{path!r} was saved by a fit with family {ck['family']} and plan {ck['plan']}; this fit "
                          f"has {_config(state.family)} and {_plan_config(state.plan)}")
    now = {k: str(v) for k, v in settings.items()}
    differ = {k: (ck["settings"].get(k), now[k]) for k in now if ck["settings"].get(k) != now[k]}
    if differ:
        raise ConfigError(f"{path!r} was saved with other settings (saved, now): {differ}; resume with the same ones")
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


# ---- results ------------------------------------------------------------------------------------------------
def save_result(result, path):
    _atomic_save({
        "bbvi_format": FORMAT, "kind": "result", "model": model_signature(result.model),
        "family": _config(result.family), "plan": _plan_config(result.plan),
        "report": {"differentiable": result.report.differentiable,
                   "nondifferentiable": list(result.report.nondifferentiable)},
        "params": {g: {k: t.detach().cpu() for k, t in grp.items()} for g, grp in result.params.items()},
        "elbo": result.elbo.cpu(), "settings": {k: str(v) for k, v in result.settings.items()},
        "status": result.status, "num_steps": result.num_steps, "num_failed_steps": result.num_failed_steps,
        "num_bad_particles": result.num_bad_particles, "wall_time": result.wall_time,
        "num_rescaled_steps": result.num_rescaled_steps,
        "baseline_state": {k: v.detach().cpu() for k, v in result.baseline_state.items()},
        "preconditioner": [t.cpu() for t in result.model.preconditioner] if result.model.preconditioner else [],
    }, path)


def load_result(path, model, device="cpu"):
    """A Result saved by `Result.save`, attached to `model` (the same latents; its data may be new)."""
    from .families import Discrete
    from .model import CheckReport
    from .result import Result
    saved = _read(path, "result")
    _check_signature(saved["model"], model, path)
    params = {g: {k: t.to(device) for k, t in grp.items()} for g, grp in saved["params"].items()}
    dtype = next(t for grp in params.values() for t in grp.values()).dtype
    if saved["preconditioner"]:
        model = model.preconditioned(*saved["preconditioner"])
    model = model.to(device, dtype)
    return Result(model=model, family=_family_from(saved["family"]), discrete=Discrete.for_model(model),
                  plan=_plan_from(saved["plan"]),
                  report=CheckReport(saved["report"]["differentiable"], tuple(saved["report"]["nondifferentiable"])),
                  params=params, elbo=saved["elbo"], settings=dict(saved["settings"]), status=saved["status"],
                  num_steps=saved["num_steps"], num_failed_steps=saved["num_failed_steps"],
                  num_bad_particles=saved["num_bad_particles"], wall_time=saved["wall_time"],
                  num_rescaled_steps=saved["num_rescaled_steps"],
                  baseline_state={k: v.to(device) for k, v in saved["baseline_state"].items()})
