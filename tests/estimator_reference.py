"""The estimator reference grid: every family x estimator x baseline combination on a continuous, a
non-differentiable, a mixed, a discrete-only and a NaN-masked model (seed 0, float64, 25 fixed steps), plus
gradient samples, draws and one default (adaptive) fit. `python tests/estimator_reference.py` writes
tests/data/estimator_reference.pt; tests/test_estimator_reference.py asserts that today's code reproduces every
tensor bit for bit (torch.equal). Regenerate only for a change that is meant to change numbers, and say so in
the commit."""
import os
import sys
import warnings

import numpy as np
import torch
from torch.distributions import constraints

import bbvi

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "data", "estimator_reference.pt")
STEPS = 25
FAMILIES = ("meanfield", "fullrank", "lowrank")
SCORE_LIKE = [(e, b) for e in ("score", "auto") for b in (None, "ema", "loo", "cv")]
PATHWISE = [("reparam", None), ("stl", None)]


def _continuous_lj(z, data):
    d = torch.distributions
    lp = d.Normal(0.0, 1.0).log_prob(z["mu"]) + d.Gamma(2.0, 2.0).log_prob(z["tau"])
    lp = lp + d.Normal(z["mu"][:, None], z["tau"][:, None]).log_prob(z["theta"]).sum(-1)
    return lp + d.Normal(z["theta"], 0.5).log_prob(data["y"]).sum(-1)


def continuous():
    return bbvi.Model(_continuous_lj, {"mu": bbvi.Latent(), "tau": bbvi.Latent(support=constraints.positive),
                                       "theta": bbvi.Latent(shape=(3,))},
                      data={"y": torch.tensor([0.5, -0.3, 1.2])}, name="ref_continuous")


def nondifferentiable():
    def lj(z, data):
        x = z["x"].detach().cpu().numpy()
        return torch.as_tensor(-0.5 * ((x - np.array([1.0, -2.0])) ** 2 / np.array([1.0, 0.25])).sum(-1))
    return bbvi.Model(lj, {"x": bbvi.Latent(shape=(2,))}, name="ref_numpy")


def nan_masked():
    def lj(z, data):
        lp = _continuous_lj(z, data)
        return torch.where(torch.frac(37 * z["theta"][:, 0].abs() + 0.5) < 0.1, torch.full_like(lp, float("nan")), lp)
    return bbvi.Model(lj, {"mu": bbvi.Latent(), "tau": bbvi.Latent(support=constraints.positive),
                           "theta": bbvi.Latent(shape=(3,))},
                      data={"y": torch.tensor([0.5, -0.3, 1.2])}, name="ref_nan")


def mixed():
    def lj(z, data):
        d = torch.distributions
        s, k = z["s"], z["k"]
        lp = d.Normal(0.0, 2.0).log_prob(z["m"]).sum(-1) + d.Bernoulli(0.3).log_prob(s).sum(-1)
        lp = lp + d.Categorical(torch.tensor([0.2, 0.5, 0.3])).log_prob(k)
        mean = z["m"][:, 0] * s[:, 0] + z["m"][:, 1] * s[:, 1] + (k - 1).to(z["m"].dtype)
        lp = lp + d.Normal(mean, 1.0).log_prob(data["y"][:, None]).sum(0)
        return torch.where(torch.frac(37 * z["m"][:, 0].abs() + 0.5) < 0.1, torch.full_like(lp, float("nan")), lp)
    return bbvi.Model(lj, {"m": bbvi.Latent(shape=(2,)), "s": bbvi.Latent(shape=(2,), support=constraints.boolean),
                           "k": bbvi.Latent(support=constraints.integer_interval(0, 2))},
                      data={"y": torch.tensor([1.5, 0.7, 2.1])}, name="ref_mixed")


