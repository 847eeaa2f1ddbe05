"""NUTS references, the cache, compare, PSIS k-hat, importance resampling, plots, the demo."""
import os
import warnings

import arviz as az
import numpy as np
import pandas as pd
import pytest
import torch

import bbvi
from bbvi.diagnostics import importance_resample, reference_warnings
from bbvi.reference import from_draws
from models.conjugate import gamma_poisson, normal_normal
from targets import mvn

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="module")
def nn_reference(tmp_path_factory):
    model, exact = normal_normal()
    cache = tmp_path_factory.mktemp("nuts")
    ref = bbvi.nuts(model, num_draws=1000, num_warmup=300, num_chains=2, seed=0, cache_dir=str(cache))
    return model, exact, ref, cache


def test_nuts_matches_the_analytic_posterior(nn_reference):
    model, exact, ref, _ = nn_reference
    mean, sd = exact["mu"]
    draws = ref.posterior["mu"].values
    assert draws.shape == (2, 1000)
    mcse = float(az.mcse(ref)["mu"])           # sd / sqrt(ESS), from ArviZ
    assert abs(draws.mean() - mean) < min(0.1 * sd, 4 * mcse), (draws.mean(), mean, mcse)
    assert abs(draws.std() / sd - 1) < 0.1
    assert float(az.rhat(ref)["mu"]) < 1.01
    stats = ref.sample_stats
    for k in ("diverging", "step_size", "n_steps", "tree_depth", "lp"):
        assert stats[k].shape == (2, 1000)
    assert not stats["diverging"].values.any() and (stats["n_steps"].values >= 1).all()
    assert reference_warnings(ref) == []


