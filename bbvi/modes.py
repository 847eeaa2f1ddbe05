"""Posterior modes that q does not cover.

A Gaussian q fitted to one mode of a multimodal posterior never draws from the others, so its importance weights
are small and steady and PSIS k-hat reads 'good' (seen: k-hat 0.1 for q on one of two equal, well-separated modes).
Only a search of the density itself can tell. `other_modes` climbs the log density from `num_starts` points drawn
from q widened 2, 4, 8 and 16 times, in antithetic pairs (one batched gradient-ascent run, Adam in
units of q's sd), polishes the end points
that did not come back to q's mode with L-BFGS, and compares the modes it finds by their Laplace mass
log p(m) + D/2 log 2 pi - 1/2 log det H(m). On big data (a plate of more than 2 * SEARCH_ROWS rows) the climb
runs on SEARCH_ROWS rows of each such plate, with the minibatch control variates anchored at q's mean
(bbvi.subsample.thinned: at N = 1e6 it was most of a 214 s check); polishing and masses use the full data.

It runs where torch can differentiate the log-joint, the model has continuous latents only and at most MAX_DIM of
them (the Hessians are D x D); elsewhere it says why it did not run. A mode it does not find is not ruled out.
"""
import math

import torch

__all__ = ["other_modes", "MAX_DIM", "MIN_MASS"]

MAX_DIM, MIN_MASS = 200, 0.01   # 200: method='auto''s full-rank limit (Hessians of 200 x 200: 200 gradient evaluations each)
MAX_POLISH = 6   # far end points polished at most (each up to 200 L-BFGS iterations)
SEARCH_ROWS = 2 ** 16   # rows of a big plate the climb evaluates


