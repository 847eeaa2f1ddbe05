"""Gradient variance per estimator and baseline across particle counts, at the initial q and at a fitted q.

For each model, q0 = bbvi's initialisation and q* = a mean-field reparam fit (3000 steps); at each, 100
independent gradient estimates per (estimator, baseline, particles); the statistic is the sum over
parameters of the per-coordinate variance. Writes gradient_variance.csv, .md, .png."""
from common import parse, single_thread, write_table

CONFIGS = [("score", None), ("score", "ema"), ("score", "loo"), ("score", "cv"), ("reparam", "default"),
           ("stl", "default")]


def main(argv=None):
    args = parse(__doc__.splitlines()[0], argv)
    single_thread()
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    import bbvi
    from models import classics, posteriordb
    models = {"eight_schools": posteriordb.load("eight_schools-eight_schools_noncentered"),
              "logistic": classics.logistic, "sblrc-blr": posteriordb.load("sblrc-blr")}
    particles = [1, 4, 16, 64, 256]
    num, steps = 100, 3000
    if args.quick:
        models, particles, num, steps = {"logistic": classics.logistic}, [2, 8], 10, 50
    rows = []
    bar = tqdm(total=len(models) * 2 * len(CONFIGS) * len(particles), desc="gradient variance")
    for mname, model in models.items():
        start = bbvi.fit(model, steps=0, dtype=torch.float64, diagnose=False)
        fitted = bbvi.fit(model, estimator="reparam", steps=steps, dtype=torch.float64, seed=0, diagnose=False)
        for where, res in (("initial q", start), ("fitted q", fitted)):
            for est, bl in CONFIGS:
                for S in particles:
                    bar.update(1)
                    if bl in ("loo", "cv") and S < 2:
                        continue
                    g = res.gradient_samples(num, estimator=est, baseline=bl, num_particles=S, seed=1)
                    rows.append(dict(model=mname, at=where, estimator=est if est != "score" else f"score+{bl}",
                                     particles=S, variance=g.var(0).sum().item()))
    bar.close()
    frame = pd.DataFrame(rows)
    base = frame[frame.estimator == "score+None"].set_index(["model", "at", "particles"])["variance"]
    frame["fraction_of_plain_score"] = [r.variance / base.get((r.model, r.at, r.particles), float("nan"))
                                        for r in frame.itertuples()]
    text = write_table(frame, args.out, "gradient_variance", "Gradient variance",
                       f"Sum of per-coordinate variances of {num} independent gradient estimates; "
                       "fraction_of_plain_score = variance / variance of the score estimator without baseline.")
    _figure(frame, f"{args.out}/gradient_variance.png")
    print(text)
    return frame


def _figure(frame, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(frame.model))
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6.5), squeeze=False)
    for j, m in enumerate(models):
        for i, at in enumerate(["initial q", "fitted q"]):
            ax = axes[i, j]
            sub = frame[(frame.model == m) & (frame.at == at)]
            for k, est in enumerate(dict.fromkeys(sub.estimator)):
                s = sub[sub.estimator == est]
                ax.loglog(s.particles, s.variance, "o-", color=f"C{k}", label=est, ms=3)
            ax.set_title(f"{m}, {at}", fontsize=9)
            ax.set_xlabel("particles")
            ax.set_ylabel("gradient variance")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
