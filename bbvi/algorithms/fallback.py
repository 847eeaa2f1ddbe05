"""What method='auto' does when its Gaussian is not enough.

Where the end-of-fit check warns about batch and match's full-rank Gaussian (importance sampling moves a mean or an
sd, k-hat above 1, the MAP start found no mode, ...) or its k-hat is above the threshold (`needed`), a normalizing flow (family='flow', bbvi.flows) whose Gaussian
part starts at that q goes on for at most BUDGET_STEPS steps of the stochastic-gradient fit (64 particles a step:
128,000 gradient evaluations at most, about NUTS's median cost on the yardstick's 36 posteriors; SUSPECT_BUDGET_STEPS
where the Gaussian was not warned, only its k-hat high), and the flow's own end-of-fit check decides which q the
call returns (not where the mode search found several modes: a flow started at one does not find the others):
- the flow's check passes: the flow, with a note that says why the Gaussian was suspect;
- the flow's check warns and the Gaussian's did not (k-hat alone): the Gaussian, with a note;
- both are warned: the one with the higher ELBO (estimated from each check's draws: the lower KL(q || p)), with
  one warning that names both;
- the flow fails, raises or is interrupted: the Gaussian, with its warning, which says so.
Either way the other fit is kept in `fit.tried` and its evaluations count in `fit.num_gradient_evals`; the call
never returns the worse of two quietly. A flow started at the Gaussian need not find the Gaussian's mean and scales
again: measured on dogs_log, where the Gaussian was 0.16 sd off, 650 steps took it to 0.003 sd (experiments in the
closing note of issue 33 and the README's yardstick block)."""
import time

import torch

from ..convergence import Adaptive
from ..errors import FitError
from ..start import Start
from . import sgd

__all__ = ["FromGaussian", "go_on", "needed", "budget", "BUDGET_STEPS", "SUSPECT_BUDGET_STEPS"]

BUDGET_STEPS = 2000          # after a warned Gaussian
SUSPECT_BUDGET_STEPS = 1000  # after a Gaussian with k-hat above the threshold and nothing else found: the flows that
#                              helped there converged in 450-550 steps (hmm_drive_1, logmesquite_logvolume, a skewed
#                              1-D target); the one that did not (eight_schools_noncentered) ran to any cap, its
#                              Gaussian returned


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


def needed(gaussian):
    """Whether the Gaussian's check calls for the flow: it warns, or its k-hat is above the threshold for its draws
    (a note only, where importance sampling moves no mean or sd: measured on a skewed 1-D target, a Gaussian 0.11 sd
    off at k-hat 0.72 that importance sampling could not tell apart from right). Not after a callback stopped it, nor
    where the mode search found other modes."""
    r = gaussian.reliability
    if len(r.get("modes", [])) > 1:   # a flow started at one mode does not find another (the warning says what to do)
        return False
    return gaussian.status in ("completed", "converged") and bool(
        r.get("warnings") or r.get("khat", 0.0) > r.get("khat_threshold", float("inf")))


def budget(gaussian):
    """The flow's max_steps: BUDGET_STEPS after a warned Gaussian, SUSPECT_BUDGET_STEPS after one only suspect."""
    return BUDGET_STEPS if gaussian.reliability.get("warnings") else SUSPECT_BUDGET_STEPS


def _settled_at_budget(flow):
    """A flow stopped by this module's budget whose last level moved q by less than the rule's tolerance, and whose
    check found nothing else, has settled as far as the check can tell: its 'did not converge' becomes a note (the
    user set no max_steps to raise; measured on mesquite: 0.018 of q's sd at 2000 steps, 0.03 sd from the reference,
    converged at 2400)."""
    r, tol = flow.reliability, Adaptive().tol
    change = flow.levels[-1].get("change", float("nan")) if flow.levels else float("nan")
    late = [w for w in r["warnings"] if w.startswith("the fit did not converge in")]
    if flow.status == "max_steps" and late and len(r["warnings"]) == 1 and change < tol:
        r["warnings"].remove(late[0])
        r["notes"].append(f"{late[0]}: the budget of method='auto''s flow, and below the rule's tolerance ({tol} of "
                          f"q's sd), with nothing else found by the check: not a warning")


def go_on(gaussian, *, fit, seed, device, dtype, progress, callbacks, max_consecutive_failures, stacklevel):
    """The flow after a suspect Gaussian (the module docstring): the Result to return, warned about where it must be
    (stacklevel: as warnings.warn's, counted from this function; fit: bbvi.fit, passed in by it)."""
    from ..diagnostics import check_reliability, warn_unreliable
    began, flow, failure, steps = time.perf_counter(), None, "", budget(gaussian)
    try:
        flow = fit(gaussian.model, family="flow", method=FromGaussian(gaussian), seed=seed, max_steps=steps,
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
    seconds = time.perf_counter() - began
    g = gaussian.reliability
    suspect = "; ".join(g["warnings"]) or f"k-hat {g['khat']:.2f} above {g['khat_threshold']:.2f}"
    tried = f"a flow started at batch and match's Gaussian (at most {steps} steps)"
    if failure:
        (g["warnings"] if g["warnings"] else g["notes"]).append(f"{tried} {failure}")
        gaussian.settings["method"] += f"; then {tried}, which {failure}"
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
        f["notes"].append(f"batch and match's full-rank Gaussian was suspect ({suspect}); {tried}: {ran}, and its "
                          f"check passed: the flow is returned (the Gaussian is fit.tried[0]['result'])")
    elif not g["warnings"]:
        chosen, why = gaussian, "the flow's check warned and the Gaussian's did not"
        g["notes"].append(f"{tried} ({ran}) was warned ({'; '.join(f['warnings'])}) where the Gaussian was not: the "
                          f"Gaussian is returned (the flow is fit.tried[0]['result'])")
    elif gap > margin:
        chosen, why = flow, f"both were warned; the flow's {elbos} is the higher"
        f["warnings"].append(f"batch and match's full-rank Gaussian, tried first, was warned too ({suspect}); the "
                             f"flow's {elbos} is the higher, so the flow is returned")
    else:
        chosen, why = gaussian, f"both were warned; the flow's {elbos} is not higher by twice its standard error"
        g["warnings"].append(f"{tried} was warned too ({'; '.join(f['warnings'])}); its {elbos} is not higher "
                             f"by twice its standard error, so the Gaussian is returned (the flow is "
                             f"fit.tried[0]['result'])")
    chosen.settings["method"] = (gaussian.settings["method"] + f"; then {tried}: {ran}; returned: "
                                 f"{'the flow' if chosen is flow else 'the Gaussian'}, {why}")
    other = gaussian if chosen is flow else flow
    chosen.tried.append({"result": other, "method": "bam" if other is gaussian else "flow", "why": why})
    warn_unreliable(chosen, stacklevel=stacklevel)
    return chosen
