"""Small models the tests use again and again. Each call builds a fresh bbvi.Model. A model's name goes into files,
messages and cache names, so each target takes the name its test used; a target replaces a private copy only where
the log-joint, the data and the name are the same (its log density is the same bit for bit)."""
import torch
from torch.distributions import Bernoulli, MultivariateNormal, Normal

import bbvi

F64 = torch.float64


def std_normal(shape=(), latent="x", name="std_normal"):
    """One latent of any shape, N(0, I)."""
    def log_joint(z, data):
        return Normal(0.0, 1.0).log_prob(z[latent]).reshape(z[latent].shape[0], -1).sum(-1)
    return bbvi.Model(log_joint, {latent: bbvi.Latent(shape=shape)}, name=name)


def std2():
    """x ~ N(0, I_2), one latent of shape (2,), named 'std2'."""
    return std_normal((2,), name="std2")


def mvn(mean, cov, name="mvn", latent="x"):
    """One latent of shape (D,), N(mean, cov): a correlated Gaussian whose moments are known exactly."""
    target = MultivariateNormal(mean, cov)
    return bbvi.Model(lambda z, d: target.log_prob(z[latent]), {latent: bbvi.Latent(shape=tuple(mean.shape))},
                      name=name)


def two_latents(order=("a", "b"), name="ab", data=None):
    """a ~ N(shift, 1), b ~ N(-3, 1) (shift 3 in the data), latents declared in `order`."""
    def log_joint(z, data):
        return Normal(0.0, 1.0).log_prob(z["a"] - data["shift"]) + Normal(0.0, 1.0).log_prob(z["b"] + 3.0)
    return bbvi.Model(log_joint, latents={k: bbvi.Latent(()) for k in order},
                      data=data or {"shift": torch.tensor(3.0)}, name=name)


def logreg_data(n, seed=0):
    """n rows of 3 standard-normal covariates X and Bernoulli outcomes y, coefficients (1, -0.5, 0.25)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=F64)
    y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.0, -0.5, 0.25], dtype=F64)), generator=g)
    return {"X": X, "y": y}


def logreg_terms(z, d):
    """The logistic regression's log-joint as factor terms: the prior, and one term per row of the plate 'obs'."""
    w = z["w"]
    return {"prior": Normal(0.0, 1.0).log_prob(w).sum(-1),
            "obs": Bernoulli(logits=w @ d["X"].T).log_prob(d["y"])}      # (S, N): one term per row


def logreg(n, seed=0):
    """Logistic regression w ~ N(0, I_3) on logreg_data(n, seed), its rows the plate 'obs', named 'logreg'."""
    return bbvi.Model(logreg_terms, {"w": bbvi.Latent(shape=(3,))}, data=logreg_data(n, seed),
                      plates={"obs": ("X", "y")}, name="logreg")
