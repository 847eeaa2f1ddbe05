"""The loop: `fit` drives an algorithm's init / step (bbvi.algorithms: 'sgd', the stochastic-gradient default,
whose `init` and `step` are bbvi.init and bbvi.step; 'laplace') as the thin loop a user could write, plus the
convergence test, callbacks, checkpoints, a progress bar, fault handling and the end-of-fit check:

- a step whose ELBO estimate or gradient is NaN/inf is skipped (parameters untouched) and counted; after
  `max_consecutive_failures` such steps in a row the fit stops with a FitError that names the cause and keeps
  the fit so far in `err.result`.
- Ctrl-C (KeyboardInterrupt) returns the result so far, marked `interrupted=True`.
- `tol_rel_obj`: Stan ADVI's convergence test on the ELBO, on running means of the per-step estimates over
  windows of `check_every` steps: stop when the mean or the median of recent relative changes falls below it.
"""
import dataclasses
import os
import signal
import sys
import threading
import time
import warnings

import torch

from .checkpoint import Keeper, load_checkpoint, read_checkpoint, setting, write_checkpoint
from .errors import ConfigError, FitError
from .relative_tolerance import RelativeTolerance, q_settled
from .estimators import DEFAULT, resolve_estimator
from .estimators.auto import Auto
from .fit_options import FitOptions
from .result import Result
from .state import FitState
from .saving import describe, read
from .options import _length_change, _refuse_unknown, check_loop_options
from .algorithms import resolve_method
from .algorithms.sgd import init, step

__all__ = ["init", "step", "fit", "FitState"]

# Where no bar shows because stderr is not a terminal (a log file, a pipe, a batch job) and progress=None, a line on
# stderr every LOG_EVERY_S seconds of a fit (none for a fit shorter than that); $BBVI_PROGRESS_EVERY overrides it.
# Its total, as the bar's, is a fixed length's (steps=N, bam) or the adaptive rule's running estimate (`_total`).
LOG_EVERY_S = 10.0


