"""What a NUTS reference (bbvi.nuts) is cached under: `cache_key` hashes the model's latents, data, the source of
its log-joint (and derived), the values of the closure cells and globals they read (recursively through the
user's own functions they call: `code_fingerprint`), its log density at three fixed points (discrete latents at
three values of their supports), and the sampler settings, so that a changed model or data is never served a stale
reference. Neither the model's name nor where its code was defined (module, file, line) is in the key: the same
model moved from a script into a model file keeps its key."""
import functools
import hashlib
import os
import re
import sys
import sysconfig
import textwrap
import types

import numpy as np
import torch
from torch.distributions import constraints

from .saving import hash_data, source_of

__all__ = ["cache_key", "code_fingerprint"]


_ADDRESS = re.compile(r"0x[0-9a-fA-F]{4,}")   # a repr that shows a memory address differs from run to run
_MAX_DEPTH = 4                                # functions called by functions called by ... the log-joint


def _library_roots():
    roots = set()
    for k in ("stdlib", "platstdlib", "purelib", "platlib"):
        try:
            roots.add(os.path.realpath(sysconfig.get_paths()[k]))
        except (KeyError, OSError):
            pass
    return tuple(r + os.sep for r in roots)


def _is_user_code(filename, module):
    """True for code of the user's own modules (not bbvi, not the standard library, not installed packages)."""
    if module == "bbvi" or (module or "").startswith("bbvi."):
        return False
    if not filename or filename.startswith("<frozen"):
        return False
    if filename.startswith("<"):          # <stdin>, <string>, a notebook cell: the user's
        return True
    path = os.path.realpath(filename)
    return "site-packages" not in path and not path.startswith(_library_roots())


def _global_names(code, depth=0):
    names = set(code.co_names)
    if depth < 8:
        for c in code.co_consts:
            if isinstance(c, types.CodeType):   # nested functions, lambdas, comprehensions
                names |= _global_names(c, depth + 1)
    return names


def _source(fn):
    """A function's source text, dedented: where it was defined (module, file, line, nesting) is not in it."""
    return textwrap.dedent(source_of(fn))


def _hash_function(h, fn, depth, seen):
    """A function by its source (not its module or qualified name: the same function moved from a script into a
    module keeps its hash), its defaults, the values of its closure cells and of the globals its code
    names (recursively through the user's own functions, to depth _MAX_DEPTH)."""
    if id(fn) in seen or depth > _MAX_DEPTH:
        return
    seen.add(id(fn))
    h.update(f"function\n{_source(fn)}".encode())
    code = fn.__code__
    _hash_item(h, "defaults", (fn.__defaults__, fn.__kwdefaults__), depth, seen)
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            value = cell.cell_contents
        except ValueError:   # an empty cell (a variable assigned later)
            continue
        _hash_item(h, f"closure {name}", value, depth, seen)
    g = getattr(fn, "__globals__", {})
    for name in sorted(_global_names(code)):
        if name in g:
            _hash_item(h, f"global {name}", g[name], depth, seen)


def _hash_item(h, label, value, depth, seen):
    """Hash one value under `label`, in a sub-hash: a value that cannot be hashed is skipped, never an error."""
    sub = hashlib.sha256()
    try:
        _hash_value(sub, value, depth, seen)
    except Exception:  # noqa: BLE001 - robust by design: what cannot be hashed does not enter the key
        return
    h.update(f"{label}:{sub.hexdigest()}\n".encode())


