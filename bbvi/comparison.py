"""A fit against a reference: `compare`'s per-parameter table (mean error in reference sds, sd ratio, quantile
errors, a verdict), the `Comparison` DataFrame that prints it whole, and `reference_warnings` on the reference's
own quality (R-hat, ESS, divergences). Reading a fit on its own (k-hat, the end-of-fit check) is diagnostics.py."""

import numpy as np
import torch

from .errors import ConfigError

RHAT_MAX, ESS_MIN = 1.01, 400   # a reference's own quality: R-hat above, ESS below are warned about


def _as_idata(reference):
    import arviz as az
    if isinstance(reference, az.InferenceData):
        if "posterior" not in reference.groups():
            raise ConfigError(f"reference: this arviz.InferenceData has no posterior group (groups "
                              f"{list(reference.groups())}); compare reads the reference's draws from it")
        return reference
    if isinstance(reference, dict):
        posterior = {}
        for name, value in reference.items():
            try:
                draws = np.asarray(torch.as_tensor(value).detach().cpu())
            except (TypeError, ValueError, RuntimeError) as e:
                raise ConfigError(f"reference[{name!r}] must be draws (n, *shape) as a tensor or array, got "
                                  f"{type(value).__name__}: {e}") from None
            if draws.ndim == 0:
                raise ConfigError(f"reference[{name!r}] is a single number ({draws}); a reference holds draws, "
                                  f"shape (n, *shape) with n >= 2")
            posterior[name] = draws[None]
        return az.from_dict(posterior=posterior)
    raise ConfigError(f"reference must be an arviz.InferenceData (bbvi.nuts, bbvi.reference.from_draws) or a dict "
                      f"name -> draws (n, *shape), got {type(reference).__name__}")


def _extreme(stat, reduce, unknown, what):
    """{variable: reduce(its values)} of an arviz statistic (R-hat, ESS) over the variables where some value is a
    number; those where every value is NaN are added to `unknown` (variable -> [what, ...]) instead."""
    out = {}
    for k, v in stat.data_vars.items():
        values = np.asarray(v.values, dtype=float)
        if np.isnan(values).all():
            unknown.setdefault(k, []).append(what)
        else:
            out[k] = float(reduce(values))
    return out


def reference_warnings(reference):
    """Loud warnings about a reference's quality: R-hat > 1.01, bulk or tail ESS < 400, divergences."""
    import arviz as az
    idata = _as_idata(reference)
    out = []
    post = idata.posterior
    unknown = {}   # variable -> what could not be computed for it (all NaN: too few draws, or constant or NaN draws)
    if post.sizes.get("chain", 1) > 1:
        worst = _extreme(az.rhat(idata), np.nanmax, unknown, "R-hat")
        bad = {k: v for k, v in worst.items() if v > RHAT_MAX}
        if bad:
            out.append(f"REFERENCE NOT CONVERGED: R-hat > {RHAT_MAX} for " +
                       ", ".join(f"{k} ({v:.3f})" for k, v in bad.items()))
    for method in ("bulk", "tail"):
        low = _extreme(az.ess(idata, method=method), np.nanmin, unknown, f"{method} ESS")
        low = {k: v for k, v in low.items() if v < ESS_MIN}
        if low:
            out.append(f"REFERENCE HAS LOW {method.upper()} ESS (< {ESS_MIN}) for " +
                       ", ".join(f"{k} ({v:.0f})" for k, v in low.items()))
    if unknown:
        out.append("REFERENCE NOT CHECKABLE: " + "; ".join(f"{k}: {', '.join(v)} not computable" for k, v in
                                                          unknown.items())
                   + " (too few draws per chain, or draws that are constant or NaN)")
    if "sample_stats" in idata.groups() and "diverging" in idata.sample_stats:
        ndiv = int(idata.sample_stats["diverging"].values.sum())
        if ndiv:
            out.append(f"REFERENCE HAS {ndiv} DIVERGENT TRANSITIONS: its draws may be biased")
    return out


