"""Reading a fit: comparison against a reference, reference quality (ArviZ R-hat/ESS, divergences), and PSIS
k-hat of the fit (Yao, Vehtari, Simpson & Gelman 2018, "Yes, but did it work?: evaluating variational
inference")."""
import math

import numpy as np
import torch

from .errors import ConfigError, FitError

__all__ = ["compare", "reference_warnings", "fit_diagnostics", "psis", "importance_resample", "khat_reading"]

RHAT_MAX, ESS_MIN = 1.01, 400


def khat_reading(khat):
    """Yao et al.'s reading of k-hat."""
    if not math.isfinite(khat):
        return "not computable"
    if khat < 0.5:
        return "good: q is close to the posterior; importance sampling could correct what is left"
    if khat < 0.7:
        return "usable: q is fair; PSIS-corrected estimates are reliable"
    return "not reliable: q misses important posterior mass; do not trust its tails or sds"


def psis(log_weights):
    """Pareto-smoothed log importance weights (normalised) and k-hat, via arviz.psislw."""
    import arviz as az
    lw = np.asarray(log_weights, dtype=np.float64)
    finite = np.isfinite(lw)
    if finite.sum() < 10:
        return lw, float("nan")
    lw = np.where(finite, lw, -np.inf)
    smoothed, khat = az.psislw(lw, reff=1.0)
    return np.asarray(smoothed), float(khat)


def fit_diagnostics(result, num_draws=4000, seed=0):
    """dict with 'khat', 'khat_reading', the importance-sampling ESS of num_draws draws, and the fit's status
    and fault counts."""
    lw = result.log_weights(num_draws, seed).double().cpu().numpy()
    smoothed, khat = psis(lw)
    w = np.exp(smoothed - np.logaddexp.reduce(smoothed[np.isfinite(smoothed)]))
    w = np.where(np.isfinite(w), w, 0.0)
    return {"khat": khat, "khat_reading": khat_reading(khat), "is_ess": float(1.0 / np.sum(w ** 2)),
            "num_draws": num_draws, "status": result.status, "num_steps": result.num_steps,
            "num_failed_steps": result.num_failed_steps, "num_bad_particles": result.num_bad_particles,
            "num_rescaled_steps": result.num_rescaled_steps,
            "final_elbo": result.final_elbo()}


def importance_resample(result, num_draws=4000, seed=0, num_proposals=None, max_khat=0.7):
    """Draws from q reweighted towards the posterior with PSIS and resampled (with replacement): dict name ->
    (num_draws, *shape). Raises FitError when k-hat >= max_khat, where the weights cannot be trusted."""
    num_proposals = num_proposals or 4 * num_draws
    u, k, log_w = result.weighted_draws(num_proposals, seed)
    smoothed, khat = psis(log_w.double().cpu().numpy())
    if not khat < max_khat:
        raise FitError(f"importance resampling of the fit of {result.model.name!r}: k-hat = {khat:.2f} >= "
                       f"{max_khat}; the importance weights cannot correct this fit (try a richer family)")
    probs = torch.from_numpy(np.exp(smoothed - np.logaddexp.reduce(smoothed)))
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.multinomial(probs, num_draws, replacement=True, generator=g).to(u.device)
    with torch.no_grad():
        z, _ = result.model.constrain(u[idx])
        z.update({name: v[idx] for name, v in k.items()})
        out = {name: z[name] for name in result.model.latents}
        out.update(result.model.derive(z))
    return out


# ---- references ---------------------------------------------------------------------------------------------
def _as_idata(reference):
    import arviz as az
    if isinstance(reference, az.InferenceData):
        return reference
    if isinstance(reference, dict):
        return az.from_dict(posterior={k: np.asarray(torch.as_tensor(v).cpu())[None] for k, v in reference.items()})
    raise ConfigError(f"reference must be an arviz.InferenceData (bbvi.nuts, bbvi.reference.from_draws) or a dict "
                      f"name -> draws (n, *shape), got {type(reference).__name__}")


