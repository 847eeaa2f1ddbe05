"""bbvi.from_pyro on three of Pyro's example models (eight schools, a logistic GLM, a Gaussian mixture with
discrete assignments): the same log density as the model written by hand for bbvi (to 1e-6 at 100 random points),
the same fit, derived quantities from pyro.deterministic, pointwise log-likelihoods from observed sites, and clear
refusals of what bbvi cannot take. Models in the idioms Pyro users write (index by group, `X @ beta`,
`.unsqueeze(-1)`, vague priors whose prior draws overflow, a local-level model in a plate) run vectorized, with the
log density and gradient of the one-particle-at-a-time loop; a model that cannot be vectorized warns once."""
import math
import warnings

import numpy as np
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
    """The same GLM as a Pyro user may write it, with `X @ w`."""
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
    assert pyro_model.vectorized and pyro_model.pyro_vectorize_failure is None
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


COUNTY = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 4, 4, 4])
XG = torch.linspace(-1, 1, 12)
YG = torch.randn(12, generator=G) + COUNTY


def by_group(county, x, y):
    """Varying intercepts: each observation's intercept `alpha[county]`."""
    mu = pyro.sample("mu", dist.Normal(0., 5.))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(2.))
    beta = pyro.sample("beta", dist.Normal(0., 5.))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.))
    with pyro.plate("county", 5):
        alpha = pyro.sample("alpha", dist.Normal(mu, sigma_a))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(alpha[county] + beta * x, sigma), obs=y)


