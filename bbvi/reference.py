"""NUTS references through Pyro on the same `bbvi.Model`, cached on disk; reference draws from files.

`nuts(model, ...)` runs Pyro's NUTS on the model's own unconstrained log density (log-joint plus
log-det-Jacobian, through `potential_fn` and `initial_params`: no second model definition), one chain per
process where the machine has the cores (fork), and returns an `arviz.InferenceData` in constrained space
with latent names and dims, plus sample stats (diverging, step_size, n_steps, tree_depth, lp).

The cache lives in `.bbvi_cache/nuts` under the current working directory ($BBVI_CACHE overrides it; add
`.bbvi_cache/` to .gitignore). The key hashes the model's latents, data, the source of its log-joint (and
derived), the values of the closure cells and globals they read (recursively through the user's own functions
they call), its log density at three fixed points, and the sampler settings, so that a changed model or data
can never be served a stale reference; the model's name is not in the key (a renamed model finds its
reference; file names carry the name for humans, lookups go by the key). Each entry stores its key and a
checksum of its draws; an entry that fails to open, or whose key or checksum disagrees, is recomputed with a
warning, never used. A cache that cannot be written is a warning: the draws are returned.
"""
import functools
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import queue as queue_module
import re
import signal
import sys
import sysconfig
import time
import traceback
import types
import warnings

import numpy as np
import torch

from .errors import ConfigError, ModelError, SamplerError
from .saving import hash_data, source_of

__all__ = ["nuts", "from_draws", "cache_key", "default_cache_dir"]


def default_cache_dir():
    """Where `nuts` caches references: $BBVI_CACHE if set, else `.bbvi_cache/nuts` under the current working
    directory (project-local, so that a fresh clone never finds a reference it did not compute)."""
    return os.environ.get("BBVI_CACHE") or os.path.join(os.getcwd(), ".bbvi_cache", "nuts")


# ---- the cache key ------------------------------------------------------------------------------------------
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


def _hash_function(h, fn, depth, seen):
    """A function by its source, its defaults, the values of its closure cells and of the globals its code
    names (recursively through the user's own functions, to depth _MAX_DEPTH)."""
    if id(fn) in seen or depth > _MAX_DEPTH:
        return
    seen.add(id(fn))
    h.update(f"function {fn.__module__}.{fn.__qualname__}\n{source_of(fn)}".encode())
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
                h.update(f"object {cls.__module__}.{cls.__qualname__}".encode())
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
    sampler settings. Not the model's name: a renamed model finds its reference."""
    h = hashlib.sha256()
    for name, lat in model.latents.items():
        h.update(f"{name}{lat.shape}{lat.support}".encode())
    hash_data(h, model.data)
    h.update(source_of(model.log_joint).encode())
    h.update(code_fingerprint(model.log_joint).encode())
    if model.derived is not None:
        h.update(source_of(model.derived).encode())
        h.update(code_fingerprint(model.derived).encode())
    m64 = model.to("cpu", torch.float64)
    u = torch.randn(3, m64.dim, generator=torch.Generator().manual_seed(12345), dtype=torch.float64) * 0.5
    with torch.no_grad():
        lp = m64.log_density(u)
    h.update(" ".join(f"{v:.10g}" for v in lp.tolist()).encode())
    h.update(repr(sorted(settings.items())).encode())
    return h.hexdigest()


def _checksum(idata):
    """sha256 of every array of the posterior and sample_stats groups."""
    h = hashlib.sha256()
    for group in ("posterior", "sample_stats"):
        if group not in idata.groups():
            continue
        ds = getattr(idata, group)
        for name in sorted(ds.data_vars):
            h.update(f"{group}/{name}".encode())
            h.update(np.ascontiguousarray(ds[name].values).tobytes())
    return h.hexdigest()


# ---- names ArviZ and netCDF can hold ------------------------------------------------------------------------
_ARVIZ_DIMS = ("chain", "draw")


def check_arviz_names(names, where, what="latent"):
    """ModelError for a name ArviZ cannot hold: `chain` and `draw` are the dimensions of every draw (ArviZ
    drops the whole posterior group when a variable has their name)."""
    for name in names:
        if name in _ARVIZ_DIMS:
            raise ModelError(f"{where}: {what} {name!r} has the name of an ArviZ dimension ({', '.join(_ARVIZ_DIMS)}): "
                             f"an InferenceData cannot hold a variable of that name (ArviZ would drop the whole "
                             f"posterior). Rename the {what}, e.g. to {name + '_'!r}")