def labels(name, shape):
    """The scalar labels of a parameter of this shape: theta[0], theta[1], ... (0-based, as torch indexes)."""
    if not shape:
        return [name]
    return [f"{name}[{','.join(str(i) for i in idx)}]" for idx in np.ndindex(*shape)]


REF_SD_ZERO = "n/a: reference sd is 0"


def _verdict(err, ratio, ref_sd=None):
    """good: |mean err| < 0.1 reference sds and sd within 10%; fair: < 0.3 and 25%; poor otherwise (non-finite
    errors included). A reference whose sd is 0 gives no scale to measure in: "n/a: reference sd is 0"."""
    if ref_sd is not None and not ref_sd > 0:
        return REF_SD_ZERO
    if abs(err) < 0.1 and abs(ratio - 1) < 0.1:
        return "good"
    if abs(err) < 0.3 and abs(ratio - 1) < 0.25:
        return "fair"
    return "poor"


def _selected(draws, ref_names, var_names):
    """(names to compare, in the fit's order; the fit's names the reference lacks; requested names the fit
    lacks). `var_names`: None (every name the fit has), one name, or a list of names, each in the fit or the
    reference."""
    if var_names is None:
        return [k for k in draws if k in ref_names], [k for k in draws if k not in ref_names], []
    if isinstance(var_names, str):
        var_names = [var_names]
    else:
        try:
            var_names = list(var_names)
        except TypeError:
            raise ConfigError(f"compare: var_names must be a name or a list of names, got {var_names!r}") from None
        odd = [v for v in var_names if not isinstance(v, str)]
        if odd:
            raise ConfigError(f"compare: var_names must be names (str), got {odd!r} among {var_names!r}")
    unknown = [v for v in var_names if v not in draws and v not in ref_names]
    if unknown:
        raise ConfigError(f"compare: var_names {unknown} are in neither the fit ({sorted(draws)}) nor the reference "
                          f"({sorted(ref_names)}): choose among those names")
    return ([k for k in draws if k in ref_names and k in var_names],
            [k for k in var_names if k in draws and k not in ref_names],
            [k for k in var_names if k not in draws and k in ref_names])


def _check_labels_distinct(names, draws):
    """ConfigError where two parameters give the table the same row label (a latent 'a' of shape (2,) and a
    latent 'a[0]' both label a row 'a[0]'): the rows could not be told apart."""
    owner = {}
    for name in names:
        shape = tuple(torch.as_tensor(draws[name]).shape[1:])
        for label in labels(name, shape):
            if label in owner and owner[label][0] != name:
                other, other_shape = owner[label]
                raise ConfigError(f"compare: parameters {other!r} (shape {other_shape}) and {name!r} (shape {shape}) "
                                  f"both give a row labelled {label!r}, so the table could not tell them apart: "
                                  f"rename one (a name without '[...]'), or compare them one at a time "
                                  f"(var_names={other!r}, then var_names={name!r})")
            owner[label] = (name, shape)


def _reference_values(idata, name):
    """The reference's draws of `name`, (n, *shape) float64: at least 2 of them, all finite."""
    ref = idata.posterior[name].values
    ref = ref.reshape((-1,) + ref.shape[2:]).astype(np.float64)
    if len(ref) < 2:
        raise ConfigError(f"compare: the reference has {len(ref)} draw(s) of {name!r}; errors are measured in "
                          f"the reference's sd, which needs at least 2 draws (a usable reference has hundreds, "
                          f"ESS >= {ESS_MIN})")
    bad = ~np.isfinite(ref.reshape(len(ref), -1)).all(axis=1)
    if bad.any():
        nan = int(np.isnan(ref.reshape(len(ref), -1)).any(axis=1).sum())
        raise ConfigError(f"compare: the reference's {name!r} has {int(bad.sum())} of {len(ref)} draws that are "
                          f"NaN or inf ({nan} NaN): drop those draws (or fix the sampler that made them) before "
                          f"comparing")
    return ref


_SD_UNITS = ("mean_err_sd", "sd_ratio", "q05_err_sd", "q95_err_sd")   # printed with 3 decimals; others 4 digits
_COMPARISON = None


