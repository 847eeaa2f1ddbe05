"""NUTS references through Pyro on the same `bbvi.Model`, cached on disk; reference draws from files.

`nuts(model, ...)` runs Pyro's NUTS on the model's own unconstrained log density (log-joint plus
log-det-Jacobian, through `potential_fn` and `initial_params`: no second model definition), one chain per
process where the machine has the cores (fork), and returns an `arviz.InferenceData` in constrained space
with latent names and dims, plus sample stats (diverging, step_size, n_steps, tree_depth, lp).

The cache key hashes the model's name, latents, data, the source of its log-joint, its log density at three
fixed points, and the sampler settings, so that a changed model or data can never be served a stale
reference. Each entry stores its key and a checksum of its draws; an entry that fails to open, or whose key
or checksum disagrees, is recomputed with a warning, never used.
"""
import hashlib
import inspect
import math
import multiprocessing
import os
import re
import time
import warnings

import numpy as np
import torch

from .errors import ModelError, SamplerError

__all__ = ["nuts", "from_draws", "cache_key", "default_cache_dir"]


def default_cache_dir():
    return os.environ.get("BBVI_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "bbvi", "nuts"))


# ---- the cache key ------------------------------------------------------------------------------------------
def _hash_data(h, obj):
    if torch.is_tensor(obj):
        h.update(f"tensor{tuple(obj.shape)}{obj.dtype}".encode())
        h.update(obj.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        h.update(f"ndarray{obj.shape}{obj.dtype}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _hash_data(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for v in obj:
            _hash_data(h, v)
    else:
        h.update(repr(obj).encode())


def _source(fn):
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        return code.co_code.hex() if code is not None else repr(fn)


def cache_key(model, settings):
    """sha256 of everything that determines a reference: name, latents, data, log-joint source, the log density
    at three fixed points, and the sampler settings."""
    h = hashlib.sha256()
    h.update(model.name.encode())
    for name, lat in model.latents.items():
        h.update(f"{name}{lat.shape}{lat.support}".encode())
    _hash_data(h, model.data)
    h.update(_source(model.log_joint).encode())
    if model.derived is not None:
        h.update(_source(model.derived).encode())
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


def _load_cached(path, key):
    import arviz as az
    try:
        idata = az.from_netcdf(path)
        for group in idata.groups():
            getattr(idata, group).load()
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


def _run_chain(model, chain, seed, num_draws, num_warmup, target_accept, max_tree_depth, progress):
    """One NUTS chain -> dict of numpy arrays: u (draws, D) and per-draw stats."""
    from pyro.infer import MCMC, NUTS
    counter = {"n": 0}

    def potential(params):
        counter["n"] += 1
        return -model.log_density(params["u"][None])[0]

    stats = {"step_size": [], "n_steps": [], "lp": []}
    last = {"n": 0}

    def hook(kernel, params, stage, i):
        if stage.startswith("Sample"):
            stats["step_size"].append(float(kernel.step_size))
            stats["n_steps"].append(counter["n"] - last["n"])
        last["n"] = counter["n"]

    g = torch.Generator().manual_seed(seed * 1000 + chain)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + chain)
        init = _initial_point(model, g)
        kernel = NUTS(potential_fn=potential, target_accept_prob=target_accept, max_tree_depth=max_tree_depth)
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
    return {"u": u.numpy(), "lp": lp.numpy(), "diverging": diverging,
            "step_size": np.asarray(stats["step_size"]), "n_steps": n_steps,
            "tree_depth": np.ceil(np.log2(np.maximum(n_steps, 1) + 1)).astype(np.int64)}


def _chain_in_child(queue, args):
    torch.set_num_threads(1)
    try:
        queue.put((args[1], _run_chain(*args)))
    except BaseException as e:  # the parent must hear of any failure
        queue.put((args[1], e))


def _run_chains(args_list, parallel):
    if not parallel:
        return [_run_chain(*a) for a in args_list]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_chain_in_child, args=(queue, a), daemon=True) for a in args_list]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            chain, out = queue.get()
            if isinstance(out, BaseException):
                raise SamplerError(f"bbvi.nuts: chain {chain} failed: {type(out).__name__}: {out}") from out
            results[chain] = out
    finally:
        for p in procs:
            p.join(timeout=1)
            if p.is_alive():
                p.terminate()
    return [results[a[1]] for a in args_list]


