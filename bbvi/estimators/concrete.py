"""The Concrete / Gumbel-softmax relaxation (Maddison, Mnih & Teh 2017; Jang, Gu & Poole 2017) of the discrete
latents: a biased, low-variance pathwise gradient, opt-in only (estimator='concrete' or bbvi.Concrete(...)).

The ELBO is E_q[log p(x, z)] + H(q_c) + H(q_d), with H(q_d) the mean-field Categorical's entropy in closed form.
Its first term is estimated pathwise through a continuous stand-in for each discrete draw, at temperature tau:

    boolean entry, a = log-odds:      y = sigmoid((a + log U - log(1 - U)) / tau),      hard: 1[a + log U - log(1 - U) > 0]
    value in {low, ..., low+K-1}:     y = softmax((logits + G) / tau),  value = low + sum_j j y_j,   hard: low + argmax

(U uniform, G Gumbel; the hard value is an exact draw from q). The log-joint is evaluated at the relaxed value, so
it must accept floats between the support points and be differentiable in them (arithmetic in z; not indexing,
.long() or comparisons, which cut the gradient: refused with a ConfigError at the first step). With
`straight_through=True` it is evaluated at the hard value, with the relaxed value's gradient (Bengio et al. 2013;
Jang et al. 2017): the value reported is then an unbiased ELBO estimate and a log-joint that checks its support
still runs, but the gradient is biased all the same. Without it the value is the relaxed objective, not the ELBO.
As tau -> 0 the bias vanishes and the variance grows; tau follows Jang et al.'s schedule
tau_t = max(final_temperature, temperature exp(-anneal_rate t)). Continuous latents go pathwise (reparam) beside.
A fit says it is biased: `fit.settings['bias']`, and its summary.
"""
import dataclasses
import math

import torch

from ..errors import ConfigError

__all__ = ["Concrete"]


