"""experiments/natural.py runs end to end in --quick mode (the full run is `make experiments`)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))


def test_natural_experiment_quick(tmp_path):
    import natural
    summary, rho_table, pdb = natural.main(["--out", str(tmp_path), "--quick", "--jobs", "1"])
    assert set(summary.optimizer) == {"adam", "natural"}
    assert set(summary.estimator) == {"score+loo", "reparam"}
    for stem in ("natural_runs", "natural_rho", "natural_posteriordb"):
        assert (tmp_path / f"{stem}.csv").stat().st_size > 100
    assert (tmp_path / "natural.md").read_text().count("|") > 10
    assert (tmp_path / "natural.png").stat().st_size > 5000
    assert len(pdb) == 2 and (pdb.raised == "").all()
    assert "Regenerated" in natural.readme_block(str(tmp_path))
