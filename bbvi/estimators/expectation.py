"""The log-derivative trick on its own: E_p[f] and its gradient for any distribution p_theta.

    grad_theta E_p[f(x)] = E_p[f(x) grad_theta log p_theta(x)]                      (score)
    grad_theta E_p[f(x)] = E_eps[grad_theta f(T_theta(eps))]                         (pathwise)

`expectation` returns a scalar whose value is the Monte Carlo estimate of E[f] and whose derivatives are the
estimator's. On the score path it is written in the DiCE form (Foerster et al. 2018) with a baseline (Mao et al.
2019): with the "magic box" B(x) = exp(log p(x) - stop(log p(x))) (value 1, gradient grad log p),

    surrogate = mean_s [ B(x_s) (f_s - b_s) + b_s ]

whose value is mean f and whose first *and higher* derivatives are unbiased (the naive f * log p gets the
second derivative wrong). With proposals q_j (importance sampling, off-policy), x_s ~ q and the weights
w_s = p(x_s) / sum_j (n_j / n) q_j(x_s) (the balance heuristic of multiple importance sampling; one proposal:
p / q) carry the gradient: surrogate = mean_s [ w_s (f_s - b_s) + stop(w_s) b_s ].

Draws use the generator passed in (never the global RNG): Normal, LogNormal, Uniform, Exponential, Laplace,
Cauchy, Gumbel, Bernoulli, Categorical, OneHotCategorical, and Independent of those.
"""
import math

import torch
import torch.distributions as D

from ..errors import ConfigError

__all__ = ["expectation", "draw"]


class FamilyDistribution:
    """A bbvi family with its parameters, seen as a distribution over (num, D) vectors."""

    has_rsample = True

    def __init__(self, family, params):
        from ..families import resolve_family
        self.family, self.params = resolve_family(family), params

    def log_prob(self, x):
        return self.family.log_prob(self.params, x)


def _as_distribution(dist):
    if isinstance(dist, tuple) and len(dist) == 2:
        return FamilyDistribution(*dist)
    if not isinstance(dist, (D.Distribution, FamilyDistribution)):
        raise ConfigError(f"dist must be a torch.distributions.Distribution or a (family, params) pair, got "
                          f"{type(dist).__name__}")
    return dist


def draw(dist, num, generator, *, pathwise=False):
    """(num, *batch, *event) draws of `dist` from `generator`; differentiable in its parameters when
    `pathwise` (location-scale or inverse-CDF transforms of generator noise)."""
    if isinstance(dist, FamilyDistribution):
        return (dist.family.rsample if pathwise else dist.family.sample)(dist.params, num, generator)
    if isinstance(dist, D.Independent):
        return draw(dist.base_dist, num, generator, pathwise=pathwise)
    shape = (num,) + tuple(dist.batch_shape) + tuple(dist.event_shape)
    ref = dist.mean if not isinstance(dist, (D.Categorical,)) else dist.logits
    kw = dict(generator=generator, device=ref.device, dtype=ref.dtype)
    if isinstance(dist, D.Normal):
        x = dist.loc + dist.scale * torch.randn(shape, **kw)
    elif isinstance(dist, D.LogNormal):
        x = torch.exp(dist.loc + dist.scale * torch.randn(shape, **kw))
    elif isinstance(dist, D.Bernoulli):
        x = (torch.rand(shape, **kw) < dist.probs).to(ref.dtype)
    elif isinstance(dist, (D.Categorical, D.OneHotCategorical)):
        logits = dist.logits
        u = torch.rand((num,) + tuple(logits.shape), **kw).clamp_min(torch.finfo(logits.dtype).tiny)
        idx = (logits.detach() - torch.log(-torch.log(u))).argmax(-1)
        x = idx if isinstance(dist, D.Categorical) else torch.nn.functional.one_hot(idx, logits.shape[-1]).to(
            logits.dtype)
    elif isinstance(dist, (D.Uniform, D.Exponential, D.Laplace, D.Cauchy, D.Gumbel)):
        eps = torch.finfo(ref.dtype).eps
        x = dist.icdf(torch.rand(shape, **kw).clamp(eps, 1 - eps))
    else:
        raise ConfigError(f"bbvi.expectation cannot draw from {type(dist).__name__} with a generator; supported: "
                          f"Normal, LogNormal, Uniform, Exponential, Laplace, Cauchy, Gumbel, Bernoulli, "
                          f"Categorical, OneHotCategorical and Independent of those")
    return x if pathwise and dist.has_rsample else x.detach()


def _log_prob(dist, x):
    """(num,) log density of draws x, summed over batch and event dimensions."""
    lp = dist.log_prob(x)
    return lp.reshape(x.shape[0], -1).sum(-1)


def _values(f, x):
    """f(x) as a (num,) tensor in x's float dtype; f may be numpy or any Python callable."""
    out = f(x)
    if not torch.is_tensor(out):
        out = torch.as_tensor(out)
    out = out.to(x.dtype if x.is_floating_point() else torch.float64)
    if tuple(out.shape) != (x.shape[0],):
        raise ConfigError(f"f must return one value per draw, shape ({x.shape[0]},); got {tuple(out.shape)}")
    return out