@dataclasses.dataclass(frozen=True)
class Concrete:
    """Relaxed (Concrete / Gumbel-softmax) discrete latents: pathwise, biased; temperature annealed from
    `temperature` to `final_temperature` at `anneal_rate` per step; `straight_through`: hard values forward."""

    temperature: float = 1.0
    final_temperature: float = 0.5
    anneal_rate: float = 1e-3
    straight_through: bool = False

    name = "concrete"
    takes_step = True

    def __post_init__(self):
        for field in ("temperature", "final_temperature"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"bbvi.Concrete: {field} must be a positive finite number, got {v!r}")
        if self.final_temperature > self.temperature:
            raise ConfigError(f"bbvi.Concrete: final_temperature ({self.final_temperature}) must not exceed "
                              f"temperature ({self.temperature}): the schedule anneals downwards")
        r = self.anneal_rate
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0:
            raise ConfigError(f"bbvi.Concrete: anneal_rate must be a finite number >= 0, got {r!r}")

    def temperature_at(self, step):
        """tau at step `step` (None: the final temperature)."""
        if step is None:
            return float(self.final_temperature)
        return max(float(self.final_temperature), float(self.temperature) * math.exp(-self.anneal_rate * step))

    @property
    def objective(self):
        if self.straight_through:
            return None  # the value is the ELBO (log p at exact draws of q); only its gradient is biased
        return ("a relaxed ELBO (the log-joint at Concrete-relaxed discrete values, temperature "
                f"{self.temperature} -> {self.final_temperature}), not the ELBO")

    @property
    def bias(self):
        kind = "straight-through Concrete" if self.straight_through else "Concrete"
        return (f"the gradient is biased: the discrete latents are relaxed ({kind}, temperature "
                f"{self.temperature} -> {self.final_temperature}), so the fit's optimum is not the ELBO's. Check it "
                f"against an unbiased estimator (estimator='auto' or 'disarm') or bbvi.compare")

    def plan(self, model, report, num_particles):
        from .pathwise import whole_plan
        if not model.discrete:
            raise ConfigError(f"estimator='concrete' relaxes discrete latents, and model {model.name!r} has none; "
                              f"use estimator='auto'")
        return whole_plan(self, model, report)

    def estimate(self, model, family, discrete, params, num_particles, generator, step=None):
        """(surrogate, num_bad, error): mean log p at the relaxed (or straight-through) draws + H(q_c) + H(q_d).
        At the first step (step 0, or None: gradient_samples) a log-joint that raises at every relaxed particle,
        or has no gradient in a relaxed latent, is a ConfigError."""
        from .particles import evaluate
        from .pathwise import Reparam
        pc, pd = params["continuous"], params["discrete"]
        tau = self.temperature_at(step)
        u = family.rsample(pc, num_particles, generator) if model.dim else None
        values = {}
        for name, _shape, low, K, boolean in discrete.spec:
            values[name] = self._relax(pd[name], low, K, boolean, tau, num_particles, generator)
        uu = u if u is not None else next(iter(pd.values())).new_zeros(num_particles, 0)
        p = evaluate(model, uu, values, grad=True)
        if step in (0, None):
            self._check(model, p, values)
        value = Reparam().alone(p, family, pc) if u is not None else p.average(p.log_p)
        for name, *_ in discrete.spec:
            logq = torch.log_softmax(pd[name], -1)
            value = value - (logq.exp() * logq).sum()
        return value, p.num_bad, p.error

    def _relax(self, logits, low, K, boolean, tau, num, generator):
        """(num, *shape) relaxed values (straight-through: hard values carrying the relaxed gradient)."""
        tiny = torch.finfo(logits.dtype).tiny
        if boolean:
            a = logits[..., 1] - logits[..., 0]
            U = torch.rand((num,) + tuple(a.shape), generator=generator, device=a.device, dtype=a.dtype)
            noise = torch.log(U.clamp_min(tiny)) - torch.log1p(-U)
            soft = torch.sigmoid((a + noise) / tau)
            hard = (a.detach() + noise > 0).to(a.dtype)
        else:
            U = torch.rand((num,) + tuple(logits.shape), generator=generator, device=logits.device,
                           dtype=logits.dtype)
            gumbel = -torch.log(-torch.log(U.clamp_min(tiny)))
            y = torch.softmax((logits + gumbel) / tau, -1)
            soft = low + (y * torch.arange(K, device=y.device, dtype=y.dtype)).sum(-1)
            hard = (low + (logits.detach() + gumbel).argmax(-1)).to(y.dtype)
        return hard + (soft - soft.detach()) if self.straight_through else soft

    def _check(self, model, p, values):
        if not bool(p.valid.any()):
            raise ConfigError(f"estimator='concrete': the log-joint of model {model.name!r} has no finite value at "
                              f"any relaxed draw (it raised {type(p.error).__name__}: {str(p.error).splitlines()[0][:160]})"
                              + self._hint()
                              if p.error is not None else
                              f"estimator='concrete': the log-joint of model {model.name!r} is NaN/inf at every "
                              f"relaxed draw" + self._hint())
        names = list(values)
        if p.log_p.requires_grad:
            grads = torch.autograd.grad(p.log_p.sum(), [values[n] for n in names], retain_graph=True,
                                        allow_unused=True)
        else:   # nothing in the log-joint's value depends on anything with a gradient (e.g. theta[k.long()] alone)
            grads = [None] * len(names)
        dead = [n for n, g in zip(names, grads) if g is None or not bool((g != 0).any())]
        if dead:
            raise ConfigError(f"estimator='concrete': the log-joint of model {model.name!r} has no gradient in the "
                              f"relaxed values of {dead} (indexing, .long(), comparisons or torch.where on them cut "
                              f"it), so the relaxation has nothing to follow. Write the log-joint as arithmetic in "
                              f"those values (e.g. mu0 + (mu1 - mu0) * z), or use an unbiased estimator: 'auto', "
                              f"'disarm' (boolean latents), Auto(sum_over=...)")

    def _hint(self):
        if self.straight_through:
            return ""
        return (". The relaxed values lie between the support points (a Bernoulli's log_prob with argument "
                "validation refuses 0.3): write such terms as arithmetic (z log p + (1 - z) log(1 - p)), or use "
                "bbvi.Concrete(straight_through=True), which evaluates the log-joint at the support points only")
