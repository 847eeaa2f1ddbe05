"""Files written before the loop's refactor (issue 34; by the checkout 203b334^, with
tests/data/before_the_loop_refactor/write.py) still load: a checkpoint resumes to bit for bit the fit this code runs
uninterrupted (the adaptive rule's state, minibatches with control variates stopped mid-epoch), and a saved fit
loads with its typed options read back from its settings' text."""
import importlib.util
import os
import shutil

import torch

import bbvi
from fitcheck import assert_same_fit

OLD = os.path.join(os.path.dirname(__file__), "data", "before_the_loop_refactor")
_spec = importlib.util.spec_from_file_location("old_logreg", os.path.join(OLD, "logreg.py"))
logreg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(logreg)   # the model the files were written with, as it was


def test_checkpoints_written_before_resume_to_the_uninterrupted_fit(tmp_path):
    for name, model, options in [("adaptive_step130.ckpt", logreg.model(logreg.total), dict(max_steps=400)),
                                 ("minibatch_cv_step17.ckpt", logreg.model(logreg.terms, plates=True),
                                  dict(steps=60, subsample_size=40, estimator="reparam"))]:
        path = shutil.copy(os.path.join(OLD, name), tmp_path / name)   # a resume writes no file, but keep it read-only
        whole = bbvi.fit(model, diagnose=False, **options)
        resumed = bbvi.fit(model, diagnose=False, resume=path, **options)
        assert_same_fit(whole, resumed)
        assert resumed.status == whole.status and resumed.levels == whole.levels


def test_a_fit_saved_before_loads_with_its_options():
    model = logreg.model(logreg.total)
    fit = bbvi.fit(model, steps=60, diagnose=False)
    old = bbvi.load(os.path.join(OLD, "sgd_steps60.result"), model)
    for g in fit.params:
        for k in fit.params[g]:
            assert torch.equal(old.params[g][k], fit.params[g][k]), (g, k)
    assert torch.equal(old.elbo, fit.elbo)
    o = old.options
    assert (o.method, o.num_particles, o.steps, o.dtype, o.auto_estimator) == ("sgd", 16, 60, torch.float64, True)
    assert {k: str(v) for k, v in o.record().items()} == {k: str(v) for k, v in fit.settings.items()}
