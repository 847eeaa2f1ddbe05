"""method='auto' (bbvi.fit's default): batch and match where it applies, the stochastic-gradient fit elsewhere.

Batch and match (bam.py) fits a full-rank Gaussian from the scores in a few dozen steps of 32 particles or more, with
no learning rate: on the 36 yardstick posteriors it is as right as the stochastic-gradient fit at about a twentieth
of its gradient evaluations (docs/accuracy.md, "The field's yardstick"). It applies when
- no family is given (family=None) and no option of the stochastic-gradient fit is (estimator, baseline, lr,
  optimizer, schedule, steps, max_steps, clip_grad, tol_rel_obj, subsample_size, distributed, compile): those ask
  for that fit, and get it as before; nor num_particles=1 (batch and match needs two particles a step; the
  stochastic-gradient fit refuses what is not an int >= 1);
- the latents are all continuous and torch can differentiate the log-joint (the scores);
- there are at most MAX_DIM continuous coordinates (a full-rank Gaussian's D x D covariance and D particles a
  step: measured exact on Gaussian targets up to D = 200 in about a second).
Where batch and match ran and the end-of-fit check warns about its Gaussian (after a closer look with more draws
where k-hat was above the threshold with nothing moved), a flow started at it goes on within a stated budget, and the check decides which q is returned (`after_check`, bbvi.algorithms.fallback).
Otherwise the stochastic-gradient fit runs as before (mean-field, the adaptive rule), bit for bit. `fit.settings`
says which ran and why ('method' is written only when batch and match ran, so that checkpoints of the
stochastic-gradient default compare as before)."""
import warnings

from ..estimators import DEFAULT
from . import bam, fallback, sgd

__all__ = ["init", "step", "settings", "after_check", "MAX_DIM"]

name = "auto"
default_family = None
MAX_DIM = 200

# The options that ask for the stochastic-gradient fit, with bbvi.fit's defaults (bbvi.fit itself turns 'auto'
# into 'sgd' for tol_rel_obj, distributed and compile, and for resuming a checkpoint written by the
# stochastic-gradient default).
SGD_OPTIONS = {"estimator": "auto", "baseline": DEFAULT, "lr": None, "optimizer": "adam", "schedule": "auto",
               "steps": None, "max_steps": None, "clip_grad": None, "subsample_size": None}


def sgd_options_given(options):
    """The stochastic-gradient options set to anything but fit's default (name=value texts)."""
    return [f"{k}={v!r}" for k, v in options.items()
            if k in SGD_OPTIONS and v is not SGD_OPTIONS[k] and v != SGD_OPTIONS[k]]


def choose(model, family, options):
    """(bam or sgd, why): what method='auto' runs before looking at the log-joint's gradient."""
    given = sgd_options_given(options)
    if family is not None:
        return sgd, f"family={family!r} given"
    if given:
        return sgd, f"{', '.join(given)} given"
    n = options.get("num_particles")
    if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 2):
        return sgd, f"num_particles={n!r} given (batch and match needs 2 or more)"
    if model.discrete:
        return sgd, f"discrete latents {sorted(model.discrete)}"
    if model.dim > MAX_DIM:
        return sgd, f"{model.dim} continuous coordinates, more than {MAX_DIM} for a full-rank Gaussian"
    if model.dim == 0:
        return sgd, "no continuous latents"
    return bam, f"continuous latents ({model.dim} coordinates), a differentiable log-joint"


def init(model, family=None, estimator="auto", baseline=DEFAULT, **options):
    chosen, why = choose(model, family, dict(options, estimator=estimator, baseline=baseline))
    if chosen is bam:
        with warnings.catch_warnings(record=True) as caught:   # said again below, or by the fallback's own init
            warnings.simplefilter("always")
            try:
                state = bam.init(model, "fullrank", estimator, baseline, **options)
            except bam.NotApplicable as e:
                state, why = None, f"the log-joint is not differentiable in torch ({e.reason})"
        if state is not None:
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            state.algorithm, state.why = bam, why
            return state
    state = sgd.init(model, family or "meanfield", estimator, baseline, **options)
    state.algorithm, state.why = sgd, why
    return state


def step(state):
    return state.algorithm.step(state)


def settings(state):
    if state.algorithm is sgd:
        return {}
    return {"method": "bam", "why": state.why, **bam.settings(state)}



def after_check(result, *, stacklevel, **options):
    """Once the end-of-fit check has run (quietly): where batch and match ran, a closer look where its check was
    inconclusive, then where it warns a flow started at its Gaussian (bbvi.algorithms.fallback); otherwise the
    check's warning, if any. Returns the Result to return.
    options: bbvi.fit itself (`fit`), and its seed, device, dtype, progress, callbacks and
    max_consecutive_failures."""
    from ..diagnostics import warn_unreliable
    if result.options.method == "bam":
        fallback.look_closer(result)
        if fallback.needed(result):
            return fallback.go_on(result, stacklevel=stacklevel + 1, **options)
    warn_unreliable(result, stacklevel=stacklevel)
    return result
