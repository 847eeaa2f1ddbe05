"""What method='auto' does when its Gaussian is not enough.

Where the end-of-fit check warns about batch and match's full-rank Gaussian (importance sampling moves a mean or an
sd, k-hat above 1, the MAP start found no mode, ...; where it was inconclusive, k-hat above its threshold with nothing
moved, after looking again with more draws: `look_closer`), a normalizing flow (family='flow', bbvi.flows) whose Gaussian
part starts at that q goes on for at most BUDGET_STEPS steps of the stochastic-gradient fit (64 particles a step:
128,000 gradient evaluations at most, about NUTS's median cost on the yardstick's 36 posteriors), and the flow's own
end-of-fit check decides which q the call returns (not where the mode search found several modes: a flow started at
one does not find the others):
- the flow's check passes: the flow, with a note that says why the Gaussian was warned;
- both are warned: the one with the higher ELBO (estimated from each check's draws: the lower KL(q || p)), with
  one warning that names both;
- the flow fails, raises or is interrupted: the Gaussian, with its warning, which says so.
Either way the other fit is kept in `fit.tried` and its evaluations count in `fit.num_gradient_evals`; the call
never returns the worse of two quietly. A flow started at the Gaussian need not find the Gaussian's mean and scales
again: measured on dogs_log, where the Gaussian was 0.16 sd off, 650 steps took it to 0.003 sd (experiments in the
closing note of issue 33 and the README's yardstick block)."""
import dataclasses
import time

import torch

from ..convergence import Adaptive
from ..errors import FitError
from ..start import Start
from . import sgd

__all__ = ["FromGaussian", "go_on", "needed", "look_closer", "BUDGET_STEPS", "LOOK_CLOSER_DRAWS"]

BUDGET_STEPS = 2000
LOOK_CLOSER_DRAWS = 64000


class FromGaussian:
    """An algorithm (fit(method=FromGaussian(gaussian_fit))): the stochastic-gradient fit of a family with a full-rank
    Gaussian part (family 'flow' or 'fullrank') whose q starts at a fitted full-rank Gaussian's q, on the fitted
    model (its MAP start's whitening included) instead of at the MAP."""

    name = "flow"
    default_family = "flow"

    def __init__(self, gaussian):
        self.gaussian = gaussian

    def init(self, model, family, estimator, baseline, **options):
        options["init_strategy"] = "zero"
        state = sgd.init(model, family, estimator, baseline, **options)
        mine, theirs = state.params["continuous"], self.gaussian.params["continuous"]
        with torch.no_grad():
            for name in ("loc", "log_diag", "off_diag"):
                mine[name].copy_(theirs[name])
        if state.tracker is not None:   # the rule's first reference is q's start: this one
            state.tracker = state.tracker.rule.tracker(state)
            state.schedule = state.tracker.factor
        state.start = Start("fit", note=f"q's Gaussian part started at the fitted "
                                        f"{type(self.gaussian.family).__name__} q")
        return state

    step = staticmethod(sgd.step)


def look_closer(gaussian):
    """Where the Gaussian's check is inconclusive (k-hat above its threshold while importance sampling moved no mean
    or sd, so no warning) the check runs again with LOOK_CLOSER_DRAWS draws (log-joint values only, no gradients;
    the mode search's findings kept), whose importance-weighted moments resolve a 0.1-sd shift. Measured: a skewed
    1-D target whose Gaussian is 0.11 sd off (k-hat 0.72, nothing moved at 4000 draws) is warned at 64000 (the mean
    moved by 0.14 of q's sd), while on eight schools noncentered (k-hat 0.73 at 64000), hmm_drive_1 and
    logmesquite_logvolume (k-hat 0.61 and 0.37 at 64000) nothing moves: their Gaussians are right. Cost: 0.2-16 s
    here."""
    from ..diagnostics import check_draws_cap, check_reliability, mode_search_of
    r = gaussian.reliability
    cap = check_draws_cap(gaussian)
    draws = LOOK_CLOSER_DRAWS if cap is None else min(LOOK_CLOSER_DRAWS, cap)
    inconclusive = not r.get("warnings") and r.get("khat", 0.0) > r.get("khat_threshold", float("inf"))
    if not inconclusive or draws <= 2 * r["num_draws"]:
        return
    first = f"k-hat {r['khat']:.2f} above {r['khat_threshold']:.2f} at {r['num_draws']} draws with nothing moved"
    earlier = r["num_draws"] + r.get("earlier_draws", 0)
    again = check_reliability(gaussian, num_draws=draws, warn=False, search=mode_search_of(r))
    again["earlier_draws"] = earlier
    again["seconds"] += r.get("seconds", 0.0)   # both looks
    again["notes"].append(f"{first}: looked again with {draws} draws" +
                          (": see the warnings" if again["warnings"] else ": importance sampling moves nothing"))


def needed(gaussian):
    """Whether the Gaussian's check calls for the flow: it warns (after `look_closer` where it was inconclusive). Not
    after a callback stopped the fit, nor where the mode search found other modes (a flow started at one mode does
    not find another; the warning says what to do)."""
    r = gaussian.reliability
    return (gaussian.status in ("completed", "converged") and bool(r.get("warnings"))
            and len(r.get("modes", [])) <= 1)


