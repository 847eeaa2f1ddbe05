"""The fitted result: samples in constrained space, the ELBO trace, ArviZ conversion, gradient samples."""
import dataclasses
import math
import numbers

import torch

from .arguments import check_count, check_seed, pick as _pick  # noqa: F401  (check_seed: re-exported)
from .errors import ConfigError
from .subsample import sizes
from .estimators import DEFAULT, draw, estimate, init_baseline_state, log_q, plan_for, resolve_estimator
from .saving import FORMAT, atomic_save, config_of, model_signature, plan_config

__all__ = ["Result"]   # bbvi.load reads a saved fit back (result_file.load_result)


def _detached(params):
    return {g: {k: t.detach().clone() for k, t in group.items()} for g, group in params.items()}


@dataclasses.dataclass
class Result:
    """A fitted q. `elbo`: 1-D tensor of every step's ELBO estimate (NaN for skipped steps); `status`:
    'completed' | 'converged' | 'interrupted' | 'stopped by callback' | 'failed'; `num_failed_steps`: steps
    skipped for a NaN/inf ELBO or gradient; `num_bad_particles`: particles whose log-joint was NaN/inf;
    `num_rescaled_steps`: steps whose gradient was so large that it was scaled down to keep the optimizer's
    statistics finite (a sign of a far-off start or a badly scaled model); `start`: what the start did
    (bbvi.start.Start: strategy, note, gradient evaluations); `levels`: the adaptive rule's levels (lr, steps,
    stationary, change); `reliability`: the end-of-fit check (k-hat, PSIS mean/sd shifts, warnings);
    `resample_info`: k-hat, its interval and ESS of the last `sample(..., importance_resample=True)`; `tried`: the
    other fits this call ran and did not return (method='auto': batch and match's Gaussian before a flow, or the
    flow after it, bbvi.algorithms.fallback), each a dict with its 'result', 'method' and 'why'."""

    model: object
    family: object
    discrete: object
    plan: object
    report: object
    params: dict
    elbo: torch.Tensor
    settings: dict
    status: str
    num_steps: int
    num_failed_steps: int
    num_bad_particles: int
    wall_time: float
    num_rescaled_steps: int = 0
    baseline_state: dict = dataclasses.field(default_factory=dict)
    start: object = None
    levels: list = dataclasses.field(default_factory=list)
    start_time: float = 0.0
    num_raised_steps: int = 0
    last_exception: str = ""
    reliability: dict = dataclasses.field(default_factory=dict)
    structure: object = None
    resample_info: dict = dataclasses.field(default_factory=dict)  # the last importance-resampled sample's k-hat
    batch: object = None     # {plate: B} of a minibatch fit (bbvi.subsample): gradient_samples draw minibatches
    num_particles: int = 0   # particles a step drew (typed: `settings` is the fit's record as text)
    subsample_cv: bool = False   # a minibatch fit with control variates
    tried: list = dataclasses.field(default_factory=list)   # fits the same call ran and did not return (see below)
    options: object = None   # bbvi.FitOptions: what the fit ran with, typed (`settings` is their text record)

    @classmethod
    def from_state(cls, state, *, options=None, settings=None, status, wall_time, start_time=0.0):
        """The Result of a fit at `state`, with its typed `options` (bbvi.FitOptions; or, from a loop of one's
        own, a `settings` dict alone)."""
        settings = options.record() if options is not None else dict(settings or {})
        return cls(model=state.model, family=state.family, discrete=state.discrete, plan=state.plan,
                   report=state.report, params=_detached(state.params), settings=settings, status=status,
                   options=options,
                   num_steps=state.step, wall_time=wall_time, **state.record.result_fields(),
                   baseline_state={k: v.detach().clone() for k, v in state.baseline_state.items()},
                   start=state.start, levels=state.tracker.report() if state.tracker is not None else [],
                   start_time=start_time, structure=state.structure, batch=state.batch,
                   num_particles=state.num_particles, subsample_cv=state.anchor is not False)

    @property
    def num_gradient_evals(self):
        """Log-joint evaluations the whole call spent, with their gradients where it took them: the fit's
        (`num_fit_evals`), the end-of-fit check's (`num_check_evals`) and those of the fits in `tried`."""
        return self.num_fit_evals + self.num_check_evals + sum(t["result"].num_gradient_evals for t in self.tried)

    @property
    def num_fit_evals(self):
        """Log-joint and gradient evaluations of the start (L-BFGS, Hessian) and the steps: S per step (more with
        exact sums over a latent's support: Plan.evaluations)."""
        return (self.start.num_evals if self.start is not None else 0) + self.num_steps * self.plan.evaluations(
            self.model, self.num_particles)

    @property
    def num_check_evals(self):
        """Log-joint evaluations of the end-of-fit check: its importance-sampling draws (values only; with those of
        a first look where it looked again: 'earlier_draws') and its mode search (with gradients); 0 when it did not
        run."""
        r = self.reliability or {}
        return int(r.get("num_draws", 0)) + int(r.get("mode_search_evals", 0)) + int(r.get("earlier_draws", 0))

    @property
    def interrupted(self):
        return self.status == "interrupted"

    @property
    def converged(self):
        return self.status == "converged"

    def _reference_tensor(self):
        return next(t for g in self.params.values() for t in g.values())

    def _generator(self, seed, where="fit"):
        ref = self._reference_tensor()
        return torch.Generator(device=ref.device).manual_seed(check_seed(seed, where))

    def _values_per_draw(self):
        """Numbers one draw from q takes: its unconstrained coordinates, its constrained values, and the
        Gumbel noise of every discrete entry (one per category)."""
        latents = self.model.latents.values()
        return (self.model.dim + sum(math.prod(lat.shape) for lat in latents)
                + sum(math.prod(lat.shape) * k for lat, _, k in self.model.discrete.values()))

    def _check_memory(self, name, num, where, per=None, factor=3):
        """ConfigError when `num` draws (or particles) would need more memory than the device has: num x values
        per draw x element size x `factor` (the work copies alongside), against the device's total memory."""
        from .families import _memory_bytes
        ref = self._reference_tensor()
        per = max(1, self._values_per_draw() if per is None else per)
        unit = per * ref.element_size() * factor
        have = _memory_bytes(ref.device)
        if have is not None and num * unit > have:
            raise ConfigError(f"{where}: {name}={num} needs about {num * unit / 2 ** 30:.3g} GiB ({num} x {per} "
                              f"values x {ref.element_size()} bytes x {factor} work copies), more than this "
                              f"machine's {have / 2 ** 30:.1f} GiB ({ref.device}): use a smaller {name} (at most "
                              f"about {max(1, have // unit)})")

    def _check_draws(self, num_draws, seed, where):
        num_draws = check_count("num_draws", num_draws, where)
        seed = check_seed(seed, where)
        self._check_memory("num_draws", num_draws, where)
        return num_draws, seed

    # ---- q on the model's unconstrained scale ----------------------------------------------------------------
    def unconstrained_mean(self):
        """(D,) q's mean on the model's unconstrained scale. `params` live in the coordinates of `self.model`,
        which the MAP start whitens (u = shift + scale * v); this undoes that."""
        with torch.no_grad():
            m = self.family.mean(self.params["continuous"])
            if self.model.preconditioner is None:
                return m.clone()
            shift, scale = self.model.preconditioner
            return shift + scale * m

    def unconstrained_covariance(self):
        """(D, D) q's covariance on the model's unconstrained scale (the MAP start's whitening undone)."""
        with torch.no_grad():
            c = self.family.covariance(self.params["continuous"])
            if self.model.preconditioner is None:
                return c.clone()
            scale = self.model.preconditioner[1]
            return scale[:, None] * c * scale[None, :]

    # ---- draws ----------------------------------------------------------------------------------------------
    def draw(self, num, seed=0):
        """(u (num, D) unconstrained continuous draws, dict of discrete draws) from q."""
        num, seed = self._check_draws(num, seed, "fit.draw")
        return draw(self.model, self.family, self.discrete, self.params, num, self._generator(seed))

    def sample(self, num_draws=4000, seed=0, importance_resample=False):
        """dict name -> Tensor (num_draws, *shape) of draws from q in constrained space, derived included.
        num_draws: a positive int that fits in memory; seed: an int in [0, 2**63), as for bbvi.fit.

        importance_resample=True: draws corrected toward the posterior (sampling-importance-resampling with
        Pareto-smoothed weights, Vehtari et al. 2024): max(16000, 4 num_draws) draws from q, their PSIS weights
        p / q, and num_draws of them picked with replacement in proportion to the weights. Only as good as
        k-hat allows: where k-hat (with its Monte Carlo error) reaches 0.7 the weights cannot correct q and a
        ReliabilityWarning says so; the draws repeat (importance-sampling ESS well under num_draws means few
        distinct draws). The k-hat, its interval and the ESS are in `self.resample_info`."""
        num_draws, seed = self._check_draws(num_draws, seed, "fit.sample")
        if not isinstance(importance_resample, bool):
            raise ConfigError(f"fit.sample: importance_resample must be True or False, got {importance_resample!r}")
        if not importance_resample:
            return self.model.named_draws(*self.draw(num_draws, seed), seed=seed)
        return self.model.named_draws(*self._resampled(num_draws, seed), seed=seed)

    def _resampled(self, num_draws, seed):
        """(u, k): num_draws draws picked from a pool of q's draws by their PSIS weights (see `sample`)."""
        import warnings

        from .diagnostics import resample
        from .errors import ReliabilityWarning
        pool = max(16000, 4 * num_draws)
        self._check_memory("num_draws", pool, "fit.sample(importance_resample=True)")
        u, k, info = resample(self, num_draws, seed, pool)
        self.resample_info = info
        if not info["khat_interval"][1] < 0.7:
            warnings.warn(f"fit.sample(importance_resample=True) on {self.model.name!r}: PSIS k-hat is "
                          f"{info['khat']:.2f} ({info['khat_reading']}); the importance weights cannot correct this "
                          f"q, so the resampled draws are not reliable (importance-sampling ESS {info['is_ess']:.0f} "
                          f"of {pool} draws). Try a richer family (family='flow') or bbvi.nuts(model)",
                          ReliabilityWarning, stacklevel=3)
        return u, k

    def weighted_draws(self, num_draws=4000, seed=0):
        """(u, k, log_w): draws from q as in `draw` and their log importance weights log p(x, z) - log q(z),
        shape (num_draws,)."""
        num_draws, seed = self._check_draws(num_draws, seed, "fit.weighted_draws")
        u, k = self.draw(num_draws, seed)
        return u, k, self.log_weights_at(u, k)

    def log_weights_at(self, u, k):
        """log p(x, z) - log q(z) at given draws (u (S, D) unconstrained, k the discrete values)."""
        # bounded memory for big models and data (at most ~2^24 particle x row terms of a plate at a time); a
        # particle whose log-joint raises gets NaN (weight 0)
        chunk = max(1, min(1024, 2 ** 24 // max(sizes(self.model).values(), default=1)))
        with torch.no_grad():
            lp = torch.cat([self.model.log_density_guarded(u[i:i + chunk], {n: v[i:i + chunk] for n, v in k.items()})[0]
                            for i in range(0, u.shape[0], chunk)]).to(u.dtype)
            lq_c, lq_d = log_q(self.model, self.family, self.discrete, self.params, u, k)
            lq = torch.zeros_like(lp) if lq_c is None else lq_c
            if lq_d is not None:
                lq = lq + lq_d
        return lp - lq

    def log_weights(self, num_draws=4000, seed=0):
        """log p(x, z) - log q(z) for num_draws draws from q, shape (num_draws,): the raw importance weights."""
        num_draws, seed = self._check_draws(num_draws, seed, "fit.log_weights")
        return self.weighted_draws(num_draws, seed)[2]

    def to_arviz(self, num_draws=4000, seed=0, *, num_chains=None, log_likelihood=None, predict=None,
                 observed_data=None, dims=None, coords=None, importance_resample=False):
        """arviz.InferenceData of num_draws draws from q (the draws of `sample(num_draws, seed)`), in the fit's dtype:

        - posterior: every latent and derived quantity, (chain, draw, *shape). The draws are independent; they are
          split into `num_chains` groups (it must divide num_draws; default: 4, else 2, else 1, whichever divides
          with at least 4 draws per group) so that ArviZ's summaries run without warnings: R-hat near 1 then says
          nothing about the fit (fit.diagnostics() and bbvi.compare do);
        - sample_stats: `log_weight` = log p(x, z) - log q(z) of every draw (PSIS weights: `az.psislw`), `lp`;
        - log_likelihood: pointwise log-likelihood terms, for `az.loo` / `az.waic`: the factor terms named by
          `log_likelihood` (a name or list of names) of a log-joint that returns a dict of factor terms; by default
          the observed sites of a `bbvi.from_pyro` model, else the factor 'obs' when there is one. Each
          (chain, draw, n);
        - posterior_predictive: `predict(z, data, generator)` (or the model's `predict`; a `bbvi.from_pyro`
          model's draws its observed sites) at the draws, its generator seeded from `seed`: the same seed gives
          the same draws;
        - observed_data: the model's data entries named in `observed_data` (default: every tensor in the data, or
          a from_pyro model's observed sites' values; False: none).

        dims / coords as for `az.from_dict` name dimensions (e.g. dims={"theta": ["school"]},
        coords={"school": names}); others are named `{name}_dim_{i}` (with trailing `_` where that would clash with
        a variable's name); a latent named `chain` or `draw` is a ModelError. The fit's settings are the posterior's
        attrs, and its `draws` attr says which draws the record holds.

        importance_resample=True: the draws of `sample(num_draws, seed, importance_resample=True)` (PSIS-resampled
        toward the posterior, with a ReliabilityWarning where k-hat says the weights cannot correct q), and every
        group computed at them: for `az.loo`, whose Pareto k's from q's own draws are high wherever q is narrower
        than the posterior (seen: 6 of 8 above 0.7 on eight schools), not because the model fits badly."""
        from .arviz_export import to_arviz
        return to_arviz(self, num_draws, seed, num_chains=num_chains, log_likelihood=log_likelihood,
                        predict=predict, observed_data=observed_data, dims=dims, coords=coords,
                        importance_resample=importance_resample)

    def final_elbo(self, window=100):
        """Mean of the last `window` finite per-step ELBO estimates."""
        tail = self.elbo[-window:]
        tail = tail[torch.isfinite(tail)]
        return tail.mean().item() if tail.numel() else float("nan")

    # ---- gradient samples -----------------------------------------------------------------------------------
    def gradient_samples(self, num_samples=200, estimator=None, baseline=DEFAULT, num_particles=None, seed=0):
        """Tensor (num_samples, P): independent estimates of the ELBO gradient at the fitted q, P the number of
        variational parameters (flattened in the order of `self.params`). estimator/baseline default to the
        fit's own; an EMA baseline starts from the fit's final average and keeps averaging across samples (its
        value never depends on the current draw, so each estimate stays unbiased). A minibatch fit's estimates draw
        a minibatch each, with its control variates (subsample_cv) anchored at the fitted q's mean: at the anchor
        they are at their best, so the variance is a lower bound on the fit's own. num_samples: a positive int;
        num_particles: None (the fit's own) or a positive int; seed: an int in [0, 2**63), as for bbvi.fit."""
        where = "fit.gradient_samples"
        num_samples = check_count("num_samples", num_samples, where)
        if num_particles is None:
            num_particles = self.num_particles
        elif isinstance(num_particles, bool) or not isinstance(num_particles, numbers.Integral) or num_particles < 1:
            raise ConfigError(f"{where}: num_particles must be None (the fit's own, "
                              f"{self.num_particles}) or a positive int, got {num_particles!r}")
        num_particles = int(num_particles)
        seed = check_seed(seed, where)
        self._check_memory("num_particles", num_particles, where, factor=8)  # particles, their graph, gradients
        num_params = sum(t.numel() for group in self.params.values() for t in group.values())
        self._check_memory("num_samples", num_samples, where, per=num_params, factor=2)
        step = self.num_steps  # a schedule's (Concrete's temperature) where the fit ended; None for another estimator
        if estimator is None:
            plan = self.plan
        else:
            step = None
            est = resolve_estimator(estimator, baseline)
            plan = plan_for(est, self.model, self.report, num_particles)
        g = self._generator(seed, where)
        params = {grp: {k: t.clone().requires_grad_(True) for k, t in group.items()}
                  for grp, group in self.params.items()}
        leaves = [t for group in params.values() for t in group.values()]
        ref = self._reference_tensor()
        bstate = (self.baseline_state if plan.baseline == self.plan.baseline and self.baseline_state
                  else init_baseline_state(plan, ref.device, ref.dtype))
        out, order = [], {}
        from .data_view import DataView
        anchor = None if self.subsample_cv else False   # as the fit did
        data = DataView(self.model, self.structure, self.report.factors, self.batch)
        for _ in range(num_samples):   # on a minibatch fit each estimate on its own minibatch, as the fit's steps
            model, structure, order, anchor = data.for_step(order, anchor, g,
                                                            lambda: self.family.mean(params["continuous"]))
            surrogate, bstate, _, _ = estimate(plan, model, self.family, self.discrete, params, num_particles,
                                               g, bstate, structure, step=step)
            grads = torch.autograd.grad(surrogate, leaves, allow_unused=True)
            out.append(torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1)
                                  for gr, p in zip(grads, leaves)]))
        return torch.stack(out)

    # ---- reading the fit ------------------------------------------------------------------------------------
    def diagnostics(self, num_draws=16000, seed=0):
        """dict: PSIS k-hat of the fit with its Monte Carlo interval and its reading (Yao et al. 2018), plus fit
        status and fault counts (bbvi.diagnostics.fit_diagnostics). num_draws: a positive int that fits in memory;
        seed: an int in [0, 2**63), as for bbvi.fit."""
        num_draws, seed = self._check_draws(num_draws, seed, "fit.diagnostics")
        from .diagnostics import fit_diagnostics
        return fit_diagnostics(self, num_draws=num_draws, seed=seed)

    def summary(self, num_draws=4000, seed=0, var_names=None):
        """A short text table: mean, sd, 5% and 95% quantiles of every scalar latent and derived quantity (of those
        named in `var_names`: a name or a list of names, when given)."""
        num_draws, seed = self._check_draws(num_draws, seed, "fit.summary")
        draws = self.sample(num_draws, seed)
        if var_names is not None:
            draws = _pick(draws, var_names, "fit.summary: var_names",
                          f"these are not latents or derived quantities of model {self.model.name!r}, which has")
        lines = [f"bbvi fit of {self.model.name!r}: {self.status} after {self.num_steps} steps "
                 f"({self.wall_time:.2f} s), final ELBO {self.final_elbo():.4g}, "
                 f"{self.num_failed_steps} failed steps, {self.num_bad_particles} bad particles",
                 *[f"{label}: {self.settings[key]}" for key, label in (("objective", "objective"), ("bias", "BIASED ESTIMATOR"))
                   if self.settings.get(key)],
                 *self._reliability_lines(),
                 f"{'parameter':<24}{'mean':>12}{'sd':>12}{'5%':>12}{'95%':>12}"]
        for name, v in draws.items():
            flat = v.detach().double().reshape(v.shape[0], -1).cpu()
            q = torch.quantile(flat, torch.tensor([0.05, 0.95], dtype=flat.dtype), dim=0)
            for i in range(flat.shape[1]):
                label = name if flat.shape[1] == 1 and v.dim() == 1 else f"{name}[{i}]"
                lines.append(f"{label:<24}{flat[:, i].mean():>12.4g}{flat[:, i].std():>12.4g}"
                             f"{q[0, i]:>12.4g}{q[1, i]:>12.4g}")
        return "\n".join(lines)

    def _reliability_lines(self):
        from .diagnostics import khat_reading
        r = self.reliability
        if not r:
            return []
        lo, hi = r.get("khat_interval", (r["khat"], r["khat"]))
        lines = [f"PSIS k-hat {r['khat']:.2f} ({lo:.2f}-{hi:.2f}; {khat_reading(r['khat'], (lo, hi))}); "
                 f"start: {r['start']}; "
                 f"{self.num_gradient_evals} log-joint evaluations ({self.num_fit_evals} by the fit, "
                 f"{self.num_check_evals} by its check"
                 + "".join(f", {t['result'].num_gradient_evals} by {t['method']}, tried and not returned"
                           for t in self.tried) + ")"]
        if "seconds" in r:   # the check's cost beside the fit's, so that neither dominates unsaid
            lines.append(f"end-of-fit check: {r['seconds']:.2f} s for {r['num_draws']} draws and the mode search, "
                         f"against {self.wall_time:.2f} s for the fit's steps (diagnose=False skips it)")
        lines += [f"WARNING: {w}" for w in r["warnings"]] or ["no reliability warnings"]
        lines += [f"note: {n}" for n in r.get("notes", [])]
        if r.get("mode_search"):
            lines.append(r["mode_search"])
        return lines

    def save(self, path):
        """Write the fitted parameters, ELBO trace, settings and status to `path` (no user code is pickled);
        `bbvi.load(path, model)` reads it back."""
        atomic_save({
            "bbvi_format": FORMAT, "kind": "result", "model": model_signature(self.model),
            "family": config_of(self.family), "plan": plan_config(self.plan),
            "report": {"differentiable": self.report.differentiable,
                       "nondifferentiable": list(self.report.nondifferentiable)},
            "params": {g: {k: t.detach().cpu() for k, t in grp.items()} for g, grp in self.params.items()},
            "elbo": self.elbo.cpu(), "settings": {k: str(v) for k, v in self.settings.items()},
            "status": self.status, "num_steps": self.num_steps, "num_failed_steps": self.num_failed_steps,
            "num_bad_particles": self.num_bad_particles, "wall_time": self.wall_time,
            "num_rescaled_steps": self.num_rescaled_steps, "num_particles": self.num_particles,
            "subsample_cv": self.subsample_cv, "batch": self.batch,
            **({"options": self.options.saved()} if self.options is not None else {}),
            "baseline_state": {k: v.detach().cpu() for k, v in self.baseline_state.items()},
            "preconditioner": [t.cpu() for t in self.model.preconditioner] if self.model.preconditioner else [],
        }, path)

    def __repr__(self):
        return (f"<bbvi.Result {self.model.name!r} {self.status}, {self.num_steps} steps, "
                f"final ELBO {self.final_elbo():.4g}>")
