"""Discrete latents: boolean and integer unknowns, fitted by the score path (with a leave-one-out baseline),
by DisARM, and with exact sums over a small latent's support, each checked against the exact posterior.

torch cannot differentiate through a draw of a discrete latent, so pathwise gradients are out for them. bbvi
gives each discrete latent a mean-field Categorical factor in q and estimates its gradient by the score function
(the log-derivative trick), which needs only values of the log-joint. Continuous latents of the same model keep
the pathwise gradient. Two small models here, both with an exact answer by enumeration:

1. Which points are outliers? y[i] ~ N(mu, 1), or N(mu, 10^2) where outlier[i] = 1 (a boolean latent,
   prior probability 0.1), mu ~ N(0, 10^2).
2. When did the rate change? Counts y[t] ~ Poisson(lam1) for t < tau and Poisson(lam2) from tau on, with an
   integer latent tau uniform on 1..39 and lam1, lam2 ~ Gamma(2, 0.5) (the model `models.discrete.changepoint`
   of this repository, whose data and exact answer we borrow).

Run it with `python docs/tutorials/discrete_latents.py`. `BBVI_TUTORIAL_QUICK=1` (the tests) runs the change-point
fits for a fixed, smaller number of steps; this tutorial writes no files.
"""
import os
import sys

import torch
from torch.distributions import Bernoulli, Gamma, MultivariateNormal, Normal, Poisson, constraints

import bbvi

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)                                    # for the repository's `models` package
from models import discrete  # noqa: E402

QUICK = os.environ.get("BBVI_TUTORIAL_QUICK") == "1"
# Quick mode (the tests) runs the outlier fits for a fixed 600 steps, not the adaptive default (750-1250 here).
QUICK_STEPS = {"steps": 600} if QUICK else {}
F64 = torch.float64

# ---- 1. Boolean latents: outliers ----------------------------------------------------------------------------
# Eight points; two of them (6.0 and -4.5) look like outliers.
Y = torch.tensor([0.3, -0.4, 1.1, 0.6, 6.0, 0.2, 0.9, -4.5], dtype=F64)
P_OUT, SD_IN, SD_OUT, SD_MU = 0.1, 1.0, 10.0, 10.0

# A boolean latent arrives in z as float 0./1. values, here of shape (S, 8), so the log-joint can use it in
# arithmetic (or as a mask, or `.long()` as an index). Build constant distributions in z's dtype (a float32
# tensor would round the float64 fit).


def outlier_log_joint(z, y):
    mu, o = z["mu"], z["outlier"]                           # (S,), (S, 8) of 0./1.
    sd = SD_IN + (SD_OUT - SD_IN) * o                      # each point's noise sd
    return (Normal(0.0, SD_MU).log_prob(mu)
            + Bernoulli(probs=torch.tensor(P_OUT, dtype=o.dtype)).log_prob(o).sum(-1)
            + Normal(mu[:, None], sd).log_prob(y).sum(-1))


outliers = bbvi.Model(outlier_log_joint, {"mu": bbvi.Latent(),
                                          "outlier": bbvi.Latent(shape=(8,), support=constraints.boolean)},
                      data=Y, name="outliers")

# The exact posterior, by enumeration: 2^8 = 256 outlier patterns; given a pattern, mu is conjugate Gaussian,
# and y has a multivariate normal marginal with covariance `diag(sd^2) + 10^2`.
patterns = torch.tensor([[(c >> i) & 1 for i in range(8)] for c in range(256)], dtype=F64)   # (256, 8)
sd = SD_IN + (SD_OUT - SD_IN) * patterns
log_w = (Bernoulli(probs=torch.tensor(P_OUT, dtype=F64)).log_prob(patterns).sum(-1)
         + MultivariateNormal(torch.zeros(8, dtype=F64), torch.diag_embed(sd ** 2) + SD_MU ** 2).log_prob(Y))
w = torch.softmax(log_w, 0)                                 # p(pattern | y)
precision = 1 / SD_MU ** 2 + (1 / sd ** 2).sum(-1)
post_mean = (Y / sd ** 2).sum(-1) / precision               # E[mu | pattern, y]
exact = {"p_outlier": w @ patterns, "mu_mean": w @ post_mean}
exact["mu_sd"] = (w @ (1 / precision + post_mean ** 2) - exact["mu_mean"] ** 2).sqrt()


def check_outliers(fit, label):
    """Print q against the exact posterior, and assert they agree."""
    draws = fit.sample(20000, seed=1)
    q_out = draws["outlier"].mean(0)                        # q(outlier[i] = 1), from draws of q
    err_p = (q_out - exact["p_outlier"]).abs().max().item()
    err_mu = ((draws["mu"].mean() - exact["mu_mean"]) / exact["mu_sd"]).item()
    sd_ratio = (draws["mu"].std() / exact["mu_sd"]).item()
    print(f"{label}: {fit.status} after {fit.num_steps} steps; {fit.plan}")
    print("  q(outlier = 1)    ", [round(v, 3) for v in q_out.tolist()])
    print("  p(outlier = 1 | y)", [round(v, 3) for v in exact["p_outlier"].tolist()])
    print(f"  max |q - p| {err_p:.4f}; mu: mean error {err_mu:+.3f} posterior sd, sd ratio {sd_ratio:.3f}")
    assert err_p < 0.02 and abs(err_mu) < 0.1 and abs(sd_ratio - 1) < 0.1, (label, err_p, err_mu, sd_ratio)


# `estimator="auto"` (the default): mu pathwise, the outlier flags by score-function terms with the
# leave-one-out baseline (each particle's signal is compared with the mean of the other particles', which
# removes most of the score function's variance without adding bias).
fit_auto = bbvi.fit(outliers, estimator="auto", seed=0, **QUICK_STEPS)
check_outliers(fit_auto, 'estimator="auto"')
assert fit_auto.plan.path == "reparam" and fit_auto.plan.has_discrete

