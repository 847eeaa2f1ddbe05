"""A fit as an arviz.InferenceData (`Result.to_arviz`): q's draws as the posterior, the log weights, pointwise log
likelihoods of the observed factors, a posterior predictive, the observed data."""

import math

import torch

from .arviz_names import arviz_dims, check_arviz_names
from .errors import ConfigError
from .estimators import log_q
from .arguments import check_count
from .arguments import pick as _pick


def to_arviz(result, num_draws=4000, seed=0, *, num_chains=None, log_likelihood=None, predict=None,
             observed_data=None, dims=None, coords=None, importance_resample=False):
    """Result.to_arviz (see its docstring)."""
    import arviz as az
    where = f"to_arviz (model {result.model.name!r})"
    num_draws, seed = result._check_draws(num_draws, seed, "fit.to_arviz")
    check_arviz_names(result.model.latents, where)
    if num_chains is None:
        num_chains = next(c for c in (4, 2, 1) if num_draws % c == 0 and num_draws // c >= 4 or c == 1)
    num_chains = check_count("num_chains", num_chains, "fit.to_arviz")
    if num_draws % num_chains:
        raise ConfigError(f"fit.to_arviz: num_chains={num_chains} must divide num_draws={num_draws} (the "
                          f"independent draws are split into that many equal groups)")
    if not isinstance(importance_resample, bool):
        raise ConfigError(f"fit.to_arviz: importance_resample must be True or False, got {importance_resample!r}")
    if importance_resample:   # PSIS-resampled draws (fit.sample(importance_resample=True)'s), their weights
        u, k = result._resampled(num_draws, seed)
        log_w = result.log_weights_at(u, k)
    else:
        u, k, log_w = result.weighted_draws(num_draws, seed)
    draws = result.model.named_draws(u, k, seed=seed)
    check_arviz_names(draws, where, "derived quantity")

    def grouped(t):
        a = t.detach().cpu().numpy()
        return a.reshape((num_chains, num_draws // num_chains) + a.shape[1:])
    groups = {"posterior": {n: grouped(v) for n, v in draws.items()}}
    with torch.no_grad():
        lq = log_q(result.model, result.family, result.discrete, result.params, u, k)
    lq = sum(t for t in lq if t is not None)
    groups["sample_stats"] = {"log_weight": grouped(log_w), "lp": grouped(log_w + lq)}
    loglik = _pointwise_log_likelihood(result, u, k, log_likelihood)
    if loglik:
        groups["log_likelihood"] = {n: grouped(v) for n, v in loglik.items()}
    predict = predict if predict is not None else result.model.predict
    if predict is not None:
        groups["posterior_predictive"] = {n: grouped(v) for n, v in _predictive(result, predict, u, k, seed).items()}
    observed = _observed(result, observed_data)
    dims = dict(dims or {})
    auto = arviz_dims({n: a for g in groups.values() for n, a in g.items()})
    for n, d in auto.items():
        dims.setdefault(n, d)
    for n, v in observed.items():
        dims.setdefault(n, [f"{n}_dim_{i}" for i in range(v.ndim)])
    attrs = {k_: str(v) for k_, v in result.settings.items()}
    attrs.update(inference_library="bbvi", status=result.status, num_steps=result.num_steps,
                 num_failed_steps=result.num_failed_steps, final_elbo=float(result.final_elbo()),
                 draws=("draws of q importance-resampled toward the posterior (PSIS, k-hat "
                        f"{result.resample_info['khat']:.2f}, importance-sampling ESS "
                        f"{result.resample_info['is_ess']:.0f}), split into chains for ArviZ; repeats are kept"
                        if importance_resample else
                        "independent draws from q, split into chains for ArviZ: R-hat is not a check of the fit"))
    try:
        idata = az.from_dict(**groups, observed_data=observed or None, dims=dims, coords=coords)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"fit.to_arviz: ArviZ refused dims={dims!r} / coords={coords!r}: {e}") from None
    idata.posterior.attrs.update(attrs)
    return idata


def _pointwise_log_likelihood(result, u, k, names):
    """name -> (S, n...) pointwise log-likelihood terms (factor terms of the log-joint) at the draws."""
    if names is False:
        return {}
    with torch.no_grad():
        z, _ = result.model.constrain(u)
        z.update(k)
        probe = result.model.call_raw({n: v[:2] for n, v in z.items()})
    if not isinstance(probe, dict):
        if names is None:
            return {}
        raise ConfigError(f"fit.to_arviz: log_likelihood={names!r}, but model {result.model.name!r}'s log-joint "
                          f"returns one tensor; return a dict of factor terms ({{'prior': ..., 'obs': ...}}, "
                          f"'obs' with one term per observation) to get pointwise log-likelihoods")
    if names is None:  # a from_pyro model's observed sites, else the factor 'obs'
        names = list(getattr(result.model, "pyro_observed", ())) or (["obs"] if "obs" in probe else [])
    names = [names] if isinstance(names, str) else list(names)
    missing = [n for n in names if n not in probe]
    if missing:
        raise ConfigError(f"fit.to_arviz: log_likelihood names factor(s) {missing}; the log-joint of model "
                          f"{result.model.name!r} returns {list(probe)}")
    _check_log_likelihood_size(result, {n: probe[n] for n in names}, u)
    out = {n: [] for n in names}
    with torch.no_grad():
        for i in range(0, u.shape[0], 1024):
            terms = result.model.call_raw({n: v[i:i + 1024] for n, v in z.items()})
            for n in names:
                out[n].append(torch.as_tensor(terms[n]).to(u.dtype))
    return {n: torch.cat(v) for n, v in out.items()}

def _check_log_likelihood_size(result, probe, u, work=3):
    """ConfigError, before any is computed, when the pointwise log-likelihoods (draws x terms, in u's dtype, with
    `work` copies: the tensor, its numpy array, ArviZ's) would not fit in the machine's memory (seen: 4000 draws of a
    300,000-row plate, 9.6 GB, failed with a raw allocation error after 146 s)."""
    from .families import _memory_bytes
    terms = sum(math.prod(torch.as_tensor(t).shape[1:]) for t in probe.values())
    need = u.shape[0] * terms * u.element_size() * work
    have = _memory_bytes(u.device)
    if have is not None and need > have:
        most = max(1, int(have // (terms * u.element_size() * work)))
        raise ConfigError(f"fit.to_arviz: the pointwise log-likelihoods of {list(probe)} are {u.shape[0]} draws x "
                          f"{terms} terms: about {need / 2 ** 30:.1f} GiB with their copies, more than this machine's "
                          f"{have / 2 ** 30:.1f} GiB. Pass log_likelihood=False, or num_draws of at most {most}")


def _predictive(result, predict, u, k, seed):
    if not callable(predict):
        raise ConfigError(f"fit.to_arviz: predict must be a callable (z, data, generator) -> dict, got {predict!r}")
    with torch.no_grad():
        z, _ = result.model.constrain(u)
        z.update(k)
        out = predict(z, result.model.data, result._generator(seed))
    if not isinstance(out, dict) or not all(torch.is_tensor(v) and v.shape[:1] == (u.shape[0],)
                                            for v in out.values()):
        raise ConfigError(f"fit.to_arviz: predict must return a dict name -> Tensor ({u.shape[0]}, ...), one "
                          f"simulated data set per draw; got {type(out).__name__}"
                          + (f" with shapes { {n: tuple(getattr(v, 'shape', ())) for n, v in out.items()} }"
                             if isinstance(out, dict) else ""))
    return out

def _observed(result, which):
    """name -> numpy array: the model's data entries for the observed_data group (a from_pyro model's: its observed
    sites' values, under the names of their posterior predictive draws)."""
    data = getattr(result.model, "pyro_observed_data", None)
    data = result.model.data if data is None else data
    if which is False or data is None:
        return {}
    items = data.items() if isinstance(data, dict) else [("data", data)]
    tensors = {str(n): v for n, v in items if torch.is_tensor(v)}
    if which is not None:
        tensors = _pick(tensors, which, "fit.to_arviz: observed_data names", "the model's data tensors are")
    return {n: v.detach().cpu().numpy() for n, v in tensors.items()}
