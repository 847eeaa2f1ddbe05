"""The model's first call (`Model.check`): the log-joint called once on S >= 2 particles, and every way it can be
wrong said exactly (missing or unread latents, a non-tensor, a wrong shape or dtype, z edited in place, NaN/inf at
the initial point, rows that mix particles), with the fix in the message. Returns a CheckReport."""
import dataclasses
import math

import torch

from .errors import ModelError
from .terms import terms_matrix


class NotFiniteStart(ModelError):
    """The log-joint is NaN/inf at the initial point (particle 0 of the first call)."""


class _ReadTracker(dict):
    """A dict that remembers which keys the log-joint read (used once, by `Model.check`)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        if key not in self:
            raise KeyError(key)
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def items(self):
        self.read.update(super().keys())
        return super().items()

    def values(self):
        self.read.update(super().keys())
        return super().values()

    def keys(self):  # also the path dict(z) and {**z} take: a copy counts as reading everything
        self.read.update(super().keys())
        return super().keys()

    def __iter__(self):
        self.read.update(super().keys())
        return super().__iter__()


@dataclasses.dataclass(frozen=True)
class CheckReport:
    """What `Model.check` learnt on the first call: whether torch can differentiate the log-joint in every
    continuous latent (`differentiable`), and which latents it cannot (`nondifferentiable`)."""

    differentiable: bool
    nondifferentiable: tuple
    factors: tuple = None   # ((name, number of elements), ...) when the log-joint returns factor terms
    # check(..., particles=False): (z copies, the batch's values, S) for a later `Model.check_particles`
    probe: object = dataclasses.field(default=None, repr=False, compare=False)


def check(model, u, discrete, *, particles=True):
    """Call the log-joint once on S >= 2 particles (u (S, D), discrete dict) and say exactly what is wrong:
    missing or unread latents, a non-tensor, wrong shape or dtype, z edited in place, NaN/inf at the first
    particle (the initial point), rows that mix particles (particle 0 alone and the probe reversed against the
    batch: two more calls). Returns a CheckReport on differentiability. particles=False leaves the last check
    for `check_particles(report)` (fit runs it after the start, so that the start's calls to the log-joint
    come in the same order as without it)."""
    S = u.shape[0]
    u = u.detach().requires_grad_(model.dim > 0 and model.differentiable is not False)
    z, ladj = model.constrain(u)
    z.update(discrete)
    before = {k: v.detach().clone() for k, v in z.items()}  # to see in-place edits, and for the particle check
    tracked = _ReadTracker(z)
    try:
        out = model.call_raw(tracked) if model.vectorized else model.call_raw(z)
    except KeyError as e:
        if e.args and isinstance(e.args[0], str) and e.args[0] not in model.latents:
            raise ModelError(f"model {model.name!r}: log_joint reads latent {e.args[0]!r}, which is not "
                             f"declared; declared latents: {sorted(model.latents)}") from e
        raise
    except Exception as e:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in z.items())
        hint = ""
        if isinstance(e, RuntimeError) and "in-place operation" in str(e):  # autograd refused an edit of z
            _find_edit(model, before)
            hint = (" It looks like the log-joint edits z in place (z[name] += ..., .mul_(...)): z's tensors "
                    "are bbvi's own particles; use out-of-place ops (x = z[name] + ...).")
        raise ModelError(f"model {model.name!r}: log_joint raised {type(e).__name__} on its first call, with S={S} "
                         f"particles and z shapes {{{shapes}}} (particles first): {e}{hint}") from e
    _check_not_edited(model, z, before)
    factors = None
    if isinstance(out, dict):
        factors = _check_terms(model, out, S)
        out = terms_matrix(out).sum(-1)
    if not torch.is_tensor(out):
        raise ModelError(f"model {model.name!r}: log_joint must return a torch.Tensor of shape (S,) = ({S},), "
                         f"got {type(out).__name__} {out!r:.60}")
    if not out.is_floating_point():
        raise ModelError(f"model {model.name!r}: log_joint returned dtype {out.dtype}; it must be floating "
                         f"point (log densities are real numbers)")
    if tuple(out.shape) != (S,):
        if not model.vectorized:  # bbvi looped over the particles and stacked one return per particle
            raise ModelError(f"model {model.name!r}: with vectorized=False, log_joint gets one particle (z[name] "
                             f"has the latent's own shape, no particle dimension) and must return a scalar "
                             f"(shape ()); it returned shape {tuple(out.shape[1:])} for one particle. Reduce "
                             f"it to a scalar (.sum(), or .squeeze() for shape (1,)).")
        hint = (" It looks summed over particles: reduce over the data dimension only."
                if out.dim() == 0 else " Particles come first in every z value: z[name] has shape (S, *shape).")
        raise ModelError(f"model {model.name!r}: log_joint returned shape {tuple(out.shape)} for S={S} "
                         f"particles; expected ({S},).{hint}")
    if model.vectorized:
        unread = [k for k in model.latents if k not in tracked.read and not model.latents[k].is_discrete]
        if unread:
            raise ModelError(f"model {model.name!r}: latent(s) {unread} are declared but log_joint never "
                             f"reads them; their posterior would be improper. Remove them or use them.")
    if not torch.isfinite(out[0]):
        at = {k: v[0].tolist() for k, v in z.items()}
        raise NotFiniteStart(f"model {model.name!r}: log_joint is {out[0].item()} at the initial point {at}; it "
                             f"must be finite there (check the supports of the latents, or start elsewhere with "
                             f"bbvi.fit(..., init_values={{...}}), continuous or discrete latents)")
    probe = (before, out.detach(), S) if model.vectorized else None
    if particles and probe is not None:
        _check_particles_apart(model, *probe)
    kept = None if particles else probe
    if model.differentiable is False or model.dim == 0:
        return CheckReport(model.differentiable is not False, (), factors, kept)
    if not out.requires_grad:
        return CheckReport(False, tuple(b.name for b in model.blocks), factors, kept)
    grads = torch.autograd.grad(out.sum() + ladj.sum() * 0, [z[b.name] for b in model.blocks],
                                allow_unused=True)
    dead = tuple(b.name for b, g in zip(model.blocks, grads) if g is None)
    if model.differentiable is True and dead:
        raise ModelError(f"model {model.name!r} is declared differentiable, but torch gets no gradient of "
                         f"log_joint in latent(s) {list(dead)}")
    return CheckReport(not dead, dead, factors, kept)

def _check_not_edited(model, z, before):
    """ModelError when the first call changed a value of z in place (z[name] += ..., z[name].mul_(...)): z's
    tensors are bbvi's particles (for a real latent a view of q's draws), so the edit would change what bbvi
    scores and moves."""
    for name, old in before.items():
        new = z[name].detach()
        if new.shape == old.shape:
            same = (new == old)
            if old.is_floating_point():
                same = same | (new.isnan() & old.isnan())
            if bool(same.all()):
                continue
            flat = (~same).reshape(-1).nonzero()[0, 0]
            was, now = old.reshape(-1)[flat].item(), new.reshape(-1)[flat].item()
            where = f": one entry was {was:.6g} before the call and {now:.6g} after it"
        else:
            where = f": its shape changed from {tuple(old.shape)} to {tuple(new.shape)}"
        raise ModelError(f"model {model.name!r}: log_joint changed latent {name!r} in place{where}. z's tensors are "
                         f"bbvi's own particles, so an in-place edit (z[{name!r}] += ..., z[{name!r}].mul_(...), "
                         f"x[...] = ... on x = z[{name!r}]) changes the draws bbvi scores and moves: use "
                         f"out-of-place ops (x = z[{name!r}] + 5, x = z[{name!r}] * 2, or x = z[{name!r}].clone() "
                         f"before editing x)")

def _find_edit(model, before):
    """After autograd refused an in-place edit on the first call: call again on copies without gradient and
    name the latent edited (ModelError from `_check_not_edited`); return quietly if that call tells nothing."""
    import warnings
    copies = {k: v.clone() for k, v in before.items()}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.call_raw(copies)
    except Exception:  # noqa: BLE001 - only used to name the latent
        return
    _check_not_edited(model, copies, before)

def check_particles(model, report):
    """The particle check `check(..., particles=False)` left out, on the probe it kept in `report`; returns
    the report without the probe."""
    if report.probe is not None:
        _check_particles_apart(model, *report.probe)
    return dataclasses.replace(report, probe=None)

def _check_particles_apart(model, z, batch, S):
    """ModelError when the log-joint mixes particles: `batch` (S,) is its value on the probe z (dict of detached
    copies, S particles); particle 0 on its own, and the probe in reverse order, must give the same rows (to
    a tolerance from the dtype; finite rows only). A mismatch is confirmed by calling both again: a log-joint
    whose values change from call to call (a simulator's noise) is not judged. Uses no generator of the fit;
    torch's, numpy's and Python's global RNGs are left as they were before these calls, and their warnings
    are not shown."""
    import random
    import warnings

    import numpy as np
    tol = math.sqrt(torch.finfo(batch.dtype).eps)

    def close(a, b):
        return (a == b) | (a.isnan() & b.isnan()) | ((a - b).abs() <= tol * (1 + torch.maximum(a.abs(), b.abs())))

    def value(idx):
        try:
            got = model.call({k: v[idx] for k, v in z.items()})
        except Exception:  # noqa: BLE001 - e.g. a log-joint that squeezes a single particle away: not judged
            return None
        if not torch.is_tensor(got) or got.numel() != len(idx):
            return None
        return got.detach().reshape(-1).to(batch.dtype)

    device = batch.device
    states = (random.getstate(), np.random.get_state())
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for what, order in (("on its own", [0]), ("in the probe reversed", list(range(S - 1, -1, -1)))):
                idx = torch.tensor(order, device=device)
                got = value(idx)
                if got is None:
                    continue
                want = batch[idx]
                # only finite rows are judged: a NaN/inf row says nothing about which particles it read
                bad = ~close(got, want) & torch.isfinite(got) & torch.isfinite(want)
                if not bool(bad.any()):
                    continue
                # a log-joint whose values change from call to call (noise, a stateful simulator) is not judged
                got_again, batch_again = value(idx), value(torch.arange(S, device=device))
                if got_again is None or batch_again is None or not bool(close(got_again, got).all()) \
                        or not bool(close(batch_again, batch).all()):
                    return
                r = int(bad.nonzero()[0, 0])
                raise ModelError(
                    f"model {model.name!r}: log_joint mixes particles: row s of the output must depend only on "
                    f"particle s (z[name][s]), but particle {order[r]} evaluated {what} gives "
                    f"{got[r].item():.10g}, while in the batch of {S} particles it gave {want[r].item():.10g}. "
                    f"Something reduces or normalises over dim 0, the particle axis (log_softmax(..., dim=0), "
                    f"x - x.mean(0), a sum, cumsum or sort over dim 0): reduce over the data dimensions only "
                    f"(dim=-1), keeping particles first.")
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])

def _check_terms(model, out, S):
    """Validate a dict of factor terms; -> tuple of (name, number of elements)."""
    if not out:
        raise ModelError(f"model {model.name!r}: log_joint returned an empty dict of factor terms")
    factors = []
    for name, v in out.items():
        if not torch.is_tensor(v) or not v.is_floating_point():
            raise ModelError(f"model {model.name!r}: factor term {name!r} must be a floating torch.Tensor of "
                             f"shape (S,) or (S, n) with S={S}, got {type(v).__name__} {v!r:.60}")
        if v.dim() == 0 or v.shape[0] != S:
            raise ModelError(f"model {model.name!r}: factor term {name!r} has shape {tuple(v.shape)}; expected "
                             f"(S,) or (S, n) with S={S} particles first")
        factors.append((str(name), int(v[0].numel())))
    for term in model.dependencies or {}:
        if term not in out:
            raise ModelError(f"model {model.name!r}: dependencies names factor term {term!r}, but log_joint "
                             f"returns terms {list(out)}")
    return tuple(factors)

# ---- device / dtype -----------------------------------------------------------------------------------
