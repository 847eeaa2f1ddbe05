"""Option Greeks by the log-derivative trick (the likelihood-ratio method; Broadie & Glasserman 1996), through
bbvi.expectation, against Black-Scholes closed forms, the pathwise estimator and finite differences with
common random numbers: a European call, a digital (cash-or-nothing) call and an arithmetic-average Asian call.

Under Black-Scholes the log-price path is Gaussian: with mu = r - sigma^2 / 2 and dt = T / m, the increments
X_1 = log S_t1 ~ N(log S0 + mu dt, sigma sqrt(dt)) and X_i ~ N(mu dt, sigma sqrt(dt)) (i > 1), independent.
The price is exp(-rT) E[payoff(S0 exp(cumsum X))], and delta, vega and rho are its derivatives in S0, sigma, r:
the distribution of X carries every parameter, so the score estimator gets all three from one set of paths
(the payoff needs no derivative); the pathwise one differentiates the payoff along each path."""
import math
import os

import numpy as np
import pandas as pd
import torch

from common import parse, single_thread, write_table

import bbvi

S0, SIGMA, R, T = 100.0, 0.2, 0.05, 1.0
GREEKS = ("delta", "vega", "rho")
DATES = 52  # the Asian call's monitoring dates


def _phi(x):
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def black_scholes(payoff, K, s0=S0, sigma=SIGMA, r=R, t=T):
    """Closed-form price, delta, vega and rho of the European call and the digital call paying 1."""
    d1 = (math.log(s0 / K) + (r + sigma ** 2 / 2) * t) / (sigma * math.sqrt(t))
    d2 = d1 - sigma * math.sqrt(t)
    disc = math.exp(-r * t)
    if payoff == "call":
        return dict(price=s0 * _Phi(d1) - K * disc * _Phi(d2), delta=_Phi(d1), vega=s0 * _phi(d1) * math.sqrt(t),
                    rho=K * t * disc * _Phi(d2))
    if payoff == "digital":
        return dict(price=disc * _Phi(d2), delta=disc * _phi(d2) / (s0 * sigma * math.sqrt(t)),
                    vega=-disc * _phi(d2) * d1 / sigma, rho=-t * disc * _Phi(d2) + disc * _phi(d2) * math.sqrt(t) / sigma)
    raise ValueError(payoff)


def log_increments(s0, sigma, r, dates):
    """The Gaussian distribution of the log-price increments at `dates` equally spaced dates up to T."""
    dt = T / dates
    mu = (r - sigma ** 2 / 2) * dt
    loc = torch.cat([(torch.log(s0) + mu).reshape(1), mu.reshape(1).expand(dates - 1)])
    scale = (sigma * math.sqrt(dt)).reshape(1).expand(dates)
    return torch.distributions.Independent(torch.distributions.Normal(loc, scale), 1)


def payoff_fn(payoff, K):
    """x (n, dates) log increments -> (n,) payoff; torch code (pathwise where torch can differentiate it)."""
    def call(x):
        return (torch.exp(x.sum(-1)) - K).clamp(min=0)

    def digital(x):
        return (torch.exp(x.sum(-1)) > K).to(x.dtype)  # a comparison: no gradient in torch's graph

    def asian(x):
        return (torch.exp(torch.cumsum(x, -1)).mean(-1) - K).clamp(min=0)
    return {"call": call, "digital": digital, "asian": asian}[payoff]


def dates_of(payoff):
    return DATES if payoff == "asian" else 1


def bbvi_estimates(payoff, K, estimator, baseline, num_paths, batch, seed):
    """Price and (delta, vega, rho) from bbvi.expectation in num_paths / batch independent batches; returns
    (mean (4,), standard error (4,), variance per path (4,), estimator bbvi chose)."""
    g = torch.Generator().manual_seed(seed)
    f = payoff_fn(payoff, K)
    rows, chosen = [], None
    for _ in range(num_paths // batch):
        theta = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (S0, SIGMA, R)]
        s0, sigma, r = theta
        value, info = bbvi.expectation(f, log_increments(s0, sigma, r, dates_of(payoff)), num_samples=batch,
                                       estimator=estimator, baseline=baseline, generator=g, return_info=True)
        price = torch.exp(-r * T) * value
        grads = torch.autograd.grad(price, theta)
        rows.append(torch.stack([price.detach()] + [gr.detach() for gr in grads]))
        chosen = info["estimator"]
    est = torch.stack(rows)
    n = est.shape[0]
    return est.mean(0).numpy(), (est.std(0) / math.sqrt(n)).numpy(), (est.var(0) * batch).numpy(), chosen