# A note on the reliability warning such a fit may issue: PSIS k-hat judges q as a joint distribution. The
# posterior has a rare pattern that a mean-field q cannot follow (the point at 6.0 an inlier after all, about
# 1 in 5000, with mu pulled toward it), and such rare, badly-covered patterns make the importance weights
# heavy-tailed. The marginals above are right; k-hat says that q's joint tails are not to be trusted.

# `estimator="disarm"`: antithetic pairs of draws for boolean latents (DisARM, Dong, Mnih & Tucker 2020),
# usually lower variance than score + LOO at the same number of log-joint evaluations. Boolean latents only.
fit_disarm = bbvi.fit(outliers, estimator="disarm", seed=0, **QUICK_STEPS)
check_outliers(fit_disarm, 'estimator="disarm"')
assert fit_disarm.plan.whole.name == "disarm"

# ---- 2. An integer latent: a change point ---------------------------------------------------------------------
# An `integer_interval(lo, hi)` latent arrives as int64 values in lo..hi, shape `(S,)` here.
T = len(discrete.CP_Y)


def changepoint_log_joint(z, y):
    lam1, lam2, tau = z["lam1"], z["lam2"], z["tau"]        # (S,), (S,), (S,) int64 in 1..T-1
    t = torch.arange(len(y), device=y.device)
    rate = torch.where(t[None, :] < tau[:, None], lam1[:, None], lam2[:, None])    # (S, T)
    prior = Gamma(lam1.new_tensor(discrete.CP_A), lam1.new_tensor(discrete.CP_B))
    return (prior.log_prob(lam1) + prior.log_prob(lam2) + Poisson(rate).log_prob(y).sum(-1)
            - torch.log(torch.tensor(T - 1.0, dtype=lam1.dtype)))                # uniform prior on tau


changepoint = bbvi.Model(changepoint_log_joint,
                         {"lam1": bbvi.Latent(support=constraints.positive),
                          "lam2": bbvi.Latent(support=constraints.positive),
                          "tau": bbvi.Latent(support=constraints.integer_interval(1, T - 1))},
                         data=discrete.CP_Y, name="changepoint")

# The exact answer: p(tau | y) by integrating the rates out (Gamma-Poisson conjugacy) for every tau.
cp_exact = discrete.exact("changepoint")


def check_changepoint(fit, label, tolerance):
    draws = fit.sample(20000, seed=1)
    q_tau = torch.bincount(draws["tau"] - 1, minlength=T - 1).to(F64) / 20000      # q(tau = 1..T-1)
    tv = 0.5 * (q_tau - cp_exact["p_tau"]).abs().sum().item()                      # total variation distance
    top = torch.argsort(cp_exact["p_tau"], descending=True)[:4]
    print(f"{label}: {fit.status} after {fit.num_steps} steps, {fit.num_gradient_evals} log-joint evaluations")
    print("  tau:              ", [int(cp_exact["taus"][i]) for i in top])
    print("  q(tau)            ", [round(q_tau[i].item(), 3) for i in top])
    print("  p(tau | y)        ", [round(cp_exact["p_tau"][i].item(), 3) for i in top])
    print(f"  total variation {tv:.3f}; E[lam1] {draws['lam1'].mean():.3f} (exact {cp_exact['lam1_mean']:.3f}), "
          f"E[lam2] {draws['lam2'].mean():.3f} (exact {cp_exact['lam2_mean']:.3f})")
    assert tv < tolerance, (label, tv)
    for name in ("lam1", "lam2"):   # within 0.1 posterior sd (q's sd stands in for the posterior's)
        assert abs(draws[name].mean() - cp_exact[f"{name}_mean"]) < 0.1 * draws[name].std(), (label, name)


# `estimator="auto"`: lam1 and lam2 pathwise, tau by score terms with the LOO baseline. Quick mode runs a
# fixed 1000 steps (with a decaying step size) instead of the adaptive default (about 1500 steps here).
fit_cp = bbvi.fit(changepoint, **({"steps": 1000} if QUICK else {}))
check_changepoint(fit_cp, 'estimator="auto"', tolerance=0.06)

# Exact sums over tau's support: `bbvi.Auto(baseline="loo", sum_over=("tau",))` replaces tau's sampled score
# terms by the exact expectation over its 39 values, so tau adds no variance at all. It costs K log-joint
# evaluations per entry and particle (`fit.num_gradient_evals` counts them), so use it for latents with a
# small support, and few particles: 4 here, since only lam's noise is left to average.
fit_sum = bbvi.fit(changepoint, estimator=bbvi.Auto(baseline="loo", sum_over=("tau",)), num_particles=4,
                   **({"steps": 300} if QUICK else {}))
check_changepoint(fit_sum, 'Auto(baseline="loo", sum_over=("tau",))', tolerance=0.06)

# DisARM is for boolean latents only; tau has 39 values, and bbvi says so instead of guessing.
try:
    bbvi.fit(changepoint, estimator="disarm")
    raise AssertionError("disarm should refuse a categorical latent")
except bbvi.ConfigError as e:
    print("\nestimator='disarm' on the change point:", e)

# Not shown: `estimator="concrete"` (`bbvi.Concrete(...)`, the Concrete / Gumbel-softmax relaxation) replaces
# each discrete draw by a continuous one and differentiates through it. It is BIASED (it fits a relaxed model,
# not yours), so it is opt-in only: the fit says so in `fit.settings["bias"]` and in its summary, and it needs
# a log-joint that is arithmetic in the latents (not indexing or comparisons like `t < tau` above).
