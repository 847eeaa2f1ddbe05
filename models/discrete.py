"""Models with discrete latents, each with an exact answer by enumeration.

- `mixture` (and `mixture_arithmetic`, the same joint written as arithmetic in z, for the Concrete relaxation):
  two-component Gaussian mixture with latent assignments z[n] in {0, 1}; component means mu[k] ~ N(m_k, 2^2) (asymmetric prior means break label switching), known sd 1, weights 1/2. Exact: sum over
  all 2^N assignments, each with a conjugate Gaussian marginal likelihood.
- `latent_features`: binary latent-feature model: x[n] ~ N(W s[n], 0.5^2 I) with known W (K=3 features,
  D=4), s[n, k] ~ Bernoulli(0.3). Exact: the 2^K states of every observation.
- `changepoint`: counts y[t] ~ Poisson(lam1) before the switch point tau and Poisson(lam2) from it on,
  lam ~ Gamma(2, 0.5), tau uniform on 1..T-1 (coal-mining style). Mixed: continuous lam by the pathwise
  path, tau by the score path. Exact: p(tau | y) by Gamma-Poisson conjugacy for every tau.

`exact(name)` returns the exact posterior quantities that a fit is compared with.
"""
import itertools
import math

import torch
from torch.distributions import Bernoulli, Gamma, Normal, Poisson, constraints

import bbvi

__all__ = ["mixture", "latent_features", "changepoint", "mixture_factors", "mixture_arithmetic", "latent_features_factors", "exact",
           "meanfield_optimum", "MODELS", "FACTOR_MODELS"]

_G = torch.Generator().manual_seed(7)

# ---- mixture ------------------------------------------------------------------------------------------------
MIX_PRIOR_MEANS = torch.tensor([-2.0, 2.0], dtype=torch.float64)
MIX_PRIOR_SD = 2.0
MIX_Y = torch.tensor([-2.6, -1.1, -2.2, 0.3, 2.4, 1.7, 3.1, -0.2, 2.0, 1.2], dtype=torch.float64)


def _mixture_log_joint(z, y):
    mu, assign = z["mu"], z["z"].long()                      # (S, 2), (S, N)
    loc = torch.gather(mu, 1, assign)                         # (S, N)
    return (Normal(MIX_PRIOR_MEANS.to(mu), MIX_PRIOR_SD).log_prob(mu).sum(-1)
            + Normal(loc, 1.0).log_prob(y).sum(-1) + len(y) * math.log(0.5))


mixture = bbvi.Model(_mixture_log_joint, {"mu": bbvi.Latent(shape=(2,)),
                                          "z": bbvi.Latent(shape=(len(MIX_Y),), support=constraints.boolean)},
                     data=MIX_Y, name="mixture_assignments")


def _mixture_factors(z, y):
    """The same joint as factor terms: each assignment z_n appears only in its own term (Rao-Blackwellized)."""
    mu, assign = z["mu"], z["z"].long()
    loc = torch.gather(mu, 1, assign)
    return {"prior_mu": Normal(MIX_PRIOR_MEANS.to(mu), MIX_PRIOR_SD).log_prob(mu),
            "obs": Normal(loc, 1.0).log_prob(y) + math.log(0.5)}


mixture_factors = bbvi.Model(_mixture_factors, dict(mixture.latents), data=MIX_Y, name="mixture_assignments_factors")


def _mixture_arithmetic(z, y):
    """The same joint with each mean picked by arithmetic in z (mu0 + (mu1 - mu0) z), not by indexing: defined,
    and differentiable, between the support points too, as the Concrete relaxation needs."""
    mu, assign = z["mu"], z["z"]
    loc = mu[:, :1] + (mu[:, 1:] - mu[:, :1]) * assign
    return (Normal(MIX_PRIOR_MEANS.to(mu), MIX_PRIOR_SD).log_prob(mu).sum(-1)
            + Normal(loc, 1.0).log_prob(y).sum(-1) + len(y) * math.log(0.5))


mixture_arithmetic = bbvi.Model(_mixture_arithmetic, dict(mixture.latents), data=MIX_Y,
                                name="mixture_assignments_arithmetic")


