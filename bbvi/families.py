"""Variational families behind one small protocol.

A family is a frozen configuration object; its parameters live in a plain dict of tensors that the caller
owns (no parameter store). Every family has

    init(dim, loc, generator) -> params          loc: (D,) initial mean
    rsample(params, num, generator) -> (S, D)    differentiable in params (pathwise)
    sample(params, num, generator) -> (S, D)     no gradient
    log_prob(params, u) -> (S,)                  u: (S, D)
    entropy(params) -> ()                        closed form; a family without one sets `entropy = None`
                                                 (the pathwise ELBO then uses -log q of its draws)
    mean(params) -> (D,), covariance(params) -> (D, D), marginal_sd(params) -> (D,)
    init_from_precision(params, H) -> params     optional: the MAP start's q from a Hessian (needs params["loc"])

Any object with these methods is a family (`bbvi.family_names.resolve_family` checks them): a new family is one class, in a file
of its own or here. A dataclass family can be saved and loaded by class name and fields.

Noise is drawn with `torch.randn(..., generator=g)` and transformed, so runs are reproducible without the
global RNG. Scales start small (init_scale=0.1): a wide initial q throws particles into the tails of the
posterior, where the log-joint is steep and the score-function estimator is wild.

`Discrete` is the mean-field factor over discrete latents: one Categorical per scalar entry (a boolean
latent is a Categorical over {0, 1}), parameterized by logits, sampled by the Gumbel-max trick.
"""
import dataclasses
import math

import torch
from torch.distributions import constraints

from .errors import ConfigError

__all__ = ["MeanField", "FullRank", "LowRank", "Discrete"]

_LOG_2PI = math.log(2 * math.pi)


def _check_scale(init_scale):
    if isinstance(init_scale, bool) or not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale)
                                            and init_scale > 0):
        raise ConfigError(f"init_scale must be a positive finite number, got {init_scale!r}")


class _Gaussian:
    def sample(self, params, num, generator):
        with torch.no_grad():
            return self.rsample(params, num, generator)

    def _noise(self, params, num, generator, width=None):
        loc = params["loc"]
        return torch.randn(num, width or loc.shape[0], generator=generator, device=loc.device, dtype=loc.dtype)


@dataclasses.dataclass(frozen=True)
class MeanField(_Gaussian):
    """q(u) = N(loc, diag(exp(log_scale))^2): D means and D log-scales."""

    init_scale: float = 0.1

    def __post_init__(self):
        _check_scale(self.init_scale)

    def init(self, dim, loc, generator=None):
        return {"loc": loc.clone(), "log_scale": torch.full_like(loc, math.log(self.init_scale))}

    def init_from_precision(self, params, precision):
        """Scales from a Gaussian's precision matrix H: the KL-optimal mean-field variances are 1 / H_ii."""
        params["log_scale"] = -0.5 * torch.log(precision.diagonal())
        return params

    def rsample(self, params, num, generator):
        return self.transform(params, self._noise(params, num, generator))

    def transform(self, params, noise):
        """u from standard normal noise (S, D): what rsample does with its draws (bbvi.compiled draws them first)."""
        return params["loc"] + params["log_scale"].exp() * noise

    def log_prob(self, params, u):
        log_scale = params["log_scale"]
        x = (u - params["loc"]) * torch.exp(-log_scale)
        return -0.5 * (x * x).sum(-1) - log_scale.sum() - 0.5 * u.shape[-1] * _LOG_2PI

    def coordinate_log_prob(self, params, u):
        """(S, D): log q of each coordinate (q factorizes; their sum is log_prob). Families that factorize over
        coordinates have this; the Rao-Blackwellized score terms use it."""
        log_scale = params["log_scale"]
        x = (u - params["loc"]) * torch.exp(-log_scale)
        return -0.5 * x * x - log_scale - 0.5 * _LOG_2PI

    def entropy(self, params):
        d = params["loc"].shape[0]
        return params["log_scale"].sum() + 0.5 * d * (1 + _LOG_2PI)

    def mean(self, params):
        return params["loc"]

    def covariance(self, params):
        return torch.diag(torch.exp(2 * params["log_scale"]))

    def marginal_sd(self, params):
        return params["log_scale"].exp()


