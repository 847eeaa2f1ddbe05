"""Resume (bbvi/checkpoint.py, bbvi/options.py: a resume's new length): a resume in a new process, Ctrl-C anywhere in a
step, extending a finished or adaptive fit (each failed before its fix, issue 16), and one resume test over the
loop's features: a fit stopped at step k with a checkpoint and resumed from it is the uninterrupted fit, bit for bit
(ELBO trace, parameters, step and failure counts), whatever the fit carries between steps: plain, minibatches with
control variates (stopped mid-epoch), Rao-Blackwellized score terms, the natural gradient, the adaptive rule, the
compiled step."""
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch.distributions import Normal

import bbvi
import bbvi.convergence
from fitcheck import assert_same_fit
from models.conjugate import gamma_poisson, normal_normal
from targets import logreg_data as _data
from targets import logreg_terms as _factors  # factor terms, one per row of the plate 'obs'

F64 = torch.float64


def _total(z, d):
    return sum(v.reshape(v.shape[0], -1).sum(-1) for v in _factors(z, d).values())


def _model(log_joint, plates=False):
    return bbvi.Model(log_joint, {"w": bbvi.Latent(shape=(3,))}, data=_data(300),
                      plates={"obs": ("X", "y")} if plates else None, name="logreg")


HAS_COMPILER = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
FEATURES = {   # name: (model, fit options, the step to stop at)
    "plain": (lambda: _model(_total), dict(steps=60), 25),
    "minibatch + control variates": (lambda: _model(_factors, plates=True),
                                     dict(steps=60, subsample_size=40, estimator="reparam"), 17),   # 7.5 steps/epoch
    "Rao-Blackwell": (lambda: _model(_factors), dict(steps=60, estimator="score", baseline="loo"), 25),
    "natural gradient": (lambda: _model(_total), dict(steps=60, optimizer="natural"), 25),
    "adaptive rule": (lambda: _model(_total), dict(max_steps=400), 130),
    "compiled": (lambda: _model(_total), dict(steps=60, compile=True), 25),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_a_resumed_fit_is_the_uninterrupted_fit(feature, tmp_path):
    if feature == "compiled" and not HAS_COMPILER:
        pytest.skip("torch.compile's CPU backend needs a C++ compiler; none on this machine")
    make, options, stop = FEATURES[feature]
    model = make()
    kw = dict(seed=0, diagnose=False, **options)
    want = bbvi.fit(model, **kw)
    path = str(tmp_path / "ck.pt")
    part = bbvi.fit(model, **kw, checkpoint=path, checkpoint_every=1000, callbacks=[lambda s: s.step == stop])
    assert part.num_steps == stop < want.num_steps
    resumed = bbvi.fit(model, **kw, resume=path)
    assert_same_fit(want, resumed)
    assert resumed.status == want.status and resumed.levels == want.levels
    if feature == "Rao-Blackwell":
        assert want.structure is not None          # the score terms were Rao-Blackwellized
    if feature == "minibatch + control variates":
        assert want.settings.get("subsample_cv") is True


HERE = os.path.dirname(os.path.abspath(__file__))


EXTENDED = "not the same as a single fit"


# ---- 4. custom schedules and optimizers, resumed in a new process ----------------------------------------------
@pytest.mark.slow
def test_a_custom_schedule_and_optimizer_resume_in_a_new_process(tmp_path):
    """Before: the fit's settings held str(schedule) and str(optimizer), which for a function show its memory
    address ('<function halving at 0x7f...>'): a resume in a new process found 'other settings' and refused."""
    (tmp_path / "my_rules.py").write_text(textwrap.dedent("""
        import torch

        def halving(t):
            return 0.5 ** (t // 40)

        def momentum_sgd(params, lr):
            return torch.optim.SGD(params, lr=lr, momentum=0.9)
    """))
    path = str(tmp_path / "ck.pt")
    head = f"""
        import sys
        sys.path[:0] = [{str(tmp_path)!r}, {HERE!r}]
        import torch, bbvi
        from models.conjugate import gamma_poisson
        from my_rules import halving, momentum_sgd
        torch.set_num_threads(1)
        model, _ = gamma_poisson()
        kw = dict(steps=120, seed=6, schedule=halving, optimizer=momentum_sgd, lr=0.02, diagnose=False)
    """
    first = textwrap.dedent(head) + textwrap.dedent(f"""
        part = bbvi.fit(model, **kw, checkpoint={path!r}, callbacks=[lambda s: s.step == 70])
        assert part.num_steps == 70, part.num_steps
    """)
    second = textwrap.dedent(head) + textwrap.dedent(f"""
        resumed = bbvi.fit(model, **kw, resume={path!r})
        full = bbvi.fit(model, **kw)
        assert resumed.num_steps == 120
        assert torch.equal(resumed.elbo, full.elbo)
        assert all(torch.equal(resumed.params[g][k], full.params[g][k]) for g in full.params for k in full.params[g])
        print("same fit")
    """)
    for script in (first, second):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    assert "same fit" in out.stdout


# ---- 5. Ctrl-C anywhere in a step ----------------------------------------------------------------------------
TRAP = {"where": None, "countdown": 0}


def _sprung(where):
    if TRAP["where"] == where:
        TRAP["countdown"] -= 1
        if TRAP["countdown"] == 0:
            TRAP["where"] = None
            return True
    return False


class _Backward(torch.autograd.Function):
    """The identity; its backward is where a Ctrl-C can land in the gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if _sprung("backward"):
            raise KeyboardInterrupt
        return grad


class _TrappedAdam(torch.optim.Adam):
    """Adam whose step is interrupted after it has updated the parameters and its moments."""

    def step(self, closure=None):
        out = super().step(closure)
        if _sprung("optimizer"):
            raise KeyboardInterrupt
        return out


def _trapped_model():
    def log_joint(z, x):
        if _sprung("log_joint"):
            raise KeyboardInterrupt
        if _sprung("no_grad"):   # a region that turns autograd off, cut short before it turns it back on
            torch.set_grad_enabled(False)
            raise KeyboardInterrupt
        mu, s = z["mu"], z["s"]
        lp = Normal(0.0, 5.0).log_prob(mu) + Normal(0.0, 1.0).log_prob(s.log()) - s.log()
        return _Backward.apply(lp + Normal(mu[:, None], s[:, None]).log_prob(x).sum(-1))
    x = torch.tensor([0.3, -1.2, 2.1, 0.8, 1.5, -0.4], dtype=torch.float64)
    return bbvi.Model(log_joint, {"mu": bbvi.Latent(), "s": bbvi.Latent(support=torch.distributions.constraints.positive)},
                      data=x, name="trapped")


@pytest.mark.parametrize("where,countdown,kw", [
    ("log_joint", 1, dict(steps=150)),
    ("log_joint", 3, dict(steps=150, estimator="score", baseline="ema")),
    ("no_grad", 2, dict(steps=150)),
    ("backward", 1, dict(steps=150)),
    ("backward", 2, dict(steps=150, family="fullrank")),
    ("optimizer", 1, dict(steps=150)),
    ("optimizer", 2, dict(steps=None, max_steps=400)),
    ("rule", 1, dict(steps=None, max_steps=400)),
])
def test_ctrl_c_anywhere_in_a_step_checkpoints_the_last_whole_step(tmp_path, monkeypatch, where, countdown, kw):
    """Before: a KeyboardInterrupt inside a step (from the log-joint, the gradient, the optimizer's update or
    the adaptive rule's bookkeeping) left that step half done in the state written to the checkpoint and
    returned: the generator had advanced, or the parameters and Adam's moments had moved without the step
    being counted, or the rule had recorded the step only in part; resuming gave another fit than the
    uninterrupted one (its ELBO trace differed). A Ctrl-C inside a region with autograd off left autograd
    off for the whole process after fit returned."""
    model = _trapped_model()
    kw = dict(kw, seed=3, optimizer=_TrappedAdam, init_strategy="zero", diagnose=False)
    if where == "rule":   # the rule's bookkeeping after the step: its parameter sums of the window
        flat = bbvi.convergence._flat

        def trapped_flat(params):
            if _sprung("rule"):
                raise KeyboardInterrupt
            return flat(params)
        monkeypatch.setattr(bbvi.convergence, "_flat", trapped_flat)
    TRAP.update(where=None)
    full = bbvi.fit(model, **kw)
    arm_at = 140 if kw["steps"] else 200   # adaptive: in the half of level 0 (steps 1..350) that it averages

    def arm(state):
        if state.step == arm_at:
            TRAP.update(where=where, countdown=countdown)
    path = str(tmp_path / "ck.pt")
    part = bbvi.fit(model, **kw, checkpoint=path, checkpoint_every=1000, callbacks=[arm])
    assert TRAP["where"] is None, "the trap must have sprung"
    assert part.interrupted and torch.is_grad_enabled()
    whole = part.num_steps
    assert arm_at <= whole <= arm_at + countdown and torch.equal(part.elbo, full.elbo[:whole])
    assert torch.load(path, weights_only=True)["step"] == whole
    assert_same_fit(full, bbvi.fit(model, **kw, resume=path))


# ---- 6. resume with more steps -------------------------------------------------------------------------------
def _halving(t):
    return 0.5 ** (t // 100)


@pytest.mark.parametrize("schedule", [None, "constant", _halving])
def test_resume_extends_a_finished_fit_to_a_single_fit_of_the_new_length(tmp_path, schedule):
    """Before: resume=path with steps=250 after a 100-step fit was refused ('saved with other settings ...
    steps'): running on meant starting over."""
    model, _ = gamma_poisson()
    path = str(tmp_path / "ck.pt")
    kw = dict(schedule=schedule, seed=8, diagnose=False)
    bbvi.fit(model, steps=100, **kw, checkpoint=path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        longer = bbvi.fit(model, steps=250, **kw, resume=path, checkpoint=path)
    assert_same_fit(bbvi.fit(model, steps=250, **kw), longer)
    assert "the same as a single fit with steps=250" in longer.settings["extended"]
    with warnings.catch_warnings():   # a later resume of the extended checkpoint keeps the note
        warnings.simplefilter("error")
        again = bbvi.fit(model, steps=250, **kw, resume=path)
    assert_same_fit(longer, again)
    assert again.settings["extended"] == longer.settings["extended"]


@pytest.mark.parametrize("schedule", ["auto", "cosine", "exponential"])
def test_resume_extending_a_schedule_that_depends_on_the_length_warns(tmp_path, schedule):
    """Before: refused as 'other settings'. These schedules depend on the total step count, so the extension
    cannot be a single fit of the new length: it must say so (UserWarning and fit.settings['extended'])."""
    model, _ = gamma_poisson()
    path = str(tmp_path / "ck.pt")
    bbvi.fit(model, steps=100, schedule=schedule, seed=8, checkpoint=path, diagnose=False)
    name = "cosine" if schedule == "auto" else schedule
    with pytest.warns(UserWarning, match=f"{EXTENDED} with steps=250: the '{name}' schedule depends on the total"):
        longer = bbvi.fit(model, steps=250, schedule=schedule, seed=8, resume=path, diagnose=False)
    assert longer.num_steps == 250 and longer.status == "completed"
    assert EXTENDED in longer.settings["extended"]


def test_resume_with_fewer_steps_than_already_run_is_refused(tmp_path):
    """Before: refused, but as 'other settings ... steps', which did not say what to do; now it says the fit
    has run 100 steps and the length must be at least that (and a change of rule is refused with how to)."""
    model, _ = gamma_poisson()
    path = str(tmp_path / "ck.pt")
    bbvi.fit(model, steps=100, schedule=None, checkpoint=path, diagnose=False)
    with pytest.raises(bbvi.ConfigError, match="already run 100 steps; steps=60 is fewer. Resume with steps >= 100"):
        bbvi.fit(model, steps=60, schedule=None, resume=path)
    fixed = str(tmp_path / "fixed.pt")
    bbvi.fit(model, steps=100, checkpoint=fixed, diagnose=False)
    with pytest.raises(bbvi.ConfigError, match="a resume keeps the step-size rule.*a larger steps=N"):
        bbvi.fit(model, max_steps=500, resume=fixed)
    # a shorter length that has not been reached yet is a single fit of that length too
    bbvi.fit(model, steps=100, schedule=None, checkpoint=path, callbacks=[lambda s: s.step == 40], diagnose=False)
    assert_same_fit(bbvi.fit(model, steps=70, schedule=None, diagnose=False),
                    bbvi.fit(model, steps=70, schedule=None, resume=path, diagnose=False))


def test_resume_extends_an_interrupted_adaptive_fit_with_a_larger_max_steps_exactly(tmp_path):
    """Before: refused as 'other settings ... max_steps'. An adaptive fit cut short before its cap that had not
    converged goes on as a single fit with the new max_steps would have, bit for bit."""
    model, _ = normal_normal()
    path = str(tmp_path / "ck.pt")
    bbvi.fit(model, max_steps=300, seed=1, checkpoint=path, callbacks=[lambda s: s.step == 150], diagnose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        longer = bbvi.fit(model, max_steps=700, seed=1, resume=path, diagnose=False)
    assert_same_fit(bbvi.fit(model, max_steps=700, seed=1, diagnose=False), longer)
    assert "the same as a single fit with max_steps=700" in longer.settings["extended"]


def test_resume_extends_a_converged_or_capped_adaptive_fit_with_a_new_level(tmp_path):
    """Before: refused as 'other settings ... max_steps'. A converged adaptive fit (its test passed; a single
    longer fit stops there too) goes on with one more level at the next learning rate; one that stopped at
    its cap goes on at the same learning rate from the average it reported; both say so."""
    model, _ = normal_normal()
    path = str(tmp_path / "ck.pt")
    done = bbvi.fit(model, max_steps=2000, seed=3, checkpoint=path, diagnose=False)
    assert done.status == "converged"
    with pytest.warns(UserWarning, match=f"{EXTENDED} with max_steps=4000: it had converged at step "
                                         f"{done.num_steps}.*next learning rate"):
        more = bbvi.fit(model, max_steps=4000, seed=3, resume=path, diagnose=False)
    assert more.num_steps > done.num_steps and more.status in ("converged", "max_steps")
    assert torch.equal(more.elbo[:done.num_steps], done.elbo)
    assert more.levels[len(done.levels)]["lr"] == done.levels[-1]["lr"] * bbvi.Adaptive().decay

    capped = bbvi.fit(model, max_steps=300, seed=3, checkpoint=path, diagnose=False)
    assert capped.status == "max_steps"
    with pytest.warns(UserWarning, match=f"{EXTENDED} with max_steps=600: it had stopped at its cap max_steps=300"):
        more = bbvi.fit(model, max_steps=600, seed=3, resume=path, diagnose=False)
    assert more.num_steps > 300 and "stopped at its cap" in more.settings["extended"]
    assert more.levels[len(capped.levels)]["lr"] == capped.levels[-1]["lr"]
