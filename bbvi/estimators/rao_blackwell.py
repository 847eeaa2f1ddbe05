"""Rao-Blackwellized score terms for log-joints that return factor terms (Ranganath et al. 2014, section 3.1).

With a factorized q = prod_c q_c (each continuous coordinate under a mean-field family, each discrete entry)
the score term of coordinate c needs only the factor terms in its Markov blanket:

    g_c = mean_s (F_sc - b_sc) grad log q_c(z_sc),   F_sc = sum_{e in MB(c)} t_e(z_s) - log q_c(z_sc)

(the terms that do not depend on z_c, and the other coordinates' log q, are independent of z_c under q, so
their products with the score have mean zero: dropping them keeps the mean and removes their variance). The
baseline b_sc is applied per coordinate. A continuous block whose family does not factorize (full rank, low
rank) is one coordinate whose blanket is every term that depends on any continuous coordinate.

`discover` finds MB once, at the first call: element e depends on coordinate c where torch's gradient of t_e in
u_c is non-zero (a differentiable log-joint) or where perturbing z_c changes t_e (every log-joint: each
continuous coordinate moved, each discrete entry set to every other value), at 4 base points, 16 with discrete
latents (random discrete values, so that a dependency that holds only in some discrete configurations, such as
a mixture's assignment choosing its component, is seen), or as the model's `dependencies` declare. A missed
dependency would bias the estimate, so every doubt counts as a dependency; where a dependency can hide from
sixteen random points (a branch taken with small probability), declare it.
"""
import dataclasses

import torch

from ..errors import ConfigError
from .baselines import EMA, LOO
from .trick import magic_box

__all__ = ["Structure", "discover", "score_terms", "rao_blackwellized"]


@dataclasses.dataclass(frozen=True)
class Structure:
    """Which term elements depend on which coordinates: `continuous` (E, D) and `discrete` (E, Ed) booleans,
    E the elements of `Model.log_density_terms`, Ed the discrete entries in the order of bbvi.families.Discrete."""

    continuous: torch.Tensor
    discrete: torch.Tensor

    def select(self, rows):
        """The structure of the term elements `rows` (a minibatch's: bbvi.subsample.structure_rows)."""
        return Structure(self.continuous[rows], self.discrete[rows])

    def summary(self):
        """Mean blanket size (elements per coordinate) against the number of elements."""
        both = torch.cat([self.continuous, self.discrete], 1)
        return {"elements": both.shape[0], "coordinates": both.shape[1],
                "mean_blanket": float(both.sum(0).double().mean()) if both.shape[1] else 0.0}


def rao_blackwellized(report, plan):
    """Whether a fit's score terms are Rao-Blackwellized: the log-joint returns factor terms, the plan has score
    terms, and no exact sums replace them (bbvi.fit then discovers the terms' dependency structure)."""
    return report.factors is not None and plan.has_score_terms and not plan.sum_over


def _entries(model, discrete):
    """[(latent name, flat index, low, K, boolean)] for every discrete entry, in Discrete's order."""
    out = []
    for name, shape, low, k, boolean in discrete.spec:
        n = 1
        for s in shape:
            n *= s
        out += [(name, i, low, k, boolean) for i in range(n)]
    return out


def _declared(report):
    """Columns declared by Model(dependencies=...): element index ranges -> latent names."""
    spans, start = {}, 0
    for name, size in report.factors:
        spans[name] = (start, start + size)
        start += size
    return spans


def _bases(model, discrete, u, k, num):
    """num base points: the given rows (u (B, D), k), then points u[0] + N(0, 1) with discrete values drawn
    uniformly (a fixed generator of its own: the fit's generator is not touched), so that dependencies that
    hold only in some discrete configurations (a mixture's assignment picks its component) are seen."""
    g = torch.Generator(device=u.device).manual_seed(0)
    extra = num - u.shape[0]
    if extra <= 0:
        return u, k
    uu = u[:1] + torch.randn(extra, u.shape[1], generator=g, device=u.device, dtype=u.dtype)
    kk = {}
    for name, shape, low, K, boolean in discrete.spec:
        idx = torch.randint(K, (extra, *shape), generator=g, device=u.device)
        kk[name] = idx.to(u.dtype) if boolean else idx + low
    return torch.cat([u, uu]), {n: torch.cat([k[n], kk[n].to(k[n].dtype)]) for n in k}


def _perturbed(u_b, k_b, entries, D):
    """Rows for one base point: the base, each continuous coordinate moved by +0.37 and -1.1, each discrete
    entry set to every other value. -> (u rows, k rows, owner per row)."""
    rows_u, rows_k, owner = [u_b], [k_b], [None]
    for d in range(D):
        for delta in (0.37, -1.1):
            v = u_b.clone()
            v[0, d] += delta
            rows_u.append(v)
            rows_k.append(k_b)
            owner.append(("c", d))
    for e, (name, i, low, K, boolean) in enumerate(entries):
        current = int(k_b[name].reshape(-1)[i].item()) - (0 if boolean else low)
        for alt in range(K):
            if alt == current:
                continue
            kk = {n: t.clone() for n, t in k_b.items()}
            flat = kk[name].reshape(-1)
            flat[i] = alt if boolean else alt + low
            rows_u.append(u_b)
            rows_k.append(kk)
            owner.append(("d", e))
    return torch.cat(rows_u), {n: torch.cat([r[n] for r in rows_k]) for n in k_b}, owner