def _memory_bytes(device):
    """Total memory of `device` in bytes (physical RAM for the CPU), or None where it cannot be read."""
    import os
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


@dataclasses.dataclass(frozen=True)
class FullRank(_Gaussian):
    """q(u) = N(loc, L L^T), L lower triangular with diagonal exp(log_diag): D + D(D+1)/2 parameters."""

    init_scale: float = 0.1

    def __post_init__(self):
        _check_scale(self.init_scale)

    def init(self, dim, loc, generator=None):
        need = 6 * dim * dim * loc.element_size()  # the factor, its gradient, Adam's two moments, two work copies
        have = _memory_bytes(loc.device)
        if have is not None and need > have // 2:
            from .errors import ConfigError
            raise ConfigError(f"family='fullrank' with {dim} continuous coordinates needs about {need / 2**30:.1f} GiB "
                              f"(a {dim} x {dim} Cholesky factor, its gradient and the optimizer's moments), more than "
                              f"half of this machine's {have / 2**30:.1f} GiB: use family=bbvi.LowRank(rank=...) or "
                              f"'meanfield'")
        return {"loc": loc.clone(), "log_diag": torch.full_like(loc, math.log(self.init_scale)),
                "off_diag": loc.new_zeros(dim, dim)}

    def init_from_precision(self, params, precision):
        """L = chol(H^-1): q equals the Laplace approximation."""
        L = torch.linalg.cholesky(torch.linalg.inv(precision))
        params["log_diag"] = torch.log(L.diagonal())
        params["off_diag"] = torch.tril(L, -1)
        return params

    def scale_tril(self, params):
        return torch.tril(params["off_diag"], -1) + torch.diag_embed(params["log_diag"].exp())

    def rsample(self, params, num, generator):
        return self.transform(params, self._noise(params, num, generator))

    def transform(self, params, noise):
        """u from standard normal noise (S, D): what rsample does with its draws (bbvi.compiled draws them first)."""
        return params["loc"] + noise @ self.scale_tril(params).T

    def log_prob(self, params, u):
        L = self.scale_tril(params)
        x = torch.linalg.solve_triangular(L, (u - params["loc"]).T, upper=False).T
        return -0.5 * (x * x).sum(-1) - params["log_diag"].sum() - 0.5 * u.shape[-1] * _LOG_2PI

    def entropy(self, params):
        d = params["loc"].shape[0]
        return params["log_diag"].sum() + 0.5 * d * (1 + _LOG_2PI)

    def mean(self, params):
        return params["loc"]

    def covariance(self, params):
        L = self.scale_tril(params)
        return L @ L.T

    def marginal_sd(self, params):
        return self.scale_tril(params).norm(dim=1)


