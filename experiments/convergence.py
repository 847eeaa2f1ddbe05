"""Convergence: ELBO against step and against wall time per estimator and baseline, and the steps (and
seconds) until every mean is within 0.1 reference sd of posteriordb's reference. Accuracy is read every
100 steps from 2000 draws of q. Writes convergence.csv (traces), convergence.md (steps to accuracy), .png."""
import time

from common import parse, single_thread, write_table

CONFIGS = [("score", None), ("score", "ema"), ("score", "loo"), ("score", "cv"), ("reparam", "default"),
           ("stl", "default")]
# posteriors on which the mean-field family can reach 0.1 sd (see accuracy.md), so the steps measure convergence
POSTERIORS = ["arK-arK", "hmm_example-hmm_example", "low_dim_gauss_mix-low_dim_gauss_mix"]


def main(argv=None):
    args = parse(__doc__.splitlines()[0], argv)
    single_thread()
    import numpy as np
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    import bbvi
    from models import posteriordb
    steps, every = (200, 50) if args.quick else (5000, 100)
    posteriors = POSTERIORS[:1] if args.quick else POSTERIORS
    traces, summary = [], []
    bar = tqdm(total=len(posteriors) * len(CONFIGS), desc="convergence")
    for name in posteriors:
        model, ref = posteriordb.load(name), posteriordb.reference(name)
        ref_vars = list(ref.posterior.data_vars)
        for est, bl in CONFIGS:
            label = est if est != "score" else f"score+{bl}"
            record = {"t0": time.perf_counter(), "paused": 0.0, "first": None}
            check = _checker(record, traces, ref, ref_vars, name, label, every)
            bbvi.fit(model, estimator=est, baseline=bl, steps=steps, seed=0, dtype=torch.float64, callbacks=[check],
                     diagnose=False)
            first = record["first"] or (np.nan, np.nan)
            summary.append(dict(posterior=name, estimator=label, steps_to_0_1_sd=first[0], seconds_to_0_1_sd=first[1],
                                final_max_mean_err_sd=traces[-1]["max_mean_err_sd"]))
            bar.update(1)
    bar.close()
    pd.DataFrame(traces).to_csv(f"{args.out}/convergence_traces.csv", index=False)
    text = write_table(pd.DataFrame(summary), args.out, "convergence", "Steps to every mean within 0.1 sd",
                       f"Mean-field, 16 particles, lr 0.05 with cosine decay over {steps} steps, seed 0; accuracy "
                       f"read every {every} steps (NaN: not reached). Timing excludes the accuracy checks.")
    _figure(pd.DataFrame(traces), f"{args.out}/convergence.png")
    print(text)


def _checker(record, traces, ref, ref_vars, name, label, every):
    """A callback that, every `every` steps, reads q's accuracy against the reference (time spent excluded)."""
    import torch

    import bbvi
    from bbvi.result import Result

    def check(state):
        if state.step % every:
            return False
        pause = time.perf_counter()
        wall = pause - record["t0"] - record["paused"]          # fitting time, checks excluded
        res = Result.from_state(state, settings={"num_particles": 16}, status="running", wall_time=0)
        table = bbvi.compare(res.sample(2000, seed=state.step), ref, var_names=ref_vars)
        err = table["mean_err_sd"].abs().max()
        elbo = torch.stack(state.elbo[-every:]).double()
        traces.append(dict(posterior=name, estimator=label, step=state.step, wall_s=wall,
                           elbo=elbo[torch.isfinite(elbo)].mean().item(), max_mean_err_sd=err))
        if record["first"] is None and err < 0.1:
            record["first"] = (state.step, wall)
        record["paused"] += time.perf_counter() - pause
        return False

    return check


def _figure(traces, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    posts = list(dict.fromkeys(traces.posterior))
    fig, axes = plt.subplots(len(posts), 3, figsize=(13, 3.4 * len(posts)), squeeze=False)
    for i, p in enumerate(posts):
        sub = traces[traces.posterior == p]
        for k, est in enumerate(dict.fromkeys(sub.estimator)):
            s = sub[sub.estimator == est]
            axes[i, 0].plot(s.step, s.elbo, color=f"C{k}", label=est)
            axes[i, 1].plot(s.wall_s, s.elbo, color=f"C{k}")
            axes[i, 2].semilogy(s.step, s.max_mean_err_sd, color=f"C{k}")
        lo = sub.elbo.quantile(0.2)
        for ax in axes[i, :2]:
            ax.set_ylim(lo, sub.elbo.max() + 0.1 * abs(sub.elbo.max() - lo))
        axes[i, 2].axhline(0.1, color="k", lw=0.8, ls="--")
        axes[i, 0].set(title=f"{p}: ELBO by step", xlabel="step", ylabel="ELBO (100-step mean)")
        axes[i, 1].set(title="ELBO by wall time", xlabel="seconds")
        axes[i, 2].set(title="max |mean error| (reference sds)", xlabel="step")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