def arviz_dims(posterior):
    """dims for az.from_dict: `{name}_dim_{i}` (ArviZ's own names) unless that is the name of a variable or of
    another dimension, then `{name}_dim_{i}_` (with as many `_` as it takes): no variable is ever dropped for a
    dimension of the same name. `posterior`: name -> array (chain, draw, *shape)."""
    taken = set(posterior) | set(_ARVIZ_DIMS)
    dims = {}
    for name, v in posterior.items():
        dims[name] = []
        for i in range(np.ndim(v) - 2):
            d = f"{name}_dim_{i}"
            while d in taken:
                d += "_"
            taken.add(d)
            dims[name].append(d)
    return dims


def _file_name(name):
    """netCDF (HDF5) reserves '/' in variable and dimension names: stored as %2F ('%' as %25)."""
    return name.replace("%", "%25").replace("/", "%2F")


def _write_cache(idata, path):
    """Write `idata` to `path` atomically, names with '/' escaped (the map back is in the posterior's attrs)."""
    import arviz as az
    post = idata.posterior
    renamed = {n: _file_name(n) for n in list(post.variables) + list(post.dims) if _file_name(n) != n}
    if renamed:
        post = post.rename(renamed)
        post.attrs["bbvi_names"] = json.dumps({v: k for k, v in renamed.items()})
    out = az.InferenceData(posterior=post, sample_stats=idata.sample_stats)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        out.to_netcdf(tmp)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written entry under the real name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_cached(path, key):
    import arviz as az
    try:
        idata = az.from_netcdf(path)
        for group in idata.groups():
            getattr(idata, group).load()
        attrs = idata.posterior.attrs
        names = json.loads(attrs.pop("bbvi_names", "{}"))
        if names:
            post = idata.posterior.rename(names)
            idata = az.InferenceData(posterior=post, sample_stats=idata.sample_stats)
            attrs = idata.posterior.attrs
        if attrs.get("bbvi_cache_key") != key:
            raise ValueError("its cache key does not match the model/settings")
        if attrs.get("bbvi_checksum") != _checksum(idata):
            raise ValueError("its draws do not match their checksum")
        return idata
    except Exception as e:  # any failure to read is a corrupt entry: recompute
        warnings.warn(f"bbvi.nuts: cached reference {path} is unusable ({type(e).__name__}: {e}); recomputing",
                      stacklevel=3)
        return None


def _cached_paths(cache_dir, path, key):
    """The entries for `key`: `path` (this model's name) first, then the same key under any other name."""
    suffix = f"-{key[:20]}.nc"
    try:
        others = sorted(f for f in os.listdir(cache_dir) if f.endswith(suffix))
    except OSError:
        others = []
    found = [path] if os.path.isfile(path) else []
    return found + [os.path.join(cache_dir, f) for f in others if os.path.join(cache_dir, f) != path]


# ---- running NUTS -------------------------------------------------------------------------------------------
def _initial_point(model, generator, tries=100):
    """Stan's default: uniform(-2, 2) on the unconstrained scale, redrawn until the log density is finite."""
    for _ in range(tries):
        u = torch.rand(model.dim, generator=generator, dtype=torch.float64) * 4 - 2
        with torch.no_grad():
            if torch.isfinite(model.log_density(u[None]))[0]:
                return u
    raise SamplerError(f"bbvi.nuts: no finite log density at {tries} uniform(-2, 2) initial points of model "
                          f"{model.name!r}")


