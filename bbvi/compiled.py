"""compile=True: the whole step as one torch.compile graph.

An eager step runs a few hundred small torch operations, each a few microseconds of Python and dispatch; at small N
that overhead, not the arithmetic, is the step's cost. `CompiledStep` traces one pure function of the step, from
the noise to the updated parameters, into a graph of aten operations (make_fx, on fake tensors: a Python branch on a
tensor's value cannot be traced, and is a ConfigError rather than a branch silently frozen), and TorchInductor
compiles that graph, with its C++ wrapper, into a few fused kernels called from one C++ function:

    u = q's transform of the noise eps (drawn eagerly from the fit's generator, the same draws as an eager step)
    log p(u), and its pullback to u (torch.func.vjp)
    the particles whose log density is not finite are left out of every average, and those whose gradient is not
    finite are dropped as the eager step's guard drops them (their rows zeroed, the rest rescaled), both counted
    the estimator's gradient (reparam: mean log p + H(q); stl: mean log p - log q with q's parameters stopped in
    log q; score with the LOO baseline: mean (f - b) grad log q), the ELBO estimate as its value
    the checks of the eager step: a gradient that is not finite skips the update; one so large that Adam's squared
    statistics would overflow is rescaled; clip_grad
    Adam's update (torch.optim.Adam's arithmetic, on its own state tensors, so checkpoints and resume work as for
    an eager fit)

Inside the graph torch.distributions' argument checks are off (their branches depend on the values; bbvi switches
them off while tracing and puts the flag back): a value outside a
distribution's support then gives a NaN log density, dropped and counted, where the eager step's check raises and
the particle is dropped and counted as raising. The host reads one small tensor per step (what the counters need). The results equal the eager step's within
floating-point rounding (the same particles; sums fused in another order), not bit for bit. A step whose log-joint
raises, or (score path) is -inf at some particle, is redone eagerly from the same generator state: the eager
step's fault handling is the reference, not copied. `check` refuses what the graph does not cover with a
ConfigError that says what is supported.

Why not torch.compile: dynamo's per-call machinery (frame evaluation, its cache lookup, guards, the compiled
region's wrappers) and a Python wrapper cost more than the kernels at N = 1000 (measured: ~0.26 ms of a ~0.45 ms
call); calling Inductor's compiled graph directly, with the C++ wrapper, halves the step. The graph's inputs (the
parameters, Adam's state, its step counts, lr) are the fit's own tensors, kept in a list that is rebuilt only when
one of them is replaced (a restart of the optimizer, a checkpoint loaded); the outputs are copied into them in one
call, so a step that raises changes nothing.

Why a second copy of the step rather than a trace of the eager one (algorithms/sgd.py): measured, it is 2-6 times
faster per step, and a traced eager step with Adam compiled follows the eager one less closely (issue 34, "compile
what the eager path runs"; experiments/compile_study.py; torch 2.13.0 CPU, 2026-12-07, one thread, on a 2-core
machine shared with other work, so the absolute times moved by up to 2x from run to run: the ratios inside one row,
timed interleaved in one process, are what to read). The traced contender runs bbvi.step unchanged, its host
verdict, skip-and-count, redone steps, Record and torch.optim.Adam's state included, with the estimator
(estimate_parts on the step's fast path) under torch.compile, its backward by AOTAutograd, and Adam's step compiled
as PyTorch's compiled-optimizer recipe does (torch.compile of a function calling opt.step()). Per step, ms (median
of 5 rounds of 100 steps; 16 particles, float64, Inductor's caches off), compile s in brackets:

    model (latents)       family     estimator   eager    CompiledStep   traced eager
    logreg N=1000 (10)    meanfield  reparam     1.66     0.38 (21)      2.33 (12)
    logreg N=1000 (10)    fullrank   reparam     0.91     0.26 (21)      0.97 (11)
    logreg N=1000 (10)    meanfield  score+LOO   0.52     0.12 (12)      0.50 (6)
    logreg N=1000 (10)    fullrank   score+LOO   0.68     0.16 (14)      0.59 (7)
    diamonds N=5000 (26)  meanfield  reparam     4.70     0.71 (19)      1.47 (9)
    diamonds N=5000 (26)  fullrank   reparam     4.19     0.70 (19)      1.47 (17)
    diamonds N=5000 (26)  meanfield  score+LOO   1.41     0.24 (12)      0.60 (6)
    diamonds N=5000 (26)  fullrank   score+LOO   1.68     0.29 (13)      0.81 (8)

(an earlier run of the reparam rows, under heavier load, gave CompiledStep 2.3-5.4 times faster than the traced
step). At small N the traced step costs what the eager one does (on diamonds it is 2-3 times faster than eager,
CompiledStep 6-7): its arithmetic is a small part of the step, and it keeps the eager step's Python and adds
dynamo's: the estimator's graph break at torch.randn(generator=...) (dynamo cannot put a torch.Generator in a graph;
five breaks with the resumed frames), the two torch._dynamo.graph_break() that torch.optim.Optimizer's step makes on
purpose (pytorch issue 104053), so three to five compiled regions, each with its guards, plus the autograd engine's
backward. Drawing the noise first (the randn out of the region, one region fewer) left it 2-4 times slower than
CompiledStep (1.67, 1.03, 1.53, 1.50 ms on the reparam rows). torch.compile of the whole of sgd._update breaks at
Generator.get_state(), at the verdict's host read (.tolist()) and at .item(), and was slower than eager (1.0-1.5
against 0.8-1.2 ms on logreg). Agreement after 200 steps of the cosine schedule, max |parameter difference| from the
eager fit (float64): CompiledStep 4e-16 to 4e-15 (4e-11 on logreg fullrank score); the traced estimator with Adam
left eager the same (0 to 5e-11); with Adam compiled 4e-6 to 3e-5 on every row, because the compiled
torch.optim.Adam computes its bias corrections from its float32 `step` tensor as tensors, not as Python floats (one
step alone differs by 3e-7 at lr 0.05; with float64 `step` tensors by 6e-17), so such a fit does not follow the
eager one within rounding. (diamonds fullrank score differs by 0.7 for every compiled contender, the estimator-only
one too: that fit's noisy trajectory amplifies rounding.) None recompiled as lr changed at every step. The copy
stays, and so does the make_fx + Inductor route, which keeps the whole step, Adam included, one graph with one host
read. `pure`, inside `CompiledStep.__init__`, is that graph's one function (make_fx traces a single callable; the
guards and Adam's update it calls, `_guarded` and `_adam`, trace into the same graph, operation for operation). It
covers reparam, STL and score with LOO on the Gaussian families with Adam (`check`).
"""
import math

