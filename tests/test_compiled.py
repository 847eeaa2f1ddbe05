"""compile=True (bbvi.compiled): the compiled step follows the eager step within rounding on every estimator it
covers, drops and counts NaN particles as the eager step does, falls back to the eager step where the log-joint
raises, resumes bit for bit from its checkpoints, and refuses what it does not cover with a ConfigError."""
import shutil

import pytest
import torch

import bbvi
from fitcheck import assert_same_fit
from targets import logreg_data as _data  # the same small logistic-regression data

F64 = torch.float64
pytestmark = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                reason="torch.compile's CPU backend needs a C++ compiler; none on this machine")


def _log_joint(z, d):
    w = z["w"]
    logits = w @ d["X"].T
    return -0.5 * (w * w).sum(-1) + (d["y"] * logits - torch.nn.functional.softplus(logits)).sum(-1)


def _flaky(z, d):
    """NaN where w[0] > 1.2: some particles of every step early on (q starts wide at the zero start)."""
    lp = _log_joint(z, d)
    return torch.where(z["w"][:, 0] > 1.2, torch.full_like(lp, float("nan")), lp)


def _model(log_joint=_log_joint, name="logreg"):
    return bbvi.Model(log_joint, {"w": bbvi.Latent(shape=(3,))}, data=_data(200), name=name)


def _close(a, b, tol):
    for k in a.params["continuous"]:
        torch.testing.assert_close(a.params["continuous"][k], b.params["continuous"][k], rtol=tol, atol=tol)
    torch.testing.assert_close(a.elbo, b.elbo, rtol=tol, atol=tol)


@pytest.mark.parametrize("estimator,family", [("reparam", "fullrank"), ("stl", "meanfield"),
                                              ("score", "meanfield")])
@pytest.mark.slow
def test_the_compiled_step_follows_the_eager_step(estimator, family, tmp_path):
    """300 steps from the zero start with a log-joint that is NaN at some particles: the same parameters and ELBO
    trace within 1e-9 (float64; the same particles, sums fused in another order), the same bad-particle count;
    and (reparam, to keep the compiling short) a compiled fit killed at step 120 resumes bit for bit."""
    kw = dict(estimator=estimator, family=family, steps=300, lr=0.05, seed=3, init_strategy="zero", diagnose=False)
    model = _model(_flaky, "flaky")
    eager = bbvi.fit(model, **kw)
    compiled = bbvi.fit(model, compile=True, **kw)
    assert eager.num_bad_particles > 0 and compiled.settings["compile"] is True
    assert compiled.num_bad_particles == eager.num_bad_particles
    assert torch.distributions.Distribution._validate_args   # torch.compile switches it off; put back
    _close(compiled, eager, 1e-9)
    if estimator != "reparam":
        return
    path = str(tmp_path / "ck.pt")
    bbvi.fit(model, compile=True, **kw, checkpoint=path, checkpoint_every=50, callbacks=[lambda s: s.step == 120])
    assert_same_fit(compiled, bbvi.fit(model, compile=True, **kw, resume=path))


def test_a_compiled_default_fit_ends_where_the_eager_one_does():
    """The default fit (MAP start, the adaptive rule and its restarts) with compile=True: the same number of
    steps and status, parameters within rounding."""
    model = _model()
    eager = bbvi.fit(model, max_steps=2000, diagnose=False)
    compiled = bbvi.fit(model, max_steps=2000, diagnose=False, compile=True)
    assert compiled.num_steps == eager.num_steps and compiled.status == eager.status
    _close(compiled, eager, 1e-8)


def _cholesky(z, d):
    """A 2 x 2 correlation matrix with r = 1.2 tanh(2 w[1]): not positive definite where |r| >= 1, and the
    Cholesky raises for the whole batch."""
    r = 1.2 * torch.tanh(2 * z["w"][:, 1])
    one = torch.ones_like(r)
    M = torch.stack([torch.stack([one, r], -1), torch.stack([r, one], -1)], -2)
    L = torch.linalg.cholesky(M)
    return _log_joint(z, d) + torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)


def test_steps_where_the_log_joint_raises_are_redone_by_the_eager_step():
    """Where the Cholesky raises inside the compiled step, that step is redone eagerly from the same generator
    state (the eager step evaluates the particles one at a time and counts those that raise): the fit equals
    the eager fit within rounding, with the same counts; a log-joint torch.compile cannot trace (a Python branch
    on a tensor's value) is a ConfigError at the first step."""
    kw = dict(estimator="reparam", steps=150, lr=0.05, seed=1, init_strategy="zero", diagnose=False)
    model = _model(_cholesky, "cholesky")
    eager = bbvi.fit(model, **kw)
    compiled = bbvi.fit(model, compile=True, **kw)
    assert eager.num_bad_particles > 0 and eager.num_raised_steps > 0
    assert (compiled.num_bad_particles, compiled.num_raised_steps) == (eager.num_bad_particles,
                                                                       eager.num_raised_steps)
    _close(compiled, eager, 1e-9)

    def branches(z, d):
        if bool((z["w"][:, 1] > 1.5).any()):
            return _log_joint(z, d) - 1.0
        return _log_joint(z, d)
    with pytest.raises(bbvi.ConfigError, match="torch.compile could not run"):
        bbvi.fit(_model(branches, "branches"), compile=True, **kw)


def test_what_compile_does_not_cover_is_a_config_error():
    model = _model()
    for bad, what in ((dict(family="flow"), "family is Flow"), (dict(optimizer="sgd"), "optimizer is SGD"),
                      (dict(estimator="score", baseline="ema"), "baseline is EMA"),
                      (dict(compile="yes"), "compile must be True or False")):
        kw = dict(dict(steps=5, diagnose=False, compile=True), **bad)
        with pytest.raises(bbvi.ConfigError, match=what):
            bbvi.fit(model, **kw)


def test_a_log_joint_that_reads_state_a_callback_changes_goes_on_eagerly_and_says_so():
    """Reliability III, 5: a temperature annealed by a callback stayed at its traced value inside the graph, and
    the compiled fit returned the prior (mu -0.10 +- 10 against 2.25 +- 0.50 eager) under a generic warning. Now
    the compiled step's ELBO is compared with the eager log-joint's at steps 1, 2, 4, ...: they differ, a
    ReliabilityWarning says why, and the fit goes on eagerly, ending where the eager fit ends."""
    temperature = {"t": 0.0}

    def annealed(z, d):
        return temperature["t"] * _log_joint(z, d) - 0.5 * (z["w"] * z["w"]).sum(-1) * (1 - temperature["t"])

    def warm(state):
        temperature["t"] = min(1.0, state.step / 50)
        return False

    def run(**kw):
        temperature["t"] = 0.0
        return bbvi.fit(_model(annealed, "annealed"), steps=400, seed=0, diagnose=False, callbacks=[warm], **kw)
    eager = run()
    with pytest.warns(bbvi.ReliabilityWarning, match="differs from the eager log-joint's"):
        compiled = run(compile=True)
    torch.testing.assert_close(compiled.params["continuous"]["loc"], eager.params["continuous"]["loc"], atol=0.05,
                               rtol=0)
