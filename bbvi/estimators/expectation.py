"""The log-derivative trick on its own: E_p[f] and its gradient for any distribution p_theta.

    grad_theta E_p[f(x)] = E_p[f(x) grad_theta log p_theta(x)]                      (score)
    grad_theta E_p[f(x)] = E_eps[grad_theta f(T_theta(eps))]                         (pathwise)

`expectation` returns a scalar whose value is the Monte Carlo estimate of E[f] and whose derivatives are the
estimator's. The score path is the one `bbvi.fit` uses for its score terms (trick.py and the baselines'
`score_term`): in the DiCE form (Foerster et al. 2018) with a baseline (Mao et al. 2019), with the "magic box"
B(x) = exp(log p(x) - stop(log p(x))) (value 1, gradient B grad log p),

    surrogate = mean f  +  [ c - stop(c) ],      c = mean_s B(x_s) (f_s - b_s)

whose value is mean f and whose first *and higher* derivatives are unbiased for a single stochastic node and
b_s independent of x_s (the naive mean f log p gets the second derivative wrong). With proposals q_j
(importance sampling, off-policy), x_s ~ q and the weights w_s = p(x_s) / sum_j (n_j / n) q_j(x_s) (the balance
heuristic of multiple importance sampling; one proposal: p / q): value mean_s w_s f_s, c = mean_s stop(w_s)
B(x_s) (f_s - b_s).

Draws use the generator passed in (never the global RNG); which distributions it draws from, and how, is
distributions.py (`draw`, re-exported here).
"""
import dataclasses
import math

import torch
import torch.distributions as D

from ..errors import ConfigError
from .baselines import CV, NoBaseline, _PerParticle, resolve_baseline
from .distributions import FamilyDistribution, _as_distribution, _log_prob, draw
from .particles import Particles
from .trick import magic_box, with_gradient

__all__ = ["expectation", "draw"]


def _values(f, x):
    """f(x) as a (num,) tensor in x's float dtype; f may be numpy or any Python callable."""
    out = f(x)
    if not torch.is_tensor(out):
        out = torch.as_tensor(out)
    _check_values(out, x.shape[0])
    return out.to(x.dtype if x.is_floating_point() else torch.float64)


def _check_values(out, num):
    """ConfigError unless f's values `out` are real, one per draw: shape (num,)."""
    if out.is_complex():
        raise ConfigError(f"f returned complex values (dtype {out.dtype}); E[f] is estimated for real f: take "
                          f"the real and imaginary parts as two expectations (f = lambda x: g(x).real, then .imag)")
    if tuple(out.shape) != (num,):
        hint = (": f returned a scalar; return the per-draw values, bbvi averages them" if out.dim() == 0 else "")
        raise ConfigError(f"f must return one value per draw, shape ({num},); got {tuple(out.shape)}{hint}")


