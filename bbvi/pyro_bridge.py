"""bbvi.from_pyro: a Pyro model as a bbvi.Model with the same log density, computed by Pyro itself.

`from_pyro(model, *args, **kwargs)` traces `model(*args, **kwargs)` once (its randomness from a seeded fork of the
RNG: the caller's RNG is untouched) to find its sample sites. Every unobserved site becomes a latent with the
site's shape and its distribution's support (continuous: bbvi's bijection to the reals; Bernoulli: boolean;
Categorical and other finite supports: integer_interval), in the order Pyro meets them. The log-joint conditions
the model on one particle's values (`poutine.condition`), so the model runs exactly as in Pyro (`alpha[county]`,
`X @ beta`, `.unsqueeze(-1)` all work), under `torch.func.vmap` over the particle dimension, and returns each
sample site's log-probability (scale and mask applied, `Trace.compute_log_prob`) as a factor term of one element
per plate entry: observed sites are then pointwise log-likelihoods (`fit.to_arviz()` puts them in its
log_likelihood group; `model.pyro_observed` names them) and the score terms are Rao-Blackwellized over plates.
`pyro.deterministic` sites and `poutine.reparam` sites (LocScaleReparam's `theta` beside its latent
`theta_decentered`: Pyro records them as observed Deltas) become derived quantities under their own names, their
values from the model's own trace. The model's posterior predictive is its `predict` (`fit.to_arviz()` puts it in
posterior_predictive, the observed sites' values in observed_data, so `az.plot_ppc` runs): each observed site drawn
from its distribution at each draw, the model run with the latents conditioned and the observations left out
(what follows an observed site sees its draw, as in `pyro.infer.Predictive` with `y=None`), under vmap where the
site's sampler batches, reproducible by seed. Once a call signature (particles, dtypes, data) has come back 100
times, the vectorized log-joint runs as the aten graph make_fx recorded from that run (bbvi.replay: no Pyro
handlers or vmap wrapping per step; the same values and gradients bit for bit). The vectorized run is checked
against one particle at a time at two prior draws (their finite entries equal, their non-finite entries in the
same places). A model that vmap cannot run (Python control flow on latent values, in-place writes of latents) or
that disagrees runs one particle at a time instead, with one warning naming the reason, the measured cost and the
fix (`model.vectorized` says which; `model.pyro_vectorize_failure` keeps the reason). The model's arguments travel
as the bbvi model's data, so a fit casts their floating tensors to its dtype and device.

Refused with a ModelError: `pyro.param` sites (bbvi fits latents; make it a pyro.sample with a prior, or pass a
constant), a support that depends on other latents (Uniform(0, tau) with a latent tau), unbounded discrete sites
(Poisson latents), and sites whose names bbvi cannot use.
"""
import time
import warnings

import torch
from torch.distributions import constraints

from .errors import ModelError
from .replay import Replay

__all__ = ["from_pyro"]


def _base_support(support):
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support


def _prior_trace(model, args, kwargs, seed):
    import pyro.poutine as poutine
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return poutine.trace(model).get_trace(*args, **kwargs)


def _computed(site):
    """Whether the model computes the site's value: `pyro.deterministic`, or a `poutine.reparam` site (Pyro records
    the reparameterized site as an observed Delta at the value its reparameterizer computed from the new sites)."""
    import pyro.distributions as dist
    fn = site["fn"]
    while isinstance(fn, (dist.MaskedDistribution, dist.Independent)):
        fn = fn.base_dist
    return bool(site["infer"].get("_deterministic")) or (site["is_observed"] and isinstance(fn, dist.Delta))


def _bounds(support):
    return tuple(torch.as_tensor(getattr(support, b)).detach().clone()
                 for b in ("lower_bound", "upper_bound") if hasattr(support, b))


