"""The experiment scripts run end to end in --quick mode, so they cannot rot; the benchmark too."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))


def _quick(name, out):
    import importlib
    importlib.import_module(name).main(["--out", str(out), "--quick", "--jobs", "1"])


# One test per experiment, so that the 2-worker test run can balance them (run_all.main runs them all in turn).
EXPERIMENTS = ["yardstick", "defaults", "accuracy", "gradient_variance", "convergence", "stopping", "discrete", "rao_blackwell", "natural",
               "blackbox", "policy_gradient", "greeks", "scale"]   # and flows, with accuracy


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.slow
def test_experiment_quick(name, tmp_path):
    import pandas as pd
    _quick(name, tmp_path)
    assert (tmp_path / f"{name}.md").read_text().count("|") > 10
    if name in ("defaults", "accuracy", "gradient_variance", "convergence", "discrete"):
        assert (tmp_path / f"{name}.csv").stat().st_size > 100
    if name in ("accuracy", "gradient_variance", "convergence", "scale"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5000
    if name == "accuracy":  # flows' README block reads the accuracy grid's flow column
        import flows
        _quick("flows", tmp_path)
        assert (tmp_path / "flows.csv").stat().st_size > 100 and (tmp_path / "flows.png").stat().st_size > 5000
        block = flows.readme_block(str(tmp_path), pd.read_csv(tmp_path / "accuracy.csv"))
        assert "map flow reparam" in block and "Flows against the best Gaussian" in block
    if name == "yardstick":
        import yardstick
        frame = pd.read_csv(tmp_path / "yardstick.csv")
        assert len(frame) == 1 and frame.raised.isna().all() and frame.max_mean_err_sd.iloc[0] < 0.3
        assert frame.fit_gradient_evals.iloc[0] > 0 and frame.check_evals.iloc[0] > 0
        assert (tmp_path / "yardstick.png").stat().st_size > 5000
        block = yardstick.readme_block(str(tmp_path))
        assert "Baudart & Mandel" in block and "AutoNormal (published)" in block
        assert len(yardstick.names()) == 36 and not set(yardstick.names()) & set(yardstick.HELD_OUT)
    if name == "natural":
        import natural
        runs, pdb = pd.read_csv(tmp_path / "natural_runs.csv"), pd.read_csv(tmp_path / "natural_posteriordb.csv")
        assert set(runs.optimizer) == {"adam", "natural"} and set(runs.estimator) == {"score+loo", "reparam"}
        assert (tmp_path / "natural_rho.csv").stat().st_size > 100 and (tmp_path / "natural.png").stat().st_size > 5000
        assert len(pdb) == 2 and pdb.raised.isna().all()
        assert "Regenerated" in natural.readme_block(str(tmp_path))


def test_run_all_runs_every_experiment_and_gathers_their_tables(tmp_path):
    import run_all
    assert {m.__name__ for m in run_all.MODULES} == set(EXPERIMENTS) | {"flows"}   # each has its quick test
    for stem in run_all.PARTS:
        (tmp_path / f"{stem}.md").write_text(f"### {stem} table\n")
    run_all.summarize(str(tmp_path), {"defaults": 1.0})
    text = (tmp_path / "experiments.md").read_text()
    assert all(f"### {stem} table" in text for stem in run_all.PARTS) and "Run times (s): defaults 1" in text


@pytest.mark.slow
def test_bench_quick(tmp_path):
    import bench
    bench.main(["--out", str(tmp_path), "--quick"])
    import pandas as pd
    table = pd.read_csv(tmp_path / "bench.csv")
    # NumPyro's rows come only where its JAX env (.bench-jax) was already made: --quick never installs it.
    numpyro = table.system == "numpyro SVI (jit)"
    assert set(table.system[~numpyro]) == {"hand-written torch", "bbvi", "pyro SVI"}
    assert (table.ms_per_step > 0).all()
    assert table.compile_s[~numpyro].isna().all()
    if numpyro.any():
        assert numpyro.sum() == 2 and (table.compile_s[numpyro] > 0).all()


def test_floor_counts_and_rows(tmp_path):
    """floor.py's arithmetic: the counts of the module docstring, the floor the largest of the three costs at the
    given peaks, the achieved rates the counts over the step's time."""
    import floor
    assert floor.counts("reparam", 16, 1000, 10) == (4 * 16 * 1000 * 10, 3 * 16 * 1000, 2 * 1000 * 10 * 4 + 4000)
    assert floor.counts("score", 16, 1000, 10) == (2 * 16 * 1000 * 10, 2 * 16 * 1000, 1000 * 10 * 4 + 4000)
    peaks = {"gemm_gflops": 100.0, "bandwidth_gbs": 10.0, "exp_gps": 1.0}
    flops, transc, nbytes = floor.counts("reparam", 16, 100000, 10)   # 64 MFLOP, 4.8 M exp, 8.4 MB
    floor_ms = 1e3 * max(flops / 100e9, transc / 1e9, nbytes / 10e9)
    rows = floor.floor_rows([("reparam", "a", floor_ms), ("reparam", "b", 2 * floor_ms)], peaks, 16, 100000, 10)
    assert rows[0]["bound_by"] == "exp" and rows[0]["floor_ms"] == pytest.approx(4.8)
    assert rows[0]["floor_over_ms"] == pytest.approx(1.0) and rows[1]["floor_over_ms"] == pytest.approx(0.5)
    assert rows[1]["achieved_gflops"] == pytest.approx(flops / (2 * floor_ms * 1e-3) / 1e9)
    assert "| b " in floor.write(rows, peaks, 16, 100000, 10, tmp_path) and (tmp_path / "floor.md").exists()