def _leaves(t):
    """The leaf tensors requiring grad that t depends on, in graph order (for the CV baseline's per-draw
    scores, which need the parameters themselves)."""
    seen, out, stack = set(), [], [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            out.append(var)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return out


@dataclasses.dataclass(frozen=True)
class _Shaped:
    """A per-draw baseline whose learning signal f - b is then standardised and/or clipped."""

    inner: object
    standardize: bool
    clip: object
    min_particles = property(lambda self: getattr(self.inner, "min_particles", 1))

    def init_state(self, device, dtype):
        return self.inner.init_state(device, dtype)

    def values(self, f, particles, elbo, state):
        b, state = self.inner.values(f, particles, elbo, state)
        a = f - b
        if self.standardize:
            a = a / f.std().clamp_min(1e-12)
        if self.clip is not None:
            a = a.clamp(-self.clip, self.clip)
        return f - a, state

    score_term = _PerParticle.score_term


def _piecewise_constant(values, x):
    """Why the pathwise gradient of f would be wrong though torch carries one, or None: f's derivative in x is
    zero at every draw while f's values differ (f is piecewise constant: floor, round, sign, a step written
    with arithmetic), so a pathwise estimate would be a confident zero. auto then takes the score path."""
    if not x.requires_grad or values.shape[0] < 2:
        return None
    try:
        (gx,) = torch.autograd.grad(values.sum(), x, retain_graph=True, allow_unused=True)
    except RuntimeError as e:  # e.g. "derivative for aten::heaviside is not implemented"
        return f"f has no derivative in x ({str(e).splitlines()[0]}): took the score path"
    if gx is None or bool((gx != 0).any()) or not bool((values.detach() != values.detach()[0]).any()):
        return None
    return ("f's derivative in x is zero at every draw while its values differ (piecewise constant): the "
            "pathwise gradient would be 0; took the score path")


def _resolve(baseline, num, standardize, clip, importance):
    bl = resolve_baseline(baseline) or NoBaseline()
    per_draw = callable(getattr(bl, "values", None))
    if (standardize or clip is not None or importance) and not per_draw:
        what = "importance sampling (proposal=)" if importance else "standardize/clip"
        raise ConfigError(f"baseline {baseline!r} is not a per-draw baseline b_s; {what} needs one of None, "
                          f"'ema', 'loo'")
    if standardize or clip is not None:
        bl = _Shaped(bl, bool(standardize), clip)
    need = getattr(bl, "min_particles", 1)
    if num < need:
        raise ConfigError(f"baseline={baseline!r} needs num_samples >= {need} (got {num})"
                          + (": each draw's baseline is the mean of the others" if need == 2 else ""))
    return bl


def _particles(values):
    """The record the baselines read, for num draws that are all valid."""
    n = values.shape[0]
    return Particles(values.new_zeros(n, 0), {}, values, torch.ones(n, dtype=torch.bool, device=values.device),
                     None, float(n), None, None)


def expectation(f, dist, *, num_samples, estimator="auto", baseline="loo", proposal=None, generator=None,
                standardize=False, clip=None, baseline_state=None, return_info=False):
    """Monte Carlo estimate of E_{x ~ dist}[f(x)] whose gradient (`.backward()`, `torch.autograd.grad`, to any
    order on the score path) estimates grad E[f] in the parameters of `dist`.

    f: (num_samples, *event) draws -> (num_samples,) values; on the score path any Python or numpy code.
    dist: a torch.distributions distribution whose parameters require grad; a pair (bbvi family, its params
    dict), e.g. (bbvi.MeanField(), {"loc": ..., "log_scale": ...}); or any object with `draw(num, generator)`
    and `log_prob(x)` (e.g. a policy's distribution over whole episodes). estimator: 'score' | 'pathwise' |
    'arm' | 'disarm' (antithetic pairs for a Bernoulli dist, num_samples even: first derivatives; antithetic.py) |
    'auto' (pathwise where dist has rsample and f returns a tensor with gradient in x, score otherwise,
    and score where f's derivative in x is zero at every draw while f varies: a step, floor or sign whose
    pathwise gradient is zero almost everywhere; info['note'] says so). A payoff with a jump that torch
    differentiates as smooth pieces (max(S - K, 0) is fine; a smooth function plus a jump is not) cannot be
    told apart: ask for estimator='score' there. baseline:
    the baselines of `bbvi.fit`'s score terms, through the same code: None | 'loo' (leave-one-out over the
    draws) | 'ema' (moving average of past calls' estimates: pass `baseline_state` back in, from
    info['baseline_state']) | 'cv' (per-parameter optimal scaling; first derivatives only) | a baseline object.
    proposal: a distribution, or a list of them, to draw from instead of dist (importance sampling,
    off-policy; several are combined by the balance heuristic, the draws split evenly). generator: a
    torch.Generator (default: a fresh one seeded 0). standardize: divide the learning signals by the sd of f
    (a biased but often steadier step, as in policy gradients); clip: clamp the signals to [-clip, clip].
    return_info: also return a dict with 'estimator' and 'baseline_state', and with proposals the importance
    weights' effective sample size 'ess' and PSIS 'khat'.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be a positive int, got {num_samples!r}")
    dist = _as_distribution(dist)
    if estimator not in ("auto", "score", "pathwise", "arm", "disarm"):
        raise ConfigError(f"estimator must be 'auto', 'score', 'pathwise', 'arm' or 'disarm', got {estimator!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or None "
                          f"(a fresh one seeded 0), got {type(generator).__name__} {generator!r:.60}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    if proposal is None:   # draws from dist itself
        _warn_if_degenerate(dist)
    if estimator in ("arm", "disarm"):
        value = _antithetic(estimator, f, dist, num_samples, generator, proposal)
        info = {"estimator": estimator, "baseline_state": baseline_state}
        return (value, info) if return_info else value
    if proposal is not None:
        value, info = _importance(f, dist, proposal, num_samples, generator, baseline, standardize, clip,
                                  baseline_state)
        info["estimator"] = "score (importance sampled)"
        return (value, info) if return_info else value
    note = None
    if estimator in ("auto", "pathwise"):
        if not getattr(dist, "has_rsample", False):
            if estimator == "pathwise":
                raise ConfigError(f"estimator='pathwise' needs a reparameterizable distribution; "
                                  f"{type(dist).__name__} has none: use 'score'")
        else:
            x = draw(dist, num_samples, generator, pathwise=True)
            try:
                values = f(x)
                differentiable = torch.is_tensor(values) and values.requires_grad
            except Exception as e:  # noqa: BLE001 - f is not torch code: score path, or say why not
                if estimator == "pathwise":
                    raise ConfigError(f"estimator='pathwise' needs f in torch; it raised "
                                      f"{type(e).__name__}: {e}") from e
                differentiable = False
            note = None
            if torch.is_tensor(values):
                _check_values(values, x.shape[0])
            if differentiable and estimator == "auto":
                note = _piecewise_constant(values, x)
                differentiable = note is None
            if differentiable:
                value = _values(lambda _: values, x).mean()
                info = {"estimator": "pathwise", "baseline_state": baseline_state}
                return (value, info) if return_info else value
            if estimator == "pathwise":
                raise ConfigError("estimator='pathwise' needs f differentiable in torch; f's value has no "
                                  "gradient: use 'score'")
    bl = _resolve(baseline, num_samples, standardize, clip, importance=False)
    x = draw(dist, num_samples, generator)
    with torch.no_grad():
        values = _values(f, x)
    logp = _log_prob(dist, x)
    state = bl.init_state(values.device, values.dtype) if baseline_state is None else baseline_state
    estimate = values.mean()
    # the score term, by the code fit's steps use (the baseline's score_term, in the DiCE form)
    leaves = _leaves(logp) if isinstance(bl, CV) else []
    carrier, state = bl.score_term(values, logp, leaves, _particles(values), estimate, state)
    value = with_gradient(estimate, carrier)
    info = {"estimator": "score", "baseline_state": state}
    if estimator == "auto" and getattr(dist, "has_rsample", False) and note is not None:
        info["note"] = note
    return (value, info) if return_info else value


def _warn_if_degenerate(dist):
    """A ReliabilityWarning where a discrete distribution whose probabilities carry a gradient puts probability
    exactly 0 or 1 on a value: its draws never show the other values, so no sampling estimator of the gradient
    (score, with or without a baseline) can see f there (d/dp E_Bernoulli(p)[f] = f(1) - f(0) at p = 1 needs f(0)):
    seen, d/dp E[3b] at p = 1 came out 0, exactly 3."""
    base = dist.base_dist if isinstance(dist, D.Independent) else dist
    if not isinstance(base, (D.Bernoulli, D.Categorical, D.OneHotCategorical)):
        return
    probs = base.probs
    if not probs.requires_grad:
        return
    with torch.no_grad():
        edge = (probs == 0) | (probs == 1)
    if bool(edge.any()):
        import warnings

        from ..errors import ReliabilityWarning
        where = tuple(int(i) for i in edge.nonzero()[0])
        at = f" at index {where}" if where else ""
        warnings.warn(f"bbvi.expectation: {type(base).__name__} probs are exactly {float(probs.detach()[where]):g}"
                      f"{at}: draws never show the other values, so the sampled gradient cannot see f there and "
                      f"is biased (at p = 1, d/dp E[f] = f(1) - f(0) needs f(0)); keep the probabilities off 0 and 1 "
                      f"(finite logits) or sum over the values exactly", ReliabilityWarning, stacklevel=3)


def _antithetic(kind, f, dist, num_samples, generator, proposal):
    """E[f] over a Bernoulli `dist` with the ARM / DisARM gradient (antithetic.py): num_samples / 2 pairs."""
    from . import antithetic
    base = dist.base_dist if isinstance(dist, D.Independent) else dist
    if not isinstance(base, D.Bernoulli):
        raise ConfigError(f"estimator={kind!r} is for Bernoulli distributions (or Independent of one); got "
                          f"{type(dist).__name__}: use 'score' or 'auto'")
    if proposal is not None:
        raise ConfigError(f"estimator={kind!r} draws its own antithetic pairs from dist; proposal= is for 'score'")
    if num_samples < 2 or num_samples % 2:
        raise ConfigError(f"estimator={kind!r} evaluates f at antithetic pairs: num_samples must be even and at "
                          f"least 2, got {num_samples}")
    logits = base.logits
    u, b, b_tilde = antithetic.pairs(logits, num_samples // 2, generator)
    with torch.no_grad():
        values = _values(f, torch.cat([b, b_tilde]))
    half = num_samples // 2
    g = antithetic.signal(kind, values[:half], values[half:], u, b, b_tilde, logits).mean(0)
    return with_gradient(values.mean(), antithetic.surrogate(g, logits))


def _proposal_log_prob(q, x):
    """(num,) log density of proposal q at x, -inf where x is outside q's support (torch's argument validation
    raises ValueError there; a mixture's other proposals may still cover those points)."""
    try:
        return _log_prob(q, x)
    except ValueError:
        if not isinstance(q, D.Distribution):
            raise
    inside = torch.as_tensor(q.support.check(x)).reshape(x.shape[0], -1).all(-1)
    out = torch.full((x.shape[0],), -math.inf, dtype=x.dtype if x.is_floating_point() else torch.float64,
                     device=x.device)
    if bool(inside.any()):
        out[inside] = _log_prob(q, x[inside]).to(out.dtype)
    return out


def _check_covers(dist, proposals, generator, num=256):
    """ConfigError when the proposals together do not cover the target's support: at a draw x from `dist` every
    proposal's log density is -inf or NaN (or torch's validation rejects x), so p(x) / q(x) is undefined there
    and the importance-sampling estimate silently leaves that region out. The `num` points come from a copy of
    `generator` (the estimate's draws are unchanged) for torch distributions and bbvi families; a user's
    distribution object (draw(num, generator): e.g. whole episodes) is not drawn from here."""
    if not isinstance(dist, (D.Distribution, FamilyDistribution)):
        return
    own = torch.Generator(device=generator.device)
    own.set_state(generator.get_state())
    try:
        with torch.no_grad():
            points = draw(dist, num, own)
    except ConfigError:  # a target torch has but `draw` cannot draw with a generator: nothing to check with
        return
    with torch.no_grad():
        covered = torch.zeros(num, dtype=torch.bool, device=points.device)
        for q in proposals:
            try:
                lq = _proposal_log_prob(q, points)
            except Exception:  # noqa: BLE001 - not a support question (a shape, a dtype): the estimate says it
                return
            covered |= (lq > -math.inf) & ~lq.isnan()
    if bool(covered.all()):
        return
    bad = points[~covered][0]
    example = bad.item() if bad.numel() == 1 else [round(v, 4) for v in bad.reshape(-1).tolist()[:6]]
    supports = ", ".join(str(getattr(q, "support", "?")) for q in proposals)
    raise ConfigError(f"the proposal does not cover the target's support: {int((~covered).sum())} of {num} draws "
                      f"from the target (e.g. x = {example}) have proposal density 0 (log density -inf; proposal "
                      f"support: {supports}; target support: {getattr(dist, 'support', '?')}), so the importance "
                      f"weights p/q are undefined there and the estimate would leave that part of the target out. "
                      f"Use a proposal whose support contains the target's (e.g. a Normal or Cauchy wider than the "
                      f"target), or add one to a list of proposals")


def _importance(f, dist, proposal, num_samples, generator, baseline, standardize, clip, baseline_state):
    """Draws from the proposals, weights w_s = p(x_s) / sum_j (n_j / n) q_j(x_s) (balance heuristic), and the
    weighted score term mean_s stop(w_s) B(log p(x_s)) (f_s - b_s): its derivatives are those of
    mean_s w_s (f_s - b_s), unbiased to every order for b_s independent of x_s."""
    proposals = list(proposal) if isinstance(proposal, (list, tuple)) else [proposal]
    proposals = [_as_distribution(q) for q in proposals]
    bl = _resolve(baseline, num_samples, standardize, clip, importance=True)
    sizes = [num_samples // len(proposals) + (j < num_samples % len(proposals)) for j in range(len(proposals))]
    used = [q for q, n in zip(proposals, sizes) if n > 0]
    _check_covers(dist, used, generator)
    xs = [draw(q, n, generator) for q, n in zip(proposals, sizes) if n > 0]
    x = torch.cat(xs)
    with torch.no_grad():
        values = _values(f, x)
        log_mix = torch.logsumexp(torch.stack([_proposal_log_prob(q, x) + math.log(n / num_samples)
                                               for q, n in zip(proposals, sizes) if n > 0]), 0)
    logp = _log_prob(dist, x)
    logw = logp.detach() - log_mix
    w = torch.exp(logw)
    estimate = (w * values).mean()
    state = bl.init_state(values.device, values.dtype) if baseline_state is None else baseline_state
    b, state = bl.values(values, _particles(values), estimate, state)
    value = with_gradient(estimate, (w * magic_box(logp) * (values - b)).mean())
    from ..diagnostics import psis
    lw = logw.double().cpu().numpy()
    # equal weights (the proposal is the target): no tail to fit, the estimate is the plain Monte Carlo one
    khat = psis(lw)[1] if lw.max() - lw.min() > 1e-12 else 0.0
    wn = torch.softmax(logw.double(), 0)
    return value, {"ess": float(1.0 / (wn ** 2).sum()), "khat": float(khat), "baseline_state": state}
