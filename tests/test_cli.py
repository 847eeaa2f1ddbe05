"""The command line (`bbvi fit / nuts / compare / --version`, bbvi/__main__.py), run as a user runs it: in a
subprocess, on a model file written to a temporary folder."""
import os
import subprocess
import sys

import numpy as np
import pytest

import bbvi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOY = '''import bbvi, torch
model = bbvi.Model(lambda z, d: torch.distributions.Normal(0., 1.).log_prob(z["x"]).sum(-1)
                   + torch.distributions.Normal(z["x"].sum(-1), 1.).log_prob(d),
                   {"x": bbvi.Latent(shape=(2,))}, data=torch.tensor(1.0), name="toy")
'''


def _run(*args, cache=None):
    env = dict(os.environ, MPLBACKEND="Agg")
    if cache is not None:
        env["BBVI_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "bbvi", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def _load(path):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"_test_cli_{os.path.basename(os.path.dirname(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.model


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_model")
    path = folder / "toy.py"
    path.write_text(TOY)
    return path


@pytest.fixture(scope="module")
def fitted(toy, tmp_path_factory):
    """`bbvi fit` as a user runs it: the console entry point in a fresh process."""
    out = tmp_path_factory.mktemp("cli_fit") / "out"
    proc = _run("fit", f"{toy}:model", "--steps", 200, "--num-draws", 500, "--out", out)
    return proc, out


def test_fit_writes_the_four_files_and_the_posterior_of_the_saved_fit(toy, fitted):
    import arviz as az
    proc, out = fitted
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in ("posterior.nc", "summary.txt", "fit.pt", "elbo.png"):
        assert (out / name).is_file(), name
    summary = (out / "summary.txt").read_text()
    assert "bbvi fit of 'toy'" in summary and summary.strip() in proc.stdout
    written = az.from_netcdf(out / "posterior.nc").posterior
    again = bbvi.load(out / "fit.pt", _load(str(toy))).to_arviz(num_draws=500, seed=0).posterior
    assert set(written.data_vars) == set(again.data_vars) == {"x"}
    assert written["x"].shape[-1] == 2 and written["x"].size == 500 * 2
    for k in written.data_vars:
        assert np.array_equal(written[k].values, again[k].values), k


def _main(capsys, *args):
    """The command line in this process (fast: no torch import per call): (exit status, stdout, stderr)."""
    from bbvi.__main__ import main
    try:
        status = main([str(a) for a in args])
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_version(capsys):
    status, out, _ = _main(capsys, "--version")
    assert status == 0 and out.startswith(f"bbvi {bbvi.__version__} ") and "torch" in out


def _one_line_error(status, out, err):
    assert status == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bbvi: error: "), err
    return lines[0]


def test_bad_input_is_one_line_and_status_2(toy, tmp_path, capsys):
    out = tmp_path / "out"
    line = _one_line_error(*_main(capsys, "fit", tmp_path / "missing.py", "--steps", 10, "--out", out))
    assert "missing.py" in line
    line = _one_line_error(*_main(capsys, "fit", f"{toy}:nosuch", "--steps", 10, "--out", out))
    assert "nosuch" in line and "model" in line
    two = tmp_path / "two.py"
    two.write_text(TOY + "other = bbvi.Model(model.log_joint, dict(model.latents), data=model.data, name='o')\n")
    line = _one_line_error(*_main(capsys, "fit", two, "--steps", 10, "--out", out))
    assert "model" in line and "other" in line and ":name" in line
    line = _one_line_error(*_main(capsys, "fit", toy, "--family", "nosuch", "--steps", 10, "--out", out))
    assert "family" in line and "nosuch" in line
    broken = tmp_path / "broken.py"   # a NameError at import: one line naming the file, the error and its line
    broken.write_text("import bbvi\n\nmodel = bbvi.Model(log_joint, {'x': bbvi.Latent()})\n")
    line = _one_line_error(*_main(capsys, "fit", broken, "--steps", 10, "--out", out))
    assert "broken.py" in line and "NameError" in line and "'log_joint' is not defined" in line and "line 3" in line


def test_compare_against_a_reference(toy, tmp_path, capsys):
    """The reference: draws from the exact posterior (x | y = 1 is Gaussian: mean (1/3, 1/3), covariance
    I - 11^T / 3), as a netCDF file."""
    import arviz as az
    import pandas as pd
    rng = np.random.default_rng(0)
    cov = np.eye(2) - np.ones((2, 2)) / 3
    draws = rng.multivariate_normal([1 / 3, 1 / 3], cov, size=(2, 1000))
    ref_path = tmp_path / "reference.nc"
    az.from_dict(posterior={"x": draws}).to_netcdf(str(ref_path))
    out = tmp_path / "cmp"
    status, stdout, err = _main(capsys, "compare", toy, "--reference", ref_path, "--steps", 200, "--num-draws", 500,
                                "--out", out)
    assert status == 0, err
    table = pd.read_csv(out / "compare.csv", index_col=0)
    assert list(table.index) == ["x[0]", "x[1]"] and "verdict" in table.columns
    assert stdout.index("verdict:") < stdout.index("ref_mean")


def test_nuts_writes_the_reference(toy, tmp_path, capsys, monkeypatch):
    import arviz as az
    monkeypatch.setenv("BBVI_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ref"
    status, stdout, err = _main(capsys, "nuts", toy, "--num-draws", 50, "--num-warmup", 50, "--num-chains", 1,
                                "--out", out)
    assert status == 0, err
    assert az.from_netcdf(out / "reference.nc").posterior["x"].shape == (1, 50, 2)
    assert "r_hat" in stdout


SLOW = '''import time, bbvi, torch
def log_joint(z, d):
    time.sleep(0.001)   # a step of about a millisecond: SIGTERM lands mid-fit
    return torch.distributions.Normal(0., 1.).log_prob(z["x"]).sum(-1)
model = bbvi.Model(log_joint, {"x": bbvi.Latent(shape=(2,))}, name="slow")
'''


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_fit_resumes_from_the_command_line(tmp_path):
    """Reliability III, 11: the command line had no --checkpoint, --resume or --max-steps, and SIGTERM (what batch
    schedulers and `timeout` send) lost the whole fit. Now SIGTERM is handled like Ctrl-C: the fit so far is
    checkpointed and written ('interrupted'), and --resume finishes it."""
    import signal
    import time
    path = tmp_path / "slow.py"
    path.write_text(SLOW)
    ck, out = tmp_path / "ck.pt", tmp_path / "out"
    args = [sys.executable, "-m", "bbvi", "fit", f"{path}:model", "--method", "sgd", "--steps", "3000",
            "--checkpoint", ck, "--num-draws", 200, "--out", out]
    proc = subprocess.Popen(list(map(str, args)), cwd=ROOT, env=dict(os.environ, MPLBACKEND="Agg"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waited = 0.0
    while not ck.exists() and waited < 120:   # the first checkpoint, at step 500
        time.sleep(0.1)
        waited += 0.1
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    saved = bbvi.load(str(out / "fit.pt"), _load(path))
    assert saved.status == "interrupted" and 500 <= saved.num_steps < 3000
    assert bbvi.saving.read(str(ck), "checkpoint")["step"] == saved.num_steps
    done = _run("fit", f"{path}:model", "--method", "sgd", "--steps", 3000, "--checkpoint", ck, "--resume", ck,
                "--num-draws", 200, "--out", tmp_path / "out2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert bbvi.load(str(tmp_path / "out2" / "fit.pt"), _load(path)).num_steps == 3000
