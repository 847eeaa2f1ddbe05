"""Checkpoints and exact resume (also after SIGKILL), saved results, fuzzed arguments, overflow."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import arviz as az
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributions import Normal, constraints

import bbvi
from models.conjugate import gamma_poisson

HERE = os.path.dirname(os.path.abspath(__file__))


def assert_same_fit(a, b):
    assert torch.equal(a.elbo, b.elbo)
    for g in a.params:
        for k in a.params[g]:
            assert torch.equal(a.params[g][k], b.params[g][k]), (g, k)
    assert a.num_steps == b.num_steps and a.num_failed_steps == b.num_failed_steps


@pytest.mark.parametrize("estimator,baseline", [("score", "ema"), ("score", "cv"), ("reparam", "default")])
def test_resume_from_a_checkpoint_gives_the_uninterrupted_fit(tmp_path, estimator, baseline):
    model, _ = gamma_poisson()
    kw = dict(estimator=estimator, baseline=baseline, steps=300, seed=5, tol_rel_obj=1e-9, check_every=50)
    full = bbvi.fit(model, **kw)
    path = str(tmp_path / "ck.pt")
    part = bbvi.fit(model, **kw, checkpoint=path, checkpoint_every=40,
                    callbacks=[lambda s: s.step == 130])
    assert part.status == "stopped by callback" and part.num_steps == 130
    resumed = bbvi.fit(model, **kw, resume=path)
    assert_same_fit(full, resumed)


def test_resume_checks_that_model_and_settings_match(tmp_path):
    model, _ = gamma_poisson()
    path = str(tmp_path / "ck.pt")
    bbvi.fit(model, steps=20, checkpoint=path)
    with pytest.raises(bbvi.ConfigError, match="other settings.*lr"):
        bbvi.fit(model, steps=20, lr=0.1, resume=path)
    other = bbvi.Model(lambda z, d: Normal(0.0, 1.0).log_prob(z["x"]), {"x": bbvi.Latent()}, name="other")
    with pytest.raises(bbvi.ConfigError, match="saved for model 'gamma_poisson'"):
        bbvi.fit(other, steps=20, resume=path)
    with pytest.raises(bbvi.ConfigError, match="plan"):
        bbvi.fit(model, steps=20, estimator="reparam", resume=path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(bbvi.ConfigError, match="not a readable bbvi checkpoint"):
        bbvi.fit(model, steps=20, resume=str(tmp_path / "junk.pt"))
    with pytest.raises(bbvi.ConfigError, match="no checkpoint file"):
        bbvi.fit(model, steps=20, resume=str(tmp_path / "missing.pt"))


def test_a_killed_fit_resumes_to_the_uninterrupted_result(tmp_path):
    """A subprocess fits with checkpoints and is killed with SIGKILL mid-fit; resuming here from its last
    checkpoint reproduces the uninterrupted fit bit for bit."""
    path = tmp_path / "ck.pt"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {HERE!r})
        import torch, bbvi
        from models.conjugate import gamma_poisson
        torch.set_num_threads(1)
        model, _ = gamma_poisson()
        bbvi.fit(model, steps=3000, seed=9, checkpoint={str(path)!r}, checkpoint_every=100,
                 callbacks=[lambda s: time.sleep(0.002)])
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(path, weights_only=True)
    assert 0 < saved["step"] < 3000, "the fit must have been killed mid-way"
    model, _ = gamma_poisson()
    resumed = bbvi.fit(model, steps=3000, seed=9, resume=str(path))
    full = bbvi.fit(model, steps=3000, seed=9)
    assert_same_fit(full, resumed)


def test_ctrl_c_writes_a_checkpoint_too(tmp_path):
    model, _ = gamma_poisson()
    path = str(tmp_path / "ck.pt")

    def interrupt(state):
        if state.step == 77:
            raise KeyboardInterrupt
    fit = bbvi.fit(model, steps=200, checkpoint=path, checkpoint_every=1000, callbacks=[interrupt])
    assert fit.interrupted and torch.load(path, weights_only=True)["step"] == 77
    assert_same_fit(bbvi.fit(model, steps=200), bbvi.fit(model, steps=200, resume=path))


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


def test_transforms_never_overflow():
    model = bbvi.Model(lambda z, d: -z["lam"] - z["p"], {"lam": bbvi.Latent(support=constraints.positive),
                                                        "p": bbvi.Latent(support=constraints.unit_interval)})
    for dtype in (torch.float32, torch.float64):
        u = torch.tensor([[1e4, -1e4], [-1e4, 1e4], [700.0, 90.0]], dtype=dtype)
        z, ladj = model.constrain(u)
        assert torch.isfinite(z["lam"]).all() and torch.isfinite(ladj).all()
        assert torch.isfinite(model.log_density(u)).all()


def test_a_start_wide_enough_to_overflow_is_survived():
    """q starts at scale 60, so exp(u) would overflow float32 for many particles and the first gradients are
    ~1e34. What is guaranteed: no particle's transform overflows, the parameters stay finite, steps whose
    gradient would overflow Adam's statistics are rescaled (counted, not a silent freeze), and q moves toward
    the posterior. Not guaranteed: convergence in 3000 steps (Adam remembers the huge early gradients)."""
    model, exact = gamma_poisson()
    for estimator in ("score", "reparam"):
        fit = bbvi.fit(model, family=bbvi.MeanField(init_scale=60.0), estimator=estimator, steps=300,
                       dtype=torch.float32)
        pc = fit.params["continuous"]
        assert fit.num_bad_particles == 0 and fit.num_rescaled_steps > 0
        assert all(torch.isfinite(t).all() for t in pc.values())
        assert pc["log_scale"].item() < np.log(60.0) - 1.0 and pc["loc"].item() < -1.0


# ---- fuzzing: every input fits or raises one of bbvi's own errors ------------------------------------------
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
                       steps=min(steps, 5) if isinstance(steps, int) and not isinstance(steps, bool) else steps,
                       lr=lr, seed=seed, dtype=torch.float64)
    except bbvi.BBVIError:
        return
    draws = fit.sample(4)["x"]
    assert draws.shape == (4,) + latent.shape