def fit(model, family=None, estimator="auto", baseline=DEFAULT, *, num_particles=None, steps=None, lr=None,
        optimizer="adam", schedule="auto", clip_grad=None, tol_rel_obj=None, check_every=100, callbacks=(),
        progress=None, seed=0, device="cpu", dtype=None, init_values=None, max_consecutive_failures=100,
        checkpoint=None, checkpoint_every=500, resume=None, init_strategy="auto", max_steps=None, diagnose=True,
        subsample_size=None, subsample_cv=True, distributed=False, compile=False, method="auto", **unknown):
    """Fit q to the posterior of `model`: by batch and match (a full-rank Gaussian from the scores, no learning rate)
    where every latent is continuous, torch can differentiate the log-joint, there are at most 200 continuous
    coordinates and no option of the stochastic-gradient fit is given (method='auto', bbvi.algorithms.auto;
    `fit.options.method` says which ran and `fit.options.why` why), else by stochastic gradient ascent on the ELBO. Where the
    end-of-fit check warns about batch and match's Gaussian (after a closer look with 64,000 draws where it was
    inconclusive), a normalizing flow started at that Gaussian goes on for at most 2000 steps and the check decides
    which q is returned; the other is in `fit.tried` (bbvi.algorithms.fallback; diagnose=False skips both).

    The stochastic-gradient fit needs no tuning either: the MAP/Laplace start where it exists (init_strategy='auto'),
    float64, the adaptive step-size rule with iterate averaging and a statistical stopping rule (steps=None, see
    bbvi.Adaptive; `max_steps` caps it, 20000 by default; status 'converged' or 'max_steps'), and at the end
    PSIS k-hat and a PSIS check of q's means and sds, with a bbvi.ReliabilityWarning when the fit cannot be
    trusted (`fit.reliability` holds what was checked; diagnose=False skips it).

    method: 'auto' (the default, above) | 'sgd' (stochastic-gradient ascent on the ELBO, all that follows) | 'laplace' (q = N(MAP,
    H^-1) on the unconstrained scale in no step, the end-of-fit check saying whether to trust it; family 'fullrank';
    the options below that belong to the stochastic-gradient steps are refused) | 'bam' (batch and match: a
    full-rank Gaussian from closed-form updates on the scores grad log p at 32 particles a step, no learning rate;
    steps=None runs 50 steps; bbvi.algorithms.bam) | an object with init and step (bbvi.algorithms). family: None (the method's default: 'meanfield' for 'sgd') | 'meanfield' | 'fullrank' |
    'lowrank' | 'flow' (or bbvi.MeanField/FullRank/LowRank/Flow(...); a flow
    bends a full-rank Gaussian with coupling layers, lr 0.01 and 64 particles by default, bbvi.flows); discrete
    latents get mean-field Categorical factors. num_particles: draws per step, 16 by default (a flow: 64). estimator: 'auto' | 'score' | 'reparam' | 'stl' (or bbvi.Score(...)
    ...); baseline (score terms): None | 'ema' | 'loo' | 'cv', LOO by default. optimizer: 'adam' | 'adagrad' |
    'sgd' | 'rmsprop' | 'natural' (natural-gradient steps in q's Fisher geometry, meanfield/fullrank and
    Categorical factors, bbvi.natural; lr is then the step size rho, 0.3 by default) or a callable (params, lr)
    -> torch.optim.Optimizer whose step needs no closure (LBFGS is refused). steps=N runs exactly N steps (status
    'completed') with lr (0.05 by default) and `schedule`: 'cosine' (the default with steps=N: lr decays to 2%
    over the steps) | None (constant) | 'exponential' | callable t -> lr factor | bbvi.Adaptive(...) (then N is
    its cap). clip_grad: max global gradient norm. tol_rel_obj: with steps=N, stop early when the ELBO's
    relative change (Stan ADVI's test) falls below it, checked every `check_every` steps. callbacks: a list of
    callables (state) -> bool, called after every step; True stops the fit. progress: tqdm bar (default: when
    stderr is a terminal; else, with progress=None, a line on stderr every 10 s, $BBVI_PROGRESS_EVERY); the total
    it shows is a fixed length's own, or for the adaptive rule its running estimate (`Adaptive`'s tracker,
    `estimate`; none in the first 400 steps of its first level, where it would be a guess; measured on 14 fits of
    the defaults test models and posteriordb: within 2x of the steps run at 98% of the steps where given, at worst
    2.65x), at most max_steps. init_strategy: 'auto' | 'zero' (q starts at unconstrained 0 or init_values, scales init_scale) |
    'map' (q starts at the MAP with Laplace scales, or a ConfigError says why it cannot). init_values: {latent:
    constrained value}; a discrete latent's value is where the first check evaluates the log-joint (without it,
    the first of a few draws from q's uniform start at which the log-joint is finite). subsample_size: B
    rows of every plate per step (an int, or {plate: B}) for a model with plates (bbvi.Model(plates=...)): each
    step's ELBO and gradient are unbiased for the full data's (bbvi.subsample). subsample_cv: with minibatches,
    each plate factor gets a control variate, its first-order Taylor expansion at q's mean, re-anchored every
    epoch (one full-data evaluation at one point) and exact in expectation; it cuts the minibatch noise by orders
    of magnitude on large data (True by default; off for models with discrete latents and for Rao-Blackwellized
    score terms; bbvi.subsample.Control). distributed: True under torchrun
    (`torchrun --nproc_per_node=K script.py`, every rank calling bbvi.fit on the same model): each rank steps on
    its shard of the plates with particles of its own, gradients all-reduced (gloo on the CPU, NCCL on CUDA), the
    parameters identical on every rank; rank 0 writes checkpoints and runs the end-of-fit check
    (bbvi.distributed). compile: True runs each step as one torch.compile graph (bbvi.compiled; Gaussian
    families, reparam/stl/score+LOO, Adam, full data): the same results within rounding, a few times cheaper per
    step at small N once compiled (compiling takes seconds: worth it for long fits).

    checkpoint: a file path where the full fit state is written atomically (with a checksum) every
    `checkpoint_every` steps and when the fit ends (also on Ctrl-C); a path that cannot be written ('', a folder, a
    folder where no file can be created, as under /proc) is a ConfigError before the first step, and a write that fails later is a
    FitError holding the fit so far. Ctrl-C (a KeyboardInterrupt anywhere in a step, also from the log-joint or a
    signal; SIGTERM is handled the same way while the fit runs) returns, and checkpoints, the fit at the last completed step: a step it cuts short is undone.
    resume: a checkpoint path to continue from, with the same model and settings, reaching bit for bit the
    result of an uninterrupted fit; a corrupted file is a ConfigError. resume may also change how long the fit
    runs: a larger `steps` (or, with steps=None, a larger `max_steps`) extends it, also a finished one, to the
    new total. That is bit for bit a single fit of the new length when nothing depended on the old length
    (schedule None/'constant'/a callable t -> factor; an adaptive fit that had neither converged nor reached its
    cap); otherwise (the 'cosine' default and 'exponential' schedules depend on the total, so from the resumed
    step on they follow the new length's curve; an adaptive fit that had converged or reached max_steps goes on
    with a new level from its averaged q, at the next learning rate after convergence, at the same one after
    the cap) a UserWarning says why it differs. Either way `fit.settings['extended']` records it. A length
    below the steps already run is a ConfigError. Returns a bbvi Result; its `options` (bbvi.FitOptions) hold what
    it ran with, typed, and its `settings` their text record (what checkpoints compare and a saved fit keeps).
    """
    from .model import Model
    if unknown:
        _refuse_unknown("fit", unknown, fit)
    if not isinstance(model, Model):
        init(model)  # raises the ConfigError that says what a model is
    callbacks = check_loop_options(tol_rel_obj, steps, check_every, max_consecutive_failures, checkpoint_every,
                                    checkpoint, resume, callbacks, subsample_cv, distributed, compile)
    if method == "auto" and (tol_rel_obj is not None or distributed or compile or _saved_by_sgd(resume)):
        method = "sgd"   # options, or a checkpoint, of the stochastic-gradient fit (bbvi.algorithms.auto)
    algorithm = resolve_method(method)
    if family is None:
        family = getattr(algorithm, "default_family", "meanfield")
    options = FitOptions(model=model.name, num_particles=num_particles, steps=steps, lr=lr,
                         optimizer=setting(optimizer), schedule=setting(schedule), clip_grad=clip_grad,
                         tol_rel_obj=tol_rel_obj, seed=seed, device=str(device), init_strategy=init_strategy,
                         max_steps=max_steps, subsample_size=subsample_size,
                         subsample_cv=subsample_cv and subsample_size is not None, compile=compile)
    comm = None
    if distributed:
        from .distributed import connect
        comm, device = connect(device)
        options = dataclasses.replace(options, distributed=comm.world_size)   # a checkpoint resumes on as many ranks
    grad_mode = torch.is_grad_enabled()
    began = time.perf_counter()
    if method not in ("sgd", "auto"):
        options = dataclasses.replace(options, method=getattr(algorithm, "name", None) or setting(algorithm))
        if compile:
            raise ConfigError(f"compile=True compiles the stochastic-gradient step (method='sgd'), not "
                              f"method={method!r}")
    state = algorithm.init(model, family, estimator, baseline, num_particles=num_particles, lr=lr,
                           optimizer=optimizer, schedule=schedule, steps=steps, clip_grad=clip_grad, seed=seed,
                           device=device, dtype=dtype, init_values=init_values, init_strategy=init_strategy,
                           max_steps=max_steps, subsample_size=subsample_size, subsample_cv=subsample_cv, comm=comm)
    if compile:
        from .compiled import CompiledStep
        state.compiled = CompiledStep(state)   # a ConfigError for what it does not cover
    start_s = time.perf_counter() - began
    resolved = resolve_estimator(estimator, baseline)
    options = options.resolved(state, algorithm, describe(resolved), isinstance(resolved, Auto))
    tracker = state.tracker
    cap = tracker.rule.max_steps if tracker is not None else (steps if steps is not None else state.cap)
    converged = RelativeTolerance(tol_rel_obj, check_every, cap)
    if resume is not None:
        options = _resume(state, resume, options, converged, check_every=check_every, schedule=schedule, lr=lr, steps=steps,
                max_steps=max_steps, extendable=getattr(state.algorithm or algorithm, "extendable", False))
    status, callback_error, save_error, wall = _run(
        state, algorithm, cap, converged, options, seed=seed, callbacks=callbacks, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, max_consecutive_failures=max_consecutive_failures, progress=progress,
        grad_mode=grad_mode, checking=diagnose)
    result = Result.from_state(state, options=options, status=status, wall_time=wall, start_time=start_s)
    _raise_if_failed(result, state, status, callback_error, save_error, checkpoint)
    if diagnose and status != "interrupted":
        from .diagnostics import check_reliability
        goes_on = comm is None and callable(getattr(algorithm, "after_check", None))   # it warns itself
        if comm is None or comm.rank == 0:
            check_reliability(result, warn=not goes_on)
        if comm is not None:  # rank 0's check (and warning) on the full data; its findings on every rank
            result.reliability = comm.share(result.reliability)
        if goes_on:
            result = algorithm.after_check(result, fit=fit, seed=seed, device=device, dtype=dtype, progress=progress,
                                           callbacks=callbacks, max_consecutive_failures=max_consecutive_failures,
                                           stacklevel=3)
    return result


