"""The experiment scripts run end to end in --quick mode, so they cannot rot; the benchmark too."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))


def test_run_all_quick(tmp_path):
    import run_all
    run_all.main(["--out", str(tmp_path), "--quick", "--jobs", "1"])
    for stem in ("defaults", "accuracy", "flows", "gradient_variance", "convergence", "discrete"):
        assert (tmp_path / f"{stem}.csv").stat().st_size > 100
        assert (tmp_path / f"{stem}.md").read_text().count("|") > 10
    for fig in ("accuracy.png", "flows.png", "gradient_variance.png", "convergence.png"):
        assert (tmp_path / fig).stat().st_size > 5000
    assert "Accuracy on posteriordb" in (tmp_path / "experiments.md").read_text()
    import flows
    import pandas as pd
    block = flows.readme_block(str(tmp_path), pd.read_csv(tmp_path / "accuracy.csv"))  # the README's flows block
    assert "map flow reparam" in block and "Flows against the best Gaussian" in block
    import natural   # run by run_all above (this was tests/test_natural_experiment.py, which ran it a second time)
    runs, pdb = pd.read_csv(tmp_path / "natural_runs.csv"), pd.read_csv(tmp_path / "natural_posteriordb.csv")
    assert set(runs.optimizer) == {"adam", "natural"} and set(runs.estimator) == {"score+loo", "reparam"}
    for stem in ("natural_runs", "natural_rho", "natural_posteriordb"):
        assert (tmp_path / f"{stem}.csv").stat().st_size > 100
    assert (tmp_path / "natural.md").read_text().count("|") > 10
    assert (tmp_path / "natural.png").stat().st_size > 5000
    assert len(pdb) == 2 and pdb.raised.isna().all()
    assert "Regenerated" in natural.readme_block(str(tmp_path))
    assert (tmp_path / "scale.md").read_text().count("|") > 10 and (tmp_path / "scale.png").stat().st_size > 5000


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
