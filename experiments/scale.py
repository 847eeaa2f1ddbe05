"""Scale: how long a logistic regression (D = 10) takes to fit as the data grows (N = 1e3 ... 1e6): full-data steps, minibatch steps (subsample_size=1024, with the control variates that are the default, and without: 'minibatch, plain') and 2-process data parallel (torchrun, gloo), each timed to every mean within 0.1 posterior sd of the full-data fit; memory each step needs beyond the data; plots.

Every fit: mean-field, reparameterized, the adaptive rule (steps=None), float64, diagnose=False (the end-of-fit check is
timed once, separately). Two starts: 'zero' (q at 0 with unit scales: the stochastic optimisation itself, what
the comparison is about) and the default MAP/Laplace start. The reference is the default full-data fit; a
run's time to 0.1 sd is the wall time (its start included) after which every check (each `every` steps) of q's
current means keeps every one within 0.1 reference sd; its time to stop is when the fit itself stops (its
stopping rule, max_steps or the wall-time cap), with the error of what it returns. One process uses 2 threads,
each of the 2 ranks 1 thread (the machine's 2 cores either way). Memory (a separate 100-step run from the zero
start): the peak resident set sampled at 1 kHz during the steps, above the resident set at the first step (the
data, q and the start are then in memory).
"""
import json
import os
import subprocess
import sys
import threading
import time

from common import parse, write_table

import torch

import bbvi
from bbvi.diagnostics import check_reliability

D, BATCH, SEED = 10, 1024, 0


def data(n):
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, D, generator=g, dtype=torch.float64)
    w = torch.linspace(-1, 1, D, dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(X @ w), generator=g)
    return X, y


def log_joint(z, data):
    eta = z["beta"] @ data["X"].T
    return {"prior": -0.5 * (z["beta"] ** 2).sum(-1),
            "obs": -torch.nn.functional.binary_cross_entropy_with_logits(eta, data["y"].expand_as(eta),
                                                                         reduction="none")}


def model(n):
    X, y = data(n)
    return bbvi.Model(log_joint, {"beta": bbvi.Latent((D,))}, data={"X": X, "y": y}, plates={"obs": ("X", "y")},
                      name=f"logistic_{n}")


class Rss:
    """Peak resident set (bytes) sampled every millisecond while running."""

    def __init__(self):
        self.peak, self.base, self.stop = 0, None, threading.Event()

    @staticmethod
    def now():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def start(self):
        self.base = self.peak = self.now()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, self.now())

    def finish(self):
        self.stop.set()
        if self.base is not None:
            self.thread.join()
        return 0.0 if self.base is None else (self.peak - self.base) / 2 ** 20


def _kwargs(method):
    return dict(distributed=method.startswith("2-process"), progress=False, diagnose=False, seed=SEED,
                **({"subsample_size": BATCH, "subsample_cv": "plain" not in method} if "minibatch" in method else {}))


def run(n, method, start, every, cap_s, max_steps):
    """Fit, keeping q's current means every `every` steps; returns a row and the trace [(seconds, step, mean)]."""
    m = model(n)
    trace, began = [], time.perf_counter()

    def track(state):
        if state.step % every == 0:
            pc = state.params["continuous"]
            with torch.no_grad():
                mean = state.family.mean(pc)
                if state.model.preconditioner is not None:
                    shift, scale = state.model.preconditioner
                    mean = shift + scale * mean
            trace.append((time.perf_counter() - began, state.step, mean.tolist()))
        return time.perf_counter() - began > cap_s
    fit = bbvi.fit(m, init_strategy=start, max_steps=max_steps, callbacks=[track], **_kwargs(method))
    row = dict(N=n, method=method, start=start, status=fit.status, steps=fit.num_steps,
               time_to_stop_s=time.perf_counter() - began, start_s=fit.start_time,
               ms_per_step=1e3 * fit.wall_time / max(fit.num_steps, 1),
               rows_per_step=min(n, BATCH) if "minibatch" in method else n,
               data_mb=(m.data["X"].numel() + m.data["y"].numel()) * 8 / 2 ** 20,
               mean=fit.unconstrained_mean().tolist(), sd=fit.unconstrained_covariance().diag().sqrt().tolist())
    return row, trace