def _run_chain(model, chain, seed, num_draws, num_warmup, target_accept, max_tree_depth, progress, full_mass=False,
               tick=None):
    """One NUTS chain -> dict of numpy arrays: u (draws, D) and per-draw stats. `tick()` after every iteration
    (warmup and sampling): the parent's progress bar over chains run in parallel."""
    from pyro.infer import MCMC, NUTS
    counter = {"n": 0}

    def potential(params):
        counter["n"] += 1
        return -model.log_density(params["u"][None])[0]

    stats = {"step_size": [], "n_steps": [], "lp": []}
    last = {"n": 0}

    def hook(kernel, params, stage, i):
        if tick is not None:
            tick()
        if stage.startswith("Sample"):
            stats["step_size"].append(float(kernel.step_size))
            stats["n_steps"].append(counter["n"] - last["n"])
        last["n"] = counter["n"]

    g = torch.Generator().manual_seed(seed * 1000 + chain)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + chain)
        init = _initial_point(model, g)
        kernel = NUTS(potential_fn=potential, target_accept_prob=target_accept, max_tree_depth=max_tree_depth,
                      full_mass=full_mass)
        mcmc = MCMC(kernel, num_samples=num_draws, warmup_steps=num_warmup, initial_params={"u": init},
                    num_chains=1, disable_progbar=not progress, hook_fn=hook)
        mcmc.run()
    u = mcmc.get_samples()["u"].reshape(num_draws, model.dim)
    with torch.no_grad():
        lp = model.log_density(u)
    diverging = np.zeros(num_draws, dtype=bool)
    for t in getattr(kernel, "_divergences", []):  # pyro records the 0-based index of the post-warmup draw
        if 0 <= t < num_draws:
            diverging[t] = True
    n_steps = np.asarray(stats["n_steps"], dtype=np.int64)
    return {"u": u.numpy(), "lp": lp.numpy(), "diverging": diverging, "num_evals": counter["n"],
            "step_size": np.asarray(stats["step_size"]), "n_steps": n_steps,
            "tree_depth": np.ceil(np.log2(np.maximum(n_steps, 1) + 1)).astype(np.int64)}


def _describe(e):
    """'Type: message' of an exception, as text (never raises: a __str__ that fails is reported as such)."""
    try:
        text = str(e)
    except Exception:  # noqa: BLE001
        text = "<its message could not be formatted>"
    return f"{type(e).__qualname__}: {text}"


def _chain_in_child(queue, args, counts=None):
    """Run one chain and send the parent (chain, pickled message): ('ok', draws) or ('error', text, traceback).
    The message is pickled here, so that an exception that cannot be pickled still reaches the parent, as text.
    `counts`: a shared array whose entry for this chain counts its iterations (for the parent's progress bar)."""
    torch.set_num_threads(1)
    chain = args[1]

    def tick():
        counts[chain] += 1   # only this process writes this entry
    try:
        message = ("ok", _run_chain(*args, tick=tick if counts is not None else None))
    except BaseException as e:  # the parent must hear of any failure
        message = ("error", _describe(e), traceback.format_exc())
    try:
        payload = pickle.dumps(message)
    except BaseException as e:  # noqa: BLE001
        payload = pickle.dumps(("error", f"its draws could not be sent to the parent process ({_describe(e)})", ""))
    queue.put((args[1], payload))


def _exit_reason(code):
    if code is None:
        return "it is still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _run_chains(args_list, parallel, poll=0.5, progress=False):
    """The chains' results in order. In parallel, each chain runs in a forked process; the parent waits on the
    queue `poll` seconds at a time and checks that every chain not yet heard from is alive, so that a chain
    whose process dies (a segfault, os._exit, the OOM killer) raises SamplerError naming it, never hangs.
    progress (parallel): one tqdm bar over every chain's iterations, updated at each poll."""
    if not parallel:
        return [_run_chain(*a) for a in args_list]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    counts = ctx.Array("q", max(a[1] for a in args_list) + 1, lock=False) if progress else None
    procs = {a[1]: ctx.Process(target=_chain_in_child, args=(queue, a, counts), daemon=True) for a in args_list}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(a[3] + a[4] for a in args_list), desc=f"NUTS, {len(args_list)} chains", unit="it")
    for p in procs.values():
        p.start()
    results, ok = {}, False
    try:
        while len(results) < len(procs):
            if bar is not None:
                bar.n = sum(counts)
                bar.refresh()
            try:
                chain, payload = queue.get(timeout=poll)
            except queue_module.Empty:
                dead = [c for c, p in procs.items() if c not in results and not p.is_alive()]
                if not dead:
                    continue
                try:  # a process that sent its message and exited: the message is already in the pipe
                    chain, payload = queue.get(timeout=2 * poll)
                except queue_module.Empty:
                    c = dead[0]
                    raise SamplerError(
                        f"bbvi.nuts: chain {c} died without sending its draws ({_exit_reason(procs[c].exitcode)}). "
                        f"Something in the log-joint ended its process (a crash in native code, os._exit, "
                        f"running out of memory): run bbvi.nuts(..., parallel=False) to see it in this "
                        f"process") from None
            message = pickle.loads(payload)
            if message[0] == "error":
                detail = f"\n--- traceback in the chain's process ---\n{message[2]}" if message[2] else ""
                raise SamplerError(f"bbvi.nuts: chain {chain} failed: {message[1]}{detail}")
            results[chain] = message[1]
        ok = True
    finally:
        if bar is not None:
            bar.n = sum(counts)
            bar.close()
        for p in procs.values():
            if ok:
                p.join(timeout=1)
            if p.is_alive():
                p.terminate()
                p.join(timeout=1)
    return [results[a[1]] for a in args_list]


