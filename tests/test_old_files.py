"""Files written before the loop's refactor (issue 34; by the checkout 203b334^, with
tests/data/before_the_loop_refactor/write.py) still load: a checkpoint resumes to bit for bit the fit this code runs
uninterrupted (the adaptive rule's state, minibatches with control variates stopped mid-epoch), and a saved fit
loads with its typed options read back from its settings' text."""
import os
import shutil

import torch

import bbvi
from fitcheck import assert_same_fit
from test_subsample import _data
from test_subsample import _log_joint as _factors

OLD = os.path.join(os.path.dirname(__file__), "data", "before_the_loop_refactor")


def _total(z, d):
    return sum(v.reshape(v.shape[0], -1).sum(-1) for v in _factors(z, d).values())


def _model(log_joint, plates=False):
    return bbvi.Model(log_joint, {"w": bbvi.Latent(shape=(3,))}, data=_data(300),
                      plates={"obs": ("X", "y")} if plates else None, name="logreg")


def test_checkpoints_written_before_resume_to_the_uninterrupted_fit(tmp_path):
    for name, model, options in [("adaptive_step130.ckpt", _model(_total), dict(max_steps=400)),
                                 ("minibatch_cv_step17.ckpt", _model(_factors, plates=True),
                                  dict(steps=60, subsample_size=40, estimator="reparam"))]:
        path = shutil.copy(os.path.join(OLD, name), tmp_path / name)   # a resume writes no file, but keep it read-only
        whole = bbvi.fit(model, diagnose=False, **options)
        resumed = bbvi.fit(model, diagnose=False, resume=path, **options)
        assert_same_fit(whole, resumed)
        assert resumed.status == whole.status and resumed.levels == whole.levels


def test_a_fit_saved_before_loads_with_its_options():
    model = _model(_total)
    fit = bbvi.fit(model, steps=60, diagnose=False)
    old = bbvi.load(os.path.join(OLD, "sgd_steps60.result"), model)
    for g in fit.params:
        for k in fit.params[g]:
            assert torch.equal(old.params[g][k], fit.params[g][k]), (g, k)
    assert torch.equal(old.elbo, fit.elbo)
    o = old.options
    assert (o.method, o.num_particles, o.steps, o.dtype, o.auto_estimator) == ("sgd", 16, 60, torch.float64, True)
    assert {k: str(v) for k, v in o.record().items()} == {k: str(v) for k, v in fit.settings.items()}
