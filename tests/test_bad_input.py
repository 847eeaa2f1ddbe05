"""Reliability, part 1: bad models and bad arguments get bbvi's own errors (fuzzed with hypothesis).
The error messages themselves are checked in test_model.py and test_fit_options.py."""

import pytest
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


def test_attack_34_callbacks_that_are_not_a_list_of_callables_are_refused():
    """Attack 34 (Reliability III review): callbacks=a bare function, [None] and 'x' under the default. Seen: a
    ConfigError each (the bare function told to be wrapped in a list) before any step."""
    from torch.distributions import Normal
    model = bbvi.Model(lambda z, d: Normal(0., 1.).log_prob(z["m"]), {"m": bbvi.Latent()}, name="n")
    with pytest.raises(bbvi.ConfigError, match=r"got the callable '<lambda>' itself: pass callbacks=\[it\]"):
        bbvi.fit(model, callbacks=lambda s: False)
    for bad in ([None], "x"):
        with pytest.raises(bbvi.ConfigError, match=r"callbacks must be callables \(state\) -> bool"):
            bbvi.fit(model, callbacks=bad)


def test_attack_35_an_option_batch_and_match_has_no_use_for_is_refused_under_method_bam():
    """Attack 35: method='bam' with optimizer='sgd', and an optimizer name that does not exist under the default.
    Seen: a ConfigError saying batch and match takes no optimizer (its updates are closed-form), and one listing
    the optimizers."""
    from torch.distributions import Normal
    model = bbvi.Model(lambda z, d: Normal(0., 1.).log_prob(z["m"]), {"m": bbvi.Latent()}, name="n")
    with pytest.raises(bbvi.ConfigError, match="method='bam' takes no optimizer='sgd': batch and match updates q"):
        bbvi.fit(model, method="bam", optimizer="sgd")
    with pytest.raises(bbvi.ConfigError, match=r"optimizer must be one of \['adagrad', 'adam'"):
        bbvi.fit(model, optimizer="nadam", steps=5)
