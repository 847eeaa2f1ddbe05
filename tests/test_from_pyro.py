"""bbvi.from_pyro on three of Pyro's example models (eight schools, a logistic GLM, a Gaussian mixture with
discrete assignments): the same log density as the model written by hand for bbvi (to 1e-6 at 100 random points),
the same fit, derived quantities from pyro.deterministic, pointwise log-likelihoods from observed sites, and clear
refusals of what bbvi cannot take."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.ops.indexing import Vindex
from torch.distributions import Bernoulli, Normal, constraints

import bbvi
from models import discrete, eight_schools

F64 = torch.float64
SCHOOLS = eight_schools.DATA


def schools(J, sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0., 5.))
    tau = pyro.sample("tau", dist.HalfCauchy(5.))
    with pyro.plate("J", J):
        theta_trans = pyro.sample("theta_trans", dist.Normal(0., 1.))
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def schools_by_hand(z, d):
    """eight_schools.log_joint with the half-Cauchy's normalizer (log 2), latents in Pyro's order."""
    return eight_schools.log_joint(z, d) + math.log(2)


G = torch.Generator().manual_seed(0)
X = torch.randn(40, 3, generator=G)
Y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.0, -2.0, 0.5])), generator=G)


def logistic(X, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.).to_event(1))
    b = pyro.sample("b", dist.Normal(0., 5.))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(X * w).sum(-1) + b), obs=y)


def logistic_matmul(X, y=None):
    """The same GLM as a Pyro user may write it: `X @ w` does not broadcast over particles (run one at a time)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.).to_event(1))
    b = pyro.sample("b", dist.Normal(0., 5.))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=X @ w + b), obs=y)


def logistic_by_hand(z, d):
    w, b = z["w"], z["b"]
    return (Normal(0.0, 1.0).log_prob(w).sum(-1) + Normal(0.0, 5.0).log_prob(b)
            + Bernoulli(logits=w @ d["X"].T + b[:, None]).log_prob(d["y"]).sum(-1))


def mixture(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor([-2., 2.]), 2.).to_event(1))
    with pyro.plate("data", len(y)):
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("obs", dist.Normal(Vindex(mu)[..., z.long()], 1.), obs=y)


CASES = {
    "eight_schools": (lambda: bbvi.from_pyro(schools, 8, SCHOOLS["sigma"], SCHOOLS["y"]),
                      lambda: bbvi.Model(schools_by_hand, {"mu": bbvi.Latent(), "tau": bbvi.Latent(support=constraints.positive),
                                                           "theta_trans": bbvi.Latent(shape=(8,))},
                                         data=SCHOOLS, name="by_hand")),
    "glm": (lambda: bbvi.from_pyro(logistic, X, Y),
            lambda: bbvi.Model(logistic_by_hand, {"w": bbvi.Latent(shape=(3,)), "b": bbvi.Latent()},
                               data={"X": X, "y": Y}, name="by_hand")),
    "glm_matmul": (lambda: bbvi.from_pyro(logistic_matmul, X, Y),
                   lambda: bbvi.Model(logistic_by_hand, {"w": bbvi.Latent(shape=(3,)), "b": bbvi.Latent()},
                                      data={"X": X, "y": Y}, name="by_hand")),
    "mixture": (lambda: bbvi.from_pyro(mixture, discrete.MIX_Y), lambda: discrete.mixture),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_log_density_is_the_hand_written_models(case):
    """At 100 random points (continuous latents from N(0, 2^2) on the unconstrained scale, booleans at random), in
    float64: equal to 1e-6 (measured: eight schools 7.6e-7, its Pyro model's constants being float32; GLM 3e-14;
    mixture 2e-8)."""
    pyro_model, by_hand = (make().to(dtype=F64) for make in CASES[case])
    assert pyro_model.vectorized == (case != "glm_matmul")
    g = torch.Generator().manual_seed(1)
    u = 2 * torch.randn(100, pyro_model.dim, generator=g, dtype=F64)
    z, _ = pyro_model.constrain(u)
    for name, (lat, _low, _k) in pyro_model.discrete.items():
        z[name] = torch.randint(0, 2, (100,) + lat.shape, generator=g).to(F64)
    assert list(pyro_model.latents) == [n for n in pyro_model.latents if n in by_hand.latents]
    diff = (pyro_model.call(z) - by_hand.call(z)).abs().max().item()
    assert diff < 1e-6, diff


@pytest.mark.parametrize("case", ["eight_schools", "glm", "mixture"])
def test_the_fit_is_the_hand_written_models(case):
    """The same fit options and seed: every latent's mean within 0.1 posterior sd (fit sd) of the hand-written
    model's fit."""
    pyro_model, by_hand = (make() for make in CASES[case])
    kw = dict(steps=300, seed=0, diagnose=False)
    a, b = bbvi.fit(pyro_model, **kw).sample(2000, seed=1), bbvi.fit(by_hand, **kw).sample(2000, seed=1)
    for name in by_hand.latents:
        err = ((a[name].double().mean(0) - b[name].double().mean(0)).abs() / b[name].double().std(0)).max()
        assert err < 0.1, (name, err)


def test_deterministic_sites_and_pointwise_log_likelihood():
    model = CASES["eight_schools"][0]()
    fit = bbvi.fit(model, steps=100, seed=0, diagnose=False)
    draws = fit.sample(50, seed=0)
    torch.testing.assert_close(draws["theta"], draws["mu"][:, None] + draws["tau"][:, None] * draws["theta_trans"])
    idata = fit.to_arviz(100, log_likelihood="obs")
    assert idata.log_likelihood["obs"].shape == (4, 25, 8)


def test_from_pyro_refuses_what_bbvi_cannot_take_and_leaves_the_rng_alone():
    state = torch.random.get_rng_state()
    bbvi.from_pyro(schools, 8, SCHOOLS["sigma"], SCHOOLS["y"])
    assert torch.equal(torch.random.get_rng_state(), state)

    def with_param(y):
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("x", dist.Normal(loc, 1.))

    def dynamic(y):
        tau = pyro.sample("tau", dist.Exponential(1.))
        pyro.sample("x", dist.Uniform(0., tau))

    def counts(y):
        pyro.sample("n", dist.Poisson(3.))

    def observed_only(y):
        pyro.sample("y", dist.Normal(0., 1.), obs=y)

    def subsampled(y):
        mu = pyro.sample("mu", dist.Normal(0., 1.))
        with pyro.plate("data", 10, subsample_size=3):
            pyro.sample("obs", dist.Normal(mu, 1.), obs=torch.zeros(3))
    for fn, match in [(with_param, "pyro.param"), (dynamic, "changes with the other latents"),
                      (counts, "cannot enumerate"), (observed_only, "nothing to infer"),
                      (subsampled, "subsamples")]:
        with pytest.raises(bbvi.ModelError, match=match):
            bbvi.from_pyro(fn, torch.tensor(1.0))
    with pytest.raises(bbvi.ModelError, match="raised"):
        bbvi.from_pyro(schools, 8)     # sigma missing: the model itself fails