def nuts(model, num_draws=1000, num_warmup=1000, num_chains=4, seed=0, *, target_accept=0.8, max_tree_depth=10,
         cache_dir=None, use_cache=True, parallel=None, progress=False):
    """NUTS reference for `model` -> arviz.InferenceData (posterior in constrained space, derived included;
    sample_stats: diverging, step_size, n_steps, tree_depth, lp). Chains run in forked processes when
    `parallel` (default: when the machine has more than one core and fork is available). Cached in `cache_dir`
    (default $BBVI_CACHE or ~/.cache/bbvi/nuts) unless use_cache=False."""
    import arviz as az
    if model.discrete:
        raise ModelError(f"bbvi.nuts: model {model.name!r} has discrete latents {sorted(model.discrete)}; NUTS "
                         f"needs continuous ones. Sum the discrete latents out in the log-joint, or check the fit "
                         f"against an exact enumeration instead.")
    for name, v in [("num_draws", num_draws), ("num_warmup", num_warmup), ("num_chains", num_chains)]:
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "num_warmup" else 1):
            raise SamplerError(f"bbvi.nuts: {name} must be a positive int, got {v!r}")
    m64 = model.to("cpu", torch.float64)
    u0 = torch.zeros(3, m64.dim, dtype=torch.float64)
    m64.check(u0, {})
    settings = dict(num_draws=num_draws, num_warmup=num_warmup, num_chains=num_chains, seed=seed,
                    target_accept=target_accept, max_tree_depth=max_tree_depth)
    key = cache_key(m64, settings)
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', model.name)}-{key[:20]}.nc")
    if use_cache and os.path.exists(path):
        idata = _load_cached(path, key)
        if idata is not None:
            return idata
    if parallel is None:
        parallel = num_chains > 1 and (os.cpu_count() or 1) > 1 and "fork" in multiprocessing.get_all_start_methods()
    start = time.perf_counter()
    args = [(m64, c, seed, num_draws, num_warmup, target_accept, max_tree_depth, progress and not parallel)
            for c in range(num_chains)]
    chains = _run_chains(args, parallel)
    elapsed = time.perf_counter() - start

    u = torch.from_numpy(np.stack([c["u"] for c in chains]))               # (chains, draws, D)
    z = m64.named_draws(u.reshape(-1, m64.dim), seed=seed)
    posterior = {k: v.reshape((num_chains, num_draws) + tuple(v.shape[1:])).numpy() for k, v in z.items()}
    dims = {k: [f"{k}_dim_{i}" for i in range(v.ndim - 2)] for k, v in posterior.items()}
    sample_stats = {k: np.stack([c[k] for c in chains]) for k in ("diverging", "step_size", "n_steps",
                                                                  "tree_depth", "lp")}
    idata = az.from_dict(posterior=posterior, sample_stats=sample_stats, dims=dims)
    idata.posterior.attrs.update({**{k: str(v) for k, v in settings.items()}, "model": model.name,
                                  "sampler": "pyro NUTS (bbvi.nuts)", "sampling_time_s": elapsed,
                                  "parallel_chains": int(bool(parallel)), "bbvi_cache_key": key,
                                  "bbvi_checksum": _checksum(idata)})
    if use_cache:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        idata.to_netcdf(tmp)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written entry under the real name
    return idata


# ---- reference draws from files -----------------------------------------------------------------------------
_STAN_NAME = re.compile(r"^([^\[\]]+)(?:\[([0-9, ]+)\])?$")


def from_draws(source, num_chains=1):
    """Reference draws with Stan names -> arviz.InferenceData. `source`: a CSV path (.csv or .csv.gz, header =
    names, a row per draw, chains stacked) or a pandas DataFrame. Stan names map to latents: `theta[1]` is
    index 0 of `theta`, `L[2,1]` is index (1, 0) of `L`."""
    import arviz as az
    import pandas as pd
    frame = source if isinstance(source, pd.DataFrame) else pd.read_csv(source)
    n = len(frame)
    if n % num_chains:
        raise SamplerError(f"from_draws: {n} draws do not split into {num_chains} chains")
    groups = {}
    for col in frame.columns:
        m = _STAN_NAME.match(str(col).strip())
        if not m:
            raise SamplerError(f"from_draws: cannot read parameter name {col!r}")
        idx = tuple(int(i) - 1 for i in m.group(2).split(",")) if m.group(2) else ()
        groups.setdefault(m.group(1), {})[idx] = frame[col].to_numpy()
    posterior = {}
    for name, cols in groups.items():
        if list(cols) == [()]:
            arr = cols[()]
        else:
            shape = tuple(max(i[d] for i in cols) + 1 for d in range(len(next(iter(cols)))))
            if len(cols) != math.prod(shape):
                raise SamplerError(f"from_draws: parameter {name!r} has {len(cols)} columns, not a full {shape}")
            arr = np.empty((n,) + shape)
            for i, v in cols.items():
                arr[(slice(None),) + i] = v
        posterior[name] = arr.reshape((num_chains, n // num_chains) + arr.shape[1:])
    dims = {k: [f"{k}_dim_{i}" for i in range(v.ndim - 2)] for k, v in posterior.items()}
    return az.from_dict(posterior=posterior, dims=dims)
