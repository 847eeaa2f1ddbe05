"""Reliability II (issue 16), red-team findings on results and comparisons: each test failed before its fix"""
import warnings

import pytest
import torch
from torch.distributions import Normal

import bbvi


def _std2():
    return bbvi.Model(lambda z, d: Normal(0, 1).log_prob(z["x"]).sum(-1), {"x": bbvi.Latent(shape=(2,))},
                      name="std2")


def _two():
    return bbvi.Model(lambda z, d: Normal(0, 1).log_prob(z["mu"]) + Normal(0, 1).log_prob(z["u"]),
                      {"mu": bbvi.Latent(), "u": bbvi.Latent()}, name="two")


def _randn(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def std2_fit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bbvi.fit(_std2(), steps=5, seed=0)


@pytest.fixture(scope="module")
def two_fit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bbvi.fit(_two(), steps=50, seed=0)


# ---- #3: a degenerate reference ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.0, 3.0])
def test_compare_constant_reference_is_not_good(value):
    """Before: a reference with sd 0 made the sd scale fall back to 1.0, so a fit with sd 0.995 and mean -0.015
    against a constant-0 reference read mean_err_sd -0.015, sd_ratio 0.995, verdict 'good' ('1/1 parameters
    good'); against a constant 3 it read 'poor' with a mean error of -3.015 'sd'."""
    draws = {"mu": _randn(4000, 0)}
    df = bbvi.compare(draws, {"mu": torch.full((2000,), value, dtype=torch.float64)})
    row = df.loc["mu"]
    assert row["verdict"] == "n/a: reference sd is 0"
    assert row["ref_sd"] == 0.0
    assert row["mean_err_sd"] == -float("inf") and row["sd_ratio"] == float("inf")   # the means differ
    assert "0/1 parameters good" in df.attrs["verdict"]
    assert "cannot compare ['mu'] (n/a: reference sd is 0)" in df.attrs["verdict"]


def test_compare_constant_reference_matched_exactly_is_nan_not_good():
    """Before: a constant fit against the same constant reference read mean error 0 and sd ratio 0 (scale 1.0):
    verdict 'poor', a number that means nothing. Now the error is NaN (0 / 0) and the verdict n/a."""
    df = bbvi.compare({"mu": torch.zeros(500, dtype=torch.float64)}, {"mu": torch.zeros(2000, dtype=torch.float64)})
    assert df.loc["mu", "verdict"] == "n/a: reference sd is 0"
    assert df.loc["mu", "mean_err_sd"] != df.loc["mu", "mean_err_sd"]   # NaN


def test_compare_reference_sd_zero_for_one_entry_only():
    """Before: the constant entry theta[1] (fit sd 1.0) was 'good' next to a really compared theta[0]. Now only
    theta[0] is scored; the one-line verdict names theta[1] as not comparable."""
    ref = torch.stack([_randn(2000, 1), torch.zeros(2000, dtype=torch.float64)], 1)
    df = bbvi.compare({"theta": torch.stack([_randn(4000, 2), _randn(4000, 3)], 1)}, {"theta": ref})
    assert df.loc["theta[0]", "verdict"] == "good"
    assert df.loc["theta[1]", "verdict"] == "n/a: reference sd is 0"
    assert df.attrs["verdict"].startswith("1/2 parameters good")
    assert "cannot compare ['theta[1]']" in df.attrs["verdict"]


def test_compare_reference_with_one_draw_is_config_error():
    """Before: a reference with a single draw (sd NaN) gave verdict 'good' (ref_sd NaN, scale fell back to 1.0,
    fit sd 0.995)."""
    with pytest.raises(bbvi.ConfigError, match=r"1 draw\(s\) of 'mu'.*at least 2 draws"):
        bbvi.compare({"mu": _randn(4000, 0)}, {"mu": torch.zeros(1)})


# ---- #4, #5: what is compared ---------------------------------------------------------------------------------
def test_compare_reference_missing_latent_is_reported(two_fit):
    """Before: a reference with only 'mu' against a fit of 'mu' and 'u' said '1/1 parameters good; max |mean
    error| 0.046 sd (mu); sd ratios 0.95-0.95; k-hat -0.11' with no warning: nothing said 'u' was never checked."""
    with pytest.warns(UserWarning, match=r"not in the reference: \['u'\]"):
        df = bbvi.compare(two_fit, {"mu": _randn(2000, 1)}, num_draws=500)
    assert list(df.index) == ["mu"]
    assert "not in the reference: ['u']" in df.attrs["verdict"]
    assert df.attrs["not_compared"] == ["u"]


def test_compare_var_names_string_is_one_name(two_fit):
    """Before: var_names="mu" was matched as a substring ('u' in "mu"), so the table held ['mu', 'u']. A list
    still selects, and a reference holding every latent neither warns nor lists anything as not compared."""
    ref = {"mu": _randn(2000, 1), "u": _randn(2000, 2)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert list(bbvi.compare(two_fit, ref, num_draws=500, var_names="mu").index) == ["mu"]
        assert list(bbvi.compare(two_fit, ref, num_draws=500, var_names="u").index) == ["u"]
        assert list(bbvi.compare(two_fit, ref, num_draws=500, var_names=["u"]).index) == ["u"]
        df = bbvi.compare(two_fit, ref, num_draws=500)
    assert list(df.index) == ["mu", "u"] and "not in the" not in df.attrs["verdict"]
    assert df.attrs["not_compared"] == []


def test_compare_unknown_var_names_is_config_error(two_fit):
    """Before: var_names=['mu', 'zz'] silently compared ['mu'] ('zz' ignored); var_names=['zz'] said the fit and
    the reference 'share no parameter' while listing the same names for both."""
    ref = {"mu": _randn(2000, 1), "u": _randn(2000, 2)}
    for names in (["mu", "zz"], ["zz"], "zz"):
        with pytest.raises(bbvi.ConfigError, match=r"var_names \['zz'\] are in neither the fit"):
            bbvi.compare(two_fit, ref, num_draws=500, var_names=names)


# ---- #22: a reference with NaN draws -------------------------------------------------------------------------
@pytest.mark.parametrize("num_nan", [2000, 10])
def test_compare_reference_with_nan_is_config_error(two_fit, num_nan):
    """Before: an all-NaN reference, and one with 10 NaN draws of 2000, raised pandas' raw 'ValueError:
    Encountered all NA values' (from idxmax over NaN mean errors)."""
    ref = torch.cat([_randn(2000 - num_nan, 1), torch.full((num_nan,), float("nan"), dtype=torch.float64)])
    with pytest.raises(bbvi.ConfigError, match=rf"reference's 'mu' has {num_nan} of 2000 draws that are NaN"):
        bbvi.compare(two_fit, {"mu": ref, "u": _randn(2000, 2)}, num_draws=500)


# ---- #10: load with another family ----------------------------------------------------------------------------
def test_load_with_other_family_is_config_error(tmp_path):
    """Before: bbvi.load(fullrank_file, model, family='meanfield') loaded, and the first fit.sample raised a raw
    KeyError 'log_scale' (LowRank(rank=1): KeyError 'cov_factor')."""
    model = _std2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = bbvi.fit(model, steps=5, family="fullrank", seed=0)
    path = tmp_path / "q.pt"
    fit.save(path)
    for family, given in [("meanfield", "MeanField"), (bbvi.LowRank(rank=1), "LowRank")]:
        with pytest.raises(bbvi.ConfigError, match=rf"family FullRank\(init_scale=0.1\).*family={given}\("):
            bbvi.load(path, model, family=family)
    expected = fit.sample(100, seed=1)["x"]
    assert torch.equal(bbvi.load(path, model).sample(100, seed=1)["x"], expected)
    assert torch.equal(bbvi.load(path, model, family="fullrank").sample(100, seed=1)["x"], expected)


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


def test_compare_refuses_ambiguous_row_labels():
    """Reliability III, A5: latents 'a' (shape (2,)) and 'a[0]' both label a row 'a[0]'; compare failed inside
    pandas ('The truth value of a Series is ambiguous'). Now a ConfigError names both parameters, their shapes and
    the label; each compares on its own."""
    g = torch.Generator().manual_seed(0)
    draws = {"a": torch.randn(500, 2, generator=g, dtype=torch.float64),
             "a[0]": torch.randn(500, generator=g, dtype=torch.float64)}
    ref = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in draws.items()}
    with pytest.raises(bbvi.ConfigError, match=r"parameters 'a' \(shape \(2,\)\) and 'a\[0\]' \(shape \(\)\) both "
                                               r"give a row labelled 'a\[0\]'.*var_names='a'"):
        bbvi.compare(draws, ref)
    assert list(bbvi.compare(draws, ref, var_names="a[0]").index) == ["a[0]"]
    assert list(bbvi.compare(draws, ref, var_names="a").index) == ["a[0]", "a[1]"]