def _latents(model, args, kwargs, name):
    """(latents dict, computed site names (deterministic and reparameterized sites), observed site name -> its
    value, the two prior traces)."""
    from pyro.poutine.util import site_is_subsample

    from .model import Latent
    try:
        traces = [_prior_trace(model, args, kwargs, seed) for seed in (0, 1)]
    except Exception as e:  # noqa: BLE001 - the user's model, run as given
        raise ModelError(f"from_pyro: running the Pyro model {name!r} with the arguments given raised "
                         f"{type(e).__name__}: {e}") from e
    trace, other = traces
    latents, deterministic, observed = {}, [], {}
    for site_name, site in trace.nodes.items():
        if site["type"] == "param":
            raise ModelError(f"from_pyro: model {name!r} has pyro.param site {site_name!r}; bbvi fits latent "
                             f"variables only: make it a pyro.sample with a prior, or pass its value as a constant")
        if site["type"] == "sample" and site_is_subsample(site):
            size, sub = getattr(site["fn"], "size", None), getattr(site["fn"], "subsample_size", None)
            if sub is not None and size is not None and sub < size:
                raise ModelError(f"from_pyro: plate {site_name!r} subsamples ({sub} of {size} rows per run, drawn "
                                 f"from torch's global RNG): the log density would change from call to call. "
                                 f"Remove subsample_size from the Pyro model")
            continue
        if site["type"] != "sample":
            continue
        fn = site["fn"]
        if _computed(site):
            deterministic.append(site_name)
            continue
        if site["is_observed"]:
            if not site["infer"].get("is_auxiliary"):  # pyro.factor sites are auxiliary: no likelihood
                observed[site_name] = site["value"].detach()
            continue
        support = _base_support(fn.support)
        before, after = _bounds(support), _bounds(_base_support(other.nodes[site_name]["fn"].support))
        if any(not torch.equal(a, b) for a, b in zip(before, after)):
            raise ModelError(f"from_pyro: the support of site {site_name!r} ({support}) changes with the other "
                             f"latents' values; bbvi needs supports fixed in advance (reparameterize it, e.g. "
                             f"Uniform(0, tau) as tau * Uniform(0, 1))")
        shape = tuple(site["value"].shape)
        if support.is_discrete:
            if isinstance(support, type(constraints.boolean)):
                support = constraints.boolean
            elif not isinstance(support, constraints.integer_interval):
                raise ModelError(f"from_pyro: site {site_name!r} is discrete with support {support}, which bbvi "
                                 f"cannot enumerate (its discrete latents need a finite support: Bernoulli, "
                                 f"Categorical, a bounded integer interval)")
        try:
            latents[site_name] = Latent(shape=shape, support=support)
        except ModelError as e:
            raise ModelError(f"from_pyro: site {site_name!r}: {e}") from None
    if not latents:
        raise ModelError(f"from_pyro: model {name!r} has no unobserved sample sites: nothing to infer")
    _supports_fixed_at_every_discrete_value(model, args, kwargs, trace, latents)
    return latents, deterministic, observed, traces


MAX_SUPPORT_CHECKS = 64   # values of one discrete latent at which the other sites' supports are compared


def _supports_fixed_at_every_discrete_value(model, args, kwargs, trace, latents):
    """ModelError where a continuous site's support changes with a bounded discrete latent's value: two prior draws
    miss a rare branch (k ~ Bernoulli(0.05) with x ~ Uniform(0, 1 + 9 k) drew k = 0 twice, and x was fitted on
    [0, 1]). The model is run with each discrete latent set, in turn, to each of its first MAX_SUPPORT_CHECKS values
    (every element of it at once; the others as drawn), and every continuous site's support bounds compared with those of the prior draw."""
    import pyro.poutine as poutine
    continuous = [n for n, lat in latents.items() if not lat.support.is_discrete]
    for d, lat in latents.items():
        if not lat.support.is_discrete or not continuous:
            continue
        lo, hi = (0, 1) if isinstance(lat.support, type(constraints.boolean)) else (
            int(lat.support.lower_bound), int(lat.support.upper_bound))
        for v in range(lo, min(hi, lo + MAX_SUPPORT_CHECKS - 1) + 1):
            value = torch.full_like(trace.nodes[d]["value"], v)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                try:
                    at = poutine.trace(poutine.condition(model, data={d: value})).get_trace(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - the user's model, run at a value of its own support
                    raise ModelError(f"from_pyro: running the model with {d!r} = {v} (a value of its support "
                                     f"{lat.support}) raised {type(e).__name__}: {e}") from e
            for n in continuous:
                before = _bounds(_base_support(trace.nodes[n]["fn"].support))
                after = _bounds(_base_support(at.nodes[n]["fn"].support)) if n in at.nodes else before
                if any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(before, after)):
                    raise ModelError(f"from_pyro: the support of site {n!r} ({trace.nodes[n]['fn'].support}) "
                                     f"changes with the discrete latent {d!r}: at {d!r} = {v} it is "
                                     f"{at.nodes[n]['fn'].support} with bounds {[t.tolist() for t in after]}; bbvi "
                                     f"needs supports fixed in advance (reparameterize it, e.g. Uniform(0, 1 + 9 k) as "
                                     f"(1 + 9 k) * Uniform(0, 1))")


def _fills_obs_mask(name, trace):
    """Whether the latent site `name` is Pyro's obs_mask missing-data site: `{y}_unobserved` beside an observed
    `{y}_observed` (pyro.primitives._masked_observe)."""
    base = name[:-len("_unobserved")] if name.endswith("_unobserved") else None
    site = trace.nodes.get(f"{base}_observed") if base else None
    return site is not None and site["type"] == "sample" and site["is_observed"]


