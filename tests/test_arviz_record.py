"""fit.to_arviz() as a complete ArviZ record: posterior in the fit's dtype, sample_stats with the importance log
weights, pointwise log_likelihood from a factor-dict log-joint (az.loo runs and agrees with the exact posterior's),
a posterior predictive reproducible by seed, observed data, dims and coords the user names, az.summary without a
warning, and all of it through netCDF."""
import logging
import warnings

import arviz as az
import numpy as np
import pytest
import torch
from torch.distributions import Normal

import bbvi
from targets import std_normal

F64 = torch.float64
G = torch.Generator().manual_seed(0)
N, SIGMA, PRIOR_SD = 30, 0.7, 2.0
X = torch.cat([torch.ones(N, 1, dtype=F64), torch.randn(N, 1, generator=G, dtype=F64)], 1)
Y = X @ torch.tensor([0.5, -1.2], dtype=F64) + SIGMA * torch.randn(N, generator=G, dtype=F64)


def _log_joint(z, d):
    beta = z["beta"]                                               # (S, 2)
    return {"prior": Normal(0.0, PRIOR_SD).log_prob(beta).sum(-1),
            "obs": Normal(beta @ d["X"].T, SIGMA).log_prob(d["y"])}   # (S, N): one term per observation


def _predict(z, d, generator):
    mean = z["beta"] @ d["X"].T
    return {"y": mean + SIGMA * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)}


MODEL = bbvi.Model(_log_joint, {"beta": bbvi.Latent(shape=(2,))}, data={"X": X, "y": Y}, predict=_predict,
                   name="linreg")


