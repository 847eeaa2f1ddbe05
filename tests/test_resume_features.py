"""One resume test over the loop's features: a fit stopped at step k with a checkpoint and resumed from it is the
uninterrupted fit, bit for bit (ELBO trace, parameters, step and failure counts), whatever the fit carries between
steps: plain, minibatches with control variates (stopped mid-epoch), Rao-Blackwellized score terms, the natural
gradient, the adaptive rule, the compiled step."""
import shutil

import pytest
import torch

import bbvi
from fitcheck import assert_same_fit
from test_subsample import _data
from test_subsample import _log_joint as _factors   # factor terms, one per row of the plate 'obs'

F64 = torch.float64


def _total(z, d):
    return sum(v.reshape(v.shape[0], -1).sum(-1) for v in _factors(z, d).values())


def _model(log_joint, plates=False):
    return bbvi.Model(log_joint, {"w": bbvi.Latent(shape=(3,))}, data=_data(300),
                      plates={"obs": ("X", "y")} if plates else None, name="logreg")


HAS_COMPILER = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
FEATURES = {   # name: (model, fit options, the step to stop at)
    "plain": (lambda: _model(_total), dict(steps=60), 25),
    "minibatch + control variates": (lambda: _model(_factors, plates=True),
                                     dict(steps=60, subsample_size=40, estimator="reparam"), 17),   # 7.5 steps/epoch
    "Rao-Blackwell": (lambda: _model(_factors), dict(steps=60, estimator="score", baseline="loo"), 25),
    "natural gradient": (lambda: _model(_total), dict(steps=60, optimizer="natural"), 25),
    "adaptive rule": (lambda: _model(_total), dict(max_steps=400), 130),
    "compiled": (lambda: _model(_total), dict(steps=60, compile=True), 25),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_a_resumed_fit_is_the_uninterrupted_fit(feature, tmp_path):
    if feature == "compiled" and not HAS_COMPILER:
        pytest.skip("torch.compile's CPU backend needs a C++ compiler; none on this machine")
    make, options, stop = FEATURES[feature]
    model = make()
    kw = dict(seed=0, diagnose=False, **options)
    want = bbvi.fit(model, **kw)
    path = str(tmp_path / "ck.pt")
    part = bbvi.fit(model, **kw, checkpoint=path, checkpoint_every=1000, callbacks=[lambda s: s.step == stop])
    assert part.num_steps == stop < want.num_steps
    resumed = bbvi.fit(model, **kw, resume=path)
    assert_same_fit(want, resumed)
    assert resumed.status == want.status and resumed.levels == want.levels
    if feature == "Rao-Blackwell":
        assert want.structure is not None          # the score terms were Rao-Blackwellized
    if feature == "minibatch + control variates":
        assert want.settings.get("subsample_cv") is True
