"""Time to an accurate fit: seconds until every posterior mean is within 0.1 posterior sd of the reference, per
system, on Bayesian logistic regression (bench.py's data, N = 1000, D = 10) and two posteriordb posteriors
(sblrc-blr, eight_schools_noncentered).

    bbvi default        bbvi.fit(model): the default fit, which stops by itself and checks itself; its seconds are
                        the whole call (start, fit, end-of-fit check); accurate or not at its end. The libraries a
                        fit imports on first use (arviz, scipy.stats, torch._dynamo) are imported before the clocks
                        start, as NumPyro's side imports jax first; NumPyro's NUTS time includes its JIT compile
    bbvi compile=True   the same fit with the compiled step; compile time a column of its own (its seconds
                        include it)
    pyro SVI            AutoNormal (its loc at unconstrained zero), Adam(lr 0.01), Trace_ELBO (one particle), as Pyro's
                        tutorials start a user; the model is the same log-joint (pyro.factor over ImproperUniform
                        sites with the latents' supports)
    numpyro SVI         the same in NumPyro, jitted (time_to_fit_numpyro.py, in the JAX env; models written out)
    NUTS                bbvi.nuts (Pyro's NUTS, 4 chains x 1000 + 1000 warmup, chains in parallel processes) and
                        NumPyro's NUTS (1 chain, 1000 + 1000, jitted)

SVI runs are checked every 100 steps (4000 draws of the guide; the clock paused) up to 20000 steps; their time is
the clock at the first check of the final run of >= 5 accurate checks (None when there is none). The reference is
posteriordb's (Stan, 10 x 1000 draws) for the posteriordb models and, for the logistic regression, bbvi.nuts with 4
x 5000 draws (cached). Every mean: each element of each latent, on the constrained scale. One run, one seed;
`make bench` runs it after bench.py (results/time_to_fit.csv, .md). --quick: sblrc-blr, bbvi's default fit cut at 300 steps, no end-of-fit check.
"""
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

from common import parse, write_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bbvi  # noqa: E402
from bench import jax_env, log_joint as logreg_log_joint, make_data  # noqa: E402

TOL, EVERY, HOLD, CAP, LR = 0.1, 100, 5, 20000, 0.01


def models():
    """name -> (bbvi model, {data name: array} for the NumPyro side)."""
    from models import eight_schools, posteriordb
    X, y = make_data(1000, 10)
    logreg = bbvi.Model(logreg_log_joint, {"w": bbvi.Latent(shape=(10,))}, data={"X": X, "y": y},
                        name="logistic regression")
    blr = posteriordb.load("sblrc-blr")
    return {"logistic regression": (logreg, {"X": X.numpy(), "y": y.numpy()}),
            "sblrc-blr": (blr, {k: blr.data[k].numpy() for k in ("X", "y")}),
            "eight_schools_noncentered": (eight_schools.model, {k: eight_schools.model.data[k].numpy()
                                                                for k in ("y", "sigma")})}


def reference(name, model):
    """latent -> (mean, sd), each flattened (C order), constrained scale."""
    if name == "logistic regression":
        idata = bbvi.nuts(model, num_draws=5000, num_warmup=1000, num_chains=4, seed=0, progress=False)
    else:
        from models.posteriordb import reference as posteriordb_reference
        idata = posteriordb_reference("eight_schools-eight_schools_noncentered" if name.startswith("eight")
                                      else name)
    out = {}
    for var in idata.posterior.data_vars:   # the latents, and derived quantities the reference has (eight schools:
        if var in model.latents or var == "theta":   # theta = mu + tau theta_trans; its theta_trans is not stored)
            x = np.asarray(idata.posterior[var])
            x = x.reshape(x.shape[0] * x.shape[1], -1)
            out[var] = (x.mean(0), x.std(0))
    return out


def with_derived(model, draws):
    """draws (name -> (n, ...) tensor) of the latents, with the model's derived quantities added."""
    if model.derived is None:
        return draws
    return dict(draws, **model.derived(draws, model.data))


def error(draws, ref):
    """max over latent elements of |mean - reference mean| / reference sd."""
    worst = 0.0
    for latent, (mean, sd) in ref.items():
        x = np.asarray(draws[latent], dtype=np.float64)
        worst = max(worst, float(np.max(np.abs(x.reshape(x.shape[0], -1).mean(0) - mean) / sd)))
    return worst


def run_bbvi(model, ref, compile, max_steps=None):
    from bbvi.compiled import CompiledStep
    compiling = [0.0]
    original = CompiledStep._compile

    def timed(self, *args):   # the compile time, measured for its column (the fit itself does not report it)
        t = time.perf_counter()
        try:
            return original(self, *args)
        finally:
            compiling[0] += time.perf_counter() - t
    CompiledStep._compile = timed
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = time.perf_counter()
            fit = bbvi.fit(model, compile=compile, progress=False,
                           **({} if max_steps is None else dict(max_steps=max_steps, diagnose=False)))
            seconds = time.perf_counter() - t
    finally:
        CompiledStep._compile = original
    err = error({k: v.numpy() for k, v in fit.sample(4000, seed=1).items()}, ref)
    warned = [str(w.message)[:120] for w in caught if issubclass(w.category, bbvi.ReliabilityWarning)]
    return dict(seconds=seconds, steps=fit.num_steps, accurate=err < TOL, final_error=err, steps_run=fit.num_steps,
                run_seconds=seconds, compile_s=compiling[0] if compile else None, status=fit.status, warning=" | ".join(warned))