def _digits4(v):
    """4 significant digits, trailing zeros kept (1.000, 0.01234, 1234, 1.234e+05)."""
    text = f"{v:#.4g}"
    return text[:-1] if text.endswith(".") else text


def _formatters(frame):
    """Per-column float formats for printing a comparison: errors and ratios (in reference sds) with 3 decimals,
    means and sds (of any scale) with 4 significant digits; other columns as pandas prints them."""
    out = {}
    for col in frame.columns:
        column = frame[col]
        if getattr(column, "ndim", 2) == 1 and column.dtype.kind == "f":
            out[col] = "{:.3f}".format if col in _SD_UNITS else _digits4
    return out


def _comparison_class():
    """Comparison (bbvi.diagnostics.Comparison), built on first use so that importing bbvi does not import pandas."""
    global _COMPARISON
    if _COMPARISON is not None:
        return _COMPARISON
    import html

    import pandas as pd

    class Comparison(pd.DataFrame):
        """What `compare` returns: a pandas DataFrame (one row per scalar parameter) that prints whole, its verdict
        line first (`attrs['verdict']`), then every row and column. Everything pandas does with it works as on a
        DataFrame; frames derived from it (slices, `.round(3)`, column selections) are Comparisons too and carry
        its attrs."""

        @property
        def _constructor(self):
            return Comparison

        def _table_text(self):
            return self.to_string(formatters=_formatters(self), max_rows=None, max_cols=None, max_colwidth=None)

        def __repr__(self):
            verdict = self.attrs.get("verdict")
            table = self._table_text()
            return table if verdict is None else f"{verdict}\n{table}"

        __str__ = __repr__

        def _repr_html_(self):
            verdict = self.attrs.get("verdict")
            table = self.to_html(formatters=_formatters(self), max_rows=None, max_cols=None)
            return table if verdict is None else f"<p><b>{html.escape(str(verdict))}</b></p>\n{table}"

    # pickles as bbvi.diagnostics.Comparison, as it did before this module was split from diagnostics.py
    Comparison.__module__, Comparison.__qualname__ = "bbvi.diagnostics", "Comparison"
    _COMPARISON = Comparison
    return Comparison


