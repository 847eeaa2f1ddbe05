"""Fits against posteriors known exactly: conjugate models through every estimator and baseline, Gaussian
optima of the full-rank, low-rank and mean-field families, discrete models by enumeration, a numpy log-joint.

The floor of the engine issue: mean within 0.1 posterior sd and sd within 12% in 3000 steps with 16
particles. Moments of q are read from 100,000 draws (MC error of the mean: 0.003 sd), so the tolerance is
the issue's, not the sampler's.
"""
import itertools

import numpy as np
import pytest
import torch
from torch.distributions import constraints

import bbvi
from models.conjugate import MODELS, normal_normal
from targets import mvn

CONFIGS = [("score", "loo"), ("score", "ema"), ("score", "cv"), ("reparam", "default"), ("stl", "default"),
           ("auto", "default")]


@pytest.mark.parametrize("model_name,estimator,baseline",
                         [(m, e, b) for m in MODELS for e, b in CONFIGS])
@pytest.mark.slow
def test_conjugate_posteriors(model_name, estimator, baseline):
    model, exact = MODELS[model_name]()
    fit = bbvi.fit(model, estimator=estimator, baseline=baseline, num_particles=16, steps=3000, lr=0.05,
                   seed=0, dtype=torch.float64, diagnose=False)
    assert fit.status == "completed" and fit.num_failed_steps == 0
    (name, (mean, sd)), = exact.items()
    draws = fit.sample(100_000, seed=1)[name]
    assert draws.shape == (100_000,)
    assert abs(draws.mean().item() - mean) < 0.1 * sd, (draws.mean().item(), mean, sd)
    assert abs(draws.std().item() / sd - 1) < 0.12, (draws.std().item(), sd)


@pytest.mark.slow
def test_normal_normal_is_recovered_exactly_by_the_baselined_score_path():
    """The posterior is Gaussian, so q can equal it; then f = log p - log q is constant and a baseline removes
    all noise: the fitted parameters are the exact posterior to optimisation accuracy."""
    model, exact = normal_normal()
    mean, sd = exact["mu"]
    for baseline in ["loo", "cv"]:
        fit = bbvi.fit(model, estimator="score", baseline=baseline, steps=3000, dtype=torch.float64, diagnose=False)
        assert abs(fit.unconstrained_mean().item() - mean) < 1e-3 * sd
        assert abs(fit.unconstrained_covariance().sqrt().item() / sd - 1) < 1e-3


TARGET_MEAN = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
TARGET_COV = torch.tensor([[1.0, 0.6, 0.0], [0.6, 0.5, 0.1], [0.0, 0.1, 2.0]], dtype=torch.float64)


def mvn_model(cov):
    return mvn(TARGET_MEAN, cov, name="mvn")


def test_fullrank_recovers_a_gaussian_mean_and_covariance():
    fit = bbvi.fit(mvn_model(TARGET_COV), family="fullrank", estimator="stl", steps=3000, dtype=torch.float64, diagnose=False)
    torch.testing.assert_close(fit.unconstrained_mean(), TARGET_MEAN, atol=0.02, rtol=0)
    torch.testing.assert_close(fit.unconstrained_covariance(), TARGET_COV, atol=0.03, rtol=0.03)


def test_meanfield_recovers_the_inverse_diagonal_of_the_precision():
    """KL(q||p) for diagonal q and Gaussian p is minimised at var_i = 1 / P_ii (not at Sigma_ii)."""
    fit = bbvi.fit(mvn_model(TARGET_COV), family="meanfield", estimator="stl", steps=3000, dtype=torch.float64, diagnose=False)
    var = fit.unconstrained_covariance().diagonal()
    expected = 1 / torch.linalg.inv(TARGET_COV).diagonal()
    torch.testing.assert_close(var, expected, rtol=0.03, atol=0)
    assert (var < TARGET_COV.diagonal() - 0.05)[:2].all(), "mean-field must under-state the correlated variances"


def test_lowrank_recovers_a_diagonal_plus_rank_one_covariance():
    v = torch.tensor([0.9, -0.7, 0.4], dtype=torch.float64)
    cov = torch.diag(torch.tensor([0.3, 0.2, 0.5], dtype=torch.float64)) + torch.outer(v, v)
    fit = bbvi.fit(mvn_model(cov), family=bbvi.LowRank(rank=1), estimator="stl", steps=3000,
                   dtype=torch.float64, diagnose=False)
    torch.testing.assert_close(fit.unconstrained_covariance(), cov, atol=0.03, rtol=0.03)


# ---- discrete latents, exact enumeration -----------------------------------------------------------------
A = torch.tensor([1.2, -0.7, 0.3], dtype=torch.float64)
B = torch.tensor([0.5, -1.0, 1.5], dtype=torch.float64)
COUPLING = -2.5


def discrete_log_joint(z, data):
    s, k = z["s"], z["k"]
    onehot = torch.nn.functional.one_hot(k, 3).to(s.dtype)
    return (s * A).sum(-1) + onehot @ B + COUPLING * s[:, 0] * s[:, 1]


