"""Per-step speed of bbvi against a hand-written plain-torch step of the same estimator and against Pyro SVI,
all in one process, on Bayesian logistic regression (mean-field, 16 particles), and against NumPyro's jitted
SVI in a separate JAX virtualenv; then how bbvi's step scales with particles, data size and latent dimension.

Run by `make bench` (writes results/bench.csv, results/bench_scaling.csv, results/bench.md, results/bench.png),
which then runs bench_converged.py and regenerates the speed block (docs/speed.md, "Speed").
Timing: each contender runs `--steps` steps after a warm-up, repeated `--repeats` times round-robin (so drift
hits all alike); the median time per step is reported, with ratios to the hand-written step.
NumPyro (JAX) cannot share the torch process: bench_numpyro.py times it in <repo>/.bench-jax (made on demand by
pip, ~600 MB; --quick only uses it if it is already there) on the same data, in its own process before and again
after the torch contenders (the machine's speed drifts; NumPyro keeps the faster of its two runs), so not
round-robin with them; bbvi compile=True, the row it is held against, is timed a second time too, alone, right
after NumPyro's second run, and keeps its faster run likewise. Their one-off compile times are the separate
`compile_s` column. After the per-step and
scaling tables, `make bench` writes the physical floor at N = 1e5 (floor.py: results/floor.md) and runs
bench_converged.py and time_to_fit.py (time to an accurate fit).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", category=FutureWarning)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import bbvi  # noqa: E402


def make_data(N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g)
    w = torch.randn(D, generator=g)
    y = torch.bernoulli(torch.sigmoid(X @ w), generator=g)
    return X, y


def log_joint(z, data):
    """w ~ N(0, I), y_n ~ Bernoulli(sigmoid(x_n . w)); constants dropped. z['w']: (S, D) -> (S,)."""
    w = z["w"]
    logits = w @ data["X"].T
    return -0.5 * (w * w).sum(-1) + (data["y"] * logits - F.softplus(logits)).sum(-1)


def bbvi_runner(X, y, estimator, S, lr=0.01, family="meanfield", compiled=False):
    """A step of bbvi (eager, or with compiled=True the step bbvi.fit(compile=True) runs: then (runner, seconds
    its first call took to compile))."""
    D = X.shape[1]
    model = bbvi.Model(log_joint, {"w": bbvi.Latent(shape=(D,))}, data={"X": X, "y": y}, name="logreg")
    state = bbvi.init(model, family, estimator, "loo" if estimator == "score" else "default",
                      num_particles=S, lr=lr, schedule=None, steps=1000, seed=0, init_strategy="zero",
                      dtype=X.dtype)   # the same start and dtype as the hand-written step
    if not compiled:
        return lambda: bbvi.step(state)
    from bbvi.compiled import CompiledStep
    t = time.perf_counter()
    compiled_step = CompiledStep(state)
    compiled_step(state, bbvi.step)
    return (lambda: compiled_step(state, bbvi.step)), time.perf_counter() - t


def hand_runner(X, y, estimator, S, lr=0.01):
    """The same estimator written directly in torch: what a careful user would write by hand."""
    D = X.shape[1]
    loc = torch.zeros(D, requires_grad=True)
    log_scale = torch.full((D,), -2.302585, requires_grad=True)
    opt = torch.optim.Adam([loc, log_scale], lr=lr)
    g = torch.Generator().manual_seed(0)
    data = {"X": X, "y": y}

    def logp(w):   # bbvi's log-joint itself: the two steps differ only in what is around it
        return log_joint({"w": w}, data)

    def reparam():
        opt.zero_grad()
        w = loc + log_scale.exp() * torch.randn(S, D, generator=g)
        elbo = logp(w).mean() + log_scale.sum()
        (-elbo).backward()
        opt.step()

    def score_loo():
        opt.zero_grad()
        scale = log_scale.exp()
        with torch.no_grad():
            w = loc + scale * torch.randn(S, D, generator=g)
            lp = logp(w)
        lq = (-0.5 * ((w - loc) / scale) ** 2 - log_scale).sum(-1)
        f = lp - lq.detach()
        b = (f.sum() - f) / (S - 1)
        (-((f - b) * lq).mean()).backward()
        opt.step()

    return reparam if estimator == "reparam" else score_loo


def pyro_runner(X, y, estimator, S, lr=0.01):
    """Pyro SVI as its docs say: vectorized particles, max_plate_nesting=1; 'score' forces the score-function
    path (a guide distribution without rsample) with TraceGraph_ELBO's decaying-average baseline."""
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO
    pyro.clear_param_store()
    D = X.shape[1]

    class ScoreNormal(dist.Normal):
        has_rsample = False

    def model(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=(w.unsqueeze(-2) * X).sum(-1)), obs=y)

    def guide(X, y):
        loc = pyro.param("loc", torch.zeros(D))
        scale = pyro.param("scale", 0.1 * torch.ones(D), constraint=dist.constraints.positive)
        if estimator == "reparam":
            pyro.sample("w", dist.Normal(loc, scale).to_event(1))
        else:
            pyro.sample("w", ScoreNormal(loc, scale).to_event(1),
                        infer={"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}})

    elbo_cls = Trace_ELBO if estimator == "reparam" else TraceGraph_ELBO
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}),
              loss=elbo_cls(num_particles=S, vectorize_particles=True, max_plate_nesting=1))
    return lambda: svi.step(X, y)


