"""bbvi.expectation: the log-derivative trick on its own, checked against exact gradients (first and second
order), numpy f, importance sampling and multiple importance sampling."""
import math

import numpy as np
import pytest
import torch
import torch.distributions as D
from torch.distributions import Bernoulli, Normal

import bbvi


def many(estimate, num_repeats, seed=0):
    """num_repeats independent (value, gradient) estimates, stacked."""
    g = torch.Generator().manual_seed(seed)
    vals, grads = [], []
    for _ in range(num_repeats):
        v, gr = estimate(g)
        vals.append(v)
        grads.append(gr)
    return torch.stack(vals), torch.stack(grads)


def within(samples, exact, k=4.0):
    se = samples.std(0) / math.sqrt(samples.shape[0])
    return bool(((samples.mean(0) - exact).abs() <= k * se).all())


@pytest.mark.parametrize("estimator,baseline", [("score", None), ("score", "loo"), ("score", "ema"), ("score", "cv"),
                                                ("pathwise", None)])
def test_gaussian_second_moment_gradient(estimator, baseline):
    """E_{N(mu, sigma)}[x^2] = mu^2 + sigma^2: gradient (2 mu, 2 sigma), for every baseline fit has (EMA's state
    carried from call to call, as a policy-gradient loop would)."""
    mu = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    state = {}

    def one(g):
        v, info = bbvi.expectation(lambda x: x ** 2, Normal(mu, sigma), num_samples=32, estimator=estimator,
                                   baseline=baseline, generator=g, baseline_state=state.get("s"), return_info=True)
        state["s"] = info["baseline_state"]
        return v.detach(), torch.stack(torch.autograd.grad(v, [mu, sigma]))
    vals, grads = many(one, 400)
    assert within(vals, torch.tensor(0.7 ** 2 + 1.3 ** 2, dtype=torch.float64))
    assert within(grads, torch.tensor([1.4, 2.6], dtype=torch.float64))
    if baseline == "ema":  # the moving average has seen every call: its weight is 1 - 0.9^400
        assert float(state["s"]["weight"]) == pytest.approx(1.0)


def test_baselines_cut_the_variance():
    """Same draws, same f: each baseline's gradient variance against none (E[x^2] at mu far from 0)."""
    mu = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    var = {}
    for baseline in (None, "loo", "ema", "cv"):
        state = {}

        def one(g, baseline=baseline, state=state):
            v, info = bbvi.expectation(lambda x: x ** 2, Normal(mu, 1.0), num_samples=16, estimator="score",
                                       baseline=baseline, generator=g, baseline_state=state.get("s"),
                                       return_info=True)
            state["s"] = info["baseline_state"]
            return v.detach(), torch.autograd.grad(v, mu)[0]
        var[baseline] = many(one, 300)[1].var()
    # seen: none 13.3, loo 5.39, ema 5.01, cv 7.17; a variance ratio from 300 estimates each has a relative
    # sd of about sqrt(4 / 300) = 12%, so 0.7 is > 2.5 sd above the largest ratio seen (0.54)
    assert all(var[b] < 0.7 * var[None] for b in ("loo", "ema", "cv")), var


def test_fit_and_expectation_share_the_score_term():
    """bbvi.fit's score-path gradient at a fixed q is bbvi.expectation's of f = log p - log q, on the same
    draws (one implementation of the trick)."""
    from bbvi.estimators import Score, estimate, init_baseline_state, plan_for
    from bbvi.families import Discrete

    def log_joint(z, data):
        return Normal(0.0, 1.0).log_prob(z["mu"]).sum(-1) + Normal(z["mu"], 1.0).log_prob(data["x"]).sum(-1)
    model = bbvi.Model(log_joint, latents={"mu": bbvi.Latent((2,))},
                       data={"x": torch.tensor([0.4, -1.2], dtype=torch.float64)}, name="two").to("cpu",
                                                                                                  torch.float64)
    family = bbvi.MeanField()
    for baseline in ("loo", None, "cv"):
        params = {"loc": torch.tensor([0.2, -0.3], dtype=torch.float64, requires_grad=True),
                  "log_scale": torch.tensor([-0.4, 0.1], dtype=torch.float64, requires_grad=True)}
        u = torch.zeros(3, 2, dtype=torch.float64)
        plan = plan_for(Score(bbvi.estimators.resolve_baseline(baseline)), model, model.check(u, {}), 8)
        surrogate, *_ = estimate(plan, model, family, Discrete.for_model(model), {"continuous": params,
                                 "discrete": {}}, 8, torch.Generator().manual_seed(3),
                                 init_baseline_state(plan, "cpu", torch.float64))
        g_fit = torch.autograd.grad(surrogate, list(params.values()))

        def f(x, params=params):
            return model.log_density(x, {}) - family.log_prob(params, x)
        v = bbvi.expectation(f, (family, params), num_samples=8, estimator="score", baseline=baseline,
                             generator=torch.Generator().manual_seed(3))
        g_exp = torch.autograd.grad(v, list(params.values()))
        assert torch.equal(v.detach(), surrogate.detach()), baseline
        for a, b in zip(g_exp, g_fit):
            assert torch.equal(a, b), baseline