def _polish(f, y0, max_iter=200):
    """L-BFGS from y0 on -f; returns (y, f(y)) or None where it leaves the support or f is unbounded."""
    y = y0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([y], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                            tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = -f(y[None])[0]  # a log-joint that raises ends this polish (no mode is claimed from it)
        if not torch.isfinite(loss):
            y.grad = torch.zeros_like(y)
            return torch.tensor(float("inf"), dtype=y.dtype, device=y.device)
        loss.backward()
        return loss.detach()
    try:
        opt.step(closure)
        y = y.detach()
        value = f(y[None])[0].detach()
    except Exception:  # noqa: BLE001
        return None
    return (y, value) if bool(torch.isfinite(y).all()) and bool(torch.isfinite(value)) else None


def _dip(f, a, b, margin=0.5):
    """True when the log density dips more than `margin` nats below both modes somewhere on the segment between
    them: two separate modes, not two stops on one ridge or plateau."""
    t = torch.linspace(0.05, 0.95, 19, dtype=a[0].dtype, device=a[0].device)[:, None]
    try:
        with torch.no_grad():
            between = f(a[0] + t * (b[0] - a[0]))
    except Exception:  # noqa: BLE001
        return False
    return bool(torch.isfinite(between).all()) and float(between.min()) < min(float(a[1]), float(b[1])) - margin


def _laplace_log_mass(f, y, value):
    """log p(m) + D/2 log 2 pi - 1/2 log det H, or None where H is not positive definite (no proper mode)."""
    try:
        hess = torch.autograd.functional.hessian(lambda v: -f(v[None])[0], y)
        hess = 0.5 * (hess + hess.T)
        chol, info = torch.linalg.cholesky_ex(hess)
    except Exception:  # noqa: BLE001
        return None
    if int(info) != 0 or not bool(torch.isfinite(chol).all()):
        return None
    return float(value) + 0.5 * y.numel() * math.log(2 * math.pi) - float(torch.log(chol.diagonal()).sum())


def other_modes(result, u, seed=0, num_starts=16, steps=150, spreads=(2.0, 4.0, 8.0, 16.0)):
    """Search the log density for modes away from q's. `u`: (S, D) draws of q (unconstrained). Returns a dict:
    'ran' (bool), 'note' (why not, or what was found), 'num_evals' (log density gradient evaluations spent),
    'modes': [{'distance': in q's sds from q's mode, 'mass': share of the Laplace mass of the modes found}],
    q's mode first."""
    model = result.model
    if model.dim and not model.discrete and not result.report.differentiable:
        return far_mass(result, u, seed)
    if model.dim == 0 or model.discrete:
        why = "it has discrete latents" if model.discrete else "it has no continuous latents"
        return {"ran": False, "note": f"no mode search: {why}", "num_evals": 0, "modes": []}
    if model.dim > MAX_DIM:
        return {"ran": False, "note": f"no mode search: {model.dim} continuous coordinates (> {MAX_DIM})",
                "num_evals": 0, "modes": []}
    u = u.detach()
    center, sd = u.mean(0), u.std(0).clamp_min(1e-12)

    def f(y, on=model):  # the log density in units of q's sd around q's mean
        return on.log_density(center + sd * y)

    from .subsample import thinned
    try:
        climbed = thinned(model, result.report.factors, SEARCH_ROWS,
                          torch.Generator(device=u.device).manual_seed(seed + 2), center)
    except Exception:  # noqa: BLE001 - the log-joint failed on the subsample: climb the full data
        climbed = model
    g = torch.Generator(device=u.device).manual_seed(seed + 1)
    half = torch.randn(num_starts // 2, model.dim, generator=g, device=u.device, dtype=u.dtype)
    half = half * torch.tensor(spreads, dtype=u.dtype, device=u.device).repeat(num_starts)[:num_starts // 2, None]
    y = torch.cat([half, -half]).requires_grad_(True)  # antithetic pairs: both sides of q along every direction
    opt = torch.optim.Adam([y], lr=0.25)
    evals = 0
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            try:
                lp = f(y, climbed)
            except Exception:  # noqa: BLE001
                break
            evals += num_starts
            ok = torch.isfinite(lp)
            (-lp.where(ok, torch.zeros_like(lp)).sum()).backward()
            y.grad = torch.nan_to_num(y.grad, nan=0.0, posinf=0.0, neginf=0.0) * ok[:, None]
            opt.step()
        main = _polish(f, torch.zeros(model.dim, dtype=u.dtype, device=u.device))
        if main is None:
            return {"ran": True, "note": "mode search: q's own mode could not be polished", "num_evals": evals,
                    "modes": []}
        ends = y.detach()
        far = (ends - main[0]).norm(dim=1) > 1.0
        found, tried = [main], []
        for i in torch.nonzero(far).flatten().tolist():  # polish the far end points, at most 3 distinct ones
            if len(found) > 3 or len(tried) >= MAX_POLISH:
                break
            if any(float((ends[i] - m[0]).norm()) < 1.0 for m in found) or \
                    any(float((ends[i] - t).norm()) < 1.0 for t in tried):
                continue   # near a mode found, or an end point already polished (to a mode found, or to none)
            tried.append(ends[i])
            polished = _polish(f, ends[i])
            evals += 200
            if polished is not None and all(float((polished[0] - m[0]).norm()) > 1.0 and _dip(f, polished, m)
                                            for m in found):
                found.append(polished)
        masses = [_laplace_log_mass(f, m[0], m[1]) for m in found]
    evals += len(found) * model.dim
    modes = [(m, lm) for m, lm in zip(found, masses) if lm is not None]
    if not modes or masses[0] is None:
        return {"ran": True, "note": "mode search: q's mode has no positive definite Hessian", "num_evals": evals,
                "modes": []}
    top = max(lm for _, lm in modes)
    total = sum(math.exp(lm - top) for _, lm in modes)
    out = [{"distance": float(m[0].norm()), "mass": math.exp(lm - top) / total} for m, lm in modes]
    return {"ran": True, "note": f"mode search: {len(out)} mode(s) from {num_starts} starts", "num_evals": evals,
            "modes": out}


FAR_DRAWS, WIDEN, FAR_MASS = 4000, 3.0, 0.05


def far_mass(result, u, seed=0):
    """The gradient-free stand-in for the search, for a log-joint torch cannot differentiate: importance sampling
    from a defensive mixture of q and q widened WIDEN times (q's mean, its sds; FAR_DRAWS draws, half each), and the
    share of the posterior's mass more than the 99.9% Mahalanobis radius of q from q's mean. Under q itself that share
    is 0.1%; above FAR_MASS the density has mass q does not cover (another mode, or tails far heavier than q's).
    Seen: a numpy 0.5 N(-4, 1) + 0.5 N(4, 1) with q on +4 gives about 50%. Returns other_modes's dict, with
    'far_mass' (the share; NaN where no draw has a finite weight) and no modes."""
    from scipy.stats import chi2
    model = result.model
    u = u.detach()
    center, sd = u.mean(0), u.std(0).clamp_min(1e-12)
    D = model.dim
    g = torch.Generator(device=u.device).manual_seed(seed + 3)
    eps = torch.randn(FAR_DRAWS, D, generator=g, device=u.device, dtype=u.dtype)
    scale = torch.ones(FAR_DRAWS, 1, device=u.device, dtype=u.dtype)
    scale[FAR_DRAWS // 2:] = WIDEN
    y = center + sd * eps * scale
    r2 = ((y - center) / sd).square().sum(-1)
    log_q = torch.logaddexp(-0.5 * r2, -0.5 * r2 / WIDEN ** 2 - D * math.log(WIDEN)) - math.log(2.0)
    with torch.no_grad():
        try:
            log_p = model.log_density(y)
        except Exception:  # noqa: BLE001 - a log-joint that raises on wide draws: nothing can be said
            return {"ran": False, "note": "no mode search: the log-joint raised on widened draws", "num_evals": 0,
                    "modes": []}
    log_w = torch.where(torch.isfinite(log_p), log_p - log_q, torch.full_like(log_p, -math.inf))
    if not bool(torch.isfinite(log_w).any()):
        share = float("nan")
    else:
        w = torch.softmax(log_w, 0)
        share = float(w[r2 > chi2.ppf(0.999, D)].sum())
    note = (f"no gradient mode search (torch cannot differentiate the log-joint); importance sampling from q widened "
            f"{WIDEN:g}x puts {share:.1%} of the posterior's mass outside q's 99.9% region")
    return {"ran": True, "note": note, "num_evals": FAR_DRAWS, "modes": [], "far_mass": share}