JAX_ENV = os.path.join(ROOT, ".bench-jax")
JAX_PACKAGES = ["jax", "jaxlib", "numpyro"]


def _jax_python():
    return os.path.join(JAX_ENV, "Scripts" if os.name == "nt" else "bin", "python")


def jax_env(create=True):
    """The python of the JAX + NumPyro virtualenv at <repo>/.bench-jax, made on demand (venv + pip install of
    JAX_PACKAGES, pip's output kept in .bench-jax/pip.log; a stamp file marks a finished install). Returns None,
    having printed "NumPyro skipped: <reason>", when the env is missing and `create` is False, or when making it
    fails (no network, no index, no venv module)."""
    py, stamp = _jax_python(), os.path.join(JAX_ENV, ".installed")
    if os.path.exists(stamp) and os.path.exists(py):
        return py
    if not create:
        why = "no finished install" if os.path.isdir(JAX_ENV) else "no env"
        print(f"NumPyro skipped: {why} at {JAX_ENV} (--quick does not install it; a full run does)")
        return None
    log = os.path.join(JAX_ENV, "pip.log")
    print(f"making the NumPyro env at {JAX_ENV} (pip install {' '.join(JAX_PACKAGES)}; log in {log})", flush=True)
    try:
        if not os.path.exists(py):
            r = subprocess.run([sys.executable, "-m", "venv", JAX_ENV], capture_output=True, text=True)
            if r.returncode != 0:
                print("NumPyro skipped: venv creation failed: " + (r.stderr.strip().splitlines() or ["?"])[-1])
                return None
        t = time.perf_counter()
        with open(log, "w") as f:
            r = subprocess.run([py, "-m", "pip", "install", "--retries", "2", "--timeout", "30", *JAX_PACKAGES],
                               stdout=f, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            with open(log) as f:
                text = f.read()
            net = any(m in text for m in ("NewConnectionError", "Failed to establish", "Name or service not known",
                                          "Temporary failure in name resolution", "Network is unreachable"))
            print(f"NumPyro skipped: pip install failed (exit {r.returncode}"
                  f"{', no network' if net else ''}); see {log}")
            return None
        open(stamp, "w").close()
        print(f"NumPyro env ready in {time.perf_counter() - t:.0f} s", flush=True)
        return py
    except OSError as e:
        print(f"NumPyro skipped: {e}")
        return None


def numpyro_rows(N, D, S, steps, repeats, create_env=True, sizes=None, timeout=3600):
    """NumPyro SVI timed by bench_numpyro.py in the JAX env on make_data(N, D) (and make_data(n, D) for each n in
    `sizes`), written to a temporary .npz; returns its rows (estimator, N, ms_per_step, compile_s, ...) and the
    versions, or None (with a "NumPyro skipped: ..." line) when the env is unavailable or the run fails."""
    py = jax_env(create=create_env)
    if py is None:
        return None
    sizes = sorted(set(sizes or [N]))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.npz")
        arrays = {}
        for n in sizes:
            X, y = make_data(n, D)
            arrays[f"X_{n}"], arrays[f"y_{n}"] = X.numpy(), y.numpy()
        X, y = make_data(N, D)
        import numpy as np
        np.savez(path, X=X.numpy(), y=y.numpy(), **arrays)
        cmd = [py, os.path.join(ROOT, "experiments", "bench_numpyro.py"), path, "--particles", str(S),
               "--steps", str(steps), "--repeats", str(repeats), "--sizes", ",".join(map(str, sizes))]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env.pop("PYTHONPATH", None)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"NumPyro skipped: bench_numpyro.py ran past {timeout} s")
            return None
    if r.returncode != 0:
        print("NumPyro skipped: bench_numpyro.py failed: " + (r.stderr.strip().splitlines() or ["?"])[-1])
        return None
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print("NumPyro skipped: no JSON line from bench_numpyro.py")
        return None