import torch
from torch.distributions import Distribution
from torch.fx.experimental.proxy_tensor import make_fx

from .errors import ConfigError
from .estimators.baselines import LOO
from .families import FullRank, MeanField
from .update import overflow_limit
from .record import Info

__all__ = ["CompiledStep", "check"]

SUPPORTED = ("compile=True supports continuous latents with a mean-field or full-rank Gaussian q, estimator "
             "'reparam', 'stl' or 'score' with the LOO baseline, the Adam optimizer (default flags), full data in "
             "one process, and a vectorized log-joint")


def check(state):
    """The estimator kind ('reparam' | 'stl' | 'score'), or a ConfigError naming what compile=True cannot run."""
    plan, opt = state.plan, state.optimizer
    why = None
    if type(state.family) not in (MeanField, FullRank):
        why = f"the family is {type(state.family).__name__}"
    elif plan.whole is not None or plan.has_discrete or state.discrete.spec or plan.continuous is None:
        why = "the model has discrete latents (or no continuous ones)"
    elif plan.continuous.name not in ("reparam", "stl", "score"):
        why = f"the estimator's continuous path is {plan.continuous.name!r}"
    elif plan.continuous.name == "score" and not isinstance(plan.baseline, LOO):
        why = f"the score path's baseline is {type(plan.baseline).__name__}, not LOO"
    elif state.structure is not None:
        why = "the score terms are Rao-Blackwellized (a log-joint of factor terms)"
    elif state.batch is not None or state.comm is not None:
        why = "minibatches and data-parallel fits are not compiled"
    elif type(opt) is not torch.optim.Adam or any(
            g["weight_decay"] or g["amsgrad"] or g["maximize"] or g.get("decoupled_weight_decay", False)
            for g in opt.param_groups):
        why = f"the optimizer is {type(opt).__name__}" + (" with non-default flags" if type(opt) is torch.optim.Adam
                                                          else "")
    elif not state.model.vectorized:
        why = "the log-joint is not vectorized over particles (vectorized=False)"
    if why is not None:
        raise ConfigError(f"{SUPPORTED}; here {why}. Use compile=False (the eager step) for this fit")
    return plan.continuous.name