def _saved_by_sgd(resume):
    """Whether the checkpoint `resume` was written by the stochastic-gradient fit (its settings name no other method:
    every checkpoint written before method='auto' became the default)."""
    if resume is None:
        return False
    try:
        return "method" not in read(resume, "checkpoint")["settings"]
    except ConfigError:
        return False   # read again, and refused with its reason, where the fit loads it


def _resume(state, resume, options, converged, *, check_every, schedule, lr, steps, max_steps, extendable):
    """Load the checkpoint `resume` into the state; for an algorithm whose length a resume may change
    (`extendable`: the stochastic-gradient fit), a new length is an extension, noted in the options' `extended`
    (and warned about where it differs from a single fit of that length). Returns the options."""
    comm, tracker = state.comm, state.tracker
    ck = read_checkpoint(state, resume, options.record(), length_may_differ=extendable)
    change = (_length_change(ck, resume, state, schedule=schedule, lr=lr, steps=steps, max_steps=max_steps)
              if extendable else None)
    load_checkpoint(state, ck)
    if comm is not None:  # this rank's own generator, baseline and data order
        state.load_rank_state_dict(ck["ranks"][comm.rank])
    stops = [t for t in range(check_every, state.step + 1, check_every)  # replay the convergence test
             if converged(state.elbo[:t])]
    notes = [ck["settings"]["extended"]] if "extended" in ck["settings"] else []
    if change is not None:
        done, name, old_cap, new_cap, reasons, reopen = change
        if stops and stops[0] <= done:
            reasons.append(f"tol_rel_obj's test (whose window depends on the length) passes at step {stops[0]} "
                           f"of a fit with {name}={new_cap}: a single fit would have stopped there")
        note = (f"resumed at step {done} with {name}={new_cap} (saved with {name}={old_cap}): "
                + ("the same as a single fit with " + f"{name}={new_cap}" if not reasons else
                   f"not the same as a single fit with {name}={new_cap}: " + "; ".join(reasons)))
        if reasons:
            warnings.warn(f"bbvi.fit: resume={str(resume)!r} {note}", UserWarning, stacklevel=3)
        if reopen is not None:
            tracker.reopen(state, next_rate=reopen == "next")
        notes.append(note)
    return dataclasses.replace(options, extended=" | then ".join(notes)) if notes else options


