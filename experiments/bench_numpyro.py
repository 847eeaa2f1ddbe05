"""NumPyro (JAX) SVI per-step time on bench.py's Bayesian logistic regression; runs in the JAX virtualenv.

Run by bench.py (numpyro_rows) with <repo>/.bench-jax/bin/python, never in the torch env: it imports neither torch
nor bbvi. Reads X, y from the .npz given (bench.py writes make_data(N, D) there; `X_<n>`, `y_<n>` for other sizes
in --sizes, else such a size gets data drawn here with numpy from the same law), and prints one JSON line:
{"numpyro": version, "jax": version, "rows": [{"estimator", "N", "D", "S", "ms_per_step", "compile_s", ...}]}.

The model and guide are the Pyro runner's in bench.py: w ~ Normal(0, 1) per coordinate, y_n ~ Bernoulli(logits =
x_n . w) in a plate over the data; a mean-field Normal guide (loc 0, scale 0.1, positive constraint); Adam(lr);
16 particles vectorized (NumPyro vmaps a one-particle ELBO). "reparam": Trace_ELBO. "score": a guide Normal whose
`reparametrized_params` is empty, so `has_rsample` is False, with TraceGraph_ELBO: NumPyro then stops the gradient
through the sample and adds, per non-reparameterizable site, the surrogate log q(w) * stop_gradient(downstream
cost), the cost being the model's log-probs and the guide's -log q that depend on w (numpyro/infer/elbo.py,
TraceGraph_ELBO.loss). NumPyro has no baselines (no `baseline` option anywhere in the package), so this is the
plain score-function estimator, averaged over the particles.

Timing: `jax.jit(svi.update)` with the data as arguments (not baked-in constants); compile_s is the first call,
compile and one step, to block_until_ready; then `--warmup` steps, then `--repeats` rounds of `--steps` steps each
(the two estimators round-robin), each round timed to jax.block_until_ready on the state; the median ms per step.
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.distributions import constraints  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO  # noqa: E402

jax.config.update("jax_enable_x64", False)   # float32, as the torch contenders


class ScoreNormal(dist.Normal):
    """A Normal that NumPyro treats as not reparameterizable (has_rsample is False): the score-function path."""
    reparametrized_params = []


def model(X, y):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(X.shape[1], X.dtype), 1.0).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)


def make_guide(estimator):
    normal = dist.Normal if estimator == "reparam" else ScoreNormal

    def guide(X, y):
        D = X.shape[1]
        loc = numpyro.param("loc", jnp.zeros(D, X.dtype))
        scale = numpyro.param("scale", jnp.full((D,), 0.1, X.dtype), constraint=constraints.positive)
        numpyro.sample("w", normal(loc, scale).to_event(1))
    return guide


def make_runner(estimator, X, y, S, lr):
    """(compile_s, step): the jitted update's first call timed, then a closure doing one more step."""
    elbo_cls = Trace_ELBO if estimator == "reparam" else TraceGraph_ELBO
    svi = SVI(model, make_guide(estimator), numpyro.optim.Adam(lr),
              loss=elbo_cls(num_particles=S, vectorize_particles=True))
    box = {"state": svi.init(jax.random.PRNGKey(0), X, y)}
    jax.block_until_ready(box["state"])
    update = jax.jit(svi.update)
    t = time.perf_counter()
    box["state"], box["loss"] = update(box["state"], X, y)
    jax.block_until_ready(box["state"])
    compile_s = time.perf_counter() - t

    def step():
        box["state"], box["loss"] = update(box["state"], X, y)
    return compile_s, step, box


def load(path, n):
    with np.load(path) as f:
        if f"X_{n}" in f:
            return f[f"X_{n}"], f[f"y_{n}"], "file"
        if f["X"].shape[0] == n:
            return f["X"], f["y"], "file"
        D = f["X"].shape[1]
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, D))
    w = rng.standard_normal(D)
    y = rng.random(n) < 1 / (1 + np.exp(-X @ w))
    return X, y, "generated"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help=".npz with X (N, D) and y (N,); optionally X_<n>, y_<n> for the --sizes")
    p.add_argument("--sizes", default=None, help="comma-separated N to time, e.g. 1000,100000 (default: len(X))")
    p.add_argument("--particles", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--estimators", default="reparam,score")
    args = p.parse_args(argv)
    with np.load(args.data) as f:
        default_n = f["X"].shape[0]
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [default_n]
    ests = args.estimators.split(",")
    rows = []
    for n in sizes:
        Xn, yn, source = load(args.data, n)
        X, y = jnp.asarray(Xn, jnp.float32), jnp.asarray(yn, jnp.float32)
        runners = {e: make_runner(e, X, y, args.particles, args.lr) for e in ests}
        for _, step, box in runners.values():
            for _ in range(args.warmup):
                step()
            jax.block_until_ready(box["state"])
        times = {e: [] for e in ests}
        for _ in range(args.repeats):
            for e, (_, step, box) in runners.items():
                t = time.perf_counter()
                for _ in range(args.steps):
                    step()
                jax.block_until_ready(box["state"])
                times[e].append((time.perf_counter() - t) / args.steps)
        for e, (compile_s, _, box) in runners.items():
            rows.append(dict(estimator=e, N=n, D=int(X.shape[1]), S=args.particles,
                             ms_per_step=1e3 * statistics.median(times[e]), compile_s=compile_s,
                             final_loss=float(box["loss"]), steps=args.steps, repeats=args.repeats, data=source))
    print(json.dumps({"numpyro": numpyro.__version__, "jax": jax.__version__,
                      "device": jax.devices()[0].platform, "dtype": str(X.dtype), "rows": rows}))


if __name__ == "__main__":
    main()
