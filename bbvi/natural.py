"""Natural-gradient steps for the variational families: `bbvi.fit(model, optimizer="natural")`.

`NaturalGradient` is a torch.optim.Optimizer whose update is the natural gradient of the ELBO under the Fisher
information of q itself (the Bayesian learning rule / natural-gradient VI: Khan & Rue 2021, "The Bayesian
learning rule"; Lin, Schmidt & Khan 2020, "Handling the positive-definite constraint in the Bayesian learning
rule"). It reads the ordinary gradients the estimator left in `p.grad` (the gradient of the *negative* ELBO,
as `bbvi.step` computes it), whatever the estimator, and `group["lr"]` is the step size rho, so the step-size
rules of `bbvi.fit` (a schedule, `bbvi.Adaptive`) set it as they set Adam's. It keeps no state between steps:
`optimizer.state.clear()` (what `bbvi.Adaptive` does on a restart) is harmless.

Gaussian blocks, q = N(m, Sigma), precision S = Sigma^-1, g_m = dELBO/dm, G = dELBO/dSigma (symmetric):

    exact natural step   S_new = S - 2 rho G,   m_new = m + rho S_new^-1 g_m

On a Gaussian target N(mu, Lambda^-1) with exact expectations, G = (S - Lambda) / 2 and g_m = -Lambda (m - mu):
at rho = 1 the step lands on S_new = Lambda, m_new = mu (for mean-field, a diagonal Lambda).

Positivity guard. Write the step in q's own frame: with Sigma = L L^T, S - 2 rho G = L^-T (I - A) L^-1, where
A = 2 rho L^T G L (symmetric) with eigenvalues a_j. The exact step multiplies the precision along eigenvector j
by 1 - a_j, which is negative for a_j > 1. We multiply it by phi(a_j) instead,

    phi(a) = 1 - a        for a <= 1/2   (the exact step)
    phi(a) = 1 / (4 a)    for a >  1/2   (a C1 continuation: phi(1/2) = 1/2, phi'(1/2) = -1, always > 0),

so S_new = L^-T U diag(phi(a)) U^T L^-1 is always positive definite and the step is exact whenever it shrinks
the precision by at most a half in every direction (on a Gaussian target at rho = 1: whenever Lambda >= S / 2).
Note it also acts on steps whose exact S_new is positive definite but less than half of S in some direction:
one step cannot widen q by more than a factor sqrt(2) in sd through the exact branch; larger widenings are
continued smoothly (a few steps do them). The mean then moves by m_new = m + rho S_new^-1 g_m.

- MeanField (loc, log_scale): L = diag(sigma), A = diag(rho g_ls) with g_ls = dELBO/dlog_scale
  (= 2 sigma^2 G_ii), so elementwise: a = rho g_ls, phi as above, loc += rho sigma^2 g_m / phi,
  log_scale -= log(phi) / 2.
- FullRank (loc, log_diag, off_diag; L = tril(off_diag, -1) + diag(exp(log_diag))): the gradient in L is
  dELBO/dL = tril(2 G L) (diagonal entries dELBO/dL_ii = dELBO/dlog_diag_i / L_ii); its unique symmetric
  solution is G = sym(L^-T Phi(L^T dELBO/dL) L^-1), Phi = lower triangle with the diagonal halved (the
  Cholesky factorisation's reverse-mode rule, Murray 2016), hence A = 2 rho L^T G L = rho (P + P^T) with
  P = Phi(L^T dELBO/dL): no inverse is needed. A = U diag(a) U^T (eigh), Sigma_new = R R^T with
  R = L U diag(phi(a))^-1/2, L_new from the QR factorisation of R^T (no Cholesky that can fail), and
  loc += rho Sigma_new g_m.
- Categorical factors (logits, ..., K): the natural gradient is g_logits / p, p = softmax(logits) clamped
  below at `floor` (1e-6: a category whose probability underflows would otherwise get an infinite step);
  logits += rho g_logits / p. (The logits over-parameterise the Categorical, so the Fisher matrix
  diag(p) - p p^T is singular; g / p is its natural gradient up to a constant shift of the logits, which does
  not change q.) On E_q[f(k)] + H(q) with the exact gradient, rho = 1 lands on q = softmax(f).

Trust region (max_kl, 0.5 nats per dimension by default; None turns it off). A score-function gradient from a
poor start is mostly noise, and the natural step amplifies it (the mean moves by sigma^2 g_m / phi, the
precision by a factor phi that can be huge or tiny): measured on a logistic regression with predictors on
scales 1, 30, 1000 from the zero start, one step moved a mean 8e6 sds and the fit never recovered. So each
block's step is damped, t rho in place of rho with t = 1, 1/2, 1/4, ... the first that keeps the symmetrised KL
(KL(old||new) + KL(new||old)) / 2 of the step at most max_kl times the block's dimension (a Categorical block:
its number of entries). In q's frame this is 1/4 sum_j (phi_j + 1/phi_j - 2 + (1 + phi_j) delta_j^2), delta the
mean's move in old sds. Small steps, near the optimum, are untouched; so is the exact unit step from a start
within that KL of the target.

Other families (LowRank, user-defined) raise a bbvi.ConfigError: their Fisher geometry is not implemented.
"""
import torch