def time_steps(runners, steps, repeats, warmup=20):
    for run in runners.values():
        for _ in range(warmup):
            run()
    times = {k: [] for k in runners}
    for _ in range(repeats):
        for k, run in runners.items():
            t = time.perf_counter()
            for _ in range(steps):
                run()
            times[k].append((time.perf_counter() - t) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def faster(first, second):
    """NumPyro's rows of two runs (numpyro_rows), each row the faster of its two (None-safe)."""
    if not second:
        return first
    rows = []
    for a in first["rows"]:
        b = [r for r in second["rows"] if (r["estimator"], r["N"]) == (a["estimator"], a["N"])]
        rows.append(dict(a, ms_per_step=min([a["ms_per_step"]] + [r["ms_per_step"] for r in b]),
                         ms_per_step_runs=[a["ms_per_step"]] + [r["ms_per_step"] for r in b]))
    return dict(first, rows=rows)


def compiled_again(rows, N, D, S, steps, repeats):
    """The bbvi compile=True rows of per_step_table(N, ...) timed again, alone, as NumPyro's process times itself:
    each keeps the faster of its two runs, as NumPyro's rows do (`faster`); both are printed."""
    X, y = make_data(N, D)
    for est, label in (("reparam", "reparam"), ("score", SCORE_LABEL)):
        row = [r for r in rows if r["estimator"] == label and r["system"] == "bbvi compile=True"]
        if not row:
            continue
        runner, _ = bbvi_runner(X, y, est, S, compiled=True)   # its graph already in Inductor's cache
        again = 1e3 * time_steps({"again": runner}, steps, repeats)["again"]
        r = row[0]
        best = min(r["ms_per_step"], again)
        print(f"bbvi compile=True, {est}, N = {N}: {r['ms_per_step']:.3f} ms/step round-robin, {again:.3f} alone; "
              f"kept {best:.3f}")
        r.update(ratio_to_hand=r["ratio_to_hand"] * best / r["ms_per_step"], ms_per_step=best)
    return rows


def with_numpyro(rows, numpyro, N):
    """The per-step rows with NumPyro's rows at this N (bench_numpyro.py's output, or None) and numpyro_over_bbvi:
    NumPyro's ms per step over each bbvi row's (> 1: bbvi is faster)."""
    rows = [dict(r) for r in rows]
    for est, label in (("reparam", "reparam"), ("score", SCORE_LABEL)):
        jit = [r for r in (numpyro or {}).get("rows", []) if r["estimator"] == est and r.get("N", N) == N]
        base = [r["ms_per_step"] / r["ratio_to_hand"] for r in rows if r["estimator"] == label][:1]
        for r in rows:
            if r["estimator"] == label and r["system"].startswith("bbvi") and jit:
                r["numpyro_over_bbvi"] = jit[0]["ms_per_step"] / r["ms_per_step"]
        for r in jit:
            rows.append(dict(estimator=label, system="numpyro SVI (jit)", ms_per_step=r["ms_per_step"],
                             ratio_to_hand=r["ms_per_step"] / base[0] if base else float("nan"),
                             pyro_over_bbvi=float("nan"), numpyro_over_bbvi=float("nan"), compile_s=r["compile_s"]))
    return rows


SCORE_LABEL = "score + baseline (LOO; pyro: decaying avg; numpyro: none)"


def per_step_table(N, D, S, steps, repeats, compile_row=True):
    """Per-step times of the torch contenders at this N (NumPyro's rows join in with_numpyro)."""
    X, y = make_data(N, D)
    rows = []
    for est in ("reparam", "score"):
        runners = {"hand-written torch": hand_runner(X, y, est, S), "bbvi": bbvi_runner(X, y, est, S),
                   "pyro SVI": pyro_runner(X, y, est, S)}
        compile_s = {}
        if compile_row:  # compiled before the timing; its compile time is its own column
            runners["bbvi compile=True"], compile_s["bbvi compile=True"] = bbvi_runner(X, y, est, S, compiled=True)
        med = time_steps(runners, steps, repeats)
        base = med["hand-written torch"]
        label = "reparam" if est == "reparam" else SCORE_LABEL
        for k, v in med.items():
            rows.append(dict(estimator=label, system=k, ms_per_step=1e3 * v, ratio_to_hand=v / base,
                             pyro_over_bbvi=med["pyro SVI"] / med["bbvi"] if k == "bbvi" else float("nan"),
                             numpyro_over_bbvi=float("nan"), compile_s=compile_s.get(k, float("nan"))))
    return rows


def _axis_rows(axis, values, steps):
    """One scaling axis, run in a fresh process so that its peak memory is its own: configurations go in
    increasing size, so the growth of the peak RSS over the post-import baseline is each one's peak."""
    import resource
    torch.set_num_threads(2)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = []
    for v in values:
        S, N, D, family = 16, 1000, 10, "meanfield"
        if axis == "particles":
            S = v
        elif axis == "N":
            N = v
        else:
            D = v
            family = "fullrank" if axis == "D (fullrank)" else "meanfield"
        X, y = make_data(N, D)
        for est in (("reparam",) if family == "fullrank" else ("reparam", "score")):
            s = max(S, 2)
            runners = {"hand": hand_runner(X, y, est, s), "bbvi": bbvi_runner(X, y, est, s, family=family)}
            n = max(3, min(steps, int(2e6 / (N * D * s) * steps) or 3))
            med = time_steps(runners, n, 3, warmup=3)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rows.append(dict(axis=axis, S=s, N=N, D=D, family=family, estimator=est, hand_ms=1e3 * med["hand"],
                             bbvi_ms=1e3 * med["bbvi"], ratio=med["bbvi"] / med["hand"],
                             peak_rss_growth_mb=(peak - base) / 1024))
    return rows


def scaling_rows(steps, quick):
    """Time per step (and peak memory) as particles, data and latent dimension grow; full-rank at large D.
    The 'hand' column is always the hand-written mean-field step of the same estimator."""
    import multiprocessing
    grid = {"particles": [1, 4, 16, 64, 256, 1024], "N": [100, 1000, 10_000, 100_000, 1_000_000],
            "D": [10, 100, 1000, 10_000], "D (fullrank)": [10, 100, 300, 1000, 2000]}
    if quick:
        grid = {"particles": [2], "N": [100], "D": [10], "D (fullrank)": [10]}   # the code path, not a curve
    ctx = multiprocessing.get_context("spawn")
    rows = []
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        for axis, values in grid.items():
            rows += pool.apply(_axis_rows, (axis, values, steps))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    import pandas as pd
    os.makedirs(args.out, exist_ok=True)
    steps, repeats = (20, 2) if args.quick else (args.steps, args.repeats)
    import pyro
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
               f"({torch.get_num_threads()} threads), pyro {pyro.__version__}, python {platform.python_version()}")
    print("machine:", machine)
    numpyro = numpyro_rows(1000, 10, 16, steps, repeats, create_env=not args.quick,
                           sizes=None if args.quick else [1000, 100000])
    if numpyro:
        machine += f", numpyro {numpyro['numpyro']} + jax {numpyro['jax']} (separate process)"
    rows = per_step_table(1000, 10, 16, steps, repeats, compile_row=not args.quick)
    big = [] if args.quick else per_step_table(100000, 10, 16, max(steps // 10, 10), repeats)   # arithmetic-bound
    if numpyro and not args.quick:   # timed again after the torch contenders: the machine's speed drifts; NumPyro keeps its faster run
        numpyro = faster(numpyro, numpyro_rows(1000, 10, 16, steps, repeats, create_env=False,
                                               sizes=None if args.quick else [1000, 100000]))
        rows = compiled_again(rows, 1000, 10, 16, steps, repeats)   # and so does the row held against it
        big = compiled_again(big, 100000, 10, 16, max(steps // 10, 10), repeats)
    per_step = pd.DataFrame(with_numpyro(rows, numpyro, 1000))
    if not args.quick:
        per_step = pd.concat([per_step.assign(N=1000), pd.DataFrame(with_numpyro(big, numpyro, 100000))
                              .assign(N=100000)], ignore_index=True)
        import floor   # the physical floor at N = 1e5 and how close each system's step comes to it
        peaks = floor.machine_peaks(16, 100000)
        at_big = per_step[(per_step.N == 100000) & (per_step.system != "pyro SVI")]
        times = [("reparam" if r.estimator == "reparam" else "score", r.system, r.ms_per_step)
                 for r in at_big.itertuples()]
        floor.write(floor.floor_rows(times, peaks, 16, 100000, 10), peaks, 16, 100000, 10, args.out)
    per_step.to_csv(os.path.join(args.out, "bench.csv"), index=False)
    print(per_step.round(3).to_string(index=False))
    scaling = pd.DataFrame(scaling_rows(steps, args.quick))
    scaling.to_csv(os.path.join(args.out, "bench_scaling.csv"), index=False)
    print(scaling.round(3).to_string(index=False))
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(f"Machine: {machine}\n\nBayesian logistic regression, N=1000, D=10, 16 particles, mean-field; "
                f"median of {repeats} x {steps} steps (N = 1e5: a tenth as many steps); compile_s: the one-off "
                "compile (NumPyro's first jitted update, bbvi compile=True's first step), not in ms_per_step.\n\n")
        f.write(per_step.to_markdown(index=False, floatfmt=".3f") + "\n\nScaling (bbvi vs hand-written):\n\n")
        f.write(scaling.to_markdown(index=False, floatfmt=".3f") + "\n")
    _figure(scaling, os.path.join(args.out, "bench.png"))
    if not args.quick:
        import bench_converged
        import time_to_fit
        bench_converged.main(["--out", args.out])
        time_to_fit.main(["--out", args.out])
        _update_readme(args.out, machine, per_step, scaling)


def _update_readme(out, machine, per_step, scaling):
    """Regenerate the speed block (docs/speed.md, "Speed") from this run's tables."""
    from common import replace_readme_block
    big = scaling[((scaling.N >= 100_000) | (scaling.D >= 1000)) & (scaling.family == "meanfield")]
    with open(os.path.join(out, "bench_converged.md")) as f:
        converged = f.read()
    with open(os.path.join(out, "time_to_fit.md")) as f:
        to_fit = f.read()
    with open(os.path.join(out, "floor.md")) as f:
        floor_md = f.read().strip()
    replace_readme_block("bench", "Speed", "\n".join([
        f"Regenerated by `make bench` (do not edit by hand). Machine: {machine}.", "",
        "**Per step**, Bayesian logistic regression (N=1000 and 1e5, D=10, 16 particles, mean-field), median of 7 x "
        "200 steps (20 at N=1e5): NumPyro runs in its own JAX process (not round-robin with the rest), timed before "
        "and after the torch contenders, its faster run kept, and bbvi compile=True timed again, alone, after "
        "NumPyro's second run, its faster run kept likewise; `compile_s` "
        "is the one-off compile (NumPyro's jit, bbvi's compile=True), left out of ms_per_step; numpyro_over_bbvi "
        "> 1: that bbvi row is faster than NumPyro's jitted step; NumPyro's TraceGraph_ELBO has no baseline.",
        "", per_step.to_markdown(index=False, floatfmt=".3f"), "",
        "**The physical floor** at N = 1e5 (`experiments/floor.py`): the log-joint's own matmul flops, "
        "transcendentals and data read, each at this machine's measured peak; the rows are the N = 1e5 steps above.",
        "", floor_md, "",
        "**Scaling** (mean-field; `hand` is always the hand-written mean-field step): the bbvi/hand-written "
        f"ratio falls towards 1 as the log-joint's own cost grows (ratios {big.ratio.min():.2f}-{big.ratio.max():.2f} "
        "at N >= 1e5 or D >= 1000). Full-rank's cost against D, and peak memory growth, per configuration:", "",
        scaling[["axis", "S", "N", "D", "family", "estimator", "hand_ms", "bbvi_ms", "ratio", "peak_rss_growth_mb"]]
        .to_markdown(index=False, floatfmt=".3g"), "", converged, "", to_fit]))


def _figure(scaling, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, axis in zip(axes, ["particles", "N", "D"]):
        sub = scaling[scaling.axis == axis]
        x = {"particles": "S", "N": "N", "D": "D"}[axis]
        for est, c in [("reparam", "C0"), ("score", "C1")]:
            s = sub[sub.estimator == est]
            ax.loglog(s[x], s.bbvi_ms, "o-", color=c, label=f"bbvi {est}")
            ax.loglog(s[x], s.hand_ms, "x--", color=c, alpha=0.6, label=f"hand {est}")
        ax.set_xlabel(x)
        ax.set_ylabel("ms / step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