def _guarded(flat, elbo, clip, limit):
    """The eager step's checks inside the graph, on the descent direction `flat` (one tensor a parameter):
    clip_grad, then (flat, ok: the ELBO and the norm are finite, huge: the norm is above the overflow `limit`,
    the direction rescaled to it)."""
    norm = torch.stack([g.norm() for g in flat]).norm()
    if clip is not None:
        coef = (clip / (norm + 1e-6)).clamp(max=1.0)
        flat = [g * coef for g in flat]
        norm = norm * coef
    ok = torch.isfinite(elbo + norm)
    huge = ok & (norm > limit)
    flat = [torch.where(huge, g * (limit / norm), g) for g in flat]
    return flat, ok, huge


def _adam(params, flat, exp_avg, exp_avg_sq, steps, ok, lr, beta1, beta2, eps):
    """torch.optim.Adam's update (default flags) of every parameter, as tensors: (parameters, first moments,
    second moments), each unchanged where not `ok`. steps: the step counts after this step."""
    out_p, out_m, out_v = [], [], []
    for p, g, m, v, t in zip(params, flat, exp_avg, exp_avg_sq, steps):
        m2 = m.lerp(g, 1 - beta1)
        v2 = v * beta2 + (1 - beta2) * g * g
        tt = t.to(p.dtype)
        bias1 = 1 - beta1 ** tt
        bias2_sqrt = (1 - beta2 ** tt).sqrt()
        denom = v2.sqrt() / bias2_sqrt + eps
        p2 = p - (lr / bias1) * m2 / denom
        out_p.append(torch.where(ok, p2, p))
        out_m.append(torch.where(ok, m2, m))
        out_v.append(torch.where(ok, v2, v))
    return out_p, out_m, out_v


