"""Fit a model: write a log-joint, call `bbvi.fit`, read the result, and check it against the exact posterior.

The model is a straight line through noisy points, with a known noise sd:

    a ~ N(0, 10^2),  b ~ N(0, 10^2),  y[i] ~ N(a + b * x[i], 0.8^2),  i = 1..50.

Its posterior is Gaussian and known in closed form, so we can see how close the fit is. Run it with

    python docs/tutorials/fit_a_model.py

(`BBVI_TUTORIAL_QUICK=1` draws fewer samples for the tests; this tutorial writes no files.)
"""
import os

import torch
from torch.distributions import Normal

import bbvi

QUICK = os.environ.get("BBVI_TUTORIAL_QUICK") == "1"
NUM_DRAWS = 4000 if QUICK else 20000

# Data: 50 points on a line with intercept 1 and slope 0.5, noise sd 0.8 (fixed seed, float64 like the fit).
g = torch.Generator().manual_seed(1)
x = torch.linspace(-2, 2, 50, dtype=torch.float64)
y = 1.0 + 0.5 * x + 0.8 * torch.randn(50, generator=g, dtype=torch.float64)
NOISE_SD = 0.8

# The model is one function: log p(data, z), the log-joint, up to a constant. bbvi calls it with S draws
# ("particles") at once: `z["a"]` and `z["b"]` have shape `(S,)`, particles first, and it must return shape
# `(S,)`, one log-joint per particle. Broadcasting against the data does the rest. `data` is whatever you pass
# as `Model(data=...)`, handed back unchanged (tensors moved to the fit's dtype).


def log_joint(z, data):
    a, b = z["a"], z["b"]                                   # (S,), (S,)
    mean = a[:, None] + b[:, None] * data["x"]              # (S, 50)
    return (Normal(0.0, 10.0).log_prob(a) + Normal(0.0, 10.0).log_prob(b)
            + Normal(mean, NOISE_SD).log_prob(data["y"]).sum(-1))   # (S,)


# Declare the latents: name -> `bbvi.Latent(shape=..., support=...)`. Both are real scalars, the default. A
# positive latent would be `bbvi.Latent(support=torch.distributions.constraints.positive)`; bbvi maps it to an
# unconstrained coordinate and adds the log-det-Jacobian for you.
model = bbvi.Model(log_joint, latents={"a": bbvi.Latent(), "b": bbvi.Latent()},
                   data={"x": x, "y": y}, name="line")

# Fit with the defaults. Every latent here is continuous and torch can differentiate the log-joint, so bbvi runs
# batch and match (method='auto'): a Gaussian q with a full covariance, fitted by closed-form updates from the
# gradients of the log-joint at 32 draws a step, 50 steps from a start at the MAP with Laplace scales, with no
# step size to tune. The seed (0 by default) makes the fit reproducible bit for bit.
fit = bbvi.fit(model)

# `fit.options` holds what the fit ran with (`fit.settings` is its text record): `.method` says which algorithm
# ran and `.why` why; `fit.status` is 'completed' (its 50 steps ran).
# A model with discrete latents, or a log-joint torch cannot differentiate, gets the stochastic-gradient fit
# instead (method='sgd': an adaptive step size that stops by itself, status 'converged').
print("method:", fit.options.method, "-", fit.options.why)
print("status:", fit.status, "after", fit.num_steps, "steps,", fit.num_gradient_evals, "gradient evaluations")
assert fit.options.method == "bam", fit.options
assert fit.status == "completed", fit.status

# The summary: means, sds and 5%/95% quantiles from draws of q, with PSIS k-hat (how well q covers the
# posterior: below 0.5 is good, above 0.7 means q should not be trusted) and any reliability warning.
print(fit.summary())

# `fit.sample(n)` gives draws of every latent (and derived quantity), on the constrained scale: a dict of
# tensors with the draws first. Anything computed from the draws has its posterior too: here the line's height
# at x = 3, a prediction outside the data.
draws = fit.sample(NUM_DRAWS, seed=1)
print({name: tuple(v.shape) for name, v in draws.items()})
height = draws["a"] + 3.0 * draws["b"]

# The exact posterior, for the check: with X = [1, x] the posterior of (a, b) is Gaussian with precision
# X^T X / 0.8^2 + I / 10^2 and mean precision^-1 X^T y / 0.8^2.
X = torch.stack([torch.ones_like(x), x], 1)
precision = X.T @ X / NOISE_SD ** 2 + torch.eye(2, dtype=torch.float64) / 10.0 ** 2
cov = torch.linalg.inv(precision)
mean = cov @ X.T @ y / NOISE_SD ** 2
sd = cov.diagonal().sqrt()
w = torch.tensor([1.0, 3.0], dtype=torch.float64)           # height at x = 3 is w . (a, b)
exact = {"a": (mean[0], sd[0]), "b": (mean[1], sd[1]), "height at x=3": (w @ mean, (w @ cov @ w).sqrt())}
fitted = {"a": draws["a"], "b": draws["b"], "height at x=3": height}

print(f"\n{'':16}{'exact mean':>12}{'fit mean':>12}{'exact sd':>12}{'fit sd':>12}{'error (sd)':>12}")
for name, (m, s) in exact.items():
    v = fitted[name]
    err = float((v.mean() - m) / s)
    print(f"{name:16}{float(m):>12.4f}{float(v.mean()):>12.4f}{float(s):>12.4f}{float(v.std()):>12.4f}{err:>12.3f}")
    # The fit's mean is within 0.1 posterior sd of the exact one, and its sd within 10%.
    assert abs(err) < 0.1, (name, err)
    assert abs(float(v.std() / s) - 1) < 0.1, (name, float(v.std() / s))

# The fit's covariance is full, so correlated a and b would be fine too; here x is centered and they are nearly
# uncorrelated a posteriori (exact correlation below). A mean-field q (`family="meanfield"`, the stochastic-gradient
# fit) cannot show a correlation and under-states both sds where there is one; the end-of-fit check says so.
corr = cov[0, 1] / (sd[0] * sd[1])
print(f"\nexact posterior correlation of a and b: {float(corr):.3f}")
assert abs(float(corr)) < 0.1
print("k-hat:", round(fit.diagnostics()["khat"], 3))