def unsqueezed(y):
    """One mean per row of y (K, N), broadcast along the row with `.unsqueeze(-1)`."""
    mu = pyro.sample("mu", dist.Normal(0., 1.).expand([y.shape[0]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.))
    with pyro.plate("n", y.shape[1], dim=-1), pyro.plate("k", y.shape[0], dim=-2):
        pyro.sample("y", dist.Normal(mu.unsqueeze(-1), sigma), obs=y)


TRT = torch.tensor([0., 0., 0., 1., 1., 1.])
BASE = torch.tensor([-1., 0.5, 2., -0.5, 1., 1.5])
SEIZURES = torch.tensor([[2., 3, 1, 4], [5, 2, 3, 6], [11, 9, 14, 10], [1, 0, 2, 1], [4, 3, 5, 2], [8, 6, 7, 9]])


def epilepsy(trt, base, y):
    """Poisson random effects with vague N(0, 100) priors: most prior draws overflow exp() (inf rates, NaN
    log-likelihoods), though the model broadcasts."""
    b0 = pyro.sample("b0", dist.Normal(0., 100.))
    b_trt = pyro.sample("b_trt", dist.Normal(0., 100.))
    b_base = pyro.sample("b_base", dist.Normal(0., 100.))
    sigma = pyro.sample("sigma", dist.HalfCauchy(1.))
    with pyro.plate("subject", y.shape[0], dim=-2):
        u = pyro.sample("u", dist.Normal(0., sigma))
        with pyro.plate("visit", y.shape[1], dim=-1):
            rate = torch.exp(b0 + b_trt * trt[:, None] + b_base * base[:, None] + u)
            pyro.sample("y", dist.Poisson(rate), obs=y)


NILE = torch.tensor([11.2, 11.6, 9.6, 12.1, 11.6, 11.6, 8.1, 12.3, 13.7, 11.4, 10.2, 8.6, 9.9, 8.6, 10.1])


def local_level(y):
    """A local-level model (as for the Nile's flow): a random walk of the level, its innovations one latent
    vector, the observations vectorized in a plate over time."""
    level0 = pyro.sample("level0", dist.Normal(10., 5.))
    sigma_level = pyro.sample("sigma_level", dist.HalfNormal(1.))
    sigma_obs = pyro.sample("sigma_obs", dist.HalfNormal(2.))
    steps = pyro.sample("steps", dist.Normal(0., 1.).expand([len(y)]).to_event(1))
    level = pyro.deterministic("level", level0 + sigma_level * steps.cumsum(-1))
    with pyro.plate("time", len(y)):
        pyro.sample("y", dist.Normal(level, sigma_obs), obs=y)


IDIOMS = {"index_by_group": (by_group, (COUNTY, XG, YG)), "matmul": (logistic_matmul, (X, Y)),
          "unsqueeze": (unsqueezed, (torch.randn(3, 4, generator=G),)),
          "vague_priors": (epilepsy, (TRT, BASE, SEIZURES)), "local_level_plate": (local_level, (NILE,))}


@pytest.mark.parametrize("idiom", sorted(IDIOMS))
def test_outside_idioms_run_vectorized_with_the_loops_log_density_and_gradient(idiom):
    """Each idiom runs vectorized (without a warning), and at 50 random points in float64 its factor terms (the
    pointwise log-likelihoods among them), their gradient and its derived quantities equal the
    one-particle-at-a-time loop's to 1e-10."""
    fn, args = IDIOMS[idiom]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = bbvi.from_pyro(fn, *args).to(dtype=F64)
    assert model.vectorized and model.pyro_vectorize_failure is None
    loop = bbvi.from_pyro(fn, *args, vectorize=False).to(dtype=F64)
    assert not loop.vectorized
    u = torch.randn(50, model.dim, generator=torch.Generator().manual_seed(2), dtype=F64)
    grads = []
    for m in (model, loop):
        uu = u.clone().requires_grad_()
        z, _ = m.constrain(uu)
        terms = m.call_raw(z)
        grads.append((terms, torch.autograd.grad(bbvi.model.terms_matrix(terms).sum(), uu)[0]))
    (vec, g_vec), (one, g_one) = grads
    assert list(vec) == list(one) and "y" in vec
    for name in one:
        assert vec[name].shape == one[name].shape
        torch.testing.assert_close(vec[name], one[name], rtol=0, atol=1e-10)
    torch.testing.assert_close(g_vec, g_one, rtol=0, atol=1e-10)
    z, _ = model.constrain(u)
    derived, derived_loop = model.derive(z), loop.derive(z)
    assert list(derived) == list(derived_loop) == (["level"] if idiom == "local_level_plate" else [])
    for name in derived:
        assert derived[name].shape == (50, len(NILE))
        torch.testing.assert_close(derived[name], derived_loop[name], rtol=0, atol=1e-10)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
@pytest.mark.parametrize("idiom", sorted(IDIOMS))
def test_the_recorded_graph_is_the_vmapped_run_bit_for_bit(idiom, monkeypatch):
    """bbvi.replay: from the 2nd call of a signature on, the vectorized log-joint runs as the aten graph recorded
    from its vmapped Pyro run; 12 steps are the same bit for bit (ELBO estimates and parameters) as those of the
    vmapped run on every call. Calls under a torch.func transform run the model and record nothing."""
    import bbvi.replay
    monkeypatch.setattr(bbvi.replay, "RECORD_AFTER", 2)
    fn, args = IDIOMS[idiom]
    runs = []
    for record in (True, False):
        model = bbvi.from_pyro(fn, *args)
        if not record:
            model.log_joint._replay = model.log_joint._vmapped_terms
        state = bbvi.init(model, family="meanfield", estimator="reparam", num_particles=8, seed=0)
        runs.append([torch.stack([bbvi.step(state) for _ in range(12)])] + [p.detach().clone() for p in state.leaves()])
        if record:
            graphs = dict(model.log_joint._replay.graphs)
            assert graphs and all(g is not None for _, g in graphs.values())
            u = torch.randn(model.dim, generator=torch.Generator().manual_seed(3))
            for _ in range(3):
                torch.func.grad(lambda v, m=model: m.log_density(v[None]).sum())(u)
            assert model.log_joint._replay.graphs.keys() == graphs.keys()
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_vague_priors_overflow_at_the_prior_draws_the_check_compares():
    """The epilepsy model's check is not vacuous: at the two prior draws from_pyro compares, the loop's
    log-likelihood has non-finite entries and finite ones."""
    from bbvi.pyro_bridge import _PyroJoint, _latents
    latents, deterministic, _, draws = _latents(epilepsy, (TRT, BASE, SEIZURES), {}, "epilepsy")
    one = _PyroJoint(epilepsy, latents, deterministic, False)
    data = {"args": (TRT, BASE, SEIZURES), "kwargs": {}}
    y = torch.stack([one({n: t.nodes[n]["value"] for n in latents}, data)["y"] for t in draws])
    assert not torch.isfinite(y).all() and torch.isfinite(y).any()


def control_flow(y):
    """Python branching on a latent's value: not vectorizable."""
    mu = pyro.sample("mu", dist.Normal(0., 1.))
    scale = pyro.deterministic("scale", torch.tensor(1. if mu > 0 else 2.))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, scale), obs=y)


