"""bbvi/reference.py (bbvi.nuts, its cache and key: fingerprint.py), arviz_names.py, stan_draws.py (from_draws).
Findings of issue 16: each test failed before its fix (what happened before is in each test's docstring), except
test_parallel_chains_still_match_serial_ones, a guard that the rewritten wait for the chains still returns every
chain in order."""
import contextlib
import faulthandler
import math
import os
import signal
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.distributions import Normal

import bbvi
from bbvi import reference
from bbvi.reference import cache_key, default_cache_dir, from_draws
from targets import std_normal

warnings.filterwarnings("ignore", category=FutureWarning)

TINY = dict(num_draws=20, num_warmup=20, seed=0)


@contextlib.contextmanager
def within(seconds):
    """Fail (rather than hang the suite) when the block takes longer than `seconds`."""
    def alarm(signum, frame):
        raise TimeoutError(f"still waiting after {seconds} s: bbvi.nuts hangs")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def no_sampling(*args, **kwargs):
    raise AssertionError("bbvi.nuts sampled, where it should have refused or used the cache")


# ---- 1: a chain process that dies or raises what cannot be pickled ------------------------------------------
def _dying_model(how):
    parent = os.getpid()

    class Unpicklable(Exception):   # a local class: pickle cannot find it by name
        pass

    def log_joint(z, data):
        if os.getpid() != parent:   # only in the chains' processes (fork), not in nuts' own checks
            if how == "exit":
                os._exit(3)
            if how == "segfault":
                faulthandler.disable()   # no stack dump from pytest's handler: a plain crash
                os.kill(os.getpid(), signal.SIGSEGV)
            raise Unpicklable("the log-joint failed in the chain")
        return Normal(0.0, 1.0).log_prob(z["x"])
    return bbvi.Model(log_joint, {"x": bbvi.Latent(())}, name=f"dies-{how}")


@pytest.mark.parametrize("how,cause", [("exit", r"exit code 3"), ("segfault", r"killed by signal SIGSEGV"),
                                       ("unpicklable", r"failed: .*Unpicklable: the log-joint failed in the chain")])
def test_a_chain_that_dies_or_raises_an_unpicklable_error_is_a_sampler_error(how, cause):
    """Before: bbvi.nuts waited on the queue forever (the child's os._exit or segfault sent nothing; the
    unpicklable exception was dropped by the queue's feeder thread): here a TimeoutError after 60 s."""
    with within(60), pytest.raises(bbvi.SamplerError, match=rf"chain [01] .*{cause}"):
        bbvi.nuts(_dying_model(how), num_chains=2, parallel=True, use_cache=False, **TINY)


def test_parallel_chains_still_match_serial_ones():
    """Guard (passed before too): the poll loop returns every chain, in order, with the draws of a serial run."""
    model = std_normal(name="m")
    par = bbvi.nuts(model, num_chains=2, parallel=True, use_cache=False, **TINY)
    ser = bbvi.nuts(model, num_chains=2, parallel=False, use_cache=False, **TINY)
    np.testing.assert_array_equal(par.posterior["x"].values, ser.posterior["x"].values)