def _run(state, algorithm, cap, converged, options, *, seed, callbacks, checkpoint, checkpoint_every,
         max_consecutive_failures, progress, grad_mode, checking=True):
    """The loop: steps until the algorithm, the rule, a callback, the convergence test or Ctrl-C stops it, with
    checkpoints and a progress bar: (status, the callback's exception, the checkpoint's write error, seconds)."""
    comm, tracker, model = state.comm, state.tracker, state.model
    show = (sys.stderr.isatty() if progress is None else bool(progress)) and (comm is None or comm.rank == 0)
    bar = None
    total = cap if cap is not None else state.cap   # an algorithm of a fixed length (bam) knows its own
    if show:
        from tqdm.auto import tqdm
        bar = tqdm(total=_total(tracker, total)[0], initial=state.step, desc=f"bbvi {model.name}", leave=False)
    lines = progress is None and not show and not sys.stderr.isatty() and (comm is None or comm.rank == 0)
    every = float(os.environ.get("BBVI_PROGRESS_EVERY", LOG_EVERY_S))
    logged, said = time.perf_counter(), False
    status = "completed" if tracker is None else "max_steps"
    callback_error = save_error = None
    keeper = Keeper()
    began = time.perf_counter()
    previous = _sigterm_as_interrupt()
    try:
        while not state.stop and (cap is None or state.step < cap) and not (tracker is not None and tracker.converged):
            kept = keeper.keep(state)
            try:  # a step and the rule's look at it: done whole, or undone (Ctrl-C)
                algorithm.step(state)
            except KeyboardInterrupt:
                keeper.undo(state, kept)
                raise
            if checkpoint is not None and state.step % checkpoint_every == 0:
                save_error = write_checkpoint(state, checkpoint, options.record())
                if save_error is not None:
                    status = "failed"
                    break
            if lines and time.perf_counter() - logged >= every:   # not on a terminal: a line now and then
                logged, said = time.perf_counter(), True
                print(f"bbvi fit of {model.name!r} ({options.method}): step "
                      f"{state.step}{_total(tracker, total)[1]}, ELBO "
                      f"{torch.stack(state.elbo[-50:]).nanmean().item():.6g} (mean of the last 50), "
                      f"{logged - began:.0f} s", file=sys.stderr, flush=True)
            if bar is not None:
                _advance(bar, state)
            if state.consecutive_failures >= max_consecutive_failures:
                status = "failed"
                break
            try:
                stopped = any(bool(c(state)) for c in callbacks)
            except Exception as e:  # noqa: BLE001 - a user's callback must not lose the fit
                stopped, callback_error = True, e
            if comm is not None and callbacks:  # one rank's stop stops every rank, and its error fails every rank
                stopped = comm.any(stopped)
                if comm.any(callback_error is not None) and callback_error is None:
                    callback_error = RuntimeError(f"a callback raised on another rank of this data-parallel fit "
                                                  f"(this is rank {comm.rank}); that rank's FitError says what")
            if callback_error is not None:
                status = "failed"
                break
            if stopped:
                status = "stopped by callback"
                break
            if converged(state.elbo) and q_settled(state, seed):
                status = "converged"
                break
            if state.stop:
                break
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        torch.set_grad_enabled(grad_mode)   # as it was, whatever a cut-short step left behind
        if bar is not None:
            bar.close()
    if tracker is not None and tracker.converged:
        status = "converged"
    if said:
        print(f"bbvi fit of {model.name!r}: {status} after {state.step} steps, {time.perf_counter() - began:.1f} s"
              + ("; the end-of-fit check follows" if checking and status != "interrupted" else ""), file=sys.stderr,
              flush=True)
    if checkpoint is not None and save_error is None:
        save_error = write_checkpoint(state, checkpoint, options.record())
    return status, callback_error, save_error, time.perf_counter() - began


