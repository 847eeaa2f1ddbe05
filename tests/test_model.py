"""Latents, supports and bijections, and the clear errors a malformed model gets."""
import time

import numpy as np
import pytest
import torch
from torch.distributions import Normal, constraints

import bbvi
from bbvi.constraints import bijection, ordered_vector, positive_ordered_vector


def simple(log_joint, **latents):
    return bbvi.Model(log_joint, latents or {"mu": bbvi.Latent()}, name="m")


def ok_log_joint(z, data):
    return Normal(0.0, 1.0).log_prob(z["mu"])


@pytest.mark.parametrize("support,shape", [
    (constraints.real, (2,)), (constraints.positive, (3,)), (constraints.unit_interval, ()),
    (constraints.interval(-1.0, 3.0), (2,)), (constraints.simplex, (4,)), (constraints.lower_cholesky, (3, 3)),
    (constraints.corr_cholesky, (3, 3)), (ordered_vector, (4,)), (positive_ordered_vector, (3,)),
    (constraints.greater_than(2.0), ()),
])
def test_bijection_lands_in_support_and_its_log_det_jacobian_is_right(support, shape):
    """T(u) is in the support; log|det J| matches autograd's Jacobian of the map restricted to free coordinates."""
    model = bbvi.Model(lambda z, d: z["x"].reshape(z["x"].shape[0], -1).sum(-1) * 0,
                       {"x": bbvi.Latent(shape=shape, support=support)})
    g = torch.Generator().manual_seed(0)
    u = torch.randn(4, model.dim, generator=g, dtype=torch.float64)
    z, ladj = model.constrain(u)
    assert z["x"].shape == (4,) + shape
    assert bool(support.check(z["x"]).all())
    torch.testing.assert_close(model.unconstrain(z), u, atol=1e-8, rtol=1e-8)
    t = bijection(support)
    for s in range(4):
        def f(v):
            out = t(v.reshape(model.blocks[0].unconstrained_shape)).reshape(-1)
            if support in (constraints.simplex,):
                out = out[:-1]                           # the last coordinate is determined by the others
            if support in (constraints.lower_cholesky,):
                n = shape[0]
                out = out.reshape(n, n)[tuple(torch.tril_indices(n, n))]
            if support in (constraints.corr_cholesky,):
                n = shape[0]
                out = out.reshape(n, n)[tuple(torch.tril_indices(n, n, -1))]
            return out
        jac = torch.autograd.functional.jacobian(f, u[s])
        torch.testing.assert_close(ladj[s], torch.linalg.slogdet(jac)[1], atol=1e-8, rtol=1e-8)


def test_flat_layout_and_particles_first():
    model = bbvi.Model(lambda z, d: z["a"].sum(-1) + z["b"].sum((-1, -2)) + z["c"],
                       {"a": bbvi.Latent(shape=(3,), support=constraints.simplex),
                        "b": bbvi.Latent(shape=(2, 2)), "c": bbvi.Latent(support=constraints.positive),
                        "k": bbvi.Latent(shape=(5,), support=constraints.boolean)})
    assert model.dim == 2 + 4 + 1 and set(model.discrete) == {"k"}
    z, ladj = model.constrain(torch.zeros(6, model.dim))
    assert z["a"].shape == (6, 3) and z["b"].shape == (6, 2, 2) and z["c"].shape == (6,) and ladj.shape == (6,)


@pytest.mark.parametrize("latent_kwargs,match", [
    (dict(shape=(0,)), "positive ints"), (dict(shape=(-2,)), "positive ints"), (dict(shape=(2.5,)), "positive"),
    (dict(shape="ab"), "positive ints"), (dict(support="positive"), "constraints object"),
])
def test_bad_latents(latent_kwargs, match):
    with pytest.raises(bbvi.ModelError, match=match):
        bbvi.Latent(**latent_kwargs)


def test_unsupported_and_ill_shaped_supports():
    with pytest.raises(bbvi.ModelError, match="'x'.*no bijection"):
        bbvi.Model(ok_log_joint, {"x": bbvi.Latent(shape=(2, 2), support=constraints.positive_semidefinite)})
    with pytest.raises(bbvi.ModelError, match="'x'.*needs at least 1"):
        bbvi.Model(ok_log_joint, {"x": bbvi.Latent(support=constraints.simplex)})
    with pytest.raises(bbvi.ModelError, match="'k'.*unbounded"):
        bbvi.Model(ok_log_joint, {"k": bbvi.Latent(support=constraints.nonnegative_integer)})
    # reliability III, 7: integer_interval(0.5, 2.5) was cut to (0, 2) and drew 0, outside the support written
    with pytest.raises(bbvi.ModelError, match=r"'k'.*whole-number bounds.*integer_interval\(1, 2\)"):
        bbvi.Model(ok_log_joint, {"k": bbvi.Latent(support=constraints.integer_interval(0.5, 2.5))})
    model = bbvi.Model(ok_log_joint, {"mu": bbvi.Latent(),
                                      "k": bbvi.Latent(support=constraints.integer_interval(1.0, 3.0))})
    assert set(model.discrete) == {"k"}   # whole floats are whole numbers
    with pytest.raises(bbvi.ModelError, match="'L'.*does not fit"):
        bbvi.Model(ok_log_joint, {"L": bbvi.Latent(shape=(2, 3), support=constraints.lower_cholesky)})
    with pytest.raises(bbvi.ModelError, match="bbvi.Latent"):
        bbvi.Model(ok_log_joint, {"mu": (3,)})
    with pytest.raises(bbvi.ModelError, match="non-empty"):
        bbvi.Model(ok_log_joint, {})
    with pytest.raises(bbvi.ModelError, match="callable"):
        bbvi.Model("not a function", {"mu": bbvi.Latent()})


