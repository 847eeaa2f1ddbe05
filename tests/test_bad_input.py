"""Reliability, part 1: bad models and bad arguments get bbvi's own errors (fuzzed with hypothesis).
The error messages themselves are checked in test_model.py and test_fit_options.py."""

import torch
from torch.distributions import constraints

import bbvi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


_supports = st.sampled_from([constraints.real, constraints.positive, constraints.unit_interval,
                             constraints.simplex, constraints.boolean, constraints.integer_interval(0, 2),
                             constraints.lower_cholesky, constraints.nonnegative_integer, "real", None])

_shapes = st.one_of(st.tuples(), st.tuples(st.integers(-1, 3)), st.tuples(st.integers(0, 3), st.integers(0, 3)),
                    st.integers(-2, 3), st.just("x"), st.none(), st.floats(-1, 3))

_anything = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(-1e3, 1e3), st.just(float("nan")), st.just(float("inf")),
                      st.text(max_size=8))

def _generic_log_joint(z, data):
    total = 0
    for v in z.values():
        total = total - 0.5 * (v.double() ** 2).reshape(v.shape[0], -1).sum(-1)
    return total

@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(shape=_shapes, support=_supports, family=st.sampled_from(["meanfield", "fullrank", "lowrank", "bogus", 3]),
       estimator=st.sampled_from(["auto", "score", "reparam", "stl", "nope", None]),
       baseline=st.sampled_from([None, "ema", "loo", "cv", "mean", 0]),
       num_particles=_anything, steps=_anything, lr=_anything, seed=_anything)
def test_fuzzed_arguments_fit_or_raise_bbvi_errors(shape, support, family, estimator, baseline, num_particles,
                                                   steps, lr, seed):
    try:
        latent = bbvi.Latent(shape=shape, support=support)
        model = bbvi.Model(_generic_log_joint, {"x": latent})
        fit = bbvi.fit(model, family=family, estimator=estimator, baseline=baseline, num_particles=num_particles,
                       steps=(min(steps, 5) if isinstance(steps, int) and not isinstance(steps, bool) else
                              5 if steps is None else steps),   # steps=None (adaptive) is tested in test_defaults
                       lr=lr, seed=seed, dtype=torch.float64)
    except bbvi.BBVIError:
        return
    draws = fit.sample(4)["x"]
    assert draws.shape == (4,) + latent.shape
