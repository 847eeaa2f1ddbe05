"""Reliability II (issue 16), checkpoints and resume: each test failed before its fix."""
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch
from torch.distributions import Normal

import bbvi
import bbvi.convergence
from fitcheck import assert_same_fit
from models.conjugate import gamma_poisson, normal_normal

HERE = os.path.dirname(os.path.abspath(__file__))
EXTENDED = "not the same as a single fit"


def _flip(path, position):
    data = bytearray(open(path, "rb").read())
    data[position] ^= 0x01
    bad = f"{path}.flipped"
    with open(bad, "wb") as f:
        f.write(data)
    return bad


def _positions(path):
    """Nine positions spread over the file (its middle included): the pickle of the containers, the tensors'
    bytes and the zip records between them."""
    size = os.path.getsize(path)
    return sorted({size * k // 10 for k in range(1, 10)})


# ---- 1. a flipped bit ----------------------------------------------------------------------------------------
def test_a_flipped_byte_in_a_checkpoint_or_a_saved_result_is_refused(tmp_path):
    """Before: torch.load does not check the zip records' CRCs, so most flipped bytes (in a tensor's bytes,
    in a number of the pickle) were accepted: resume and bbvi.load went on with changed parameters, optimizer
    state or ELBO trace."""
    model, _ = gamma_poisson()
    ck, saved = str(tmp_path / "ck.pt"), str(tmp_path / "fit.pt")
    fit = bbvi.fit(model, steps=60, seed=2, checkpoint=ck, diagnose=False)
    fit.save(saved)
    for position in _positions(ck):
        with pytest.raises(bbvi.ConfigError, match="corrupted: checksum mismatch|not a readable bbvi checkpoint"):
            bbvi.fit(model, steps=60, seed=2, resume=_flip(ck, position), diagnose=False)
    for position in _positions(saved):
        with pytest.raises(bbvi.ConfigError, match="corrupted: checksum mismatch|not a readable bbvi result"):
            bbvi.load(_flip(saved, position), model)
    # the intact files still read, and give what was written
    assert_same_fit(fit, bbvi.fit(model, steps=60, seed=2, resume=ck, diagnose=False))
    assert torch.equal(bbvi.load(saved, model).params["continuous"]["loc"], fit.params["continuous"]["loc"])


def _without_checksum(path, out):
    """The file as bbvi wrote it before checksums: the same zip archive with no archive comment."""
    data = open(path, "rb").read()
    comment = int.from_bytes(data[-(2 + 76):-76], "little")
    assert comment == 76 and data[-76:-64] == b"bbvi-sha256:"
    with open(out, "wb") as f:
        f.write(data[:-(2 + 76)] + b"\x00\x00")
    return out


def test_files_written_before_checksums_still_load_and_resume(tmp_path):
    """Before: there was no checksum (this test guards the fix's backward compatibility, and before it failed
    only because there was no checksum to leave out): a file written without a checksum is read as before, and
    a checkpoint without one resumes bit for bit."""
    model, _ = gamma_poisson()
    ck, saved = str(tmp_path / "ck.pt"), str(tmp_path / "fit.pt")
    kw = dict(steps=120, seed=4, schedule=None, diagnose=False)
    full = bbvi.fit(model, **kw)
    part = bbvi.fit(model, **kw, checkpoint=ck, callbacks=[lambda s: s.step == 50])
    part.save(saved)
    old_ck = _without_checksum(ck, str(tmp_path / "old_ck.pt"))
    old_saved = _without_checksum(saved, str(tmp_path / "old_fit.pt"))
    assert_same_fit(full, bbvi.fit(model, **kw, resume=old_ck))
    assert torch.equal(bbvi.load(old_saved, model).elbo, part.elbo)


# ---- 2. a checkpoint path that cannot be written -------------------------------------------------------------
def test_a_checkpoint_path_that_cannot_be_written_is_refused_before_the_first_step(tmp_path):
    """Before: checkpoint=<a directory> ran the whole fit and then raised a raw IsADirectoryError from the
    final checkpoint write, losing the fit; a folder on the way that is a file, likewise (NotADirectoryError);
    fit.save(<a directory>) raised a raw OSError."""
    model, _ = gamma_poisson()
    steps_run = []
    count = [lambda s: steps_run.append(s.step)]
    with pytest.raises(bbvi.ConfigError, match="checkpoint=.* is a directory.*pass a file path"):
        bbvi.fit(model, steps=30, checkpoint=str(tmp_path), callbacks=count)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(bbvi.ConfigError, match="a_file' is a file, not a folder"):
        bbvi.fit(model, steps=30, checkpoint=str(tmp_path / "a_file" / "ck.pt"), callbacks=count)
    assert steps_run == [], "no step may run before the checkpoint path is known to be writable"
    fit = bbvi.fit(model, steps=30, diagnose=False)
    with pytest.raises(bbvi.ConfigError, match="is a directory.*pass a file path"):
        fit.save(str(tmp_path))
    with pytest.raises(bbvi.ConfigError, match="is a file, not a folder"):
        fit.save(str(tmp_path / "a_file" / "fit.pt"))


def test_a_checkpoint_write_that_fails_mid_fit_keeps_the_fit(tmp_path):
    """Before: a checkpoint write that failed during the fit (here its folder is replaced by a file after step
    20) raised a raw OSError out of bbvi.fit and the fit so far was lost."""
    model, _ = gamma_poisson()
    folder = tmp_path / "out"
    path = str(folder / "ck.pt")

    def break_folder(state):
        if state.step == 20:
            os.remove(path)
            os.rmdir(folder)
            folder.write_text("now a file")
    with pytest.raises(bbvi.FitError, match="checkpoint could not be written after step 30") as err:
        bbvi.fit(model, steps=100, seed=1, checkpoint=path, checkpoint_every=10, callbacks=[break_folder])
    assert err.value.result.num_steps == 30 and len(err.value.result.elbo) == 30


# ---- 3. two writers, one path --------------------------------------------------------------------------------
def test_two_threads_saving_to_the_same_path(tmp_path):
    """Before: the temporary file was named by the process id only, so two threads saving to one path wrote
    the same temporary file: one thread's os.replace moved it away under the other (FileNotFoundError), or
    both wrote into it at once."""
    model, _ = gamma_poisson()
    fits = [bbvi.fit(model, steps=20, seed=s, diagnose=False) for s in (0, 1)]
    path = str(tmp_path / "fit.pt")
    errors = []

    def save(fit):
        try:
            for _ in range(25):
                fit.save(path)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)
    threads = [threading.Thread(target=save, args=(f,)) for f in fits]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    loaded = bbvi.load(path, model)
    assert any(torch.equal(loaded.elbo, f.elbo) for f in fits)
    assert os.listdir(tmp_path) == ["fit.pt"], "no temporary file may be left behind"


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
