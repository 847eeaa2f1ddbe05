"""bbvi.nuts on models with discrete latents (issue 36, item 5): the bounded discrete latents are summed out of
NUTS's potential and drawn per draw from their exact conditional; with no continuous latent, the exact posterior
by enumeration. Each answer is checked against an exact one, to Monte Carlo tolerances from ArviZ's ESS."""
import math
import warnings

import arviz as az
import numpy as np
import pytest
import torch
from torch.distributions import Normal, Poisson, constraints

import bbvi
from bbvi import reference
from bbvi.enumeration import MAX_JOINT
from models import discrete

warnings.filterwarnings("ignore", category=FutureWarning)

SHORT = dict(num_draws=300, num_warmup=300, num_chains=2, seed=0)


def no_sampling(*args, **kwargs):
    raise AssertionError("bbvi.nuts ran NUTS, where it should not have")


def assert_probability(draws, p, label):
    """The frequency of the indicator `draws` (chains, draws) of 0/1 within 4 Monte Carlo standard errors of p
    (ESS from ArviZ; for an indicator that never changes, the number of draws), plus half a draw's weight."""
    n = draws.size
    ess = float(az.ess(draws.astype(float))) if draws.std() > 0 else n
    tol = 4 * math.sqrt(p * (1 - p) / ess) + 0.5 / n
    assert abs(draws.mean() - p) < tol, (label, draws.mean(), p, tol, ess)


def assert_mean(draws, mean, label):
    """The mean of draws (chains, draws) within 4 Monte Carlo standard errors (ArviZ) of the exact mean."""
    mcse = float(az.mcse(draws))
    assert abs(draws.mean() - mean) < 4 * mcse, (label, draws.mean(), mean, mcse)


def test_changepoint_tau_and_rates_match_the_exact_posterior(tmp_path, monkeypatch):
    """40 counts, tau uniform on 1..39 summed out (39 joint values): P(tau = t) for every t and the rates' means
    against Gamma-Poisson conjugacy. Measured: total variation 0.030 between the draws' P(tau) and the exact one;
    lam1 3.13 (exact 3.18), lam2 0.84 (0.84); 5,217 potential evaluations of 39 rows, 10-18 s for both chains on
    two busy cores (200 warm-up iterations: total variation 0.050)."""
    ref = bbvi.nuts(discrete.changepoint, cache_dir=str(tmp_path), **SHORT)
    exact = discrete.exact("changepoint")
    post = ref.posterior
    tau = post["tau"].values
    assert tau.shape == (2, 300) and tau.dtype == np.int64 and tau.min() >= 1 and tau.max() <= 39
    for t, p in zip(exact["taus"].tolist(), exact["p_tau"].tolist()):
        assert_probability(tau == t, p, f"tau={t}")
    q = np.bincount(tau.ravel(), minlength=40)[1:] / tau.size
    assert 0.5 * np.abs(q - exact["p_tau"].numpy()).sum() < 0.06
    assert_mean(post["lam1"].values, float(exact["lam1_mean"]), "lam1")
    assert_mean(post["lam2"].values, float(exact["lam2_mean"]), "lam2")
    assert post.attrs["discrete"].startswith("enumerated: tau (39 values") and post.attrs["discrete_joint_values"] == 39
    assert "diverging" in ref.sample_stats and post.attrs["num_gradient_evals"] > 0
    # cached, and read back (tau int64) without sampling again
    monkeypatch.setattr(reference, "_run_chains", no_sampling)
    again = bbvi.nuts(discrete.changepoint, cache_dir=str(tmp_path), **SHORT)
    np.testing.assert_array_equal(again.posterior["tau"].values, tau)


MIX_Y = torch.tensor([-0.4, 0.3, 2.6, 3.4, 0.1, 2.9], dtype=torch.float64)
MIX_PRIOR_SD = 3.0


def _mixture_log_joint(z, y):
    """y[n] ~ N(mu z[n], 1), z[n] ~ Bernoulli(1/2) (booleans), mu ~ N(0, 3^2)."""
    mu, on = z["mu"], z["z"]                               # (S,), (S, N) of 0./1.
    return (Normal(0.0, MIX_PRIOR_SD).log_prob(mu) + Normal(mu[:, None] * on, 1.0).log_prob(y).sum(-1)
            + len(y) * math.log(0.5))


