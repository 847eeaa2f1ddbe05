"""The tutorials (docs/tutorials/*.py): each runs to its end as a script (`runpy`, run_name '__main__', from the
repository root; in this process, to spare each one the imports of torch and Pyro), in quick mode; its own asserts
check what it shows (a fit against the exact answer or NUTS), so a tutorial that no longer teaches the truth fails
here. A new tutorial is picked up by the glob."""
import glob
import os
import runpy
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
TUTORIALS = sorted(p for p in glob.glob(os.path.join(DOCS, "tutorials", "*.py"))
                   if not os.path.basename(p).startswith("_"))


def test_the_tutorials_are_there():
    names = {os.path.basename(p) for p in TUTORIALS}
    assert {"fit_a_model.py", "check_against_nuts.py", "discrete_latents.py",
            "non_differentiable_model.py"} <= names, names


@pytest.mark.parametrize("path", TUTORIALS, ids=os.path.basename)
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::bbvi.errors.ReliabilityWarning")   # the tutorials show users the warning on purpose
def test_tutorial_runs(path, tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    for key, value in dict(BBVI_TUTORIAL_QUICK="1", BBVI_TUTORIAL_OUT=str(tmp_path), MPLBACKEND="Agg",
                           BBVI_CACHE=str(tmp_path / "cache")).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [path])
    monkeypatch.setattr(sys, "path", list(sys.path))   # a tutorial may put the repository root on it
    runpy.run_path(path, run_name="__main__")


def test_every_tutorial_is_linked_from_the_docs_index():
    with open(os.path.join(DOCS, "index.md"), encoding="utf-8") as f:
        index = f.read()
    missing = [os.path.basename(p) for p in TUTORIALS if f"(tutorials/{os.path.basename(p)})" not in index]
    assert not missing, f"docs/index.md does not link {missing}"


def test_the_tutorial_pages_render(tmp_path):
    pytest.importorskip("markdown2")  # the docs extra (make docs installs it)
    pytest.importorskip("pygments")
    run = subprocess.run([sys.executable, os.path.join(DOCS, "render_tutorials.py"), str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    pages = sorted(os.listdir(tmp_path / "tutorials"))
    others = [p[:-3] + ".html" for p in os.listdir(DOCS) if p.endswith(".md") and p != "index.md"]
    assert pages == sorted(["index.html"] + [os.path.basename(p)[:-3] + ".html" for p in TUTORIALS] + others)
    page = (tmp_path / "tutorials" / "fit_a_model.html").read_text()
    assert "<h1>Fit a model</h1>" in page and "The exact posterior, for the check" in page
    accuracy = (tmp_path / "tutorials" / "accuracy.html").read_text()   # docs/accuracy.md, its figure relinked
    assert "yardstick" in accuracy and "figures/yardstick.png" in accuracy
    assert 'href="accuracy.html' in (tmp_path / "tutorials" / "index.html").read_text()
