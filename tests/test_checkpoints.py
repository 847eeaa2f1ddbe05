"""bbvi/checkpoint.py and bbvi/saving.py: checkpoints, exact resume (also after SIGKILL), Ctrl-C; checksums, paths
that cannot be written, concurrent writers. More resume tests are in test_resume.py."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from torch.distributions import Normal

import bbvi
from fitcheck import assert_same_fit
from models.conjugate import gamma_poisson
from targets import std_normal, two_latents

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("estimator,baseline", [("score", "ema"), ("score", "cv"), ("reparam", "default")])
@pytest.mark.filterwarnings("ignore::bbvi.errors.ReliabilityWarning")   # short fits of every estimator; the test checks resume bit for bit
def test_resume_from_a_checkpoint_gives_the_uninterrupted_fit(tmp_path, estimator, baseline):
    model, _ = gamma_poisson()
    kw = dict(estimator=estimator, baseline=baseline, steps=300, seed=5, tol_rel_obj=1e-9, check_every=50)
    full = bbvi.fit(model, **kw)
    path = str(tmp_path / "ck.pt")
    part = bbvi.fit(model, **kw, checkpoint=path, checkpoint_every=40,
                    callbacks=[lambda s: s.step == 130])
    assert part.status == "stopped by callback" and part.num_steps == 130
    resumed = bbvi.fit(model, **kw, resume=path)
    assert_same_fit(full, resumed)

def test_resume_checks_that_model_and_settings_match(tmp_path):
    model, _ = gamma_poisson()
    path = str(tmp_path / "ck.pt")
    bbvi.fit(model, steps=20, checkpoint=path)
    with pytest.raises(bbvi.ConfigError, match="other settings.*lr"):
        bbvi.fit(model, steps=20, lr=0.1, resume=path)
    other = std_normal(name="other")
    with pytest.raises(bbvi.ConfigError, match="saved for model 'gamma_poisson'"):
        bbvi.fit(other, steps=20, resume=path)
    with pytest.raises(bbvi.ConfigError, match="plan"):
        bbvi.fit(model, steps=20, estimator="reparam", resume=path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(bbvi.ConfigError, match="not a readable bbvi checkpoint"):
        bbvi.fit(model, steps=20, resume=str(tmp_path / "junk.pt"))
    with pytest.raises(bbvi.ConfigError, match="no checkpoint file"):
        bbvi.fit(model, steps=20, resume=str(tmp_path / "missing.pt"))

@pytest.mark.slow
def test_a_killed_fit_resumes_to_the_uninterrupted_result(tmp_path):
    """A subprocess fits with checkpoints and is killed with SIGKILL mid-fit; resuming here from its last
    checkpoint reproduces the uninterrupted fit bit for bit."""
    path = tmp_path / "ck.pt"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {HERE!r})
        import torch, bbvi
        from models.conjugate import gamma_poisson
        torch.set_num_threads(1)
        model, _ = gamma_poisson()
        bbvi.fit(model, steps=3000, seed=9, checkpoint={str(path)!r}, checkpoint_every=100,
                 callbacks=[lambda s: time.sleep(0.002)])
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(path, weights_only=True)
    assert 0 < saved["step"] < 3000, "the fit must have been killed mid-way"
    model, _ = gamma_poisson()
    resumed = bbvi.fit(model, steps=3000, seed=9, resume=str(path), diagnose=False)
    full = bbvi.fit(model, steps=3000, seed=9, diagnose=False)
    assert_same_fit(full, resumed)

@pytest.mark.filterwarnings("ignore::bbvi.errors.ReliabilityWarning")   # a fit cut short by Ctrl-C; the test checks its checkpoint
def test_ctrl_c_writes_a_checkpoint_too(tmp_path):
    model, _ = gamma_poisson()
    path = str(tmp_path / "ck.pt")

    def interrupt(state):
        if state.step == 77:
            raise KeyboardInterrupt
    fit = bbvi.fit(model, steps=200, checkpoint=path, checkpoint_every=1000, callbacks=[interrupt])
    assert fit.interrupted and torch.load(path, weights_only=True)["step"] == 77
    assert_same_fit(bbvi.fit(model, steps=200), bbvi.fit(model, steps=200, resume=path))

def test_keyboard_interrupt_returns_the_fit_so_far():
    model, _ = gamma_poisson()

    def interrupt(state):
        if state.step == 25:
            raise KeyboardInterrupt
    fit = bbvi.fit(model, steps=1000, callbacks=[interrupt])
    assert fit.interrupted and fit.num_steps == 25 and len(fit.elbo) == 25


def test_a_checkpoint_path_nothing_can_be_written_to_is_refused_before_the_first_step(tmp_path):
    """Reliability III, A9: checkpoint='' and a path under /proc (where os.access says yes to root, but no file can
    be created) ran 150 steps and failed at the first write (FitError); now a ConfigError before any step, naming
    the path and, for /proc, the folder and the error."""
    model, _ = gamma_poisson()
    steps_run = []
    count = [lambda s: steps_run.append(s.step)]
    with pytest.raises(bbvi.ConfigError, match="checkpoint='' is an empty path"):
        bbvi.fit(model, steps=150, checkpoint="", callbacks=count)
    with pytest.raises(bbvi.ConfigError, match=r"checkpoint='/proc/ck.pt' cannot be written: creating a file in "
                                               r"the folder '/proc' fails"):
        bbvi.fit(model, steps=150, checkpoint="/proc/ck.pt", callbacks=count)
    assert steps_run == []
    bbvi.fit(model, steps=3, checkpoint=str(tmp_path / "new" / "ck.pt"), diagnose=False)   # a folder made on the way
    assert os.listdir(tmp_path / "new") == ["ck.pt"]


def test_an_unchecked_checkpoint_with_wrong_fields_is_refused_naming_the_field(tmp_path):
    """Reliability III, A8: a checkpoint rewritten without its checksum is read as a file from before checksums,
    unchecked. A missing field was a raw KeyError; a 0-dim loc was broadcast into q's (1,) loc and the fit went
    on; step=-3 or 5 (its ELBO trace holds 20) was accepted. Each is now a ConfigError naming the field and what
    is wrong; the untouched fields, saved the same unchecked way, resume as the checked file does."""
    model, _ = gamma_poisson()
    path = str(tmp_path / "ck.pt")
    bbvi.fit(model, steps=20, checkpoint=path, diagnose=False)
    ck = torch.load(path, weights_only=True)
    old = str(tmp_path / "old.pt")

    def resume(**change):
        torch.save({k: v for k, v in {**ck, **change}.items() if v is not None}, old)   # no checksum
        return bbvi.fit(model, steps=40, resume=old, diagnose=False)
    loc = ck["params"]["continuous"]["loc"]
    for change, match in [(dict(step=None), r"it has no \['step'\]"),
                          (dict(params={"continuous": {**ck["params"]["continuous"], "loc": loc[0]},
                                        "discrete": {}}),
                           r"its params\['continuous'\]\['loc'\] has shape \(\), but this fit's has shape \(1,\)"),
                          (dict(step=-3), "its step is -3, not a whole number >= 0"),
                          (dict(step=5), r"its step is 5, but its ELBO trace \(one value per step\) holds 20 values"),
                          (dict(step=10 ** 9), "its step is 1000000000, but its ELBO trace"),
                          (dict(step=2.5), "its step is 2.5, not a whole number")]:
        with pytest.raises(bbvi.ConfigError, match="old.pt' is not a usable bbvi checkpoint: " + match):
            resume(**change)
    assert_same_fit(resume(), bbvi.fit(model, steps=40, resume=path, diagnose=False))


def _normal_mean():
    y = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    return bbvi.Model(lambda z, d: Normal(0., 1.).log_prob(z["m"]) + Normal(z["m"][..., None], 1.).log_prob(d).sum(-1),
                      {"m": bbvi.Latent()}, data=y, name="normal")


def test_attack_32_resuming_a_default_checkpoint_with_other_settings_is_refused_naming_them(tmp_path):
    """Attack 32 (Reliability III review): a checkpoint of the default (batch and match) resumed with another seed,
    dtype, num_particles or method. Seen: a ConfigError naming the setting that differs (saved, now), or, for
    method='sgd', the family and plan; nothing runs."""
    path = str(tmp_path / "bam.pt")
    bbvi.fit(_normal_mean(), seed=0, checkpoint=path, diagnose=False, progress=False)
    for change, said in [(dict(seed=1), r"\{'seed': \('0', '1'\)\}"),
                         (dict(dtype=torch.float32), r"'dtype': \('torch.float64', 'torch.float32'\)"),
                         (dict(num_particles=40), r"'num_particles': \('32', '40'\)"),
                         (dict(method="sgd"), "saved by a fit with family .*FullRank"),
                         (dict(method="bam", steps=80), r"'steps': \('50', '80'\)")]:
        with pytest.raises(bbvi.ConfigError, match=said):
            bbvi.fit(_normal_mean(), **{"seed": 0, **change}, resume=path, diagnose=False, progress=False)


def test_attack_33_a_folder_or_a_file_of_junk_is_no_checkpoint(tmp_path):
    """Attack 33: checkpoint= an existing folder, resume= a missing file and resume= a file of junk bytes. Seen: a
    ConfigError each, naming the path and what to pass; no traceback from torch.load."""
    with pytest.raises(bbvi.ConfigError, match="is a directory; bbvi writes one file there"):
        bbvi.fit(_normal_mean(), checkpoint=str(tmp_path), diagnose=False)
    with pytest.raises(bbvi.ConfigError, match="no checkpoint file at"):
        bbvi.fit(_normal_mean(), resume=str(tmp_path / "missing.pt"), diagnose=False)
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(bbvi.ConfigError, match="is not a readable bbvi checkpoint"):
        bbvi.fit(_normal_mean(), resume=str(tmp_path / "junk.pt"), diagnose=False)


def test_resume_refuses_a_model_with_other_data(tmp_path):
    """Before: a same-named model with other data resumed silently, continuing a fit of another posterior."""
    path = tmp_path / "ck.pt"
    bbvi.fit(two_latents(), steps=40, seed=0, checkpoint=path, checkpoint_every=20, diagnose=False)
    other = two_latents(data={"shift": torch.tensor(-1.0)})
    with pytest.raises(bbvi.ConfigError, match="other data or another log-joint"):
        bbvi.fit(other, steps=40, seed=0, resume=path, diagnose=False)
    bbvi.fit(two_latents(), steps=40, seed=0, resume=path, diagnose=False)  # the same model still resumes


def _flip(path, position):
    with open(path, "rb") as f:
        data = bytearray(f.read())
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
    with open(path, "rb") as f:
        data = f.read()
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