def _mixture_exact():
    """All 2^6 assignments; given one, mu is conjugate Gaussian, and log p(y, z) = log p(y, z, mu) - log p(mu | y, z)
    at any mu (its posterior mean here)."""
    y = MIX_Y
    zs = torch.tensor(list(np.ndindex(*(2,) * len(y))), dtype=torch.float64)     # (64, 6)
    prec = 1 / MIX_PRIOR_SD ** 2 + zs.sum(1)
    mean = (zs * y).sum(1) / prec
    log_w = _mixture_log_joint({"mu": mean, "z": zs}, y) - Normal(mean, prec.rsqrt()).log_prob(mean)
    w = torch.softmax(log_w, 0)
    mu_mean = (w * mean).sum()
    mu_sd = ((w * (1 / prec + mean ** 2)).sum() - mu_mean ** 2).sqrt()
    return {"p_z": (w[:, None] * zs).sum(0), "mu_mean": float(mu_mean), "mu_sd": float(mu_sd)}


def test_a_mixture_with_boolean_assignments_matches_the_exact_posterior():
    """Six points, the assignments a boolean latent of shape (6,) (64 joint values summed out). Measured: P(z[n])
    within 0.013 of the exact one, mu's mean 0.034 off (0.05 sd), its sd 0.99 of the exact; 3,305 potential
    evaluations, about 6 s."""
    model = bbvi.Model(_mixture_log_joint, {"mu": bbvi.Latent(()),
                                            "z": bbvi.Latent(shape=(6,), support=constraints.boolean)},
                       data=MIX_Y, name="boolean_mixture")
    ref = bbvi.nuts(model, use_cache=False, **SHORT)
    exact = _mixture_exact()
    z = ref.posterior["z"].values
    assert z.shape == (2, 300, 6) and set(np.unique(z)) <= {0.0, 1.0}
    for n in range(6):
        assert_probability(z[..., n], float(exact["p_z"][n]), f"z[{n}]")
    mu = ref.posterior["mu"].values
    assert_mean(mu, exact["mu_mean"], "mu")
    assert abs(mu.std() / exact["mu_sd"] - 1) < 0.1
    assert "z (2 values per element, 6 elements: 2^6): 64 joint values" in ref.posterior.attrs["discrete"]


def test_with_no_continuous_latent_the_exact_posterior_is_drawn_without_nuts(monkeypatch):
    """A change point with known rates: tau alone, its posterior by enumeration; independent draws, no NUTS."""
    y = discrete.CP_Y

    def log_joint(z, y):
        t = torch.arange(len(y))
        rate = torch.where(t[None, :] < z["tau"][:, None], 3.0, 1.0).to(y)
        return Poisson(rate).log_prob(y).sum(-1)
    model = bbvi.Model(log_joint, {"tau": bbvi.Latent(support=constraints.integer_interval(1, len(y) - 1))},
                       data=y, name="tau_only")
    monkeypatch.setattr(reference, "_run_chains", no_sampling)
    ref = bbvi.nuts(model, use_cache=False, num_draws=2000, num_chains=2, seed=0)
    log_p = torch.stack([Poisson(torch.where(torch.arange(len(y)) < t, 3.0, 1.0).double()).log_prob(y).sum()
                         for t in range(1, len(y))])
    p = torch.softmax(log_p, 0).tolist()
    tau = ref.posterior["tau"].values
    for t, pt in zip(range(1, len(y)), p):   # independent draws: the ESS is the number of draws
        assert abs((tau == t).mean() - pt) < 4 * math.sqrt(pt * (1 - pt) / tau.size) + 0.5 / tau.size, t
    assert ref.posterior.attrs["discrete"].startswith("exact: the posterior of tau by enumeration of its 39")
    assert ref.posterior.attrs["num_gradient_evals"] == 0 and list(ref.sample_stats.data_vars) == ["lp"]


def test_a_joint_support_beyond_the_limit_is_refused_naming_each_latent():
    """latent_features: 6 x 3 booleans, 2^18 joint values; two integers of 200 values each, 40,000."""
    with pytest.raises(bbvi.ModelError, match=r"s \(2 values per element, 18 elements: 2\^18\): 2\.62e\+05 "
                                              rf"joint values, more than the {MAX_JOINT}"):
        bbvi.nuts(discrete.latent_features, use_cache=False)
    two = bbvi.Model(lambda z, d: z["a"] * 0.0 + z["b"] * 0.0 + z["x"],
                     {"x": bbvi.Latent(()), "a": bbvi.Latent(support=constraints.integer_interval(0, 199)),
                      "b": bbvi.Latent(support=constraints.integer_interval(1, 200))})
    with pytest.raises(bbvi.ModelError, match=r"a \(200 values\), b \(200 values\): 4e\+04 joint values"):
        bbvi.nuts(two, use_cache=False)