def test_cache_returns_identical_draws_and_detects_corruption(nn_reference, tmp_path):
    from bbvi.reference import _load_cached
    model, _, ref, cache = nn_reference
    again = bbvi.nuts(model, num_draws=1000, num_warmup=300, num_chains=2, seed=0, cache_dir=str(cache))
    np.testing.assert_array_equal(again.posterior["mu"].values, ref.posterior["mu"].values)
    files = [f for f in os.listdir(cache) if f.endswith(".nc")]
    assert len(files) == 1
    path = os.path.join(cache, files[0])
    key = ref.posterior.attrs["bbvi_cache_key"]
    with open(path, "rb") as f:
        blob = f.read()
    # bytes overwritten anywhere: the entry is refused, or (padding, unused space) reads back identical
    refused = 0
    for i, at in enumerate(np.linspace(512, len(blob) - 64, 16).astype(int)):
        copy = tmp_path / f"corrupt{i}.nc"
        copy.write_bytes(blob[:at] + b"\xde\xad\xbe\xef" * 8 + blob[at + 32:])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = _load_cached(str(copy), key)
        if loaded is None:
            refused += 1
            assert any("unusable" in str(w.message) for w in caught)
        else:
            np.testing.assert_array_equal(loaded.posterior["mu"].values, ref.posterior["mu"].values)
    assert refused >= 1
    # a well-formed file whose draws were changed after the checksum was taken
    tampered = az.from_netcdf(path)
    tampered.posterior["mu"].values[0, 0] += 1.0
    tampered.to_netcdf(str(tmp_path / "tampered.nc"))
    with pytest.warns(UserWarning, match="checksum"):
        assert _load_cached(str(tmp_path / "tampered.nc"), key) is None
    with pytest.warns(UserWarning, match="cache key"):
        assert _load_cached(path, "another-key") is None
    # a truncated entry is recomputed end to end, giving the same draws
    with open(path, "r+b") as f:
        f.truncate(len(blob) // 2)
    with pytest.warns(UserWarning, match="unusable"):
        recomputed = bbvi.nuts(model, num_draws=1000, num_warmup=300, num_chains=2, seed=0, cache_dir=str(cache))
    np.testing.assert_array_equal(recomputed.posterior["mu"].values, ref.posterior["mu"].values)


def test_compare_passes_a_good_fit_and_flags_a_wrong_one(nn_reference):
    model, exact, ref, _ = nn_reference
    good = bbvi.fit(model, estimator="score", baseline="loo", steps=2000, dtype=torch.float64, diagnose=False)
    table = bbvi.compare(good, ref)
    assert list(table.index) == ["mu"] and table.loc["mu", "verdict"] == "good"
    assert abs(table.loc["mu", "mean_err_sd"]) < 0.15 and abs(table.loc["mu", "sd_ratio"] - 1) < 0.1
    wrong = bbvi.fit(model, estimator="score", baseline="loo", steps=2000, dtype=torch.float64,
                     init_strategy="zero", diagnose=False)   # the shift below is in the model's own (unwhitened) units
    with torch.no_grad():
        wrong.params["continuous"]["loc"] += 0.5 * exact["mu"][1]
        wrong.params["continuous"]["log_scale"] += 0.7
    bad = bbvi.compare(wrong, ref)
    assert bad.loc["mu", "verdict"] == "poor"
    assert bad.loc["mu", "mean_err_sd"] > 0.4 and bad.loc["mu", "sd_ratio"] > 1.8
    assert "0/1 parameters good" in bad.attrs["verdict"]


def test_compare_with_posteriordb_draws_and_stan_names(tmp_path):
    frame = pd.DataFrame({"theta[1]": [1.0, 2.0, 3.0, 4.0], "theta[2]": [0.0, 0.0, 1.0, 1.0], "tau": [1, 2, 3, 4]})
    path = tmp_path / "draws.csv.gz"
    frame.to_csv(path, index=False)
    idata = from_draws(str(path), num_chains=2)
    assert idata.posterior["theta"].shape == (2, 2, 2)
    np.testing.assert_array_equal(idata.posterior["theta"].values.reshape(4, 2)[:, 1], [0, 0, 1, 1])
    draws = {"theta": torch.tensor([[2.5, 0.5]] * 4, dtype=torch.float64) + torch.tensor([[0.1, 0.0]] * 4)}
    table = bbvi.compare(draws, idata)
    assert list(table.index) == ["theta[0]", "theta[1]"]
    # two draws a chain: no R-hat or ESS can be computed, and the verdict says so (it said nothing, with an all-NaN
    # RuntimeWarning from numpy)
    assert "REFERENCE NOT CHECKABLE: theta: R-hat, bulk ESS, tail ESS not computable" in table.attrs["verdict"]


def test_compare_warns_loudly_about_a_bad_reference():
    rng = np.random.default_rng(0)
    stuck = {"x": np.stack([rng.normal(0, 1, 200), rng.normal(3, 1, 200)])}   # two chains that disagree
    idata = az.from_dict(posterior=stuck, sample_stats={"diverging": np.ones((2, 200), dtype=bool)})
    warnings_ = reference_warnings(idata)
    assert any("R-hat" in w for w in warnings_) and any("DIVERGENT" in w for w in warnings_)
    table = bbvi.compare({"x": torch.randn(100)}, idata)
    assert "REFERENCE NOT CONVERGED" in table.attrs["verdict"]


CORR = torch.tensor([[1.0, 0.95], [0.95, 1.0]], dtype=torch.float64)


def _correlated():
    return mvn(torch.zeros(2, dtype=torch.float64), CORR, name="correlated")


@pytest.mark.slow
def test_khat_small_for_an_exact_family_and_large_for_meanfield_on_correlation():
    exact = bbvi.fit(_correlated(), family="fullrank", estimator="stl", steps=3000, dtype=torch.float64, diagnose=False)
    poor = bbvi.fit(_correlated(), family="meanfield", estimator="stl", steps=3000, dtype=torch.float64, diagnose=False)
    k_exact, k_poor = exact.diagnostics()["khat"], poor.diagnostics()["khat"]
    assert k_exact < 0.5 and exact.diagnostics()["khat_reading"].startswith("good")
    assert k_poor > 0.7 and poor.diagnostics()["khat_reading"].startswith("not reliable")


def test_importance_resampling_corrects_a_usable_fit_and_refuses_a_bad_one():
    model, exact = gamma_poisson()
    fit = bbvi.fit(model, steps=2000, dtype=torch.float64, diagnose=False)
    with torch.no_grad():      # a deliberately too-wide q: importance sampling can correct it
        fit.params["continuous"]["log_scale"] += 0.3
    raw = fit.sample(20000)["lam"]
    fixed = importance_resample(fit, 20000, seed=1)["lam"]
    mean, sd = exact["lam"]
    assert abs(raw.std().item() / sd - 1) > 0.2
    assert abs(fixed.std().item() / sd - 1) < 0.05 and abs(fixed.mean().item() - mean) < 0.05 * sd
    poor = bbvi.fit(_correlated(), family="meanfield", estimator="stl", steps=2000, dtype=torch.float64, diagnose=False)
    with pytest.raises(bbvi.FitError, match="k-hat"):
        importance_resample(poor, 1000)


def test_plots_write_non_empty_pngs(tmp_path, nn_reference):
    from bbvi import plots
    model, _, ref, _ = nn_reference
    fit = bbvi.fit(model, steps=300, diagnose=False)
    for name, call in [("elbo", lambda p: plots.plot_elbo(fit, path=p)),
                       ("marginals", lambda p: plots.plot_marginals(fit, ref, path=p)),
                       ("pair", lambda p: plots.plot_pair(fit, ref, path=p)),
                       ("gradvar", lambda p: plots.plot_gradient_variance({"a": 1.0, "b": 0.1}, path=p))]:
        path = tmp_path / f"{name}.png"
        fig = call(str(path))
        assert fig.axes and path.stat().st_size > 5000
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::bbvi.errors.ReliabilityWarning")   # the demo shows users the warning on purpose
def test_demo_quick_runs_and_writes_its_outputs(tmp_path, monkeypatch):
    from bbvi.__main__ import main
    monkeypatch.setenv("BBVI_CACHE", str(tmp_path / "cache"))
    main(["demo", "--out", str(tmp_path / "out"), "--quick"])
    for f in ("summary.md", "elbo.png", "marginals.png", "pair.png", "gradient_variance.png"):
        assert (tmp_path / "out" / f).stat().st_size > 500
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "k-hat" in text and "score + LOO" in text


def test_compare_reports_the_summarys_khat_and_says_where_it_is_from():
    """A Pyro user's daily work, 6: the summary and bbvi.compare reported two different k-hats for the same fit (the
    end-of-fit check's and a second estimate from other draws). compare now reports the check's, labelled; a fit
    without a check gets its own estimate, labelled with its draws."""
    from models import posteriordb
    name = "kidiq-kidscore_momhs"
    fit = bbvi.fit(posteriordb.load(name), seed=0)
    table = bbvi.compare(fit, posteriordb.reference(name))
    assert table.attrs["khat"] == fit.reliability["khat"]
    assert f"k-hat {fit.reliability['khat']:.2f} (the end-of-fit check's, 4000 draws)" in table.attrs["verdict"]
    unchecked = bbvi.fit(posteriordb.load(name), seed=0, diagnose=False)
    assert "(4000 draws of q, seed 0)" in bbvi.compare(unchecked, posteriordb.reference(name)).attrs["verdict"]