def test_a_model_that_cannot_be_vectorized_warns_once_with_the_reason_the_cost_and_the_fix():
    y = torch.tensor([0.5, -0.3, 1.2])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = bbvi.from_pyro(control_flow, y)
        model.call({"mu": torch.tensor([0.5, -0.5])})
        draws = bbvi.fit(model, steps=5, seed=0, diagnose=False).sample(20, seed=0)
    mine = [w for w in seen if "from_pyro" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in seen]
    message = str(mine[0].message)
    for part in ("'control_flow' runs one particle at a time", "data-dependent control flow", " ms ", "Fix:",
                 "torch.where", "vectorize=False"):
        assert part in message, (part, message)
    assert not model.vectorized and "data-dependent control flow" in model.pyro_vectorize_failure
    z = {"mu": torch.tensor([0.5, -0.5])}
    by_hand = Normal(0., 1.).log_prob(z["mu"]) + torch.stack(
        [Normal(m, 1. if m > 0 else 2.).log_prob(y).sum() for m in z["mu"]])
    torch.testing.assert_close(model.call(z), by_hand)
    torch.testing.assert_close(draws["scale"], torch.where(draws["mu"] > 0, 1., 2.).to(draws["scale"].dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bbvi.from_pyro(control_flow, y, vectorize=False).pyro_vectorize_failure is None
    with pytest.raises(bbvi.ModelError, match="vectorize must be True or False"):
        bbvi.from_pyro(control_flow, y, vectorize="yes")


def test_a_vectorized_run_that_disagrees_with_the_loop_runs_one_particle_at_a_time():
    """A model whose log density changes from call to call (its scale counts the calls): the vectorized run at
    the prior draws differs from the loop's, so from_pyro warns and loops."""
    calls = []

    def restless(y):
        mu = pyro.sample("mu", dist.Normal(0., 1.))
        calls.append(1)
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, float(len(calls))), obs=y)
    with pytest.warns(UserWarning, match=r"site 'y'.s log-probability at two prior draws differs from one particle"):
        model = bbvi.from_pyro(restless, torch.tensor([0.5, -0.3]))
    assert not model.vectorized and "differs" in model.pyro_vectorize_failure


@pytest.mark.parametrize("vectorize", [True, False])
def test_to_arviz_keeps_the_observed_sites_pointwise_log_likelihoods(vectorize):
    """A from_pyro logistic regression (observed site 'y', `X @ w + b`), vectorized or not: to_arviz's
    log_likelihood group holds 'y' by default, one term per observation, and az.loo runs on it."""
    import arviz as az
    model = bbvi.from_pyro(logistic_matmul, X, Y, vectorize=vectorize)
    assert model.pyro_observed == ("y",)
    idata = bbvi.fit(model, steps=100, seed=0, diagnose=False).to_arviz(400)
    assert idata.log_likelihood["y"].shape == (4, 100, 40)
    assert math.isfinite(az.loo(idata).elpd_loo)


