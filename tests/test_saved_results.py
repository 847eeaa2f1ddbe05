"""Reliability, part 5: saved results and ArviZ output round-trip."""

import warnings

import arviz as az
import numpy as np
import pytest
import torch
from torch.distributions import Normal, constraints

import bbvi
from fitcheck import assert_same_fit
from models.conjugate import gamma_poisson
from targets import std2, two_latents


def test_saved_results_round_trip(tmp_path):
    model = bbvi.Model(lambda z, d: Normal(0.0, 1.0).log_prob(z["w"]).sum(-1) + 2.0 * z["s"].sum(-1),
                       {"w": bbvi.Latent(shape=(3,)), "s": bbvi.Latent(shape=(2,), support=constraints.boolean)},
                       name="saved")
    for family in ["meanfield", "fullrank", bbvi.LowRank(rank=2)]:
        fit = bbvi.fit(model, family=family, estimator="auto", baseline="ema", steps=150, dtype=torch.float64)
        path = str(tmp_path / "fit.pt")
        fit.save(path)
        back = bbvi.load(path, model)
        assert_same_fit(fit, back)
        assert back.status == fit.status and back.settings == {k: str(v) for k, v in fit.settings.items()}
        for k, v in fit.sample(100, seed=3).items():
            assert torch.equal(v, back.sample(100, seed=3)[k])
        assert torch.equal(fit.gradient_samples(3, seed=1), back.gradient_samples(3, seed=1))
    other = bbvi.Model(model.log_joint, {"w": bbvi.Latent(shape=(4,)), "s": model.latents["s"]}, name="saved")
    with pytest.raises(bbvi.ConfigError, match="latents"):
        bbvi.load(path, other)

def test_to_arviz_round_trips_through_netcdf(tmp_path):
    model, _ = gamma_poisson()
    idata = bbvi.fit(model, steps=50).to_arviz(num_draws=200)
    path = str(tmp_path / "fit.nc")
    idata.to_netcdf(path)
    back = az.from_netcdf(path)
    np.testing.assert_array_equal(back.posterior["lam"].values, idata.posterior["lam"].values)
    assert back.posterior.attrs["estimator"] == idata.posterior.attrs["estimator"]


# ---- #10: load with another family ----------------------------------------------------------------------------
def test_load_with_other_family_is_config_error(tmp_path):
    """Before: bbvi.load(fullrank_file, model, family='meanfield') loaded, and the first fit.sample raised a raw
    KeyError 'log_scale' (LowRank(rank=1): KeyError 'cov_factor')."""
    model = std2()
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


def test_a_reordered_latents_dict_is_refused_on_load_and_a_renamed_model_is_accepted(tmp_path):
    """Before: the signature compared dicts, ignoring order: a's mean came back as b's (-3 for +3)."""
    fit = bbvi.fit(two_latents(), steps=300, seed=0, diagnose=False)
    path = tmp_path / "q.pt"
    fit.save(path)
    with pytest.raises(bbvi.ConfigError, match=r"order \['a', 'b'\].*order \['b', 'a'\]"):
        bbvi.load(path, two_latents(order=("b", "a")))
    back = bbvi.load(path, two_latents(name="renamed")).sample(2000)
    assert abs(float(back["a"].mean()) - 3.0) < 0.2 and abs(float(back["b"].mean()) + 3.0) < 0.2
