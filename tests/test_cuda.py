"""Fits on a CUDA device end to end: run where torch sees a GPU, skipped elsewhere (CI has none)."""
import pytest
import torch

import bbvi

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

F64 = torch.float64


def _logistic(n=4000, d=5):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.bernoulli(torch.sigmoid(X @ torch.linspace(-1, 1, d, dtype=F64)), generator=g)

    def log_joint(z, data):
        eta = z["beta"] @ data["X"].T
        return {"prior": torch.distributions.Normal(0.0, 1.0).log_prob(z["beta"]).sum(-1),
                "obs": -torch.nn.functional.binary_cross_entropy_with_logits(eta, data["y"].expand_as(eta),
                                                                             reduction="none")}
    return bbvi.Model(log_joint, {"beta": bbvi.Latent((d,))}, data={"X": X, "y": y}, plates={"obs": ("X", "y")},
                      name="logistic")


@pytest.mark.parametrize("options", [dict(family="fullrank", estimator="reparam"),
                                     dict(estimator="score", baseline="loo"),
                                     dict(family="fullrank", estimator="reparam", subsample_size=500)])
def test_a_cuda_fit_matches_the_cpu_fit(options):
    settings = dict(steps=1500, seed=0, progress=False, diagnose=False, **options)
    cpu = bbvi.fit(_logistic(), **settings)
    gpu = bbvi.fit(_logistic(), device="cuda", **settings)
    assert all(t.is_cuda for t in gpu.params["continuous"].values())
    sd = cpu.unconstrained_covariance().diag().sqrt()
    gap = ((gpu.unconstrained_mean().cpu() - cpu.unconstrained_mean()) / sd).abs().max().item()
    assert gap < 0.1, gap    # different random streams: two fits of the same q, each within Monte Carlo noise
    draws = gpu.sample(1000, seed=0)
    assert draws["beta"].shape == (1000, 5)
    assert torch.isfinite(gpu.log_weights(1000)).all()


def test_a_cuda_fit_resumes_bit_for_bit_and_saves(tmp_path):
    settings = dict(family="fullrank", estimator="reparam", steps=200, seed=0, progress=False, diagnose=False,
                    device="cuda", subsample_size=500)
    whole = bbvi.fit(_logistic(), **settings)
    path = str(tmp_path / "fit.pt")
    bbvi.fit(_logistic(), checkpoint=path, checkpoint_every=50,
             callbacks=[lambda state: state.step == 120], **settings)
    resumed = bbvi.fit(_logistic(), resume=path, **settings)
    for k, t in whole.params["continuous"].items():
        assert torch.equal(t, resumed.params["continuous"][k])
    whole.save(str(tmp_path / "q.pt"))
    again = bbvi.load(str(tmp_path / "q.pt"), _logistic())
    assert torch.equal(again.unconstrained_mean().cpu(), whole.unconstrained_mean().cpu())


def test_the_default_cuda_fit_runs_its_end_of_fit_check_and_compares_on_the_cpu():
    fit = bbvi.fit(_logistic(), device="cuda", progress=False)
    assert fit.reliability["num_draws"] == 16000
    reference = bbvi.fit(_logistic(), family="fullrank", progress=False).to_arviz(4000)
    table = bbvi.compare(fit, reference)
    assert table["mean_err_sd"].abs().max() < 0.2
