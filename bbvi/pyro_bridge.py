"""bbvi.from_pyro: a Pyro model as a bbvi.Model with the same log density, computed by Pyro itself.

`from_pyro(model, *args, **kwargs)` traces `model(*args, **kwargs)` once (its randomness from a seeded fork of the
RNG: the caller's RNG is untouched) to find its sample sites. Every unobserved site becomes a latent with the
site's shape and its distribution's support (continuous: bbvi's bijection to the reals; Bernoulli: boolean;
Categorical and other finite supports: integer_interval), in the order Pyro meets them. The log-joint conditions
the model on the particles' values (`poutine.condition`), runs it inside a plate of S particles one dimension left
of every batch dimension (as Pyro's `vectorize_particles` does), and returns each sample site's log-probability
(scale and mask applied, `Trace.compute_log_prob`) as a factor term of one element per plate entry: observed
sites are then pointwise log-likelihoods (`fit.to_arviz(log_likelihood="obs")`) and the score terms are
Rao-Blackwellized over plates. `pyro.deterministic` sites become derived quantities. A model that does not
broadcast over a particle dimension (Python control flow on latent values, `x @ w` with a batched w) is run one
particle at a time instead (`model.vectorized` says which). The model's arguments travel as the bbvi model's data,
so a fit casts their floating tensors to its dtype and device.

Refused with a ModelError: `pyro.param` sites (bbvi fits latents; make it a pyro.sample with a prior, or pass a
constant), a support that depends on other latents (Uniform(0, tau) with a latent tau), unbounded discrete sites
(Poisson latents), and sites whose names bbvi cannot use.
"""
import torch
from torch.distributions import constraints

from .errors import ModelError

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


def _bounds(support):
    return tuple(torch.as_tensor(getattr(support, b)).detach().clone()
                 for b in ("lower_bound", "upper_bound") if hasattr(support, b))


def _latents(model, args, kwargs, name):
    """(latents dict, batch shapes, plate depth P, deterministic site names, the two prior traces)."""
    from pyro.poutine.util import site_is_subsample

    from .model import Latent
    try:
        traces = [_prior_trace(model, args, kwargs, seed) for seed in (0, 1)]
    except Exception as e:  # noqa: BLE001 - the user's model, run as given
        raise ModelError(f"from_pyro: running the Pyro model {name!r} with the arguments given raised "
                         f"{type(e).__name__}: {e}") from e
    trace, other = traces
    latents, batch, depth, deterministic = {}, {}, 0, []
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
        depth = max(depth, len(getattr(fn, "batch_shape", ())))
        if site["infer"].get("_deterministic"):
            deterministic.append(site_name)
            batch[site_name] = tuple(fn.batch_shape)
            continue
        if site["is_observed"]:
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
        batch[site_name] = tuple(fn.batch_shape)
    if not latents:
        raise ModelError(f"from_pyro: model {name!r} has no unobserved sample sites: nothing to infer")
    return latents, batch, depth, deterministic, traces


