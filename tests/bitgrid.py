"""The loop's bit-for-bit grid, for refactors: ten stochastic-gradient fits (the Gaussian default, full rank, score
+ LOO, natural gradients, kidiq and dogs at the defaults, dogs with steps=300, minibatches with control variates,
adaptive minibatches, Rao-Blackwell with discrete latents) -> their ELBO traces, parameters, status, steps, levels
and counters, saved with torch.save. Run it on the code before and after a change and compare the two files with
torch.equal (`--compare A B`):

    python tests/bitgrid.py REPO OUT.pt          # REPO: the checkout to import bbvi from
    python tests/bitgrid.py --compare BEFORE.pt AFTER.pt
"""
import sys

import torch

if sys.argv[1] == "--compare":
    a, b = (torch.load(p, weights_only=False) for p in sys.argv[2:4])

    def eq(x, y):
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        return torch.equal(x, y) if torch.is_tensor(x) else x == y
    differ = [k for k in a if k not in b or not eq(a[k], b[k])]
    print("bit for bit" if not differ else f"differ: {differ}")
    sys.exit(1 if differ else 0)
sys.path.insert(0, sys.argv[1])
import bbvi
print(bbvi.__file__, file=sys.stderr)
from torch.distributions import Normal, constraints  # noqa: E402
from models import posteriordb  # noqa: E402
torch.set_num_threads(1)

def gauss():
    def lj(z, data):
        return Normal(1.0, 2.0).log_prob(z["x"]).sum(-1) + Normal(0.0, 1.0).log_prob(z["s"])
    return bbvi.Model(lj, {"x": bbvi.Latent(shape=(3,)), "s": bbvi.Latent()}, name="g")

sys.path.insert(0, sys.argv[1] + "/tests")
from test_subsample import _model as sub_model  # noqa: E402


def rb():
    from torch.distributions import Bernoulli
    def lj(z, d):
        return {"prior": Normal(0., 1.).log_prob(z["m"]) + Bernoulli(0.5).log_prob(z["k"]).sum(-1),
                "obs": Normal(z["m"][:, None] + z["k"], 1.).log_prob(d["y"])}
    return bbvi.Model(lj, {"m": bbvi.Latent(), "k": bbvi.Latent(shape=(4,), support=constraints.boolean)},
                      data={"y": torch.tensor([0.5, 1.2, -0.3, 2.0], dtype=torch.float64)}, name="rb")
cases = {
    "minibatch cv": (lambda: sub_model(200), {"subsample_size": 20, "steps": 300}),
    "minibatch adaptive": (lambda: sub_model(200), {"subsample_size": 20, "max_steps": 1500}),
    "rb discrete": (rb, {"steps": 400}),

    "gauss default": (gauss, {}),
    "gauss fullrank": (gauss, {"family": "fullrank"}),
    "gauss score": (gauss, {"estimator": "score", "baseline": "loo"}),
    "gauss natural": (gauss, {"optimizer": "natural"}),
    "kidiq default": (lambda: posteriordb.load("kidiq-kidscore_momhs"), {}),
    "dogs default": (lambda: posteriordb.load("dogs-dogs"), {}),
    "dogs steps": (lambda: posteriordb.load("dogs-dogs"), {"steps": 300}),
}
out = {}
for name, (mk, kw) in cases.items():
    try:
        f = bbvi.fit(mk(), seed=0, diagnose=False, **{"method": "sgd", **kw})
    except Exception as e:
        out[name] = repr(e)
        continue
    out[name] = dict(elbo=f.elbo.clone(), params={g: {k: v.clone() for k, v in d.items()} for g, d in f.params.items()},
                     status=f.status, steps=f.num_steps, levels=repr(f.levels), bad=int(f.num_bad_particles),
                     failed=f.num_failed_steps)
    print(name, f.status, f.num_steps, file=sys.stderr)
torch.save(out, sys.argv[2])
