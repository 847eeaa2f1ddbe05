"""The public contract of ../shared/DESIGN.md, call by call, in one place: code outside this repository uses these
names exactly as written there, so a refactor that breaks one fails here first (the loop's refactor, issue 34, kept
them all). Each call is checked for what the contract says it returns, on small models and short fits; what the
calls compute is tested where the code lives."""
import warnings

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import Bernoulli, Normal, constraints

import bbvi
from targets import logreg

F64 = torch.float64
Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=F64)
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=F64)


def log_joint(z, data):          # z: dict name -> (S, *latent_shape), constrained values; returns (S,)
    theta = z["mu"][:, None] + z["tau"][:, None] * z["theta_trans"]
    return (Normal(0.0, 5.0).log_prob(z["mu"]) + Normal(0.0, 5.0).log_prob(z["tau"])
            + Normal(0.0, 1.0).log_prob(z["theta_trans"]).sum(-1)
            + Normal(theta, data["sigma"]).log_prob(data["y"]).sum(-1)
            + Bernoulli(probs=torch.tensor(0.3, dtype=F64)).log_prob(z["s"]).sum(-1)
            + (-0.5 * z["k"].to(F64)).sum(-1))


def _model():
    return bbvi.Model(
        log_joint,
        latents={"mu": bbvi.Latent(), "tau": bbvi.Latent(support=constraints.positive),
                 "theta_trans": bbvi.Latent(shape=(8,)),
                 "s": bbvi.Latent(shape=(10,), support=constraints.boolean),
                 "k": bbvi.Latent(shape=(10,), support=constraints.integer_interval(0, 2))},
        data={"y": Y, "sigma": SIGMA}, name="eight_schools",
        derived=lambda z, data: {"theta": z["mu"][:, None] + z["tau"][:, None] * z["theta_trans"]})


@pytest.fixture(scope="module")
def fit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bbvi.ReliabilityWarning)   # 300 steps: the contract, not the fit's quality
        return bbvi.fit(_model(), family="meanfield", estimator="score", baseline="loo", num_particles=16,
                        steps=300, lr=0.05, seed=0)


def test_the_fit_and_what_it_returns(fit):
    draws = fit.sample(4000)
    assert {k: tuple(v.shape) for k, v in draws.items()} == {
        "mu": (4000,), "tau": (4000,), "theta_trans": (4000, 8), "s": (4000, 10), "k": (4000, 10), "theta": (4000, 8)}
    assert fit.elbo.dim() == 1 and len(fit.elbo) == 300
    idata = fit.to_arviz(num_draws=4000)
    assert isinstance(idata, az.InferenceData) and {"mu", "tau", "theta_trans", "theta"} <= set(idata.posterior)
    g = fit.gradient_samples(200, estimator="score", baseline=None, num_particles=16)
    assert g.dim() == 2 and g.shape[0] == 200
    assert "khat" in fit.diagnostics()
    assert torch.equal(fit.sample(4000, seed=1)["mu"], fit.sample(4000, seed=1)["mu"])
    assert torch.equal(fit.gradient_samples(20, estimator="score", baseline=None, num_particles=16, seed=1),
                       fit.gradient_samples(20, estimator="score", baseline=None, num_particles=16, seed=1))
    assert fit.status == "completed" and fit.num_gradient_evals > 0
    assert "khat" in fit.reliability and "mode_search_evals" in fit.reliability


def test_nuts_compare_save_load_and_the_errors(fit, tmp_path):
    model = bbvi.Model(lambda z, d: Normal(0.0, 1.0).log_prob(z["mu"]) + Normal(z["mu"][:, None], 1.0).log_prob(d).sum(-1),
                       {"mu": bbvi.Latent()}, data=torch.tensor([0.5, 1.0], dtype=F64), name="contract_nn")
    ref = bbvi.nuts(model, num_draws=100, num_warmup=100, num_chains=2, seed=0, use_cache=False)
    assert isinstance(ref, az.InferenceData)
    q = bbvi.fit(model, dtype=torch.float64, init_strategy="map", steps=0)   # steps=0: q at its start
    report = bbvi.compare(q, ref)
    assert "mu" in list(report.index)
    fit.save(tmp_path / "q.pt")
    back = bbvi.load(tmp_path / "q.pt", _model())
    assert torch.equal(back.sample(100, seed=1)["mu"], fit.sample(100, seed=1)["mu"])
    for name in ("BBVIError", "ModelError", "ConfigError", "FitError", "SamplerError", "ReliabilityWarning"):
        assert isinstance(getattr(bbvi, name), type)
    assert issubclass(bbvi.ReliabilityWarning, UserWarning) and hasattr(bbvi.FitError(""), "result")
    with pytest.warns(bbvi.ReliabilityWarning, match="importance sampling moves the mean of mu"):
        at_zero = bbvi.fit(model, dtype=torch.float64, init_strategy="zero", steps=0)   # q = N(0, 0.1^2): warned
    assert q.num_steps == 0 and at_zero.num_steps == 0 and not q.reliability["warnings"]   # the MAP/Laplace start


@pytest.mark.filterwarnings("ignore::bbvi.errors.ReliabilityWarning")   # short fits: the calls, not their quality
def test_the_options_and_a_users_own_loop():
    model = logreg(200)
    assert bbvi.fit(model).status in ("completed", "converged")              # no tuning
    for kw in (dict(family="fullrank"), dict(family="meanfield"), dict(subsample_size=50),
               dict(optimizer="natural"), dict(family="lowrank")):
        assert bbvi.fit(model, steps=20, **kw).num_steps == 20, kw
    assert bbvi.fit(model, family="flow", steps=5).num_steps == 5
    state = bbvi.init(model, seed=0)
    while not state.stop and state.step < 3000:                              # it must learn when to stop
        bbvi.step(state)
    assert state.stop and state.tracker.converged


@pytest.mark.filterwarnings("ignore::bbvi.errors.ReliabilityWarning")
def test_the_discrete_estimators_expectation_and_from_pyro():
    coins = bbvi.Model(lambda z, d: (z["s"] * 0.7 + (1 - z["s"]) * 0.3).log().sum(-1),   # arithmetic: Concrete
                       {"s": bbvi.Latent(shape=(3,), support=constraints.boolean)}, name="coins")
    for est in ("disarm", "relax", "vimco", "concrete"):
        assert bbvi.fit(coins, estimator=est, steps=5).num_steps == 5, est
    g = torch.Generator().manual_seed(0)
    theta = torch.tensor(0.0, requires_grad=True)
    value = bbvi.expectation(lambda x: x ** 2, Normal(theta, 1.0), num_samples=16, generator=g)
    value.backward()
    assert value.dim() == 0 and theta.grad is not None
    value = bbvi.expectation(lambda x: x ** 2, Normal(theta, 1.0), num_samples=64, estimator="score",
                             baseline="loo", proposal=None, generator=g)
    assert torch.isfinite(value)

    def pyro_model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)
    model = bbvi.from_pyro(pyro_model, torch.tensor([0.5, 1.0, 1.5]))
    assert "log_likelihood" in bbvi.fit(model).to_arviz().groups()