def _autograd_dependencies(model, u_b, k_b, dep_c):
    """Mark element e as depending on u_d where torch's gradient of t_e in u_d is non-zero."""
    v = u_b.detach().clone().requires_grad_(True)
    t = model.log_density_terms(v, k_b)[0]
    if not t.requires_grad:
        return
    E = t.shape[0]
    for lo in range(0, E, 256):
        hi = min(E, lo + 256)
        eye = torch.zeros(hi - lo, E, dtype=t.dtype, device=t.device)
        eye[torch.arange(hi - lo), torch.arange(lo, hi)] = 1
        try:
            g = torch.autograd.grad(t, v, grad_outputs=eye, is_grads_batched=True, retain_graph=True,
                                    allow_unused=True)[0]
        except Exception:  # noqa: BLE001 - user code vmap cannot batch: one element at a time
            g = torch.stack([torch.autograd.grad(t[e], v, retain_graph=True, allow_unused=True)[0]
                             if t[e].requires_grad else None or torch.zeros_like(v) for e in range(lo, hi)])
        if g is not None:
            dep_c[lo:hi] |= (g.reshape(hi - lo, -1) != 0).cpu()


def discover(model, discrete, report, u, k, differentiable):
    """The Structure of `model`, probed at base particles u (B, D), k (dict, B rows) and, with discrete
    latents, at 14 more base points with random discrete values (2 more without)."""
    entries = _entries(model, discrete)
    u, k = _bases(model, discrete, u.detach(), k, 16 if entries else 4)
    D = u.shape[1]
    dep_c = dep_d = None
    for b in range(u.shape[0]):
        k_b = {n: v[b:b + 1] for n, v in k.items()}
        U, Kd, owner = _perturbed(u[b:b + 1], k_b, entries, D)
        with torch.no_grad():
            T, _ = model.log_density_terms_guarded(U, Kd)
        if dep_c is None:
            dep_c = torch.zeros(T.shape[1], D, dtype=torch.bool)
            dep_d = torch.zeros(T.shape[1], len(entries), dtype=torch.bool)
        changed = ~((T == T[:1]) | (torch.isnan(T) & torch.isnan(T[:1])))  # NaN/inf changes count as changes
        for i, who in enumerate(owner):
            if who is not None:
                kind, j = who
                (dep_c if kind == "c" else dep_d)[:, j] |= changed[i].cpu()
        if differentiable and D:
            _autograd_dependencies(model, u[b:b + 1], k_b, dep_c)
    if model.dependencies:
        spans = _declared(report)
        for term, names in model.dependencies.items():
            lo, hi = spans[term]
            dep_c[lo:hi] = False
            dep_d[lo:hi] = False
            for blk in model.blocks:
                if blk.name in names:
                    dep_c[lo:hi, blk.start:blk.stop] = True
            for e, (name, *_rest) in enumerate(entries):
                if name in names:
                    dep_d[lo:hi, e] = True
    return Structure(dep_c, dep_d)


def check_baseline(baseline):
    if baseline is not None and not isinstance(baseline, (LOO, EMA)):
        raise ConfigError(f"baseline {baseline!r} has no per-coordinate form for the Rao-Blackwellized score terms "
                          f"of a log-joint that returns factor terms; use baseline='loo' (the default), 'ema' or None")


def _column_baseline(baseline, F, mask, n, state):
    """b (S, C) per coordinate for F (S, C), and the next state."""
    if baseline is None:
        return 0.0, state
    if isinstance(baseline, LOO):
        b = (F.sum(0) - F) / ((n - 1).clamp_min(1) if torch.is_tensor(n) else max(n - 1, 1))
        return (b if mask is None else b * mask[:, None]), state
    if not isinstance(baseline, EMA):
        check_baseline(baseline)
    col_mean = F.sum(0) / n
    value, weight = state["value"], state["weight"]
    b = torch.where(weight > 0, value / weight.clamp_min(1e-30), torch.zeros_like(value))
    d = baseline.decay
    ok = torch.isfinite(col_mean)
    return b, {"value": torch.where(ok, d * value + (1 - d) * col_mean, value),
               "weight": torch.where(ok, d * weight + (1 - d), weight)}


def score_terms(structure, p, terms, lq_columns, score_continuous, baseline, state):
    """The Rao-Blackwellized score carrier. terms (S, E) the term elements (detached, zero at invalid
    particles); lq_columns (S, C) the log q of each coordinate with gradient (continuous coordinates first when
    `score_continuous`: D of them, or one for a family that does not factorize; then the discrete entries).
    Returns (carrier, state)."""
    C = lq_columns.shape[1]
    Ed = structure.discrete.shape[1]
    dev, dt = terms.device, terms.dtype
    cols = []
    if score_continuous:
        dep_c = structure.continuous.to(dev)
        cols.append(dep_c if C - Ed == dep_c.shape[1] else dep_c.any(1, keepdim=True))
    cols.append(structure.discrete.to(dev))
    A = torch.cat(cols, 1).to(dt)
    F = terms @ A - lq_columns.detach()
    if p.mask is not None:
        F = F * p.mask[:, None]
        lq_columns = lq_columns * p.mask[:, None]
    b, state = _column_baseline(baseline, F, p.mask, p.n, state)
    return (magic_box(lq_columns) * (F - b)).sum() / p.n, state
