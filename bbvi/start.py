"""Where q starts, kept out of the loop and out of the user's Model.

    zero  q at unconstrained 0 (or `init_values`), scales `init_scale`.
    map   the MAP of the unconstrained density (L-BFGS with a strong-Wolfe line search) and the Hessian H there
          (Laplace): q starts at N(MAP, H^-1) in the family's nearest form, and the model is whitened,
          u_model = MAP + H_ii^-1/2 u, so that the optimiser's step size is in posterior-sd units.
    auto  (the default) 'map' where torch can differentiate the log-joint and the density has a proper mode;
          otherwise 'zero', with the reason kept in `Start.note` (a log density that grows without bound, a
          funnel such as the centered eight schools, has no mode, which is itself worth a warning).

A log-joint that raises for a point the line search tries (a Cholesky of a kernel matrix that is not positive
definite) counts as -inf there: the line search backs off instead of the fit dying.
"""
import dataclasses
import warnings

import torch
from torch.distributions import constraints

from .errors import ConfigError, ReliabilityWarning

__all__ = ["Start", "initial_loc", "initial_discrete", "finite_start", "laplace_start", "STRATEGIES"]

STRATEGIES = ("auto", "map", "zero")


@dataclasses.dataclass
class Start:
    """What the start did: `strategy` used ('map' | 'zero'), `note` (why 'auto' fell back to 'zero'; '' when
    it did not), `no_mode` (True when the fallback was because the density has no proper mode), and
    `num_evals`: log-joint gradient evaluations it spent (L-BFGS calls and the Hessian's D rows)."""

    strategy: str
    note: str = ""
    no_mode: bool = False
    num_evals: int = 0
    mean_field_sd: tuple = None   # MAP start: (coordinate, ratio): the smallest ratio of a mean-field q's sd to the
                                  # Laplace sd, 1 / sqrt(H_ii (H^-1)_ii) (the correlations at the mode; 1 when none)


class _NoMode(ConfigError):
    """The density has no proper mode at the end of L-BFGS (unbounded, or a Hessian that is not positive definite)."""


def initial_loc(model, init_values, loc):
    """loc (D,) with the unconstrained values of the continuous latents named in `init_values` (constrained
    values; the discrete ones are `initial_discrete`'s)."""
    unknown = set(init_values) - set(model.latents)
    if unknown:
        raise ConfigError(f"init_values names {sorted(unknown)}, which are not latents of model {model.name!r} "
                          f"(its latents: {list(model.latents)})")
    loc = loc.clone()
    for b in model.blocks:
        if b.name in init_values:
            try:
                v = torch.as_tensor(init_values[b.name], device=loc.device, dtype=loc.dtype)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ConfigError(f"init_values[{b.name!r}] = {init_values[b.name]!r} is not a number or an array "
                                  f"of numbers of shape {b.shape} ({e})") from None
            if tuple(v.shape) != b.shape:
                raise ConfigError(f"init_values[{b.name!r}] has shape {tuple(v.shape)}, latent has {b.shape}")
            uv = b.transform.inv(v[None]).reshape(-1)
            if not torch.isfinite(uv).all():
                raise ConfigError(f"init_values[{b.name!r}] = {v.tolist()} is outside the support "
                                  f"{model.latents[b.name].support}")
            loc[b.start:b.stop] = uv
    return loc


def initial_discrete(model, init_values, device):
    """{name: value (*shape)} of the discrete latents named in `init_values`, each checked against the latent's
    shape and support."""
    out = {}
    for name, (lat, low, k) in model.discrete.items():
        if name not in init_values:
            continue
        try:
            v = torch.as_tensor(init_values[name], device=device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"init_values[{name!r}] = {init_values[name]!r} is not a number or an array of numbers "
                              f"of shape {lat.shape} ({e})") from None
        if tuple(v.shape) != lat.shape:
            raise ConfigError(f"init_values[{name!r}] has shape {tuple(v.shape)}, latent has {lat.shape}")
        if v.dtype == torch.bool:   # True/False for a boolean latent: 1/0
            v = v.long()
        if v.is_complex() or not bool(((v == v.round()) & (v >= low) & (v <= low + k - 1)).all()):
            raise ConfigError(f"init_values[{name!r}] = {v.tolist()} is outside the support {lat.support} (whole "
                              f"numbers {low}..{low + k - 1})")
        out[name] = v
    return out


