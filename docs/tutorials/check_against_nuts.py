"""Check a fit against NUTS: eight schools, fitted by `bbvi.fit` and sampled by `bbvi.nuts`, compared with
`bbvi.compare`, PSIS k-hat from `fit.diagnostics()`, and the figures of `bbvi.plots`.

A variational fit is an approximation; before trusting it on a model whose posterior you do not know, check it
against a long-run MCMC reference. bbvi runs one for you (Pyro's NUTS on the very same log-joint) and tables
the differences in units of the reference's posterior sd.

The model is the noncentered eight schools (Rubin 1981), bundled in this repository as
`models.eight_schools.model`:

    theta_trans[j] ~ N(0, 1), mu ~ N(0, 5), tau ~ half-Cauchy(0, 5),
    y[j] ~ N(mu + tau * theta_trans[j], sigma[j]),  theta[j] = mu + tau * theta_trans[j] (derived).

Run it from anywhere with

    python docs/tutorials/check_against_nuts.py

Figures go to $BBVI_TUTORIAL_OUT (default: a new temporary folder). `BBVI_TUTORIAL_QUICK=1` (the tests) runs a
shorter fit and a short NUTS run (2 chains x 100 draws): the comparison is then noisier, and the tolerances
below allow for it.
"""
import os
import sys
import tempfile

import bbvi
import bbvi.plots

# The bundled models live in the repository's `models` package: put the repository root on the path.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from models.eight_schools import model  # noqa: E402

QUICK = os.environ.get("BBVI_TUTORIAL_QUICK") == "1"
OUT = os.environ.get("BBVI_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="bbvi-tutorial-")
os.makedirs(OUT, exist_ok=True)

# 1. The fit. With no options `bbvi.fit` picks the start, step size and stopping rule itself (here about 6000
# steps); quick mode instead runs a fixed 1000 steps with a decaying step size, which lands close to the same
# q. At the end the fit checks itself (PSIS k-hat, and how far importance sampling would move each mean and
# sd) and issues a `bbvi.ReliabilityWarning` when something looks off: read it, it names what to try.
fit = bbvi.fit(model, steps=1000) if QUICK else bbvi.fit(model)
print(fit.summary(var_names=["mu", "tau", "theta"]))

# 2. The reference: NUTS on the same model. Chains run in parallel processes. The draws are cached, keyed on
# the model's latents, data, log-joint source and the sampler settings, so a second run of this script is
# instant; the cache goes to `$BBVI_CACHE` when set, here else to the output folder.
cache_dir = None if os.environ.get("BBVI_CACHE") else os.path.join(OUT, "nuts_cache")
if QUICK:
    ref = bbvi.nuts(model, num_draws=100, num_warmup=100, num_chains=2, seed=0, cache_dir=cache_dir)
else:
    ref = bbvi.nuts(model, num_draws=1000, num_warmup=1000, num_chains=4, seed=0, cache_dir=cache_dir)
# `ref` is an `arviz.InferenceData`: `ref.posterior` holds every latent and derived quantity, chains x draws.
print({name: tuple(v.shape) for name, v in ref.posterior.data_vars.items()})

# 3. The comparison, one row per scalar: the reference's and the fit's mean and sd, the mean error in units of
# the reference sd, the sd ratio (fit / reference), errors of the 5% and 95% quantiles, and a verdict (good:
# mean within 0.1 sd and sd within 10%). The first line sums it up and repeats any warning about the reference
# itself (too few effective draws, R-hat above 1.01): a short NUTS run is no gold standard either. (The k-hat
# in that first line comes from compare's own 4000 draws of q, a noisier estimate than the one below.)
table = bbvi.compare(fit, ref)
print(table)

# Every mean is close (within 0.35 reference sd even against the short quick-mode reference)...
worst = table["mean_err_sd"].abs().max()
assert worst < 0.35, table
# ... but the mean-field Gaussian (bbvi's default family) cannot have the funnel-like dependence between tau
# and theta_trans: it under-states the sd of tau, and with it tau's upper tail (`q95_err_sd < 0`).
tau = table.loc["tau"]
print(f"\ntau: mean error {tau['mean_err_sd']:+.2f} sd, sd ratio {tau['sd_ratio']:.2f}")
assert tau["sd_ratio"] < 0.95 and tau["q95_err_sd"] < 0, tau

# 4. Without any reference: PSIS k-hat (Yao et al. 2018) reads the importance weights p/q of draws from q.
# Below 0.5 q is good, 0.5-0.7 usable (importance-sampling corrections are reliable), above 0.7 q should not
# be trusted. It comes with a Monte Carlo interval, since k-hat itself is estimated from draws.
diag = fit.diagnostics()
print(f"\nPSIS k-hat {diag['khat']:.2f}, interval {diag['khat_interval'][0]:.2f}-{diag['khat_interval'][1]:.2f}: "
      f"{diag['khat_reading']}")
assert 0.3 < diag["khat"] < 0.7, diag
# With k-hat around 0.5, PSIS weights can correct q's draws toward the posterior: `importance_resample=True`
# resamples draws of q by their weights, which repairs much of tau's under-stated spread. (Where k-hat's
# interval reaches 0.7, bbvi adds a ReliabilityWarning that the resampled draws are not reliable either.)
corrected = fit.sample(4000, importance_resample=True)
fixed = bbvi.compare(corrected, ref, var_names="tau").loc["tau"]
print(f"tau after PSIS resampling: mean error {fixed['mean_err_sd']:+.2f} sd, sd ratio {fixed['sd_ratio']:.2f}")
assert fixed["sd_ratio"] > tau["sd_ratio"], (fixed, tau)
# (Other remedies: `family="fullrank"` or `family="flow"`, which can represent the dependence.)

# 5. The figures: the ELBO trace (did the fit settle?), and every marginal of the fit over the reference's
# histogram (tau, spanning orders of magnitude, gets a log axis). Each function returns the matplotlib Figure
# and, given a path, saves a PNG there.
bbvi.plots.plot_elbo(fit, path=os.path.join(OUT, "elbo.png"))
bbvi.plots.plot_marginals(fit, ref, path=os.path.join(OUT, "marginals.png"), var_names=["mu", "tau", "theta"])
for name in ("elbo.png", "marginals.png"):
    assert os.path.getsize(os.path.join(OUT, name)) > 0
    print("wrote", os.path.join(OUT, name))
