"""Diagnostic figures (matplotlib): ELBO trace, marginals of the fit over a reference, a pair plot of fit vs
reference, gradient variance per estimator and baseline. Each function returns the Figure and, given `path`,
saves a PNG there."""
import math
import warnings

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


def _flat(draws, names=None):
    """dict name -> (n, *shape) -> ordered dict label -> (n,) numpy, scalars only. `names` may name a latent (all its
    scalars) or one scalar of it by its label ('theta[0]')."""
    out = {}
    for name in (names if names is not None else list(draws)):
        base = name.split("[")[0]
        if base not in draws:
            continue
        v = draws[base]
        a = np.asarray(torch.as_tensor(v).detach().double().cpu())
        a = a.reshape(a.shape[0], -1)
        for j in range(a.shape[1]):
            label = base if a.shape[1] == 1 and np.ndim(v) == 1 else f"{base}[{j}]"
            if name in (base, label):
                out[label] = a[:, j]
    return out


def _cap(flat, max_params, where):
    """The first `max_params` scalars of `flat` and, where that leaves some out, a note saying how many and how to
    choose (also warned, from `where`, the plot's name); None when all are shown."""
    if len(flat) <= max_params:
        return flat, None
    note = (f"showing the first {max_params} of {len(flat)} scalar parameters ({len(flat) - max_params} left out); "
            f"choose which with var_names=[...] (or raise max_params=)")
    warnings.warn(f"{where}: {note}", stacklevel=3)
    return dict(list(flat.items())[:max_params]), note


def _whole(*values):
    """True where every finite draw is a whole number: a boolean or integer latent, drawn as bars."""
    v = np.concatenate([np.asarray(x, dtype=np.float64) for x in values])
    v = v[np.isfinite(v)]
    return len(v) > 0 and bool(np.all(v == np.round(v)))


def _bars(ax, fit, ref, fit_style, ref_style):
    """Bars of P(value) for whole-number draws: the reference's wide (when given), the fit's narrow on top."""
    values = np.unique(np.concatenate([fit] + ([ref] if ref is not None else [])))
    values = values[np.isfinite(values)]
    for x, width, style in ((ref, 0.8, ref_style), (fit, 0.4, fit_style)):
        if x is not None:
            x = x[np.isfinite(x)]
            ax.bar(values, [(x == v).mean() if len(x) else 0.0 for v in values], width=width, **style)
    if len(values) <= 12:
        ax.set_xticks(values)


def _reference_draws(reference):
    """InferenceData or dict -> dict name -> (n, *shape)."""
    if reference is None:
        return {}
    if hasattr(reference, "posterior"):
        post = reference.posterior
        return {k: post[k].values.reshape((-1,) + post[k].shape[2:]) for k in post.data_vars}
    return dict(reference)


_FAMILY_WORDS = {"MeanField": "mean-field Gaussian", "FullRank": "full-rank Gaussian", "LowRank": "low-rank Gaussian",
                 "Flow": "normalizing flow"}
_PATH_WORDS = {"score": "score function", "reparam": "reparameterization (pathwise)",
               "stl": "sticking-the-landing (pathwise)"}
_WHOLE_WORDS = {"arm": "ARM (antithetic pairs)", "disarm": "DisARM (antithetic pairs)",
                "vimco": "VIMCO (importance-weighted bound)", "relax": "RELAX (learned control variate)",
                "concrete": "Concrete relaxation (biased)"}
_BASELINE_WORDS = {"LOO": "leave-one-out baseline", "EMA": "moving-average baseline", "CV": "control-variate baseline",
                   "NoBaseline": "no baseline"}


def _family_words(result):
    """'mean-field Gaussian', 'low-rank Gaussian (rank 2)', 'normalizing flow (nsf)', ...: the fit's family in words."""
    family = getattr(result, "family", None)
    name = type(family).__name__ if family is not None else \
        str(getattr(result, "settings", {}).get("family", "")).split("(")[0]
    words = _FAMILY_WORDS.get(name, name or "?")
    if name == "LowRank" and hasattr(family, "rank"):
        words += f" (rank {family.rank})"
    if name == "Flow" and hasattr(family, "kind"):
        words += f" ({family.kind})"
    return words