def _baseline(values, baseline):
    n = values.shape[0]
    if baseline in (None, "none"):
        return torch.zeros_like(values)
    if baseline == "loo":
        if n < 2:
            raise ConfigError("baseline='loo' needs num_samples >= 2: each draw's baseline is the mean of the others")
        return (values.sum() - values) / (n - 1)
    raise ConfigError(f"bbvi.expectation: baseline must be None or 'loo', got {baseline!r}")


def _signal(values, b, standardize, clip):
    """The learning signal f - b ("advantages"), optionally standardised and clipped; it never depends on
    theta, so the estimate stays unbiased for any baseline that does not use the draw itself."""
    a = values - b
    if standardize:
        a = a / values.std().clamp_min(1e-12)
    if clip is not None:
        a = a.clamp(-clip, clip)
    return a


def expectation(f, dist, *, num_samples, estimator="auto", baseline="loo", proposal=None, generator=None,
                standardize=False, clip=None, return_info=False):
    """Monte Carlo estimate of E_{x ~ dist}[f(x)] whose gradient (`.backward()`, `torch.autograd.grad`, to any
    order on the score path) estimates grad E[f] in the parameters of `dist`.

    f: (num_samples, *event) draws -> (num_samples,) values; on the score path any Python or numpy code.
    dist: a torch.distributions distribution whose parameters require grad, or a pair (bbvi family, its params
    dict), e.g. (bbvi.MeanField(), {"loc": ..., "log_scale": ...}). estimator: 'score' | 'pathwise' |
    'auto' (pathwise where dist has rsample and f returns a tensor with gradient, score otherwise). baseline:
    None | 'loo' (leave-one-out over the draws). proposal: a distribution, or a list of them, to draw from
    instead of dist (importance sampling, off-policy; several are combined by the balance heuristic, the draws
    split evenly). generator: a torch.Generator (default: a fresh one seeded 0). standardize: divide the
    learning signals by the sd of f (a biased but often steadier step, as in policy gradients); clip: clamp the
    signals to [-clip, clip]. return_info: also return a dict with 'estimator', and with proposals the
    importance weights' effective sample size 'ess' and PSIS 'khat'.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be a positive int, got {num_samples!r}")
    dist = _as_distribution(dist)
    if estimator not in ("auto", "score", "pathwise"):
        raise ConfigError(f"estimator must be 'auto', 'score' or 'pathwise', got {estimator!r}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    info = {}
    if proposal is not None:
        value, info = _importance(f, dist, proposal, num_samples, generator, baseline, standardize, clip)
        info["estimator"] = "score (importance sampled)"
    else:
        path = estimator
        if estimator in ("auto", "pathwise"):
            if not dist.has_rsample:
                if estimator == "pathwise":
                    raise ConfigError(f"estimator='pathwise' needs a reparameterizable distribution; "
                                      f"{type(dist).__name__} has none: use 'score'")
                path = "score"
            else:
                x = draw(dist, num_samples, generator, pathwise=True)
                try:
                    values = f(x)
                    differentiable = torch.is_tensor(values) and values.requires_grad
                except Exception as e:  # noqa: BLE001 - f is not torch code: score path, or say why not
                    if estimator == "pathwise":
                        raise ConfigError(f"estimator='pathwise' needs f in torch; it raised "
                                          f"{type(e).__name__}: {e}") from e
                    differentiable = False
                if differentiable:
                    values = _values(lambda _: values, x)
                    info["estimator"] = "pathwise"
                    value = values.mean()
                    return (value, info) if return_info else value
                if estimator == "pathwise":
                    raise ConfigError("estimator='pathwise' needs f differentiable in torch; f's value has no "
                                      "gradient: use 'score'")
                path = "score"
        x = draw(dist, num_samples, generator)
        with torch.no_grad():
            values = _values(f, x)
        logp = _log_prob(dist, x)
        box = torch.exp(logp - logp.detach())  # DiCE's magic box: value 1, gradient grad log p, to every order
        b = _baseline(values, baseline)
        value = (box * _signal(values, b, standardize, clip)).mean() + (values - _signal(values, b, standardize,
                                                                                          clip)).mean()
        info["estimator"] = path
    return (value, info) if return_info else value


def _importance(f, dist, proposal, num_samples, generator, baseline, standardize, clip):
    proposals = list(proposal) if isinstance(proposal, (list, tuple)) else [proposal]
    proposals = [_as_distribution(q) for q in proposals]
    sizes = [num_samples // len(proposals) + (j < num_samples % len(proposals)) for j in range(len(proposals))]
    xs = [draw(q, n, generator) for q, n in zip(proposals, sizes) if n > 0]
    x = torch.cat(xs)
    with torch.no_grad():
        values = _values(f, x)
        log_mix = torch.logsumexp(torch.stack([_log_prob(q, x) + math.log(n / num_samples)
                                               for q, n in zip(proposals, sizes) if n > 0]), 0)
    logw = _log_prob(dist, x) - log_mix
    w = torch.exp(logw)
    b = _baseline(values, baseline)
    a = _signal(values, b, standardize, clip)
    value = (w * a).mean() + (w.detach() * (values - a)).mean()
    from ..diagnostics import psis
    lw = logw.detach().double().cpu().numpy()
    # equal weights (the proposal is the target): no tail to fit, the estimate is the plain Monte Carlo one
    khat = psis(lw)[1] if lw.max() - lw.min() > 1e-12 else 0.0
    wn = torch.softmax(logw.detach().double(), 0)
    return value, {"ess": float(1.0 / (wn ** 2).sum()), "khat": float(khat)}