def _derived_names(model):
    """Names of the derived quantities (from one evaluation at u = 0), [] when it cannot tell."""
    if model.derived is None:
        return []
    try:
        return [k for k in model.named_draws(torch.zeros(1, model.dim, dtype=torch.float64)) if k not in model.latents]
    except Exception:  # noqa: BLE001 - derived is checked again on the draws
        return []


def nuts(model, num_draws=1000, num_warmup=1000, num_chains=4, seed=0, *, target_accept=0.8, max_tree_depth=10,
         full_mass=False, cache_dir=None, use_cache=True, parallel=None, progress=None):
    """NUTS reference for `model` -> arviz.InferenceData (posterior in constrained space, derived included;
    sample_stats: diverging, step_size, n_steps, tree_depth, lp). Chains run in forked processes when
    `parallel` (default: when the machine has more than one core and fork is available); a chain that fails
    or whose process dies raises SamplerError naming it. Cached in `cache_dir` (default: $BBVI_CACHE if set,
    else .bbvi_cache/nuts under the current working directory) unless use_cache=False; a cache that cannot be
    written is a warning, and the draws are returned. progress: a progress bar over the iterations of every chain
    (default: when stderr is a terminal). full_mass: adapt a dense mass matrix in warm-up (Stan's dense_e metric)
    instead of a diagonal one: far fewer leapfrog steps where the posterior's coordinates are strongly correlated
    (an intercept against an uncentred predictor), each a little dearer."""
    import arviz as az
    if progress is None:
        progress = sys.stderr.isatty()
    if model.discrete:
        raise ModelError(f"bbvi.nuts: model {model.name!r} has discrete latents {sorted(model.discrete)}; NUTS "
                         f"needs continuous ones. Sum the discrete latents out in the log-joint, or check the fit "
                         f"against an exact enumeration instead.")
    for name, v in [("num_draws", num_draws), ("num_warmup", num_warmup), ("num_chains", num_chains)]:
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "num_warmup" else 1):
            raise SamplerError(f"bbvi.nuts: {name} must be a positive int, got {v!r}")
    where = f"bbvi.nuts (model {model.name!r})"
    check_arviz_names(model.latents, where)
    m64 = model.to("cpu", torch.float64)
    u0 = torch.zeros(3, m64.dim, dtype=torch.float64)
    m64.check(u0, {})
    check_arviz_names(_derived_names(m64), where, "derived quantity")
    settings = dict(num_draws=num_draws, num_warmup=num_warmup, num_chains=num_chains, seed=seed,
                    target_accept=target_accept, max_tree_depth=max_tree_depth)
    if not isinstance(full_mass, bool):
        raise SamplerError(f"bbvi.nuts: full_mass must be True or False, got {full_mass!r}")
    if full_mass:   # in the settings (and the cache key) only when set: cached diagonal-metric draws keep their key
        settings["full_mass"] = True
    key = cache_key(m64, settings)
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', model.name)}-{key[:20]}.nc")
    if use_cache:
        for cached in _cached_paths(cache_dir, path, key):
            idata = _load_cached(cached, key)
            if idata is not None:
                return idata
    if parallel is None:
        parallel = num_chains > 1 and (os.cpu_count() or 1) > 1 and "fork" in multiprocessing.get_all_start_methods()
    start = time.perf_counter()
    args = [(m64, c, seed, num_draws, num_warmup, target_accept, max_tree_depth, progress and not parallel,
             full_mass) for c in range(num_chains)]
    chains = _run_chains(args, parallel, progress=progress)
    elapsed = time.perf_counter() - start

    u = torch.from_numpy(np.stack([c["u"] for c in chains]))               # (chains, draws, D)
    z = m64.named_draws(u.reshape(-1, m64.dim), seed=seed)
    check_arviz_names(z, where, "derived quantity")
    posterior = {k: v.reshape((num_chains, num_draws) + tuple(v.shape[1:])).numpy() for k, v in z.items()}
    sample_stats = {k: np.stack([c[k] for c in chains]) for k in ("diverging", "step_size", "n_steps",
                                                                  "tree_depth", "lp")}
    idata = az.from_dict(posterior=posterior, sample_stats=sample_stats, dims=arviz_dims(posterior))
    idata.posterior.attrs.update({**{k: str(v) for k, v in settings.items()}, "model": model.name,
                                  "sampler": "pyro NUTS (bbvi.nuts)", "sampling_time_s": elapsed,
                                  "parallel_chains": int(bool(parallel)), "bbvi_cache_key": key,
                                  "num_gradient_evals": int(sum(c["num_evals"] for c in chains)),
                                  "bbvi_checksum": _checksum(idata)})
    if use_cache:
        try:
            _write_cache(idata, path)
        except Exception as e:  # noqa: BLE001 - the draws are good; only the cache failed
            warnings.warn(f"bbvi.nuts: the reference could not be written to the cache at {path} ({_describe(e)}); "
                          f"returning the draws without caching them. Pass cache_dir= a writable folder (or set "
                          f"$BBVI_CACHE), or use_cache=False", stacklevel=3)
    return idata
