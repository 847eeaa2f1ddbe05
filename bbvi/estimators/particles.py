"""One draw of S particles from q over both blocks, and its evaluation: the record every estimator reads.

q is a product q_c(u) q_d(k) of a continuous family over the unconstrained vector u (S, D) and mean-field
Categorical factors over the discrete latents k (dict name -> (S, *shape)). `draw` is the one place that draws
from it (the fit's steps, its first check, the result's draws); `log_q` the one place that evaluates it.
"""
import dataclasses
import math

import torch

__all__ = ["Particles", "draw", "evaluate", "log_q"]


def _any_tensor(params):
    return next(t for group in params.values() for t in group.values())


def draw(model, family, discrete, params, num, generator, *, pathwise=False, with_log_q=False):
    """(u (num, D), k dict name -> (num, *shape)) from q; u differentiable in the family's parameters when
    `pathwise` (rsample), else drawn without gradient. The generator is consumed continuous block first.
    with_log_q (pathwise only): return (u, k, log q_c(u) or None), log q_c from the draw itself where the family
    has `rsample_and_log_prob` (a flow: the density of its own draws costs no inverse pass)."""
    pc, pd = params["continuous"], params["discrete"]
    lq_c = None
    if model.dim > 0:
        if with_log_q and pathwise and callable(getattr(family, "rsample_and_log_prob", None)):
            u, lq_c = family.rsample_and_log_prob(pc, num, generator)
        else:
            u = family.rsample(pc, num, generator) if pathwise else family.sample(pc, num, generator)
    else:
        u = _any_tensor(params).new_zeros(num, 0)
    k = discrete.sample(pd, num, generator) if discrete.spec else {}
    return (u, k, lq_c) if with_log_q else (u, k)


def log_q(model, family, discrete, params, u, k):
    """(log q_c(u), log q_d(k)), each (S,); zeros for an empty block."""
    lq_c = family.log_prob(params["continuous"], u) if model.dim > 0 else None
    lq_d = discrete.log_prob(params["discrete"], k) if discrete.spec else None
    return lq_c, lq_d


@dataclasses.dataclass
class Particles:
    """S evaluated particles. u (S, D), k dict name -> (S, *shape); log_p (S,) the unconstrained log density,
    zero where not finite; valid (S,) bool, finite log_p; mask (S,) float 0/1 or None when every particle is
    valid; n the number of valid particles (a float, or a 0-dim tensor under a mask); num_bad (0-dim int tensor)
    or None; error: the exception the log-joint raised at some particles, or None; log_q_c: log q_c(u) (S,)
    differentiable in q's parameters, where the draw gave it (a flow's pathwise draws), else None."""

    u: torch.Tensor
    k: dict
    log_p: torch.Tensor
    valid: torch.Tensor
    mask: object
    n: object
    num_bad: object
    error: object
    infeasible: object = None
    log_q_c: object = None

    @property
    def num(self):
        return self.log_p.shape[0]

    def average(self, x):
        """Mean of x (S,) over the valid particles."""
        if self.mask is None:
            return torch.mean(x)
        return (self.mask * torch.where(self.valid, x, torch.zeros_like(x))).sum() / self.n


def evaluate(model, u, k, *, grad, checked=True):
    """Particles for draws (u, k): the log density, with gradient when `grad` (pathwise estimators), and which
    particles are valid. A particle whose log-joint is NaN/inf, or raises, is invalid: its weight is zero.
    checked=False (bbvi.fit's step): where the log-joint did not raise, every particle is taken as valid without
    looking (no host sync); a NaN/inf particle then makes every average, and so the estimate, NaN/inf, and the
    caller must redo the estimate from the same draws with checked=True, which gives what it would have."""
    if grad:
        lp, error = model.log_density_guarded(u, k)
    else:
        with torch.no_grad():
            lp, error = model.log_density_guarded(u, k)
    return from_log_p(u, k, lp, error, checked=checked)


def from_log_p(u, k, lp, error=None, checked=True):
    """Particles from draws and their log density lp (S,); checked=False: see `evaluate`."""
    if lp.dtype != u.dtype:
        lp = lp.to(u.dtype)
    S = lp.shape[0]
    # the common case, every particle finite: a finite sum says so in two small operations (isfinite is four);
    # a sum that overflows (or is NaN/inf) goes the long way, which says the same where every particle is finite
    if (not checked and error is None) or math.isfinite(lp.sum().item()):
        return Particles(u, k, lp, lp.new_ones(S, dtype=torch.bool), None, float(S), None, error)
    valid = torch.isfinite(lp)
    if bool(valid.all()):  # every particle finite; their sum overflowed
        return Particles(u, k, lp, valid, None, float(S), None, error)
    mask = valid.to(lp.dtype)
    infeasible = lp == -math.inf
    lp = torch.where(valid, lp, torch.zeros_like(lp))
    return Particles(u, k, lp, valid, mask, mask.sum(), S - valid.sum(), error,
                     infeasible if bool(infeasible.any()) else None)


def with_floor(p, f, margin=10.0):
    """Particles with score terms (the score path, or discrete latents beside a pathwise part) where the
    log-joint was -inf (q puts mass outside the posterior's support) kept in the step with the learning signal
    f = floor = min f - (max f - min f) - margin over the finite particles, so the score terms push q's mass
    away from there instead of ignoring it (dropping them would leave q free to keep it). The true ELBO is -inf while q has such mass; the floor is a finite surrogate of it.
    Returns (particles, f); unchanged when there is nothing to floor or no finite particle to anchor it."""
    if p.infeasible is None or not bool(p.valid.any()):
        return p, f
    fv = torch.where(p.valid, f, torch.full_like(f, math.inf))
    lo = fv.min()
    hi = torch.where(p.valid, f, torch.full_like(f, -math.inf)).max()
    f = torch.where(p.infeasible, lo - (hi - lo) - margin, f)
    valid = p.valid | p.infeasible
    S = f.shape[0]
    if bool(valid.all()):
        return dataclasses.replace(p, valid=valid, mask=None, n=float(S), num_bad=None), f
    mask = valid.to(f.dtype)
    return dataclasses.replace(p, valid=valid, mask=mask, n=mask.sum(), num_bad=S - valid.sum()), f
