"""Supports that torch lacks, with their bijections registered in `torch.distributions.biject_to`.

`ordered_vector`: x_1 < x_2 < ... < x_K (Stan's `ordered`), `positive_ordered_vector`: 0 < x_1 < ... < x_K
(Stan's `positive_ordered`). Both map from R^K by y_1 = u_1 (or exp(u_1)), y_k = y_{k-1} + exp(u_k), as Stan
does. `lower_cholesky` gets a bijection from the n(n+1)/2 free entries (torch's own maps n^2 numbers onto it,
half of them without effect, which would leave the variational target improper). Nothing is registered in
torch's global registry: `bijection(support)` looks bbvi's own up first.
"""
import math

import torch
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import Transform

__all__ = ["ordered_vector", "positive_ordered_vector", "bijection"]


class _Ordered(constraints.Constraint):
    event_dim = 1

    def __init__(self, positive):
        self.positive = positive
        super().__init__()

    def check(self, value):
        ok = (value[..., 1:] > value[..., :-1]).all(-1)
        return ok & (value[..., 0] > 0) if self.positive else ok

    def __repr__(self):
        return "positive_ordered_vector" if self.positive else "ordered_vector"


ordered_vector = _Ordered(positive=False)
positive_ordered_vector = _Ordered(positive=True)


class OrderedTransform(Transform):
    """u in R^K -> ordered y: y_1 = u_1 (or exp(u_1) if positive), y_k = y_{k-1} + exp(u_k)."""

    domain = constraints.independent(constraints.real, 1)
    bijective = True

    def __init__(self, positive=False, cache_size=0):
        self.positive = positive
        super().__init__(cache_size=cache_size)

    @property
    def codomain(self):
        return positive_ordered_vector if self.positive else ordered_vector

    def __eq__(self, other):
        return isinstance(other, OrderedTransform) and other.positive == self.positive

    def _call(self, u):
        steps = torch.cat([u[..., :1] if not self.positive else u[..., :1].exp(), u[..., 1:].exp()], -1)
        return steps.cumsum(-1)

    def _inverse(self, y):
        first = y[..., :1].log() if self.positive else y[..., :1]
        return torch.cat([first, (y[..., 1:] - y[..., :-1]).log()], -1)

    def log_abs_det_jacobian(self, u, y):
        lad = u[..., 1:].sum(-1)
        return lad + u[..., 0] if self.positive else lad


class LowerCholeskyTransform(Transform):
    """v in R^{n(n+1)/2} -> L lower triangular with positive diagonal (exp), row-major over the triangle."""

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.lower_cholesky
    bijective = True

    def __eq__(self, other):
        return isinstance(other, LowerCholeskyTransform)

    @staticmethod
    def _n(m):
        n = int(round((math.sqrt(8 * m + 1) - 1) / 2))
        if n * (n + 1) // 2 != m:
            raise ValueError(f"{m} is not a triangular number")
        return n

    def forward_shape(self, shape):
        n = self._n(shape[-1])
        return tuple(shape[:-1]) + (n, n)

    def inverse_shape(self, shape):
        n = shape[-1]
        return tuple(shape[:-2]) + (n * (n + 1) // 2,)

    def _call(self, v):
        n = self._n(v.shape[-1])
        rows, cols = torch.tril_indices(n, n, device=v.device)
        out = v.new_zeros(v.shape[:-1] + (n, n))
        out[..., rows, cols] = v
        diag = out.diagonal(dim1=-2, dim2=-1)
        return out - torch.diag_embed(diag) + torch.diag_embed(diag.exp())

    def _inverse(self, y):
        n = y.shape[-1]
        rows, cols = torch.tril_indices(n, n, device=y.device)
        y = y - torch.diag_embed(y.diagonal(dim1=-2, dim2=-1)) + torch.diag_embed(
            y.diagonal(dim1=-2, dim2=-1).log())
        return y[..., rows, cols]

    def log_abs_det_jacobian(self, v, y):
        return y.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def bijection(support):
    """The transform from unconstrained space onto `support`: bbvi's own for the supports above (looked up
    here, not registered in torch's global `biject_to`), torch's `biject_to` for everything else.
    Raises NotImplementedError where neither knows one."""
    if isinstance(support, _Ordered):
        return OrderedTransform(positive=support.positive)
    if support is constraints.lower_cholesky:
        return LowerCholeskyTransform()
    return biject_to(support)
