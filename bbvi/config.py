"""Configuration objects (families, estimators, baselines, optimizers' options) as plain data and stable text:
`config_of` (for files), `object_from` (back), `describe` (a fit's settings, compared on resume). A leaf module: it
imports nothing of bbvi but its errors, so that the estimators' Plan and the file format can both use it."""
import dataclasses
import sys

from .errors import ConfigError


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