def test_a_support_that_changes_only_on_a_rare_discrete_branch_is_refused():
    """Reliability III, 4: a continuous site whose support depends on a discrete latent through a rare branch
    (k ~ Bernoulli(0.05); x ~ Uniform(0, 1) when k = 0, Uniform(0, 10) when k = 1) slipped past the check at two
    prior draws (k = 0 both times) and was frozen at [0, 1]: x 4.1 sd off, P(k = 1) 0.01 against 0.997. The supports
    are now compared at every value of each bounded discrete latent too, and the change is refused, naming both."""
    def rare(y):
        k = pyro.sample("k", dist.Bernoulli(0.05))
        x = pyro.sample("x", dist.Uniform(0.0, 1.0 + 9.0 * k))
        pyro.sample("y", dist.Normal(x, 0.5), obs=y)
    with pytest.raises(bbvi.ModelError, match=r"support of site 'x'.*changes.*'k' = 1"):
        bbvi.from_pyro(rare, torch.tensor(6.0))
    # the same model with the support fixed in advance (x = u * (1 + 9 k), u ~ Uniform(0, 1)) is taken
    def fixed(y):
        k = pyro.sample("k", dist.Bernoulli(0.05))
        u = pyro.sample("u", dist.Uniform(0.0, 1.0))
        pyro.sample("y", dist.Normal(u * (1.0 + 9.0 * k), 0.5), obs=y)
    assert set(bbvi.from_pyro(fixed, torch.tensor(6.0)).latents) == {"k", "u"}


def schools_reparam(J, sigma, y=None):
    """Eight schools written centred and made non-centred by Pyro's reparameterizer: the latent is
    theta_decentered, theta = mu + tau * theta_decentered a site the reparameterizer computes."""
    from pyro.infer.reparam import LocScaleReparam
    mu = pyro.sample("mu", dist.Normal(0., 5.))
    tau = pyro.sample("tau", dist.HalfCauchy(5.))
    with pyro.plate("J", J), pyro.poutine.reparam(config={"theta": LocScaleReparam(0.)}):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


@pytest.mark.parametrize("vectorize", [True, False])
def test_reparameterized_sites_appear_under_their_own_names(vectorize):
    """A poutine.reparam site (LocScaleReparam(0.): theta) is a derived quantity under its own name, in
    fit.sample and in to_arviz's posterior, equal to mu + tau * theta_decentered at every draw (to 1e-12); it is
    not an observed site (before: theta was counted as one, and to_arviz's log_likelihood held its zeros).
    (pyro.infer.Predictive, Pyro 1.9.2, raises on this model: it reshapes theta's (S, 8) draws to (S,).)"""
    sigma, y = SCHOOLS["sigma"].double(), SCHOOLS["y"].double()
    model = bbvi.from_pyro(schools_reparam, 8, sigma, y, vectorize=vectorize)
    assert list(model.latents) == ["mu", "tau", "theta_decentered"] and model.pyro_observed == ("obs",)
    fit = bbvi.fit(model, steps=50, seed=0, diagnose=False)
    draws = fit.sample(200, seed=1)
    assert list(draws) == ["mu", "tau", "theta_decentered", "theta"] and draws["theta"].shape == (200, 8)
    by_hand = draws["mu"][:, None] + draws["tau"][:, None] * draws["theta_decentered"]
    torch.testing.assert_close(draws["theta"], by_hand, rtol=0, atol=1e-12)
    idata = fit.to_arviz(200, seed=1)
    np.testing.assert_array_equal(idata.posterior["theta"].values.reshape(200, 8), draws["theta"].numpy())
    assert list(idata.log_likelihood.data_vars) == ["obs"]


PRIOR_SD, NOISE_SD = 2.0, 1.0
YN = 1.0 + NOISE_SD * torch.randn(10, generator=torch.Generator().manual_seed(5), dtype=F64)


def normal_mean(y):
    """Conjugate: mu ~ N(0, 2^2), y_i ~ N(mu, 1); the posterior predictive of each y_i is N(m, s^2 + 1)."""
    mu = pyro.sample("mu", dist.Normal(0., PRIOR_SD))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, NOISE_SD), obs=y)


