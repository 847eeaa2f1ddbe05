"""The Laplace approximation as an algorithm of no steps: q = N(u*, H^-1) on the model's unconstrained scale, u* the
MAP found by L-BFGS and H the Hessian of -log p there (bbvi.start's MAP start; Stan's `laplace` method does the
same). It costs the start's evaluations only, and the end-of-fit check (PSIS k-hat, the importance-weighted means
and sds) says whether it can be trusted. It needs a log-joint torch can differentiate, continuous latents only and
a density with a mode (a funnel has none): otherwise a ConfigError says why."""
import torch

from ..estimators import DEFAULT
from ..options import full_rank_options
from . import sgd

__all__ = ["init", "step", "settings"]

name = "laplace"
default_family = "fullrank"

# fit's options the Laplace approximation has no use for, with fit's defaults.
_UNUSED = {"estimator": "auto", "baseline": DEFAULT, "lr": None, "optimizer": "adam", "schedule": "auto",
           "steps": None, "max_steps": None, "clip_grad": None, "subsample_size": None, "comm": None,
           "init_strategy": "auto"}


def init(model, family="fullrank", estimator="auto", baseline=DEFAULT, **options):
    options = full_rank_options("laplace", model, family, dict(options, estimator=estimator, baseline=baseline),
                                _UNUSED, "q is the Gaussian at the MAP with the inverse Hessian as its covariance, "
                                "in no step")
    state = sgd.init(model, "fullrank", steps=0, init_strategy="map", **options)
    state.stop = True
    return state


def step(state):
    """Nothing to do: q is the Laplace approximation from `init`."""
    state.stop = True
    return torch.full((), float("nan"), dtype=state.params["continuous"]["loc"].dtype)


def settings(state):
    return {"estimator": "none (the Laplace approximation)", "plan": "none"}
