"""`bbvi demo` (`make demo`): the bundled eight-schools model (noncentered) fitted with the score-function
estimator (LOO baseline, mean-field) and the pathwise one (full-rank), checked against its NUTS reference and
posteriordb's Stan reference, gradient variance per estimator and baseline; plots and summary.md in the output
folder. It imports the examples package `models`, which the rest of bbvi does not."""
import os
import sys
import time
import warnings


def _table(df):
    cols = ["ref_mean", "ref_sd", "fit_mean", "fit_sd", "mean_err_sd", "sd_ratio", "q05_err_sd", "q95_err_sd",
            "verdict"]
    return df[cols].to_markdown(floatfmt=".3f")


def demo(out, quick=False):
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    import bbvi
    from bbvi import plots
    from models import eight_schools
    from models._data import reference as posteriordb_reference

    os.makedirs(out, exist_ok=True)
    model = eight_schools.model
    steps = 1000 if quick else 5000
    lines = [f"# bbvi demo: {model.name}", "",
             "Model: eight schools, noncentered (posteriordb `eight_schools_noncentered`); 10 latents.", ""]

    t = time.perf_counter()
    ref = bbvi.nuts(model, num_draws=150 if quick else 1000, num_warmup=150 if quick else 1000,
                    num_chains=2 if quick else 4, seed=0)
    nuts_wall = time.perf_counter() - t
    nuts_time = float(ref.posterior.attrs.get("sampling_time_s", nuts_wall))
    cached = nuts_wall < 0.5 * nuts_time
    print(f"NUTS reference: {nuts_time:.1f} s of sampling" + (" (loaded from cache)" if cached else ""))
    pdb = posteriordb_reference(eight_schools.POSTERIOR)

    fits = {
        "defaults: bbvi.fit(model)": bbvi.fit(model, seed=0, max_steps=steps if quick else None),
        "meanfield, score + LOO baseline": bbvi.fit(model, family="meanfield", estimator="score", baseline="loo",
                                                    num_particles=16, steps=steps, lr=0.05, seed=0),
        "fullrank, reparam": bbvi.fit(model, family="fullrank", estimator="reparam", num_particles=16,
                                      steps=steps, lr=0.05, seed=0),
    }
    lines += [f"NUTS reference (Pyro, {ref.posterior.sizes['chain']} chains x {ref.posterior.sizes['draw']} draws): {nuts_time:.1f} s of "
              f"sampling" + (" (this run loaded it from the cache)" if cached else "") + ".", ""]
    for label, fit in fits.items():
        diag = fit.diagnostics()
        vs_nuts = bbvi.compare(fit, ref)
        vs_pdb = bbvi.compare(fit, pdb, var_names=[k for k in pdb.posterior.data_vars])  # it stores theta, not theta_trans
        print(f"\n== {label}: {fit.num_steps} steps in {fit.wall_time:.2f} s "
              f"({1e3 * fit.wall_time / max(fit.num_steps, 1):.2f} ms/step); PSIS k-hat {diag['khat']:.2f}: "
              f"{diag['khat_reading']}")
        print(vs_nuts.round(3).to_string())
        print("vs NUTS:       ", vs_nuts.attrs["verdict"])
        print("vs posteriordb:", vs_pdb.attrs["verdict"])
        lines += [f"## {label}", "",
                  f"{fit.num_steps} steps in {fit.wall_time:.2f} s ({1e3 * fit.wall_time / max(fit.num_steps, 1):.2f}"
                  f" ms/step), NUTS took {nuts_time / max(fit.wall_time, 1e-9):.0f}x as long. "
                  f"PSIS k-hat {diag['khat']:.2f} ({diag['khat_reading']}).", "",
                  f"- against the Pyro NUTS reference: {vs_nuts.attrs['verdict']}",
                  f"- against posteriordb's Stan reference: {vs_pdb.attrs['verdict']}", "",
                  _table(vs_nuts), ""]

    mf = fits["meanfield, score + LOO baseline"]
    variances = {}
    for est, bl in [("score", None), ("score", "ema"), ("score", "loo"), ("score", "cv"), ("reparam", "default"),
                    ("stl", "default")]:
        g = mf.gradient_samples(100 if quick else 300, estimator=est, baseline=bl, num_particles=16, seed=1)
        variances[f"{est}" + (f" / {bl}" if est == "score" else "")] = g.var(0).sum().item()
    base = variances["score / None"]
    lines += ["## Gradient variance at the mean-field fit (16 particles; sum of per-coordinate variances)", "",
              "| estimator | variance | fraction of score without baseline |", "|---|---|---|"]
    lines += [f"| {k} | {v:.4g} | {v / base:.4f} |" for k, v in variances.items()]
    print("\ngradient variance:", {k: f"{v:.4g}" for k, v in variances.items()})

    plots.plot_elbo(mf, path=os.path.join(out, "elbo.png"))
    plots.plot_marginals(mf, ref, path=os.path.join(out, "marginals.png"))
    plots.plot_pair(fits["fullrank, reparam"], ref, path=os.path.join(out, "pair.png"),
                    var_names=["mu", "tau", "theta_trans[0]", "theta_trans[1]"])
    plots.plot_gradient_variance(variances, path=os.path.join(out, "gradient_variance.png"))
    lines += ["", "Figures: `elbo.png`, `marginals.png` (mean-field score fit over NUTS), `pair.png` (full-rank "
              "fit over NUTS), `gradient_variance.png`.", "",
              f"torch {torch.__version__}, bbvi {bbvi.__version__}, python {sys.version.split()[0]}"]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"\nwrote {out}/summary.md and 4 figures")


# ---- fit / nuts / compare -------------------------------------------------------------------------------------
