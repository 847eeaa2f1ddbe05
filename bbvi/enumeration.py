"""Discrete latents summed out, for `bbvi.nuts`: every joint value of a model's bounded discrete latents (boolean,
integer_interval), at most MAX_JOINT of them, evaluated in one batch of the log-joint (which is vectorized over
particles: the joint values are particles).

`Summed(model)` is the target NUTS samples, log p(x, u) = log sum_k p(x, u, k) on the continuous latents' unconstrained
scale (a log-sum-exp over the joint support K, so each evaluation costs K log-joint rows, one call), with
`draw(u, generator)`: each draw's discrete latents from their exact conditional p(k | u, x). A model with no
continuous latent has its whole posterior in `log_weights` of the empty u: `exact_draws` draws from it.
"""
import math

import torch
from torch.distributions import constraints

from .errors import ModelError

__all__ = ["MAX_JOINT", "Summed", "joint_values"]

MAX_JOINT = 10 ** 4   # the most joint values of the discrete latents bbvi.nuts sums out (each potential: K rows)
_ROWS_PER_CALL = 2 ** 15   # log-joint rows per call when several draws' joint values are evaluated at once


def _support_text(model):
    return ", ".join(f"{name} ({k} values" + (f" per element, {lat.numel} elements: {k}^{lat.numel}" if lat.numel > 1
                                             else "") + ")" for name, (lat, _, k) in model.discrete.items())


def joint_values(model, limit=MAX_JOINT, dtype=torch.float64):
    """Every joint value of the model's discrete latents: (dict name -> (K, *shape), K), booleans as 0./1. in
    `dtype` (as bbvi's fits give them), integers int64; the last element of the last latent varies fastest.
    ModelError naming each latent's support size when K > limit."""
    sizes = [(name, lat, lo, k) for name, (lat, lo, k) in model.discrete.items()]
    total = math.prod(k ** lat.numel for _, lat, _, k in sizes)
    if total > limit:
        raise ModelError(f"bbvi.nuts: model {model.name!r} has discrete latents {_support_text(model)}: "
                         f"{total:.3g} joint values, more than the {limit} bbvi.nuts sums out of NUTS's potential "
                         f"(each evaluation is a batch of that many log-joint rows). Sum the discrete latents out "
                         f"in the log-joint yourself, or check the fit against an exact answer instead")
    index, stride, out = torch.arange(total), total, {}
    for name, lat, lo, k in sizes:
        digits = []
        for _ in range(lat.numel):
            stride //= k
            digits.append(index // stride % k)
        v = torch.stack(digits, -1).reshape((total,) + tuple(lat.shape)) if digits else index.new_zeros(total)
        out[name] = v.to(dtype) if lat.support is constraints.boolean else v + lo
    return out, total


class Summed:
    """The model with its discrete latents summed out: `dim`, `name` and `log_density(u)` (S,) as `Model` has them
    (what bbvi.nuts's chains call), plus `log_weights(u)` (S, K) and `draw(u, generator)`."""

    def __init__(self, model, limit=MAX_JOINT, dtype=torch.float64):
        self.model, self.name, self.dim, self.dtype = model, model.name, model.dim, dtype
        self.values, self.size = joint_values(model, limit, dtype)

    def log_weights(self, u):
        """log p(x, u, k) + log|det J(u)| for every row of u (S, D) and every joint value k: (S, K), in calls of at
        most max(K, 2^15) log-joint rows."""
        K = self.size
        rows = max(1, _ROWS_PER_CALL // K)
        out = []
        for s in range(0, u.shape[0], rows):
            part = u[s:s + rows]
            n = part.shape[0]
            discrete = {k: v.to(part.device).repeat((n,) + (1,) * (v.dim() - 1)) for k, v in self.values.items()}
            out.append(self.model.log_density(part.repeat_interleave(K, 0), discrete).reshape(n, K))
        return torch.cat(out) if out else u.new_zeros(0, K)

    def log_density(self, u):
        """log sum_k p(x, u, k) (S,): the continuous latents' marginal target."""
        return torch.logsumexp(self.log_weights(u), -1)

    def draw(self, u, generator):
        """One draw of the discrete latents per row of u (S, D) from p(k | u, x): dict name -> (S, *shape)."""
        with torch.no_grad():
            w = self.log_weights(u)
        if not torch.isfinite(torch.logsumexp(w, -1)).all():
            raise ModelError(f"bbvi.nuts: model {self.name!r}: at some draws no joint value of the discrete latents "
                             f"has a finite log-joint, so p(k | continuous latents, data) is undefined there")
        k = torch.multinomial(torch.softmax(w, -1), 1, generator=generator)[:, 0]
        return {name: v[k] for name, v in self.values.items()}

    def exact_draws(self, n, generator):
        """For a model with no continuous latent: n independent draws from the exact posterior p(k | x) and each
        draw's log p(x, k) (n,)."""
        w = self.log_weights(torch.zeros(1, 0, dtype=self.dtype))[0]
        if not torch.isfinite(torch.logsumexp(w, 0)):
            raise ModelError(f"bbvi.nuts: model {self.name!r}: no joint value of the discrete latents has a finite "
                             f"log-joint")
        k = torch.multinomial(torch.softmax(w, 0), n, replacement=True, generator=generator)
        return {name: v[k] for name, v in self.values.items()}, w[k]

    def describe(self):
        """What bbvi.nuts did with the discrete latents, for the reference's attrs["discrete"]."""
        names = ", ".join(self.model.discrete)
        if self.dim == 0:
            return (f"exact: the posterior of {names} by enumeration of its {self.size} joint values "
                    f"({_support_text(self.model)}); independent draws from it, no NUTS")
        return (f"enumerated: {_support_text(self.model)}: {self.size} joint values summed out of NUTS's potential "
                f"by log-sum-exp; each draw's {names} drawn from the exact conditional given its continuous latents "
                f"and the data")
