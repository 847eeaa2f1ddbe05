"""Fitting algorithms, one a module, behind the one seam that bbvi.fit drives (`fit(model, method=name)`).

An algorithm is a module (or any object) with
- `init(model, family, estimator, baseline, **options) -> FitState`: q's start and all a step needs, from bbvi.fit's
  own options (an option the algorithm has no use for, set to anything but fit's default, is a ConfigError that
  says so: `bbvi.options.refuse_unused`);
- `step(state) -> Tensor`: one step; it adds the step's `Info` to `state.record` (bbvi.record), advances
  `state.step` and sets `state.stop` when the algorithm is done, so that `while not state.stop: step(state)` runs
  it (bbvi.fit adds callbacks, checkpoints, Ctrl-C undo, the progress bar and the end-of-fit check);
- optionally `settings(state) -> dict`: what `fit.settings` records of it beyond fit's options, and
  `default_family`: the family fit passes when family is None (num_particles=None is passed on as it is), and
  `after_check(result, *, fit, stacklevel, **options) -> Result`: what follows the end-of-fit check, which then
  runs quietly (the algorithm warns itself: 'auto' goes on to a flow where its Gaussian is suspect, by calling
  `fit`, bbvi.fit itself, passed in so that no algorithm imports the loop).

Built in: 'auto' (bbvi.fit's default: 'bam' where it applies, 'sgd' elsewhere: `auto.py`), 'sgd'
(stochastic-gradient ascent on the ELBO: `sgd.py`), 'laplace' (q = N(MAP, H^-1) on the
unconstrained scale, in no step: `laplace.py`), 'bam' (batch and match: a full-rank Gaussian from closed-form
updates on the scores at each step's particles, no learning rate: `bam.py`).
"""
from ..errors import ConfigError
from . import auto, bam, laplace, sgd

__all__ = ["ALGORITHMS", "resolve_method"]

ALGORITHMS = {"auto": auto, "sgd": sgd, "laplace": laplace, "bam": bam}


def resolve_method(method):
    """The algorithm for fit(method=...): a built-in name or an object with init and step."""
    if isinstance(method, str):
        if method not in ALGORITHMS:
            raise ConfigError(f"method must be one of {sorted(ALGORITHMS)} or an object with init(model, ...) and "
                              f"step(state), got {method!r}")
        return ALGORITHMS[method]
    if not (callable(getattr(method, "init", None)) and callable(getattr(method, "step", None))):
        raise ConfigError(f"method must be one of {sorted(ALGORITHMS)} or an object with init(model, ...) and "
                          f"step(state), got {method!r}")
    return method
