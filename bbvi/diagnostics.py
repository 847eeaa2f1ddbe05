"""Reading a fit on its own: PSIS k-hat of the fit (Yao, Vehtari, Simpson & Gelman 2018, "Yes, but did it work?:
evaluating variational inference"), the end-of-fit reliability check, importance resampling. The k-hat of a set of
weights (psis, khat_estimate, khat_reading, collapsed) is khat.py; comparing a fit with a reference is
comparison.py (compare and reference_warnings); both are re-exported here."""
import math
import time

import numpy as np
import torch

from .comparison import ESS_MIN, RHAT_MAX, compare, reference_warnings  # noqa: F401  (re-exported)
from .comparison import _comparison_class
from .comparison import labels as _labels
from .errors import FitError
from .khat import KHAT_BATCHES, TAIL_ATOMS_MIN, khat_estimate, khat_reading, psis  # noqa: F401  (re-exported)
from .khat import collapsed

__all__ = ["compare", "reference_warnings", "fit_diagnostics", "psis", "resample", "importance_resample", "khat_reading",
           "check_reliability"]


def fit_diagnostics(result, num_draws=16000, seed=0):
    """dict with 'khat', its Monte Carlo 'khat_se' and 'khat_interval' (`khat_estimate`), 'khat_reading' (of the
    interval), the importance-sampling ESS of num_draws draws, and the fit's status and fault counts."""
    u, _, lw = result.weighted_draws(num_draws, seed)
    lw = lw.double().cpu().numpy()
    est = khat_estimate(lw)
    smoothed, khat = est["smoothed"], est["khat"]
    point = collapsed(u)
    reading = (f"not computable: q has collapsed to a point in {len(point)} coordinate(s) (draws do not vary), so "
               f"its weights are constant for no good reason" if point else khat_reading(khat, est["khat_interval"]))
    if point:
        khat, est["khat_interval"] = float("nan"), (float("nan"), float("nan"))
    w = np.exp(smoothed - np.logaddexp.reduce(smoothed[np.isfinite(smoothed)]))
    w = np.where(np.isfinite(w), w, 0.0)
    return {"khat": khat, "khat_se": est["khat_se"], "khat_interval": est["khat_interval"],
            "khat_reading": reading, "is_ess": float(1.0 / np.sum(w ** 2)),
            "num_draws": num_draws, "status": result.status, "num_steps": result.num_steps,
            "num_failed_steps": result.num_failed_steps, "num_bad_particles": result.num_bad_particles,
            "num_rescaled_steps": result.num_rescaled_steps,
            "final_elbo": result.final_elbo()}


KHAT_MAX, SHIFT_MAX, SD_RATIO_MAX, BAD_PARTICLES_MAX = 0.7, 0.1, 1.2, 0.05
MIN_IS_ESS = 20          # below it the importance-weighted means and sds are not reported (they rest on a few draws)
CHECK_DRAWS_MIN = 4000   # the check's draws at least (a fit of few evaluations: batch and match, Laplace)
KHAT_UNUSABLE = 1.0   # above it importance sampling's estimates have no mean: the moment checks mean nothing
NOT_CONVERGED = "the fit did not converge in"   # how the check's reason for a fit stopped at max_steps begins


def khat_threshold(num_draws):
    """The k-hat above which PSIS estimates from num_draws draws are not reliable: min(1 - 1/log10 S, 0.7)
    (Vehtari et al., "Pareto smoothed importance sampling", JMLR 2024): 0.67 at 1000 draws, 0.7 from 2154 on."""
    return min(1 - 1 / math.log10(max(num_draws, 11)), KHAT_MAX)