# ---- reference draws from files -----------------------------------------------------------------------------
_STAN_NAME = re.compile(r"^([^\[\]]+)(?:\[([0-9, ]+)\])?$")
_CMDSTAN_NAME = re.compile(r"^([^.\[\]]+)((?:\.[0-9]+)+)$")   # theta.1.2: CmdStan's own output names


def _open_text(path):
    import gzip
    path = os.fspath(path)
    return gzip.open(path, "rt", newline="") if path.endswith(".gz") else open(path, newline="")


def _is_cmdstan(path):
    """A CmdStan output CSV: its first line is a '#' comment, or its header has a column ending in '__' (lp__)."""
    try:
        with _open_text(path) as f:
            for line in f:
                if line.strip():
                    return line.lstrip().startswith("#") or any(
                        c.strip().strip('"').endswith("__") for c in line.split(","))
    except FileNotFoundError:
        raise ConfigError(f"from_draws: no file {os.fspath(path)!r}") from None
    except (OSError, UnicodeDecodeError):
        return False   # pandas says what is wrong with it
    return False


def _read_cmdstan(path):
    """(column names, float array (draws, columns)) of a CmdStan CSV: '#' lines skipped; draws written before an
    '# Adaptation terminated' comment are warmup draws (save_warmup=1) and are dropped."""
    import csv
    header, rows = None, []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            if text.startswith("#"):
                if header is not None and rows and "adaptation terminated" in text.lower():
                    rows = []
                continue
            fields = next(csv.reader([text]))
            if header is None:
                header = [c.strip() for c in fields]
                continue
            if len(fields) != len(header):
                raise ConfigError(f"from_draws: {os.fspath(path)!r} line {lineno}: {len(fields)} values for the "
                                  f"{len(header)} columns of its header; the file is cut short or malformed")
            try:
                rows.append([float(x) for x in fields])
            except ValueError:
                bad = next(x for x in fields if not _is_number(x))
                raise ConfigError(f"from_draws: {os.fspath(path)!r} line {lineno}: {bad.strip()!r} is not a number "
                                  f"(column {header[fields.index(bad)]!r})") from None
    if header is None or not rows:
        raise ConfigError(f"from_draws: {os.fspath(path)!r} has {'no header line' if header is None else 'no draws'}; "
                          f"a CmdStan CSV has '#' comment lines, a header (lp__, accept_stat__, ..., then the "
                          f"parameters) and a row per draw")
    return header, np.asarray(rows, dtype=np.float64)


def _is_number(x):
    try:
        float(x)
        return True
    except ValueError:
        return False