def test_bernoulli_gradient_with_numpy_f_is_exact_in_the_mean():
    """f(b) = (b - 0.49)^2 in numpy; d/deta E = sigmoid'(eta) ((1 - p0)^2 - p0^2)."""
    eta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    p0 = 0.49

    def f(b):
        return (b.numpy() - p0) ** 2

    def one(g):
        v = bbvi.expectation(f, Bernoulli(logits=eta), num_samples=16, generator=g)
        return v.detach(), torch.autograd.grad(v, eta)[0]
    vals, grads = many(one, 400)
    s = torch.sigmoid(eta.detach())
    assert within(grads, s * (1 - s) * ((1 - p0) ** 2 - p0 ** 2))
    assert within(vals, s * (1 - p0) ** 2 + (1 - s) * p0 ** 2)


def test_second_derivative_is_unbiased_and_the_naive_surrogate_is_not():
    """E_{Bernoulli(sigmoid(eta))}[f] = s f(1) + (1 - s) f(0): d2/deta2 = s'' (f(1) - f(0))."""
    f1, f0 = 3.0, -1.0
    eta0 = 0.4

    def f(b):
        return torch.where(b > 0.5, torch.full_like(b, f1), torch.full_like(b, f0))

    def second(g, naive=False):
        eta = torch.tensor(eta0, dtype=torch.float64, requires_grad=True)
        dist = Bernoulli(logits=eta)
        if naive:
            from bbvi.estimators.expectation import draw
            x = draw(dist, 64, g)
            v = (f(x) * dist.log_prob(x)).mean()
        else:
            v = bbvi.expectation(f, dist, num_samples=64, estimator="score", baseline=None, generator=g)
        (d1,) = torch.autograd.grad(v, eta, create_graph=True)
        (d2,) = torch.autograd.grad(d1, eta)
        return d1.detach(), d2
    s = 1 / (1 + math.exp(-eta0))
    exact2 = torch.tensor(s * (1 - s) * (1 - 2 * s) * (f1 - f0), dtype=torch.float64)
    d1, d2 = many(second, 300)
    assert within(d1, torch.tensor(s * (1 - s) * (f1 - f0), dtype=torch.float64))
    assert within(d2, exact2)
    _, naive = many(lambda g: second(g, naive=True), 300, seed=1)
    assert not within(naive, exact2, k=10)  # the naive second derivative misses E[f (dlog p)^2]