def _psis_moments(result, u, k, smoothed):
    """Per scalar latent (constrained): q's mean and sd from the draws, and the PSIS-weighted mean and sd."""
    w = np.exp(smoothed - np.logaddexp.reduce(smoothed[np.isfinite(smoothed)]))
    w = np.where(np.isfinite(w), w, 0.0)
    z = result.model.named_draws(u, k, derived=False)
    rows = []
    for name in result.model.latents:
        x = z[name].detach().double().reshape(z[name].shape[0], -1).cpu().numpy()
        m, sd = x.mean(0), x.std(0)
        mw = (w[:, None] * x).sum(0)
        sdw = np.sqrt(np.maximum((w[:, None] * (x - mw) ** 2).sum(0), 0.0))
        for j, label in enumerate(_labels(name, tuple(z[name].shape[1:]))):
            rows.append((label, m[j], sd[j], mw[j], sdw[j]))
    return rows


def check_reliability(result, num_draws=None, seed=0, warn=True, search=None):
    """The end-of-fit check that `bbvi.fit` runs: PSIS k-hat of q (Yao et al. 2018) and, from the same
    Pareto-smoothed weights, how far importance sampling moves q's mean (in q's sds) and sd (as a ratio) of every
    scalar latent, with their Monte Carlo errors; plus whether the fit converged, whether its start found a mode,
    how many particles failed. Stores a dict in `result.reliability` and, when anything fails, issues one
    bbvi.ReliabilityWarning naming what to try. Returns the dict. num_draws: 16000 by default, but at most twice
    the fit's own gradient evaluations (at least CHECK_DRAWS_MIN), and on data with more than 125,000 rows in its
    plates 2e9 / rows (at least 2000), so that the check costs about what the fit did (the k-hat interval and Monte
    Carlo errors, which the verdicts use, widen). k-hat above its threshold for the number of draws (0.7 from 2154
    draws on) warns only together with a mean or sd that importance sampling moves (a Gaussian q's k-hat is often
    above 0.7 while its means and sds are right), or above 1; otherwise it is a note in `notes`. The dict also holds
    the ELBO estimated from the check's draws ('elbo', 'elbo_se': the mean of log p - log q and its standard error)
    and what the warning suggests ('tries'), and its wall time ('seconds', which fit.summary() puts beside the
    fit's); warn=False stores it all and warns nothing (`warn_unreliable` does).
    search: the mode search's findings to use instead of running it again (`mode_search_of` an earlier check)."""
    if num_draws is None:
        num_draws = _default_draws(result)
    began = time.perf_counter()
    u, k, log_w = result.weighted_draws(num_draws, seed)
    est = khat_estimate(log_w.double().cpu().numpy())
    smoothed, khat, (khat_lo, khat_hi) = est["smoothed"], est["khat"], est["khat_interval"]
    ess = _is_ess(smoothed, khat)
    weighed = math.isfinite(ess)   # the weights can be read (their moments, below)
    reasons = []
    point = collapsed(u)
    if point:
        khat, khat_lo, khat_hi = float("nan"), float("nan"), float("nan")
        est["khat_interval"] = (khat_lo, khat_hi)
        reasons.append(f"q has collapsed to a point in {len(point)} of {u.shape[1]} unconstrained coordinates (its "
                       f"draws do not vary): its sds say nothing about the posterior's; a step size too large does "
                       f"this (try a smaller lr, or steps=None)")
    reasons += _draw_faults(result, log_w)
    few = weighed and ess < MIN_IS_ESS   # the weights rest on a few draws: their moments say nothing
    worst_shift, worst_ratio = (_psis_extremes(result, u, k, smoothed, ess) if weighed and not few
                                else ((None, 0.0), (None, 1.0)))
    moments = _moment_reasons(few, ess, num_draws, worst_shift, worst_ratio)
    threshold = khat_threshold(num_draws)
    notes = _khat_verdict(reasons, khat, khat_lo, khat_hi, threshold, num_draws, moments, point)
    reasons += moments
    limit = _mean_field_limit(result)
    if limit and not worst_ratio[0]:
        reasons.append(limit)
    if notes and not reasons:   # k-hat alone: a known false alarm for Gaussian q (ANCHORS: pymc-extras, Stan)
        notes[-1] += ("; importance sampling moves no mean by more than 0.1 of q's sd and no sd by more than 20%, "
                      "so the means and sds stand: not a warning")
    if search is None:
        search = _mode_search(result, u, seed, point)
    reasons += _mode_reasons(search)
    reasons += _fit_faults(result)
    start = result.start
    tries = _tries(result, search)
    finite = log_w[~torch.isnan(log_w)].double()
    info = {"elbo": float(finite.mean()) if len(finite) else float("nan"),
            "elbo_se": float(finite.std() / math.sqrt(len(finite))) if len(finite) > 1 else float("nan"),
            "tries": tries, "khat": khat, "khat_se": est["khat_se"], "khat_interval": est["khat_interval"],
            "khat_reading": ("not computable: q has collapsed to a point" if point else
                             khat_reading(khat, est["khat_interval"])), "is_ess": ess, "num_draws": num_draws,
            "warnings": reasons, "notes": notes, "khat_threshold": threshold,
            "modes": search["modes"], "far_mass": search.get("far_mass"), "mode_search": search["note"],
            "mode_search_evals": search["num_evals"], "mode_search_ran": search.get("ran", True),
            "max_psis_shift": worst_shift, "extreme_psis_sd_ratio": worst_ratio,
            "start": (start.strategy + (f" ({start.note})" if start.note else "")) if start is not None else "?"}
    info["seconds"] = time.perf_counter() - began
    result.reliability = info
    if reasons and not search.get("ran", True):   # a check that could not run says so where it matters
        reasons.append(f"other modes were not looked for ({search['note']})")
    if reasons and warn:
        warn_unreliable(result, stacklevel=3)
    return info


