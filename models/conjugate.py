"""Conjugate models with analytic posteriors (Normal-Normal, Gamma-Poisson, Beta-Bernoulli): the engine's tests
and the per-converged-fit benchmark compare fits with their exact posteriors."""
import math

import torch
from torch.distributions import Bernoulli, Beta, Gamma, Normal, Poisson, constraints

import bbvi

_G = torch.Generator().manual_seed(20261124)
NORMAL_X = (1.5 + torch.randn(20, generator=_G, dtype=torch.float64))
POISSON_X = torch.tensor([3., 1., 4., 1., 5., 2., 2., 6., 5., 3.], dtype=torch.float64)
BERNOULLI_X = torch.tensor([1.] * 14 + [0.] * 6, dtype=torch.float64)


def normal_normal():
    """mu ~ N(0, 10^2), x_i ~ N(mu, 1), i = 1..20. Posterior N(sum x / (N + 1/100), 1/(N + 1/100))."""
    def log_joint(z, x):
        mu = z["mu"]
        return Normal(0.0, 10.0).log_prob(mu) + Normal(mu[:, None], 1.0).log_prob(x).sum(-1)
    prec = len(NORMAL_X) + 1 / 100
    exact = {"mu": (NORMAL_X.sum().item() / prec, prec ** -0.5)}
    return bbvi.Model(log_joint, {"mu": bbvi.Latent()}, data=NORMAL_X, name="normal_normal"), exact


def gamma_poisson():
    """lam ~ Gamma(2, 1), x_i ~ Poisson(lam), i = 1..10. Posterior Gamma(2 + sum x, 1 + N)."""
    def log_joint(z, x):
        lam = z["lam"]
        return Gamma(lam.new_tensor(2.0), lam.new_tensor(1.0)).log_prob(lam) + Poisson(lam[:, None]).log_prob(x).sum(-1)
    a, b = 2 + POISSON_X.sum().item(), 1 + len(POISSON_X)
    exact = {"lam": (a / b, math.sqrt(a) / b)}
    model = bbvi.Model(log_joint, {"lam": bbvi.Latent(support=constraints.positive)}, data=POISSON_X,
                       name="gamma_poisson")
    return model, exact


def beta_bernoulli():
    """p ~ Beta(1, 1), x_i ~ Bernoulli(p), 14 ones in 20. Posterior Beta(15, 7)."""
    def log_joint(z, x):
        p = z["p"]
        return Beta(1.0, 1.0).log_prob(p) + Bernoulli(probs=p[:, None]).log_prob(x).sum(-1)
    a, b = 1 + BERNOULLI_X.sum().item(), 1 + (1 - BERNOULLI_X).sum().item()
    exact = {"p": (a / (a + b), math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1))))}
    model = bbvi.Model(log_joint, {"p": bbvi.Latent(support=constraints.unit_interval)}, data=BERNOULLI_X,
                       name="beta_bernoulli")
    return model, exact


MODELS = {"normal_normal": normal_normal, "gamma_poisson": gamma_poisson, "beta_bernoulli": beta_bernoulli}
