"""Control-variate baselines of the score-function terms.

With learning signals f_s = log p(x, z_s) - log q(z_s) and scores h_s = grad log q(z_s), the score term of
the gradient is mean_s (f_s - b_s) h_s. A baseline b_s never depends on z_s, so E[b_s h_s] = 0 and the mean is
kept while the variance drops:

    None  b = 0
    ema   b = bias-corrected exponential moving average of past steps' mean f (decay 0.9)
    loo   b_s = mean_{j != s} f_j            (leave-one-out over particles; Kool et al. 2019)
    cv    per-coordinate optimal scaling a_d = Cov(f h_d, h_d) / Var(h_d)
          (Ranganath et al. 2014, eq. 10), estimated leave-one-out so that a for particle s never sees z_s.

The baseline protocol (a new baseline is one class with these, in a file of its own or here):

    min_particles: int                                      the fewest particles it works with
    init_state(device, dtype) -> dict of tensors            what carries between steps (checkpointed)
    score_term(f, score_logq, score_params, particles, elbo, state) -> (carrier, state)
        f (S,) learning signals and score_logq (S,) log q of the score-path draws (with gradient), both zero at
        invalid particles; score_params the leaves score_logq depends on; elbo = particles.average(f). Returns a
        scalar whose gradient is the score term's estimate, and the state for the next step.
    (bbvi's own None/EMA/LOO also have first_order_term: the same gradient without higher derivatives, which
    bbvi.fit's steps use for those exact classes only, so a subclass's own score_term is never bypassed)
"""
import dataclasses

import torch

from ..errors import ConfigError
from .trick import magic_box

__all__ = ["EMA", "LOO", "CV", "NoBaseline", "resolve_baseline"]


class _PerParticle:
    """Baselines of the form b_s: the score term is mean_s (f_s - b_s) score_logq_s."""

    min_particles = 1

    def init_state(self, device, dtype):
        return {}

    def score_term(self, f, score_logq, score_params, particles, elbo, state):
        b, state = self.values(f, particles, elbo, state)
        return particles.average(magic_box(score_logq) * (f - b)), state

    def first_order_term(self, f, score_logq, score_params, particles, elbo, state):
        """mean_s log q_s (f_s - b_s): the score term's gradient, the same bits (the magic box's value is exactly 1
        and its backward multiplies by it), without its three operations or its higher derivatives."""
        b, state = self.values(f, particles, elbo, state)
        return particles.average(score_logq * (f - b)), state


@dataclasses.dataclass(frozen=True)
class NoBaseline(_PerParticle):
    """b = 0: the plain score-function estimator (what baseline=None means)."""

    def values(self, f, particles, elbo, state):
        return 0.0, state


@dataclasses.dataclass(frozen=True)
class EMA(_PerParticle):
    """b = exponential moving average of the ELBO estimate over past steps."""

    decay: float = 0.9

    def __post_init__(self):
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not (0.0 <= self.decay < 1.0):
            raise ConfigError(f"EMA decay must be in [0, 1), got {self.decay!r}")

    def init_state(self, device, dtype):
        return {"value": torch.zeros((), device=device, dtype=dtype),
                "weight": torch.zeros((), device=device, dtype=dtype)}

    def values(self, f, particles, elbo, state):
        b = torch.where(state["weight"] > 0, state["value"] / state["weight"].clamp_min(1e-30),
                        torch.zeros_like(state["value"]))
        d = self.decay
        ok = torch.isfinite(elbo)
        state = {"value": torch.where(ok, d * state["value"] + (1 - d) * elbo, state["value"]),
                 "weight": torch.where(ok, d * state["weight"] + (1 - d), state["weight"])}
        return b, state


@dataclasses.dataclass(frozen=True)
class LOO(_PerParticle):
    """b_s = mean of f over the other particles (needs num_particles >= 2)."""

    min_particles = 2

    def values(self, f, particles, elbo, state):
        n = particles.n
        if particles.mask is None:
            return (f.sum() - f) / max(n - 1, 1), state
        return (f.sum() - f) / (n - 1).clamp_min(1) * particles.mask, state


@dataclasses.dataclass(frozen=True)
class CV:
    """Per-coordinate optimal control-variate scaling (Ranganath et al. 2014), leave-one-out."""

    min_particles = 1

    def init_state(self, device, dtype):
        return {}

    def score_term(self, f, score_logq, score_params, particles, elbo, state):
        """Returned as a linear carrier sum_d theta_d * g_d whose gradient is the estimate g (S x P per-particle
        scores, one batched backward)."""
        mask = particles.mask if particles.mask is not None else torch.ones_like(f)
        n = torch.as_tensor(particles.n, dtype=f.dtype, device=f.device)
        S = f.shape[0]
        eye = torch.eye(S, device=f.device, dtype=f.dtype)
        jac = torch.autograd.grad(score_logq, score_params, grad_outputs=eye, is_grads_batched=True,
                                  retain_graph=True, allow_unused=True)
        carrier = 0
        for p, h in zip(score_params, jac):
            if h is None:
                continue
            h = h.reshape(S, -1) * mask[:, None]
            x = f[:, None] * h
            m = (n - 1).clamp_min(1)
            ex = (x.sum(0) - x) / m
            eh = (h.sum(0) - h) / m
            cov = ((x * h).sum(0) - x * h) / m - ex * eh
            var = ((h * h).sum(0) - h * h) / m - eh * eh
            a = torch.where(var > 1e-30, cov / var.clamp_min(1e-30), torch.zeros_like(var))
            g = ((f[:, None] - a) * h).sum(0) / n
            carrier = carrier + (p.reshape(-1) * g.detach()).sum()
        return carrier, state


_BY_NAME = {None: None, "none": None, "ema": EMA(), "loo": LOO(), "cv": CV()}
_PROTOCOL = ("init_state", "score_term")


def resolve_baseline(baseline):
    """None | 'none' | 'ema' | 'loo' | 'cv' | a baseline object -> a baseline object or None (no baseline)."""
    if baseline is None or isinstance(baseline, NoBaseline):
        return None
    if isinstance(baseline, str) and baseline.lower() in _BY_NAME:
        return _BY_NAME[baseline.lower()]
    if not isinstance(baseline, str) and all(callable(getattr(baseline, m, None)) for m in _PROTOCOL):
        return baseline
    raise ConfigError(f"baseline must be None, 'ema', 'loo', 'cv' or a bbvi.EMA/LOO/CV object, got {baseline!r}")