def settled(checks):
    """checks [(step, clock, error)] -> the first check of the final run of accurate ones, if >= HOLD long."""
    i = len(checks)
    while i > 0 and checks[i - 1][2] < TOL:
        i -= 1
    held = len(checks) - i >= HOLD
    return dict(seconds=checks[i][1] if held else None, steps=checks[i][0] if held else None, accurate=held,
                final_error=checks[-1][2], steps_run=checks[-1][0], run_seconds=checks[-1][1])


def run_pyro(model, ref, seed=0):
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    m32 = model.to("cpu", torch.float32)

    def pyro_model():
        z = {name: pyro.sample(name, dist.ImproperUniform(lat.support, (), lat.shape))
             for name, lat in m32.latents.items()}
        pyro.factor("log_joint", m32.log_joint({k: v.unsqueeze(0) for k, v in z.items()}, m32.data)[0])

    def at_zero(site):   # init_to_feasible samples the site, which ImproperUniform cannot: zero, unconstrained
        return torch.distributions.biject_to(site["fn"].support)(torch.zeros(site["fn"].shape()))

    guide = AutoNormal(pyro_model, init_loc_fn=at_zero)
    svi = SVI(pyro_model, guide, pyro.optim.Adam({"lr": LR}), Trace_ELBO())
    clock, checks, step = 0.0, [], 0
    while step < CAP:
        t = time.perf_counter()
        for _ in range(EVERY):
            svi.step()
        step += EVERY
        clock += time.perf_counter() - t
        with torch.no_grad():
            draws = [guide() for _ in range(1000)]
        stacked = with_derived(m32, {k: torch.stack([d[k] for d in draws]) for k in m32.latents})
        err = error({k: stacked[k].numpy() for k in ref}, ref)
        checks.append((step, clock, err))
        if len(checks) >= HOLD and all(e < TOL for _, _, e in checks[-HOLD:]):
            break
    return dict(settled(checks), compile_s=None)


def run_nuts(model, ref):
    t = time.perf_counter()
    idata = bbvi.nuts(model, num_draws=1000, num_warmup=1000, num_chains=4, seed=1, use_cache=False, progress=False)
    seconds = time.perf_counter() - t
    draws = {}
    for k in ref:
        x = np.asarray(idata.posterior[k])
        draws[k] = x.reshape(x.shape[0] * x.shape[1], -1)
    err = error(draws, ref)
    return dict(seconds=seconds, steps=None, accurate=err < TOL, final_error=err, steps_run=2000,
                run_seconds=seconds, compile_s=None)


def numpyro_rows(ms, refs):
    py = jax_env(create=True)
    if py is None:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.npz")
        arrays = {}
        for name, (_, data) in ms.items():
            arrays.update({f"{name}/{k}": v for k, v in data.items()})
            for latent, (mean, sd) in refs[name].items():
                arrays[f"{name}/mean/{latent}"], arrays[f"{name}/sd/{latent}"] = mean, sd
        np.savez(path, **arrays)
        cmd = [py, os.path.join(ROOT, "experiments", "time_to_fit_numpyro.py"), path, "--lr", str(LR), "--cap",
               str(CAP), "--every", str(EVERY), "--hold", str(HOLD), "--models", ",".join(ms)]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env.pop("PYTHONPATH", None)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        print("NumPyro skipped: time_to_fit_numpyro.py failed: " + (r.stderr.strip().splitlines() or ["?"])[-1])
        return []
    return json.loads(r.stdout.strip().splitlines()[-1])["rows"]


def main(argv=None):
    args = parse(__doc__.splitlines()[0], argv)
    import pandas as pd
    ms = models()
    if args.quick:   # a posteriordb reference: no NUTS run
        ms = {"sblrc-blr": ms["sblrc-blr"]}
    refs = {name: reference(name, m) for name, (m, _) in ms.items()}
    import arviz  # noqa: F401  the libraries a first fit imports on first use (1.7 s and 1.3 s on 2 cores), imported
    import scipy.stats  # noqa: F401  before any clock starts, as NumPyro's side imports jax before its clock
    import torch._dynamo  # noqa: F401  (torch.optim's step imports it on its first call)
    rows = []
    for name, (model, _) in ms.items():
        ref = refs[name]
        runs = {"bbvi default": functools.partial(run_bbvi, model, ref, False, 300 if args.quick else None)}
        if not args.quick:
            runs.update({"bbvi compile=True": functools.partial(run_bbvi, model, ref, True),
                         "pyro SVI (AutoNormal)": functools.partial(run_pyro, model, ref),
                         "pyro NUTS (bbvi.nuts, 4 chains x 1000 + 1000)": functools.partial(run_nuts, model, ref)})
        for system, run in runs.items():
            row = dict(model=name, system=system, **run())
            print(row, flush=True)
            rows.append(row)
    if not args.quick:
        rows += numpyro_rows(ms, refs)
    frame = pd.DataFrame(rows)
    cols = ["model", "system", "seconds", "accurate", "final_error", "steps", "steps_run", "run_seconds",
            "compile_s", "status", "warning"]
    frame = frame[[c for c in cols if c in frame]]
    write_table(frame, args.out, "time_to_fit", "Time to an accurate fit (every mean within 0.1 sd)",
                note=__doc__.split("\n\n")[0])
    print(frame.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
