"""NumPyro's side of time_to_fit.py: SVI (AutoNormal, jitted) and NUTS on the same three posteriors; runs in the JAX
virtualenv (<repo>/.bench-jax), never in the torch env: it imports neither torch nor bbvi.

Reads the .npz that time_to_fit.py writes (each model's data, and each latent's reference mean and sd, flattened in
C order: `<model>/<data name>`, `<model>/mean/<latent>`, `<model>/sd/<latent>`) and prints one JSON line:
{"numpyro": version, "jax": version, "rows": [{"model", "system", "seconds", "accurate", "steps", ...}]}.

The models are written out here by hand, the same joints as bbvi's (time_to_fit.py's logistic regression,
models/posteriordb.py's sblrc-blr, models/eight_schools.py): logistic regression w ~ N(0, 1)^D, y ~ Bernoulli(logits
X w); sblrc-blr beta ~ N(0, 10)^5, sigma ~ half-N(0, 10), y ~ N(X beta, sigma); eight schools noncentered
theta_trans ~ N(0, 1)^8, mu ~ N(0, 5), tau ~ half-Cauchy(0, 5), y ~ N(mu + tau theta_trans, sigma).

SVI as its docs start a user: AutoNormal, Adam(lr), Trace_ELBO with one particle, `jax.jit(svi.update)`. Every
`every` steps, 4000 draws of the guide give each latent's mean (the clock paused); accurate = every mean within
0.1 reference sd. The time to an accurate fit is the clock at the first check of a run of `hold` accurate checks
that lasts to the end (or to the cap); compile time is the first update's, a column of its own.
NUTS: numpyro.infer.NUTS, one chain, 1000 warmup + 1000 draws (its own compile included in its seconds).
"""
import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO  # noqa: E402
from numpyro.infer.autoguide import AutoNormal  # noqa: E402


def logreg(X, y):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    numpyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)


def sblrc(X, y):
    beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand([5]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(10.0))
    numpyro.sample("y", dist.Normal(X @ beta, sigma), obs=y)


def eight_schools(y, sigma):
    tt = numpyro.sample("theta_trans", dist.Normal(0.0, 1.0).expand([8]).to_event(1))
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    numpyro.sample("y", dist.Normal(mu + tau * tt, sigma), obs=y)


MODELS = {"logistic regression": (logreg, ("X", "y")), "sblrc-blr": (sblrc, ("X", "y")),
          "eight_schools_noncentered": (eight_schools, ("y", "sigma"))}


def accuracy(samples, ref):
    """max over latent elements of |mean - reference mean| / reference sd."""
    if "theta" in ref and "theta" not in samples:   # eight schools' derived theta = mu + tau theta_trans
        samples = dict(samples, theta=samples["mu"][:, None] + samples["tau"][:, None] * samples["theta_trans"])
    worst = 0.0
    for name, (mean, sd) in ref.items():
        m = np.asarray(samples[name]).reshape(samples[name].shape[0], -1).mean(0)
        worst = max(worst, float(np.max(np.abs(m - mean) / sd)))
    return worst


def run_svi(model, data, ref, lr, cap, every, hold, seed):
    guide = AutoNormal(model)
    svi = SVI(model, guide, numpyro.optim.Adam(lr), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(seed), **data)
    update = jax.jit(svi.update)
    t = time.perf_counter()
    state, _ = update(state, **data)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t
    clock, checks, step = 0.0, [], 1
    key = jax.random.PRNGKey(seed + 1)
    while step < cap:
        t = time.perf_counter()
        for _ in range(every - (step % every)):
            state, _ = update(state, **data)
            step += 1
        jax.block_until_ready(state)
        clock += time.perf_counter() - t
        key, sub = jax.random.split(key)
        draws = guide.sample_posterior(sub, svi.get_params(state), sample_shape=(4000,))
        err = accuracy(draws, ref)
        checks.append((step, clock, err))
        if len(checks) >= hold and all(e < 0.1 for _, _, e in checks[-hold:]):
            break
    return dict(settled(checks, hold), compile_s=compile_s)


def settled(checks, hold):
    """From checks [(step, clock, error)]: the first check of the final run of accurate ones (error < 0.1), if that
    run is at least `hold` checks long: the time to an accurate fit that stays accurate."""
    i = len(checks)
    while i > 0 and checks[i - 1][2] < 0.1:
        i -= 1
    held = len(checks) - i >= hold
    return dict(seconds=checks[i][1] if held else None, steps=checks[i][0] if held else None, accurate=held,
                final_error=checks[-1][2], steps_run=checks[-1][0], run_seconds=checks[-1][1])


def run_nuts(model, data, ref, seed):
    mcmc = MCMC(NUTS(model), num_warmup=1000, num_samples=1000, num_chains=1, progress_bar=False)
    t = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), **data)
    jax.block_until_ready(mcmc.get_samples())
    seconds = time.perf_counter() - t
    err = accuracy(mcmc.get_samples(), ref)
    return dict(seconds=seconds, steps=None, accurate=err < 0.1, compile_s=None, final_error=err,
                steps_run=2000, run_seconds=seconds)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--cap", type=int, default=20000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--hold", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default=",".join(MODELS))
    args = p.parse_args(argv)
    rows = []
    with np.load(args.data) as f:
        files = dict(f)
    for name in args.models.split(","):
        model, names = MODELS[name]
        data = {k: jnp.asarray(files[f"{name}/{k}"], jnp.float32) for k in names}
        ref = {k.split("/")[2]: (files[k], files[k.replace("/mean/", "/sd/")]) for k in files
               if k.startswith(f"{name}/mean/")}
        rows.append(dict(model=name, system="numpyro SVI (AutoNormal, jit)",
                         **run_svi(model, data, ref, args.lr, args.cap, args.every, args.hold, args.seed)))
        rows.append(dict(model=name, system="numpyro NUTS (1 chain, 1000 + 1000)", **run_nuts(model, data, ref,
                                                                                               args.seed)))
    print(json.dumps({"numpyro": numpyro.__version__, "jax": jax.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
