"""Reliability II (issue 16), first findings: each test failed before its fix (the silent or raw behaviour
is in the docstring)."""
import warnings

import pytest
import torch
from torch.distributions import Normal, constraints

import bbvi


def two_latents(order=("a", "b"), name="ab", data=None):
    def log_joint(z, data):
        return Normal(0.0, 1.0).log_prob(z["a"] - data["shift"]) + Normal(0.0, 1.0).log_prob(z["b"] + 3.0)
    return bbvi.Model(log_joint, latents={k: bbvi.Latent(()) for k in order},
                      data=data or {"shift": torch.tensor(3.0)}, name=name)


def test_a_reordered_latents_dict_is_refused_on_load_and_a_renamed_model_is_accepted(tmp_path):
    """Before: the signature compared dicts, ignoring order: a's mean came back as b's (-3 for +3)."""
    fit = bbvi.fit(two_latents(), steps=300, seed=0, diagnose=False)
    path = tmp_path / "q.pt"
    fit.save(path)
    with pytest.raises(bbvi.ConfigError, match=r"order \['a', 'b'\].*order \['b', 'a'\]"):
        bbvi.load(path, two_latents(order=("b", "a")))
    back = bbvi.load(path, two_latents(name="renamed")).sample(2000)
    assert abs(float(back["a"].mean()) - 3.0) < 0.2 and abs(float(back["b"].mean()) + 3.0) < 0.2


def test_resume_refuses_a_model_with_other_data(tmp_path):
    """Before: a same-named model with other data resumed silently, continuing a fit of another posterior."""
    path = tmp_path / "ck.pt"
    bbvi.fit(two_latents(), steps=40, seed=0, checkpoint=path, checkpoint_every=20, diagnose=False)
    other = two_latents(data={"shift": torch.tensor(-1.0)})
    with pytest.raises(bbvi.ConfigError, match="other data or another log-joint"):
        bbvi.fit(other, steps=40, seed=0, resume=path, diagnose=False)
    bbvi.fit(two_latents(), steps=40, seed=0, resume=path, diagnose=False)  # the same model still resumes


def test_a_minus_infinite_log_joint_pushes_q_away_and_is_reported():
    """Before: particles with log p = -inf were dropped as faults, so q kept its mass there: q(k >= 5) = 0.51
    (k uniform on 0..9 at the start, posterior uniform on 0..4)."""
    def log_joint(z, data):
        k = z["k"]
        return torch.where(k >= 5, torch.full(k.shape, -torch.inf, dtype=torch.float64),
                           torch.zeros(k.shape, dtype=torch.float64))
    model = bbvi.Model(log_joint, latents={"k": bbvi.Latent((), support=constraints.integer_interval(0, 9))},
                       name="truncated")
    with pytest.warns(bbvi.ReliabilityWarning, match="where the log-joint is -inf"):
        fit = bbvi.fit(model, seed=0)
    k = fit.sample(4000)["k"]
    assert float((k >= 5).double().mean()) < 0.02  # seen: 0.007
    probs = torch.bincount(k.long(), minlength=10)[:5] / 4000.0
    assert torch.all((probs - 0.2).abs() < 0.03)
    assert fit.num_bad_particles == 0  # outside the support is not a fault


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_dtypes_are_refused(dtype):
    """Before: float16's transform clamp kept a unit_interval latent inside [0.25, 0.75], silently."""
    with pytest.raises(bbvi.ConfigError, match="too coarse.*float32 or torch.float64"):
        bbvi.fit(two_latents(), steps=10, dtype=dtype)


def test_a_seed_out_of_range_is_refused():
    with pytest.raises(bbvi.ConfigError, match=r"seed must be in \[0, 2\*\*63\)"):
        bbvi.fit(two_latents(), steps=10, seed=2 ** 64)


def test_the_first_check_cannot_coincide_with_a_data_length():
    """Before: the first call drew 3 particles, so a log-joint broadcasting particles against 3 data points
    passed and fitted a wrong posterior (sd 0.98 against the exact 0.58)."""
    x = torch.tensor([0.5, -0.3, 1.1])

    def broadcasting(z, data):  # (S,) against (3,): a shape error unless S == 3
        return Normal(0.0, 1.0).log_prob(z["mu"]) + Normal(z["mu"], 1.0).log_prob(data["x"])
    model = bbvi.Model(broadcasting, latents={"mu": bbvi.Latent(())}, data={"x": x}, name="bcast")
    with pytest.raises(bbvi.ModelError, match="S=5 particles"):
        bbvi.fit(model, steps=10)


def test_derived_quantities_that_draw_are_reproducible_and_leave_the_global_rng_alone():
    """Before: derived quantities drew from the global RNG: two sample(seed=0) calls differed."""
    def log_joint(z, data):
        return Normal(0.0, 1.0).log_prob(z["mu"])

    def predictive(z, data):
        return {"y": z["mu"] + torch.randn(z["mu"].shape, dtype=z["mu"].dtype)}
    fit = bbvi.fit(bbvi.Model(log_joint, latents={"mu": bbvi.Latent(())}, derived=predictive, name="pp"),
                   steps=100, seed=0, diagnose=False)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = fit.sample(500, seed=7)["y"], fit.sample(500, seed=7)["y"]
    assert torch.equal(a, b)
    assert not torch.equal(a, fit.sample(500, seed=8)["y"])
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("kwargs,hint", [({"step": 10}, "did you mean steps="),
                                         ({"n_particles": 4}, "did you mean num_particles="),
                                         ({"num_particle": 4}, "did you mean num_particles="),
                                         ({"init_scale": 0.5}, r"family=bbvi.MeanField\(init_scale=")])