def _estimator_words(result):
    """'score function + leave-one-out baseline', 'reparameterization (pathwise)', ...: the fit's plan in words."""
    plan = getattr(result, "plan", None)
    settings = getattr(result, "settings", {})
    if plan is None:
        return str(settings.get("estimator", "?"))
    whole = getattr(plan, "whole", None)
    if whole is not None:
        words = _WHOLE_WORDS.get(getattr(whole, "name", ""), getattr(whole, "name", type(whole).__name__))
    else:
        path = plan.path
        words = _PATH_WORDS.get(path, path) if path is not None else ""
        if plan.has_discrete and (path is None or getattr(plan.continuous, "pathwise", False)):
            words = (words + " + " if words else "") + "score function for the discrete latents"
        if plan.has_score_terms:
            baseline = plan.baseline
            words += " + " + (_BASELINE_WORDS.get(type(baseline).__name__, type(baseline).__name__)
                              if baseline is not None else "no baseline")
            if type(baseline).__name__ == "EMA" and hasattr(baseline, "decay"):
                words += f" (decay {baseline.decay:g})"
        if getattr(plan, "sum_over", ()):
            words += ", exact sums over " + ", ".join(plan.sum_over)
    if getattr(getattr(result, "options", None), "auto_estimator", False):
        words = "auto: " + words
    return words


def _fit_title(result):
    import textwrap
    name = getattr(getattr(result, "model", None), "name", None) or getattr(result, "settings", {}).get("model", "fit")
    return textwrap.fill(f"{name}: {_family_words(result)}, {_estimator_words(result)}", 100)


