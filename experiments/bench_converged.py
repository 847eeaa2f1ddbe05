"""Per converged fit: steps and seconds until q is within 0.1 posterior sd of the exact mean and within 12% of
the exact sd (and stays there at every later check), bbvi against Pyro SVI with the same family (mean-field
Gaussian on the unconstrained scale), particles (16, vectorized), optimizer (Adam, lr 0.05) and estimator, on
the conjugate models; and Pyro NUTS's time for a 4 x 1000-draw reference of the same model. A run stops
once it has been accurate at 20 checks in a row (1000 steps).

Run by `make bench` after bench.py; writes bench_converged.csv and .md.
"""
import math
import time

from common import parse, single_thread, write_table

MAX_STEPS = {"bbvi": 20000, "pyro": 20000}   # the same budget, hence the same lr decay


def accurate(draws, mean, sd):
    return abs(draws.mean().item() - mean) < 0.1 * sd and abs(draws.std().item() / sd - 1) < 0.12


HOLD = 20   # a run stops once it has been accurate at this many checks in a row
DECAY = 0.1  # both libraries: lr decays from 0.05 by this factor over the step budget


def held(checks):
    return len(checks) >= HOLD and all(ok for _, ok in checks[-HOLD:])


def settle_step(checks):
    """First checked step of the final accurate streak, if that streak lasted HOLD checks; else None."""
    first, run = None, 0
    for step, ok in checks:
        if ok:
            first = step if run == 0 else first
            run += 1
        else:
            first, run = None, 0
    return first if run >= HOLD else None


def run_bbvi(model, exact, estimator, steps, every):
    import torch

    import bbvi
    from bbvi.result import Result
    (name, (mean, sd)), = exact.items()
    checks, paused = [], [0.0]

    def check(state):
        if state.step % every == 0:
            t = time.perf_counter()
            res = Result.from_state(state, settings={"num_particles": 16}, status="running", wall_time=0)
            checks.append((state.step, accurate(res.sample(20000, seed=state.step)[name], mean, sd)))
            paused[0] += time.perf_counter() - t
            return held(checks)
        return False

    t = time.perf_counter()
    # the same decay in both libraries: lr_t = 0.05 * DECAY^(t / budget)
    fit = bbvi.fit(model, estimator=estimator, baseline="loo" if estimator == "score" else "default", steps=steps,
                   lr=0.05, schedule=lambda t: DECAY ** (t / steps), num_particles=16, seed=0, dtype=torch.float64,
                   callbacks=[check])
    return settle_step(checks), (time.perf_counter() - t - paused[0]) / fit.num_steps


def run_pyro(kind, estimator, steps, every):
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO
    from torch.distributions import transforms

    from models import conjugate
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    if kind == "normal_normal":
        x, prior, lik, tr = conjugate.NORMAL_X, dist.Normal(0.0, 10.0), lambda v: dist.Normal(v, 1.0), None
    elif kind == "gamma_poisson":
        x, prior, lik = conjugate.POISSON_X, dist.Gamma(2.0, 1.0), lambda v: dist.Poisson(v)
        tr = transforms.ExpTransform()
    else:
        x, prior, lik = conjugate.BERNOULLI_X, dist.Beta(1.0, 1.0), lambda v: dist.Bernoulli(probs=v)
        tr = transforms.SigmoidTransform()
    x = x.float()
    _, exact = conjugate.MODELS[kind]()
    (_, (mean, sd)), = exact.items()

    class ScoreNormal(dist.Normal):
        has_rsample = False

    def model():
        v = pyro.sample("v", prior)
        with pyro.plate("data", len(x)):
            pyro.sample("x", lik(v), obs=x)

    def q(loc, scale):
        base = ScoreNormal(loc, scale) if estimator == "score" else dist.Normal(loc, scale)
        return base if tr is None else dist.TransformedDistribution(base, [tr])

    def guide():
        loc = pyro.param("loc", torch.tensor(0.0))
        scale = pyro.param("scale", torch.tensor(0.1), constraint=dist.constraints.positive)
        infer = {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}} if estimator == "score" else {}
        pyro.sample("v", q(loc, scale), infer=infer)

    loss = (TraceGraph_ELBO if estimator == "score" else Trace_ELBO)(num_particles=16, vectorize_particles=True,
                                                                      max_plate_nesting=1)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": DECAY ** (1 / steps), "clip_norm": 1e9})
    svi = SVI(model, guide, optim, loss=loss)
    checks, spent, step = [], 0.0, 0
    for step in range(1, steps + 1):
        t = time.perf_counter()
        svi.step()
        spent += time.perf_counter() - t
        if step % every == 0:
            store = pyro.get_param_store()
            with torch.no_grad():
                draws = q(store["loc"], store["scale"]).sample((20000,)).double()
            checks.append((step, accurate(draws, mean, sd)))
            if held(checks):
                break
    return settle_step(checks), spent / step


def main(argv=None):
    args = parse(__doc__.splitlines()[0], argv)
    single_thread()
    import pandas as pd

    import bbvi
    from models import conjugate
    every = 50
    scale = 0.02 if args.quick else 1.0
    rows = []
    for kind, make in conjugate.MODELS.items():
        model, exact = make()
        t = time.perf_counter()
        bbvi.nuts(model, num_draws=100 if args.quick else 1000, num_warmup=100 if args.quick else 1000,
                  num_chains=4, seed=0, use_cache=False)
        nuts_s = time.perf_counter() - t
        for estimator in ("score", "reparam"):
            b_steps, b_ms = run_bbvi(model, exact, estimator, int(MAX_STEPS["bbvi"] * scale), every)
            p_steps, p_ms = run_pyro(kind, estimator, int(MAX_STEPS["pyro"] * scale), every)
            rows.append(dict(model=kind, estimator="score + baseline (bbvi LOO, pyro decaying avg)"
                             if estimator == "score" else "reparam",
                             bbvi_steps=b_steps, pyro_steps=p_steps,
                             pyro_over_bbvi_steps=(p_steps / b_steps) if b_steps and p_steps else math.nan,
                             bbvi_s=b_steps * b_ms if b_steps else math.nan,
                             pyro_s=p_steps * p_ms if p_steps else math.nan, nuts_4x1000_s=nuts_s))
    text = write_table(pd.DataFrame(rows), args.out, "bench_converged", "Per converged fit",
                       f"Steps until mean within 0.1 sd and sd within 12% of the exact posterior, holding for {HOLD} "
                       f"checks in a row (every {every} steps; empty: not within the budget of {MAX_STEPS['bbvi']} bbvi "
                       f"/ {MAX_STEPS['pyro']} Pyro steps). Adam, lr 0.05 decaying 10x over the budget in both (Pyro: "
                       f"ClippedAdam lrd, clipping off). Seconds exclude the checks.")
    print(text)


if __name__ == "__main__":
    main()
