"""Rao-Blackwellized sums over a discrete latent's support (local expectation gradients; Titsias & Lazaro-Gredilla
2015), for the latents a user names: `bbvi.Auto(sum_over=("tau",))` or `bbvi.Score(sum_over=...)`.

For a discrete entry e of a mean-field q with probabilities q_e(j) over its K values and a drawn particle s, the
score term's expectation over z_e given everything else drawn is a finite sum, taken exactly:

    g_e = mean_s sum_j grad q_e(j) f(z_s with z_e = v_j),      f = log p(x, z) - log q_e(v_j)

(the other factors of log q do not depend on z_e and drop out: sum_j grad q_e(j) = 0). It is unbiased, has no
baseline and no variance from z_e itself. It costs K evaluations of the log-joint per entry and particle: a
particle of a latent with E entries costs 1 + E K evaluations instead of 1 (the per-latent choice is the user's:
worth it where K E is small, a change point's position, a handful of assignments). The entries summed over leave
the score terms (their baseline sees the other discrete latents only); the continuous path and the ELBO value are
those of the drawn particles, unchanged.
"""
import math

import torch

from ..errors import ConfigError

__all__ = ["check_sum_over", "sum_terms", "MAX_ROWS"]

MAX_ROWS = 2 ** 16   # evaluations per particle the sums of one fit may take (E K summed over the named latents)
_CHUNK = 4096        # rows per call of the log-joint


def check_sum_over(names, model):
    """The validated tuple of latent names (ConfigError naming what is wrong)."""
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    if not names:
        return names
    unknown = [n for n in names if n not in model.latents]
    if unknown:
        raise ConfigError(f"sum_over names {unknown}, which model {model.name!r} does not have; its discrete "
                          f"latents are {list(model.discrete)}")
    continuous = [n for n in names if n not in model.discrete]
    if continuous:
        raise ConfigError(f"sum_over={list(names)}: {continuous} of model {model.name!r} are continuous; only a "
                          f"discrete latent's support can be summed over exactly")
    if len(set(names)) != len(names):
        raise ConfigError(f"sum_over names a latent twice: {list(names)}")
    rows = {n: math.prod(model.discrete[n][0].shape) * model.discrete[n][2] for n in names}
    if sum(rows.values()) > MAX_ROWS:
        raise ConfigError(f"sum_over={list(names)} costs {sum(rows.values())} log-joint evaluations per particle "
                          f"(entries x values: {rows}), more than {MAX_ROWS}: sum over fewer or smaller latents "
                          f"and leave the others to the score terms")
    return names


def _support(discrete, name, like):
    for n, shape, low, k, boolean in discrete.spec:
        if n == name:
            values = torch.arange(k, device=like.device)
            return shape, k, (values.to(like.dtype) if boolean else values + low)
    raise KeyError(name)


def _log_p(model, u, k):
    """The log-joint at every row, in chunks, without gradient; NaN where it raised."""
    out = []
    with torch.no_grad():
        for i in range(0, u.shape[0], _CHUNK):
            lp, _ = model.log_density_guarded(u[i:i + _CHUNK], {n: v[i:i + _CHUNK] for n, v in k.items()})
            out.append(lp.to(u.dtype))
    return torch.cat(out)


def sum_terms(names, model, discrete, pd, u, k):
    """A scalar of value zero whose gradient in the logits of the latents in `names` is their exact sums' gradient
    estimate (mean over the S drawn particles (u (S, D), k)). A (particle, entry) whose sum meets a NaN or +inf
    log-joint contributes nothing; a value with log-joint -inf (outside the posterior's support) gets a floor
    below every finite one, so q moves its mass away from it."""
    u = u.detach()
    S = u.shape[0]
    total = u.new_zeros(())
    for name in names:
        shape, K, values = _support(discrete, name, k[name])
        E = math.prod(shape)
        base = k[name].reshape(S, E)
        rows = base[:, None, None, :].repeat(1, E, K, 1)                       # (S, E, K, E)
        idx = torch.arange(E, device=u.device)
        rows[:, idx, :, idx] = values.to(rows.dtype).expand(E, S, K)                # rows[s, e, j, e] = v_j
        n = S * E * K
        kk = {m: v.repeat_interleave(E * K, 0) for m, v in k.items() if m != name}
        kk[name] = rows.reshape((n,) + tuple(shape))
        lp = _log_p(model, u.repeat_interleave(E * K, 0), kk).reshape(S, E, K)
        logits = pd[name].reshape(E, K)
        lq = torch.log_softmax(logits, -1)
        f = lp - lq.detach()
        finite = torch.isfinite(f)
        ok = (finite | (f == -math.inf)).all(-1) & finite.any(-1)                # (S, E): a usable sum
        fin = torch.where(finite, f, torch.full_like(f, math.inf))
        lo = fin.min(-1, keepdim=True).values
        hi = torch.where(finite, f, torch.full_like(f, -math.inf)).max(-1, keepdim=True).values
        f = torch.where(f == -math.inf, lo - (hi - lo) - 10.0, f)
        f = torch.where(ok[..., None], f - f.mean(-1, keepdim=True), torch.zeros_like(f))  # sum_j grad q_j = 0
        total = total + (torch.softmax(logits, -1) * f.detach()).sum((1, 2)).sum(0) / S
    return total - total.detach()
