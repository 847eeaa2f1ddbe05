"""What checkpoints and saved results share: atomic writes, safe reads, the model's signature, and the
configuration objects (family, estimator path, baseline) written as plain data.

Everything is written with `torch.save` of plain containers of tensors, numbers and strings and read back with
`torch.load(weights_only=True)`: no user code is pickled. A configuration object is stored as its class name
and fields (a dataclass); a class from outside bbvi also by its module, and on loading it is looked up among the
modules already imported (a saved file never makes bbvi import code).
"""
import dataclasses
import inspect
import os
import sys

import numpy as np
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


def hash_data(h, obj):
    """Feed `obj` to the hashlib object `h` by value: tensors and arrays by shape, dtype and bytes, dicts (keys
    sorted), lists and tuples element by element, anything else by its repr."""
    if torch.is_tensor(obj):
        h.update(f"tensor{tuple(obj.shape)}{obj.dtype}".encode())
        h.update(obj.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        h.update(f"ndarray{obj.shape}{obj.dtype}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            hash_data(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for v in obj:
            hash_data(h, v)
    else:
        h.update(repr(obj).encode())


def source_of(fn):
    """The source text of a function; its bytecode (or repr) when the source is not available."""
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        return code.co_code.hex() if code is not None else repr(fn)


def model_signature(model):
    """What a saved fit must agree on with the model it is loaded with: the latents in their order (q's flat
    layout follows it), and a fingerprint of the data and the log-joint (checked on resume only: a saved
    result may be attached to new data)."""
    return {"name": model.name, "latents": [[k, list(v.shape), str(v.support)] for k, v in model.latents.items()],
            "fingerprint": model_fingerprint(model)}


def model_fingerprint(model):
    """sha256 of the model's data (floating arrays as float64, so the fit's dtype does not matter) and of its
    log-joint's source."""
    import hashlib

    def as64(obj):
        if torch.is_tensor(obj) and obj.is_floating_point():
            return obj.detach().to("cpu", torch.float64)
        if isinstance(obj, dict):
            return {k: as64(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(as64(v) for v in obj)
        return obj
    h = hashlib.sha256()
    hash_data(h, as64(model.data))
    h.update(source_of(model.log_joint).encode())
    return h.hexdigest()


def _layout(signature):
    latents = signature["latents"]
    if isinstance(latents, dict):  # files written before the order was kept (json keeps the dict's order)
        return [[k, *v] for k, v in latents.items()]
    return [list(x) for x in latents]


def check_signature(saved, model, path, *, same_data=False):
    """ConfigError unless `model` has the saved latents in the saved order (and, with `same_data`, the saved
    data and log-joint). The model's name may differ."""
    now = model_signature(model)
    was, is_ = _layout(saved), _layout(now)
    if was != is_:
        if sorted(map(str, was)) == sorted(map(str, is_)):
            raise ConfigError(f"{path!r} was saved with the latents in the order {[x[0] for x in was]}; the model "
                              f"given has them in the order {[x[0] for x in is_]}. q's parameters follow the "
                              f"order of the latents dict: build the model with the saved order")
        raise ConfigError(f"{path!r} was saved for model {saved['name']!r} with latents {was}, but the model given "
                          f"is {now['name']!r} with latents {is_}")
    if same_data and saved.get("fingerprint") not in (None, now["fingerprint"]):
        raise ConfigError(f"{path!r} was saved by a fit of model {saved['name']!r} with other data or another "
                          f"log-joint than the model given ({now['name']!r}): resuming would continue a fit of a "
                          f"different posterior. Start a new fit, or pass the model the checkpoint was made with")


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
