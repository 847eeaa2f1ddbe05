"""NUTS references through Pyro on the same `bbvi.Model`, cached on disk (the key: fingerprint.py); reference draws
from files are read by stan_draws.py (`from_draws`, re-exported here).

`nuts(model, ...)` runs Pyro's NUTS on the model's own unconstrained log density (log-joint plus
log-det-Jacobian, through `potential_fn` and `initial_params`: no second model definition), one chain per
process where the machine has the cores (fork), and returns an `arviz.InferenceData` in constrained space
with latent names and dims, plus sample stats (diverging, step_size, n_steps, tree_depth, lp). Bounded discrete
latents are summed out of the potential and drawn per draw from their exact conditional (enumeration.py); with no
continuous latent the posterior is drawn exactly, without NUTS.

The cache lives in `.bbvi_cache/nuts` under the current working directory ($BBVI_CACHE overrides it; add
`.bbvi_cache/` to .gitignore). The key (fingerprint.cache_key) changes with the model, its data and the sampler
settings, never with its name or the module and file its code was defined in (a renamed model, or one moved from a
script into a model file, finds its reference; file names carry the name for humans, lookups go by the key). Each
entry stores its key and a
checksum of its draws; an entry that fails to open, or whose key or checksum disagrees, is recomputed with a
warning, never used. A cache that cannot be written is a warning: the draws are returned.
"""
import hashlib
import json
import multiprocessing
import os
import pickle
import queue as queue_module
import re
import signal
import sys
import time
import traceback
import warnings

import numpy as np
import torch

from .arviz_names import arviz_dims, check_arviz_names
from .enumeration import Summed
from .errors import SamplerError
from .fingerprint import cache_key, code_fingerprint  # noqa: F401  (re-exported)
from .stan_draws import from_draws  # noqa: F401  (re-exported)

__all__ = ["nuts", "from_draws", "cache_key", "default_cache_dir"]


def default_cache_dir():
    """Where `nuts` caches references: $BBVI_CACHE if set, else `.bbvi_cache/nuts` under the current working
    directory (project-local, so that a fresh clone never finds a reference it did not compute)."""
    return os.environ.get("BBVI_CACHE") or os.path.join(os.getcwd(), ".bbvi_cache", "nuts")


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


def _run_chains(args_list, parallel, poll=0.5, progress=False, lines=None):
    """The chains' results in order. In parallel, each chain runs in a forked process; the parent waits on the
    queue `poll` seconds at a time and checks that every chain not yet heard from is alive, so that a chain
    whose process dies (a segfault, os._exit, the OOM killer) raises SamplerError naming it, never hangs.
    progress (parallel): one tqdm bar over every chain's iterations, updated at each poll. lines: the model's name
    where no bar shows because stderr is not a terminal (a log file, a pipe): then a line on stderr every
    bbvi.fit.LOG_EVERY_S seconds ($BBVI_PROGRESS_EVERY) with the iterations done of all, and one when they end."""
    if not parallel:
        return [_run_chain(*a) for a in args_list]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    counts = (ctx.Array("q", max(a[1] for a in args_list) + 1, lock=False) if progress or lines is not None
              else None)
    total = sum(a[3] + a[4] for a in args_list)
    every = float(os.environ.get("BBVI_PROGRESS_EVERY", 10.0))
    began = logged = time.perf_counter()
    said = False
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
            if lines is not None and time.perf_counter() - logged >= every:
                logged, said = time.perf_counter(), True
                print(f"bbvi.nuts of {lines!r}: {sum(counts)} of {total} iterations ({len(procs)} chains in "
                      f"parallel, warm-up included), {logged - began:.0f} s", file=sys.stderr, flush=True)
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
        if said:
            print(f"bbvi.nuts of {lines!r}: {len(procs)} chains done, {time.perf_counter() - began:.1f} s",
                  file=sys.stderr, flush=True)
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


