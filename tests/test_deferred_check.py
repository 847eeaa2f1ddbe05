"""bbvi.fit's step first runs without the particles' finiteness check (a host read per step) and redoes a step whose
estimate or gradient is not finite with it (fit.step, estimate(checked=...)). That must change nothing: each case
here runs the same fit with the check deferred (the default) and with the check forced on at every step, and asserts
the same ELBO trace, parameters, counters and messages, bit for bit. The cases include those a review found
(a value that overflows while every particle is finite and some gradients are NaN; a backward that raises only
without the check; a user's continuous path that reads the particles' validity; a user's baseline that keeps its
state in place)."""
import dataclasses
import math

import pytest
import torch
from torch.distributions import Normal

import bbvi
from bbvi.estimators.plan import Plan, defers_check

STEPS = 40


def _nan_above(z, data):   # NaN for mu > 0.3
    mu = z["mu"]
    return Normal(1.0, 1.0).log_prob(mu) + 0 * torch.log(0.3 - mu)


def _inf_above(z, data):   # -inf for mu >= 0.3: the score path floors these
    mu = z["mu"]
    return torch.where(mu < 0.3, Normal(1.0, 1.0).log_prob(mu), torch.full_like(mu, -math.inf))


def _overflow(z, data):   # float32: every particle finite, their mean -inf; NaN gradient for mu > 0 (where/sqrt)
    mu = z["mu"]
    return -1e38 + Normal(0.0, 1.0).log_prob(mu) + torch.where(mu < 0, torch.zeros_like(mu), torch.sqrt(mu))


class _Picky(torch.autograd.Function):
    """The identity, whose backward raises where its input is NaN and its gradient is not zero (so only where a
    NaN particle is not masked)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        if bool(((g != 0) & torch.isnan(x)).any()):
            raise ValueError("backward at a NaN input")
        return g


def _picky(z, data):
    return _Picky.apply(_nan_above(z, data))


@dataclasses.dataclass(frozen=True)
class _IWPath:
    """A user's pathwise path: an importance-weighted bound over the valid particles."""
    name = "iw"
    pathwise = True

    def alone(self, p, family, params):
        lq = family.log_prob({k: v.detach() for k, v in params.items()}, p.u)
        w = torch.where(p.valid, p.log_p - lq, torch.full_like(lq, -math.inf))
        return torch.logsumexp(w, 0) - math.log(p.num)


@dataclasses.dataclass(frozen=True)
class _IW:
    def plan(self, model, report, num_particles):
        return Plan(_IWPath(), None, False)


@dataclasses.dataclass(frozen=True)
class _InPlaceEMA:
    """A user's baseline that updates its state in place (a running mean of the ELBO)."""
    min_particles = 1

    def init_state(self, device, dtype):
        return {"v": torch.zeros((), device=device, dtype=dtype)}

    def score_term(self, f, score_logq, score_params, particles, elbo, state):
        b = state["v"].clone()
        state["v"].mul_(0.9).add_(0.1 * elbo)
        return particles.average((f - b) * torch.exp(score_logq - score_logq.detach())), state


CASES = {
    "nan/score-loo": (_nan_above, "score", "loo", torch.float64),
    "nan/score-ema/float32": (_nan_above, "score", "ema", torch.float32),
    "nan/reparam": (_nan_above, "reparam", "default", torch.float64),
    "nan/stl": (_nan_above, "stl", "default", torch.float64),
    "inf/score-none": (_inf_above, "score", None, torch.float64),
    "overflow/reparam/float32": (_overflow, "reparam", "default", torch.float32),
    "picky-backward/reparam": (_picky, "reparam", "default", torch.float64),
    "user-path/iw": (_inf_above, _IW(), "default", torch.float64),
    "user-baseline/in-place": (_nan_above, "score", _InPlaceEMA(), torch.float64),
}


def _run(make_lj, estimator, baseline, dtype, force_check):
    model = bbvi.Model(make_lj, {"mu": bbvi.Latent()}, name="deferred")
    state = bbvi.init(model, "meanfield", estimator, baseline, num_particles=8, lr=0.05, schedule=None,
                      steps=STEPS, seed=0, init_strategy="zero", dtype=dtype)
    if force_check:
        state.check_until = 10 ** 9
    for _ in range(STEPS):
        bbvi.step(state)
    return state


@pytest.mark.parametrize("case", list(CASES))
def test_deferring_the_check_changes_nothing(case):
    a, b = (_run(*CASES[case], force_check=f) for f in (False, True))
    ea, eb = torch.stack(a.elbo), torch.stack(b.elbo)
    assert torch.equal(torch.isnan(ea), torch.isnan(eb)) and torch.equal(ea[~torch.isnan(ea)], eb[~torch.isnan(eb)])
    for name, t in a.params["continuous"].items():
        assert torch.equal(t, b.params["continuous"][name]), name
    for field in ("num_bad_particles", "num_failed_steps", "num_raised_steps", "num_rescaled_steps", "last_failure",
                  "last_exception"):
        assert getattr(a, field) == getattr(b, field), field


def test_the_cases_are_not_trivial():
    """The deferred runs really meet non-finite particles and failed or raising steps (else they test nothing)."""
    nan = _run(*CASES["nan/score-loo"], force_check=False)
    assert nan.num_bad_particles > 0 and nan.check_until > 0
    over = _run(*CASES["overflow/reparam/float32"], force_check=False)
    # every step fails on its value (the mean overflows); no particle is dropped: the pathwise guard, which would
    # count the NaN-gradient rows, runs only for a finite estimate whose gradient is not
    assert over.num_failed_steps == STEPS and over.num_bad_particles == 0
    assert not defers_check(_IW().plan(None, None, 8))
    assert not defers_check(Plan(None, _InPlaceEMA(), True))
