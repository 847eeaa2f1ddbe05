"""Rao-Blackwellized score terms (log-joints of factor terms): gradient variance with and without them as the
number of factors grows, and what the score path reaches with the factor forms of bundled models against the
same models written as one tensor."""
import os
import sys
import time
import warnings

import pandas as pd
import torch

from common import parse, single_thread, write_table

import bbvi
from models import discrete, eight_schools, posteriordb

SIZES = (10, 30, 100, 300, 1000)


def normal_means(n, factors, seed=0):
    """z_n ~ N(0, 1), x_n ~ N(z_n, 1), n = 1..N."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 2 ** 0.5

    def log_joint(z, x):
        d = torch.distributions
        prior, obs = d.Normal(0.0, 1.0).log_prob(z["z"]), d.Normal(z["z"], 1.0).log_prob(x)
        return {"prior": prior, "obs": obs} if factors else prior.sum(-1) + obs.sum(-1)
    return bbvi.Model(log_joint, {"z": bbvi.Latent(shape=(n,))}, data=x, name=f"normal_means_{n}")


def variance_rows(sizes, num_samples):
    rows = []
    for n in sizes:
        var = {}
        for factors in (False, True):
            t = time.perf_counter()
            fit = bbvi.fit(normal_means(n, factors), steps=0, init_strategy="zero", num_particles=8,
                           estimator="score", baseline="loo", progress=False, diagnose=False)
            setup = time.perf_counter() - t
            var[factors] = fit.gradient_samples(num_samples, seed=1).var(0).sum().item()
            if factors:
                rows.append(dict(n=n, var_one_tensor=var[False], var_factors=var[True],
                                 ratio=var[False] / var[True], structure_s=setup))
    return pd.DataFrame(rows)


def _score_fit(model, quick):
    kw = dict(estimator="score", baseline="loo", seed=0, progress=False)
    if quick:
        kw["max_steps"] = 200
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = bbvi.fit(model, **kw)
    return fit, any(issubclass(w.category, bbvi.ReliabilityWarning) for w in caught)


def accuracy_rows(quick):
    rows = []
    pairs = [("eight_schools-eight_schools_noncentered", eight_schools.model, eight_schools.model_factors),
             ("eight_schools-eight_schools_centered", eight_schools.centered, eight_schools.centered_factors)]
    for name, plain, factors in pairs[:1] if quick else pairs:   # quick: the code path (tests), not the table
        ref = posteriordb.reference(name)
        for form, model in (("one tensor", plain), ("factor terms", factors)):
            fit, warned = _score_fit(model, quick)
            table = bbvi.compare(fit, ref, num_draws=4000)
            rows.append(dict(model=name.split("-")[1], form=form, metric="max abs mean error (ref sd)",
                             value=table["mean_err_sd"].abs().max(), status=fit.status, steps=fit.num_steps,
                             warned=warned))
    for name in ("mixture",) if quick else ("mixture", "latent_features"):
        optimum = discrete.meanfield_optimum(name)
        latent, key = ("z", "p_z") if name == "mixture" else ("s", "p_s")
        for form, model in (("one tensor", discrete.MODELS[name]), ("factor terms", discrete.FACTOR_MODELS[name])):
            fit, warned = _score_fit(model, quick)
            p = fit.discrete.probs(fit.params["discrete"])[latent][..., 1]
            rows.append(dict(model=name, form=form, metric="max abs(p - p mean-field optimum)",
                             value=(p - optimum[key]).abs().max().item(), status=fit.status, steps=fit.num_steps,
                             warned=warned))
    return pd.DataFrame(rows)


def plot(frame, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.loglog(frame.n, frame.var_one_tensor, "o-", label="one tensor")
    ax.loglog(frame.n, frame.var_factors, "s-", label="factor terms (Rao-Blackwellized)")
    ax.set_xlabel("number of latents n (2n factor terms)")
    ax.set_ylabel("total gradient variance")
    ax.set_title("score + LOO, 8 particles, mean-field")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse(__doc__.splitlines()[0], argv)
    single_thread()
    var = variance_rows(SIZES[:2] if args.quick else SIZES, 50 if args.quick else 400)
    plot(var, os.path.join(args.out, "rao_blackwell.png"))
    acc = accuracy_rows(args.quick)
    text = write_table(var.astype({"n": str}), args.out, "rao_blackwell_variance", "Rao-Blackwellization: gradient variance",
                       "z_n ~ N(0, 1), x_n ~ N(z_n, 1); total variance of 400 score + LOO gradient estimates "
                       "(8 particles) at the zero start, the model written as one tensor and as factor terms; "
                       "structure_s: seconds to build the fit, the dependency probe included.")
    text += "\n" + write_table(acc, args.out, "rao_blackwell_accuracy", "Score path with factor terms",
                               "estimator='score', baseline='loo', every other option at its default; eight "
                               "schools against posteriordb's reference, the discrete models against the exact "
                               "mean-field optimum.")
    with open(os.path.join(args.out, "rao_blackwell.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