def score(row, trace, ref, tag=""):
    """The row with its errors against a reference ((mean, sd) lists): time and steps until q's means stay
    within 0.1 sd, and the error of what the fit returned; `tag` suffixes the new columns."""
    mean, sd = torch.tensor(ref["mean"]), torch.tensor(ref["sd"])
    errs = [float(((torch.tensor(m) - mean) / sd).abs().max()) for _, _, m in trace]
    within = next((i for i in range(len(errs)) if max(errs[i:]) <= 0.1), None)
    return dict(row, **{f"err_at_stop{tag}_sd": float(((torch.tensor(row["mean"]) - mean) / sd).abs().max()),
                        f"time_to_01sd{tag}_s": None if within is None else trace[within][0],
                        f"steps_to_01sd{tag}": None if within is None else trace[within][1]})


def laplace(n):
    """(mean, sd) of the MAP/Laplace approximation on the full data (the default start, no steps): for a
    logistic regression on many rows the posterior is close to Gaussian, and this is a reference free of the
    fits' own step noise."""
    fit = bbvi.fit(model(n), steps=0, progress=False, diagnose=False)
    return {"mean": fit.unconstrained_mean().tolist(), "sd": fit.unconstrained_covariance().diag().sqrt().tolist()}


def memory(n, method, steps=100):
    """Peak resident memory (MB) sampled at 1 kHz during `steps` steps, above that at the first step."""
    rss = Rss()

    def watch(state):
        if state.step == 1:
            rss.start()
        return False
    bbvi.fit(model(n), init_strategy="zero", steps=steps, callbacks=[watch], **_kwargs(method))
    return rss.finish()


def worker(argv):
    """Rank side of a 2-process run: `scale.py --worker N METHOD START OUT.json EVERY CAP MAX_STEPS`."""
    import torch.distributed as dist
    n, method, start, out, every, cap, max_steps = argv
    torch.set_num_threads(1)
    row, trace = run(int(n), method, start, int(every), float(cap), int(max_steps))
    row["step_mem_mb"] = memory(int(n), method)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"row": row, "trace": trace}, f)


def two_process(n, method, start, every, cap, max_steps, tmp):
    out = os.path.join(tmp, f"scale_{n}_{start}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           "--master_port=29533", os.path.abspath(__file__), "--worker", str(n), method, start, out,
           str(every), str(cap), str(max_steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"2-process run failed: {done.stderr[-2000:]}")
    with open(out) as f:
        got = json.load(f)
    os.remove(out)
    return got["row"], got["trace"]


def plot(frame, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("time_to_01sd_s", "Time until q's means stay within 0.1 sd", "seconds (start included)"),
              ("ms_per_step", "Cost of a step", "ms per step"),
              ("step_mem_mb", "Memory a step needs beyond the data", "MB (peak resident, above step 1)"))
    for (method, start), grp in frame.groupby(["method", "start"]):
        grp = grp.sort_values("N")
        for ax, (column, _, _) in zip(axes, panels):
            ax.plot(grp.N, grp[column].astype(float).clip(lower=1e-2), "-" if start == "zero" else "--",
                    marker="o", label=f"{method}, {start} start")
    for ax, (_, title, ylabel) in zip(axes, panels):
        ax.set(xscale="log", yscale="log", xlabel="rows N (logistic regression, D = 10)", ylabel=ylabel,
               title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "scale.png"), dpi=120)
    plt.close(fig)