class _PyroJoint:
    """The log-joint (and derived quantities, and simulated observed sites) of a Pyro model, evaluated by Pyro on
    one particle's values: under `torch.func.vmap` over the particle dimension (`vectorized=True`), or by bbvi's
    loop over particles."""

    def __init__(self, model, latents, deterministic, vectorized, observed=()):
        self.model, self.latents = model, list(latents)
        self.deterministic, self.vectorized, self.observed = deterministic, vectorized, list(observed)
        self._replay = Replay(self._vmapped_terms)   # the vectorized log-joint's aten graph, once a call recurs

    def _vmapped_terms(self, z, data):
        return self._vmapped(self._terms, z, data)

    def _trace(self, z, data, model=None):
        import pyro.poutine as poutine
        return poutine.trace(poutine.condition(model or self.model, data=z)).get_trace(*data["args"],
                                                                                       **data["kwargs"])

    def _terms(self, z, data):
        """Each sample site's log-probability (scale and mask applied) at one particle, flattened. A missing-data
        site of Pyro's obs_mask (`{name}_unobserved`, a latent over every row whose density Pyro masks out where the
        row is observed) keeps its own distribution's density there too: those entries affect nothing (the site
        `{name}` takes the observed values there), and without a density the posterior would be improper."""
        from pyro.distributions.util import scale_and_mask
        from pyro.poutine.util import site_is_subsample
        trace = self._trace(z, data)
        trace.compute_log_prob()
        out = {}
        for n, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or site["infer"].get("_deterministic"):
                continue
            lp = site["log_prob"]
            if n in self.latents and _fills_obs_mask(n, trace):
                lp = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], None)
            out[n] = lp.reshape(-1) if lp.numel() > 1 else lp.reshape(())
        return out

    def _derived(self, z, data):
        trace = self._trace(z, data)
        return {n: trace.nodes[n]["value"] for n in self.deterministic}

    def _simulated(self, z, data):
        """One particle's draw of every observed site: the model run with its latents at z and its observed sites
        drawn from their distributions instead of set to the data (what follows an observed site sees its draw,
        as in pyro.infer.Predictive with the observations left out)."""
        trace = self._trace(z, data, _simulating(self.observed)(self.model))
        return {n: trace.nodes[n]["value"] for n in self.observed}

    def _vmapped(self, fn, z, data, randomness="error"):
        """fn(one particle's z, data) for every particle at once. Pyro's validation is off inside: its checks
        branch on values, which vmap cannot do (the loop's run at the prior draws was validated)."""
        import pyro
        with pyro.validation_enabled(False):
            return torch.func.vmap(lambda one: fn(one, data), randomness=randomness)({n: z[n] for n in self.latents})

    def _looped(self, fn, z, data, names):
        rows = [fn({n: z[n][s] for n in self.latents}, data) for s in range(z[self.latents[0]].shape[0])]
        return {n: torch.stack([r[n] for r in rows]) for n in names}

    def __call__(self, z, data):
        return self._replay(z, data) if self.vectorized else self._terms(z, data)

    def derived(self, z, data):
        if self.vectorized:
            return self._vmapped(self._derived, z, data)
        return self._looped(self._derived, z, data, self.deterministic)

    def predict(self, z, data, generator):
        """The posterior predictive: every observed site simulated at each particle of z (`_simulated`), with
        torch's global RNG seeded from `generator` and restored afterwards. Under torch.func.vmap (different
        randomness per particle) where the model vectorizes and its observed distributions' samplers batch under
        vmap (Normal, Bernoulli, Poisson, Binomial, Categorical, Gamma, LogNormal do; StudentT, Cauchy, Laplace,
        Exponential and MultivariateNormal draw in place and do not): else one particle at a time, with the draws
        of vectorize=False."""
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[generator.device] if generator.device.type == "cuda" else []):
            if self.vectorized:
                torch.manual_seed(seed)
                try:
                    return self._vmapped(self._simulated, z, data, randomness="different")
                except Exception:  # noqa: BLE001 - a sampler vmap cannot batch; the loop re-raises the model's errors
                    pass
            torch.manual_seed(seed)   # the loop's draws are vectorize=False's
            return self._looped(self._simulated, z, data, self.observed)


def _simulating(observed):
    """A Pyro handler that draws the `observed` sites from their distributions (their `.sample()`, which batches
    under vmap where `rsample` of a Normal does not) instead of setting them to the data."""
    from pyro.poutine.messenger import Messenger

    class Simulate(Messenger):
        def _pyro_sample(self, msg):
            if msg["name"] in observed:
                msg["is_observed"] = False
                msg["value"] = msg["fn"].sample(*msg["args"], **msg["kwargs"])
    return Simulate()


