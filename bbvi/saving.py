"""What checkpoints and saved results share: atomic writes, safe reads, the model's signature, and the
configuration objects (family, estimator path, baseline) written as plain data.

Everything is written with `torch.save` of plain containers of tensors, numbers and strings and read back with
`torch.load(weights_only=True)`: no user code is pickled. A configuration object is stored as its class name
and fields (a dataclass); a class from outside bbvi also by its module, and on loading it is looked up among the
modules already imported (a saved file never makes bbvi import code). Every file carries a sha256 checksum
(the zip archive's comment, see `atomic_save`), checked on reading: a corrupted file is a ConfigError.
"""
import hashlib
import inspect
import io
import os
import tempfile
import threading
import uuid

import numpy as np
import torch

from .config import config_of, describe, object_from  # noqa: F401  (re-exported)
from .errors import ConfigError

FORMAT = 1


# A file bbvi writes is a zip archive (torch.save) whose archive comment is its checksum: b"bbvi-sha256:" and
# the sha256 (hex) of every byte before those 64 hex digits. torch.load ignores the comment; `read` checks it,
# so a flipped bit anywhere in the file is refused rather than silently changing the fit. Files written
# before the checksum (an archive with no comment) are still read, unchecked.
_EOCD = b"PK\x05\x06"           # the zip end-of-central-directory record: 22 bytes, then the comment
_TAG = b"bbvi-sha256:"
_COMMENT = len(_TAG) + 64


def _seal(f):
    """Append the checksum comment to the zip archive open in `f` (mode r+b); False when its end is not the
    plain end record torch.save writes (then it is left as it is, unchecked)."""
    f.seek(-22, os.SEEK_END)
    end = f.read(22)
    if end[:4] != _EOCD or end[20:22] != b"\x00\x00":
        return False
    f.seek(-2, os.SEEK_END)
    f.write(_COMMENT.to_bytes(2, "little") + _TAG)
    f.flush()
    f.seek(0)
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    f.seek(0, os.SEEK_END)
    f.write(h.hexdigest().encode())
    return True


def _integrity(data):
    """'ok' (checksum present and right), 'mismatch' (present, wrong), 'none' (a zip with no comment: a file
    written before checksums) or 'damaged' (neither: the end of the file itself was changed)."""
    tail = data[-(22 + _COMMENT):]
    if len(tail) == 22 + _COMMENT and tail[:4] == _EOCD and tail[20:22] == _COMMENT.to_bytes(2, "little") \
            and tail[22:22 + len(_TAG)] == _TAG:
        digest = hashlib.sha256(memoryview(data)[:-64]).hexdigest().encode()
        return "ok" if digest == data[-64:] else "mismatch"
    if data[-22:-18] == _EOCD and data[-2:] == b"\x00\x00":
        return "none"
    return "damaged"


def check_writable(path, what):
    """ConfigError, before any work, when `path` cannot be a file bbvi writes: it is empty or names a folder, or a
    folder on its way is a file, or no file can be created in the folder that would hold it (tried: an unnamed
    temporary file there, which os.access cannot stand in for where root is refused, as in /proc and /sys)."""
    path = os.fspath(path)
    if not path:
        raise ConfigError(f"{what}='' is an empty path; bbvi writes one file there: pass a file path, e.g. 'fit.pt'")
    if os.path.isdir(path) or not os.path.basename(path):
        raise ConfigError(f"{what}={path!r} is a directory; bbvi writes one file there: pass a file path, e.g. "
                          f"{os.path.join(path, 'fit.pt')!r}")
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{what}={path!r} cannot be written: {existing!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f"{what}={path!r} cannot be written: creating a file in the folder {existing!r} fails "
                          f"({type(e).__name__}: {e.strerror or e}); pass a path in a folder you can write to") \
            from None


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder (its name unique to this write: process, thread and a
    random part, so concurrent writers never share one), checksum it, then os.replace: never a half-written
    file, and a temporary file that fails is removed. A path that cannot be written is a ConfigError."""
    path = os.fspath(path)
    check_writable(path, "path")
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}-{threading.get_ident()}-"
                               f"{uuid.uuid4().hex[:16]}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        torch.save(obj, tmp)
        with open(tmp, "r+b") as f:
            _seal(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise ConfigError(f"cannot write {path!r}: {type(e).__name__}: {e}") from e
        raise


def read(path, kind):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"no {kind} file at {path!r}") from None
    except OSError as e:
        raise ConfigError(f"{path!r} is not a readable bbvi {kind} ({type(e).__name__}: {e})") from e
    integrity = _integrity(data)
    corrupted = ConfigError(f"{path!r} is corrupted: checksum mismatch (its bytes changed after bbvi wrote it: a "
                            f"disk, copy or transfer error). Use an intact copy"
                            + (", an earlier checkpoint, or start a new fit" if kind == "checkpoint" else
                               ", or fit again"))
    if integrity == "mismatch":
        raise corrupted
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{path!r} is not a readable bbvi {kind} ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or obj.get("bbvi_format") != FORMAT or obj.get("kind") != kind:
        raise ConfigError(f"{path!r} is not a bbvi {kind} file (format {FORMAT})")
    if integrity == "damaged":   # a bbvi file whose end (the checksum itself) was changed
        raise corrupted
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


def plan_config(plan):
    from .estimators import STL, Reparam, ScorePath
    path = plan.continuous
    path = plan.path if path is None or type(path) in (ScorePath, Reparam, STL) else config_of(path)
    cfg = {"path": path, "baseline": config_of(plan.baseline), "has_discrete": plan.has_discrete}
    if plan.whole is not None:  # written only when set: plans saved before it existed compare equal
        cfg["whole"] = config_of(plan.whole)
    if plan.sum_over:
        cfg["sum_over"] = list(plan.sum_over)
    return cfg


def plan_from(cfg):
    from . import estimators
    path = cfg["path"]
    if isinstance(path, str):
        path = {"score": estimators.ScorePath, "reparam": estimators.Reparam, "stl": estimators.STL}[path]()
    else:
        path = object_from(path, estimators, "estimator")
    return estimators.Plan(path, object_from(cfg["baseline"], estimators, "baseline"), cfg["has_discrete"],
                           object_from(cfg.get("whole"), estimators, "estimator"), tuple(cfg.get("sum_over", ())))