def test_misspelt_keywords_get_a_suggestion(kwargs, hint):
    """Before: Python's TypeError with no suggestion; init_scale documented for fit but only on families."""
    with pytest.raises(bbvi.ConfigError, match=hint):
        bbvi.fit(two_latents(), **kwargs)
    with pytest.raises(bbvi.ConfigError, match="bbvi.init"):
        bbvi.init(two_latents(), **kwargs)


def test_a_discrete_only_fit_raises_no_torch_warning():
    """Before: the adaptive rule's R-hat took the variance of an empty tensor: torch's 'var(): degrees of
    freedom is <= 0' warning reached the user."""
    def log_joint(z, data):
        return torch.where(z["b"] > 0.5, torch.tensor(0.0, dtype=torch.float64).log1p(),
                           torch.tensor(-1.0, dtype=torch.float64)).expand(z["b"].shape)
    model = bbvi.Model(log_joint, latents={"b": bbvi.Latent((), support=constraints.boolean)}, name="coin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", bbvi.ReliabilityWarning)
        fit = bbvi.fit(model, seed=0)
    p1 = float(fit.sample(4000)["b"].double().mean())
    assert abs(p1 - 1 / (1 + torch.e ** -1)) < 0.04


@pytest.mark.parametrize("support,shape,message", [
    (constraints.simplex, (1,), "single possible value"),
    (constraints.corr_cholesky, (1, 1), "single possible value"),
    (constraints.interval(1.0, 1.0), (), "empty or a single point"),
    (constraints.interval(2.0, 1.0), (), "lower bound 2.0 must be below its upper bound 1.0"),
])
def test_degenerate_supports_get_a_clear_error(support, shape, message):
    """Before: StopIteration, 'math domain error', or (interval(2, 1)) accepted."""
    def log_joint(z, data):
        return z["x"].reshape(z["x"].shape[0], -1).sum(-1) * 0.0
    with pytest.raises(bbvi.ModelError, match=message):
        bbvi.fit(bbvi.Model(log_joint, latents={"x": bbvi.Latent(shape, support=support)}, name="c"), steps=5)


def test_init_values_that_are_not_numbers_get_a_clear_error():
    """Before: TypeError: new(): invalid data type 'str'."""
    with pytest.raises(bbvi.ConfigError, match=r"init_values\['a'\] = 'abc' is not a number"):
        bbvi.fit(two_latents(), steps=5, init_values={"a": "abc"})


def test_a_callback_that_raises_keeps_the_fit(tmp_path):
    """Before: the callback's exception escaped and the fit was lost."""
    def bad(state):
        if state.step == 30:
            raise RuntimeError("my callback broke")
        return False
    path = tmp_path / "ck.pt"
    with pytest.raises(bbvi.FitError, match="callback raised RuntimeError: my callback broke") as info:
        bbvi.fit(two_latents(), steps=100, callbacks=[bad], checkpoint=path, diagnose=False)
    assert info.value.result.num_steps == 30 and path.exists()


@pytest.mark.parametrize("factor", [float("nan"), -1.0])
def test_a_schedule_that_would_descend_is_refused(factor):
    """Before: a NaN or negative learning-rate factor ran as silent gradient descent, status 'completed'."""
    with pytest.raises(bbvi.ConfigError, match="must be finite and >= 0"):
        bbvi.fit(two_latents(), steps=20, schedule=lambda t: 1.0 if t < 10 else factor)


def test_an_infinite_khat_reads_as_not_reliable():
    """Before: k-hat = inf read 'not computable', as if there were too few draws."""
    from bbvi.diagnostics import khat_reading
    assert khat_reading(float("inf")).startswith("not reliable")
    assert khat_reading(float("nan")).startswith("not computable")


def _nan_gradient_model(threshold):
    """N(1, 1), written with a torch.where whose unselected branch is NaN for mu > threshold: the log-joint's
    value is right everywhere, its gradient is NaN at those particles."""
    def log_joint(z, data):
        mu = z["mu"]
        return Normal(1.0, 1.0).log_prob(mu) + torch.where(mu < threshold, 0.0 * torch.sqrt(threshold - mu),
                                                           torch.zeros_like(mu))
    return bbvi.Model(log_joint, latents={"mu": bbvi.Latent(())}, name=f"nan_grad_{threshold}")


def test_a_particle_with_a_nan_gradient_is_dropped_not_the_step():
    """Before: one particle's NaN gradient made the whole step's gradient NaN; steps were skipped until a
    FitError (reparam, 133 of 134 steps failed with NaN gradients beyond mu > 1.5)."""
    fit = bbvi.fit(_nan_gradient_model(4.0), estimator="reparam", seed=0)  # rare: 0.13% of N(1, 1) beyond
    draws = fit.sample(4000)["mu"]
    assert abs(float(draws.mean()) - 1.0) < 0.1 and abs(float(draws.std()) - 1.0) < 0.1
    assert fit.num_bad_particles > 0 and fit.num_failed_steps == 0


def test_many_nan_gradients_are_warned_not_silent():
    """Where a third of q's mass has NaN gradients, dropping them biases the fit: the warning says so."""
    with pytest.warns(bbvi.ReliabilityWarning, match="NaN/inf log-joint or gradient"):
        bbvi.fit(_nan_gradient_model(1.5), estimator="reparam", seed=0, max_steps=1500)