def heavy_tailed(y):
    """The same with a Student-t likelihood: its sampler draws in place, which vmap cannot batch."""
    mu = pyro.sample("mu", dist.Normal(0., PRIOR_SD))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.StudentT(4., mu, NOISE_SD), obs=y)


@pytest.mark.parametrize("vectorize", [True, False])
def test_to_arviz_has_the_posterior_predictive_and_the_observed_data(vectorize):
    """A from_pyro fit's to_arviz() holds observed_data (the observed site's values) and posterior_predictive (the
    observed site drawn at each posterior draw), with the same dims, so az.plot_ppc runs. Exact given the draws:
    y_rep - mu is N(0, 1) (40,000 residuals: mean within 4 se, 0.02; sd within 4 se, 0.014). Against the analytic
    posterior predictive N(m, s^2 + 1) of every y_i: the pooled mean within 0.04 (4 Monte Carlo se, 4 x 0.007: the
    ten y_rep of a draw share its mu, plus 0.01 for q's error on m: measured 0.0004 at 400 steps), each y_i's
    sd, averaged, within 0.06 (4 x 0.012, the se of one sd over 4000 draws, plus 0.01 for q's: its sd of mu is
    0.009 off, 0.003 on y_rep's sd). Reproducible by seed."""
    import arviz as az
    model = bbvi.from_pyro(normal_mean, YN, vectorize=vectorize)
    fit = bbvi.fit(model, family="fullrank", estimator="reparam", steps=400, seed=0, diagnose=False)
    idata = fit.to_arviz(4000, seed=3)
    assert {"posterior_predictive", "observed_data"} <= set(idata.groups())
    np.testing.assert_array_equal(idata.observed_data["y"].values, YN.numpy())
    rep = idata.posterior_predictive["y"]
    assert rep.shape == (4, 1000, 10) and rep.dims[2:] == idata.observed_data["y"].dims
    rep = rep.values.reshape(4000, 10)
    residual = rep - idata.posterior["mu"].values.reshape(4000, 1)
    assert abs(residual.mean()) < 4 / math.sqrt(40000) and abs(residual.std() - 1) < 4 / math.sqrt(80000)
    post_var = 1 / (1 / PRIOR_SD ** 2 + len(YN) / NOISE_SD ** 2)
    post_mean = post_var * YN.sum().item() / NOISE_SD ** 2
    assert abs(rep.mean() - post_mean) < 0.04, (rep.mean(), post_mean)
    assert abs(rep.std(0).mean() - math.sqrt(post_var + NOISE_SD ** 2)) < 0.06
    np.testing.assert_array_equal(fit.to_arviz(400, seed=3).posterior_predictive["y"].values,
                                  fit.to_arviz(400, seed=3).posterior_predictive["y"].values)
    assert not np.array_equal(fit.to_arviz(400, seed=3).posterior_predictive["y"].values,
                              fit.to_arviz(400, seed=4).posterior_predictive["y"].values)
    if vectorize:
        import matplotlib
        matplotlib.use("Agg")
        az.plot_ppc(idata, num_pp_samples=50)


def test_a_likelihood_vmap_cannot_sample_is_simulated_one_draw_at_a_time():
    """A vectorized model whose observed site's sampler vmap cannot batch (StudentT): the posterior predictive
    comes from the loop, the same draws as the vectorize=False model's."""
    model, loop = bbvi.from_pyro(heavy_tailed, YN), bbvi.from_pyro(heavy_tailed, YN, vectorize=False)
    assert model.vectorized and not loop.vectorized
    z = {"mu": torch.tensor([0.5, 1.0, 1.5], dtype=F64)}
    a = model.predict(z, model.data, torch.Generator().manual_seed(0))["y"]
    b = loop.predict(z, loop.data, torch.Generator().manual_seed(0))["y"]
    assert a.shape == (3, 10) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- Reliability III, review round: attacks on the vectorized path -----------------------------------------------
