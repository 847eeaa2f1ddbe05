"""Accuracy on posteriordb: every posterior x start (init_strategy 'zero', 'map') x family (meanfield, fullrank,
lowrank) x estimator (score with a LOO baseline, reparam, stl), and the flow family at its defaults (reparam, 64
particles, lr 0.01; experiments/flows.py), fitted and compared with Stan's reference draws: max |mean error| in reference
sds, sd ratio range, PSIS k-hat, wall time and time per step. Writes accuracy.csv, accuracy.md, accuracy.png."""
import multiprocessing
import time

from common import parse, single_thread, write_table

FAMILIES = ["meanfield", "fullrank", "lowrank"]
ESTIMATORS = [("score", "loo"), ("reparam", "default"), ("stl", "default")]
FLOW = ("flow", ("reparam", "default"))  # the flow column: 64 particles, lr 0.01, the family's defaults
INITS = ["zero", "map"]


def _label(estimator, baseline):
    return f"{estimator}+{baseline}" if estimator == "score" else estimator


def run_one(job):
    single_thread()
    import torch

    import bbvi
    from models import posteriordb
    name, family, (estimator, baseline), init, steps = job
    model = posteriordb.load(name)
    ref = posteriordb.reference(name)
    t = time.perf_counter()
    try:
        fit = bbvi.fit(model, family=family, estimator=estimator, baseline=baseline, steps=steps,
                       num_particles=None if family == "flow" else 16,  # None, None: the flow's defaults (64, 0.01)
                       lr=None if family == "flow" else 0.05, seed=0, dtype=torch.float64, init_strategy=init,
                       diagnose=False)  # k-hat: compare
        status = fit.status
    except bbvi.FitError as e:
        fit, status = e.result, "failed"
    except bbvi.ConfigError as e:          # e.g. no MAP to start from (the centered eight-schools funnel)
        return dict(posterior=name, init=init, family=family, estimator=_label(estimator, baseline),
                    max_mean_err_sd=float("nan"), min_sd_ratio=float("nan"), max_sd_ratio=float("nan"),
                    khat=float("nan"), all_means_within_0_1=False, wall_s=time.perf_counter() - t, steps=0,
                    ms_per_step=float("nan"),
                    status=f"not run: {str(e).split(';')[0]}")
    wall = time.perf_counter() - t
    table = bbvi.compare(fit, ref, num_draws=4000)
    return dict(posterior=name, init=init, family=family, estimator=_label(estimator, baseline),
                max_mean_err_sd=table["mean_err_sd"].abs().max(), min_sd_ratio=table["sd_ratio"].min(),
                max_sd_ratio=table["sd_ratio"].max(), khat=table.attrs.get("khat", float("nan")),
                all_means_within_0_1=bool((table["mean_err_sd"].abs() < 0.1).all()), wall_s=wall,
                steps=fit.num_steps, ms_per_step=1000 * wall / max(fit.num_steps, 1), status=status)


def main(argv=None):
    args = parse(__doc__.splitlines()[0], argv)
    import pandas as pd
    from tqdm.auto import tqdm

    from models import posteriordb
    names = list(posteriordb.FIRST_TEN)
    steps = 200 if args.quick else 5000
    if args.quick:
        names = names[:1]  # arK: the quick run checks the script end to end (diamonds, N=5000, cost 45 s of it)
    jobs = [(n, f, e, i, steps) for n in names for i in INITS for f in FAMILIES for e in ESTIMATORS]
    jobs += [(n, FLOW[0], FLOW[1], i, steps) for n in names for i in (["map"] if args.quick else INITS)]
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        rows = list(tqdm(pool.imap(run_one, jobs), total=len(jobs), desc="accuracy"))
    frame = pd.DataFrame(rows)
    note = (f"{steps} steps, 16 particles, lr 0.05 (flow: 64 particles, lr 0.01) with cosine decay, seed 0, float64; compared with posteriordb's Stan "
            f"reference (10,000 draws) on every reference parameter (latents and derived quantities).")
    text = write_table(frame, args.out, "accuracy", "Accuracy on posteriordb", note)
    _figure(frame, f"{args.out}/accuracy.png")
    print(text)
    return frame


def _figure(frame, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    pivot = frame.assign(config=frame.init + " " + frame.family + " / " + frame.estimator).pivot(
        index="posterior", columns="config", values="max_mean_err_sd")
    fig, ax = plt.subplots(figsize=(0.6 * pivot.shape[1] + 4, 0.45 * pivot.shape[0] + 2.5))
    im = ax.imshow(np.log10(pivot.values.clip(1e-3, 1e3)), cmap="RdYlGn_r", vmin=-2, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(pivot.values):
        ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(pivot.shape[1]))
    ax.set_xticklabels(pivot.columns, rotation=40, ha="right", fontsize=7)
    ax.set_yticks(range(pivot.shape[0]))
    ax.set_yticklabels(pivot.index, fontsize=7)
    fig.colorbar(im, ax=ax, label="log10 max |mean error| (reference sds)")
    ax.set_title("max |mean error| against posteriordb, in reference sds (green < 0.1)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