class CompiledStep:
    """The compiled step of one fit (see the module docstring). Call it with the FitState in place of
    bbvi.fit's eager `step`; it returns the ELBO estimate (0-dim) like `step`."""

    def __init__(self, state):
        self.kind = check(state)
        self.names = list(state.params["continuous"])
        self.calls = 0
        self.steps_run = 0   # compiled steps run: the eager comparison at 1, 2, 4, 8, ... (`_agrees`)
        group = state.optimizer.param_groups[0]
        (beta1, beta2), adam_eps = group["betas"], group["eps"]
        model, family, kind, S = state.model, state.family, self.kind, state.num_particles
        limit, clip = overflow_limit(next(iter(state.leaves()))), state.clip_grad   # the eager step's limit

        names = self.names

        def pure(*flat_inputs):   # flat tensors in, flat tensors out: the fewest guards per call
            P = len(names)
            params = dict(zip(names, flat_inputs[:P]))
            noise = flat_inputs[P]
            exp_avg, exp_avg_sq = flat_inputs[P + 1:2 * P + 1], flat_inputs[2 * P + 1:3 * P + 1]
            steps, lr = flat_inputs[3 * P + 1:4 * P + 1], flat_inputs[4 * P + 1]
            frozen = {name: v.detach() for name, v in params.items()}
            if kind == "score":
                u = family.transform(frozen, noise)
                lp = model.log_density(u).to(u.dtype)
                valid = torch.isfinite(lp)
                n = valid.sum()
                lq = family.log_prob(frozen, u)
                f = torch.where(valid, lp - lq, torch.zeros_like(lp))
                w = valid.to(lp.dtype) / n
                elbo = (w * f).sum()
                b = (f.sum() - f) / (n - 1).clamp_min(1)                     # LOO
                weight = torch.where(valid, w * (f - b), torch.zeros_like(f))
                grads = torch.func.grad(lambda p: (weight * family.log_prob(p, u)).sum())(params)
                infeasible = (lp == -math.inf).any()                          # the eager step floors these
                num_bad = S - n
            else:
                u, pull_params = torch.func.vjp(lambda p: family.transform(p, noise), params)
                lp, pull_u = torch.func.vjp(lambda x: model.log_density(x).to(x.dtype), u)
                valid = torch.isfinite(lp)
                n = valid.sum()
                w = valid.to(lp.dtype) / n
                g_u, = pull_u(w)
                value = torch.where(valid, lp, torch.zeros_like(lp))
                if kind == "stl":
                    lq, pull_q = torch.func.vjp(lambda x: family.log_prob(frozen, x), u)
                    g_u = g_u - pull_q(w)[0]
                    value = torch.where(valid, lp - lq, torch.zeros_like(lp))
                bad_rows = ~torch.isfinite(g_u).all(-1) & valid               # the eager step's guard
                dropped = bad_rows.sum()
                keep = valid & ~bad_rows
                g_u = torch.where(keep[:, None], g_u, torch.zeros_like(g_u)) * (n / (n - dropped).clamp_min(1))
                grads, = pull_params(g_u)
                elbo = (w * value).sum()
                if kind == "reparam":
                    entropy, g_entropy = torch.func.grad_and_value(family.entropy)(params)[::-1]
                    elbo = elbo + entropy
                    grads = {name: grads[name] + g_entropy[name] for name in grads}
                infeasible = lp.new_zeros((), dtype=torch.bool)
                num_bad = S - n + dropped
            # the ascent direction is the gradient; Adam minimises -ELBO
            flat, ok, huge = _guarded([-grads[name] for name in params], elbo, clip, limit)
            new_steps = [torch.where(ok, s + 1, s) for s in steps]
            out_p, out_m, out_v = _adam(list(params.values()), flat, exp_avg, exp_avg_sq, new_steps, ok, lr,
                                        beta1, beta2, adam_eps)
            flags = torch.stack([ok.to(elbo.dtype), huge.to(elbo.dtype), num_bad.to(elbo.dtype),
                                 infeasible.to(elbo.dtype)])
            return (*out_p, *out_m, *out_v, *new_steps, elbo.detach(), flags)

        self.pure = pure
        self.fn = None        # compiled at the first call, from its inputs
        self.inputs = None    # the graph's inputs: the fit's own tensors (see _inputs)
        self.held = None      # what they were taken from, to notice one being replaced
        self.lr = None

    def _compile(self, state, inputs):
        validate = Distribution._validate_args
        Distribution._validate_args = False   # inside the graph only: the checks branch on the values
        what = "trace"
        try:
            graph = make_fx(self.pure, tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)
            what = "compile"
            self.fn = torch._inductor.compile(graph, inputs, options={"cpp_wrapper": True})
        except Exception as e:  # noqa: BLE001 - whatever the tracer or Inductor refused, said as a ConfigError
            raise ConfigError(f"compile=True: torch.compile could not run the step of model {state.model.name!r} "
                              f"(it could not {what} it: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]})"
                              f"; a log-joint must be torch operations on its inputs, without Python branches on "
                              f"their values; use compile=False") from e
        finally:
            Distribution._validate_args = validate

    def _inputs(self, state):
        """The graph's inputs but the noise: the parameters (detached views), Adam's exp_avg, exp_avg_sq and step
        tensors, and lr as a 0-dim tensor; rebuilt when the optimizer's state or a parameter is a new tensor."""
        opt, pc = state.optimizer, state.params["continuous"]
        leaves = [pc[k] for k in self.names]
        adam = [opt.state.get(p) for p in leaves]
        held = leaves + adam + [a and a.get("step") for a in adam]
        if self.held is not None and all(a is b for a, b in zip(held, self.held)):
            return self.inputs
        for i, p in enumerate(leaves):
            if not adam[i]:   # torch.optim.Adam's lazy state, as its first step makes it
                adam[i] = opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                          "exp_avg_sq": torch.zeros_like(p)}
        self.held = leaves + adam + [a["step"] for a in adam]
        lr = torch.tensor(0.0, dtype=leaves[0].dtype, device=leaves[0].device)
        self.inputs = ([p.detach() for p in leaves] + [None] + [a["exp_avg"] for a in adam]
                       + [a["exp_avg_sq"] for a in adam] + [a["step"] for a in adam] + [lr])
        self.targets = self.inputs[:len(leaves)] + self.inputs[len(leaves) + 1:-1]
        self.lr = None
        return self.inputs

    def _agrees(self, state, noise, elbo):
        """Whether the graph's ELBO estimate equals the eager log-joint's at the same particles (checked at steps
        1, 2, 4, 8, ...): a log-joint that reads Python state a callback changes (an annealed temperature in a
        closure, a global) is frozen at its traced value inside the graph. Seen: the compiled fit returned the prior
        while the eager one fitted. Where they differ a ReliabilityWarning says so and the fit goes on eagerly."""
        family, model = state.family, state.model
        with torch.no_grad():
            frozen = {name: t.detach() for name, t in state.params["continuous"].items()}
            u = family.transform(frozen, noise)
            lp = model.log_density(u).to(u.dtype)
            value = lp if self.kind == "reparam" else lp - family.log_prob(frozen, u)
            valid = torch.isfinite(lp)
            eager = value[valid].mean() + (family.entropy(frozen) if self.kind == "reparam" else 0.0)
        a, b = float(eager), float(elbo)
        tol = 1e-6 if u.dtype == torch.float64 else 1e-3
        if not (math.isfinite(a) and math.isfinite(b)) or abs(a - b) <= tol * (1 + abs(a)):
            return True
        import warnings

        from .errors import ReliabilityWarning
        warnings.warn(f"compile=True: at step {state.step} the compiled step's ELBO estimate ({b:.6g}) differs from "
                      f"the eager log-joint's at the same particles ({a:.6g}): the log-joint reads Python state that "
                      f"changed after it was traced (a value in a closure or a global, an attribute a callback sets), "
                      f"which the graph holds at its traced value. The fit goes on eagerly from this step; the steps "
                      f"before it used the frozen value. Pass such values as data, or fit with compile=False",
                      ReliabilityWarning, stacklevel=4)
        return False

    def __call__(self, state, eager_step):
        inputs = self._inputs(state)
        lr = state.lr * state.schedule(state.step)
        for group in state.optimizer.param_groups:   # as the eager step leaves them (checkpoints hold them)
            group["lr"] = lr
        if lr != self.lr:
            inputs[-1].fill_(lr)
            self.lr = lr
        before = state.generator.get_state()
        inputs[len(self.names)] = state.family._noise(state.params["continuous"], state.num_particles,
                                                      state.generator)
        if self.fn is None:
            self._compile(state, inputs)
        try:
            out = self.fn(*inputs)
        except Exception:  # noqa: BLE001 - the log-joint raised at some particle: the eager step says how
            state.generator.set_state(before)
            return eager_step(state)
        k = len(self.names)
        elbo, flags = out[4 * k], out[4 * k + 1]
        ok, huge, num_bad, infeasible = flags.tolist()
        if infeasible:   # the eager score path floors -inf particles (with_floor): redo the step eagerly
            state.generator.set_state(before)
            return eager_step(state)
        self.steps_run += 1
        if self.steps_run & (self.steps_run - 1) == 0 and not self._agrees(state, inputs[k], elbo):
            state.compiled = None   # this step and the rest eagerly, from the same generator state
            state.generator.set_state(before)
            return eager_step(state)
        torch._foreach_copy_(self.targets, out[:4 * k])   # detached views and Adam's state: no autograd to record
        failure = "" if ok else (f"the ELBO estimate or its gradient is NaN/inf ({int(num_bad)} of "
                                 f"{state.num_particles} particles had a NaN/inf log-joint or gradient)")
        state.record.add(Info(elbo=elbo, ok=bool(ok), rescaled=bool(ok and huge), num_bad=int(num_bad) or None,
                              failure=failure))
        state.step += 1
        return elbo
