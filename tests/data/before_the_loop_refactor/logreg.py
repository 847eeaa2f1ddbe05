"""The logistic regression the files beside this one were written with, kept here as it was (a checkpoint names its
model by the log-joint's code and data: a copy that changes elsewhere must not change these)."""
import torch
from torch.distributions import Bernoulli, Normal

import bbvi

F64 = torch.float64


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=F64)
    y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.0, -0.5, 0.25], dtype=F64)), generator=g)
    return {"X": X, "y": y}


def terms(z, d):
    w = z["w"]
    return {"prior": Normal(0.0, 1.0).log_prob(w).sum(-1),
            "obs": Bernoulli(logits=w @ d["X"].T).log_prob(d["y"])}      # (S, N): one term per row


def total(z, d):
    return sum(v.reshape(v.shape[0], -1).sum(-1) for v in terms(z, d).values())


def model(log_joint, plates=False):
    return bbvi.Model(log_joint, {"w": bbvi.Latent(shape=(3,))}, data=data(300),
                      plates={"obs": ("X", "y")} if plates else None, name="logreg")