def _default_draws(result):
    """check_reliability's num_draws: 16000, at most check_draws_cap (at least 2000), and at most twice the fit's
    gradient evaluations (at least CHECK_DRAWS_MIN)."""
    cap = check_draws_cap(result)
    num_draws = max(2000, min(16000, cap)) if cap is not None else 16000
    return min(num_draws, max(CHECK_DRAWS_MIN, 2 * result.num_fit_evals))   # a cost like the fit's


def _is_ess(smoothed, khat):
    """The importance-sampling effective sample size of the Pareto-smoothed log weights; NaN where the weights
    cannot be read (k-hat inf or NaN, no finite weight). k-hat -inf (no tail) reads them as they are."""
    if not khat < math.inf:
        return float("nan")
    w = np.exp(smoothed - np.logaddexp.reduce(smoothed[np.isfinite(smoothed)]))
    w2 = np.sum(np.where(np.isfinite(w), w, 0.0) ** 2)
    ess = float(1.0 / w2) if w2 > 0 else float("nan")
    return ess if math.isfinite(ess) else float("nan")


def _draw_faults(result, log_w):
    """The check's reasons from its draws' log weights (NaN, -inf) and the fit's failed steps."""
    reasons = []
    nan_share = float(torch.isnan(log_w).double().mean())
    if nan_share > BAD_PARTICLES_MAX:
        reasons.append(f"{nan_share:.0%} of q's draws have a NaN log-joint: the check cannot weigh them")
    steps_run = max(result.num_steps, 1)
    if result.num_failed_steps > BAD_PARTICLES_MAX * steps_run:
        reasons.append(f"{result.num_failed_steps} of {result.num_steps} steps failed (NaN/inf ELBO or gradient) and "
                       f"were skipped")
    outside = float((log_w == -math.inf).double().mean())
    if outside > 0:
        reasons.append(f"{outside:.2%} of q's draws fall where the log-joint is -inf (outside the posterior's "
                       f"support), where the posterior has no mass")
    return reasons