# ---- 2: a cache folder that cannot be written ---------------------------------------------------------------
def test_an_unwritable_cache_warns_and_returns_the_draws(tmp_path):
    """Before: NotADirectoryError from os.makedirs after sampling; the draws were lost."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match=r"could not be written to the cache .*NotADirectoryError"):
        ref = bbvi.nuts(std_normal(name="m"), num_chains=1, cache_dir=str(blocker / "nuts"), **TINY)
    assert ref.posterior["x"].shape == (1, 20) and np.isfinite(ref.posterior["x"].values).all()
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


# ---- 3: latent names ArviZ or netCDF cannot hold as they are -------------------------------------------------
def test_a_latent_with_a_slash_is_sampled_cached_and_read_back(tmp_path, monkeypatch):
    """Before: ValueError from h5netcdf ("Forward slashes '/' are not allowed") after sampling, draws lost."""
    model = std_normal((2,), latent="group/x", name="m")
    ref = bbvi.nuts(model, num_chains=1, cache_dir=str(tmp_path), **TINY)
    assert ref.posterior["group/x"].shape == (1, 20, 2)
    monkeypatch.setattr(reference, "_run_chains", no_sampling)
    again = bbvi.nuts(model, num_chains=1, cache_dir=str(tmp_path), **TINY)
    np.testing.assert_array_equal(again.posterior["group/x"].values, ref.posterior["group/x"].values)
    assert again.posterior["group/x"].dims == ("chain", "draw", "group/x_dim_0")
    assert "bbvi_names" not in again.posterior.attrs


@pytest.mark.parametrize("name", ["chain", "draw"])
def test_a_latent_named_chain_or_draw_is_refused_before_sampling(name, monkeypatch):
    """Before: NUTS ran, then az.from_dict dropped the whole posterior group and bbvi.nuts died on
    AttributeError: 'InferenceData' object has no attribute 'posterior'; to_arviz failed the same way."""
    monkeypatch.setattr(reference, "_run_chains", no_sampling)
    with pytest.raises(bbvi.ModelError, match=rf"latent '{name}' has the name of an ArviZ dimension.*Rename"):
        bbvi.nuts(std_normal(latent=name, name="m"), num_chains=1, use_cache=False, **TINY)
    fit = bbvi.fit(std_normal(latent=name, name="m"), steps=20, seed=0, diagnose=False)
    with pytest.raises(bbvi.ModelError, match=rf"latent '{name}' has the name of an ArviZ dimension"):
        fit.to_arviz(10)


def test_a_derived_quantity_named_draw_is_refused_before_sampling(monkeypatch):
    """Before: NUTS ran, then the posterior group was dropped (AttributeError, as for a latent)."""
    model = std_normal(name="m")
    model = bbvi.Model(model.log_joint, model.latents, name="derived-draw",
                       derived=lambda z, d: {"draw": 2 * z["x"]})
    monkeypatch.setattr(reference, "_run_chains", no_sampling)
    with pytest.raises(bbvi.ModelError, match=r"derived quantity 'draw' has the name of an ArviZ dimension"):
        bbvi.nuts(model, num_chains=1, use_cache=False, **TINY)


# ---- 4: the cache key follows the globals and closures the log-joint reads -----------------------------------
UPPER = 10.0   # module constant read by a helper the log-joint calls


def _truncate(lp, x):
    return torch.where(x < UPPER, lp, torch.full_like(lp, -math.inf))


def _globally_truncated(z, data):
    return _truncate(Normal(0.0, 1.0).log_prob(z["x"]), z["x"])


def _closure_truncated(upper):
    def log_joint(z, data):
        return torch.where(z["x"] < upper, Normal(0.0, 1.0).log_prob(z["x"]), torch.tensor(-math.inf))
    return bbvi.Model(log_joint, {"x": bbvi.Latent(())}, name="truncated")


class _Opaque:   # the default repr shows a memory address; a repr that raises
    def __init__(self, broken=False):
        self.broken = broken

    def __repr__(self):
        if self.broken:
            raise RuntimeError("no repr")
        return object.__repr__(self)


def _odd_closures():
    opaque, broken, gen, mod, names = _Opaque(), _Opaque(broken=True), torch.Generator(), np, {"b", "a", "c"}

    def log_joint(z, data):
        assert opaque is not None and broken is not None and gen is not None and mod is not None and names
        return Normal(0.0, 1.0).log_prob(z["x"])
    return bbvi.Model(log_joint, {"x": bbvi.Latent(())}, name="odd")


def _fixed_point_log_density(model):
    m64 = model.to("cpu", torch.float64)
    u = torch.randn(3, m64.dim, generator=torch.Generator().manual_seed(12345), dtype=torch.float64) * 0.5
    return m64.log_density(u)


def test_the_cache_key_follows_a_module_constant_read_through_a_called_function_and_skips_odd_values(
        monkeypatch):
    """Before: the key hashed the log-joint's source and its log density at three fixed points (all below
    1.0, where the bound makes no difference): UPPER 10 -> 1 kept the key, and the stale reference was served."""
    model = bbvi.Model(_globally_truncated, {"x": bbvi.Latent(())}, name="truncated")
    settings = dict(num_draws=20)
    before, lp_before = cache_key(model, settings), _fixed_point_log_density(model)
    monkeypatch.setattr(sys.modules[__name__], "UPPER", 1.0)
    assert torch.equal(_fixed_point_log_density(model), lp_before)   # the fixed points do not see the change
    assert cache_key(model, settings) != before
    monkeypatch.setattr(sys.modules[__name__], "UPPER", 10.0)
    assert cache_key(model, settings) == before
    # what cannot be hashed by value (a repr that raises, a memory address, a generator, a module, a set whose
    # order changes between runs) is skipped: never an error, and two identical models share their key
    assert cache_key(_odd_closures(), settings) == cache_key(_odd_closures(), settings)


def test_a_changed_closure_variable_is_not_served_the_stale_reference(tmp_path):
    """Before: the truncated model (upper=0.75, above the three fixed points 0.71, -0.94, -0.60) was
    served the cached draws of upper=10, some of them above 0.75."""
    wide = bbvi.nuts(_closure_truncated(10.0), num_chains=1, cache_dir=str(tmp_path), **TINY)
    assert wide.posterior["x"].values.max() > 0.75
    assert torch.equal(_fixed_point_log_density(_closure_truncated(0.75)),
                       _fixed_point_log_density(_closure_truncated(10.0)))
    narrow = bbvi.nuts(_closure_truncated(0.75), num_chains=1, cache_dir=str(tmp_path), **TINY)
    assert narrow.posterior.attrs["bbvi_cache_key"] != wide.posterior.attrs["bbvi_cache_key"]
    assert narrow.posterior["x"].values.max() < 0.75
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".nc")]) == 2


# ---- 5: renaming a model reuses its reference --------------------------------------------------------------
def test_a_renamed_model_finds_its_cached_reference(tmp_path, monkeypatch):
    """Before: the name was hashed into the key: renaming the model reran NUTS (here: AssertionError from
    the patched sampler)."""
    first = bbvi.nuts(std_normal(name="first"), num_chains=1, cache_dir=str(tmp_path), **TINY)
    assert cache_key(std_normal(name="first"), {}) == cache_key(std_normal(name="second"), {})
    monkeypatch.setattr(reference, "_run_chains", no_sampling)
    second = bbvi.nuts(std_normal(name="second"), num_chains=1, cache_dir=str(tmp_path), **TINY)
    np.testing.assert_array_equal(second.posterior["x"].values, first.posterior["x"].values)
    assert [f.startswith("first-") for f in os.listdir(tmp_path)] == [True]


_MODEL_FILE = """
import torch
from torch.distributions import Normal