def _mixture_exact():
    """Enumerate 2^N assignments; for each, mu_k | z is conjugate Gaussian."""
    y = MIX_Y
    logw, means, seconds, zs = [], [], [], []
    for assign in itertools.product([0, 1], repeat=len(y)):
        a = torch.tensor(assign)
        lw, m, s2 = 0.0, [], []
        for k in range(2):
            yk = y[a == k]
            prec = 1 / MIX_PRIOR_SD ** 2 + len(yk)
            mean = (MIX_PRIOR_MEANS[k] / MIX_PRIOR_SD ** 2 + yk.sum()) / prec
            # marginal likelihood of yk under mu_k ~ N(m_k, s^2): multivariate normal with cov I + s^2 11^T
            cov = torch.eye(len(yk), dtype=torch.float64) + MIX_PRIOR_SD ** 2
            if len(yk):
                lw += torch.distributions.MultivariateNormal(MIX_PRIOR_MEANS[k].expand(len(yk)), cov).log_prob(yk)
            m.append(mean)
            s2.append(1 / prec)
        logw.append(lw)
        means.append(torch.stack([torch.as_tensor(v) for v in m]))
        seconds.append(torch.stack([torch.as_tensor(v) for v in s2]))
        zs.append(a)
    w = torch.softmax(torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in logw]), 0)
    means, var = torch.stack(means), torch.stack(seconds)
    zs = torch.stack(zs).double()
    mu_mean = (w[:, None] * means).sum(0)
    mu_sd = ((w[:, None] * (var + means ** 2)).sum(0) - mu_mean ** 2).sqrt()
    return {"mu_mean": mu_mean, "mu_sd": mu_sd, "p_z": (w[:, None] * zs).sum(0)}


def _mixture_cavi(iters=500):
    """The mean-field optimum (coordinate ascent, Bishop 2006 sec. 10.2): q(mu_k) = N(m_k, v_k), q(z_n = 1) = r_n.
    Started from the prior means; the data are well separated, so this is the optimum the fit should find."""
    y = MIX_Y
    m, v = MIX_PRIOR_MEANS.clone(), torch.full((2,), MIX_PRIOR_SD ** 2, dtype=torch.float64)
    for _ in range(iters):
        logit = -0.5 * ((y - m[1]) ** 2 + v[1]) + 0.5 * ((y - m[0]) ** 2 + v[0])
        r = torch.sigmoid(logit)
        resp = torch.stack([1 - r, r])                       # (2, N)
        prec = 1 / MIX_PRIOR_SD ** 2 + resp.sum(1)
        m = (MIX_PRIOR_MEANS / MIX_PRIOR_SD ** 2 + resp @ y) / prec
        v = 1 / prec
    return {"mu_mean": m, "mu_sd": v.sqrt(), "p_z": r}


# ---- latent features ----------------------------------------------------------------------------------------
FEAT_W = torch.tensor([[1.5, 0.0, 0.5, -1.0], [0.0, 1.5, -0.5, 1.0], [1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
_S_TRUE = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1], [0, 0, 0], [1, 0, 1]], dtype=torch.float64)
FEAT_X = _S_TRUE @ FEAT_W + 0.5 * torch.randn(6, 4, generator=_G, dtype=torch.float64)
FEAT_PRIOR, FEAT_NOISE = 0.3, 0.5


def _features_log_joint(z, x):
    s = z["s"]                                                # (S, N, K)
    return (Bernoulli(probs=torch.tensor(FEAT_PRIOR, dtype=s.dtype)).log_prob(s).sum((-1, -2))
            + Normal(s @ FEAT_W.to(s), FEAT_NOISE).log_prob(x).sum((-1, -2)))


latent_features = bbvi.Model(_features_log_joint,
                             {"s": bbvi.Latent(shape=tuple(_S_TRUE.shape), support=constraints.boolean)},
                             data=FEAT_X, name="latent_features")


def _features_factors(z, x):
    """Factor terms: one prior term per feature indicator, one likelihood term per data row (s[n] only)."""
    s = z["s"]
    return {"prior": Bernoulli(probs=torch.tensor(FEAT_PRIOR, dtype=s.dtype)).log_prob(s).reshape(s.shape[0], -1),
            "obs": Normal(s @ FEAT_W.to(s), FEAT_NOISE).log_prob(x).sum(-1)}


latent_features_factors = bbvi.Model(_features_factors, dict(latent_features.latents), data=FEAT_X,
                                     name="latent_features_factors")