COLUMNS = ["N", "method", "start", "status", "steps", "time_to_01sd_s", "steps_to_01sd", "time_to_stop_s",
           "err_at_stop_sd", "time_to_01sd_laplace_s", "err_at_stop_laplace_sd", "start_s", "ms_per_step",
           "step_mem_mb", "data_mb"]


def report(frame, out, check, cap, max_steps):
    """scale.csv (every column), scale.md (the main ones, with the setting) and scale.png."""
    frame.to_csv(os.path.join(out, "scale_runs.csv"), index=False)
    plot(frame, out)
    note = (f"Logistic regression, D = {D}, mean-field, reparameterized, 16 particles, the adaptive rule (max "
            f"{max_steps} steps, wall-time cap {cap}), B = {BATCH} for minibatches (with the control variates; "
            f"'minibatch, plain': without, subsample_cv=False), float64, 2 CPU cores. "
            f"time_to_01sd_s: wall time (start included) after which q's current means stay within 0.1 sd of the "
            f"reference, the default full-data fit (the first row of each N, which is therefore 0 at its own "
            f"end); empty: not within the run. The *_laplace columns: the same against the MAP/Laplace "
            f"approximation (mean, 1 / sqrt(H_ii)), free of the reference fit's step noise. time_to_stop_s, err_at_stop_sd: when the fit stopped (its rule, "
            f"max_steps or the cap) and the max error of the means it returned, in reference sds. step_mem_mb: "
            f"peak resident memory during 100 steps above that at step 1 (2-process: rank 0's). The end-of-fit "
            f"check (PSIS and the mode search; timed on q at the zero start) on the full data at N = {check['N']}: "
            f"{check['check_s']:.1f} s "
            f"with {check['num_draws']} draws of q.")
    write_table(frame[[c for c in COLUMNS if c in frame]], out, "scale", "Scale: time to 0.1 sd against N", note)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    args = parse(__doc__.splitlines()[0], argv)
    import pandas as pd
    sizes = [2000] if args.quick else [1000, 10000, 100000, 1000000]
    caps = {n: 20 if args.quick else 300 if n >= 1000000 else 600 for n in sizes}
    max_steps = 300 if args.quick else 20000
    rows = []
    for n in sizes:
        every = 10 if n <= 10000 else 25
        torch.set_num_threads(2)
        runs = []
        for start in ("auto",) if args.quick else ("auto", "zero"):   # first: the default full-data fit, the reference
            for method in ("full data", "minibatch") + (() if args.quick else ("minibatch, plain", "2-process full data")):
                if method.startswith("2-process"):
                    row, trace = two_process(n, method, start, every, caps[n], max_steps, args.out)
                else:
                    row, trace = run(n, method, start, every, caps[n], max_steps)
                    row["step_mem_mb"] = memory(n, method)
                runs.append((row, trace))
                print({k: v for k, v in row.items() if k not in ("mean", "sd")}, flush=True)
        ref, lap = runs[0][0], laplace(n)
        rows += [{k: v for k, v in score(score(row, trace, ref), trace, lap, "_laplace").items()
                  if k not in ("mean", "sd")} for row, trace in runs]
        if n == sizes[-1]:  # the end-of-fit check on the full data, timed once
            fit = bbvi.fit(model(n), steps=0, init_strategy="zero", progress=False, diagnose=False)
            t = time.perf_counter()
            info = check_reliability(fit, warn=False)
            check = dict(N=n, check_s=time.perf_counter() - t, num_draws=info["num_draws"])
    with open(os.path.join(args.out, "scale_check.json"), "w") as f:
        json.dump(check, f)
    cap = f"{caps[sizes[0]]} s" + (f" ({caps[sizes[-1]]} s at N = {sizes[-1]})"
                                   if caps[sizes[-1]] != caps[sizes[0]] else "")
    report(pd.DataFrame(rows), args.out, check, cap, max_steps)
    print(f"wrote {args.out}/scale.md")


if __name__ == "__main__":
    main()
