"""Right by default: `bbvi.fit(model)` with no tuning picks the start, the step size and when to stop, and ends
with a reliability check that warns (bbvi.ReliabilityWarning) when the fit should not be trusted."""
import warnings

import pytest
import torch
from torch.distributions import Normal

import bbvi
from bbvi.convergence import split_rhat
from fitcheck import assert_same_fit
from models import posteriordb
from models.conjugate import gamma_poisson, normal_normal


def _fit_recording(model, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = bbvi.fit(model, **kw)
    return fit, [str(w.message) for w in caught if issubclass(w.category, bbvi.ReliabilityWarning)]


def test_default_fit_of_a_gaussian_posterior_is_batch_and_match_right_and_quiet():
    """Normal-Normal with no options: method='auto' runs batch and match (continuous, differentiable), 50 steps of
    32 particles from the Laplace start, right (Monte Carlo error of 1e5 draws: 0.003 sd) and without a warning."""
    model, exact = normal_normal()
    fit, warned = _fit_recording(model, seed=0)
    assert fit.settings["method"].startswith("bam (method='auto'") and fit.status == "completed"
    assert fit.num_steps == 50 and fit.num_fit_evals == fit.start.num_evals + 32 * 50
    assert fit.num_gradient_evals == fit.num_fit_evals + 4000 + fit.reliability["mode_search_evals"]
    mean, sd = exact["mu"]
    draws = fit.sample(100_000)["mu"]
    assert abs(draws.mean().item() - mean) < 0.05 * sd and abs(draws.std().item() / sd - 1) < 0.05
    assert warned == [] and fit.reliability["warnings"] == [] and fit.reliability["num_draws"] == 4000


def test_sgd_fit_of_a_gaussian_posterior_stops_soon_and_does_not_warn():
    """Normal-Normal, the stochastic-gradient fit (method='sgd'): the Laplace start is already the posterior; the
    first level's average hardly moves, so the rule stops after one or two short levels (seen: 450 steps)."""
    model, exact = normal_normal()
    fit, warned = _fit_recording(model, seed=0, method="sgd")
    assert fit.status == "converged" and fit.num_steps <= 1000
    assert fit.settings["start"] == "map" and fit.settings["dtype"] == "torch.float64"
    mean, sd = exact["mu"]
    draws = fit.sample(100_000)["mu"]
    assert abs(draws.mean().item() - mean) < 0.05 * sd and abs(draws.std().item() / sd - 1) < 0.05
    assert warned == [] and fit.reliability["khat"] < 0.5 and fit.reliability["warnings"] == []
    assert fit.num_fit_evals == fit.start.num_evals + 16 * fit.num_steps
    assert "no reliability warnings" in fit.summary()


def test_sgd_fit_converges_on_its_own_to_a_skewed_posterior():
    """Gamma-Poisson (posterior Gamma(34, 11)), method='sgd': adaptive steps and the averaged q reach the mean within 0.1 sd
    and the sd within 10% (MC error of 1e5 draws: 0.003 sd)."""
    model, exact = gamma_poisson()
    fit = bbvi.fit(model, seed=0, diagnose=False, method="sgd")
    assert fit.status == "converged" and fit.levels[-1]["change"] < 0.05
    mean, sd = exact["lam"]
    draws = fit.sample(100_000)["lam"]
    assert abs(draws.mean().item() - mean) < 0.1 * sd
    assert abs(draws.std().item() / sd - 1) < 0.1


def test_mean_field_fit_of_a_concentrated_posterior_gets_the_means_and_warns_about_the_sds():
    """sblrc-blr (posterior sds ~5e-4, correlated), the stochastic-gradient mean-field fit: the old defaults were 23
    sd off in silence. Seen: max |mean error| 0.025 sd, mean-field sds as low as 0.47x the reference's; k-hat 0.72
    and importance sampling cannot see the shortfall, but the MAP start's Hessian puts the mean-field limit at 0.48
    for beta[4]: warned as the family's limit."""
    name = "sblrc-blr"
    fit, warned = _fit_recording(posteriordb.load(name), seed=0, method="sgd")
    table = bbvi.compare(fit, posteriordb.reference(name))
    assert fit.status == "converged"
    assert table["mean_err_sd"].abs().max() < 0.1
    label, ratio = fit.start.mean_field_sd
    assert 0.4 < ratio < 0.55 and table["sd_ratio"].min() < 0.55
    assert len(warned) == 1 and "factorised q" in warned[0] and "family='fullrank'" in warned[0]
    assert "WARNING: q is MeanField" in fit.summary()


def test_default_fit_of_the_concentrated_posterior_is_right_in_means_and_sds():
    """sblrc-blr with no options: batch and match, a full covariance: every mean within 0.1 sd and every sd within
    20% of the reference (seen: 0.030 sd, sd ratios 0.94-1.0), no warning, in under 2000 gradient evaluations."""
    name = "sblrc-blr"
    fit, warned = _fit_recording(posteriordb.load(name), seed=0)
    table = bbvi.compare(fit, posteriordb.reference(name))
    assert table["mean_err_sd"].abs().max() < 0.1 and (table["sd_ratio"] - 1).abs().max() < 0.2
    assert warned == [] and fit.num_fit_evals < 2000 and fit.num_gradient_evals < 12000


def test_a_posterior_with_no_mode_falls_back_to_the_zero_start_and_says_so():
    """The centered eight schools is a funnel: L-BFGS runs down the funnel's neck; 'auto' falls back to the
    zero start and the warning names the missing mode."""
    from models.eight_schools import centered
    fit, warned = _fit_recording(centered, seed=0, max_steps=400)
    assert fit.settings["start"] == "zero" and fit.start.no_mode
    assert fit.status == "max_steps"
    assert len(warned) == 1 and "no proper mode" in warned[0] and "did not converge" in warned[0]
    with pytest.raises(bbvi.ConfigError, match="mode"):
        bbvi.fit(centered, init_strategy="map", steps=1)


def test_a_log_joint_bbvi_cannot_differentiate_starts_at_zero_with_a_note():
    model = bbvi.Model(lambda z, x: torch.as_tensor(-0.5 * (z["mu"].detach().numpy() - 1.0) ** 2),
                       {"mu": bbvi.Latent()}, name="numpy")
    fit, warned = _fit_recording(model, seed=0, max_steps=3000)
    assert fit.settings["start"] == "zero" and "cannot differentiate" in fit.start.note
    assert fit.status == "converged"
    draws = fit.sample(20_000)["mu"]
    assert abs(draws.mean().item() - 1.0) < 0.1 and abs(draws.std().item() - 1.0) < 0.1
    assert warned == []


def _cholesky_model():
    """z ~ N(0, I_2), plus log N(0 | 0, [[1, r], [r, 1]]) with r = tanh-free z[0] / 3: the Cholesky raises
    for |r| >= 1, i.e. for the particles with |z0| >= 3 that q draws now and then."""
    def log_joint(z, data):
        x = z["x"]
        r = x[:, 0] / 3
        one = torch.ones_like(r)
        cov = torch.stack([torch.stack([one, r], -1), torch.stack([r, one], -1)], -2)
        L = torch.linalg.cholesky(cov)
        return Normal(0.0, 1.0).log_prob(x).sum(-1) - torch.log(L.diagonal(dim1=-2, dim2=-1)).sum(-1)
    return bbvi.Model(log_joint, {"x": bbvi.Latent(shape=(2,))}, name="cholesky")


def test_a_particle_whose_cholesky_fails_is_a_bad_particle_not_a_crash():
    model = _cholesky_model()
    fit = bbvi.fit(model, steps=300, seed=0, diagnose=False, init_strategy="zero",
                   family=bbvi.MeanField(init_scale=1.0), estimator="score")
    assert fit.num_bad_particles > 0 and fit.num_raised_steps > 0
    assert "LinAlgError" in fit.last_exception
    assert all(torch.isfinite(t).all() for t in fit.params["continuous"].values())


def test_a_log_joint_that_always_raises_mid_fit_ends_in_a_fit_error_naming_the_exception():
    calls = []

    def log_joint(z, data):
        calls.append(1)
        if len(calls) > 3:
            raise ValueError("Expected parameter loc to satisfy the constraint Real()")
        return Normal(0.0, 1.0).log_prob(z["x"])
    model = bbvi.Model(log_joint, {"x": bbvi.Latent()}, name="raises")
    with pytest.raises(bbvi.FitError, match="ValueError") as info:
        bbvi.fit(model, steps=50, seed=0, init_strategy="zero", max_consecutive_failures=5)
    assert info.value.result is not None


def test_split_rhat_reads_stationary_noise_as_one_and_a_trend_as_not():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    assert (split_rhat(noise) < 1.01).all()
    trend = noise + torch.linspace(0, 3, 4000, dtype=torch.float64)[:, None]
    assert (split_rhat(trend) > 1.1).all()
    assert split_rhat(torch.ones(100, 2, dtype=torch.float64)).eq(1).all()   # coordinates that never move


def test_adaptive_options_and_their_errors():
    model, _ = normal_normal()
    with pytest.raises(bbvi.ConfigError, match="needs a step count"):
        bbvi.fit(model, schedule="cosine")
    with pytest.raises(bbvi.ConfigError, match="tol_rel_obj"):
        bbvi.fit(model, tol_rel_obj=0.01)
    with pytest.raises(bbvi.ConfigError, match="max_steps caps"):
        bbvi.fit(model, steps=10, max_steps=100)
    with pytest.raises(bbvi.ConfigError, match="decay"):
        bbvi.Adaptive(decay=1.5)
    with pytest.raises(bbvi.ConfigError, match="bbvi.Model"):
        bbvi.fit(lambda z, d: z["x"])
    fit = bbvi.fit(model, schedule=bbvi.Adaptive(tol=1e-12, max_level_steps=300), steps=700, seed=0,
                   diagnose=False)
    assert fit.status == "max_steps" and fit.num_steps == 700
    assert [lev["lr"] for lev in fit.levels] == [0.05, 0.025, 0.0125]   # the last, 100 steps, cut short by the cap
    fixed = bbvi.fit(model, steps=100, seed=0)
    assert fixed.status == "completed" and fixed.levels == []


def test_adaptive_fit_resumes_from_a_checkpoint_bit_for_bit(tmp_path):
    model, _ = gamma_poisson()
    kw = dict(seed=3, diagnose=False, max_steps=1500)
    full = bbvi.fit(model, **kw)
    path = str(tmp_path / "ck.pt")
    part = bbvi.fit(model, **kw, checkpoint=path, checkpoint_every=50, callbacks=[lambda s: s.step == 275])
    assert part.num_steps == 275
    resumed = bbvi.fit(model, **kw, resume=path)
    assert_same_fit(full, resumed)
    assert resumed.status == full.status and resumed.levels == full.levels


def test_many_bad_particles_are_warned_about():
    """Every log-joint value is NaN for 30% of the particles (at random): the fit goes on and says so."""
    g = torch.Generator().manual_seed(1)
    calls = []

    def log_joint(z, data):
        calls.append(1)
        lp = Normal(0.0, 1.0).log_prob(z["x"])
        bad = (torch.rand(lp.shape, generator=g, dtype=lp.dtype) < 0.3) & (len(calls) > 1)
        return torch.where(bad, torch.full_like(lp, float("nan")), lp)
    model = bbvi.Model(log_joint, {"x": bbvi.Latent()}, name="nan30")
    fit, warned = _fit_recording(model, steps=200, seed=0)
    assert fit.num_bad_particles > 0.2 * 200 * 16
    assert any("NaN/inf log-joint" in w for w in warned)


def test_a_users_own_loop_over_step_gets_the_adaptive_rules_levels_and_stop():
    """`step` runs the adaptive rule's look at each step (its levels, averaging and stop), so
    `while not state.stop: bbvi.step(state)` is the default fit, bit for bit: the same ELBO trace, parameters and
    levels as bbvi.fit's own loop (diagnose=False: the end-of-fit check is the driver's, not the loop's)."""
    model, _ = gamma_poisson()
    fit = bbvi.fit(model, seed=0, diagnose=False, method="sgd")
    state = bbvi.init(model, seed=0)
    while not state.stop:
        bbvi.step(state)
    assert state.tracker.converged and fit.status == "converged" and state.step == fit.num_steps
    assert torch.equal(torch.stack(state.elbo), fit.elbo)
    for name, value in fit.params["continuous"].items():
        assert torch.equal(state.params["continuous"][name].detach(), value)
    assert state.tracker.report() == fit.levels and len(fit.levels) >= 2
    capped = bbvi.init(model, seed=0, max_steps=120)   # the stop at max_steps, too
    while not capped.stop:
        bbvi.step(capped)
    assert capped.step == 120 and not capped.tracker.converged