import bbvi

SCALE = {scale}


def _helper(x):
    return Normal(0.0, SCALE).log_prob(x)

{body}
"""
_TOP_LEVEL = """
def log_joint(z, data):
    return _helper(z["x"]) + Normal(z["x"][:, None], 1.0).log_prob(data).sum(-1)


model = bbvi.Model(log_joint, {{"x": bbvi.Latent(())}}, data=torch.tensor([0.5, 1.5]), name="{name}")
"""
_NESTED = """
def build():
    def log_joint(z, data):
        return _helper(z["x"]) + Normal(z["x"][:, None], 1.0).log_prob(data).sum(-1)
    return bbvi.Model(log_joint, {{"x": bbvi.Latent(())}}, data=torch.tensor([0.5, 1.5]), name="{name}")


model = build()
"""


def _model_from_file(folder, module, scale, body):
    import importlib.util
    path = folder / f"{module}.py"
    path.write_text(_MODEL_FILE.format(scale=scale, body=body.format(name=module)))
    spec = importlib.util.spec_from_file_location(module, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.model


def test_the_same_log_joint_in_another_module_or_file_keeps_its_key(tmp_path):
    """Before: the key hashed each function's module and qualified name (and its source as indented): the same
    model moved from a script into a model file got a new key, and 266 s of NUTS ran again."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    script = _model_from_file(tmp_path / "a", "my_script", 2.0, _TOP_LEVEL)
    moved = _model_from_file(tmp_path / "b", "models_file", 2.0, _TOP_LEVEL)
    nested = _model_from_file(tmp_path / "b", "nested_in_a_function", 2.0, _NESTED)
    assert script.log_joint.__module__ != moved.log_joint.__module__
    assert script.log_joint.__code__.co_filename != moved.log_joint.__code__.co_filename
    settings = dict(num_draws=20)
    assert cache_key(script, settings) == cache_key(moved, settings) == cache_key(nested, settings)
    wider = _model_from_file(tmp_path / "b", "wider_prior", 3.0, _TOP_LEVEL)   # another density: another key
    assert cache_key(wider, settings) != cache_key(script, settings)


