"""Families, estimators and baselines are open: any object with the protocol is accepted, fits with it are
right, and checkpoints and saved results of such objects (and of subclasses of bbvi's own) load."""
import dataclasses
import math

import pytest
import torch

import bbvi
from bbvi.estimators import LOO, Plan, ScorePath
from fitcheck import assert_same_fit
from models.conjugate import normal_normal


@dataclasses.dataclass(frozen=True)
class SoftplusGaussian:
    """A diagonal Gaussian written from scratch, scales through softplus: no bbvi base class."""

    def init(self, dim, loc, generator=None):
        return {"loc": loc.clone(), "raw": torch.full_like(loc, -2.0)}

    def _scale(self, params):
        return torch.nn.functional.softplus(params["raw"])

    def rsample(self, params, num, generator):
        eps = torch.randn(num, params["loc"].shape[0], generator=generator, dtype=params["loc"].dtype)
        return params["loc"] + self._scale(params) * eps

    def sample(self, params, num, generator):
        with torch.no_grad():
            return self.rsample(params, num, generator)

    def log_prob(self, params, u):
        return torch.distributions.Normal(params["loc"], self._scale(params)).log_prob(u).sum(-1)

    def entropy(self, params):
        return (torch.log(self._scale(params)) + 0.5 * (1 + math.log(2 * math.pi))).sum()

    def mean(self, params):
        return params["loc"]

    def covariance(self, params):
        return torch.diag(self._scale(params) ** 2)

    def marginal_sd(self, params):
        return self._scale(params)


@dataclasses.dataclass(frozen=True)
class WideMeanField(bbvi.MeanField):
    """A subclass of a bbvi family, with a field of its own."""

    widen: float = 1.0


@dataclasses.dataclass(frozen=True)
class MyLOO:
    """The leave-one-out baseline written by a user through the baseline protocol."""

    min_particles = 2

    def init_state(self, device, dtype):
        return {}

    def score_term(self, f, score_logq, score_params, particles, elbo, state):
        b = (f.sum() - f) / max(particles.n - 1, 1)
        return particles.average((f - b) * score_logq), state


@dataclasses.dataclass(frozen=True)
class MyScore:
    """An estimator written by a user: score terms everywhere with the LOO baseline."""

    def plan(self, model, report, num_particles):
        return Plan(ScorePath() if model.dim else None, LOO(), bool(model.discrete))


def test_a_family_written_from_scratch_fits_the_analytic_posterior():
    model, exact = normal_normal()
    mean, sd = exact["mu"]
    fit = bbvi.fit(model, family=SoftplusGaussian(), estimator="reparam", steps=3000, seed=0, progress=False)
    # no init_from_precision: the default start falls back to zero and says why
    assert fit.start.strategy == "zero" and "init_from_precision" in fit.start.note
    draws = fit.sample(20000, seed=1)["mu"]
    se = sd / math.sqrt(20000)  # the fit's own error is what the 0.05 sd allows; 4 se is the draws' error
    assert abs(draws.mean().item() - mean) < 0.05 * sd + 4 * se
    assert abs(draws.std().item() / sd - 1) < 0.05


def test_an_incomplete_family_is_refused_by_name():
    class Half:
        def init(self, dim, loc, generator=None):
            return {}
    with pytest.raises(bbvi.ConfigError, match=r"lacks \['rsample', 'sample', 'log_prob'"):
        bbvi.fit(normal_normal()[0], family=Half())


@pytest.mark.parametrize("family", [SoftplusGaussian(), WideMeanField(widen=2.0)], ids=["scratch", "subclass"])
def test_checkpoints_and_saved_results_of_user_families_load(tmp_path, family):
    model, _ = normal_normal()
    kw = dict(family=family, estimator="score", baseline="loo", steps=200, seed=3, init_strategy="zero",
              progress=False)
    full = bbvi.fit(model, **kw)
    ck = str(tmp_path / "ck.pt")
    bbvi.fit(model, **kw, checkpoint=ck, checkpoint_every=50, callbacks=[lambda s: s.step == 120])
    assert_same_fit(full, bbvi.fit(model, **kw, resume=ck))
    path = str(tmp_path / "q.pt")
    full.save(path)
    loaded = bbvi.load(path, model)
    assert loaded.family == family
    assert torch.equal(loaded.sample(100, seed=4)["mu"], full.sample(100, seed=4)["mu"])