def discrete_model():
    return bbvi.Model(discrete_log_joint, {"s": bbvi.Latent(shape=(3,), support=constraints.boolean),
                                           "k": bbvi.Latent(support=constraints.integer_interval(0, 2))},
                      name="discrete")


def enumerate_table():
    states = list(itertools.product([0, 1], [0, 1], [0, 1], [0, 1, 2]))
    s = torch.tensor([st[:3] for st in states], dtype=torch.float64)
    k = torch.tensor([st[3] for st in states])
    return s, k, discrete_log_joint({"s": s, "k": k}, None)


def cavi_optimum(iters=500):
    """The exact mean-field optimum (coordinate ascent on the enumerated table): q(s_i) ∝ exp E_{q_-i} log p."""
    p = torch.full((3,), 0.5, dtype=torch.float64)
    for _ in range(iters):
        p[0] = torch.sigmoid(A[0] + COUPLING * p[1])
        p[1] = torch.sigmoid(A[1] + COUPLING * p[0])
        p[2] = torch.sigmoid(A[2])
    return p, torch.softmax(B, 0)


def test_discrete_model_reaches_the_exact_meanfield_optimum():
    """Score path only (no continuous latents). The tolerance 0.02 is about 4x the spread of the fitted
    probabilities over seeds seen when this test was written."""
    s_exact, k_exact = cavi_optimum()
    for seed in range(2):
        fit = bbvi.fit(discrete_model(), estimator="score", baseline="loo", steps=3000, seed=seed,
                       dtype=torch.float64, diagnose=False)
        probs = fit.discrete.probs(fit.params["discrete"])
        torch.testing.assert_close(probs["s"][:, 1], s_exact, atol=0.02, rtol=0)
        torch.testing.assert_close(probs["k"], k_exact, atol=0.02, rtol=0)
    draws = fit.sample(1000)
    assert draws["s"].shape == (1000, 3) and draws["k"].shape == (1000,) and draws["k"].dtype == torch.int64
    assert set(draws["s"].unique().tolist()) <= {0.0, 1.0} and set(draws["k"].unique().tolist()) <= {0, 1, 2}


def test_the_exact_posterior_differs_from_the_meanfield_optimum_here():
    """Guard on the test above: the coupling makes the mean-field optimum differ from the true marginals by
    more than twice that test's tolerance, so the fit is checked against the right answer."""
    s, k, lp = enumerate_table()
    post = torch.softmax(lp, 0)
    true_marginals = (post[:, None] * s).sum(0)
    assert (true_marginals - cavi_optimum()[0]).abs().max() > 2 * 0.02


def test_mixed_model_auto_uses_pathwise_and_score_together():
    """mu ~ N(2, 0.5^2) and s ~ Bernoulli(sigmoid(1.3)) independent: mean-field is exact."""
    def log_joint(z, data):
        return torch.distributions.Normal(2.0, 0.5).log_prob(z["mu"]) + 1.3 * z["s"]
    model = bbvi.Model(log_joint, {"mu": bbvi.Latent(), "s": bbvi.Latent(support=constraints.boolean)})
    fit = bbvi.fit(model, estimator="auto", steps=3000, dtype=torch.float64, diagnose=False)
    assert fit.plan.path == "reparam" and fit.plan.has_discrete
    assert abs(fit.unconstrained_mean().item() - 2.0) < 0.02
    assert abs(fit.unconstrained_covariance().sqrt().item() - 0.5) < 0.02
    p = fit.discrete.probs(fit.params["discrete"])["s"][1].item()
    assert abs(p - torch.sigmoid(torch.tensor(1.3)).item()) < 0.02
    with pytest.raises(bbvi.ConfigError, match="discrete"):
        bbvi.fit(model, estimator="reparam", steps=1)


def numpy_log_joint(z, x):
    """Normal-Normal in numpy: torch cannot differentiate this."""
    mu = z["mu"].detach().cpu().numpy()
    xs = x.numpy()
    lp = -0.5 * (mu / 10.0) ** 2 - 0.5 * ((xs[None, :] - mu[:, None]) ** 2).sum(-1)
    return torch.from_numpy(np.asarray(lp))


def test_numpy_log_joint_is_fitted_by_the_score_path():
    model, exact = normal_normal()
    npmodel = bbvi.Model(numpy_log_joint, {"mu": bbvi.Latent()}, data=model.data, name="numpy_normal")
    fit = bbvi.fit(npmodel, estimator="auto", steps=3000, dtype=torch.float64, diagnose=False)
    assert fit.plan.path == "score"
    mean, sd = exact["mu"]
    draws = fit.sample(100_000)["mu"]
    assert abs(draws.mean().item() - mean) < 0.1 * sd and abs(draws.std().item() / sd - 1) < 0.12
    with pytest.raises(bbvi.ConfigError, match="cannot differentiate"):
        bbvi.fit(npmodel, estimator="reparam", steps=1)
    with pytest.raises(bbvi.ConfigError, match="cannot differentiate"):
        bbvi.fit(npmodel, estimator="stl", steps=1)
