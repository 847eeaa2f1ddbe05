"""Flows where every Gaussian fails: eight_schools_noncentered, eight_schools_centered and gp_pois_regr, fitted with
the flow family at its defaults (family="flow": Real NVP couplings, reparam, lr 0.01; seeds 0-2) and with the best
Gaussian (fullrank, reparam, lr 0.05), compared with posteriordb's reference: max |mean error| in reference sds, sd
ratios, PSIS k-hat with its Monte Carlo interval, steps, wall time and time per step; the flow's draws also
importance-resampled (PSIS). Writes flows.csv, flows.md and flows.png."""
import multiprocessing
import time

from common import parse, single_thread, write_table

POSTERIORS = ["eight_schools-eight_schools_noncentered", "eight_schools-eight_schools_centered",
              "gp_pois_regr-gp_pois_regr"]
CONFIGS = {  # label -> fit options
    "gaussian (fullrank, reparam)": dict(family="fullrank", estimator="reparam", lr=0.05, num_particles=16),
    "flow (defaults)": dict(family="flow"),
}
SEEDS = {"gaussian (fullrank, reparam)": [0], "flow (defaults)": [0, 1, 2]}


def _row(name, label, seed, table, fit, wall, khat):
    return dict(posterior=name, config=label, seed=seed, max_mean_err_sd=table["mean_err_sd"].abs().max(),
                min_sd_ratio=table["sd_ratio"].min(), max_sd_ratio=table["sd_ratio"].max(),
                meets_floor=bool((table["mean_err_sd"].abs() < 0.1).all() and
                                 ((table["sd_ratio"] - 1).abs() <= 0.2).all()),
                khat=khat["khat"], khat_lo=khat["khat_interval"][0], khat_hi=khat["khat_interval"][1],
                steps=fit.num_steps, wall_s=wall, ms_per_step=1000 * wall / max(fit.num_steps, 1), start=fit.start.strategy)


def run_one(job):
    single_thread()
    import warnings

    import torch

    import bbvi
    from bbvi.diagnostics import khat_estimate
    from models import posteriordb
    name, label, seed, steps = job
    model, ref = posteriordb.load(name), posteriordb.reference(name)
    t = time.perf_counter()
    try:
        fit = bbvi.fit(model, **CONFIGS[label], steps=steps, seed=seed, dtype=torch.float64,
                       diagnose=False)  # the k-hat is computed below, with the reference comparison
    except bbvi.FitError as e:
        fit = e.result
    wall = time.perf_counter() - t
    khat = khat_estimate(fit.log_weights(16000, seed=1).double().numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference lacks the noncentered model's theta_trans
        rows = [_row(name, label, seed, bbvi.compare(fit, ref, num_draws=8000), fit, wall, khat)]
        if label.startswith("flow"):
            draws = fit.sample(8000, seed=0, importance_resample=True)
            rows.append(_row(name, label + " + PSIS resampling", seed, bbvi.compare(draws, ref), fit, wall, khat))
    return rows


def main(argv=None):
    args = parse(__doc__.splitlines()[0], argv)
    import pandas as pd

    steps = 60 if args.quick else 5000
    names = POSTERIORS[:1] if args.quick else POSTERIORS
    jobs = [(n, label, seed, steps) for n in names for label in CONFIGS for seed in SEEDS[label][:1 if args.quick else 3]]
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        rows = [r for part in pool.imap(run_one, jobs) for r in part]
    frame = pd.DataFrame(rows)
    note = (f"{steps} steps, float64, MAP start where the posterior has a mode (the centered funnel has none: zero "
            f"start). Gaussian: 16 particles, lr 0.05, seed 0; flow: family='flow' at its defaults (bbvi.Flow(): Real "
            f"NVP couplings, 2 ceil(log2 D) layers, hidden (32, 32); estimator 'auto' = reparam, 64 particles, lr "
            f"0.01), seeds 0-2. "
            f"Floor: every mean within 0.1 reference sd and every sd within 20%. k-hat from 16000 draws, interval "
            f"+- 2 Monte Carlo se.")
    text = write_table(frame, args.out, "flows", "Flows against the best Gaussian", note)
    _figure(frame, f"{args.out}/flows.png")
    print(text)
    return frame


def readme_block(out, accuracy):
    """The flows block (docs/features.md, "Flows"): this experiment's table, and the flow column of the accuracy grid against the
    best Gaussian per posterior with time per step against full rank."""
    import pandas as pd
    table = open(f"{out}/flows.md").read().replace("### ", "#### ", 1)
    acc = accuracy[accuracy.steps > 0]
    rows = []
    for name, sub in acc.groupby("posterior"):
        gauss = sub[sub.family != "flow"].sort_values("max_mean_err_sd").iloc[0]
        flow = sub[sub.family == "flow"].sort_values("max_mean_err_sd").iloc[0]
        full = sub[sub.family == "fullrank"].ms_per_step.median()
        rows.append(dict(posterior=name, best_gaussian=f"{gauss.init} {gauss.family} {gauss.estimator}",
                         gaussian_err=gauss.max_mean_err_sd, gaussian_khat=gauss.khat, flow=f"{flow.init} flow {flow.estimator}",
                         flow_err=flow.max_mean_err_sd, flow_khat=flow.khat,
                         flow_ms_per_step_vs_fullrank=flow.ms_per_step / full))
    grid = pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g")
    return ("Regenerated by `make experiments` (do not edit by hand).\n\n" + table + "\n![flows](docs/figures/flows.png)\n\n"
            "#### The flow column of the accuracy grid\n\nBest Gaussian configuration against the best flow start (reparam, the flow's defaults), "
            "max |mean error| in reference sds and k-hat; time per step of the flow over full rank's median.\n\n"
            + grid + "\n")


def _figure(frame, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    names = list(dict.fromkeys(frame.posterior))
    configs = list(dict.fromkeys(frame.config))
    width = 0.8 / len(configs)
    for j, config in enumerate(configs):
        sub = frame[frame.config == config].groupby("posterior").max(numeric_only=True).reindex(names)  # worst seed
        x = np.arange(len(names)) + j * width
        axes[0].bar(x, sub.max_mean_err_sd, width, label=config)
        axes[1].bar(x, sub.khat, width, label=config)
    axes[0].axhline(0.1, color="k", ls="--", lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("max |mean error| (reference sds), worst seed")
    axes[1].axhline(0.7, color="k", ls="--", lw=0.8)
    axes[1].set_ylabel("PSIS k-hat, worst seed")
    for ax in axes:
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
        ax.set_xticklabels([n.split("-")[1] for n in names], fontsize=8)
    axes[0].legend(fontsize=7)
    fig.suptitle("Flow against the best Gaussian on the posteriors no Gaussian fits (dashed: the floor, k-hat 0.7)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