def finite_differences(payoff, K, num_paths, seed, rel=0.01):
    """Central differences with common random numbers (the same normals at theta + h and theta - h),
    h = rel x the parameter; returns (mean (3,), standard error (3,), variance per path (3,))."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(num_paths, dates_of(payoff), generator=g, dtype=torch.float64)
    f = payoff_fn(payoff, K)

    def discounted(s0, sigma, r):
        d = log_increments(torch.tensor(s0, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64),
                           torch.tensor(r, dtype=torch.float64), dates_of(payoff))
        return math.exp(-r * T) * f(d.base_dist.loc + d.base_dist.scale * z)
    base = (S0, SIGMA, R)
    out = []
    for j in range(3):
        up, down = list(base), list(base)
        h = rel * base[j]
        up[j] += h
        down[j] -= h
        out.append((discounted(*up) - discounted(*down)) / (2 * h))
    per_path = torch.stack(out, 1)
    return per_path.mean(0).numpy(), (per_path.std(0) / math.sqrt(num_paths)).numpy(), per_path.var(0).numpy()


METHODS = (("score, no baseline", "score", None), ("score, LOO baseline", "score", "loo"),
           ("pathwise", "pathwise", None), ("auto", "auto", "loo"))
CASES = (("call", 100.0), ("call", 140.0), ("digital", 100.0), ("digital", 140.0), ("asian", 100.0))


def run(num_paths, batch, seed=0):
    rows = []
    for payoff, K in CASES:
        exact = black_scholes(payoff, K) if payoff != "asian" else None
        for label, estimator, baseline in METHODS:
            if payoff == "digital" and estimator == "pathwise":
                continue  # torch refuses: the comparison carries no gradient (see the sign() row below)
            mean, se, var, chosen = bbvi_estimates(payoff, K, estimator, baseline, num_paths, batch, seed)
            for j, greek in enumerate(("price",) + GREEKS):
                rows.append(dict(payoff=payoff, K=K, greek=greek, method=label, chose=chosen, value=mean[j],
                                 se=se[j], var_per_path=var[j], exact=exact[greek] if exact else math.nan))
        mean, se, var = finite_differences(payoff, K, num_paths, seed + 1)
        for j, greek in enumerate(GREEKS):
            rows.append(dict(payoff=payoff, K=K, greek=greek, method="finite differences (CRN, h = 1%)",
                             chose="", value=mean[j], se=se[j], var_per_path=var[j],
                             exact=exact[greek] if exact else math.nan))
    # the trap: a digital written so that torch carries a gradient that is zero almost everywhere
    g = torch.Generator().manual_seed(seed)
    s0 = torch.tensor(S0, dtype=torch.float64, requires_grad=True)

    def trap(x):
        return (torch.exp(x.sum(-1)) - 100.0).sign().clamp(min=0)
    for label, estimator in (("pathwise on sign(S_T - K)", "pathwise"), ("auto on sign(S_T - K)", "auto")):
        v, info = bbvi.expectation(trap, log_increments(s0, torch.tensor(SIGMA, dtype=torch.float64),
                                                        torch.tensor(R, dtype=torch.float64), 1),
                                   num_samples=num_paths, estimator=estimator, generator=g, return_info=True)
        delta = float(torch.autograd.grad(math.exp(-R * T) * v, s0)[0])
        rows.append(dict(payoff="digital", K=100.0, greek="delta", method=label, chose=info["estimator"],
                         value=delta, se=math.nan, var_per_path=math.nan, exact=black_scholes("digital", 100.0)["delta"]))
    frame = pd.DataFrame(rows)
    frame["z"] = (frame.value - frame.exact) / frame.se
    frame["paths_for_1pct"] = frame.var_per_path / (0.01 * frame.value.abs()) ** 2
    return frame


def main(argv=None):
    args = parse(__doc__.splitlines()[0], argv)
    single_thread()
    num_paths, batch = (4000, 500) if args.quick else (100_000, 1000)
    frame = run(num_paths, batch)
    shown = frame[frame.greek != "price"][["payoff", "K", "greek", "method", "chose", "value", "se", "exact", "z",
                                           "var_per_path", "paths_for_1pct"]]
    text = write_table(shown, args.out, "greeks", "Sensitivity analysis: option Greeks by the log-derivative trick",
                       f"Black-Scholes, S0 = {S0:g}, sigma = {SIGMA:g}, r = {R:g}, T = {T:g}; {num_paths} paths "
                       f"per estimate ({num_paths // batch} batches of {batch}; se from the batches); z = (value - "
                       f"exact) / se; paths_for_1pct = variance per path / (1% of the value)^2. Asian: {DATES} "
                       f"dates, no closed form. 'chose' is what bbvi.expectation ran.")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharey=True)
    methods = [m for m, _, _ in METHODS[:3]] + ["finite differences (CRN, h = 1%)"]
    cases = [f"{p} K={K:g}" for p, K in CASES]
    for ax, greek in zip(axes, GREEKS):
        sub = frame[frame.greek == greek]
        for j, method in enumerate(methods):
            vals = [sub[(sub.method == method) & (sub.payoff == p) & (sub.K == K)].var_per_path for p, K in CASES]
            vals = [float(v.iloc[0]) if len(v) else np.nan for v in vals]
            ax.bar(np.arange(len(cases)) + 0.2 * (j - 1.5), vals, width=0.2, label=method, color=f"C{j}")
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(cases)))
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
        ax.set_title(greek)
    axes[0].set_ylabel("variance per path")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "greeks.png"), dpi=120)
    plt.close(fig)
    print(text)
    return frame


if __name__ == "__main__":
    main()