def _group(names, columns, where, error):
    """Columns with Stan names -> dict name -> array (draws, *shape). `theta[1]` / `theta.1` is index 0 of
    `theta`, `L[2,1]` / `L.2.1` is index (1, 0) of `L`: 1-based indices, placed by their values, not by their
    order in the file (CmdStan writes arrays column-major: L.1.1, L.2.1, L.1.2, ...)."""
    groups = {}
    for col, values in zip(names, columns):
        col = str(col).strip()
        m, dotted = _STAN_NAME.match(col), _CMDSTAN_NAME.match(col)
        if dotted:
            name, idx = dotted.group(1), tuple(int(i) - 1 for i in dotted.group(2)[1:].split("."))
        elif m:
            name = m.group(1)
            idx = tuple(int(i) - 1 for i in m.group(2).split(",")) if m.group(2) else ()
        else:
            raise error(f"from_draws: {where}cannot read parameter name {col!r}")
        if idx in groups.get(name, {}):
            raise error(f"from_draws: {where}column {col!r} appears twice")
        if groups.get(name) and len(next(iter(groups[name]))) != len(idx):
            raise error(f"from_draws: {where}parameter {name!r} has columns with {len(idx)} and with "
                        f"{len(next(iter(groups[name])))} indices")
        if any(i < 0 for i in idx):
            raise error(f"from_draws: {where}column {col!r}: Stan indices start at 1")
        groups.setdefault(name, {})[idx] = values
    out = {}
    for name, cols in groups.items():
        if list(cols) == [()]:
            out[name] = cols[()]
            continue
        shape = tuple(max(i[d] for i in cols) + 1 for d in range(len(next(iter(cols)))))
        if len(cols) != math.prod(shape):
            raise error(f"from_draws: {where}parameter {name!r} has {len(cols)} columns, not a full {shape}")
        n = len(next(iter(cols.values())))
        arr = np.empty((n,) + shape)
        for i, v in cols.items():
            arr[(slice(None),) + i] = v
        out[name] = arr
    return out


def _read_one(source):
    """One file or DataFrame -> (dict name -> array (draws, *shape), whether it was a CmdStan file)."""
    import pandas as pd
    if isinstance(source, pd.DataFrame):
        return _group(source.columns, [source[c].to_numpy() for c in source.columns], "", SamplerError), False
    if _is_cmdstan(source):
        header, values = _read_cmdstan(source)
        keep = [j for j, c in enumerate(header) if not c.endswith("__")]   # sampler columns: lp__, divergent__, ...
        return _group([header[j] for j in keep], [values[:, j] for j in keep], f"{os.fspath(source)!r}: ",
                      ConfigError), True
    frame = pd.read_csv(source)
    return _group(frame.columns, [frame[c].to_numpy() for c in frame.columns], "", SamplerError), False


def from_draws(source, num_chains=1):
    """Reference draws with Stan names -> arviz.InferenceData. `source`: a CSV path (.csv or .csv.gz, header =
    names, a row per draw, chains stacked), a pandas DataFrame, a CmdStan output CSV, or a list of paths (one
    chain each, e.g. CmdStan's output-1.csv ... output-4.csv). Stan names map to latents: `theta[1]` (CmdStan:
    `theta.1`) is index 0 of `theta`, `L[2,1]` (`L.2.1`) is index (1, 0) of `L`; indices are 1-based and placed
    by their values, whatever their order in the file (CmdStan writes arrays column-major). In a CmdStan file,
    '#' lines are skipped, the sampler's columns (ending in '__': lp__, accept_stat__, ...) are dropped, and draws
    before an '# Adaptation terminated' comment (save_warmup=1) are warmup and dropped; a malformed line is a
    ConfigError naming the file and line."""
    import arviz as az
    files = list(source) if isinstance(source, (list, tuple)) else None
    if files is not None:
        if not files:
            raise ConfigError("from_draws: the list of files is empty")
        if num_chains not in (1, len(files)):
            raise ConfigError(f"from_draws: {len(files)} files are {len(files)} chains (one each), but "
                              f"num_chains={num_chains}; leave num_chains out")
        chains = [_read_one(f)[0] for f in files]
        first = chains[0]
        for f, c in zip(files[1:], chains[1:]):
            shapes = {k: v.shape for k, v in c.items()}
            if shapes != {k: v.shape for k, v in first.items()}:
                raise ConfigError(f"from_draws: {os.fspath(f)!r} does not have the parameters and number of draws "
                                  f"of {os.fspath(files[0])!r}: {shapes} against "
                                  f"{ {k: v.shape for k, v in first.items()} }")
        posterior = {k: np.stack([c[k] for c in chains]) for k in first}
    else:
        draws, cmdstan = _read_one(source)
        n = len(next(iter(draws.values())))
        if n % num_chains:
            raise (ConfigError if cmdstan else SamplerError)(
                f"from_draws: {n} draws do not split into {num_chains} chains")
        posterior = {k: v.reshape((num_chains, n // num_chains) + v.shape[1:]) for k, v in draws.items()}
    check_arviz_names(posterior, "from_draws", "parameter")
    return az.from_dict(posterior=posterior, dims=arviz_dims(posterior))
