"""bbvi/result.py: the Result methods' arguments (counts, seeds, draws beyond memory). Each test failed before its
fix (issue 16; what happened before is in its docstring)."""
import warnings

import pytest
import torch

import bbvi
from targets import std2


@pytest.fixture(scope="module")
def std2_fit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bbvi.fit(std2(), steps=5, seed=0)


# ---- #11-#17: Result methods with bad arguments ---------------------------------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda f: f.diagnostics(num_draws=0), r"fit.diagnostics: num_draws must be a positive int, got 0"),
    (lambda f: f.gradient_samples(0), r"fit.gradient_samples: num_samples must be a positive int, got 0"),
    (lambda f: f.gradient_samples(-1), r"num_samples must be a positive int, got -1"),
    (lambda f: f.gradient_samples(2, num_particles=-1), r"num_particles must be None \(the fit's own, 16\) or a "
                                                        r"positive int, got -1"),
    (lambda f: f.gradient_samples(2, num_particles=0), r"num_particles must be None .* got 0"),
    (lambda f: f.summary(num_draws=0), r"fit.summary: num_draws must be a positive int, got 0"),
])
def test_result_bad_counts_are_config_errors(std2_fit, call, match):
    """Before: diagnostics(num_draws=0) raised ValueError 'torch.cat(): expected a non-empty list of Tensors';
    gradient_samples(0) and (-1) RuntimeError 'stack expects a non-empty TensorList'; num_particles=-1
    RuntimeError 'Trying to create tensor with negative dimension -1'; num_particles=0 silently used the fit's
    16 particles (a (2, 4) result); summary(num_draws=0) gave an empty table of NaNs."""
    with pytest.raises(bbvi.ConfigError, match=match):
        call(std2_fit)


METHODS = {
    "sample": lambda f, s: f.sample(100, seed=s),
    "diagnostics": lambda f, s: f.diagnostics(num_draws=100, seed=s),
    "gradient_samples": lambda f, s: f.gradient_samples(2, seed=s),
    "log_weights": lambda f, s: f.log_weights(100, seed=s),
    "to_arviz": lambda f, s: f.to_arviz(100, seed=s),
    "summary": lambda f, s: f.summary(100, seed=s),
}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("seed", [2 ** 64, 2 ** 63, 1.5, -1, True, "1"])
def test_result_seeds_follow_fits_rule(std2_fit, method, seed):
    """Before: seed=2**64 raised ValueError 'Overflow when unpacking long long', seed=1.5 RuntimeError
    'manual_seed expected a long, but got float', and seed=-1 was accepted by sample, log_weights and
    diagnostics although bbvi.fit(seed=-1) is a ConfigError. Now every Result method refuses what fit refuses."""
    with pytest.raises(bbvi.ConfigError, match=rf"fit.{method}: seed must be an int in \[0, 2\*\*63\)"):
        METHODS[method](std2_fit, seed)


def test_sample_negative_seed_refused_and_good_seeds_still_work(std2_fit):
    """Before: fit.sample(4000, seed=-1) returned 4000 draws although bbvi.fit(seed=-1) is a ConfigError. The
    contract is kept: the largest allowed seed works and the same seed gives the same draws."""
    with pytest.raises(bbvi.ConfigError, match=r"seed must be an int in \[0, 2\*\*63\) .* got -1"):
        std2_fit.sample(4000, seed=-1)
    a = std2_fit.sample(4000, seed=1)["x"]
    assert a.shape == (4000, 2) and torch.equal(a, std2_fit.sample(4000, seed=1)["x"])
    assert std2_fit.sample(10, seed=2 ** 63 - 1)["x"].shape == (10, 2)
    assert std2_fit.sample(4000)["x"].shape == (4000, 2)
    g = std2_fit.gradient_samples(20, estimator="score", baseline="loo", num_particles=16, seed=1)
    assert g.shape == (20, 4) and torch.isfinite(g).all()
    assert "khat" in std2_fit.diagnostics(num_draws=2000)


@pytest.mark.parametrize("call", [
    lambda f: f.sample(10 ** 12),
    lambda f: f.diagnostics(num_draws=10 ** 12),
    lambda f: f.gradient_samples(2, num_particles=10 ** 12),
])
def test_result_draws_beyond_memory_are_config_errors(std2_fit, call):
    """Before: fit.sample(10**12) raised the allocator's RuntimeError "DefaultCPUAllocator: can't allocate
    memory: you tried to allocate 16000000000000 bytes"; the estimate (draws x values per draw x element size x
    a few work copies) now refuses it up front and names a num_draws that fits."""
    with pytest.raises(bbvi.ConfigError, match=r"=1000000000000 needs about .* GiB .* use a smaller num_"):
        call(std2_fit)