def discrete_only():
    def lj(z, data):
        s = z["s"]
        logits = torch.tensor([0.4, -1.0, 0.2, 1.1])
        lp = (s * logits).sum(-1) - 0.8 * s[:, 0] * s[:, 1] + 0.5 * s[:, 2] * s[:, 3]
        return lp + torch.tensor([0.0, 0.3, -0.4])[z["k"]] * s[:, 0]
    return bbvi.Model(lj, {"s": bbvi.Latent(shape=(4,), support=constraints.boolean),
                           "k": bbvi.Latent(support=constraints.integer_interval(0, 2))}, name="ref_discrete")


def switches():
    """Boolean latents beside a continuous one, the log-joint arithmetic in s (every discrete estimator applies)."""
    def lj(z, data):
        s, m = z["s"], z["m"]
        lp = (s * torch.tensor([0.4, -1.0, 0.2])).sum(-1) - 0.8 * s[:, 0] * s[:, 1] - 0.5 * m ** 2
        return lp + torch.distributions.Normal(m * s[:, 2] + 0.3 * s[:, 0], 1.0).log_prob(data["y"][:, None]).sum(0)
    return bbvi.Model(lj, {"m": bbvi.Latent(), "s": bbvi.Latent(shape=(3,), support=constraints.boolean)},
                      data={"y": torch.tensor([1.1, 0.4])}, name="ref_switches")


# the discrete estimators (issue 11), by label: on the switches model, and those that take categorical latents on
# the mixed one too
DISCRETE = {"arm": "arm", "disarm": "disarm", "vimco": "vimco", "relax": "relax", "concrete": "concrete",
            "concrete_st": bbvi.Concrete(straight_through=True, anneal_rate=0.05),
            "sums": bbvi.Auto(baseline="loo", sum_over=("s",))}
CATEGORICAL = {"vimco": "vimco", "relax": "relax", "sums": bbvi.Auto(baseline="loo", sum_over=("k",))}


def configs():
    yield from _configs()
    for label, est in DISCRETE.items():
        yield f"switches/meanfield/{label}/None", switches, dict(family="meanfield", estimator=est)
    for label, est in CATEGORICAL.items():
        yield f"mixed/meanfield/{label}/None", mixed, dict(family="meanfield", estimator=est)


def _configs():
    models = {"continuous": continuous, "numpy": nondifferentiable, "nan": nan_masked, "mixed": mixed,
              "discrete": discrete_only}
    for mname, make in models.items():
        fams = ("meanfield",) if mname == "discrete" else FAMILIES
        combos = SCORE_LIKE if mname in ("mixed", "discrete") else SCORE_LIKE + PATHWISE
        if mname == "numpy":
            combos = [c for c in SCORE_LIKE]
        for fam in fams:
            for est, base in combos:
                yield f"{mname}/{fam}/{est}/{base}", make, dict(family=fam, estimator=est, baseline=base)


def run_one(make, kw, extras):
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = bbvi.fit(model, steps=STEPS, num_particles=6, seed=0, dtype=torch.float64, init_strategy="zero",
                       lr=0.05, progress=False, diagnose=False, **kw)  # the grid records the fit, not its check
    out = {"elbo": fit.elbo.clone()}
    for g, grp in fit.params.items():
        for k, t in grp.items():
            out[f"param/{g}/{k}"] = t.clone()
    if extras:
        out["gradient_samples"] = fit.gradient_samples(8, seed=1)
        for name, v in fit.sample(50, seed=2).items():
            out[f"sample/{name}"] = v.clone()
        out["log_weights"] = fit.log_weights(50, seed=3)
    return out


def default_fit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = bbvi.fit(continuous(), max_steps=400, progress=False, diagnose=False)
    out = {"elbo": fit.elbo.clone()}
    for g, grp in fit.params.items():
        for k, t in grp.items():
            out[f"param/{g}/{k}"] = t.clone()
    return out


def compute():
    refs = {}
    for key, make, kw in configs():
        refs[key] = run_one(make, kw, extras=kw["family"] == "meanfield")
    refs["default"] = default_fit()
    return refs


if __name__ == "__main__":
    torch.set_num_threads(1)  # as the tests run (conftest.py): RELAX's small matmuls round differently with 2 threads
    torch.save(compute(), PATH)
    print(f"wrote {PATH}", file=sys.stderr)
