"""Every family x estimator x baseline combination reproduces its recorded ELBO trace, final parameters,
gradient samples, draws and log weights bit for bit (torch.equal): a refactor of the estimators must not change
a single number. The grid and how to regenerate it: tests/estimator_reference.py."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import estimator_reference as grid  # noqa: E402

REFS = torch.load(grid.PATH, weights_only=True)
CASES = [(key, make, kw) for key, make, kw in grid.configs()]


def _same(a, b):
    """torch.equal, with NaN equal to NaN in the same places."""
    nan = torch.isnan(a)
    return a.shape == b.shape and torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])


def _assert_equal(key, got, want):
    assert sorted(got) == sorted(want), key
    for name in want:
        assert _same(got[name], want[name]), (
            f"{key}: {name} differs (max |diff| {(got[name] - want[name]).abs().nan_to_num().max().item():.3g})")


@pytest.mark.parametrize("key,make,kw", CASES, ids=[c[0] for c in CASES])
def test_grid_reproduces_bit_for_bit(key, make, kw):
    _assert_equal(key, grid.run_one(make, kw, extras=kw["family"] == "meanfield"), REFS[key])


def test_default_fit_reproduces_bit_for_bit():
    _assert_equal("default", grid.default_fit(), REFS["default"])


def test_grid_covers_masked_particles():
    """The NaN-masked and mixed cases really drop particles (otherwise they would test nothing new)."""
    import warnings
    import bbvi
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for make in (grid.nan_masked, grid.mixed):
            fit = bbvi.fit(make(), steps=grid.STEPS, num_particles=6, init_strategy="zero", progress=False,
                           estimator="score", baseline="loo")
            assert fit.num_bad_particles > 0, make.__name__
