"""`Model`: the target density of named latents, and the map between them and one flat unconstrained vector
(`Latent`, the discrete latents' ranges and the flat layout are latents.py, re-exported here).

Shape convention (everywhere in bbvi): particles first. A batch of S particles of the continuous latents is one
flat unconstrained tensor `u` of shape (S, D); `Model.constrain(u)` turns it into a dict name -> (S, *shape) of
constrained values plus the log-det-Jacobian (S,); inputs of non-identity transforms are clamped to
|u| <= log(dtype max) - 10 so that no transform overflows. Discrete latents (support `boolean` or `integer_interval`)
are kept apart as a dict name -> (S, *shape): booleans as floats 0./1. (as torch's Bernoulli gives them),
integers as int64. The user's log-joint sees one dict holding both and returns (S,).
"""
import math

import torch

from .data_forms import _move, as_tensors, precision_notes  # noqa: F401  (precision_notes: re-exported)
from . import model_check
from .errors import ModelError
from .latents import MAX_CATEGORIES, Latent, _Block, _discrete_range, layout  # noqa: F401  (re-exported)
from .model_check import CheckReport  # noqa: F401  (re-exported)
from .terms import terms_matrix  # noqa: F401  (re-exported)

__all__ = ["Latent", "Model"]


class Model:
    """A Bayesian model given by its log-joint.

    log_joint(z, data) -> Tensor (S,): z maps every latent name to its constrained values (S, *shape). It may
    instead return a dict of named factor terms, each (S,) or (S, n) (n terms along an axis: one per observation
    or per latent element); the log-joint is then the sum of everything, and the score terms are
    Rao-Blackwellized: each latent coordinate's score is weighted only by the terms that depend on it (found on
    the first call by autograd and a perturbation probe, or declared: dependencies={factor: [latent names]}).
    latents: dict name -> Latent. data: passed back as the second argument (any object; tensors inside dicts,
    lists and tuples are moved to the fit's device and dtype). derived(z, data) -> dict name -> (S, ...):
    optional derived quantities (Stan's transformed parameters) reported with the samples. predict(z, data,
    generator) -> dict name -> (S, ...): optional simulated data for the posterior predictive (fit.to_arviz), its
    randomness from `generator` only. data: numpy arrays, pandas objects and lists of numbers become tensors.
    plates={factor: (data keys)}: the data entries whose rows the factor's terms index, for minibatch fits
    (bbvi.fit(..., subsample_size=B); bbvi/subsample.py).
    vectorized=False: log_joint handles one particle (z values without the S dimension) and returns a scalar;
    bbvi loops over particles. differentiable=False declares a log-joint torch cannot differentiate (numpy, a
    simulator); by default this is detected on the first call.
    """

    def __init__(self, log_joint, latents, data=None, name=None, derived=None, *, vectorized=True,
                 differentiable=None, dependencies=None, predict=None, plates=None):
        if not callable(log_joint):
            raise ModelError(f"log_joint must be callable (z, data) -> Tensor (S,), got {type(log_joint)}")
        if not isinstance(latents, dict) or not latents:
            raise ModelError("latents must be a non-empty dict name -> bbvi.Latent")
        for key, lat in latents.items():
            if not isinstance(key, str) or not key:
                raise ModelError(f"latent names must be non-empty strings, got {key!r}")
            if not isinstance(lat, Latent):
                raise ModelError(f"latent {key!r}: expected bbvi.Latent(shape=..., support=...), got {lat!r}")
        if derived is not None and not callable(derived):
            raise ModelError("derived must be a callable (z, data) -> dict name -> Tensor (S, ...)")
        if predict is not None and not callable(predict):
            raise ModelError("predict must be a callable (z, data, generator) -> dict name -> Tensor (S, ...)")
        self.predict = predict
        if differentiable not in (None, True, False):
            raise ModelError(f"differentiable must be None (detect), True or False, got {differentiable!r}")
        if dependencies is not None:
            if not isinstance(dependencies, dict):
                raise ModelError("dependencies must be a dict factor name -> list of latent names")
            for term, names in dependencies.items():
                bad = [n for n in ([names] if isinstance(names, str) else names) if n not in latents]
                if bad:
                    raise ModelError(f"dependencies[{term!r}] names latent(s) {bad}, which are not declared; "
                                     f"declared latents: {sorted(latents)}")
            dependencies = {t: tuple([n] if isinstance(n, str) else n) for t, n in dependencies.items()}
        self.dependencies = dependencies
        self.log_joint = log_joint
        self.latents = dict(latents)
        self.data = as_tensors(data)
        from .subsample import check_plates
        self.plates = check_plates(plates, self.data)
        self.factor_scale = None   # {factor: N / B} on a minibatch (bbvi.subsample.batch_model)
        self.factor_anchor = None  # {factor: its control variate} on an anchored minibatch (bbvi.subsample.Anchor)
        self.name = name or getattr(log_joint, "__name__", "model")
        self.derived = derived
        self.vectorized = bool(vectorized)
        self.differentiable = differentiable
        self.blocks = layout(self.latents)
        self.dim = self.blocks[-1].stop if self.blocks else 0
        self.preconditioner = None
        self.discrete = {k: (lat, *_discrete_range(k, lat)) for k, lat in self.latents.items() if lat.is_discrete}

    # ---- unconstrained <-> constrained -------------------------------------------------------------------
    def constrain(self, u, per_element=False, _none=False):
        """u: (S, D) unconstrained -> (dict name -> (S, *shape) constrained, log|det J| (S,)). With a
        preconditioner (shift, scale), u is first mapped to shift + scale * u (its log-Jacobian included).
        per_element=True: the log|det J| as a list of (S, m) pieces, one column per transformed latent element
        (one per latent for a transform that couples its elements), without the preconditioner's constant
        (`preconditioner_log_det`). _none=True: None instead of zeros where nothing is transformed."""
        S = u.shape[0]
        z, ladj, parts = {}, None, []
        if self.preconditioner is not None:
            shift, scale = self.preconditioner
            u = shift + scale * u
            ladj = torch.log(scale).sum().expand(S)
        for b in self.blocks:
            piece = u[:, b.start:b.stop] if len(self.blocks) > 1 else u
            piece = piece.reshape((S,) + b.unconstrained_shape)
            if b.identity:  # real support: no transform, no Jacobian
                z[b.name] = piece
                continue
            # Guard against overflow: exp(u) is inf beyond u ~ 88 in float32; clamped, such a particle gets a
            # finite, very low log density that pushes q back, instead of a NaN that carries no signal.
            limit = _clamp_limit(piece.dtype)
            piece = piece.clamp(-limit, limit)
            value = b.transform(piece)
            z[b.name] = value
            lad = b.transform.log_abs_det_jacobian(piece, value).reshape(S, -1)
            parts.append(lad)
            lad = lad.sum(-1)
            ladj = lad if ladj is None else ladj + lad
        if per_element:
            return z, parts
        return z, (u.new_zeros(S) if ladj is None and not _none else ladj)

    def unconstrain(self, z):
        """dict name -> (S, *shape) constrained continuous values -> (S, D) unconstrained (the inverse of
        `constrain`, preconditioner included)."""
        pieces = [b.transform.inv(z[b.name]).reshape(z[b.name].shape[0], -1) for b in self.blocks]
        u = torch.cat(pieces, -1)
        if self.preconditioner is not None:
            shift, scale = self.preconditioner
            u = (u - shift) / scale
        return u

    def preconditioned(self, shift, scale):
        """A copy whose unconstrained coordinates are whitened: u_model = shift + scale * u (D each). Used by
        init_strategy='map' so that the optimiser's step size is in posterior-sd units."""
        if self.preconditioner is not None:
            shift, scale = self.preconditioner[0] + self.preconditioner[1] * shift, self.preconditioner[1] * scale
        m = Model.__new__(Model)
        m.__dict__.update(self.__dict__)
        m.preconditioner = (shift.detach(), scale.detach())
        return m

    def log_density(self, u, discrete=None):
        """log p(x, T(u), k) + log|det J_T(u)|, shape (S,): the target density on the unconstrained scale."""
        z, ladj = self.constrain(u, _none=True)
        if discrete:
            z.update(discrete)
        lp = self.call(z)
        if ladj is None:   # nothing transformed: adding zeros would change nothing here (two operations saved)
            if torch.is_tensor(lp) and lp.shape == u.shape[:1] and (lp.dtype == u.dtype or
                                                                   lp.dtype == torch.promote_types(lp.dtype, u.dtype)):
                return lp
            ladj = u.new_zeros(u.shape[0])
        return lp + ladj

    def log_density_guarded(self, u, discrete=None):
        """`log_density`, but a log-joint that raises (a Cholesky of one particle's kernel matrix that is not
        positive definite, a distribution's argument check) does not end the fit: the particles are then
        evaluated one at a time and those that raise get NaN, so that they are dropped and counted like a NaN
        particle. Returns (log density (S,), the first exception or None)."""
        try:
            return self.log_density(u, discrete), None
        except Exception as e:  # noqa: BLE001 - any failure of user code at some particles
            error = e
        rows = []
        for s in range(u.shape[0]):
            one = {k: v[s:s + 1] for k, v in (discrete or {}).items()}
            try:
                rows.append(self.log_density(u[s:s + 1], one)[0])
            except Exception as e:  # noqa: BLE001
                error = self._raised_at(e, error, u[s:s + 1], one)
                rows.append(u.new_full((), float("nan")))
        return torch.stack(rows), error

    def _raised_at(self, e, first, u, discrete):
        """The exception of the first particle that raised on its own, with `bbvi_latents` set to a short text of
        that particle's constrained values (for the fit's messages); `first` if an earlier one is already kept."""
        if getattr(first, "bbvi_latents", None) is not None:
            return first
        try:
            with torch.no_grad():
                z, _ = self.constrain(u.detach())
            z.update(discrete)
            text = ", ".join(f"{k}={[round(x, 4) for x in v[0].reshape(-1).tolist()][:6]}" for k, v in z.items())
            e.bbvi_latents = text[:300]
        except Exception:  # noqa: BLE001 - describing the particle must never fail the fit
            return first
        return e

    def call(self, z):
        """The user's log-joint on constrained values z (dict name -> (S, *shape)) -> (S,); a dict of factor
        terms is summed (`terms_matrix(...).sum(-1)`), a minibatch's plate factors scaled by N / B."""
        out = self._scaled(self.call_raw(z), z)
        return terms_matrix(out).sum(-1) if isinstance(out, dict) else out

    def _scaled(self, out, z):
        if not self.factor_scale or not isinstance(out, dict):
            return out
        out = {k: v * self.factor_scale[k] if k in self.factor_scale else v for k, v in out.items()}
        for k, control in (self.factor_anchor or {}).items():
            out[k] = control.add_to(out[k], z)
        return out

    def with_data(self, data, factor_scale=None, factor_anchor=None):
        """A copy of the model on other data (a minibatch of its plates), plate factors scaled by `factor_scale`
        (and corrected by `factor_anchor`'s control variates, bbvi.subsample)."""
        m = Model.__new__(Model)
        m.__dict__.update(self.__dict__)
        m.data, m.factor_scale, m.factor_anchor = data, factor_scale, factor_anchor
        return m

    def call_raw(self, z):
        """The user's log-joint as it returns: a Tensor (S,) or a dict of factor terms (S,) / (S, n)."""
        if self.vectorized:
            return self.log_joint(z, self.data)
        S = next(iter(z.values())).shape[0]
        rows = [self.log_joint({k: v[s] for k, v in z.items()}, self.data) for s in range(S)]
        if isinstance(rows[0], dict):
            return {name: torch.stack([torch.as_tensor(r[name]) for r in rows]) for name in rows[0]}
        return torch.stack([torch.as_tensor(r) for r in rows])

    def log_density_terms(self, u, discrete=None):
        """For a log-joint that returns factor terms: (S, E) every term element of the unconstrained log density,
        the user's factor terms (in order, each flattened) then the log-det-Jacobian of every latent element; its
        row sums plus `preconditioner_log_det()` are the log density."""
        z, ladj_parts = self.constrain(u, per_element=True)
        if discrete:
            z.update(discrete)
        return torch.cat([terms_matrix(self._scaled(self.call_raw(z), z))] + ladj_parts, -1)

    def preconditioner_log_det(self):
        """The constant log-Jacobian of the whitening u_model = shift + scale * u (0 without one)."""
        return 0.0 if self.preconditioner is None else torch.log(self.preconditioner[1]).sum()

    def log_density_terms_guarded(self, u, discrete=None):
        """`log_density_terms` with the guard of `log_density_guarded`: rows of particles that raise are NaN."""
        try:
            return self.log_density_terms(u, discrete), None
        except Exception as e:  # noqa: BLE001 - any failure of user code at some particles
            error = e
        rows, width = [], None
        for s in range(u.shape[0]):
            one = {k: v[s:s + 1] for k, v in (discrete or {}).items()}
            try:
                rows.append(self.log_density_terms(u[s:s + 1], one))
                width = rows[-1].shape[1]
            except Exception as e:  # noqa: BLE001
                error = self._raised_at(e, error, u[s:s + 1], one)
                rows.append(None)
        if width is None:
            raise error
        return torch.cat([r if r is not None else u.new_full((1, width), float("nan")) for r in rows]), error

    def derive(self, z):
        """Derived quantities for constrained z, each (S, ...); {} when the model has none."""
        if self.derived is None:
            return {}
        try:
            out = self.derived(z, self.data)
        except Exception as e:  # noqa: BLE001 - e.g. one draw's Cholesky: that draw's quantities become NaN
            out = self._derive_one_by_one(z, e)
        if not isinstance(out, dict):
            raise ModelError(f"derived must return a dict name -> Tensor (S, ...), got {type(out).__name__}")
        S = next(iter(z.values())).shape[0]
        for k, v in out.items():
            if k in self.latents:
                raise ModelError(f"derived quantity {k!r} has the name of a latent; rename it")
            if not torch.is_tensor(v) or v.dim() == 0 or v.shape[0] != S:
                raise ModelError(f"derived quantity {k!r} must be a Tensor with leading particle dimension "
                                 f"S={S}, got {getattr(v, 'shape', type(v).__name__)}")
        return out

    def named_draws(self, u, discrete=None, derived=True, seed=0):
        """Draws as the user names them: u (S, D) unconstrained and discrete dict -> dict name -> (S, *shape) of
        constrained values, every latent in declaration order, then the derived quantities (when `derived`).
        A derived function that draws random numbers (a posterior predictive) runs with torch's global RNG
        seeded from `seed` and restored afterwards: the same seed gives the same draws, and the caller's RNG
        state is untouched."""
        with torch.no_grad():
            z, _ = self.constrain(u)
            z.update(discrete or {})
            out = {name: z[name] for name in self.latents}
            if derived and self.derived is not None:
                devices = [u.device] if u.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(int(seed) % (2 ** 63))
                    out.update(self.derive(z))
        return out

    def _derive_one_by_one(self, z, error):
        S = next(iter(z.values())).shape[0]
        rows = []
        for s in range(S):
            try:
                rows.append(self.derived({k: v[s:s + 1] for k, v in z.items()}, self.data))
            except Exception:  # noqa: BLE001
                rows.append(None)
        good = next((r for r in rows if r is not None), None)
        if good is None:
            raise ModelError(f"model {self.name!r}: derived raised {type(error).__name__} for every draw: {error}") \
                from error
        return {k: torch.cat([r[k] if r is not None else torch.full_like(good[k], float("nan")) for r in rows])
                for k in good}

    # ---- the first call (bbvi/model_check.py) --------------------------------------------------------------
    def check(self, u, discrete, *, particles=True):
        """Call the log-joint once on S >= 2 particles and say exactly what is wrong (model_check.check)."""
        return model_check.check(self, u, discrete, particles=particles)

    def check_particles(self, report):
        """The particle check `check(..., particles=False)` left for later (model_check.check_particles)."""
        return model_check.check_particles(self, report)

    def to(self, device=None, dtype=None):
        """A copy of the model whose data tensors (inside dicts, lists, tuples) are on `device`, floating ones
        in `dtype`."""
        m = Model.__new__(Model)
        m.__dict__.update(self.__dict__)
        m.data = _move(self.data, device, dtype)
        if self.preconditioner is not None:
            m.preconditioner = tuple(_move(t, device, dtype) for t in self.preconditioner)
        return m

    def __repr__(self):
        lat = ", ".join(f"{k}: {tuple(v.shape)} {v.support}" for k, v in self.latents.items())
        return f"Model({self.name!r}, latents={{{lat}}}, unconstrained dim={self.dim})"


def _clamp_limit(dtype):
    """|u| bound for the inputs of non-identity transforms: exp(limit) stays ~1e4 below the dtype's maximum."""
    return math.log(torch.finfo(dtype).max) - 10.0