def __getattr__(name):
    if name == "Comparison":   # built lazily (pandas): `from bbvi.diagnostics import Comparison`, and unpickling
        return _comparison_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def compare(fit, reference, num_draws=4000, seed=0, var_names=None):
    """Per-scalar-parameter table of the fit against the reference: reference mean and sd, fit mean and sd, mean
    error in reference-sd units, sd ratio (fit/reference), 5% and 95% quantile errors in reference-sd units, and a
    verdict (good: |mean err| < 0.1 and sd within 10%; fair: < 0.3 and 25%; poor;
    "n/a: reference sd is 0" where the reference is constant, whose errors are then NaN, or inf when the means
    differ). `fit`: a bbvi Result or a dict of draws. `var_names`: one name or a list of names (each in the fit or
    the reference); by default every name of the fit. A name the fit has but the reference lacks is not compared:
    a UserWarning and the verdict line say so (df.attrs['not_compared']). The reference needs at least 2 draws
    per parameter, all finite (else ConfigError), and two parameters may not label the same row ('a' of shape (2,)
    and 'a[0]': ConfigError). df.attrs holds 'warnings' (reference quality), 'khat' (the end-of-fit
    check's where the fit has one, else an estimate of its own; 'khat_source' says which) and
    'verdict' (one line). The table is a `Comparison`, a pandas DataFrame that prints whole (every row and
    column, floats rounded) after its verdict line."""
    import warnings

    import pandas as pd
    idata = _as_idata(reference)
    draws = fit.sample(num_draws, seed) if hasattr(fit, "sample") else fit
    ref_names = list(idata.posterior.data_vars)
    names, not_in_ref, not_in_fit = _selected(draws, ref_names, var_names)
    if not names:
        raise ConfigError(f"compare: the fit ({sorted(draws)}) and the reference ({sorted(ref_names)}) share no "
                          f"parameter" + (f" among var_names {var_names!r}" if var_names is not None else ""))
    _check_labels_distinct(names, draws)
    rows = []
    for name in names:
        ref = _reference_values(idata, name)
        got = torch.as_tensor(draws[name]).detach().double().cpu().numpy()
        if got.shape[1:] != ref.shape[1:]:
            raise ConfigError(f"compare: parameter {name!r} has shape {got.shape[1:]} in the fit and "
                              f"{ref.shape[1:]} in the reference")
        if len(got) < 2:
            raise ConfigError(f"compare: the fit has {len(got)} draw(s) of {name!r}; its sd needs at least 2 "
                              f"(num_draws=4000 is the default)")
        ref2, got2 = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
        rq = np.quantile(ref2, [0.05, 0.95], axis=0)
        gq = np.quantile(got2, [0.05, 0.95], axis=0)
        for j, label in enumerate(labels(name, ref.shape[1:])):
            rm, rs = ref2[:, j].mean(), ref2[:, j].std(ddof=1)
            if np.ptp(ref2[:, j]) == 0:
                rm, rs = ref2[0, j], 0.0  # every draw the same: sd exactly 0 (not a rounding residue)
            gm, gs = got2[:, j].mean(), got2[:, j].std(ddof=1)
            with np.errstate(divide="ignore", invalid="ignore"):  # sd 0: NaN, or inf where the values differ
                err, ratio = np.float64(gm - rm) / rs, np.float64(gs) / rs
                q05, q95 = np.float64(gq[0, j] - rq[0, j]) / rs, np.float64(gq[1, j] - rq[1, j]) / rs
            rows.append(dict(parameter=label, ref_mean=rm, ref_sd=rs, fit_mean=gm, fit_sd=gs, mean_err_sd=err,
                             sd_ratio=ratio, q05_err_sd=q05, q95_err_sd=q95, verdict=_verdict(err, ratio, rs)))
    df = _comparison_class()(pd.DataFrame(rows).set_index("parameter"))
    df.attrs["warnings"] = reference_warnings(idata)
    df.attrs["not_compared"] = not_in_ref + not_in_fit
    checked = getattr(fit, "reliability", None) or {}
    if "khat" in checked:   # the summary's k-hat, not a second estimate from other draws
        df.attrs["khat"] = checked["khat"]
        df.attrs["khat_source"] = f"the end-of-fit check's, {checked.get('num_draws', '?')} draws"
    elif hasattr(fit, "diagnostics"):
        df.attrs["khat"] = fit.diagnostics(num_draws=num_draws, seed=seed)["khat"]
        df.attrs["khat_source"] = f"{num_draws} draws of q, seed {seed}"
    skipped = ([f"not in the reference: {not_in_ref}"] if not_in_ref else []) + \
              ([f"not in the fit: {not_in_fit}"] if not_in_fit else [])
    if skipped:
        warnings.warn("bbvi.compare did not compare every parameter: " + "; ".join(skipped), UserWarning,
                      stacklevel=3)
    na = [p for p in df.index if df.loc[p, "verdict"] == REF_SD_ZERO]
    scored = df.drop(index=na)
    errs = scored["mean_err_sd"].abs()
    errs = errs[np.isfinite(errs)]
    ratios = scored["sd_ratio"][np.isfinite(scored["sd_ratio"])]
    counts = df["verdict"].value_counts().to_dict()
    df.attrs["verdict"] = (f"{counts.get('good', 0)}/{len(df)} parameters good; "
                           + (f"max |mean error| {errs.max():.3f} sd ({errs.idxmax()})" if len(errs)
                              else "max |mean error| n/a")
                           + (f"; sd ratios {ratios.min():.2f}-{ratios.max():.2f}" if len(ratios) else "")
                           + (f"; not finite for {[p for p in scored.index if p not in errs.index]}"
                              if len(errs) < len(scored) else "")
                           + (f"; cannot compare {na} ({REF_SD_ZERO})" if na else "")
                           + "".join(f"; {s}" for s in skipped)
                           + (f"; k-hat {df.attrs['khat']:.2f} ({df.attrs['khat_source']})"
                              if "khat" in df.attrs else "")
                           + ("; " + " | ".join(df.attrs["warnings"]) if df.attrs["warnings"] else ""))
    return df