_FIX = ("write the model so that it runs under torch.func.vmap: no Python branching on a latent's value (`if x > 0`, "
       "`.item()`, `float(x)`: use torch.where), no in-place writes of latents into a tensor made beforehand (build "
       "it with torch.stack or torch.cat), no distribution with validate_args=True; or pass vectorize=False to run "
       "one particle at a time without this warning")


def from_pyro(model, *args, name=None, vectorize=True, **kwargs):
    """A `bbvi.Model` for the Pyro model `model(*args, **kwargs)` (see the module docstring): same log density,
    latents from its unobserved sample sites. The model runs on all particles at once under torch.func.vmap,
    checked against one particle at a time at two prior draws; where that fails or disagrees it runs one particle
    at a time, with a warning that says why, what it costs and how to fix it (`model.pyro_vectorize_failure`
    keeps the reason). `vectorize=False` runs it one particle at a time from the start, without the warning.
    Deterministic and reparameterized sites are derived quantities; `model.predict` simulates the observed sites
    (`model.pyro_observed`; their values: `model.pyro_observed_data`), so `fit.to_arviz()` has a posterior
    predictive and observed data."""
    if not callable(model):
        raise ModelError(f"from_pyro needs a Pyro model (a callable with pyro.sample statements), got {model!r}")
    if not isinstance(vectorize, bool):
        raise ModelError(f"from_pyro: vectorize must be True or False, got {vectorize!r}")
    name = name or getattr(model, "__name__", "pyro_model")
    latents, deterministic, observed, draws = _latents(model, args, kwargs, name)
    data = {"args": tuple(args), "kwargs": dict(kwargs)}
    one = _PyroJoint(model, latents, deterministic, False, observed)
    alone, seconds = [], []
    try:
        with warnings.catch_warnings():  # vague priors' draws may overflow: Pyro's NaN warnings are ours, not news
            warnings.filterwarnings("ignore", message="Encountered NaN")
            for trace in draws:
                start = time.perf_counter()
                alone.append(one({n: trace.nodes[n]["value"] for n in latents}, data))
                seconds.append(time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - the user's model
        raise ModelError(f"from_pyro: model {name!r} could not be evaluated at its own prior draws: "
                         f"{type(e).__name__}: {e}") from e
    why = None
    if vectorize:
        joint = _PyroJoint(model, latents, deterministic, True, observed)
        probe = {n: torch.stack([t.nodes[n]["value"] for t in draws]) for n in latents}
        try:
            why = _disagreement(joint(probe, data), {n: torch.stack([a[n] for a in alone]) for n in alone[0]})
        except Exception as e:  # noqa: BLE001 - not vectorizable: one particle at a time
            first = str(e).splitlines()[0].split(". ")[0] if str(e) else ""   # its first sentence
            why = f"torch.func.vmap cannot run it ({type(e).__name__}: {first})"
        if why is None:
            return _model(joint, latents, data, name, model, observed, None)
        ms = 1e3 * min(seconds)
        warnings.warn(f"from_pyro: model {name!r} runs one particle at a time: {why}. One particle's log-joint "
                      f"took {ms:.2g} ms here, so each step costs that many times the particles (bbvi.fit's default "
                      f"takes at least 32: {32 * ms:.2g} ms a step before gradients), where a vectorized model "
                      f"costs about one particle's time. Fix: {_FIX}", UserWarning, stacklevel=3)
    return _model(one, latents, data, name, model, observed, why)


def _disagreement(together, alone):
    """None where the vectorized terms equal the one-particle-at-a-time terms (both (2, ...)) at their finite
    entries and are non-finite at the same entries; else what differs."""
    for n, a in alone.items():
        t = together.get(n)
        if t is None or t.shape != a.shape:
            return (f"under torch.func.vmap site {n!r}'s log-probability has shape "
                    f"{None if t is None else tuple(t.shape)} where one particle at a time gives {tuple(a.shape)}")
        t, finite = t.detach().to(a.dtype), torch.isfinite(a)
        if not torch.equal(torch.isfinite(t), finite):
            return (f"under torch.func.vmap site {n!r}'s log-probability at two prior draws is non-finite at "
                    f"other entries than one particle at a time's")
        if not torch.allclose(t[finite], a[finite], rtol=1e-5, atol=1e-5):
            return (f"under torch.func.vmap site {n!r}'s log-probability at two prior draws differs from one "
                    f"particle at a time's by up to {(t[finite] - a[finite]).abs().max().item():.3g}")
    return None


def _model(joint, latents, data, name, pyro_model, observed, failure):
    from .model import Model
    out = Model(joint, latents, data=data, name=name, derived=joint.derived if joint.deterministic else None,
                vectorized=joint.vectorized, predict=joint.predict if joint.observed else None)
    out.pyro_model, out.pyro_observed, out.pyro_vectorize_failure = pyro_model, tuple(observed), failure
    out.pyro_observed_data = observed
    return out