def _total(tracker, total):
    """(the total a progress display shows, the words after the step count): a fixed length's (steps=N, or an
    algorithm's own, as bam's) exactly; for the adaptive rule its running estimate (`_Tracker.estimate`)."""
    if tracker is None:
        return total, f" of at most {total}" if total else ""
    about = tracker.estimate()
    if about is None:   # none yet: the rule has not seen enough of its first level
        return None, f" of at most {total} (the adaptive rule's estimate of its total comes later)"
    return about, f" of about {about} (the adaptive rule's estimate; at most {total})"


def _advance(bar, state):
    """One step on the bar; its total follows the adaptive rule's estimate, and every 50 steps the ELBO's recent
    mean and the learning rate show beside it."""
    bar.update(1)
    tracker = state.tracker
    about = tracker.estimate() if tracker is not None else bar.total
    if about != bar.total:
        bar.total = about
        bar.refresh()
    if state.step % 50 == 0:
        bar.set_postfix(elbo=f"{torch.stack(state.elbo[-50:]).nanmean().item():.4g}",
                        **({"lr": f"{tracker.lr:.3g}"} if tracker is not None else {}))


def _sigterm_as_interrupt():
    """While the loop runs, SIGTERM (what batch schedulers and `timeout` send) is handled as Ctrl-C: the step it cuts
    short is undone, the checkpoint written, the fit returned 'interrupted'. Returns the handler to put back, or None
    where none was installed (not the main thread, or a handler of the user's own is set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")
    signal.signal(signal.SIGTERM, interrupt)
    return previous


def _raise_if_failed(result, state, status, callback_error, save_error, checkpoint):
    """FitError, holding the result, for a callback that raised, a checkpoint that could not be written, too many
    failed steps in a row, or a q that cannot be used."""
    model = state.model
    if callback_error is not None:
        raise FitError(f"fit of model {model.name!r}: a callback raised {type(callback_error).__name__}: "
                       f"{callback_error} (after step {state.step}). The fit so far is in this error's .result"
                       + (f" and in the checkpoint {str(checkpoint)!r}" if checkpoint is not None else "") + ".",
                       result=result) from callback_error
    if save_error is not None:
        raise FitError(f"fit of model {model.name!r}: the checkpoint could not be written after step {state.step}: "
                       f"{save_error}. The fit so far is in this error's .result (save it elsewhere with "
                       f".result.save(path), or fit again with another checkpoint path).",
                       result=result) from save_error
    if status == "failed":
        raise FitError(f"fit of model {model.name!r} stopped at step {state.step}: {state.consecutive_failures} "
                       f"steps in a row failed; last cause: {state.last_failure}. {state.num_failed_steps} steps "
                       f"failed in all. The fit so far is in this error's .result.", result=result)
    unusable = _unusable_q(result)
    if unusable:
        result.status = "failed"
        raise FitError(f"fit of model {model.name!r} ended after {state.step} steps with a q that cannot be used: "
                       f"{unusable} ({state.num_failed_steps} steps failed; last cause: {state.last_failure or 'none'}). "
                       f"A step size too large blows q up: try a smaller lr, or steps=None (the adaptive rule). The "
                       f"fit is in this error's .result.", result=result)


def _unusable_q(result):
    """'' when q's parameters are finite and its draws (64, from a generator of their own) are finite; else what
    is not."""
    bad = [f"{g}/{k}" for g, grp in result.params.items() for k, t in grp.items() if not bool(torch.isfinite(t).all())]
    if bad:
        return f"its parameters {bad} are NaN/inf"
    if result.model.dim:
        with torch.no_grad():
            u, _ = result.draw(64, seed=0)
            z, _ = result.model.constrain(u)
        worse = [k for k, v in z.items() if not bool(torch.isfinite(v).all())]
        if not bool(torch.isfinite(u).all()) or worse:
            return f"its draws of {worse or 'the unconstrained coordinates'} are NaN/inf"
    return ""
