"""Normalizing-flow family: a Gaussian (full-rank affine) start bent by coupling layers from zuko.

    u = loc + L z,   z = T(eps),   eps ~ N(0, I),   T = t_K o ... o t_1

L is lower triangular with diagonal exp(log_diag) (as in FullRank); each t_i is a zuko coupling layer
(`GeneralCouplingTransform`: one part of the coordinates, fixed by `coupling_masks`, conditions an elementwise
map of the rest through an MLP) with affine maps (kind='affine', the default: Real NVP, Dinh et al. 2017, as in
Agrawal, Sheldon & Domke 2020) or monotonic rational-quadratic splines (kind='nsf', Durkan et al. 2019). Both directions of a coupling layer cost one conditioner
pass, so drawing and log_prob are equally cheap. The last layer of every conditioner starts at zero, so T starts
as the identity and q starts as the Gaussian N(loc, L L^T): the MAP start's Laplace approximation
(init_from_precision) or the zero start. A spline acts on [-bound, bound] of the standardized coordinates z and
is the identity outside.

Parameters live in the fit's plain dict like every family: 'loc', 'log_diag', 'off_diag' and one entry per
conditioner tensor ('flow.<layer>.<zuko name>'); the zuko modules are architecture templates evaluated with
`torch.func.functional_call`, so their own parameters are never used, and every draw of initial weights comes
from the fit's generator (no global RNG).

q has no closed-form entropy or moments: `entropy` is None (the pathwise ELBO uses -log q of the draws, and STL
works as written), and mean / covariance / marginal_sd are Monte Carlo estimates from `moment_draws` draws of a
fixed seed (common random numbers: smooth in the parameters, exact only as moment_draws grows; the sd of a mean's
error is about sd / sqrt(moment_draws)).
"""
import dataclasses
import math

import torch

from .errors import ConfigError
from .families import FullRank, _check_scale

__all__ = ["Flow"]

_KINDS = ("nsf", "affine")
_LOG_2PI = math.log(2 * math.pi)