def test_importance_sampling_on_policy_wider_and_mixture():
    mu = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(1.0, dtype=torch.float64)
    exact = torch.tensor([1.0], dtype=torch.float64)  # d/dmu E[x^2] = 2 mu

    def f(x):
        return x ** 2

    # proposal = dist: the importance weights are 1, the estimate is the on-policy one on the same draws
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    on = bbvi.expectation(f, Normal(mu, sigma), num_samples=50, estimator="score", generator=g1)
    off, info = bbvi.expectation(f, Normal(mu, sigma), num_samples=50, proposal=Normal(mu.detach(), sigma),
                                 generator=g2, return_info=True)
    torch.testing.assert_close(off, on, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(off, mu)[0], torch.autograd.grad(on, mu)[0], rtol=1e-10,
                               atol=1e-12)
    assert info["ess"] == pytest.approx(50) and info["khat"] < 0.5

    proposals = [Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)),
                 Normal(torch.tensor(1.5, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64)),
                 Normal(torch.tensor(-1.0, dtype=torch.float64), torch.tensor(2.5, dtype=torch.float64))]

    def run(prop, seed):
        def one(g):
            v = bbvi.expectation(f, Normal(mu, sigma), num_samples=48, proposal=prop, generator=g)
            return v.detach(), torch.autograd.grad(v, mu)[0].reshape(1)
        return many(one, 400, seed)
    single = [run(q, 10 + j) for j, q in enumerate(proposals)]
    for vals, grads in single:
        assert within(grads, exact) and within(vals, torch.tensor(1.25, dtype=torch.float64))
    vals, grads = run(proposals, 20)
    assert within(grads, exact) and within(vals, torch.tensor(1.25, dtype=torch.float64))
    # MIS (balance heuristic) is no worse than the worst single proposal (20% slack for the variance estimate)
    assert grads.var() <= 1.2 * max(gr.var() for _, gr in single)


def test_a_bbvi_family_with_its_parameters_is_a_distribution():
    """E_q[sum x^2] under mean-field q: gradient (2 loc, 2 sigma^2) in (loc, log_scale)."""
    params = {"loc": torch.tensor([0.3, -1.0], dtype=torch.float64, requires_grad=True),
              "log_scale": torch.tensor([0.0, -0.5], dtype=torch.float64, requires_grad=True)}
    exact = torch.cat([2 * params["loc"], 2 * torch.exp(2 * params["log_scale"])]).detach()
    for estimator in ("score", "pathwise"):
        def one(g, estimator=estimator):
            v = bbvi.expectation(lambda x: (x ** 2).sum(-1), (bbvi.MeanField(), params), num_samples=32,
                                 estimator=estimator, generator=g)
            return v.detach(), torch.cat(torch.autograd.grad(v, [params["loc"], params["log_scale"]]))
        _, grads = many(one, 300)
        assert within(grads, exact), estimator


def test_bad_input_is_refused():
    mu = torch.tensor(0.0, requires_grad=True)
    with pytest.raises(bbvi.ConfigError, match="one value per draw"):
        bbvi.expectation(lambda x: x.sum(), Normal(mu, 1.0), num_samples=8, estimator="score")
    with pytest.raises(bbvi.ConfigError, match="pathwise.*Bernoulli"):
        bbvi.expectation(lambda x: x, Bernoulli(logits=mu), num_samples=8, estimator="pathwise")
    with pytest.raises(bbvi.ConfigError, match="torch.distributions.Distribution, a \\(family"):
        bbvi.expectation(lambda x: x, "normal", num_samples=8)
    with pytest.raises(bbvi.ConfigError, match="pathwise needs f|needs f"):
        bbvi.expectation(lambda x: np.asarray(x.detach()), Normal(mu, 1.0), num_samples=8, estimator="pathwise")
    with pytest.raises(bbvi.ConfigError, match="not a per-draw baseline.*importance"):
        bbvi.expectation(lambda x: x, Normal(mu, 1.0), num_samples=8, baseline="cv", proposal=Normal(0.0, 2.0))
    with pytest.raises(bbvi.ConfigError, match="needs num_samples >= 2"):
        bbvi.expectation(lambda x: x, Normal(mu, 1.0), num_samples=1, estimator="score", baseline="loo")
    with pytest.raises(bbvi.ConfigError, match="baseline must be"):
        bbvi.expectation(lambda x: x, Normal(mu, 1.0), num_samples=8, estimator="score", baseline="mean")


