"""The latents of a model: `Latent` (a named unknown's shape and support), the range of a discrete one, and
`layout`, where each continuous one lives in the flat unconstrained vector (its `_Block`: slice and bijection).
model.py builds a `Model` on them and re-exports them."""
import dataclasses
import math
import numbers

import torch
from torch.distributions import constraints
from torch.distributions.transforms import ComposeTransform

from .constraints import bijection
from .errors import ModelError

__all__ = ["Latent"]


@dataclasses.dataclass(frozen=True)
class Latent:
    """A named unknown of the model. `shape`: the shape of one draw (no particle dimension); `support`: a
    `torch.distributions.constraints` object (real by default; `boolean` or `integer_interval(lo, hi)` make
    the latent discrete)."""

    shape: tuple = ()
    support: constraints.Constraint = constraints.real

    def __post_init__(self):
        shape = (self.shape,) if isinstance(self.shape, numbers.Integral) else self.shape
        try:
            shape = tuple(shape)
        except TypeError:
            raise ModelError(f"Latent shape must be a tuple of positive ints, got {self.shape!r}") from None
        for n in shape:
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
                raise ModelError(f"Latent shape must be a tuple of positive ints, got {self.shape!r} "
                                 f"(size {n!r} is not a positive int)")
        object.__setattr__(self, "shape", tuple(int(n) for n in shape))
        if not isinstance(self.support, constraints.Constraint):
            raise ModelError(f"Latent support must be a torch.distributions.constraints object, got "
                             f"{self.support!r}")

    @property
    def is_discrete(self):
        return bool(self.support.is_discrete)

    @property
    def numel(self):
        return math.prod(self.shape)


MAX_CATEGORIES = 10 ** 4   # the most values one discrete latent's Categorical factor may enumerate


def _discrete_range(name, latent):
    """(low, number of categories) of a discrete latent; ModelError for supports bbvi cannot enumerate."""
    s = latent.support
    if s is constraints.boolean:
        return 0, 2
    if isinstance(s, constraints._IntegerInterval):
        bounds = (s.lower_bound, s.upper_bound)
        if not all(isinstance(b, numbers.Integral) or (isinstance(b, float) and b.is_integer()) or
                   (torch.is_tensor(b) and b.numel() == 1 and float(b).is_integer()) for b in bounds):
            raise ModelError(f"latent {name!r}: support integer_interval({bounds[0]!r}, {bounds[1]!r}) needs whole-"
                             f"number bounds (int() would cut them to integer_interval({int(bounds[0])}, "
                             f"{int(bounds[1])}), and draw values outside the support you wrote): use "
                             f"integer_interval({math.ceil(float(bounds[0]))}, {math.floor(float(bounds[1]))})")
        lo, hi = int(s.lower_bound), int(s.upper_bound)
        if hi < lo:
            raise ModelError(f"latent {name!r}: empty support integer_interval({lo}, {hi})")
        k = hi - lo + 1
        if k > MAX_CATEGORIES:
            raise ModelError(f"latent {name!r}: support integer_interval({lo}, {hi}) has {k} categories; bbvi's "
                             f"discrete factor is a Categorical over every value of the support (logits, "
                             f"draws and the score terms are (*shape, {k}) per particle), and it takes at most "
                             f"{MAX_CATEGORIES}. Use a continuous latent with rounding in the log-joint (e.g. "
                             f"support=constraints.interval({lo}, {hi + 1}) and z[{name!r}].floor()), or a "
                             f"smaller range")
        return lo, k
    raise ModelError(f"latent {name!r}: discrete support {s!r} is unbounded; bbvi's discrete factors need a "
                     f"finite one: use constraints.boolean or constraints.integer_interval(low, high)")


@dataclasses.dataclass(frozen=True)
class _Block:
    """Where one continuous latent lives in the flat unconstrained vector."""

    name: str
    shape: tuple
    unconstrained_shape: tuple
    transform: object
    start: int
    stop: int
    identity: bool


def layout(latents):
    """The continuous latents' `_Block`s, in declaration order: each one's bijection from unconstrained space
    (bbvi.constraints.bijection) and its slice of the flat unconstrained vector; ModelError for a support or
    shape that has none."""
    blocks, start = [], 0
    for name, lat in latents.items():
        if lat.is_discrete:
            continue
        lo, hi = getattr(lat.support, "lower_bound", None), getattr(lat.support, "upper_bound", None)
        if lo is not None and hi is not None and not bool(torch.all(torch.as_tensor(lo) < torch.as_tensor(hi))):
            raise ModelError(f"latent {name!r}: support {lat.support!r} is empty or a single point: its lower "
                             f"bound {lo} must be below its upper bound {hi}")
        try:
            t = bijection(lat.support)
        except NotImplementedError:
            raise ModelError(f"latent {name!r}: support {lat.support!r} has no bijection from unconstrained "
                             f"space (torch.distributions.biject_to knows none); use a supported constraint "
                             f"or reparameterize it in the log-joint") from None
        if len(lat.shape) < t.codomain.event_dim:
            raise ModelError(f"latent {name!r}: support {lat.support!r} needs at least "
                             f"{t.codomain.event_dim} dimension(s), got shape {lat.shape}")
        try:
            ushape = tuple(t.inverse_shape(lat.shape))
            ok = tuple(t.forward_shape(ushape)) == lat.shape
        except (ValueError, IndexError, RuntimeError):
            ok = False
        if not ok:
            raise ModelError(f"latent {name!r}: shape {lat.shape} does not fit support {lat.support!r} "
                             f"(e.g. lower_cholesky needs (n, n))")
        size = math.prod(ushape)
        if size == 0:
            raise ModelError(f"latent {name!r}: support {lat.support!r} with shape {lat.shape} has a single "
                             f"possible value, so it is a constant, not a latent: put the value in the "
                             f"log-joint, or give it more entries (e.g. simplex of shape (K,) with K >= 2)")
        identity = isinstance(t, ComposeTransform) and not t.parts
        blocks.append(_Block(name, lat.shape, ushape, t, start, start + size, identity))
        start += size
    return tuple(blocks)