def _settled_at_budget(flow):
    """A flow stopped by this module's budget whose last level moved q by less than the rule's tolerance, and whose
    check found nothing else, has settled as far as the check can tell: its 'did not converge' becomes a note (the
    user set no max_steps to raise; measured on mesquite: 0.018 of q's sd at 2000 steps, 0.03 sd from the reference,
    converged at 2400)."""
    from ..diagnostics import NOT_CONVERGED
    r, tol = flow.reliability, Adaptive.tol   # the rule the flow ran with: Adaptive's defaults
    change = flow.levels[-1].get("change", float("nan")) if flow.levels else float("nan")
    late = [w for w in r["warnings"] if w.startswith(NOT_CONVERGED)]
    if flow.status == "max_steps" and late and len(r["warnings"]) == 1 and change < tol:
        r["warnings"].remove(late[0])
        r["notes"].append(f"{late[0]}: the budget of method='auto''s flow, and below the rule's tolerance ({tol} of "
                          f"q's sd), with nothing else found by the check: not a warning")


def _tails_still_unverified(flow, gaussian):
    """Where the Gaussian's k-hat was above 1 (tails far heavier than q's) the flow's check passes only with its own
    k-hat clearly below the threshold (its interval's top included): importance sampling's moments cannot see tails
    that are still too light, and a borderline k-hat is the only sign. Measured: a Student-t(3) posterior, Gaussian
    k-hat 1.14; the flow after it read k-hat 0.83 (0.58-1.09), moved no sd, and had sds 0.72 x the posterior's (also
    at 64,000 draws). On the yardstick only dogs had a Gaussian k-hat above 1; its flow's k-hat is 0.34."""
    from ..diagnostics import KHAT_UNUSABLE
    g, f = gaussian.reliability, flow.reliability
    lo, hi = f["khat_interval"]
    if g.get("khat", 0.0) > KHAT_UNUSABLE and not f["warnings"] and not hi <= f["khat_threshold"]:
        f["warnings"].append(f"PSIS k-hat of the flow is {f['khat']:.2f} ({lo:.2f}-{hi:.2f}), not clearly below "
                             f"{f['khat_threshold']:.2f}, where batch and match's Gaussian had {g['khat']:.2f} (> "
                             f"{KHAT_UNUSABLE}: tails far heavier than q's): the flow's tails, and so its sds, may "
                             f"still be too light, which importance sampling's moments cannot see")


def go_on(gaussian, *, fit, seed, device, dtype, progress, callbacks, max_consecutive_failures, stacklevel):
    """The flow after a warned Gaussian (the module docstring): the Result to return, warned about where it must be
    (stacklevel: as warnings.warn's, counted from this function; fit: bbvi.fit, passed in by it)."""
    from ..diagnostics import check_reliability, warn_unreliable
    began, flow, failure = time.perf_counter(), None, ""
    try:
        flow = fit(gaussian.model, family="flow", method=FromGaussian(gaussian), seed=seed, max_steps=BUDGET_STEPS,
                   device=device, dtype=dtype, progress=progress, callbacks=callbacks,
                   max_consecutive_failures=max_consecutive_failures, diagnose=False)
    except FitError as e:
        failure = f"failed ({e})"
    except KeyboardInterrupt:
        failure = "was interrupted (Ctrl-C)"
    except Exception as e:  # noqa: BLE001 - the Gaussian fit, already paid for, must not be lost
        failure = f"raised {type(e).__name__}: {e}"
    if flow is not None and flow.status == "interrupted":
        failure = "was interrupted (Ctrl-C)"
    if flow is not None and not failure:
        check_reliability(flow, warn=False)
        _settled_at_budget(flow)
        _tails_still_unverified(flow, gaussian)
    seconds = time.perf_counter() - began
    g = gaussian.reliability
    warned = "; ".join(g["warnings"])
    tried = f"a flow started at batch and match's Gaussian (at most {BUDGET_STEPS} steps)"
    if failure:
        g["warnings"].append(f"{tried} {failure}")
        _say_ran(gaussian, gaussian.settings["method"] + f"; then {tried}, which {failure}")
        if flow is not None:
            gaussian.tried.append({"result": flow, "method": "flow", "why": failure})
        warn_unreliable(gaussian, stacklevel=stacklevel)
        return gaussian
    f = flow.reliability
    gap = f["elbo"] - g["elbo"]
    margin = 2 * (f["elbo_se"] ** 2 + g["elbo_se"] ** 2) ** 0.5
    elbos = f"ELBO {f['elbo']:.6g} against the Gaussian's {g['elbo']:.6g} (+- {margin / 2:.2g})"
    ran = f"{flow.num_steps} steps, {flow.status}, {seconds:.1f} s"
    if not f["warnings"]:
        chosen, why = flow, f"its check passed ({elbos})"
        f["notes"].append(f"batch and match's full-rank Gaussian was warned ({warned}); {tried}: {ran}, and its "
                          f"check passed: the flow is returned (the Gaussian is fit.tried[0]['result'])")
    elif gap > margin:
        chosen, why = flow, f"both were warned; the flow's {elbos} is the higher"
        f["warnings"].append(f"batch and match's full-rank Gaussian, tried first, was warned too ({warned}); the "
                             f"flow's {elbos} is the higher, so the flow is returned")
    else:
        chosen, why = gaussian, f"both were warned; the flow's {elbos} is not higher by twice its standard error"
        g["warnings"].append(f"{tried} was warned too ({'; '.join(f['warnings'])}); its {elbos} is not higher "
                             f"by twice its standard error, so the Gaussian is returned (the flow is "
                             f"fit.tried[0]['result'])")
    _say_ran(chosen, gaussian.settings["method"] + f"; then {tried}: {ran}; returned: "
                     f"{'the flow' if chosen is flow else 'the Gaussian'}, {why}")
    other = gaussian if chosen is flow else flow
    chosen.tried.append({"result": other, "method": "bam" if other is gaussian else "flow", "why": why})
    warn_unreliable(chosen, stacklevel=stacklevel)
    return chosen


def _say_ran(result, words):
    """The result's options (and so its settings' 'method') say what the call ran, in order."""
    result.options = dataclasses.replace(result.options, ran=words)
    result.settings["method"] = result.options.record()["method"]