@dataclasses.dataclass(frozen=True)
class LowRank(_Gaussian):
    """q(u) = N(loc, W W^T + diag(exp(log_diag))^2) with W of shape (D, rank). W starts small and random,
    not zero: W = 0 is a stationary point of the ELBO for a Gaussian target."""

    rank: int = 2
    init_scale: float = 0.1

    def __post_init__(self):
        _check_scale(self.init_scale)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LowRank rank must be a positive int, got {self.rank!r}")

    def init(self, dim, loc, generator=None):
        rank = min(self.rank, max(dim, 1))
        w = torch.randn(dim, rank, generator=generator, device=loc.device, dtype=loc.dtype)
        return {"loc": loc.clone(), "log_diag": torch.full_like(loc, math.log(self.init_scale)),
                "cov_factor": 0.01 * self.init_scale * w}

    def init_from_precision(self, params, precision):
        """Diagonal from the mean-field optimum 1 / H_ii, W kept small: a start inside the Laplace approximation."""
        params["log_diag"] = -0.5 * torch.log(precision.diagonal())
        return params

    def rsample(self, params, num, generator):
        w = params["cov_factor"]
        eps_w = self._noise(params, num, generator, width=w.shape[1])
        eps_d = self._noise(params, num, generator)
        return params["loc"] + eps_w @ w.T + params["log_diag"].exp() * eps_d

    def _capacitance(self, params):
        """W^T D^-2 W + I (rank x rank) and its Cholesky factor, for the Woodbury identity."""
        w = params["cov_factor"]
        wd = w * torch.exp(-2 * params["log_diag"])[:, None]
        cap = torch.eye(w.shape[1], device=w.device, dtype=w.dtype) + w.T @ wd
        return wd, torch.linalg.cholesky(cap)

    def log_prob(self, params, u):
        x = u - params["loc"]
        wd, chol = self._capacitance(params)
        mahal_diag = (x * x * torch.exp(-2 * params["log_diag"])).sum(-1)
        y = torch.linalg.solve_triangular(chol, (x @ wd).T, upper=False).T
        mahal = mahal_diag - (y * y).sum(-1)
        logdet = 2 * params["log_diag"].sum() + 2 * chol.diagonal().log().sum()
        return -0.5 * (mahal + logdet + u.shape[-1] * _LOG_2PI)

    def entropy(self, params):
        d = params["loc"].shape[0]
        _, chol = self._capacitance(params)
        return params["log_diag"].sum() + chol.diagonal().log().sum() + 0.5 * d * (1 + _LOG_2PI)

    def mean(self, params):
        return params["loc"]

    def covariance(self, params):
        w = params["cov_factor"]
        return w @ w.T + torch.diag(torch.exp(2 * params["log_diag"]))

    def marginal_sd(self, params):
        return torch.sqrt((params["cov_factor"] ** 2).sum(1) + torch.exp(2 * params["log_diag"]))


@dataclasses.dataclass(frozen=True)
class Discrete:
    """Mean-field factors for discrete latents. `spec`: tuple of (name, shape, low, num_categories, boolean).
    params: {name: logits (*shape, num_categories)}, starting uniform. A draw is a dict name -> (S, *shape):
    float 0./1. for booleans, int64 values low..low+K-1 otherwise."""

    spec: tuple

    @classmethod
    def for_model(cls, model):
        return cls(tuple((name, lat.shape, low, k, lat.support is constraints.boolean)
                         for name, (lat, low, k) in model.discrete.items()))

    def init(self, device, dtype):
        return {name: torch.zeros((*shape, k), device=device, dtype=dtype) for name, shape, _, k, _ in self.spec}

    def sample(self, params, num, generator):
        """Gumbel-max: argmax(logits + G), G = -log(-log U), U ~ Uniform(0, 1) from `generator`."""
        out = {}
        with torch.no_grad():
            for name, _shape, low, _k, boolean in self.spec:
                logits = params[name]
                uni = torch.rand((num,) + logits.shape, generator=generator, device=logits.device,
                                 dtype=logits.dtype)
                gumbel = -torch.log(-torch.log(uni.clamp_min(torch.finfo(uni.dtype).tiny)))
                idx = (logits + gumbel).argmax(-1)
                out[name] = idx.to(logits.dtype) if boolean else idx + low
        return out

    def _picked(self, params, values, skip=()):
        """For each discrete latent not in `skip`: (S, n) log q of the value drawn for each of its n entries."""
        for name, _shape, low, k, boolean in self.spec:
            if name in skip:
                continue
            logp = torch.log_softmax(params[name], -1)
            idx = values[name].long() - (0 if boolean else low)
            picked = torch.gather(logp.expand(idx.shape + (k,)), -1, idx.unsqueeze(-1)).squeeze(-1)
            yield picked.reshape(idx.shape[0], -1)

    def log_prob(self, params, values, skip=()):
        """sum over every discrete entry (of the latents not in `skip`) of log q(value), shape (S,); None when
        `skip` leaves none."""
        total = None
        for picked in self._picked(params, values, skip):
            total = picked.sum(-1) if total is None else total + picked.sum(-1)
        return total

    def entry_log_prob(self, params, values):
        """(S, Ed): log q of every discrete entry, latents in spec order, entries flattened."""
        return torch.cat(list(self._picked(params, values)), -1)

    def probs(self, params):
        return {name: torch.softmax(params[name], -1) for name, *_ in self.spec}