def _moment_reasons(few, ess, num_draws, worst_shift, worst_ratio):
    """What importance sampling says of q's means and sds: too few effective draws to say, or the mean it moves
    furthest and the sd it rescales most (`_psis_extremes`)."""
    moments = []
    if few:
        moments.append(f"importance sampling's effective sample size is {ess:.1f} of {num_draws} draws: the "
                       f"weights rest on a few draws, so q misses much of the posterior's mass (its means and sds "
                       f"cannot be checked)")
    if worst_shift[0] is not None:
        moments.append(f"importance sampling moves the mean of {worst_shift[0]} by {worst_shift[1]:+.2f} of q's sd "
                       f"(more than {SHIFT_MAX})")
    if worst_ratio[0] is not None:
        moments.append(f"importance sampling puts the sd of {worst_ratio[0]} at {worst_ratio[1]:.2f} x q's")
    return moments


def _mode_search(result, u, seed, point):
    """The mode search's findings (modes.other_modes from the check's draws u); none where q is a point."""
    from .modes import other_modes
    if point:
        return {"modes": [], "note": "no mode search: q is a point", "num_evals": 0}
    return other_modes(result, u, seed=seed)


def _mode_reasons(search):
    """The check's reasons from the mode search: mass far outside q (no gradient: widened q's importance
    sampling), or another mode holding more than MIN_MASS of the mass."""
    from .modes import FAR_MASS, MIN_MASS, WIDEN
    reasons = []
    if search.get("far_mass", 0.0) > FAR_MASS or search.get("far_mass", 0.0) != search.get("far_mass", 0.0):
        reasons.append(f"importance sampling from q widened {WIDEN:g}x puts {search['far_mass']:.0%} of the "
                       f"posterior's mass outside q's 99.9% region (torch cannot differentiate the log-joint, so no "
                       f"mode search ran): another mode, or tails far heavier than q's, that q does not cover")
    if search["modes"] and search["modes"][0]["mass"] < 1 - MIN_MASS:
        away = max(search["modes"][1:], key=lambda m: m["mass"])
        reasons.append(f"the log density has {len(search['modes'])} modes: besides q's, one {away['distance']:.1f} "
                       f"q-sds away holds about {away['mass']:.0%} of the mass (Laplace estimate), which q does not "
                       f"cover: k-hat cannot see a mode q never draws from. q fits {search['modes'][0]['mass']:.0%}")
    return reasons


def _fit_faults(result):
    """The check's reasons from the fit itself: stopped at max_steps, a MAP start that found no mode, too many bad
    particles."""
    reasons = []
    if result.status == "max_steps":
        last = result.levels[-1] if result.levels else {}
        reasons.append(f"{NOT_CONVERGED} {result.num_steps} steps (max_steps; last change between "
                       f"averaged levels {last.get('change', float('nan')):.3g} of q's sd)")
    start = result.start
    if start is not None and start.no_mode:
        reasons.append(f"the MAP start found no proper mode ({start.note}): the density may be a funnel, a ring or "
                       f"a spike, or improper, and a Gaussian q fits such a shape badly")
    seen = result.num_steps * result.num_particles
    if seen and result.num_bad_particles > BAD_PARTICLES_MAX * seen:
        reasons.append(f"{result.num_bad_particles} of {seen} particles ({result.num_bad_particles / seen:.0%}) "
                       f"had a NaN/inf log-joint or gradient, or raised ({result.last_exception or 'no exception'})"
                       + ("; the fit ran in float32: try dtype=torch.float64" if any(
                          t.dtype == torch.float32 for group in result.params.values() for t in group.values())
                          else ""))
    return reasons


def mode_search_of(info):
    """The mode search's findings as an earlier check stored them (check_reliability's `search`)."""
    out = {"modes": info["modes"], "note": info["mode_search"], "num_evals": info["mode_search_evals"],
           "ran": info.get("mode_search_ran", True)}
    if info.get("far_mass") is not None:
        out["far_mass"] = info["far_mass"]
    return out