# ---- 6: the cache is project-local --------------------------------------------------------------------------
def test_the_default_cache_is_under_the_working_directory(tmp_path, monkeypatch):
    """Before: ~/.cache/bbvi/nuts, which outlives a fresh clone of the project."""
    monkeypatch.delenv("BBVI_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_cache_dir() == str(tmp_path / ".bbvi_cache" / "nuts")
    bbvi.nuts(std_normal(name="m"), num_chains=1, **TINY)
    assert [f.endswith(".nc") for f in os.listdir(tmp_path / ".bbvi_cache" / "nuts")] == [True]
    monkeypatch.setenv("BBVI_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == str(tmp_path / "elsewhere")


# ---- 7: a latent named like another's ArviZ dimension -------------------------------------------------------
def _x_and_x_dim_0():
    def log_joint(z, data):
        return Normal(0.0, 1.0).log_prob(z["x"]).sum(1) + Normal(5.0, 1.0).log_prob(z["x_dim_0"])
    return bbvi.Model(log_joint, {"x": bbvi.Latent(shape=(2,)), "x_dim_0": bbvi.Latent(())}, name="dims")


def test_to_arviz_keeps_a_latent_named_like_another_latents_dimension():
    """Before: ArviZ named x's dimension x_dim_0 and silently dropped the latent x_dim_0 from the posterior."""
    fit = bbvi.fit(_x_and_x_dim_0(), steps=50, seed=0, diagnose=False)
    idata = fit.to_arviz(100, seed=1)
    draws = fit.sample(100, seed=1)
    assert set(idata.posterior.data_vars) == {"x", "x_dim_0"}
    np.testing.assert_array_equal(idata.posterior["x_dim_0"].values.reshape(100), draws["x_dim_0"].numpy())
    np.testing.assert_array_equal(idata.posterior["x"].values.reshape(100, 2), draws["x"].numpy())
    assert idata.posterior["x"].dims == ("chain", "draw", "x_dim_0_")


def test_nuts_keeps_a_latent_named_like_another_latents_dimension():
    """Before: bbvi.nuts returned a posterior without the latent x_dim_0 (the same ArviZ collision)."""
    ref = bbvi.nuts(_x_and_x_dim_0(), num_chains=1, use_cache=False, **TINY)
    assert ref.posterior["x"].shape == (1, 20, 2) and ref.posterior["x_dim_0"].shape == (1, 20)
    assert abs(float(ref.posterior["x_dim_0"].mean()) - 5.0) < 1.0


# ---- 8: CmdStan output CSVs ---------------------------------------------------------------------------------
_SAMPLER = "lp__,accept_stat__,stepsize__,treedepth__,n_leapfrog__,divergent__,energy__"
# matrix[2, 3] theta: CmdStan writes it column-major (theta.1.1, theta.2.1, theta.1.2, ...), 1-based
_THETA = [(i, j) for j in (1, 2, 3) for i in (1, 2)]


def _cmdstan_csv(path, chain, draws=3, warmup=0, bad_line=None):
    lines = ["# stan_version_major = 2", "# model = demo_model", "# method = sample (Default)",
             "#   num_samples = 3", "#   save_warmup = %d" % bool(warmup),
             _SAMPLER + ",mu," + ",".join(f"theta.{i}.{j}" for i, j in _THETA)]

    def row(d):
        theta = [1000 * chain + 100 * d + 10 * i + j for i, j in _THETA]
        return ",".join(["-7.5", "0.9", "0.8", "2", "3", "0", "8.1", str(chain + d / 10)] + [str(t) for t in theta])
    lines += [row(-1 - w) for w in range(warmup)]
    lines += ["# Adaptation terminated", "# Step size = 0.8", "# Diagonal elements of inverse mass matrix:",
              "# 1, 1, 1, 1, 1, 1, 1"]
    lines += [row(d) for d in range(draws)]
    lines += ["#", "#  Elapsed Time: 0.01 seconds (Warm-up)", "#                0.02 seconds (Sampling)"]
    if bad_line is not None:   # a line cut short: its last value missing
        lines[bad_line - 1] = lines[bad_line - 1].rsplit(",", 1)[0]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_from_draws_reads_cmdstan_csv_files_one_chain_each(tmp_path):
    """Before: pandas.errors.ParserError ('Error tokenizing data') on the '#' lines."""
    files = [_cmdstan_csv(tmp_path / f"output-{c + 1}.csv", c, warmup=2 if c == 1 else 0) for c in range(2)]
    idata = from_draws([str(f) for f in files])
    post = idata.posterior
    assert set(post.data_vars) == {"mu", "theta"}                        # lp__, accept_stat__, ... dropped
    assert post["theta"].shape == (2, 3, 2, 3) and post["mu"].shape == (2, 3)
    for c in range(2):
        np.testing.assert_allclose(post["mu"].values[c], [c, c + 0.1, c + 0.2])   # warmup rows of chain 1 dropped
        for d in range(3):
            for i, j in _THETA:   # 1-based (i, j) in the file is index (i - 1, j - 1)
                assert post["theta"].values[c, d, i - 1, j - 1] == 1000 * c + 100 * d + 10 * i + j
    one = from_draws(str(files[0]))
    np.testing.assert_array_equal(one.posterior["theta"].values[0], post["theta"].values[0])


def test_from_draws_num_chains_must_be_a_positive_int():
    """Reliability III, A6: num_chains=0 was a raw ZeroDivisionError, -2 a numpy reshape ValueError, True
    a raw TypeError, "2" another."""
    import pandas as pd
    frame = pd.DataFrame({"mu": np.arange(8.0)})
    for bad in (0, -2, 2.5, True, "2"):
        with pytest.raises(bbvi.ConfigError, match=f"from_draws: num_chains must be a positive int, got {bad!r}"):
            from_draws(frame, num_chains=bad)
    assert from_draws(frame, num_chains=2).posterior["mu"].shape == (2, 4)


def test_a_malformed_cmdstan_csv_is_a_config_error_naming_file_and_line(tmp_path):
    """Before: a raw pandas ParserError without the file's name."""
    bad = _cmdstan_csv(tmp_path / "output-1.csv", 0, bad_line=12)
    with pytest.raises(bbvi.ConfigError, match=r"output-1\.csv' line 12: 13 values for the 14 columns"):
        from_draws(str(bad))
    text = bad.read_text().replace("-7.5", "nan?", 1)
    (tmp_path / "output-2.csv").write_text(text)
    with pytest.raises(bbvi.ConfigError, match=r"output-2\.csv' line 11: 'nan\?' is not a number \(column 'lp__'\)"):
        from_draws(str(tmp_path / "output-2.csv"))
    good = [_cmdstan_csv(tmp_path / f"c{c}.csv", c, draws=3 + c) for c in range(2)]
    with pytest.raises(bbvi.ConfigError, match=r"c1\.csv' does not have the parameters and number of draws"):
        from_draws([str(f) for f in good])