def finite_start(model, u0, k, fixed, generator, num=256):
    """Particle 0's discrete values (k[name][0], in place) set to the first of `num` draws from q_d's uniform
    start at which the log density at u0 (D,) is finite, the latents in `fixed` (given by init_values) kept.
    A discrete latent's support may hold values where the posterior is 0 (an N-mixture's N below the largest
    count): the first random draw may land there. Returns whether one was found."""
    draws = {}
    for name, (lat, low, K) in model.discrete.items():
        if name in fixed:
            draws[name] = k[name][:1].expand((num,) + k[name].shape[1:])
        else:
            idx = torch.randint(K, (num,) + lat.shape, generator=generator, device=u0.device)
            draws[name] = idx.to(k[name].dtype) + (0 if lat.support is constraints.boolean else low)
    try:
        with torch.no_grad():
            lp, _ = model.log_density_guarded(u0[None].expand(num, -1), draws)
    except Exception:  # noqa: BLE001 - a log-joint that fails here is described by the first check, not by this
        return False
    if not torch.is_tensor(lp) or tuple(lp.shape) != (num,) or not bool(torch.isfinite(lp).any()):
        return False
    i = int(torch.isfinite(lp).nonzero()[0])
    for name in model.discrete:
        k[name][0] = draws[name][i]
    return True


