"""Bring a Pyro model: `bbvi.from_pyro` turns it into a `bbvi.Model`, and everything else works as for a log-joint
written by hand (the fit, its checks, `to_arviz` with pointwise log-likelihoods for `az.loo`, observed data and a
posterior predictive for `az.plot_ppc`).

The model is Pyro's eight schools (noncentered), written as a Pyro user writes it: sample sites, a plate over the
schools, an observed site, a deterministic site. Run it with

    python docs/tutorials/pyro_model.py

(`BBVI_TUTORIAL_QUICK=1` runs shorter fits for the tests; this tutorial writes no files.)
"""
import math
import os
import sys

import arviz as az
import pyro
import pyro.distributions as dist
import torch

import bbvi

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from models import eight_schools  # noqa: E402  (the same model written by hand, to compare with)

QUICK = os.environ.get("BBVI_TUTORIAL_QUICK") == "1"
STEPS = 300 if QUICK else 3000

y = torch.tensor([28.0, 8, -3, 7, -1, 1, 18, 12])
sigma = torch.tensor([15.0, 10, 16, 11, 9, 11, 10, 18])


def schools(J, sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", J):
        theta_trans = pyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


# `from_pyro` runs the model once (with a seeded copy of the RNG: yours is untouched) to find its sample sites.
# Unobserved sites become latents, with their distributions' supports (tau: positive); each site's
# log-probability, computed by Pyro itself, becomes a factor term with one element per plate entry; the
# deterministic site becomes a derived quantity. The model's arguments travel with it as data, so a fit in
# float64 (the default) casts them.
model = bbvi.from_pyro(schools, 8, sigma, y)
print(model)
print("vectorized over particles:", model.vectorized)   # False (with a warning why) where vmap cannot run the model

# The same log density as the model written by hand: Pyro's half-Cauchy includes its normalizer log 2, which the
# hand-written model (a Cauchy on the positive reals) leaves out: a constant, which changes nothing in the fit.
z = {"mu": torch.tensor([1.0, -2.0], dtype=torch.float64), "tau": torch.tensor([3.0, 0.5], dtype=torch.float64),
     "theta_trans": torch.randn(2, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)}
ours = model.to(dtype=torch.float64).call(z)
by_hand = eight_schools.log_joint(z, {"y": y.double(), "sigma": sigma.double()}) + math.log(2)
print("log density, from Pyro and by hand:", ours.tolist(), by_hand.tolist())
assert torch.allclose(ours, by_hand, atol=1e-5)

# Fit it like any bbvi model. Here a full-rank Gaussian with the pathwise gradient, a fixed number of steps.
fit = bbvi.fit(model, family="fullrank", estimator="reparam", steps=STEPS, seed=0, diagnose=not QUICK)
print(fit.summary(num_draws=2000, var_names=["mu", "tau", "theta"]))
draws = fit.sample(4000, seed=1)
assert set(draws) == {"mu", "tau", "theta_trans", "theta"}   # theta: the deterministic site
# The hand-written model, fitted with the same options, gives the same answer (the fits differ only by the
# order of the latents in q, hence different random draws).
hand = bbvi.fit(eight_schools.model, family="fullrank", estimator="reparam", steps=STEPS, seed=0, diagnose=False)
other = hand.sample(4000, seed=1)
for name in ("mu", "tau"):
    err = abs(draws[name].mean() - other[name].mean()) / other[name].std()
    print(f"{name}: mean {draws[name].mean():.3f} (Pyro model) vs {other[name].mean():.3f} (by hand), "
          f"{err:.3f} posterior sd apart")
    assert err < 0.15, (name, err)

# The observed site's factor holds one log-likelihood per school: `to_arviz` puts it in the log_likelihood group,
# so ArviZ's PSIS-LOO runs on the fit. LOO wants draws of the posterior: q's own draws are narrower than the
# posterior where q is, and then many Pareto k come out high (on eight schools, 6 of 8 above 0.7, where NUTS's
# draws give none), a sign of q, not of the model. `importance_resample=True` exports q's draws resampled toward
# the posterior by their PSIS weights (`idata.posterior.attrs["draws"]` says which draws a record holds, with
# k-hat), and LOO on those is LOO on the posterior as far as k-hat allows.
idata = fit.to_arviz(num_draws=2000, seed=0, log_likelihood="obs", importance_resample=True)
print(idata.log_likelihood["obs"].shape)                     # (chain, draw, school)
print(idata.posterior.attrs["draws"])
loo = az.loo(idata, pointwise=True)
print(f"elpd_loo {loo.elpd_loo:.2f} (se {loo.se:.2f}); Pareto k above 0.7: {int((loo.pareto_k > 0.7).sum())} of 8")
assert math.isfinite(loo.elpd_loo)

# The record also holds the observed site's data (observed_data) and its posterior predictive: the model run at
# each draw with the observation left out, so Pyro draws `obs` from Normal(theta, sigma). Same names and dims, so
# `az.plot_ppc(idata)` compares the two. A site made by `poutine.reparam` (e.g. theta of a centred model under
# LocScaleReparam(0.)) is a derived quantity under its own name, beside its latent theta_decentered.
print(idata.observed_data["obs"].values)
y_rep = idata.posterior_predictive["obs"].values.reshape(-1, 8)
print("posterior predictive mean per school:", y_rep.mean(0).round(1))
assert idata.posterior_predictive["obs"].dims[2:] == idata.observed_data["obs"].dims