@pytest.mark.filterwarnings("ignore::bbvi.errors.ReliabilityWarning")   # short fits with user protocols; the test checks the protocols
def test_a_saved_family_whose_class_is_not_imported_says_so(tmp_path):
    model, _ = normal_normal()
    path = str(tmp_path / "q.pt")
    bbvi.fit(model, family=SoftplusGaussian(), steps=5, progress=False).save(path)
    obj = torch.load(path, weights_only=True)
    obj["family"]["module"] = "not_imported_anywhere"
    torch.save(obj, path)
    with pytest.raises(bbvi.ConfigError, match="not_imported_anywhere.*not imported here"):
        bbvi.load(path, model)
    assert bbvi.load(path, model, family=SoftplusGaussian()).family == SoftplusGaussian()


@pytest.mark.filterwarnings("ignore::bbvi.errors.ReliabilityWarning")   # short fits with user protocols; the test checks the protocols
def test_a_user_baseline_and_a_user_estimator_go_through_their_protocols():
    """Written by a user, LOO gives bit for bit the fit of bbvi's own LOO."""
    model, _ = normal_normal()
    kw = dict(steps=100, seed=2, init_strategy="zero", progress=False)
    ours = bbvi.fit(model, estimator="score", baseline="loo", **kw)
    assert_same_fit(ours, bbvi.fit(model, estimator="score", baseline=MyLOO(), **kw))
    assert_same_fit(ours, bbvi.fit(model, estimator=MyScore(), **kw))
    with pytest.raises(bbvi.ConfigError, match="needs num_particles >= 2"):
        bbvi.fit(model, estimator="score", baseline=MyLOO(), num_particles=1, **kw)
    with pytest.raises(bbvi.ConfigError, match="inside the estimator object"):
        bbvi.fit(model, estimator=MyScore(), baseline="ema", **kw)


class PlainConstant:
    """A baseline that is not a dataclass: b = c, a constant (unbiased, and useless)."""

    min_particles = 1

    def __init__(self, c):
        self.c = c

    def init_state(self, device, dtype):
        return {}

    def score_term(self, f, score_logq, score_params, particles, elbo, state):
        return particles.average((f - self.c) * score_logq), state


@pytest.mark.filterwarnings("ignore::bbvi.errors.ReliabilityWarning")   # short fits with user protocols; the test checks the protocols
def test_a_plain_class_baseline_resumes_and_loads(tmp_path):
    model, _ = normal_normal()
    kw = dict(estimator="score", baseline=PlainConstant(-30.0), steps=80, seed=1, init_strategy="zero",
              progress=False)
    full = bbvi.fit(model, **kw)
    assert "PlainConstant({'c': -30.0})" in full.settings["plan"]
    ck = str(tmp_path / "ck.pt")
    bbvi.fit(model, **kw, checkpoint=ck, checkpoint_every=20, callbacks=[lambda s: s.step == 50])
    assert_same_fit(full, bbvi.fit(model, **kw, resume=ck))
    path = str(tmp_path / "q.pt")
    full.save(path)
    assert bbvi.load(path, model).plan.baseline.c == -30.0


@pytest.mark.filterwarnings("ignore::bbvi.errors.ReliabilityWarning")   # short fits with user protocols; the test checks the protocols
def test_the_default_baseline_is_a_sentinel_and_the_word_default_means_it():
    model, _ = normal_normal()
    kw = dict(estimator="score", steps=30, seed=0, init_strategy="zero", progress=False)
    base = bbvi.fit(model, **kw)
    assert "LOO()" in base.settings["plan"]
    assert_same_fit(base, bbvi.fit(model, baseline="default", **kw))
    assert_same_fit(base, bbvi.fit(model, baseline=bbvi.estimators.DEFAULT, **kw))
