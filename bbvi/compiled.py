"""compile=True: the whole step as one torch.compile graph.

An eager step runs a few hundred small torch operations, each a few microseconds of Python and dispatch; at small N
that overhead, not the arithmetic, is the step's cost. `CompiledStep` traces one pure function of the step, from
the noise to the updated parameters, and torch.compile (TorchInductor) fuses it into a few kernels:

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

Inside the graph torch.distributions' argument checks are off (dynamo cannot trace their data-dependent branches;
it switches them off for the whole process, and bbvi puts the flag back outside the step): a value outside a
distribution's support then gives a NaN log density, dropped and counted, where the eager step's check raises and
the particle is dropped and counted as raising. The host reads one small tensor per step (what the counters need). The results equal the eager step's within
floating-point rounding (the same particles; sums fused in another order), not bit for bit. A step whose log-joint
raises, or (score path) is -inf at some particle, is redone eagerly from the same generator state: the eager
step's fault handling is the reference, not copied. `check` refuses what the graph does not cover with a
ConfigError that says what is supported.
"""
import math
import types

import torch
from torch.distributions import Distribution

from .errors import ConfigError
from .estimators.baselines import LOO
from .families import FullRank, MeanField
from .fit import _overflow_limit

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


class CompiledStep:
    """The compiled step of one fit (see the module docstring). Call it with the FitState in place of
    bbvi.fit's eager `step`; it returns the ELBO estimate (0-dim) like `step`."""

    def __init__(self, state):
        self.kind = check(state)
        self.names = list(state.params["continuous"])
        self.calls = 0
        group = state.optimizer.param_groups[0]
        (beta1, beta2), adam_eps = group["betas"], group["eps"]
        model, family, kind, S = state.model, state.family, self.kind, state.num_particles
        limit, clip = _overflow_limit(next(iter(state.leaves()))), state.clip_grad   # the eager step's limit

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
            flat = [-grads[name] for name in params]
            norm = torch.stack([g.norm() for g in flat]).norm()
            if clip is not None:
                coef = (clip / (norm + 1e-6)).clamp(max=1.0)
                flat = [g * coef for g in flat]
                norm = norm * coef
            ok = torch.isfinite(elbo + norm)
            huge = ok & (norm > limit)
            flat = [torch.where(huge, g * (limit / norm), g) for g in flat]
            new_steps = [torch.where(ok, s + 1, s) for s in steps]
            out_p, out_m, out_v = [], [], []
            for p, g, m, v, t in zip(params.values(), flat, exp_avg, exp_avg_sq, new_steps):
                m2 = m.lerp(g, 1 - beta1)
                v2 = v * beta2 + (1 - beta2) * g * g
                tt = t.to(p.dtype)
                bias1 = 1 - beta1 ** tt
                bias2_sqrt = (1 - beta2 ** tt).sqrt()
                denom = v2.sqrt() / bias2_sqrt + adam_eps
                p2 = p - (lr / bias1) * m2 / denom
                out_p.append(torch.where(ok, p2, p))
                out_m.append(torch.where(ok, m2, m))
                out_v.append(torch.where(ok, v2, v))
            flags = torch.stack([ok.to(elbo.dtype), huge.to(elbo.dtype), num_bad.to(elbo.dtype),
                                 infeasible.to(elbo.dtype)])
            return (*out_p, *out_m, *out_v, *new_steps, elbo.detach(), flags)

        # torch.compile caches compiled code per code object, and gives up on one after a few recompilations:
        # a copy of the code object per fit keeps every fit's step in a cache of its own
        self.pure = types.FunctionType(pure.__code__.replace(), pure.__globals__, pure.__name__, None,
                                       pure.__closure__)
        before = Distribution._validate_args
        self.compiled = torch.compile(self.pure, fullgraph=True, dynamic=False)
        Distribution._validate_args = before   # dynamo's first torch.compile switches it off for the process

    def _adam_state(self, state):
        opt = state.optimizer
        leaves = [state.params["continuous"][k] for k in self.names]
        for p in leaves:
            if p not in opt.state or not opt.state[p]:   # torch.optim.Adam's lazy state, as its first step makes it
                opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                "exp_avg_sq": torch.zeros_like(p)}
        return leaves, [opt.state[p] for p in leaves]

    def __call__(self, state, eager_step):
        pc = state.params["continuous"]
        leaves, adam = self._adam_state(state)
        lr = state.lr * state.schedule(state.step)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        before = state.generator.get_state()
        noise = state.family._noise(pc, state.num_particles, state.generator)
        inputs = ([pc[k].detach() for k in self.names] + [noise] + [a["exp_avg"] for a in adam]
                  + [a["exp_avg_sq"] for a in adam] + [a["step"] for a in adam] + [torch.tensor(lr, dtype=noise.dtype)])
        validate = Distribution._validate_args
        Distribution._validate_args = False   # inside the graph only: dynamo cannot trace the checks' branches
        try:
            if self.calls:   # compiled for these shapes and dtypes, which a fit never changes: the guards that
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):   # re-check them cost ~60 us
                    out = self.compiled(*inputs)
            else:
                out = self.compiled(*inputs)
        except Exception as e:  # noqa: BLE001 - the log-joint raised at some particle, or cannot be compiled
            Distribution._validate_args = validate
            if isinstance(e, torch._dynamo.exc.TorchDynamoException):
                raise ConfigError(f"compile=True: torch.compile could not run the step of model "
                                  f"{state.model.name!r} ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                                  f"use compile=False") from e
            state.generator.set_state(before)
            return eager_step(state)
        Distribution._validate_args = validate
        self.calls += 1
        k = len(self.names)
        new_p, new_m, new_v, new_steps = out[:k], out[k:2 * k], out[2 * k:3 * k], out[3 * k:4 * k]
        elbo, flags = out[4 * k], out[4 * k + 1]
        ok, huge, num_bad, infeasible = flags.tolist()
        if infeasible:   # the eager score path floors -inf particles (with_floor): redo the step eagerly
            state.generator.set_state(before)
            return eager_step(state)
        with torch.no_grad():
            torch._foreach_copy_(leaves, new_p)
            for a, m, v, t in zip(adam, new_m, new_v, new_steps):
                a["exp_avg"].copy_(m)
                a["exp_avg_sq"].copy_(v)
                a["step"].copy_(t)
        if num_bad:
            state.num_bad_particles = state.num_bad_particles + int(num_bad)
        if ok:
            state.consecutive_failures = 0
            if huge:
                state.num_rescaled_steps += 1
        else:
            state.num_failed_steps += 1
            state.consecutive_failures += 1
            state.last_failure = (f"the ELBO estimate or its gradient is NaN/inf ({int(num_bad)} of "
                                  f"{state.num_particles} particles had a NaN/inf log-joint or gradient)")
        state.elbo.append(elbo)
        state.step += 1
        return elbo