def check_draws_cap(result):
    """The most draws the check takes on this model's data: 2e9 / rows of its plates (no cap without plates)."""
    from .subsample import sizes
    rows = sum(sizes(result.model).values())
    return int(2e9 // rows) if rows else None


def warn_unreliable(result, stacklevel=2):
    """The bbvi.ReliabilityWarning of `result.reliability` (its warnings and what to try), where it has warnings;
    stacklevel as warnings.warn's, counted from the caller."""
    import warnings

    from .errors import ReliabilityWarning
    r = result.reliability
    if r.get("warnings"):
        warnings.warn(f"bbvi fit of {result.model.name!r} may be unreliable: " + "; ".join(r["warnings"]) +
                      ". Try: " + ", ".join(r["tries"]) + ".", ReliabilityWarning, stacklevel=stacklevel + 1)


def _khat_verdict(reasons, khat, lo, hi, threshold, num_draws, moments, point):
    """k-hat's part of the check: a reason (added to `reasons`) above KHAT_UNUSABLE, or above the threshold together
    with a mean or sd that importance sampling moves (`moments`); otherwise above the threshold, or borderline (its
    interval straddles it), the returned notes."""
    notes = []
    if point:
        pass  # k-hat of a point mass means nothing; said above
    elif math.isnan(khat):
        reasons.append(f"PSIS k-hat is not computable: fewer than 25 of q's {num_draws} draws have a finite "
                       f"importance weight, so importance sampling cannot check q")
    elif not khat <= KHAT_UNUSABLE:
        reasons.append(f"PSIS k-hat is {khat:.2f} (> {KHAT_UNUSABLE}): q misses posterior mass badly, and "
                       f"importance sampling cannot check its means and sds")
    elif not lo <= threshold:
        (reasons if moments else notes).append(
            f"PSIS k-hat is {khat:.2f} ({lo:.2f}-{hi:.2f} with its Monte Carlo error; > {threshold:.2f} "
            f"at {num_draws} draws): q's tails are lighter than the posterior's")
    elif not hi <= threshold:
        notes.append(f"PSIS k-hat is {khat:.2f}, borderline: {lo:.2f}-{hi:.2f} with its Monte Carlo error "
                     f"(the threshold at {num_draws} draws is {threshold:.2f})")
    return notes


def _psis_extremes(result, u, k, smoothed, ess):
    """((latent, shift), (latent, ratio)): the scalar latent whose mean importance sampling moves furthest (in q's
    sds) and the one whose sd it rescales most, each only beyond its threshold and 3 Monte Carlo sds ((None, 0.0)
    and (None, 1.0) where none is)."""
    worst_shift, worst_ratio = (None, 0.0), (None, 1.0)
    for label, m, sd, mw, sdw in _psis_moments(result, u, k, smoothed):
        if sd <= 0:
            continue
        shift, ratio = (mw - m) / sd, sdw / sd
        noise = 3.0 / math.sqrt(max(ess, 1.0))  # ~3 Monte Carlo sds of either in q-sd units
        if abs(shift) > max(SHIFT_MAX, noise) and abs(shift) > abs(worst_shift[1]):
            worst_shift = (label, shift)
        if abs(math.log(max(ratio, 1e-300))) > math.log(SD_RATIO_MAX) + noise and \
                abs(math.log(max(ratio, 1e-300))) > abs(math.log(max(worst_ratio[1], 1e-300))):
            worst_ratio = (label, ratio)
    return worst_shift, worst_ratio


def _mean_field_limit(result):
    """'' or the reason a factorised q's sds cannot be right: at the mode (the MAP start's Hessian H) the sd a
    mean-field q can reach, 1 / sqrt(H_ii), is below 1 / SD_RATIO_MAX of the Laplace sd sqrt((H^-1)_ii) for some
    coordinate (Margossian et al. 2024: the family's limit, not the fit's; importance sampling often cannot see it
    once k-hat is high, measured on sblrc-blr: sds 0.47 x the reference's, no PSIS sd flag)."""
    start = result.start
    if type(result.family).__name__ != "MeanField" or start is None or not start.mean_field_sd:
        return ""
    label, ratio = start.mean_field_sd
    if ratio >= 1 / SD_RATIO_MAX:
        return ""
    return (f"q is {type(result.family).__name__}: the posterior's correlations at its mode (the MAP start's Hessian) "
            f"put the sd of unconstrained {label} at about {1 / ratio:.2f} x what a factorised q can reach, so "
            f"q's sds are too small by the family's nature (the means may be right); family='fullrank', or the "
            f"default method='auto', fits them")


def _tries(result, search):
    """What the warning suggests: a richer family, more particles, a longer fit or a check against NUTS; every
    mode's own fit where the mode search found several."""
    family = type(result.family).__name__
    richer = {"MeanField": ["family='fullrank'", "family='flow'"], "LowRank": ["family='fullrank'", "family='flow'"],
              "FullRank": ["family='flow'"]}.get(family, [])
    check = ("checking against bbvi.nuts(model)" if not result.model.discrete else
             "fits from other seeds (a local optimum, such as a mixture's label-switched mode) and, where the "
             "discrete latents are few, an exact sum over them (q's discrete factors are mean-field: bbvi.nuts "
             "cannot sample discrete latents)")
    tries = richer + ["more particles (num_particles=64)", "a larger max_steps" if result.status == "max_steps" else
                      check]
    if len(search["modes"]) > 1:  # no Gaussian family covers two modes
        tries = ["bbvi.nuts(model) to see every mode, or fits started at each mode (init_values=...)"]
    return tries


def resample(result, num_draws, seed, num_proposals=None):
    """(u, k, info): num_draws draws picked, with replacement, from num_proposals (default max(16000, 4 num_draws))
    draws of q in proportion to their Pareto-smoothed importance weights p / q (sampling-importance-resampling).
    info: 'khat', 'khat_interval' (khat_estimate), 'khat_reading', 'is_ess' (of the proposals), 'num_proposals'.
    The picks use a stream of their own (seed-derived), not the draws' noise."""
    num_proposals = num_proposals or max(16000, 4 * num_draws)
    u, k, log_w = result.weighted_draws(num_proposals, seed)
    est = khat_estimate(log_w.double().cpu().numpy())
    smoothed = np.asarray(est["smoothed"], dtype=np.float64)
    finite = np.isfinite(smoothed)
    if not finite.any():
        raise FitError(f"importance resampling of the fit of {result.model.name!r}: no draw of q has a finite "
                       f"weight (the log-joint is -inf or NaN at every draw)", result)
    w = np.where(finite, np.exp(smoothed - np.logaddexp.reduce(smoothed[finite])), 0.0)
    info = {"khat": est["khat"], "khat_interval": est["khat_interval"],
            "khat_reading": khat_reading(est["khat"], est["khat_interval"]), "is_ess": float(1.0 / np.sum(w ** 2)),
            "num_proposals": num_proposals}
    g = torch.Generator(device=u.device).manual_seed((seed + 0x9E3779B97F4A7C15) % 2**63)
    idx = torch.multinomial(torch.as_tensor(w, device=u.device), num_draws, replacement=True, generator=g)
    return u[idx], {name: v[idx] for name, v in k.items()}, info


def importance_resample(result, num_draws=4000, seed=0, num_proposals=None, max_khat=0.7):
    """Draws from q reweighted towards the posterior with PSIS and resampled (`resample`): dict name ->
    (num_draws, *shape). Raises FitError when k-hat >= max_khat, where the weights cannot be trusted
    (`fit.sample(..., importance_resample=True)` warns instead)."""
    u, k, info = resample(result, num_draws, seed, num_proposals)
    if not info["khat"] < max_khat:
        raise FitError(f"importance resampling of the fit of {result.model.name!r}: k-hat = {info['khat']:.2f} >= "
                       f"{max_khat}; the importance weights cannot correct this fit (try a richer family)")
    return result.model.named_draws(u, k, seed=seed)


def __getattr__(name):
    if name == "Comparison":   # built lazily (pandas): `from bbvi.diagnostics import Comparison`, and unpickling
        return _comparison_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
