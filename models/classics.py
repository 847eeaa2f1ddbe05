"""Classic models on simulated data (fixed seeds): Bayesian logistic regression, a radon-style hierarchical
regression with varying intercepts, and a Poisson GLM. Checked against bbvi.nuts in the experiments."""
import torch
import torch.nn.functional as F
from torch.distributions import HalfNormal, Normal, Poisson, constraints

import bbvi

__all__ = ["logistic", "radon", "poisson_glm", "MODELS"]

_G = torch.Generator().manual_seed(2026)


def _simulate_logistic(N=200, D=5):
    X = torch.randn(N, D, generator=_G, dtype=torch.float64)
    w = torch.tensor([1.0, -0.5, 0.25, 0.0, 2.0], dtype=torch.float64)[:D]
    y = torch.bernoulli(torch.sigmoid(X @ w - 0.3), generator=_G)
    return {"X": X, "y": y}


def _logistic_log_joint(z, data):
    """w ~ N(0, 2^2 I), b ~ N(0, 5^2), y_n ~ Bernoulli(sigmoid(x_n . w + b))."""
    w, b = z["w"], z["b"]
    logits = w @ data["X"].T + b[:, None]
    return (Normal(0.0, 2.0).log_prob(w).sum(-1) + Normal(0.0, 5.0).log_prob(b)
            + (data["y"] * logits - F.softplus(logits)).sum(-1))


logistic = bbvi.Model(_logistic_log_joint, {"w": bbvi.Latent(shape=(5,)), "b": bbvi.Latent()},
                      data=_simulate_logistic(), name="logistic_regression")


def _simulate_radon(J=10, per=12):
    county = torch.arange(J).repeat_interleave(per)
    floor = torch.bernoulli(torch.full((J * per,), 0.4, dtype=torch.float64), generator=_G)
    a = 1.5 + 0.4 * torch.randn(J, generator=_G, dtype=torch.float64)
    y = a[county] - 0.6 * floor + 0.7 * torch.randn(J * per, generator=_G, dtype=torch.float64)
    return {"county": county, "floor": floor, "y": y}


def _radon_log_joint(z, data):
    """Varying intercepts (noncentered): a_j = mu_a + sigma_a * a_raw_j, a_raw ~ N(0, 1), mu_a ~ N(0, 10),
    sigma_a ~ half-N(0, 1), beta ~ N(0, 10), sigma_y ~ half-N(0, 1); y_i ~ N(a_county[i] + beta floor_i, sigma_y)."""
    a = z["mu_a"][:, None] + z["sigma_a"][:, None] * z["a_raw"]
    mean = a[:, data["county"]] + z["beta"][:, None] * data["floor"]
    return (Normal(0.0, 1.0).log_prob(z["a_raw"]).sum(-1) + Normal(0.0, 10.0).log_prob(z["mu_a"])
            + HalfNormal(1.0).log_prob(z["sigma_a"]) + Normal(0.0, 10.0).log_prob(z["beta"])
            + HalfNormal(1.0).log_prob(z["sigma_y"]) + Normal(mean, z["sigma_y"][:, None]).log_prob(data["y"]).sum(-1))


radon = bbvi.Model(_radon_log_joint, {"a_raw": bbvi.Latent(shape=(10,)), "mu_a": bbvi.Latent(),
                                      "sigma_a": bbvi.Latent(support=constraints.positive), "beta": bbvi.Latent(),
                                      "sigma_y": bbvi.Latent(support=constraints.positive)},
                   data=_simulate_radon(), name="radon_hierarchical",
                   derived=lambda z, d: {"a": z["mu_a"][:, None] + z["sigma_a"][:, None] * z["a_raw"]})


def _simulate_poisson(N=150):
    x = torch.randn(N, 2, generator=_G, dtype=torch.float64)
    y = torch.poisson(torch.exp(0.5 + x @ torch.tensor([0.3, -0.6], dtype=torch.float64)), generator=_G)
    return {"x": x, "y": y}


def _poisson_log_joint(z, data):
    """beta ~ N(0, 1), b0 ~ N(0, 2^2), y_n ~ Poisson(exp(b0 + x_n . beta))."""
    eta = z["b0"][:, None] + z["beta"] @ data["x"].T
    return (Normal(0.0, 1.0).log_prob(z["beta"]).sum(-1) + Normal(0.0, 2.0).log_prob(z["b0"])
            + Poisson(torch.exp(eta)).log_prob(data["y"]).sum(-1))


poisson_glm = bbvi.Model(_poisson_log_joint, {"beta": bbvi.Latent(shape=(2,)), "b0": bbvi.Latent()},
                         data=_simulate_poisson(), name="poisson_glm")

MODELS = {"logistic": logistic, "radon": radon, "poisson_glm": poisson_glm}