def _exact_draws(num, seed):
    """Draws from the conjugate Gaussian posterior of beta."""
    prec = X.T @ X / SIGMA ** 2 + torch.eye(2, dtype=F64) / PRIOR_SD ** 2
    cov = torch.linalg.inv(prec)
    mean = cov @ X.T @ Y / SIGMA ** 2
    eps = torch.randn(num, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return mean + eps @ torch.linalg.cholesky(cov).T


@pytest.fixture(scope="module")
def fit():
    return bbvi.fit(MODEL, family="fullrank", estimator="reparam", steps=1500, seed=0, diagnose=False)


def test_the_record_has_every_group_and_az_loo_agrees_with_the_exact_posterior(fit):
    idata = fit.to_arviz(num_draws=4000, seed=0)
    assert {"posterior", "sample_stats", "log_likelihood", "posterior_predictive", "observed_data"} <= set(idata.groups())
    assert idata.posterior["beta"].dtype == np.float64 and idata.posterior["beta"].shape == (4, 1000, 2)
    assert idata.log_likelihood["obs"].shape == (4, 1000, N)
    np.testing.assert_array_equal(idata.observed_data["y"].values, Y.numpy())
    draws = fit.sample(4000, seed=0)["beta"].numpy()
    np.testing.assert_array_equal(idata.posterior["beta"].values.reshape(4000, 2), draws)
    np.testing.assert_allclose(idata.sample_stats["log_weight"].values.reshape(-1),
                               fit.log_weights(4000, seed=0).numpy(), rtol=0, atol=0)
    loo = az.loo(idata)
    beta = _exact_draws(4000, seed=1)
    exact = az.from_dict(posterior={"beta": beta.numpy().reshape(4, 1000, 2)},
                         log_likelihood={"obs": Normal(beta @ X.T, SIGMA).log_prob(Y).numpy().reshape(4, 1000, N)})
    ref = az.loo(exact)
    assert abs(loo.elpd_loo - ref.elpd_loo) < ref.se, (loo.elpd_loo, ref.elpd_loo, ref.se)
    assert abs(loo.elpd_loo - ref.elpd_loo) < 0.5   # measured: -36.78 vs -36.68 (se 6.6), p_loo 2.50 vs 2.39


def test_az_summary_runs_without_a_warning(fit, caplog):
    idata = fit.to_arviz(num_draws=1000, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.WARNING):
            table = az.summary(idata)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert np.isfinite(table["r_hat"]).all()


def test_predictive_is_reproducible_and_dims_are_named(fit, tmp_path):
    a = fit.to_arviz(num_draws=200, seed=3, dims={"beta": ["coef"]}, coords={"coef": ["intercept", "slope"]})
    b = fit.to_arviz(num_draws=200, seed=3)
    c = fit.to_arviz(num_draws=200, seed=4)
    np.testing.assert_array_equal(a.posterior_predictive["y"].values, b.posterior_predictive["y"].values)
    assert not np.array_equal(a.posterior_predictive["y"].values, c.posterior_predictive["y"].values)
    assert list(a.posterior["beta"].coords["coef"].values) == ["intercept", "slope"]
    path = str(tmp_path / "fit.nc")
    a.to_netcdf(path)
    back = az.from_netcdf(path)
    for group in ("posterior", "sample_stats", "log_likelihood", "posterior_predictive", "observed_data"):
        for name, v in getattr(a, group).data_vars.items():
            np.testing.assert_array_equal(getattr(back, group)[name].values, v.values)


def test_the_record_refuses_what_it_cannot_build(fit):
    with pytest.raises(bbvi.ConfigError, match="returns \\['prior', 'obs'\\]"):
        fit.to_arviz(100, log_likelihood="lik")
    plain = std_normal(latent="w", name="plain")
    pfit = bbvi.fit(plain, steps=5, diagnose=False)
    assert "log_likelihood" not in pfit.to_arviz(100).groups()
    with pytest.raises(bbvi.ConfigError, match="factor terms"):
        pfit.to_arviz(100, log_likelihood="obs")
    with pytest.raises(bbvi.ConfigError, match="one simulated data set per draw"):
        fit.to_arviz(100, predict=lambda z, d, g: {"y": torch.zeros(3)})
    with pytest.raises(bbvi.ConfigError, match="must divide"):
        fit.to_arviz(100, num_chains=3)
    with pytest.raises(bbvi.ConfigError, match="observed_data names"):
        fit.to_arviz(100, observed_data=["z"])


def test_summary_takes_var_names(fit):
    text = fit.summary(num_draws=200, var_names="beta")
    assert "beta[0]" in text and "beta[1]" in text
    with pytest.raises(bbvi.ConfigError, match="has \\['beta'\\]"):
        fit.summary(num_draws=200, var_names=["tau"])


def test_pointwise_log_likelihoods_too_big_for_memory_are_refused_up_front(fit, monkeypatch):
    """Reliability III, 10: to_arviz on a 300,000-row plate ran 146 s and then failed with a raw allocation error
    (4000 draws x N pointwise terms in float64, 9.6 GB). The size is now checked before any is computed; here the
    machine is made to look small (1 MiB): 4000 x 30 terms x 8 bytes x 3 copies = 2.7 MiB."""
    import bbvi.families
    monkeypatch.setattr(bbvi.families, "_memory_bytes", lambda device: 2 ** 20)
    with pytest.raises(bbvi.ConfigError, match=r"4000 draws x 30 terms.*log_likelihood=False, or num_draws of at "
                                               r"most 1456"):
        fit.to_arviz()
    assert "log_likelihood" not in fit.to_arviz(log_likelihood=False).groups()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::bbvi.errors.ReliabilityWarning")   # eight schools' importance resampling is borderline (k-hat about 0.86); the test checks az.loo on the draws
def test_loo_on_importance_resampled_draws():
    """A Pyro user's daily work, 3: az.loo on q's draws of eight schools gave 6 of 8 Pareto k above 0.7 (NUTS's draws
    none): the k's come from q being narrower than the posterior. to_arviz(importance_resample=True) exports the
    PSIS-resampled draws, says so in the posterior's attrs, and LOO on them has no k above 0.7 (seen: 0 of 8)."""
    from models import eight_schools
    fit = bbvi.fit(eight_schools.model_factors, seed=0)
    plain = az.loo(fit.to_arviz(), pointwise=True)
    idata = fit.to_arviz(importance_resample=True)
    resampled = az.loo(idata, pointwise=True)
    assert int((plain.pareto_k > 0.7).sum()) >= 4 and int((resampled.pareto_k > 0.7).sum()) == 0
    assert idata.posterior.attrs["draws"].startswith("draws of q importance-resampled")
    assert "k-hat" in idata.posterior.attrs["draws"]
    with pytest.raises(bbvi.ConfigError, match="importance_resample must be True or False"):
        fit.to_arviz(importance_resample="yes")


def _exact_loo_pointwise():
    """log p(y_i | y_-i) of the conjugate regression: N(x_i' m_-i, SIGMA^2 + x_i' S_-i x_i), S_-i and m_-i the
    posterior covariance and mean without row i."""
    out = []
    for i in range(N):
        keep = torch.arange(N) != i
        cov = torch.linalg.inv(X[keep].T @ X[keep] / SIGMA ** 2 + torch.eye(2, dtype=F64) / PRIOR_SD ** 2)
        mean = cov @ X[keep].T @ Y[keep] / SIGMA ** 2
        out.append(Normal(X[i] @ mean, (SIGMA ** 2 + X[i] @ cov @ X[i]).sqrt()).log_prob(Y[i]))
    return torch.stack(out).numpy()


def test_importance_resampled_loo_matches_the_exact_leave_one_out(fit):
    """A Pyro user's daily work, 3: az.loo on to_arviz(importance_resample=True) against the exact leave-one-out
    predictive densities of the conjugate regression (-36.74): within 0.25, 4 times the Monte Carlo sd of the
    estimate over export seeds (measured: seed 0 off by -0.034; seeds 0-4 by -0.13 to 0.04, sd 0.063), each
    observation's term within 0.08 (measured: at most 0.019 at seed 0, 0.043 over seeds 0-4). experiments/loo_vs_nuts.py measures the same against NUTS on eight schools and
    a logistic regression."""
    exact = _exact_loo_pointwise()
    loo = az.loo(fit.to_arviz(num_draws=4000, seed=0, importance_resample=True), pointwise=True)
    assert abs(loo.elpd_loo - exact.sum()) < 0.25, (loo.elpd_loo, exact.sum())
    np.testing.assert_allclose(loo.loo_i.values, exact, rtol=0, atol=0.08)