from .errors import ConfigError
from .families import FullRank, MeanField

__all__ = ["NaturalGradient", "check_family", "phi", "damped_step", "sigma_gradient", "whitened_step", "DEFAULT_LR",
           "MAX_KL"]

DEFAULT_LR = 0.3   # rho when optimizer="natural" and lr is not given (measured: experiments/natural.py)
MAX_KL = 0.5       # the trust region: symmetrised KL of one step, nats per dimension
_HALVINGS = 60


def check_family(family):
    """ConfigError unless optimizer='natural' knows `family`'s Fisher geometry."""
    if not isinstance(family, (MeanField, FullRank)):
        raise ConfigError(f"optimizer='natural' supports family='meanfield' and 'fullrank' (and Categorical "
                          f"factors of discrete latents); got family {family!r}: use optimizer='adam' with it")


def phi(a):
    """The precision multiplier: 1 - a for a <= 1/2 (the exact natural step), 1 / (4 a) above (positive, C1)."""
    return torch.where(a <= 0.5, 1 - a, 0.25 / a.clamp_min(0.5))


def _ascent(p):
    """dELBO/dp from p.grad (the gradient of the negative ELBO); zeros where there is none."""
    return torch.zeros_like(p) if p.grad is None else -p.grad


class NaturalGradient(torch.optim.Optimizer):
    """Natural-gradient ascent on the ELBO for q's blocks (see the module docstring).

    params: bbvi's parameter dict {"continuous": family params, "discrete": {name: logits}}; family: the fit's
    family (MeanField or FullRank); lr: the step size rho; max_kl: the trust region, the most symmetrised KL
    divergence between q before and after one step of a Gaussian block, in nats per dimension (None: no trust
    region); floor: the least probability a Categorical's natural gradient divides by."""

    def __init__(self, params, family, lr=DEFAULT_LR, max_kl=MAX_KL, floor=1e-6):
        if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and lr > 0):
            raise ConfigError(f"NaturalGradient lr must be a positive number, got {lr!r}")
        if max_kl is not None and not (isinstance(max_kl, (int, float)) and max_kl > 0):
            raise ConfigError(f"NaturalGradient max_kl must be None or a positive number, got {max_kl!r}")
        if not (isinstance(floor, (int, float)) and 0 < floor < 1):
            raise ConfigError(f"NaturalGradient floor must be in (0, 1), got {floor!r}")
        groups = []
        pc = params.get("continuous") or {}
        if pc:
            check_family(family)
            if isinstance(family, MeanField):
                groups.append({"params": [pc["loc"], pc["log_scale"]], "kind": "meanfield"})
            else:
                groups.append({"params": [pc["loc"], pc["log_diag"], pc["off_diag"]], "kind": "fullrank"})
        for logits in (params.get("discrete") or {}).values():
            groups.append({"params": [logits], "kind": "categorical"})
        if not groups:
            raise ConfigError("NaturalGradient: the parameter dict holds no parameters")
        super().__init__(groups, {"lr": lr, "max_kl": max_kl, "floor": floor})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            getattr(self, "_" + group["kind"])(group, *group["params"])
        return loss

    @staticmethod
    def _meanfield(group, loc, log_scale):
        sigma = log_scale.exp()
        f, delta = damped_step(_ascent(log_scale), sigma * _ascent(loc), group["lr"], group["max_kl"])
        loc.add_(sigma * delta)
        log_scale.sub_(0.5 * torch.log(f))

    @staticmethod
    def _fullrank(group, loc, log_diag, off_diag):
        diag = log_diag.exp()
        L = torch.tril(off_diag, -1) + torch.diag_embed(diag)
        g_L = torch.tril(_ascent(off_diag), -1) + torch.diag_embed(_ascent(log_diag) / diag)
        a, U = torch.linalg.eigh(whitened_step(L, g_L, 1.0))
        LU = L @ U
        f, delta = damped_step(a, LU.T @ _ascent(loc), group["lr"], group["max_kl"])
        R = LU * f.rsqrt()
        L_new = cholesky_from_factor(R)
        loc.add_(LU @ delta)
        log_diag.copy_(torch.log(L_new.diagonal()))
        off_diag.copy_(torch.tril(L_new, -1))

    @staticmethod
    def _categorical(group, logits):
        g = _ascent(logits)
        p = torch.softmax(logits, -1)
        step = group["lr"] * g / p.clamp_min(group["floor"])
        if group["max_kl"] is not None:
            step = step * categorical_damping(logits, step, group["max_kl"])
        logits.add_(step)


