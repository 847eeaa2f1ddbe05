"""bbvi's own exceptions: every documented failure raises one of these, with the fix in the message."""


class BBVIError(Exception):
    """Base class of every error bbvi raises on purpose."""


class ModelError(BBVIError, ValueError):
    """The model is malformed: a latent's shape or support, or what the log-joint returns."""


class ConfigError(BBVIError, ValueError):
    """An option of `bbvi.fit` (or a family/estimator pair) that cannot work."""


class FitError(BBVIError, RuntimeError):
    """A fit that cannot go on (e.g. its steps keep failing). The fit so far is kept in `.result`."""

    def __init__(self, message, result=None):
        super().__init__(message)
        self.result = result


class SamplerError(BBVIError, RuntimeError):
    """A NUTS reference that cannot be computed (no finite initial point, a failed chain, bad settings)."""


class ReliabilityWarning(UserWarning):
    """A finished fit that should not be trusted as it is: PSIS k-hat > 0.7, a PSIS check that moves q's means
    or sds, a fit that did not converge, a posterior with no mode. The message names what to try."""