Y4 = torch.tensor([0.3, 1.2, -0.4, 2.0])


def _exact_mean_sd(model_fn, y, mean, sd):
    """Fit from_pyro(model_fn, y) by default: (whether vectorized, q's mean and sd of mu against the exact ones)."""
    model = bbvi.from_pyro(model_fn, y)
    fit = bbvi.fit(model, seed=0, progress=False)
    return model.vectorized, abs(fit.unconstrained_mean().item() - mean), abs(fit.unconstrained_covariance().sqrt().item() - sd)


def test_attack_26_a_pyro_factor_is_part_of_the_vectorized_log_density():
    """Attack 26: pyro.factor('f', -mu^2 / 2) beside a N(0, 1) prior and 4 observations: posterior precision 6.
    Seen: vectorized, mean sum(y) / 6 and sd 6^-1/2 to 1e-6 (float32 data)."""
    def factor(y):
        mu = pyro.sample("mu", dist.Normal(0., 1.))
        pyro.factor("f", -0.5 * mu ** 2)
        with pyro.plate("N", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.), obs=y)
    vectorized, dm, ds = _exact_mean_sd(factor, Y4, Y4.sum().item() / 6, 6 ** -0.5)
    assert vectorized and dm < 1e-6 and ds < 1e-6


def test_attack_27_masked_observations_are_left_out_under_vmap():
    """Attack 27: .mask() on half the observations of a plate. Seen: vectorized, the posterior of the two kept
    observations (mean (y0 + y2) / 3, sd 3^-1/2) to 1e-6."""
    def masked(y):
        mu = pyro.sample("mu", dist.Normal(0., 1.))
        with pyro.plate("N", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.).mask(torch.tensor([True, False, True, False])), obs=y)
    vectorized, dm, ds = _exact_mean_sd(masked, Y4, (Y4[0] + Y4[2]).item() / 3, 3 ** -0.5)
    assert vectorized and dm < 1e-6 and ds < 1e-6


def test_attack_28_a_0_dim_observed_site_is_exact():
    """Attack 28: one observed scalar site (obs a 0-dim tensor), no plate. Seen: vectorized, mean 0.35, sd 2^-1/2."""
    def scalar(y):
        mu = pyro.sample("mu", dist.Normal(0., 1.))
        pyro.sample("y0", dist.Normal(mu, 1.), obs=y)
    vectorized, dm, ds = _exact_mean_sd(scalar, torch.tensor(0.7), 0.35, 2 ** -0.5)
    assert vectorized and dm < 1e-6 and ds < 1e-6


def test_attack_29_an_in_place_write_to_a_copy_of_a_latent_runs_vectorized_and_exact():
    """Attack 29: v = mu.clone(); v[0] = 2 * v[0] inside the model (an in-place write under vmap). Seen: vectorized,
    mu0's posterior N(2 y0 / 5, 1/5) and mu1's N(y1 / 2, 1/2) to 1e-6."""
    def in_place(y):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 1.).to_event(1))
        v = mu.clone()
        v[0] = v[0] * 2
        pyro.sample("y", dist.Normal(v, 1.).to_event(1), obs=y[:2])
    model = bbvi.from_pyro(in_place, Y4)
    fit = bbvi.fit(model, seed=0, progress=False)
    exact_mean = torch.tensor([2 * Y4[0].item() / 5, Y4[1].item() / 2], dtype=F64)
    assert model.vectorized and torch.allclose(fit.unconstrained_mean(), exact_mean, atol=1e-6)
    assert torch.allclose(fit.unconstrained_covariance().diagonal(), torch.tensor([0.2, 0.5], dtype=F64), atol=1e-6)