def damped_step(a1, h, rho, max_kl):
    """The Gaussian step in q's eigen-frame: (phi (D,), delta (D,)). a1: the eigenvalues of 2 L^T G L (the
    precision change at rho = 1), h = U^T L^T g_m (the mean gradient in that frame); phi = phi(t rho a1) is the
    precision multiplier along each direction and delta = t rho h / phi the mean's move in old-sd units, with
    t = 1 or, where that step's symmetrised KL exceeds max_kl per dimension, the largest t = 2^-k that
    satisfies it (the trust region)."""
    if max_kl is None:
        f = phi(rho * a1)
        return f, rho * h / f
    ts = 0.5 ** torch.arange(_HALVINGS, device=a1.device, dtype=a1.dtype)[:, None]        # (T, 1)
    f = phi(ts * rho * a1)                                                                 # (T, D)
    delta = ts * rho * h / f
    kl = 0.25 * ((f + 1 / f - 2) + (1 + f) * delta * delta).sum(-1)                       # (T,)
    ok = kl <= max_kl * a1.shape[-1]
    k = torch.where(ok.any(), ok.to(torch.int8).argmax(), ok.shape[0] - 1)                # first t that fits
    return f[k], delta[k]


def categorical_damping(logits, step, max_kl):
    """The trust region of a Categorical block: t = 1, or the largest 2^-k such that logits + t step is within
    a symmetrised KL of max_kl per entry (summed over the block's entries) of the current q."""
    ts = 0.5 ** torch.arange(_HALVINGS, device=logits.device, dtype=logits.dtype)
    ts = ts.reshape((-1,) + (1,) * logits.dim())
    logp = torch.log_softmax(logits, -1)
    new = torch.log_softmax(logits + ts * step, -1)                                        # (T, ..., K)
    kl = 0.5 * ((new.exp() - logp.exp()) * (new - logp)).reshape(ts.shape[0], -1).sum(-1)  # (T,)
    ok = kl <= max_kl * max(logits[..., 0].numel(), 1)
    k = torch.where(ok.any(), ok.to(torch.int8).argmax(), ok.shape[0] - 1)
    return ts.reshape(-1)[k]


def _phi_lower(L, g_L):
    """P = Phi(L^T g_L): the lower triangle of L^T g_L with its diagonal halved."""
    P = torch.tril(L.T @ g_L)
    return P - 0.5 * torch.diag_embed(P.diagonal())


def whitened_step(L, g_L, rho):
    """A = 2 rho L^T G L = rho (P + P^T), the exact step's change of precision in q's frame (g_L = dELBO/dL,
    lower triangular; G = sigma_gradient(L, g_L))."""
    P = _phi_lower(L, g_L)
    return rho * (P + P.T)


def sigma_gradient(L, g_L):
    """The symmetric G = dELBO/dSigma with tril(2 G L) = g_L: sym(L^-T P L^-1), P = Phi(L^T g_L)."""
    P = _phi_lower(L, g_L)
    X = torch.linalg.solve_triangular(L.T, P, upper=True)             # L^-T P
    G0 = torch.linalg.solve_triangular(L, X, upper=False, left=False)  # L^-T P L^-1
    return 0.5 * (G0 + G0.T)


def cholesky_from_factor(R):
    """The lower-triangular L with positive diagonal and L L^T = R R^T, from the QR factorisation of R^T."""
    _, T = torch.linalg.qr(R.T)
    sign = torch.where(T.diagonal() < 0, -1.0, 1.0).to(T.dtype)
    return (sign[:, None] * T).T
