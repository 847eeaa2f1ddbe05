"""What checkpoints and saved results share: atomic writes, safe reads, the model's signature, and the
configuration objects (family, estimator path, baseline) written as plain data.

Everything is written with `torch.save` of plain containers of tensors, numbers and strings and read back with
`torch.load(weights_only=True)`: no user code is pickled. A configuration object is stored as its class name
and fields (a dataclass); a class from outside bbvi also by its module, and on loading it is looked up among the
modules already imported (a saved file never makes bbvi import code).
"""
import dataclasses
import os
import sys

import torch

from .errors import ConfigError

FORMAT = 1


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then os.replace: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read(path, kind):
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


def check_signature(saved, model, path):
    now = model_signature(model)
    if saved != now:
        raise ConfigError(f"{path!r} was saved for model {saved['name']!r} with latents {saved['latents']}, but the "
                          f"model given is {now['name']!r} with latents {now['latents']}")


def _plain(value):
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def config_of(obj):
    """A configuration object -> {'type', 'fields'} (+ 'module' for a class from outside bbvi), or None."""
    if obj is None:
        return None
    cls = type(obj)
    if dataclasses.is_dataclass(obj):
        fields = dataclasses.asdict(obj)
    else:
        fields = {k: v for k, v in vars(obj).items() if not k.startswith("_")} if hasattr(obj, "__dict__") else {}
    cfg = {"type": cls.__qualname__, "fields": fields if _plain(fields) else None}
    if not cls.__module__.startswith("bbvi."):
        cfg["module"] = cls.__module__
    return cfg


def describe(obj):
    """A stable text for a configuration object (a fit's settings; compared on resume): its repr when that is
    a dataclass's, its class and plain fields otherwise (never an object's memory address)."""
    if dataclasses.is_dataclass(obj) or obj is None:
        return repr(obj)
    cfg = config_of(obj)
    return f"{cfg['type']}({cfg['fields']})"


def object_from(cfg, home, what):
    """The object `config_of` described. `home`: the bbvi module that holds the built-in classes; `what` names
    the kind of object in error messages."""
    if cfg is None:
        return None
    module = sys.modules.get(cfg["module"]) if "module" in cfg else home
    cls = module
    for part in cfg["type"].split("."):
        cls = getattr(cls, part, None)
    if cls is None or not isinstance(cls, type):
        raise ConfigError(f"the saved {what} is {cfg['type']} from module {cfg.get('module', home.__name__)!r}, "
                          f"which is not imported here: import it before loading (or pass {what}=... to bbvi.load)")
    if cfg["fields"] is None:
        raise ConfigError(f"the saved {what} {cfg['type']} has fields that cannot be stored as plain data; pass "
                          f"{what}=... to bbvi.load")
    if dataclasses.is_dataclass(cls):
        return cls(**cfg["fields"])
    obj = cls.__new__(cls)
    obj.__dict__.update(cfg["fields"])
    return obj


def plan_config(plan):
    from .estimators import STL, Reparam, ScorePath
    path = plan.continuous
    path = plan.path if path is None or type(path) in (ScorePath, Reparam, STL) else config_of(path)
    return {"path": path, "baseline": config_of(plan.baseline), "has_discrete": plan.has_discrete}


def plan_from(cfg):
    from . import estimators
    path = cfg["path"]
    if isinstance(path, str):
        path = {"score": estimators.ScorePath, "reparam": estimators.Reparam, "stl": estimators.STL}[path]()
    else:
        path = object_from(path, estimators, "estimator")
    return estimators.Plan(path, object_from(cfg["baseline"], estimators, "baseline"), cfg["has_discrete"])