def _features_exact():
    states = torch.tensor(list(itertools.product([0, 1], repeat=3)), dtype=torch.float64)   # (8, K)
    p = []
    for n in range(FEAT_X.shape[0]):
        lp = (Bernoulli(probs=torch.tensor(FEAT_PRIOR, dtype=torch.float64)).log_prob(states).sum(-1)
              + Normal(states @ FEAT_W, FEAT_NOISE).log_prob(FEAT_X[n]).sum(-1))
        p.append((torch.softmax(lp, 0)[:, None] * states).sum(0))
    return {"p_s": torch.stack(p)}


def _features_cavi(iters=500):
    """The mean-field optimum by coordinate ascent on q(s_nk = 1) = p_nk, from p = prior."""
    W, x, K = FEAT_W, FEAT_X, FEAT_W.shape[0]
    p = torch.full((x.shape[0], K), FEAT_PRIOR, dtype=torch.float64)
    prior_logit = math.log(FEAT_PRIOR / (1 - FEAT_PRIOR))
    for _ in range(iters):
        for k in range(K):
            rest = x - p @ W + p[:, k:k + 1] * W[k]            # x - sum_{j != k} p_j W_j
            p[:, k] = torch.sigmoid(prior_logit - ((W[k] ** 2).sum() - 2 * rest @ W[k]) / (2 * FEAT_NOISE ** 2))
    return {"p_s": p}


# ---- change point -------------------------------------------------------------------------------------------
CP_Y = torch.tensor([4, 5, 4, 1, 0, 4, 3, 4, 0, 6, 3, 3, 4, 0, 2, 6, 3, 3, 5, 4,
                     1, 0, 1, 1, 0, 2, 1, 0, 1, 0, 1, 2, 0, 1, 1, 0, 0, 2, 1, 0], dtype=torch.float64)
CP_A, CP_B = 2.0, 0.5


def _changepoint_log_joint(z, y):
    l1, l2, tau = z["lam1"], z["lam2"], z["tau"]             # (S,), (S,), (S,) int
    t = torch.arange(len(y), device=y.device)
    rate = torch.where(t[None, :] < tau[:, None], l1[:, None], l2[:, None])
    prior = Gamma(l1.new_tensor(CP_A), l1.new_tensor(CP_B))
    return prior.log_prob(l1) + prior.log_prob(l2) + Poisson(rate).log_prob(y).sum(-1) - math.log(len(y) - 1)


changepoint = bbvi.Model(_changepoint_log_joint,
                         {"lam1": bbvi.Latent(support=constraints.positive),
                          "lam2": bbvi.Latent(support=constraints.positive),
                          "tau": bbvi.Latent(support=constraints.integer_interval(1, len(CP_Y) - 1))},
                         data=CP_Y, name="changepoint")


def _changepoint_exact():
    y, T = CP_Y, len(CP_Y)
    taus = torch.arange(1, T)
    logw, m1, m2 = [], [], []
    for tau in taus:
        a1, b1 = CP_A + y[:tau].sum(), CP_B + tau
        a2, b2 = CP_A + y[tau:].sum(), CP_B + (T - tau)
        # log marginal likelihood up to terms common to every tau
        lw = (torch.lgamma(a1) - a1 * torch.log(b1) + torch.lgamma(a2) - a2 * torch.log(torch.as_tensor(b2)))
        logw.append(lw)
        m1.append(a1 / b1)
        m2.append(a2 / b2)
    w = torch.softmax(torch.stack(logw).double(), 0)
    return {"p_tau": w, "taus": taus, "lam1_mean": (w * torch.stack(m1)).sum(), "lam2_mean": (w * torch.stack(m2)).sum()}


MODELS = {"mixture": mixture, "latent_features": latent_features, "changepoint": changepoint}
FACTOR_MODELS = {"mixture": mixture_factors, "latent_features": latent_features_factors}
_EXACT = {"mixture": _mixture_exact, "latent_features": _features_exact, "changepoint": _changepoint_exact}


_MEANFIELD = {"mixture": _mixture_cavi, "latent_features": _features_cavi}


def exact(name):
    """Exact posterior quantities of a discrete model (by enumeration)."""
    return _EXACT[name]()


def meanfield_optimum(name):
    """The exact optimum of the mean-field family (coordinate ascent), where it has a closed form: what a
    mean-field fit can reach at best, as opposed to the exact posterior."""
    return _MEANFIELD[name]()