def _hash_value(h, value, depth, seen):
    if isinstance(value, types.ModuleType):
        return
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        h.update(f"{type(value).__name__}:{value!r}".encode())
    elif torch.is_tensor(value) or isinstance(value, (np.ndarray, np.generic)):
        hash_data(h, np.asarray(value) if isinstance(value, np.generic) else value)
    elif isinstance(value, types.FunctionType):
        if _is_user_code(value.__code__.co_filename, value.__module__):
            _hash_function(h, value, depth + 1, seen)
        else:
            h.update(f"function {value.__module__}.{value.__qualname__}".encode())
    elif isinstance(value, types.MethodType):
        _hash_item(h, "function", value.__func__, depth, seen)
        _hash_item(h, "self", value.__self__, depth, seen)
    elif isinstance(value, functools.partial):
        _hash_item(h, "function", value.func, depth, seen)
        _hash_item(h, "arguments", (value.args, value.keywords), depth, seen)
    elif isinstance(value, torch.nn.Module):
        h.update(f"module {type(value).__qualname__}".encode())
        for k, t in value.state_dict().items():
            h.update(k.encode())
            hash_data(h, t)
    elif id(value) in seen or depth > _MAX_DEPTH:
        return
    elif isinstance(value, (list, tuple)):
        seen.add(id(value))
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for i, v in enumerate(value):
            _hash_item(h, str(i), v, depth, seen)
    elif isinstance(value, dict):
        seen.add(id(value))
        for k in sorted(value, key=repr):
            _hash_item(h, repr(k), value[k], depth, seen)
    elif isinstance(value, (set, frozenset)):   # the order of a set of strings changes from run to run
        h.update("".join(sorted(repr(v) for v in value)).encode())
    else:
        text = repr(value)
        if not _ADDRESS.search(text):
            h.update(text.encode())
        else:   # a default repr: an instance of the user's own class is hashed by its attributes
            cls = type(value)
            module = sys.modules.get(cls.__module__)
            if hasattr(value, "__dict__") and _is_user_code(getattr(module, "__file__", None), cls.__module__):
                seen.add(id(value))
                h.update(f"object {cls.__name__}".encode())
                call = _call_of(cls)
                if call is not None:
                    _hash_item(h, "__call__", call, depth, seen)
                for k in sorted(vars(value)):
                    _hash_item(h, k, vars(value)[k], depth + 1, seen)


def _call_of(cls):
    """The Python function a class defines as __call__ (None for a builtin or none)."""
    call = next((vars(k)["__call__"] for k in cls.__mro__ if "__call__" in vars(k)), None)
    return call if isinstance(call, types.FunctionType) else None


def code_fingerprint(fn):
    """sha256 of what a function computes with, beyond its arguments: its source, its closure cells' values and
    the globals its code names, recursively through the user's own functions it calls (tensors, arrays,
    numbers and strings by value, other objects by their repr unless that shows a memory address; modules
    skipped; anything that cannot be hashed skipped)."""
    h, seen = hashlib.sha256(), set()
    if isinstance(fn, types.FunctionType):   # the model's own function: always in full, wherever it lives
        try:
            _hash_function(h, fn, 0, seen)
        except Exception:  # noqa: BLE001 - robust by design
            pass
    else:
        _hash_item(h, "callable", fn, 0, seen)
        call = _call_of(type(fn))   # a callable object: its class's __call__ too
        if call is not None:
            _hash_item(h, "__call__", call, 0, seen)
    return h.hexdigest()


def cache_key(model, settings):
    """sha256 of everything that determines a reference: latents, data, the log-joint's (and derived's) source
    with the values of the closures and globals they read, the log density at three fixed points, and the
    sampler settings. Not the model's name, nor the module or file its functions were defined in: a renamed model,
    or one moved from a script into a module, finds its reference."""
    h = hashlib.sha256()
    for name, lat in model.latents.items():
        h.update(f"{name}{lat.shape}{lat.support}".encode())
    hash_data(h, model.data)
    h.update(_source(model.log_joint).encode())
    h.update(code_fingerprint(model.log_joint).encode())
    if model.derived is not None:
        h.update(_source(model.derived).encode())
        h.update(code_fingerprint(model.derived).encode())
    m64 = model.to("cpu", torch.float64)
    g = torch.Generator().manual_seed(12345)
    u = torch.randn(3, m64.dim, generator=g, dtype=torch.float64) * 0.5
    discrete = {}   # discrete latents at three values drawn uniformly from their supports
    for name, (lat, lo, k) in m64.discrete.items():
        v = torch.randint(lo, lo + k, (3,) + tuple(lat.shape), generator=g)
        discrete[name] = v.to(torch.float64) if lat.support is constraints.boolean else v
    with torch.no_grad():
        lp = m64.log_density(u, discrete)
    h.update(" ".join(f"{v:.10g}" for v in lp.tolist()).encode())
    h.update(repr(sorted(settings.items())).encode())
    return h.hexdigest()