def reference_warnings(reference):
    """Loud warnings about a reference's quality: R-hat > 1.01, bulk or tail ESS < 400, divergences."""
    import arviz as az
    idata = _as_idata(reference)
    out = []
    post = idata.posterior
    if post.sizes.get("chain", 1) > 1:
        rhat = az.rhat(idata)
        worst = {k: float(np.nanmax(v.values)) for k, v in rhat.data_vars.items()}
        bad = {k: v for k, v in worst.items() if v > RHAT_MAX}
        if bad:
            out.append(f"REFERENCE NOT CONVERGED: R-hat > {RHAT_MAX} for " +
                       ", ".join(f"{k} ({v:.3f})" for k, v in bad.items()))
    for method in ("bulk", "tail"):
        ess = az.ess(idata, method=method)
        low = {k: float(np.nanmin(v.values)) for k, v in ess.data_vars.items()}
        low = {k: v for k, v in low.items() if v < ESS_MIN}
        if low:
            out.append(f"REFERENCE HAS LOW {method.upper()} ESS (< {ESS_MIN}) for " +
                       ", ".join(f"{k} ({v:.0f})" for k, v in low.items()))
    if "sample_stats" in idata.groups() and "diverging" in idata.sample_stats:
        ndiv = int(idata.sample_stats["diverging"].values.sum())
        if ndiv:
            out.append(f"REFERENCE HAS {ndiv} DIVERGENT TRANSITIONS: its draws may be biased")
    return out


def _labels(name, shape):
    if not shape:
        return [name]
    return [f"{name}[{','.join(str(i) for i in idx)}]" for idx in np.ndindex(*shape)]


def _verdict(err, ratio):
    if abs(err) < 0.1 and abs(ratio - 1) < 0.1:
        return "good"
    if abs(err) < 0.3 and abs(ratio - 1) < 0.25:
        return "fair"
    return "poor"


def compare(fit, reference, num_draws=4000, seed=0, var_names=None):
    """Per-scalar-parameter table (pandas DataFrame) of the fit against the reference: reference mean and sd, fit
    mean and sd, mean error in reference-sd units, sd ratio (fit/reference), 5% and 95% quantile errors in
    reference-sd units, and a verdict (good: |mean err| < 0.1 and sd within 10%; fair: < 0.3 and 25%; poor).
    `fit`: a bbvi Result or a dict of draws. df.attrs holds 'warnings' (reference quality), 'khat' and
    'verdict' (one line)."""
    import pandas as pd
    idata = _as_idata(reference)
    draws = fit.sample(num_draws, seed) if hasattr(fit, "sample") else fit
    names = [k for k in draws if k in idata.posterior.data_vars and (var_names is None or k in var_names)]
    if not names:
        raise ConfigError(f"compare: the fit ({sorted(draws)}) and the reference "
                          f"({sorted(idata.posterior.data_vars)}) share no parameter")
    rows = []
    for name in names:
        ref = idata.posterior[name].values
        ref = ref.reshape((-1,) + ref.shape[2:]).astype(np.float64)
        got = torch.as_tensor(draws[name]).detach().double().cpu().numpy()
        if got.shape[1:] != ref.shape[1:]:
            raise ConfigError(f"compare: parameter {name!r} has shape {got.shape[1:]} in the fit and "
                              f"{ref.shape[1:]} in the reference")
        ref2, got2 = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
        rq = np.quantile(ref2, [0.05, 0.95], axis=0)
        gq = np.quantile(got2, [0.05, 0.95], axis=0)
        for j, label in enumerate(_labels(name, ref.shape[1:])):
            rm, rs = ref2[:, j].mean(), ref2[:, j].std(ddof=1)
            gm, gs = got2[:, j].mean(), got2[:, j].std(ddof=1)
            scale = rs if rs > 0 else 1.0
            err, ratio = (gm - rm) / scale, gs / scale
            rows.append(dict(parameter=label, ref_mean=rm, ref_sd=rs, fit_mean=gm, fit_sd=gs, mean_err_sd=err,
                             sd_ratio=ratio, q05_err_sd=(gq[0, j] - rq[0, j]) / scale,
                             q95_err_sd=(gq[1, j] - rq[1, j]) / scale, verdict=_verdict(err, ratio)))
    df = pd.DataFrame(rows).set_index("parameter")
    df.attrs["warnings"] = reference_warnings(idata)
    if hasattr(fit, "diagnostics"):
        df.attrs["khat"] = fit.diagnostics(num_draws=num_draws, seed=seed)["khat"]
    worst = df["mean_err_sd"].abs().idxmax()
    counts = df["verdict"].value_counts().to_dict()
    df.attrs["verdict"] = (f"{counts.get('good', 0)}/{len(df)} parameters good; max |mean error| "
                           f"{df['mean_err_sd'].abs().max():.3f} sd ({worst}); sd ratios "
                           f"{df['sd_ratio'].min():.2f}-{df['sd_ratio'].max():.2f}"
                           + (f"; k-hat {df.attrs['khat']:.2f}" if "khat" in df.attrs else "")
                           + ("; " + " | ".join(df.attrs["warnings"]) if df.attrs["warnings"] else ""))
    return df