def _log_helps(elbo):
    """True where the ELBO is negative throughout and its early values reach more than 10x further below zero than
    where the fit ends: then -ELBO on a log scale shows the transient and the end at once."""
    finite = elbo[np.isfinite(elbo)]
    if len(finite) < 10 or not (finite < 0).all():
        return False
    neg = -finite
    return bool(neg.max() > 10 * np.percentile(neg[len(neg) // 2:], 99))


def plot_elbo(result, path=None, window=100, ax=None):
    """Per-step ELBO estimates (faint) and their running mean over `window` steps, titled with the model, family
    and estimator in words. Where the ELBO is negative throughout and starts more than 10x further below zero
    than where it ends, -ELBO is drawn on a log axis (transient and end both visible); otherwise the ELBO on a
    linear axis whose range starts at the 1st percentile of the second half, so the early transient does not
    flatten the end."""
    plt = _plt()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 3.5))
    elbo = result.elbo.double().cpu().numpy()
    steps = np.arange(1, len(elbo) + 1)
    log = _log_helps(elbo)
    sign = -1.0 if log else 1.0
    objective = getattr(result, "settings", {}).get("objective")
    what = "objective" if objective else "ELBO"
    ax.plot(steps, sign * elbo, color="0.75", lw=0.6, label="per-step estimate")
    finite = np.where(np.isfinite(elbo), elbo, np.nan)
    if len(elbo) >= 2 and np.isfinite(finite).any():
        k = max(1, min(window, len(elbo) // 2))
        kernel = np.ones(k) / k
        run = np.convolve(np.nan_to_num(finite, nan=np.nanmean(finite)), kernel, mode="valid")
        ax.plot(steps[k - 1:], sign * run, color="C0", lw=1.5, label=f"running mean ({k} steps)")
        tail = finite[len(finite) // 2:]
        if not log and np.isfinite(tail).any():
            lo, hi = np.nanpercentile(tail, 1), np.nanmax(tail)
            pad = 0.1 * (hi - lo) + 1e-9
            ax.set_ylim(lo - pad, hi + pad)
    if log:
        ax.set_yscale("log")
        ax.set_ylabel(f"-{what} estimate (log scale)")
    else:
        ax.set_ylabel(f"{what} estimate")
    ax.set_xlabel("step")
    title = _fit_title(result)
    if objective:
        title += f"\n{what}: {objective}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper right" if log else "lower right")
    return _save(fig, path)


def _log_axis(values):
    """True for draws that are all positive and whose central 99% spans more than two orders of magnitude (tau in a
    funnel): such a latent reads on a log axis."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2 or not (v > 0).all():
        return False
    lo, hi = np.percentile(v, [0.5, 99.5])
    return bool(hi > 100 * lo)


def _edges(values, log, num=50):
    """Histogram bin edges over the central 99% of `values` (log-spaced where `log`)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)] if log else v[np.isfinite(v)]
    if len(v) == 0:
        return np.linspace(0.0, 1.0, num)
    lo, hi = np.percentile(v, [0.5, 99.5])
    if not hi > lo:
        width = 1e-6 * max(1.0, abs(lo))
        lo, hi = (lo / 2, hi * 2) if log else (lo - width, hi + width)
    return np.geomspace(lo, hi, num) if log else np.linspace(lo, hi, num)


def _density(values, edges, log):
    """Histogram density of `values` over `edges`: per unit of the value, or per unit of log10(value) where `log`."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if log:
        v = v[v > 0]
        h, _ = np.histogram(np.log10(v), bins=np.log10(edges))
        width = np.diff(np.log10(edges))
    else:
        h, _ = np.histogram(v, bins=edges)
        width = np.diff(edges)
    total = h.sum()
    return h / (total * width) if total > 0 else h.astype(np.float64)


def plot_marginals(result, reference=None, path=None, num_draws=4000, var_names=None, max_params=30, seed=0):
    """One panel per scalar parameter, titled with its name: histogram of the reference draws (grey), density of
    the fit's draws (orange line). A parameter whose draws (the reference's, else the fit's) are all positive and
    span more than two orders of magnitude gets a log x-axis, with the density per unit of log10(value). A parameter
    whose draws are all whole numbers (a boolean or integer latent) gets bars of P(value): the reference's wide and
    grey, the fit's narrow and orange. At most `max_params` panels: where more are left out, a UserWarning and the
    figure's title say how many, and that var_names= chooses which."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    plt = _plt()
    fit, note = _cap(_flat(result.sample(num_draws, seed) if hasattr(result, "sample") else result, var_names),
                     max_params, "bbvi.plots.plot_marginals")
    ref = _flat(_reference_draws(reference), var_names)
    n = len(fit)
    cols = min(5, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.3 * rows), squeeze=False)
    for i, (ax, (label, x)) in enumerate(zip(axes.flat, fit.items())):
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=6)
        if _whole(x, *([ref[label]] if label in ref else [])):
            _bars(ax, x, ref.get(label), {"color": "C1", "label": "fit (bbvi)"},
                  {"color": "0.7", "label": "reference"})
            ax.set_xlabel("value", fontsize=7)
            ax.set_ylabel("probability", fontsize=7)
            continue
        log = _log_axis(ref[label] if label in ref else x)
        both = np.concatenate([x, ref[label]]) if label in ref else x
        edges = _edges(both, log)
        if label in ref:
            ax.stairs(_density(ref[label], edges, log), edges, fill=True, color="0.7", label="reference")
        centers = np.sqrt(edges[1:] * edges[:-1]) if log else 0.5 * (edges[1:] + edges[:-1])
        ax.plot(centers, _density(x, edges, log), color="C1", lw=1.5, label="fit (bbvi)")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel("value (log scale)" if log else "value", fontsize=7)
        if log:
            ax.set_ylabel("density per decade", fontsize=7)
        elif i % cols == 0:
            ax.set_ylabel("density", fontsize=7)
        ax.set_yticks([])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles = ([Patch(color="0.7", label="reference")] if ref else []) + \
        [Line2D([], [], color="C1", lw=1.5, label="fit (bbvi)")]
    axes.flat[0].legend(handles=handles, fontsize=7)
    if note:
        fig.suptitle(note, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _smooth(h):
    """A 2-d histogram smoothed by a [1, 2, 1] / 4 kernel along each axis, twice."""
    kernel = np.array([0.25, 0.5, 0.25])
    for _ in range(2):
        h = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), 0, h)
        h = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), 1, h)
    return h


def _reference_contours(ax, x, y, logx, logy, masses=(0.9, 0.5)):
    """Contours of the reference draws (x, y) enclosing `masses` of them (from a smoothed 2-d histogram), in black
    on top of whatever is drawn; where no contour can be drawn (few or constant draws), the draws as small black
    crosses. Returns True when contours were drawn."""
    ok = np.isfinite(x) & np.isfinite(y) & ((x > 0) if logx else True) & ((y > 0) if logy else True)
    x, y = x[ok], y[ok]
    tx, ty = (np.log10(x) if logx else x), (np.log10(y) if logy else y)
    if len(x) >= 100 and np.ptp(tx) > 0 and np.ptp(ty) > 0:
        ranges = []
        for t in (tx, ty):
            lo, hi = np.percentile(t, [0.25, 99.75])
            pad = 0.15 * (hi - lo) if hi > lo else 1e-6 * max(1.0, abs(lo))
            ranges.append([lo - pad, hi + pad])
        h, xe, ye = np.histogram2d(tx, ty, bins=40, range=ranges)
        h = _smooth(h)
        flat = np.sort(h.ravel())[::-1]
        cum = np.cumsum(flat) / flat.sum()
        levels = sorted({float(flat[min(np.searchsorted(cum, m), len(flat) - 1)]) for m in masses})
        levels = [v for v in levels if v > 0]
        if levels:
            xc, yc = 0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1])
            xc, yc = (10 ** xc if logx else xc), (10 ** yc if logy else yc)
            ax.contour(xc, yc, h.T, levels=levels, colors="k", linewidths=(0.9, 1.3)[:len(levels)], zorder=3)
            return True
    ax.scatter(x, y, s=6, marker="x", color="k", alpha=0.6, lw=0.6, zorder=3, rasterized=True)
    return False