def _derived_names(model, discrete):
    """Names of the derived quantities (from one evaluation at u = 0 and the discrete values `discrete`, dict
    name -> (S, *shape), of which the first row is used), [] when it cannot tell."""
    if model.derived is None:
        return []
    try:
        one = {k: v[:1] for k, v in discrete.items()}
        return [k for k in model.named_draws(torch.zeros(1, model.dim, dtype=torch.float64), one)
                if k not in model.latents]
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
    (default: when stderr is a terminal; where it is not, a log file or a pipe, chains run in parallel write a line
    to stderr every 10 s, $BBVI_PROGRESS_EVERY, with the iterations done of all). full_mass: adapt a dense mass matrix in warm-up (Stan's dense_e metric)
    instead of a diagonal one: far fewer leapfrog steps where the posterior's coordinates are strongly correlated
    (an intercept against an uncentred predictor), each a little dearer.

    Discrete latents (boolean, integer_interval) with at most enumeration.MAX_JOINT = 10^4 joint values: NUTS runs
    on the continuous latents with the discrete ones summed out of its potential (log-sum-exp over the joint
    support, one batch of K log-joint rows per evaluation), and each draw's discrete latents are drawn from
    p(k | continuous latents, data); sample_stats' lp is then the summed-out log density. With no continuous
    latent: independent draws from the exact posterior by enumeration, no NUTS (sample_stats: lp = log p(x, k)).
    posterior.attrs["discrete"] says which; a larger joint support is a ModelError naming each latent's size."""
    import arviz as az
    lines = model.name if progress is None and not sys.stderr.isatty() else None   # a log file: lines, no bar
    if progress is None:
        progress = sys.stderr.isatty()
    for name, v in [("num_draws", num_draws), ("num_warmup", num_warmup), ("num_chains", num_chains)]:
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "num_warmup" else 1):
            raise SamplerError(f"bbvi.nuts: {name} must be a positive int, got {v!r}")
    where = f"bbvi.nuts (model {model.name!r})"
    check_arviz_names(model.latents, where)
    m64 = model.to("cpu", torch.float64)
    summed = Summed(m64) if m64.discrete else None   # ModelError where the joint support is too large
    first = {k: v[torch.arange(3) % summed.size] for k, v in summed.values.items()} if summed else {}
    m64.check(torch.zeros(3, m64.dim, dtype=torch.float64), first)
    check_arviz_names(_derived_names(m64, first), where, "derived quantity")
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
    generator = torch.Generator().manual_seed(seed)
    if summed is not None and m64.dim == 0:   # no continuous latent: the exact posterior, no NUTS
        discrete, lp = summed.exact_draws(num_chains * num_draws, generator)
        u = torch.zeros(num_chains * num_draws, 0, dtype=torch.float64)
        stats = {"lp": lp.reshape(num_chains, num_draws).numpy()}
        sampler, parallel, evals = "exact enumeration (bbvi.nuts)", False, 0
    else:
        args = [(summed or m64, c, seed, num_draws, num_warmup, target_accept, max_tree_depth,
                 progress and not parallel, full_mass) for c in range(num_chains)]
        chains = _run_chains(args, parallel, progress=progress, lines=lines)
        u = torch.from_numpy(np.stack([c["u"] for c in chains])).reshape(-1, m64.dim)   # (chains * draws, D)
        discrete = summed.draw(u, generator) if summed else {}
        stats = {k: np.stack([c[k] for c in chains]) for k in ("diverging", "step_size", "n_steps", "tree_depth",
                                                                "lp")}
        sampler, evals = "pyro NUTS (bbvi.nuts)", int(sum(c["num_evals"] for c in chains))
    elapsed = time.perf_counter() - start

    z = m64.named_draws(u, discrete, seed=seed)
    check_arviz_names(z, where, "derived quantity")
    posterior = {k: v.reshape((num_chains, num_draws) + tuple(v.shape[1:])).numpy() for k, v in z.items()}
    idata = az.from_dict(posterior=posterior, sample_stats=stats, dims=arviz_dims(posterior))
    idata.posterior.attrs.update({**{k: str(v) for k, v in settings.items()}, "model": model.name,
                                  "sampler": sampler, "sampling_time_s": elapsed,
                                  "parallel_chains": int(bool(parallel)), "bbvi_cache_key": key,
                                  "num_gradient_evals": evals})
    if summed is not None:
        idata.posterior.attrs.update({"discrete": summed.describe(), "discrete_joint_values": summed.size})
    idata.posterior.attrs["bbvi_checksum"] = _checksum(idata)
    if use_cache:
        try:
            _write_cache(idata, path)
        except Exception as e:  # noqa: BLE001 - the draws are good; only the cache failed
            warnings.warn(f"bbvi.nuts: the reference could not be written to the cache at {path} ({_describe(e)}); "
                          f"returning the draws without caching them. Pass cache_dir= a writable folder (or set "
                          f"$BBVI_CACHE), or use_cache=False", stacklevel=3)
    return idata
