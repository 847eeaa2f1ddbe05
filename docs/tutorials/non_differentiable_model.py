"""A model torch cannot differentiate: a log-joint in numpy or plain Python, fitted by the score-function path.

Pathwise (reparameterization) gradients need d log p / dz from torch's autograd. A log-joint computed in numpy,
plain Python, a compiled library or a simulator gives none. The score-function estimator needs only the log-joint's
values: grad ELBO = E_q[(log p(z) - log q(z) - b) grad log q(z)], with b a baseline (leave-one-out by default)
that keeps its variance down. `bbvi.fit` notices on the first call that torch gets no gradient and switches
to that path by itself; `fit.plan` says which path it took and `fit.start.note` why it started where it did.

The model: counts of events on 12 days, y[i] ~ Poisson(lam), with lam ~ Gamma(3, 1). Its posterior is
Gamma(3 + sum y, 1 + 12), so we can check the fit.

Run it with `python docs/tutorials/non_differentiable_model.py`. `BBVI_TUTORIAL_QUICK=1` (the tests) draws fewer
samples for the check; this tutorial writes no files.
"""
import math
import os

import numpy as np
import torch
from scipy.special import gammaln
from torch.distributions import constraints

import bbvi

QUICK = os.environ.get("BBVI_TUTORIAL_QUICK") == "1"
NUM_DRAWS = 4000 if QUICK else 20000

Y = np.array([3, 1, 4, 1, 5, 2, 2, 6, 5, 3, 0, 2])
A, B = 3.0, 1.0                                             # Gamma(shape A, rate B) prior on lam

# Exact posterior: Gamma(A + sum y, B + n), mean a / b, sd sqrt(a) / b.
a, b = A + Y.sum(), B + len(Y)
EXACT_MEAN, EXACT_SD = a / b, np.sqrt(a) / b

# ---- 1. A vectorized numpy log-joint --------------------------------------------------------------------------
# bbvi still calls it with all S particles at once: `z["lam"]` is a torch tensor of shape `(S,)`. Leave torch
# here (`.detach().cpu().numpy()`), compute in numpy, and hand back a tensor of shape `(S,)`. The data arrive
# as a tensor too (`bbvi.Model` turns numpy arrays into tensors), so convert them back as well.


def log_joint(z, y):
    lam = z["lam"].detach().cpu().numpy()                   # (S,) numpy
    y = y.cpu().numpy()                                     # (12,)
    log_prior = A * np.log(B) - gammaln(A) + (A - 1) * np.log(lam) - B * lam             # Gamma(A, B)
    log_lik = (y[None, :] * np.log(lam[:, None]) - lam[:, None] - gammaln(y + 1)).sum(-1)  # Poisson(lam)
    return torch.as_tensor(log_prior + log_lik)             # (S,)


# lam is positive: bbvi fits q on log(lam) and adds the log-det-Jacobian itself, so the log-joint only ever
# sees positive values of lam.
model = bbvi.Model(log_joint, {"lam": bbvi.Latent(support=constraints.positive)}, data=Y, name="counts_numpy")
fit = bbvi.fit(model)

print(fit.summary())
print("plan:", fit.plan)             # path='score': score-function terms with the LOO baseline
print("start:", fit.start.note)      # no MAP/Laplace start without gradients: q starts at zero (lam = 1)
assert fit.plan.path == "score" and fit.status == "converged", (fit.plan, fit.status)


def check(fit, label):
    """q's mean within 0.1 posterior sd of the exact one, and its sd within 10%."""
    lam = fit.sample(NUM_DRAWS, seed=1)["lam"]
    err, ratio = (lam.mean().item() - EXACT_MEAN) / EXACT_SD, lam.std().item() / EXACT_SD
    print(f"{label}: mean {lam.mean():.4f} (exact {EXACT_MEAN:.4f}), sd {lam.std():.4f} (exact {EXACT_SD:.4f}): "
          f"mean error {err:+.3f} sd, sd ratio {ratio:.3f}")
    assert abs(err) < 0.1 and abs(ratio - 1) < 0.1, (label, err, ratio)


check(fit, "vectorized numpy log-joint")

# ---- 2. A one-particle black box ------------------------------------------------------------------------------
# Many black boxes take one parameter value at a time (a simulator, a solver, a likelihood from another
# package), like this one in plain Python. `vectorized=False` lets the log-joint take one particle, `z["lam"]`
# of shape `()` here, and return a number; bbvi loops over the particles (slower: one call each).
# `differentiable=False` declares up front what was detected above, so bbvi does not probe for gradients at
# all.


def one_particle_log_joint(z, y):
    lam = float(z["lam"])
    total = A * math.log(B) - math.lgamma(A) + (A - 1) * math.log(lam) - B * lam
    for count in y.tolist():
        total += count * math.log(lam) - lam - math.lgamma(count + 1)
    return total


black_box = bbvi.Model(one_particle_log_joint, {"lam": bbvi.Latent(support=constraints.positive)}, data=Y,
                       name="counts_black_box", vectorized=False, differentiable=False)
fit_bb = bbvi.fit(black_box)
print(f"\nblack box: {fit_bb.status} after {fit_bb.num_steps} steps; plan {fit_bb.plan}")
assert fit_bb.plan.path == "score"
check(fit_bb, "one-particle black box")

# The same score path serves discrete latents (see `discrete_latents.py`). With many latents its variance
# grows; then more particles (`num_particles=64`) help, and bbvi's factor terms (return a dict of named terms
# from the log-joint, see docs/features.md) let each latent's score be weighted only by the terms that depend on it.