def choose(strategy, model, family, params, report, discrete_draw):
    """Apply the start `strategy` to `params` (in place). Returns (model, Start); the model is the whitened copy
    after a MAP start. 'map' raises ConfigError when it cannot work; 'auto' falls back to 'zero' with a note."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"init_strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if strategy == "zero" or (strategy == "auto" and (model.dim == 0 or not report.differentiable)):
        note = ""
        if strategy == "auto" and model.dim:
            note = (f"zero start: torch cannot differentiate the log-joint in {list(report.nondifferentiable)}, "
                    f"so no MAP/Laplace start")
        return model, Start("zero", note)
    try:
        model, evals, mean_field_sd = laplace_start(model, family, params, report, discrete_draw)
    except ConfigError as e:
        if strategy == "map":
            raise
        return model, Start("zero", f"zero start: the MAP start failed ({e})", no_mode=isinstance(e, _NoMode))
    return model, Start("map", num_evals=evals, mean_field_sd=mean_field_sd)


def laplace_start(model, family, params, report, discrete_draw, max_iter=500):
    """The MAP of the unconstrained density and its Hessian H (L-BFGS). With discrete latents, of its average
    over `discrete_draw` (draws from q's uniform starting factors): E_{q_d}[log p(u, k)], the continuous part of
    the ELBO at the start (over the draws where the log density at the start is finite, where some are not). (Held at one draw, the start followed that draw: one random assignment of a mixture's
    points put the components' means in the label-switched mode, and the fit stayed there.)
    Sets params to the Laplace start and returns (the model preconditioned by (MAP, 1/sqrt(H_ii)), number of
    gradient evaluations). ConfigError where the log-joint is not differentiable, _NoMode where the density has
    no proper mode."""
    if not report.differentiable or model.dim == 0:
        raise ConfigError(f"init_strategy='map' needs a log-joint torch can differentiate in every continuous latent "
                          f"(model {model.name!r}: {list(report.nondifferentiable) or 'no continuous latents'})")
    if not callable(getattr(family, "init_from_precision", None)) or "loc" not in params["continuous"]:
        raise ConfigError(f"init_strategy='map' needs a family with init_from_precision and a 'loc' parameter; "
                          f"{family!r} has not")
    M = next(iter(discrete_draw.values())).shape[0] if discrete_draw else 1
    k1 = discrete_draw
    loc0 = params["continuous"]["loc"].detach().clone()
    if discrete_draw:   # draws where the posterior is 0 (an N-mixture's N below the largest count) would make the
        with torch.no_grad():   # average -inf everywhere: it is over the draws finite at the start
            finite = torch.isfinite(model.log_density_guarded(loc0[None].expand(M, -1), k1)[0])
        if bool(finite.any()) and not bool(finite.all()):
            k1, M = {name: v[finite] for name, v in k1.items()}, int(finite.sum())

    def density(v):  # (D,) -> the log density, averaged over the discrete draws
        return model.log_density(v[None].expand(M, -1), k1).mean()
    u = loc0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([u], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)
    calls = [0]

    def closure():
        opt.zero_grad()
        calls[0] += 1
        try:
            loss = -density(u)
        except Exception:  # e.g. a Cholesky that fails at this point: treat as outside the support
            loss = None
        if loss is None or not torch.isfinite(loss):
            u.grad = torch.zeros_like(u)
            return torch.tensor(float("inf"), dtype=u.dtype, device=u.device)
        loss.backward()
        return loss.detach()

    try:
        opt.step(closure)
    except Exception as e:
        raise ConfigError(f"init_strategy='map': L-BFGS failed on model {model.name!r} ({type(e).__name__}: {e})") \
            from e
    u = u.detach()
    try:
        value = density(u)
    except Exception as e:
        raise ConfigError(f"init_strategy='map': the log-joint raised {type(e).__name__} at the optimum") from e
    if not torch.isfinite(u).all() or not torch.isfinite(value):
        raise _NoMode(f"init_strategy='map': the optimiser left the support of model {model.name!r} or the log "
                      f"density grew without bound (no mode)")
    try:
        hess = torch.autograd.functional.hessian(lambda v: -density(v), u)
    except Exception as e:  # noqa: BLE001 - the log-joint raised at the optimum: no Laplace start there
        raise ConfigError(f"init_strategy='map': the log-joint raised {type(e).__name__} in the Hessian at the "
                          f"optimum") from e
    hess = 0.5 * (hess + hess.T)
    if not bool(torch.isfinite(hess).all()) or torch.linalg.eigvalsh(hess).min() <= 0:
        raise _NoMode(f"init_strategy='map': the Hessian at the end of L-BFGS on model {model.name!r} is not "
                      f"positive definite: the density has no proper mode there (a funnel, an improper "
                      f"posterior or a saddle); use init_strategy='zero'")
    if u.dtype != torch.float64:
        _check_resolution(model, u, hess, density)
    scale = hess.diagonal().rsqrt()
    whitened = hess * scale[:, None] * scale[None, :]
    pc = params["continuous"]
    with torch.no_grad():
        new = family.init_from_precision({name: t.detach().clone() for name, t in pc.items()}, whitened)
        pc["loc"].zero_()
        for name, t in new.items():
            if name != "loc":
                pc[name].copy_(t)
    ratio = torch.linalg.inv(whitened).diagonal().rsqrt()   # whitened: unit diagonal, so H_ii = 1
    i = int(ratio.argmin())
    return model.preconditioned(u, scale), calls[0] + model.dim, (_label(model, i), float(ratio[i]))


def _label(model, i):
    """The name of unconstrained coordinate i: the latent's, with the index of its element where it has several."""
    block = next(b for b in model.blocks if b.start <= i < b.stop)
    return block.name + (f"[{i - block.start}]" if block.stop - block.start > 1 else "")


def _check_resolution(model, u, hess, density):
    """ReliabilityWarning where a fit in float32 (or lower) cannot resolve the posterior: at the end of L-BFGS u,
    or where its Newton step H^-1 grad points (L-BFGS in float32 stops early where the log density is huge, e.g.
    -1e16 at a mean of 1e8), the dtype's spacing exceeds the Laplace sd sqrt((H^-1)_ii). There q's steps cannot
    move by a posterior sd, nor its mean be told from the next representable value: seen, q ended at 45 where the
    posterior mean is 1e8 (sd 0.58). One more gradient evaluation, in float32 fits only."""
    v = u.clone().requires_grad_(True)
    with torch.enable_grad():
        grad = torch.autograd.grad(density(v), v)[0]
    sd = torch.linalg.inv(hess).diagonal().sqrt()
    target = u + torch.linalg.solve(hess, grad)
    spacing = torch.finfo(u.dtype).eps * torch.maximum(u.abs(), target.abs())
    coarse = torch.nonzero(spacing > sd).flatten()
    if len(coarse):
        i = int(coarse[0])
        name = str(u.dtype).replace("torch.", "")
        warnings.warn(f"bbvi fit of {model.name!r}: {name} cannot resolve the posterior of {_label(model, i)} "
                      f"(unconstrained): the MAP start ends at {u[i].item():.4g} and its Newton step points to "
                      f"{target[i].item():.4g}, where {name}'s spacing ({spacing[i].item():.3g}) exceeds the "
                      f"posterior sd ({sd[i].item():.3g}); q's steps cannot get there or resolve it "
                      f"({len(coarse)} of {len(u)} coordinates): pass dtype=torch.float64 (or center and scale the "
                      f"model's latents)", ReliabilityWarning, stacklevel=6)
