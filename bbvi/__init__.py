"""bbvi: black-box variational inference for PyTorch.

A model is a log-joint log p(x, z) written in torch; `bbvi.fit` fits a variational family q(z) by stochastic
gradient ascent on the ELBO with the score-function estimator (and baselines), the pathwise estimator, or
sticking-the-landing. See DESIGN.md for the public contract. The core imports torch only; Pyro, ArviZ and
matplotlib are imported where they are used.
"""
from . import constraints
from .convergence import Adaptive
from .errors import BBVIError, ConfigError, FitError, ModelError, ReliabilityWarning, SamplerError
from .estimators import ARM, CV, EMA, LOO, STL, VIMCO, Auto, Concrete, DisARM, RELAX, Reparam, Score
from .estimators.expectation import expectation
from .families import FullRank, LowRank, MeanField
from .flows import Flow
from .fit import FitState, fit, init, step
from .model import Latent, Model
from .result import Result

__version__ = "0.1.0"


def load(path, model, device="cpu", family=None):
    """A fitted Result saved with `fit.save(path)`, attached to `model` (pass the model again)."""
    from .result import load_result
    return load_result(path, model, device=device, family=family)


def nuts(model, **kwargs):
    """NUTS reference for `model` through Pyro (see bbvi.reference.nuts)."""
    from .reference import nuts as _nuts
    return _nuts(model, **kwargs)


def compare(fit_result, reference, **kwargs):
    """Per-parameter table of a fit against a reference (see bbvi.diagnostics.compare)."""
    from .diagnostics import compare as _compare
    return _compare(fit_result, reference, **kwargs)


__all__ = ["Model", "Latent", "fit", "init", "step", "FitState", "Result", "load", "nuts", "compare", "MeanField",
           "FullRank", "LowRank", "Flow", "Score", "Reparam", "STL", "Auto", "ARM", "DisARM", "VIMCO", "Concrete", "RELAX", "EMA", "LOO", "CV", "BBVIError",
           "ModelError", "ConfigError", "FitError", "SamplerError", "ReliabilityWarning", "Adaptive", "constraints", "expectation"]
