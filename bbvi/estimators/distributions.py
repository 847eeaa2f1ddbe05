"""The distributions `bbvi.expectation` takes, and drawing from them with the generator passed in (never the
global RNG): Normal, LogNormal, Uniform, Exponential, Laplace, Cauchy, Gumbel, Bernoulli, Categorical,
OneHotCategorical, Independent of those, a bbvi family with its parameters (`FamilyDistribution`), and any object
with draw(num, generator) and log_prob(x). expectation.py re-exports them."""
import torch
import torch.distributions as D

from ..errors import ConfigError

__all__ = ["draw", "FamilyDistribution"]


class FamilyDistribution:
    """A bbvi family with its parameters, seen as a distribution over (num, D) vectors."""

    has_rsample = True

    def __init__(self, family, params):
        from ..family_names import resolve_family
        self.family, self.params = resolve_family(family), params

    def log_prob(self, x):
        return self.family.log_prob(self.params, x)


def _as_distribution(dist):
    if isinstance(dist, tuple) and len(dist) == 2:
        return FamilyDistribution(*dist)
    if not isinstance(dist, (D.Distribution, FamilyDistribution)) and not (
            callable(getattr(dist, "draw", None)) and callable(getattr(dist, "log_prob", None))):
        raise ConfigError(f"dist must be a torch.distributions.Distribution, a (family, params) pair or an object "
                          f"with draw(num, generator) and log_prob(x), got {type(dist).__name__}")
    return dist


def draw(dist, num, generator, *, pathwise=False):
    """(num, *batch, *event) draws of `dist` from `generator`; differentiable in its parameters when
    `pathwise` (location-scale or inverse-CDF transforms of generator noise)."""
    if isinstance(dist, FamilyDistribution):
        return (dist.family.rsample if pathwise else dist.family.sample)(dist.params, num, generator)
    if not isinstance(dist, D.Distribution):  # a user's distribution with draw(num, generator)
        return dist.draw(num, generator)
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
