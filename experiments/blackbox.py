"""Black-box optimisation with the log-derivative trick: minimise a function torch cannot differentiate
(integer-valued: a rounded, shifted Rosenbrock in 6 dimensions, and a small "simulator" with a random outcome)
by gradient descent on E_{N(mu, sigma)}[f] with bbvi.expectation (score path, LOO baseline, standardised
signals), against plain random search, at equal numbers of function evaluations."""
import math
import os
import sys

import numpy as np
import pandas as pd
import torch

from common import parse, single_thread, write_table

import bbvi

DIM = 6
SHIFT = np.array([1.5, -0.5, 2.0, 0.5, -1.0, 1.0])


def rounded_rosenbrock(x):
    """numpy, integer-valued: sum floor(100 (y_{i+1} - y_i^2)^2 + (1 - y_i)^2), y = x - shift + 1."""
    y = np.asarray(x, dtype=np.float64) - SHIFT + 1.0
    return np.floor(100 * (y[..., 1:] - y[..., :-1] ** 2) ** 2 + (1 - y[..., :-1]) ** 2).sum(-1)


def search_gradient(f, budget, batch, seed, lr=0.2):
    """Adam on (mu, log sigma) of a diagonal Gaussian search distribution; returns the best value seen after
    every batch of evaluations."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.zeros(DIM, dtype=torch.float64, requires_grad=True)
    log_sigma = torch.zeros(DIM, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([mu, log_sigma], lr=lr)
    best, trace, evals = math.inf, [], 0
    seen = []

    def recorded(x):
        vals = f(x.detach().numpy())
        seen.append(vals)
        return vals
    while evals + batch <= budget:
        dist = torch.distributions.Independent(torch.distributions.Normal(mu, log_sigma.exp()), 1)
        value = bbvi.expectation(recorded, dist, num_samples=batch, estimator="score", baseline="loo",
                                 standardize=True, generator=g)
        opt.zero_grad()
        value.backward()
        opt.step()
        evals += batch
        best = min(best, float(seen[-1].min()))
        trace.append((evals, best))
    return trace


def random_search(f, budget, batch, seed, width=3.0):
    """Uniform draws on [-width, width]^DIM around 0 (the search distribution's start), best so far."""
    rng = np.random.default_rng(seed)
    best, trace = math.inf, []
    for evals in range(batch, budget + 1, batch):
        x = rng.uniform(-width, width, size=(batch, DIM))
        best = min(best, float(f(x).min()))
        trace.append((evals, best))
    return trace


def main(argv=None):
    args = parse(__doc__.splitlines()[0], argv)
    single_thread()
    budget, batch, seeds = (400, 16, (0,)) if args.quick else (20000, 32, (0, 1, 2))
    rows = []
    for seed in seeds:
        for method, run in (("score gradient (bbvi.expectation)", search_gradient), ("random search", random_search)):
            for evals, best in run(rounded_rosenbrock, budget, batch, seed):
                rows.append(dict(method=method, seed=seed, evals=evals, best=best))
    frame = pd.DataFrame(rows)
    final = frame[frame.evals == frame.evals.max()].groupby("method").best.agg(["median", "min", "max"]).reset_index()
    text = write_table(final, args.out, "blackbox", "Black-box optimisation: the score path against random search",
                       f"Best value of a rounded 6-d Rosenbrock (minimum 0) after {budget} evaluations, "
                       f"{len(seeds)} seeds; search distribution N(mu, sigma) from N(0, 1), Adam lr 0.2, "
                       f"{batch} draws per step, LOO baseline, standardised signals.")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (method, seed), grp in frame.groupby(["method", "seed"]):
        ax.semilogy(grp.evals, grp.best + 1, color="C0" if method.startswith("score") else "C1",
                    label=method if seed == seeds[0] else None)
    ax.set_xlabel("function evaluations")
    ax.set_ylabel("best value + 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "blackbox.png"), dpi=120)
    plt.close(fig)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
