"""Stan ADVI's relative-tolerance test (`tol_rel_obj`), for fits of a fixed length (steps=N): `RelativeTolerance`
on running means of the per-step ELBO estimates, and `q_settled`, the check of q's mean that must pass before the
fit accepts it."""
import math

import torch

from .estimators.plan import estimate


class RelativeTolerance:
    """Stan ADVI's relative-tolerance test, applied to running means of the per-step ELBO estimates."""

    def __init__(self, tol, every, steps):
        self.tol, self.every = tol, every
        self.buffer_size = max(int(0.1 * steps / every), 2) if steps else 2
        self.previous, self.rel = None, []

    def __call__(self, elbo):
        if self.tol is None or len(elbo) % self.every:
            return False
        window = torch.stack(elbo[-self.every:])
        current = window[torch.isfinite(window)].mean().item()
        if self.previous is not None and math.isfinite(current):
            self.rel = (self.rel + [abs(current - self.previous) / max(abs(current), 1e-12)])[-self.buffer_size:]
        self.previous = current
        if len(self.rel) < 2:
            return False
        rel = torch.tensor(self.rel)
        return bool(rel.mean() < self.tol or rel.median() < self.tol)


def q_settled(state, seed, num_estimates=32, threshold=0.1):
    """tol_rel_obj's ELBO test passes when the ELBO's running mean stops changing, which can happen while q's mean
    is still far from the optimum (seen: a 5000 x 20 logistic regression 'converged' at step 300 with 9 of 21
    means more than 0.1 sd off). Before accepting it, estimate the ELBO's gradient in q's mean (num_estimates
    independent estimates from a generator of their own, so the fit's draws are untouched) and the coordinate-wise
    Newton step it implies in q's sds, g_i sd_i (at a mean-field optimum sd_i^2 = 1 / E_q[-d^2 log p / du_i^2]):
    settled when no coordinate would move more than `threshold` sd beyond 3 Monte Carlo errors."""
    pc = state.params["continuous"]
    if "loc" not in pc or not callable(getattr(state.family, "marginal_sd", None)):
        return True
    generator = torch.Generator(device=pc["loc"].device).manual_seed((seed * 1_000_003 + state.step) % 2 ** 63)
    grads = []
    for _ in range(num_estimates):
        surrogate, _, _, _ = estimate(state.plan, state.model, state.family, state.discrete, state.params,
                                      state.num_particles, generator, state.baseline_state, state.structure,
                                      step=state.step)
        try:
            g, = torch.autograd.grad(surrogate, [pc["loc"]], allow_unused=True)
        except RuntimeError:
            return True
        if g is None or not bool(torch.isfinite(g).all()):
            continue
        grads.append(g.detach())
    if len(grads) < 2:
        return True
    with torch.no_grad():
        sd = state.family.marginal_sd(pc)
        shift = torch.stack(grads) * sd  # (K, D) Newton steps in q's sds
        mean, se = shift.mean(0), shift.std(0) / len(grads) ** 0.5
    return not bool(((mean.abs() > threshold) & (mean.abs() > 3 * se)).any())