def test_attack_30_a_site_vmap_cannot_batch_runs_one_particle_at_a_time_and_is_right():
    """Attack 30: a Dirichlet(2, 3, 5) prior with Multinomial counts (2, 3, 5): vmap cannot batch Multinomial's
    log-probability (dynamic shapes). Seen: one warning, the loop, and the Dirichlet(4, 6, 10) posterior's means
    (0.2, 0.3, 0.5) within 0.1 sd (sds 0.087, 0.100, 0.109). The fit without its end-of-fit check (batch and match's
    Gaussian: 0.006 sd off, sds within 3%, 2 s): with it, k-hat 1.79 (q's tails on the stick-breaking scale lighter
    than the Dirichlet's) sends the default on to a flow, also through the loop (0.006 sd off, 36 s alone)."""
    def counts(y):
        p = pyro.sample("p", dist.Dirichlet(torch.tensor([2., 3., 5.])))
        pyro.sample("c", dist.Multinomial(10, p), obs=y)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = bbvi.from_pyro(counts, torch.tensor([2., 3., 5.]))
        fit = bbvi.fit(model, seed=0, progress=False, diagnose=False)
    assert not model.vectorized and sum("runs one particle at a time" in str(w.message) for w in seen) == 1
    p = fit.sample(20000, seed=1)["p"]
    alpha = torch.tensor([4., 6., 10.], dtype=p.dtype)
    sd = (alpha * (20 - alpha) / (20 ** 2 * 21)).sqrt()
    assert ((p.mean(0) - alpha / 20) / sd).abs().max() < 0.1


def test_attack_31_a_subsampling_plate_is_refused():
    """Attack 31: pyro.plate(..., subsample_size=2): a log density that changes from call to call. Seen: a
    ModelError naming the plate and the fix."""
    def sub(y):
        mu = pyro.sample("mu", dist.Normal(0., 1.))
        with pyro.plate("N", len(y), subsample_size=2) as i:
            pyro.sample("y", dist.Normal(mu, 1.), obs=y[i])
    with pytest.raises(bbvi.ModelError, match="plate 'N' subsamples.*Remove subsample_size"):
        bbvi.from_pyro(sub, Y4)


def test_obs_mask_missing_data_is_fitted_as_pyro_means_it():
    """Reliability III, slow list: `obs=y, obs_mask=mask` makes Pyro's site y_unobserved, a latent over every row
    whose density Pyro masks out at the observed rows: those entries had no density at all (an improper posterior:
    q drifted to 1e30 there, the flow fallback ran 2000 steps, 75 s, warned). They now carry their own distribution's
    density (they affect nothing else: y takes the observed values there), so the posterior is proper: mu and the
    missing rows against the exact conjugate answer (mu | 3 rows: N(1.163, 0.576^2); a missing row: N(1.163,
    1.154^2)), within 4 Monte Carlo sds of 20000 draws plus q's own error (batch and match is exact on a Gaussian)."""
    import warnings
    y = torch.tensor([0.5, 1.0, 0.0, 2.0, 1.5], dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, False])

    def missing(y, mask):
        mu = pyro.sample("mu", dist.Normal(0., 10.))
        with pyro.plate("n", 5):
            pyro.sample("y", dist.Normal(mu, 1.), obs=y, obs_mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error", bbvi.ReliabilityWarning)
        fit = bbvi.fit(bbvi.from_pyro(missing, y, mask), seed=0)
    assert not fit.tried and fit.num_steps == 50
    d = fit.sample(20000, seed=1)
    prec = 0.01 + 3
    mean, sd_mu, sd_y = 3.5 / prec, prec ** -0.5, (1 + 1 / prec) ** 0.5
    assert abs(d["mu"].mean().item() - mean) < 4 * sd_mu / 20000 ** 0.5 + 0.02 and abs(d["mu"].std().item() / sd_mu - 1) < 0.05
    filled = d["y"][:, ~mask]
    assert (d["y"][:, mask] == y[mask]).all()
    assert (filled.mean(0) - mean).abs().max().item() < 4 * sd_y / 20000 ** 0.5 + 0.02
    assert ((filled.std(0) / sd_y) - 1).abs().max().item() < 0.05