def coupling_masks(dim, num):
    """`num` coupling masks over `dim` coordinates (True: the half that conditions the other). Layer pair b splits
    the coordinates by bit b of their index, one way then the other; every pair of coordinates differs in some bit,
    so after 2 ceil(log2 dim) layers each coordinate has been transformed conditioned on every other one (a funnel's
    theta_i on its scale) in both directions. Further layers cycle through the bits again."""
    bits = max(1, math.ceil(math.log2(dim)))
    index = torch.arange(dim)
    masks = []
    for i in range(num):
        m = (index >> ((i // 2) % bits)) & 1 == 1
        masks.append(~m if i % 2 else m)
    return masks


def _zuko():
    """zuko's layers. Importing zuko sets torch.distributions.Distribution._validate_args = False for the whole
    process (zuko/distributions.py), which would silently switch off torch's argument checks in users' log-joints
    (a Gamma's log_prob at a negative value returns a number instead of raising): the flag is put back."""
    from torch.distributions import Distribution
    before = Distribution._validate_args
    try:
        from zuko.flows.coupling import GeneralCouplingTransform
        from zuko.flows.gaussianization import ElementWiseTransform
        from zuko.transforms import MonotonicRQSTransform
    finally:
        Distribution._validate_args = before
    return GeneralCouplingTransform, ElementWiseTransform, MonotonicRQSTransform


class _Stack(torch.nn.Module):
    """The coupling layers; forward(x, inverse) -> (image, sum of log |det Jacobian|) of T^-1 (z -> eps) or,
    with inverse=True, of T (eps -> z). One conditioner evaluation per layer either way. Run under
    functional_call only."""

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x, inverse):
        ladj = x.new_zeros(x.shape[:-1])
        for layer in (reversed(self.layers) if inverse else self.layers):
            coupling = hasattr(layer, "mask")
            if coupling:  # x_a conditions the elementwise map of x_b
                idx_a, idx_b = layer.mask.nonzero().squeeze(-1), (~layer.mask).nonzero().squeeze(-1)
                x_a, x_b = x[..., idx_a], x[..., idx_b]
                f = layer.meta(None, x_a)
            else:         # one coordinate: an elementwise map
                x_b, f = x, layer(None)
            if inverse:
                y_b = f.inv(x_b)
                part = -f.log_abs_det_jacobian(y_b, x_b)
            else:
                y_b, part = f.call_and_ladj(x_b)
            ladj = ladj + part
            if coupling:
                y = torch.empty_like(x)
                y[..., idx_a], y[..., idx_b] = x_a, y_b
                x = y
            else:
                x = y_b
        return x, ladj


@dataclasses.dataclass(frozen=True)
class Flow:
    """A normalizing flow over the unconstrained latents (family='flow').

    kind: 'affine' (Real NVP couplings, the default) | 'nsf' (rational-quadratic spline couplings: more flexible
    per layer, 2x the time per step, and no better on the posteriors measured in experiments/flows.py);
    transforms: number of coupling layers (None: 2 ceil(log2 D), at least 4); hidden: the conditioner MLP's hidden widths; bins: spline bins (nsf);
    bound: the spline's interval [-bound, bound] in standardized coordinates (nsf); init_scale: the affine
    part's initial scale under the zero start (1: a funnel needs q to start wide enough to see its mouth; from 0.1
    the centered eight schools collapsed into the neck, max mean error 1.0 sd, and from 1 reached 0.05 sd); moment_draws: draws behind mean / covariance / marginal_sd."""

    kind: str = "affine"
    transforms: int = None
    hidden: tuple = (32, 32)
    bins: int = 8
    bound: float = 5.0
    init_scale: float = 1.0
    moment_draws: int = 4096

    entropy = None  # no closed form: estimators use -log q of the draws
    default_lr = 0.01  # Adam's step when lr is not given (Gaussians: 0.05); measured in experiments/flows.py
    default_particles = 64  # num_particles when not given (Gaussians: 16): gp_pois_regr, 5000 steps, 16 -> 64
    #                         particles: max mean error 0.115 -> 0.046 sd at about the same wall time
    score_path_warning = (
        "family='flow' on the score path (torch cannot differentiate this log-joint, or estimator='score'): "
        "measured unreliable. On a 2-D conjugate normal, 1500 steps, the flow's fits ranged from exact to q "
        "collapsed to 0.07x the posterior sd and means 3 sd off, depending on lr and particles, where fullrank was "
        "within 0.005 sd. Prefer family='fullrank' there, and check the fit's k-hat")

    def __post_init__(self):
        _check_scale(self.init_scale)
        if self.kind not in _KINDS:
            raise ConfigError(f"Flow kind must be one of {list(_KINDS)}, got {self.kind!r}")
        for name in ("transforms", "bins", "moment_draws"):
            v = getattr(self, name)
            if v is None and name == "transforms":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"Flow {name} must be a positive int, got {v!r}")
        hidden = self.hidden
        if isinstance(hidden, int) and not isinstance(hidden, bool):
            hidden = (hidden,)
        try:
            hidden = tuple(hidden)
        except TypeError:
            hidden = None
        if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ConfigError(f"Flow hidden must be a tuple of positive ints (the conditioner's hidden widths), "
                              f"got {self.hidden!r}")
        object.__setattr__(self, "hidden", hidden)
        if isinstance(self.bound, bool) or not isinstance(self.bound, (int, float)) or not self.bound > 0:
            raise ConfigError(f"Flow bound must be a positive number, got {self.bound!r}")
        object.__setattr__(self, "_templates", {})

    # ---- architecture ----------------------------------------------------------------------------------------
    def _template(self, dim, like):
        """The zuko layers for `dim` coordinates on like's device and dtype (built once per family object)."""
        key = (dim, str(like.device), like.dtype)
        if key not in self._templates:
            with torch.random.fork_rng(devices=[]):  # zuko draws initial weights from the global RNG: keep the
                layers = self._layers(dim)            # caller's stream untouched (init redraws them anyway)
            self._templates[key] = _Stack(layers).to(device=like.device, dtype=like.dtype)
        return self._templates[key]

    def _layers(self, dim):
        GeneralCouplingTransform, ElementWiseTransform, MonotonicRQSTransform = _zuko()
        options = {}
        if self.kind == "nsf":
            spline = lambda *p: MonotonicRQSTransform(*p, bound=float(self.bound))  # noqa: E731
            options.update(univariate=spline, shapes=((self.bins,), (self.bins,), (self.bins - 1,)))
        if dim == 1:  # nothing to condition on: elementwise maps with free parameters
            return [ElementWiseTransform(1, **options) for _ in range(self.layers_for(1))]
        return [GeneralCouplingTransform(dim, mask=m, hidden_features=self.hidden, **options)
                for m in coupling_masks(dim, self.layers_for(dim))]

    def layers_for(self, dim):
        """The number of coupling layers for `dim` coordinates: `transforms`, or by default 2 ceil(log2 dim) (every
        coordinate conditioned on every other, see coupling_masks), at least 4."""
        if self.transforms is not None:
            return self.transforms
        return max(4, 2 * math.ceil(math.log2(max(dim, 2))))

    def _run(self, params, x, inverse):
        dim = params["loc"].shape[0]
        weights = {name[5:]: t for name, t in params.items() if name.startswith("flow.")}
        return torch.func.functional_call(self._template(dim, params["loc"]), weights, (x, inverse))

    # ---- the family protocol ---------------------------------------------------------------------------------
    # the affine part is FullRank's (its parameters, its memory check and its Laplace start)
    def _affine(self):
        return FullRank(init_scale=self.init_scale)

    def init_from_precision(self, params, precision):
        """L = chol(H^-1) and T the identity: q equals the Laplace approximation."""
        return self._affine().init_from_precision(params, precision)

    def scale_tril(self, params):
        return self._affine().scale_tril(params)

    def init(self, dim, loc, generator=None):
        params = self._affine().init(dim, loc, generator)
        stack = self._template(dim, loc)
        # T starts as the identity: the conditioners' last layers (and a 1-D flow's elementwise parameters) are zero
        zero = tuple(f"layers.{i}.hyper.{len(layer.hyper) - 1}." if hasattr(layer, "hyper") else f"layers.{i}.phi."
                     for i, layer in enumerate(stack.layers))
        for name, p in stack.named_parameters():
            if name.startswith(zero):
                value = torch.zeros_like(p)
            else:  # PyTorch's Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from the fit's generator
                fan_in = stack.get_parameter(name.rsplit(".", 1)[0] + ".weight").shape[-1]
                value = (torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype) * 2 - 1) \
                    / math.sqrt(fan_in)
            params["flow." + name] = value
        return params

    def rsample(self, params, num, generator):
        return self.rsample_and_log_prob(params, num, generator)[0]

    def sample(self, params, num, generator):
        with torch.no_grad():
            return self.rsample(params, num, generator)

    def rsample_and_log_prob(self, params, num, generator):
        """(u, log q(u)) from one pass: log q(u) = log N(eps) - log |det dT/deps| - sum log_diag."""
        loc = params["loc"]
        eps = torch.randn(num, loc.shape[0], generator=generator, device=loc.device, dtype=loc.dtype)
        z, ladj = self._run(params, eps, inverse=True)
        u = params["loc"] + z @ self.scale_tril(params).T
        log_q = -0.5 * (eps * eps).sum(-1) - 0.5 * eps.shape[-1] * _LOG_2PI - ladj - params["log_diag"].sum()
        return u, log_q

    def log_prob(self, params, u):
        L = self.scale_tril(params)
        z = torch.linalg.solve_triangular(L, (u - params["loc"]).T, upper=False).T
        eps, ladj = self._run(params, z, inverse=False)
        return -0.5 * (eps * eps).sum(-1) - 0.5 * u.shape[-1] * _LOG_2PI + ladj - params["log_diag"].sum()

    def _fixed_draws(self, params, num):
        """num draws of q from a fixed seed (no gradient): the same noise for every call."""
        g = torch.Generator(device=params["loc"].device).manual_seed(0)
        with torch.no_grad():
            return self.rsample(params, num, g)

    def summary_moments(self, params, num=64):
        """(mean, marginal sd) from `num` draws of a fixed seed: the adaptive rule's per-step summary of q (cheap,
        and smooth in the parameters: the same noise every step)."""
        u = self._fixed_draws(params, num)
        return u.mean(0), u.std(0)

    def mean(self, params):
        return self._fixed_draws(params, self.moment_draws).mean(0)

    def covariance(self, params):
        return torch.atleast_2d(torch.cov(self._fixed_draws(params, self.moment_draws).T))

    def marginal_sd(self, params):
        return self._fixed_draws(params, self.moment_draws).std(0)
