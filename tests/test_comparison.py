"""bbvi/comparison.py: bbvi.compare, a fit or draws against a reference (degenerate references, what is compared,
NaN draws, ambiguous row labels). Each test failed before its fix (issue 16; what happened before is in its
docstring). How the table prints is in test_readable_output.py; compare against NUTS in test_reference_diagnostics.py."""
import warnings

import pytest
import torch
from torch.distributions import Normal

import bbvi


def _two():
    return bbvi.Model(lambda z, d: Normal(0, 1).log_prob(z["mu"]) + Normal(0, 1).log_prob(z["u"]),
                      {"mu": bbvi.Latent(), "u": bbvi.Latent()}, name="two")


def _randn(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


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
