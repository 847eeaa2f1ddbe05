"""bbvi: black-box variational inference for PyTorch.

A model is a log-joint log p(x, z) written in torch (`bbvi.Model`, its latents `bbvi.Latent`, supports from
`bbvi.constraints`). `bbvi.fit` fits a variational family q(z): by default (method='auto') a full-rank Gaussian by
batch and match (closed-form updates from the scores, bbvi.algorithms.bam) where every latent is continuous and
torch can differentiate the log-joint, else (and with method='sgd' or any of its options) MeanField, FullRank,
LowRank or Flow by stochastic gradient ascent on the ELBO with the score-function estimator (`Score`, with the EMA, LOO or CV
baseline), the pathwise estimator (`Reparam`), sticking-the-landing (`STL`), `Auto` (the default: pathwise where
torch can differentiate the log-joint, score terms elsewhere), ARM and DisARM (boolean latents), VIMCO, RELAX or
Concrete. `Adaptive` is the default step-size and stopping rule; `init`, `step` and `FitState` run the loop one
step at a time. A fit is a `Result` (`summary()`, `sample()`, `diagnostics()`, `save()`; `bbvi.load` reads it
back). `bbvi.nuts` runs a Pyro NUTS reference, `bbvi.compare` tables a fit against a reference, `bbvi.plots` draws
the figures, and `bbvi.expectation` gives gradients of E[f(x)] by the same estimators. Errors are `BBVIError`s
(ModelError, ConfigError, FitError, SamplerError); a fit that may not be trusted issues a `ReliabilityWarning`.

See the project's README.md ("Quick start", "What is in it") for usage, docs/features.md for every option and
docs/layout.md for the protocols of new families, estimators and baselines. Importing bbvi imports torch only; Pyro, ArviZ, pandas and matplotlib are
imported where they are used.
"""
from . import constraints
from .convergence import Adaptive
from .errors import BBVIError, ConfigError, FitError, ModelError, ReliabilityWarning, SamplerError
from .estimators import ARM, CV, EMA, LOO, STL, VIMCO, Auto, Concrete, DisARM, RELAX, Reparam, Score
from .estimators.expectation import expectation
from .families import FullRank, LowRank, MeanField
from .flows import Flow
from .fit import FitState, fit, init, step
from .fit_options import FitOptions
from .model import Latent, Model
from .result import Result

__version__ = "0.1.0"


def load(path, model, device="cpu", family=None):
    """A fitted Result saved with `fit.save(path)`, attached to `model` (pass the model again)."""
    from .result_file import load_result
    return load_result(path, model, device=device, family=family)


def nuts(model, **kwargs):
    """NUTS reference for `model` through Pyro (see bbvi.reference.nuts)."""
    from .reference import nuts as _nuts
    return _nuts(model, **kwargs)


def from_pyro(model, *args, **kwargs):
    """A Pyro model (its sample sites, plates, observed sites, supports) as a bbvi.Model with the same log
    density, computed by Pyro (see bbvi.pyro_bridge)."""
    from .pyro_bridge import from_pyro as _from_pyro
    return _from_pyro(model, *args, **kwargs)


def compare(fit_result, reference, **kwargs):
    """Per-parameter table of a fit against a reference (see bbvi.diagnostics.compare)."""
    from .diagnostics import compare as _compare
    return _compare(fit_result, reference, **kwargs)


__all__ = ["Model", "Latent", "fit", "init", "step", "FitState", "FitOptions", "Result", "load", "nuts", "compare", "from_pyro", "MeanField",
           "FullRank", "LowRank", "Flow", "Score", "Reparam", "STL", "Auto", "ARM", "DisARM", "VIMCO", "Concrete", "RELAX", "EMA", "LOO", "CV", "BBVIError",
           "ModelError", "ConfigError", "FitError", "SamplerError", "ReliabilityWarning", "Adaptive", "constraints", "expectation"]