def test_a_gradient_at_a_degenerate_bernoulli_is_warned():
    """Reliability III, 6: d/dp E[3b] at Bernoulli(probs=1.0) came out 0 (exactly 3) with no warning: every draw is
    1, so no sampled gradient can see b = 0. Now a ReliabilityWarning says so (score and DisARM alike); off the
    boundary nothing is said."""
    import warnings
    for estimator in ("score", "disarm"):
        p = torch.tensor(1.0, requires_grad=True)
        with pytest.warns(bbvi.ReliabilityWarning, match="probs are exactly 1.*cannot see f there"):
            bbvi.expectation(lambda b: 3 * b, Bernoulli(probs=p), num_samples=16, estimator=estimator)
    p = torch.tensor(0.3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = bbvi.expectation(lambda b: 3 * b, Bernoulli(probs=p), num_samples=16)
    value.backward()
    assert torch.isfinite(p.grad)


# ---- #2: an importance-sampling proposal that does not cover the target ---------------------------------------
@pytest.mark.parametrize("proposal", [D.Uniform(torch.tensor(-1.0, dtype=torch.float64), 1.0),
                                      [D.Uniform(torch.tensor(-1.0, dtype=torch.float64), 1.0),
                                       D.Uniform(torch.tensor(0.0, dtype=torch.float64), 3.0)],
                                      D.Exponential(torch.tensor(1.0, dtype=torch.float64))])
def test_proposal_that_does_not_cover_the_target_is_refused(proposal):
    """Before: expectation(x^2, Normal(0.5, 1), proposal=Uniform(-1, 1)) returned 0.163 for E[x^2] = 1.25, with khat
    -1.19 and ess 93 and no warning. Now a ConfigError saying the proposal does not cover the target's support, with
    a point where it does not."""
    mu = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(bbvi.ConfigError, match=r"does not cover the target's support") as err:
        bbvi.expectation(lambda x: x ** 2, Normal(mu, 1.0), num_samples=100, proposal=proposal)
    assert "x = " in str(err.value)


def test_covering_proposal_gives_the_same_draws_as_before():
    """Before: a mixture [Uniform(-1, 1), Normal(0, 2)], which covers the target together, raised a raw ValueError
    from the Uniform's argument check at the Normal's draws. Now it is accepted (the Uniform's density is 0 there),
    and a covering proposal's estimate is the one from the call's own generator, bit for bit (the support check
    draws from a copy)."""
    mu = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    q = Normal(torch.tensor(0.0, dtype=torch.float64), 2.0)
    value = bbvi.expectation(lambda x: x ** 2, Normal(mu, 1.0), num_samples=100, proposal=q,
                             generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    x = 2.0 * torch.randn(100, generator=g, dtype=torch.float64)
    w = torch.exp(Normal(0.5, 1.0).log_prob(x) - q.log_prob(x))
    assert value.item() == (w * x ** 2).mean().item()
    mixed = [D.Uniform(torch.tensor(-1.0, dtype=torch.float64), 1.0), q]
    bbvi.expectation(lambda x: x ** 2, Normal(mu, 1.0), num_samples=100, proposal=mixed)


# ---- #20, #21, #26: bad f and generator ------------------------------------------------------------------------
def test_expectation_f_returning_a_scalar_is_a_config_error():
    """Before: f returning the mean (a scalar) instead of one value per draw gave `IndexError: tuple index out of
    range` (expectation.py:155) on the auto path. Now a ConfigError naming the shape expected and got, on every
    path."""
    mu = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    for estimator in ("auto", "pathwise", "score"):
        with pytest.raises(bbvi.ConfigError, match=r"shape \(100,\); got \(\)"):
            bbvi.expectation(lambda x: (x ** 2).mean(), Normal(mu, 1.0), num_samples=100, estimator=estimator)


@pytest.mark.parametrize("generator", [0, 7, "seed", np.random.default_rng(0)])
def test_expectation_generator_that_is_not_a_torch_generator(generator):
    """Before: generator=0 gave `TypeError: randn() received an invalid combination of arguments`. Now a ConfigError
    naming generator and the fix."""
    mu = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(bbvi.ConfigError, match=r"generator must be a torch.Generator"):
        bbvi.expectation(lambda x: x ** 2, Normal(mu, 1.0), num_samples=100, generator=generator)


@pytest.mark.parametrize("estimator", ["auto", "score"])
def test_expectation_complex_f_is_a_config_error(estimator):
    """Before: f returning complex values had its imaginary part dropped silently (0.434 returned). Now a ConfigError
    saying f must be real."""
    mu = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(bbvi.ConfigError, match=r"complex"):
        bbvi.expectation(lambda x: torch.exp(1j * x), Normal(mu, 1.0), num_samples=100, estimator=estimator)
