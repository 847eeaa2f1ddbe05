"""Reliability, part 4: the same seed gives bit-identical fits; the NUTS cache key follows the model."""

import pytest
import torch
from torch.distributions import Normal

import bbvi
from models.conjugate import gamma_poisson, normal_normal


@pytest.mark.parametrize("family", ["meanfield", "fullrank", "lowrank"])
@pytest.mark.parametrize("estimator,baseline", [("score", "loo"), ("score", "ema"), ("score", "cv"),
                                                ("reparam", "default"), ("stl", "default")])
@pytest.mark.filterwarnings("ignore::bbvi.errors.ReliabilityWarning")   # 60-step fits; the test checks bits, not the fit
def test_same_seed_is_bit_identical_and_seeds_differ(family, estimator, baseline):
    model, _ = gamma_poisson()

    def run(seed):
        return bbvi.fit(model, family=family, estimator=estimator, baseline=baseline, steps=60, seed=seed)
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a.elbo, b.elbo)
    for k, v in a.params["continuous"].items():
        assert torch.equal(v, b.params["continuous"][k])
    assert not torch.equal(a.elbo, c.elbo)
    assert torch.equal(a.sample(50)["lam"], b.sample(50)["lam"])

def test_global_rng_is_not_used():
    model, _ = gamma_poisson()
    torch.manual_seed(0)
    a = bbvi.fit(model, steps=30)
    torch.manual_seed(123)
    b = bbvi.fit(model, steps=30)
    assert torch.equal(a.elbo, b.elbo)

def test_cache_key_changes_with_data_model_and_settings():
    from bbvi.reference import cache_key
    model, _ = normal_normal()
    settings = dict(num_draws=10)
    k0 = cache_key(model, settings)
    other_data = bbvi.Model(model.log_joint, model.latents, data=model.data + 1e-9, name=model.name)
    other_fn = bbvi.Model(lambda z, x: model.log_joint(z, x) * 1.0000001, model.latents, data=model.data,
                          name=model.name)
    assert len({k0, cache_key(other_data, settings), cache_key(other_fn, settings),
                cache_key(model, dict(num_draws=11))}) == 4
    assert cache_key(model, settings) == k0


def test_derived_quantities_that_draw_are_reproducible_and_leave_the_global_rng_alone():
    """Before: derived quantities drew from the global RNG: two sample(seed=0) calls differed."""
    def log_joint(z, data):
        return Normal(0.0, 1.0).log_prob(z["mu"])

    def predictive(z, data):
        return {"y": z["mu"] + torch.randn(z["mu"].shape, dtype=z["mu"].dtype)}
    fit = bbvi.fit(bbvi.Model(log_joint, latents={"mu": bbvi.Latent(())}, derived=predictive, name="pp"),
                   steps=100, seed=0, diagnose=False)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = fit.sample(500, seed=7)["y"], fit.sample(500, seed=7)["y"]
    assert torch.equal(a, b)
    assert not torch.equal(a, fit.sample(500, seed=8)["y"])
    assert torch.equal(torch.random.get_rng_state(), before)


SAMPLE_SCRIPT = """
import hashlib, torch, bbvi
from torch.distributions import Normal
def log_joint(z, data):
    return Normal(0.0, 1.0).log_prob(z["mu"]) + Normal(z["mu"][:, None], 1.0).log_prob(data).sum(-1)
def predictive(z, data):
    return {"y": z["mu"] + torch.randn(z["mu"].shape, dtype=z["mu"].dtype)}
model = bbvi.Model(log_joint, {"mu": bbvi.Latent()}, data=torch.tensor([0.3, 1.2]), derived=predictive, name="p")
torch.manual_seed(PROCESS_SEED)  # the global RNG differs between the two processes; it must not matter
fit = bbvi.fit(model, steps=200, seed=0, diagnose=False)
d = fit.sample(1000, seed=3)
print(hashlib.sha256(torch.cat([d["mu"], d["y"]]).numpy().tobytes()).hexdigest())
"""


@pytest.mark.slow
def test_sample_is_bit_identical_across_processes_derived_included(tmp_path):
    """`fit.sample(n, seed=s)` from the same fit settings: the same bits in two fresh processes whose global RNGs
    differ, derived quantities that draw included."""
    import subprocess
    import sys
    out = []
    for process_seed in (1, 2):
        script = tmp_path / f"s{process_seed}.py"
        script.write_text(SAMPLE_SCRIPT.replace("PROCESS_SEED", str(process_seed)))
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        out.append(run.stdout.strip().splitlines()[-1])
    assert out[0] == out[1] and len(out[0]) == 64