def test_compiled_again_keeps_the_faster_run_and_rescales_its_ratio(monkeypatch):
    """bench's second, lone timing of the compile=True rows (as NumPyro's rows get): the faster run is kept, its
    ratio to the hand-written step follows, and no other row changes."""
    import bench
    monkeypatch.setattr(bench, "bbvi_runner", lambda *a, **k: (lambda: None, 0.0))
    seconds = {"reparam": 0.5e-3, "score": 2e-3}   # the second run: reparam faster, score slower than the first
    calls = []

    def fake_time_steps(runners, steps, repeats):
        calls.append(len(calls))
        return {"again": seconds["reparam" if len(calls) == 1 else "score"]}
    monkeypatch.setattr(bench, "time_steps", fake_time_steps)
    rows = [dict(estimator="reparam", system="bbvi compile=True", ms_per_step=1.0, ratio_to_hand=0.25),
            dict(estimator="reparam", system="bbvi", ms_per_step=3.0, ratio_to_hand=0.75),
            dict(estimator=bench.SCORE_LABEL, system="bbvi compile=True", ms_per_step=1.0, ratio_to_hand=0.5)]
    out = bench.compiled_again([dict(r) for r in rows], 50, 3, 4, 2, 1)
    assert out[0]["ms_per_step"] == 0.5 and out[0]["ratio_to_hand"] == pytest.approx(0.125)
    assert out[1] == rows[1] and out[2] == rows[2] and len(calls) == 2


def test_time_to_fit_quick(tmp_path):
    """The time-to-accurate-fit table's bbvi row on sblrc-blr (the other systems run in `make bench` only)."""
    import pandas as pd
    import time_to_fit
    time_to_fit.main(["--out", str(tmp_path), "--quick"])
    row = pd.read_csv(tmp_path / "time_to_fit.csv").iloc[0]
    assert row.system == "bbvi default" and row.seconds > 0 and row.steps > 0
    assert row.accurate == (row.final_error < 0.1)


def test_verify_posteriordb_reads_references_picks_the_metric_and_keeps_its_record(tmp_path):
    """The NUTS verification's pieces that need no NUTS: every scalar of a reference by its Stan name, the dense
    metric where two parameters correlate above 0.9 (an intercept against an uncentred predictor) and not for a
    simplex's exactly linked components, and a record that keeps each posterior's latest row."""
    import pandas as pd
    import verify_posteriordb as v

    from models import posteriordb
    flat = v.flat(posteriordb.reference("hmm_example-hmm_example"))
    assert set(flat) == {"theta1[1]", "theta1[2]", "theta2[1]", "theta2[2]", "mu[1]", "mu[2]"}
    assert flat["mu[1]"].shape == (10, 1000)
    assert v.needs_dense(posteriordb.reference("earnings-logearn_height"))
    assert not v.needs_dense(posteriordb.reference("hmm_example-hmm_example"))
    path = str(tmp_path / "record.csv")
    v.record_rows([{"posterior": "b", "passed": True}, {"posterior": "a", "passed": False}], path)
    v.record_rows([{"posterior": "a", "passed": True}], path)
    frame = pd.read_csv(path)
    assert list(frame.posterior) == ["a", "b"] and frame.passed.all()
    v.record_rows([{"posterior": "c", "passed": True, "evals": 3}], str(tmp_path / "new.csv"))
    assert pd.read_csv(tmp_path / "new.csv").evals.dtype.kind == "i"      # ints stay ints


def test_generated_blocks_are_found_in_whichever_page_holds_their_markers(tmp_path):
    """replace_readme_block writes a block between its markers in README.md or any docs/*.md, its links rewritten
    relative to the page; without markers it appends to the tag's page (creating it); markers twice are refused."""
    import common
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# r\n\n<!-- top:start -->\nold\n<!-- top:end -->\n")
    (tmp_path / "docs" / "accuracy.md").write_text("# a\n\n<!-- yardstick:start -->\nold\n<!-- yardstick:end -->\n\ntail\n")
    block = "new ![y](docs/figures/y.png) [s](docs/speed.md#scale) [w](https://x.org/a) [h](#here)"
    assert common.replace_readme_block("yardstick", "Y", block, root=str(tmp_path)) == "docs/accuracy.md"
    text = (tmp_path / "docs" / "accuracy.md").read_text()
    assert "old" not in text and text.endswith("<!-- yardstick:end -->\n\ntail\n")
    assert "![y](figures/y.png) [s](speed.md#scale) [w](https://x.org/a) [h](#here)" in text
    assert common.replace_readme_block("top", "T", block, root=str(tmp_path)) == "README.md"
    assert "![y](docs/figures/y.png)" in (tmp_path / "README.md").read_text()
    assert common.replace_readme_block("bench", "Speed", "b", root=str(tmp_path)) == "docs/speed.md"
    assert (tmp_path / "docs" / "speed.md").read_text() == "## Speed\n\n<!-- bench:start -->\n\nb\n\n<!-- bench:end -->\n"
    assert common.replace_readme_block("new_tag", "New", "n", root=str(tmp_path)) == "docs/experiments.md"
    (tmp_path / "docs" / "x.md").write_text("<!-- top:start -->\n<!-- top:end -->\n")
    with pytest.raises(RuntimeError, match="keep them in one page"):
        common.replace_readme_block("top", "T", block, root=str(tmp_path))


def test_every_generated_block_has_its_markers_in_one_page_of_the_docs():
    """Each block run_all.py and bench.py write is in exactly one page, the one BLOCK_PAGES names for it (where it
    would be appended if its markers were lost)."""
    import common
    for tag, page in common.BLOCK_PAGES.items():
        holders = [p for p in common.block_pages() if f"<!-- {tag}:start -->" in open(os.path.join(ROOT, p)).read()]
        assert holders == [page], (tag, holders)
