"""The algorithm seam (bbvi.algorithms): fit(method=...) drives any object with init and step; 'laplace' is the
MAP/Laplace start as an algorithm of no steps; the default 'sgd' is bbvi.init / bbvi.step."""
import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

import bbvi
from bbvi.algorithms import fallback, sgd
from bbvi.record import Info

F64 = torch.float64
MEAN = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
COV = torch.tensor([[1.0, 0.8, 0.1], [0.8, 2.0, -0.3], [0.1, -0.3, 0.5]], dtype=F64)


def _gaussian():
    def log_joint(z, data):
        return MultivariateNormal(MEAN, COV).log_prob(z["x"])
    return bbvi.Model(log_joint, {"x": bbvi.Latent(shape=(3,))}, name="mvn")


def test_laplace_of_a_gaussian_is_the_gaussian_in_no_step():
    """The MAP of N(m, C) is m and the inverse Hessian there is C: q equals the posterior to the L-BFGS tolerance,
    with no step, at the start's cost only, and the end-of-fit check finds nothing to warn about."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", bbvi.ReliabilityWarning)
        fit = bbvi.fit(_gaussian(), method="laplace", seed=0)
    assert fit.status == "completed" and fit.num_steps == 0 and len(fit.elbo) == 0
    assert fit.settings["method"] == "laplace" and fit.settings["family"].startswith("FullRank")
    assert fit.num_fit_evals == fit.start.num_evals > 0
    assert fit.num_gradient_evals == fit.num_fit_evals + fit.reliability["num_draws"] + fit.reliability["mode_search_evals"]
    assert torch.allclose(fit.unconstrained_mean(), MEAN, atol=1e-5)
    assert torch.allclose(fit.unconstrained_covariance(), COV, atol=1e-6)
    assert fit.reliability["khat"] < 0.5


def test_laplace_refuses_what_it_has_no_use_for():
    for kw, said in [(dict(lr=0.1), "takes no lr=0.1"), (dict(estimator="score"), "takes no estimator='score'"),
                     (dict(steps=100), "takes no steps=100"), (dict(family="meanfield"), "family='fullrank'"),
                     (dict(compile=True), "compile=True compiles the stochastic-gradient step")]:
        with pytest.raises(bbvi.ConfigError, match=said):
            bbvi.fit(_gaussian(), method="laplace", **kw)
    with pytest.raises(bbvi.ConfigError, match="method must be one of"):
        bbvi.fit(_gaussian(), method="newton")


def test_laplace_needs_a_mode_and_says_why():
    """A model with a discrete latent is refused, saying why; on a funnel the Laplace approximation sits at the mode
    (v = -22.5, where the density's width has collapsed) and the end-of-fit check warns: never a silent answer."""
    from torch.distributions import Bernoulli, constraints

    def log_joint(z, data):
        return Normal(0.0, 1.0).log_prob(z["m"]) + Bernoulli(0.3).log_prob(z["k"])
    model = bbvi.Model(log_joint, {"m": bbvi.Latent(), "k": bbvi.Latent(support=constraints.boolean)}, name="mixed")
    with pytest.raises(bbvi.ConfigError, match=r"\['k'\] of model 'mixed' are discrete"):
        bbvi.fit(model, method="laplace")

    def funnel(z, data):
        return Normal(0.0, 3.0).log_prob(z["v"]) + Normal(0.0, (z["v"] / 2).exp()[:, None]).log_prob(z["x"]).sum(-1)
    model = bbvi.Model(funnel, {"v": bbvi.Latent(), "x": bbvi.Latent(shape=(5,))}, name="funnel")
    with pytest.warns(bbvi.ReliabilityWarning, match="k-hat"):
        fit = bbvi.fit(model, method="laplace")
    assert fit.unconstrained_mean()[0].item() == pytest.approx(-22.5, abs=1e-3)


class _HalfwayToTheMean:
    """A toy algorithm of its own (not built in): q's location moves halfway to MEAN each step, for 3 steps."""

    name = "halfway"

    def init(self, model, family, estimator, baseline, **options):
        state = sgd.init(model, "fullrank", steps=0, init_strategy="zero", seed=options["seed"])
        return state

    def step(self, state):
        loc = state.params["continuous"]["loc"]
        with torch.no_grad():
            loc.add_(0.5 * (MEAN - loc))
        value = -(loc - MEAN).square().sum()
        state.record.add(Info(elbo=value, ok=True))
        state.step += 1
        state.stop = state.step == 3
        return value


def test_fit_drives_an_algorithm_of_ones_own_with_callbacks_and_the_record():
    seen = []
    fit = bbvi.fit(_gaussian(), method=_HalfwayToTheMean(), callbacks=[lambda s: seen.append(s.step) or False],
                   diagnose=False)
    assert fit.num_steps == 3 and seen == [1, 2, 3] and fit.settings["method"] == "halfway"
    assert torch.allclose(fit.unconstrained_mean(), MEAN * (1 - 0.5 ** 3))
    assert fit.elbo.shape == (3,) and fit.num_failed_steps == 0


def test_the_default_method_is_bbvi_init_and_step():
    assert bbvi.init is sgd.init and bbvi.step is sgd.step
    a = bbvi.fit(_gaussian(), steps=50, seed=3, diagnose=False)
    b = bbvi.fit(_gaussian(), steps=50, seed=3, diagnose=False, method="sgd")
    assert torch.equal(a.elbo, b.elbo) and "method" not in a.settings


def test_batch_and_match_lands_on_a_gaussian_target():
    """For a Gaussian target the scores are linear and B = 32 > D = 3: from the zero start the updates converge
    geometrically to the target itself (measured: 1e-5 after 5 steps, 4e-11 after 10)."""
    fit = bbvi.fit(_gaussian(), method="bam", steps=10, seed=0, init_strategy="zero", diagnose=False)
    assert fit.num_steps == 10 and fit.num_gradient_evals == 10 * 32 and fit.settings["method"] == "bam"
    assert torch.allclose(fit.unconstrained_mean(), MEAN, atol=1e-8)
    assert torch.allclose(fit.unconstrained_covariance(), COV, atol=1e-8)
    assert fit.num_failed_steps == 0 and torch.isfinite(fit.elbo).all()


def test_batch_and_match_defaults_on_a_posteriordb_posterior():
    """kidiq-kidscore_momhs at the defaults (MAP start, 50 steps of 32): every mean within 0.1 reference sd and every
    sd within 20% (measured: 0.031 sd, sd ratio 1.004; 4000 draws put 0.016 sd of Monte Carlo error on a mean), in
    about 1,700 gradient evaluations (the default stochastic-gradient fit spends tens of thousands)."""
    import sys
    import os
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    from yardstick import errors
    from models import posteriordb
    name = "kidiq-kidscore_momhs"
    fit = bbvi.fit(posteriordb.load(name), method="bam", seed=0)
    assert fit.num_steps == 50 and fit.num_fit_evals < 2000
    err, ratio, field, ours = errors(fit.sample(4000, seed=1), posteriordb.reference(name))
    assert ours and err < 0.1, (err, ratio)


def test_batch_and_match_refuses_what_it_cannot_fit():
    import numpy as np
    from torch.distributions import Bernoulli, constraints

    for kw, said in [(dict(lr=0.1), "takes no lr=0.1"), (dict(family="meanfield"), "family='fullrank'"),
                     (dict(num_particles=1), "at least 2 particles")]:
        with pytest.raises(bbvi.ConfigError, match=said):
            bbvi.fit(_gaussian(), method="bam", **kw)

    def mixed(z, data):
        return Normal(0.0, 1.0).log_prob(z["m"]) + Bernoulli(0.3).log_prob(z["k"])
    model = bbvi.Model(mixed, {"m": bbvi.Latent(), "k": bbvi.Latent(support=constraints.boolean)}, name="mixed")
    with pytest.raises(bbvi.ConfigError, match="discrete"):
        bbvi.fit(model, method="bam")

    def numpy_log_joint(z, data):   # values only: torch cannot differentiate it
        x = z["x"].detach().numpy()
        return torch.as_tensor(-0.5 * (x ** 2).sum(-1) + np.cos(x).sum(-1))
    model = bbvi.Model(numpy_log_joint, {"x": bbvi.Latent(shape=(2,))}, name="numpy")
    with pytest.raises(bbvi.ConfigError, match="needs the scores"):
        bbvi.fit(model, method="bam")


def test_batch_and_match_skips_a_batch_it_cannot_use_and_counts_it():
    """A log-joint that is NaN on half the line: particles there are left out and counted; the fit goes on."""
    def log_joint(z, data):
        x = z["x"]
        return torch.where(x[:, 0] > 3.0, torch.full_like(x[:, 0], float("nan")), Normal(0.0, 1.0).log_prob(x).sum(-1))
    model = bbvi.Model(log_joint, {"x": bbvi.Latent(shape=(2,))}, name="holes")
    fit = bbvi.fit(model, method="bam", steps=20, seed=0, init_strategy="zero", diagnose=False,
                   init_values={"x": torch.tensor([3.0, 0.0])})
    assert fit.num_bad_particles > 0 and fit.num_steps == 20
    assert fit.unconstrained_mean().abs().max() < 0.2


def test_a_checkpoint_of_the_stochastic_gradient_default_resumes_under_method_auto(tmp_path):
    """Checkpoints written before method='auto' became the default hold no 'method' setting: resuming one with the
    same call (no method=) runs the stochastic-gradient fit it was, bit for bit, not batch and match."""
    from fitcheck import assert_same_fit
    model, path = _gaussian(), tmp_path / "ck.pt"
    want = bbvi.fit(model, method="sgd", seed=0, diagnose=False)
    bbvi.fit(model, method="sgd", seed=0, diagnose=False, checkpoint=path, callbacks=[lambda s: s.step == 120])
    resumed = bbvi.fit(model, seed=0, diagnose=False, resume=path)
    assert "method" not in resumed.settings and resumed.levels == want.levels
    assert_same_fit(want, resumed)


def test_a_batch_and_match_fit_checkpoints_and_resumes_bit_for_bit(tmp_path):
    """The default (batch and match here) through the loop's checkpoint: stopped at step 20 of 50 and resumed, the
    same q as the uninterrupted fit (its generator, step and the averaging sums are in the checkpoint)."""
    model, path = _gaussian(), tmp_path / "bam.pt"
    want = bbvi.fit(model, seed=0, diagnose=False)
    bbvi.fit(model, seed=0, diagnose=False, checkpoint=path, callbacks=[lambda s: s.step == 20])
    resumed = bbvi.fit(model, seed=0, diagnose=False, resume=path)
    assert resumed.settings["method"].startswith("bam") and resumed.num_steps == 50
    assert torch.equal(resumed.elbo, want.elbo)
    for name, value in want.params["continuous"].items():
        assert torch.equal(resumed.params["continuous"][name], value)
    bbvi.fit(model, seed=0, diagnose=False, checkpoint=path)   # a finished fit's checkpoint, resumed: nothing to run
    again = bbvi.fit(model, seed=0, diagnose=False, resume=path)
    assert again.num_steps == 50 and torch.equal(again.params["continuous"]["loc"], want.params["continuous"]["loc"])


# ---- method='auto' past the Gaussian (bbvi.algorithms.fallback) ------------------------------------------------
def _skewed(w, m2, s2):
    """1-D mixture (1 - w) N(0, 1) + w N(m2, s2^2): unimodal and skewed for the values used here; its mean and sd."""
    import math

    def log_joint(z, data):
        x = z["x"]
        return torch.logaddexp(Normal(0.0, 1.0).log_prob(x) + math.log(1 - w),
                               Normal(m2, s2).log_prob(x) + math.log(w))
    mean = w * m2
    sd = ((1 - w) + w * (s2 ** 2 + m2 ** 2) - mean ** 2) ** 0.5
    return bbvi.Model(log_joint, {"x": bbvi.Latent(shape=())}, name="skewed"), mean, sd


def test_auto_looks_closer_then_goes_on_to_a_flow_where_the_gaussian_is_off():
    """0.7 N(0, 1) + 0.3 N(2, 1.5^2): batch and match's Gaussian is 0.11 sd off in its mean (exact: q's own mean),
    its k-hat 0.72 just above the threshold while importance sampling moves nothing at its 4000 draws: inconclusive.
    method='auto' looks again with 64000 draws (values only), where the mean moves by more than 0.1 of q's sd (seen:
    0.14), and goes on to a flow started at that Gaussian; the flow's check passes, so the flow is returned, quietly,
    within 0.1 sd (measured 0.045; 20000 draws put about 0.01 sd of Monte Carlo error on the mean), with the
    Gaussian in fit.tried and its cost, both looks included, in num_gradient_evals."""
    import warnings
    model, mean, sd = _skewed(0.3, 2.0, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", bbvi.ReliabilityWarning)
        fit = bbvi.fit(model, seed=0)
    assert isinstance(fit.family, bbvi.Flow) and "returned: the flow, its check passed" in fit.settings["method"]
    gaussian = fit.tried[0]["result"]
    assert isinstance(gaussian.family, bbvi.FullRank) and fit.tried[0]["method"] == "bam"
    assert abs(gaussian.unconstrained_mean().item() - mean) / sd > 0.1
    g = gaussian.reliability
    assert g["num_draws"] == fallback.LOOK_CLOSER_DRAWS and g["earlier_draws"] == 4000
    assert "importance sampling moves the mean of x" in g["warnings"][0]
    assert any("looked again with 64000 draws: see the warnings" in n for n in g["notes"])
    x = fit.sample(20000, seed=1)["x"]
    assert abs(x.mean().item() - mean) / sd < 0.1 and abs(x.std().item() / sd - 1) < 0.2
    assert not fit.reliability["warnings"] and any("Gaussian was warned (importance sampling moves the mean of x"
                                                   in n for n in fit.reliability["notes"])
    assert gaussian.num_check_evals == 4000 + 64000 + g["mode_search_evals"]
    assert fit.num_gradient_evals == fit.num_fit_evals + fit.num_check_evals + gaussian.num_gradient_evals
    assert fit.num_fit_evals == fit.num_steps * 64 and fit.num_steps <= fallback.BUDGET_STEPS


def test_auto_looks_closer_and_runs_no_flow_where_the_gaussian_is_right():
    """Eight schools noncentered: batch and match's Gaussian is right (0.053 sd, sds within 20% of posteriordb's
    reference) but its k-hat is 0.78 at 4000 draws with nothing moved. Looking again at 64000 draws moves nothing
    either: no warning, no flow (a flow there ran 1000-2000 steps and did not converge), a note that says so, and the
    check's cost counted with both looks."""
    import warnings

    from models import posteriordb
    with warnings.catch_warnings():
        warnings.simplefilter("error", bbvi.ReliabilityWarning)
        fit = bbvi.fit(posteriordb.load("eight_schools-eight_schools_noncentered"), seed=0)
    r = fit.reliability
    assert isinstance(fit.family, bbvi.FullRank) and not fit.tried and not r["warnings"]
    assert r["num_draws"] == fallback.LOOK_CLOSER_DRAWS and r["earlier_draws"] >= 4000
    assert any("looked again with 64000 draws: importance sampling moves nothing" in n for n in r["notes"])
    assert fit.num_check_evals == r["num_draws"] + r["earlier_draws"] + r["mode_search_evals"]


def test_auto_keeps_the_warned_gaussian_when_the_flow_after_it_fails():
    """A flow that raises (here a callback that fails on it) loses nothing: the Gaussian is returned with its
    warning, which says what happened to the flow, as does the method's record."""
    model, _, _ = _skewed(0.3, 2.0, 1.5)

    def fails_on_a_flow(state):
        if isinstance(state.family, bbvi.Flow):
            raise RuntimeError("no flows here")
        return False
    with pytest.warns(bbvi.ReliabilityWarning, match="no flows here"):
        fit = bbvi.fit(model, seed=0, callbacks=[fails_on_a_flow])
    assert isinstance(fit.family, bbvi.FullRank) and fit.status == "completed" and fit.num_steps == 50
    assert "which failed" in fit.settings["method"] and "no flows here" in fit.reliability["warnings"][-1]


def test_auto_between_two_warned_fits_returns_the_higher_elbo_and_says_so():
    """0.8 N(0, 1) + 0.2 N(1, 3^2): a heavy right tail that neither the Gaussian (k-hat 5.6) nor the flow covers;
    both are warned, the one with the higher ELBO by twice its standard error is returned (else the Gaussian), and
    one warning names both."""
    model, _, _ = _skewed(0.2, 1.0, 3.0)
    with pytest.warns(bbvi.ReliabilityWarning, match="a flow started at batch and match's Gaussian|batch and match's "
                                                       "full-rank Gaussian, tried first"):
        fit = bbvi.fit(model, seed=0)
    other = fit.tried[0]["result"]
    gaussian, flow = (fit, other) if isinstance(fit.family, bbvi.FullRank) else (other, fit)
    assert gaussian.reliability["warnings"] and flow.reliability["warnings"]
    g, f = gaussian.reliability, flow.reliability
    flow_higher = f["elbo"] - g["elbo"] > 2 * (f["elbo_se"] ** 2 + g["elbo_se"] ** 2) ** 0.5
    assert (fit is flow) == flow_higher and "both were warned" in fit.settings["method"]
