"""Per-step time of bbvi.from_pyro against the same model written by hand as a bbvi log-joint.

Two models in the idioms a Pyro user writes: a logistic regression (N=500, D=30) with `X @ beta + b`, and
varying intercepts (radon-like: 85 groups, N=919) with `alpha[county]`. Each is fitted by SGD (bbvi.init /
bbvi.step: MeanField, 16 particles, the pathwise gradient) for `--steps` steps after 5 warm-up steps; the
fastest of `--repeats` timed blocks (the models' blocks interleaved) is reported, in ms per step, with how
from_pyro ran the model (vectorized or one particle at a time). A third column times from_pyro without its
recorded graph (bbvi.replay: the vmapped Pyro run on every call, as before the graph): the same fit, bit for bit.
Run from the repository root with bbvi on the path:
PYTHONPATH=. python experiments/pyro_overhead.py [--steps 50] [--repeats 5]
"""
import argparse
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import Bernoulli, HalfNormal, Normal, constraints

import bbvi

g = torch.Generator().manual_seed(0)
N, D = 500, 30
X = torch.randn(N, D, generator=g)
Y = torch.bernoulli(torch.sigmoid(X @ torch.randn(D, generator=g)), generator=g)


def logistic(X, y):
    beta = pyro.sample("beta", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 5.0))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=X @ beta + b), obs=y)


def logistic_by_hand(z, d):
    return {"prior": Normal(0.0, 1.0).log_prob(z["beta"]).sum(-1) + Normal(0.0, 5.0).log_prob(z["b"]),
            "y": Bernoulli(logits=z["beta"] @ d["X"].T + z["b"][:, None]).log_prob(d["y"])}


J, M = 85, 919
COUNTY = torch.randint(0, J, (M,), generator=g)
XF = torch.randint(0, 2, (M,), generator=g).float()
YR = 1.5 + 0.5 * torch.randn(J, generator=g)[COUNTY] - 0.7 * XF + 0.8 * torch.randn(M, generator=g)


def radon(county, x, y):
    mu_a = pyro.sample("mu_a", dist.Normal(0.0, 10.0))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(5.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 10.0))
    sigma_y = pyro.sample("sigma_y", dist.HalfNormal(5.0))
    with pyro.plate("counties", J):
        alpha = pyro.sample("alpha", dist.Normal(mu_a, sigma_a))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(alpha[county] + beta * x, sigma_y), obs=y)


def radon_by_hand(z, d):
    prior = (Normal(0.0, 10.0).log_prob(z["mu_a"]) + HalfNormal(5.0).log_prob(z["sigma_a"])
             + Normal(0.0, 10.0).log_prob(z["beta"]) + HalfNormal(5.0).log_prob(z["sigma_y"])
             + Normal(z["mu_a"][:, None], z["sigma_a"][:, None]).log_prob(z["alpha"]).sum(-1))
    mean = z["alpha"][:, d["county"]] + z["beta"][:, None] * d["x"]
    return {"prior": prior, "y": Normal(mean, z["sigma_y"][:, None]).log_prob(d["y"])}


pos = constraints.positive
MODELS = {
    "logistic X @ beta (N=500, D=30)": (
        lambda: bbvi.from_pyro(logistic, X, Y),
        lambda: bbvi.Model(logistic_by_hand, {"beta": bbvi.Latent(shape=(D,)), "b": bbvi.Latent()},
                           data={"X": X, "y": Y})),
    "varying intercepts alpha[county] (J=85, N=919)": (
        lambda: bbvi.from_pyro(radon, COUNTY, XF, YR),
        lambda: bbvi.Model(radon_by_hand, {"mu_a": bbvi.Latent(), "sigma_a": bbvi.Latent(support=pos),
                                           "beta": bbvi.Latent(), "sigma_y": bbvi.Latent(support=pos),
                                           "alpha": bbvi.Latent(shape=(J,))},
                           data={"county": COUNTY, "x": XF, "y": YR})),
}


def per_step(models, steps, repeats):
    """ms per step of each model, the fastest of `repeats` timed blocks, the models' blocks interleaved (so that
    a busy machine slows them alike)."""
    states = [bbvi.init(m, family="meanfield", estimator="reparam", num_particles=16, seed=0) for m in models]
    best = [float("inf")] * len(states)
    for state in states:
        for _ in range(5):
            bbvi.step(state)
    for _ in range(repeats):
        for i, state in enumerate(states):
            t = time.perf_counter()
            for _ in range(steps):
                bbvi.step(state)
            best[i] = min(best[i], (time.perf_counter() - t) / steps * 1e3)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    a = parser.parse_args()
    torch.set_num_threads(1)
    for label, (make_pyro, make_hand) in MODELS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = make_pyro()
            eager = make_pyro()
        eager.log_joint._replay = eager.log_joint._vmapped_terms   # every call the vmapped Pyro run
        how = "vectorized" if pm.vectorized else "one particle at a time"
        fp, hand, fe = per_step([pm, make_hand(), eager], a.steps, a.repeats)
        print(f"{label}: from_pyro {fp:.2f} ms/step ({how}), by hand {hand:.2f} ms/step, ratio {fp / hand:.2f}; "
              f"without the recorded graph {fe:.2f} ms/step, ratio {fe / hand:.2f}")


if __name__ == "__main__":
    main()