def plot_pair(result, reference=None, path=None, var_names=None, num_draws=2000, max_params=4, seed=0):
    """Pair plot of up to `max_params` scalars: the fit's draws (orange, semi-transparent) under the reference's,
    drawn last so that it stays visible: black contours enclosing 50% and 90% of its draws off the diagonal, a
    black outline histogram on it; a legend names which is which. A parameter whose draws are all positive and
    span more than two orders of magnitude gets log axes; one whose draws are all whole numbers (a boolean or integer
    latent) gets bars of P(value) on the diagonal. Where more than `max_params` scalars exist, a UserWarning and the
    figure's title say how many were left out, and that var_names= chooses which: latents by name, or single scalars
    of one by their label ('theta[3]')."""
    from matplotlib.lines import Line2D
    plt = _plt()
    fit, note = _cap(_flat(result.sample(num_draws, seed) if hasattr(result, "sample") else result, var_names),
                     max_params, "bbvi.plots.plot_pair")
    ref = _flat(_reference_draws(reference), var_names)
    labels = list(fit)
    k = len(labels)
    log = {lab: _log_axis(ref[lab] if lab in ref else fit[lab]) for lab in labels}
    fig, axes = plt.subplots(k, k, figsize=(2.2 * k + 0.4, 2.2 * k + 0.4), squeeze=False)
    contoured = False
    for i, yi in enumerate(labels):
        for j, xj in enumerate(labels):
            ax = axes[i, j]
            if j > i:
                ax.axis("off")
                continue
            if i == j and _whole(fit[yi], *([ref[yi]] if yi in ref else [])):
                _bars(ax, fit[yi], ref.get(yi), {"color": "C1", "alpha": 0.45},
                      {"fill": False, "edgecolor": "k", "lw": 1.2, "zorder": 3})
                ax.set_yticks([])
            elif i == j:
                edges = _edges(np.concatenate([fit[yi], ref[yi]]) if yi in ref else fit[yi], log[yi], 41)
                ax.stairs(_density(fit[yi], edges, log[yi]), edges, fill=True, color="C1", alpha=0.45)
                if yi in ref:
                    ax.stairs(_density(ref[yi], edges, log[yi]), edges, color="k", lw=1.2, zorder=3)
                ax.set_yticks([])
            else:
                ax.scatter(fit[xj], fit[yi], s=3, color="C1", alpha=0.25, lw=0, zorder=1, rasterized=True)
                if xj in ref and yi in ref:
                    contoured |= _reference_contours(ax, ref[xj], ref[yi], log[xj], log[yi])
                if log[yi]:
                    ax.set_yscale("log")
            if log[xj]:
                ax.set_xscale("log")
            if i == k - 1:
                ax.set_xlabel(xj + (" (log)" if log[xj] else ""), fontsize=8)
            if j == 0:
                ax.set_ylabel("density" if i == 0 else yi + (" (log)" if log[yi] else ""), fontsize=8)
            ax.tick_params(labelsize=6)
    handles = [Line2D([], [], marker="o", ls="", color="C1", alpha=0.6, label="fit (bbvi draws)")]
    if ref and any(lab in ref for lab in labels):
        handles.append(Line2D([], [], color="k", lw=1.2, label="reference (50%, 90% contours)" if contoured
                              else "reference"))
    name = getattr(getattr(result, "model", None), "name", None)
    fig.suptitle((f"{name}: " if name else "") + ("fit vs reference" if len(handles) > 1 else "fit") +
                 (f"\n{note}" if note else ""), fontsize=9)
    # in the empty upper-right cell where there is one, else over the single panel
    axes[0, -1].legend(handles=handles, loc="upper right", fontsize=7 if k > 1 else 6, frameon=k == 1)
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