@pytest.mark.parametrize("log_joint,match", [
    (lambda z, d: 3.0, r"must return a torch.Tensor of shape \(S,\) = \(3,\), got float"),
    (lambda z, d: z["mu"].sum(), r"returned shape \(\) for S=3 particles; expected \(3,\).*summed over particles"),
    (lambda z, d: z["mu"][:, None].expand(3, 4), r"returned shape \(3, 4\) for S=3"),
    (lambda z, d: (z["mu"] * 0).long(), "dtype torch.int64"),
    (lambda z, d: z["mu"] + torch.log(torch.tensor(-1.0)), "is nan at the initial point"),
    (lambda z, d: z["mu"] + z["nu"], "reads latent 'nu', which is not declared"),
    (lambda z, d: z["mu"] + torch.ones(2), r"raised RuntimeError on its first call, with S=3 particles and z shapes \{mu: \(3,\)\}"),
])
def test_bad_log_joints_get_clear_errors(log_joint, match):
    with pytest.raises(bbvi.ModelError, match=match):
        bbvi.fit(bbvi.Model(log_joint, {"mu": bbvi.Latent()}, name="bad"), steps=1)


def test_declared_but_unread_latent_is_an_error():
    model = bbvi.Model(ok_log_joint, {"mu": bbvi.Latent(), "extra": bbvi.Latent(shape=(2,))})
    with pytest.raises(bbvi.ModelError, match=r"\['extra'\] are declared but log_joint never reads"):
        bbvi.fit(model, steps=1)


@pytest.mark.parametrize("copy", [dict, lambda z: {**z}, lambda z: dict(z.items())])
def test_a_log_joint_that_copies_z_is_not_flagged(copy):
    def log_joint(z, data):
        z = copy(z)
        return Normal(0.0, 1.0).log_prob(z["a"]) + Normal(0.0, 1.0).log_prob(z["b"])
    fit = bbvi.fit(bbvi.Model(log_joint, {"a": bbvi.Latent(), "b": bbvi.Latent()}), steps=5)
    assert fit.status == "completed"


def test_unvectorized_log_joint_loops_over_particles():
    def one(z, x):
        assert z["mu"].shape == ()
        return Normal(z["mu"], 1.0).log_prob(x).sum()
    x = torch.tensor([0.5, 1.5, 1.0])
    looped = bbvi.Model(one, {"mu": bbvi.Latent()}, data=x, vectorized=False)
    batched = bbvi.Model(lambda z, x: Normal(z["mu"][:, None], 1.0).log_prob(x).sum(-1), {"mu": bbvi.Latent()},
                         data=x)
    u = torch.randn(5, 1)
    torch.testing.assert_close(looped.log_density(u), batched.log_density(u))
    fit = bbvi.fit(looped, steps=200, num_particles=4)
    assert fit.status == "completed"


def test_differentiability_is_detected():
    def detached(z, d):
        return torch.as_tensor(np.asarray(-0.5 * z["mu"].detach().numpy() ** 2))
    model = bbvi.Model(detached, {"mu": bbvi.Latent()})
    st = bbvi.init(model, estimator="auto")
    assert not st.report.differentiable and st.plan.path == "score"
    partly = bbvi.Model(lambda z, d: -0.5 * z["a"] ** 2 - 0.5 * z["b"].detach() ** 2,
                        {"a": bbvi.Latent(), "b": bbvi.Latent()})
    st = bbvi.init(partly, estimator="auto")
    assert st.report.nondifferentiable == ("b",) and st.plan.path == "score"
    with pytest.raises(bbvi.ConfigError, match=r"in latent\(s\) \['b'\]"):
        bbvi.init(partly, estimator="reparam")
    with pytest.raises(bbvi.ModelError, match="declared differentiable"):
        bbvi.init(bbvi.Model(partly.log_joint, partly.latents, differentiable=True))


def test_derived_quantities_are_checked():
    model = bbvi.Model(ok_log_joint, {"mu": bbvi.Latent()}, derived=lambda z, d: {"mu": z["mu"]})
    fit = bbvi.fit(model, steps=10)
    with pytest.raises(bbvi.ModelError, match="name of a latent"):
        fit.sample(10)
    model = bbvi.Model(ok_log_joint, {"mu": bbvi.Latent()}, derived=lambda z, d: {"two": 2.0})
    with pytest.raises(bbvi.ModelError, match="'two' must be a Tensor"):
        bbvi.fit(model, steps=10).sample(10)


# ---- #19: an integer latent with a huge range ----------------------------------------------------------------
def test_huge_integer_interval_is_refused_up_front():
    """Before: a latent with integer_interval(0, 10**6) ran 76 s and then failed with a 128 GB allocation
    RuntimeError in families.py. Now a ModelError at once naming the latent and its 1000001 categories; ranges up
    to 10**4 categories still build."""
    t = time.perf_counter()
    with pytest.raises(bbvi.ModelError, match=r"'k'.*1000001 categories") as err:
        bbvi.Model(lambda z, d: -((z["k"].double() - 5e5) / 1e3) ** 2,
                   {"k": bbvi.Latent(support=constraints.integer_interval(0, 10 ** 6))})
    assert time.perf_counter() - t < 5
    assert "rounding" in str(err.value)
    m = bbvi.Model(lambda z, d: -((z["k"].double() - 50) / 10) ** 2,
                   {"k": bbvi.Latent(support=constraints.integer_interval(0, 10 ** 4 - 1))})
    assert m.discrete["k"][2] == 10 ** 4


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