class _PyroJoint:
    """The log-joint (and derived quantities) of a Pyro model, evaluated by Pyro."""

    def __init__(self, model, latents, batch, depth, deterministic, vectorized):
        self.model, self.latents, self.batch, self.depth = model, latents, batch, depth
        self.deterministic, self.vectorized = deterministic, vectorized

    def _trace(self, z, data):
        import pyro
        import pyro.poutine as poutine
        args, kwargs = data["args"], data["kwargs"]
        if not self.vectorized:  # one particle: z values without the particle dimension
            return poutine.trace(poutine.condition(self.model, data=dict(z))).get_trace(*args, **kwargs), None
        S = next(iter(z.values())).shape[0]
        values = {}
        for n, v in z.items():
            b = self.batch[n]
            values[n] = v.reshape((S,) + (1,) * (self.depth - len(b)) + tuple(v.shape[1:]))
        with pyro.plate("_bbvi_particles", S, dim=-(self.depth + 1)):
            trace = poutine.trace(poutine.condition(self.model, data=values)).get_trace(*args, **kwargs)
        return trace, S

    def __call__(self, z, data):
        from pyro.poutine.util import site_is_subsample
        trace, S = self._trace(z, data)
        trace.compute_log_prob()
        terms = {}
        for site_name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or site["infer"].get("_deterministic"):
                continue
            lp = site["log_prob"]
            if S is None:
                terms[site_name] = lp.reshape(-1).sum() if lp.numel() == 1 else lp.reshape(-1)
                continue
            lp = lp.expand((S,) + tuple(lp.shape[1:])) if lp.dim() and lp.shape[0] == 1 else lp
            if lp.dim() == 0 or lp.shape[0] != S:  # a site that does not depend on the particles
                lp = lp.reshape(1, -1).expand(S, -1)
            flat = lp.reshape(S, -1)
            terms[site_name] = flat[:, 0] if flat.shape[1] == 1 else flat
        return terms

    def derived(self, z, data):
        trace, S = self._trace(z, data)
        out = {}
        for n in self.deterministic:
            v = trace.nodes[n]["value"]
            if S is not None:  # drop the plate padding between the particle and the site's own batch dimensions
                v = v.expand((S,) + tuple(v.shape[1:]))
                v = v.reshape((S,) + tuple(v.shape[1 + self.depth - len(self.batch[n]):]))
            out[n] = v
        return out


def from_pyro(model, *args, name=None, vectorize=True, **kwargs):
    """A `bbvi.Model` for the Pyro model `model(*args, **kwargs)` (see the module docstring): same log density,
    latents from its unobserved sample sites. `vectorize=False` runs the model one particle at a time from the
    start (it is chosen automatically when the vectorized run fails or disagrees with one particle at a time at
    two prior draws; `model.pyro_vectorize_failure` then says why)."""
    if not callable(model):
        raise ModelError(f"from_pyro needs a Pyro model (a callable with pyro.sample statements), got {model!r}")
    name = name or getattr(model, "__name__", "pyro_model")
    latents, batch, depth, deterministic, draws = _latents(model, args, kwargs, name)
    data = {"args": tuple(args), "kwargs": dict(kwargs)}
    probe = {n: torch.stack([t.nodes[n]["value"] for t in draws]) for n in latents}
    one = _PyroJoint(model, latents, batch, depth, deterministic, False)
    errors = []
    try:
        alone = torch.stack([_total(one({n: v[i] for n, v in probe.items()}, data), None) for i in range(2)])
    except Exception as e:  # noqa: BLE001 - the user's model
        raise ModelError(f"from_pyro: model {name!r} could not be evaluated at its own prior draws: "
                         f"{type(e).__name__}: {e}") from e
    if vectorize:
        joint = _PyroJoint(model, latents, batch, depth, deterministic, True)
        try:
            together = _total(joint(probe, data), 2)
            if torch.allclose(together.to(alone.dtype), alone, rtol=1e-5, atol=1e-5):
                return _model(joint, latents, data, name, model)
            errors.append(f"the vectorized run gives {together.tolist()} where one particle at a time gives "
                          f"{alone.tolist()} (the model does not broadcast over a particle dimension)")
        except Exception as e:  # noqa: BLE001 - not vectorizable: one particle at a time
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    out = _model(one, latents, data, name, model)
    out.pyro_vectorize_failure = "; ".join(errors) or None
    return out


def _total(terms, S):
    """The log-joint from factor terms: (S,) for a vectorized run, a scalar for one particle."""
    if S is None:
        return sum(t.sum() for t in terms.values())
    return sum(t.reshape(S, -1).sum(-1) for t in terms.values())


def _model(joint, latents, data, name, pyro_model):
    from .model import Model
    out = Model(joint, latents, data=data, name=name, derived=joint.derived if joint.deterministic else None,
                vectorized=joint.vectorized)
    out.pyro_model = pyro_model
    return out
