"""Diagnostic figures (matplotlib): ELBO trace, marginals of the fit over a reference, a pair plot of fit vs
reference, gradient variance per estimator and baseline. Each function returns the Figure and, given `path`,
saves a PNG there."""
import math

import numpy as np
import torch

__all__ = ["plot_elbo", "plot_marginals", "plot_pair", "plot_gradient_variance"]


def _plt():
    import matplotlib
    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg") and not _has_display():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _has_display():
    import os
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _save(fig, path):
    if path:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _flat(draws, names=None, max_params=None):
    """dict name -> (n, *shape) -> ordered dict label -> (n,) numpy, scalars only."""
    out = {}
    order = [n for n in names if n in draws] if names is not None else list(draws)
    for name in order:
        v = draws[name]
        a = np.asarray(torch.as_tensor(v).detach().double().cpu())
        a = a.reshape(a.shape[0], -1)
        for j in range(a.shape[1]):
            out[name if a.shape[1] == 1 and np.ndim(v) == 1 else f"{name}[{j}]"] = a[:, j]
    if max_params is not None:
        out = dict(list(out.items())[:max_params])
    return out


def _reference_draws(reference):
    """InferenceData or dict -> dict name -> (n, *shape)."""
    if reference is None:
        return {}
    if hasattr(reference, "posterior"):
        post = reference.posterior
        return {k: post[k].values.reshape((-1,) + post[k].shape[2:]) for k in post.data_vars}
    return dict(reference)


def plot_elbo(result, path=None, window=100, ax=None):
    """Per-step ELBO estimates (faint) and their running mean over `window` steps; the y-range starts at the
    1st percentile of the second half so the early transient does not flatten the end."""
    plt = _plt()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 3.5))
    elbo = result.elbo.double().numpy()
    steps = np.arange(1, len(elbo) + 1)
    ax.plot(steps, elbo, color="0.75", lw=0.6, label="per-step estimate")
    finite = np.where(np.isfinite(elbo), elbo, np.nan)
    if len(elbo) >= 2:
        k = max(1, min(window, len(elbo) // 2))
        kernel = np.ones(k) / k
        run = np.convolve(np.nan_to_num(finite, nan=np.nanmean(finite)), kernel, mode="valid")
        ax.plot(steps[k - 1:], run, color="C0", lw=1.5, label=f"running mean ({k} steps)")
        tail = finite[len(finite) // 2:]
        lo, hi = np.nanpercentile(tail, 1), np.nanmax(tail)
        pad = 0.1 * (hi - lo) + 1e-9
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO")
    ax.set_title(f"{result.model.name}: ELBO ({result.settings.get('plan', '')[:60]})", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_marginals(result, reference=None, path=None, num_draws=4000, var_names=None, max_params=30, seed=0):
    """One panel per scalar parameter: histogram of the reference draws, density of the fit's draws."""
    plt = _plt()
    fit = _flat(result.sample(num_draws, seed) if hasattr(result, "sample") else result, var_names, max_params)
    ref = _flat(_reference_draws(reference), var_names)
    n = len(fit)
    cols = min(5, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows), squeeze=False)
    for ax, (label, x) in zip(axes.flat, fit.items()):
        both = np.concatenate([x, ref[label]]) if label in ref else x
        lo, hi = np.percentile(both, [0.5, 99.5])
        bins = np.linspace(lo, hi, 50)
        if label in ref:
            ax.hist(ref[label], bins=bins, density=True, color="0.7", label="reference")
        h, edges = np.histogram(x, bins=bins, density=True)
        ax.plot(0.5 * (edges[1:] + edges[:-1]), h, color="C1", lw=1.5, label="bbvi")
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_pair(result, reference=None, path=None, var_names=None, num_draws=2000, max_params=4, seed=0):
    """Pair plot of up to `max_params` scalars: reference draws (grey) and fit draws (orange)."""
    plt = _plt()
    fit = _flat(result.sample(num_draws, seed) if hasattr(result, "sample") else result, var_names, max_params)
    ref = _flat(_reference_draws(reference), var_names)
    labels = list(fit)
    k = len(labels)
    fig, axes = plt.subplots(k, k, figsize=(2.2 * k, 2.2 * k), squeeze=False)
    for i, yi in enumerate(labels):
        for j, xj in enumerate(labels):
            ax = axes[i, j]
            if j > i:
                ax.axis("off")
                continue
            if i == j:
                if yi in ref:
                    ax.hist(ref[yi], bins=40, density=True, color="0.7")
                ax.hist(fit[yi], bins=40, density=True, histtype="step", color="C1")
            else:
                if xj in ref and yi in ref:
                    r = min(len(ref[xj]), num_draws)
                    ax.scatter(ref[xj][:r], ref[yi][:r], s=2, color="0.6", alpha=0.4, rasterized=True)
                ax.scatter(fit[xj], fit[yi], s=2, color="C1", alpha=0.3, rasterized=True)
            if i == k - 1:
                ax.set_xlabel(xj, fontsize=8)
            if j == 0 and i > 0:
                ax.set_ylabel(yi, fontsize=8)
            ax.tick_params(labelsize=6)
    fig.suptitle("fit (orange) vs reference (grey)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_gradient_variance(variances, path=None, title="gradient variance at the fitted q"):
    """Bar chart (log scale) of total gradient variance per configuration: `variances` maps a label
    (e.g. 'score / loo') to the summed per-coordinate variance of gradient estimates."""
    plt = _plt()
    labels, values = list(variances), [float(v) for v in variances.values()]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 3.5))
    ax.bar(range(len(labels)), values, color=[f"C{i}" for i in range(len(labels))])
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("sum of per-coordinate variances")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
