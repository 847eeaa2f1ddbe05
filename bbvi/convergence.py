"""When to cut the step size and when to stop: the rules of `bbvi.fit`'s loop.

`Adaptive` (steps=None, the default) follows the stationarity-then-average scheme of Dhaka et al. (2020,
"Robust, accurate stochastic optimization for variational inference") and Welandawe, Andersen, Vehtari and
Huggins (2024, "A framework for improving the reliability of black-box variational inference", RAABBVI):

    run at a fixed learning rate lr_k in windows of `window` steps;
    the level is stationary when R-hat of the iterates of its second half, split into 4 segments, is below
    `rhat` for every coordinate of q's marginals (each mean and log sd), or when it has run `max_level_steps`;
    its estimate qbar_k is the average of the parameter iterates of that second half (iterate averaging: the
    reported q is not the last noisy iterate);
    stop ("converged") when qbar_k differs from qbar_{k-1} (the start, for k = 0) by less than `tol` in q's own
    units: max_i |mean_k,i - mean_{k-1},i| / sd_k,i and max_i |log sd_k,i - log sd_{k-1},i| (discrete factors:
    max |change of a probability| < tol / 2), and either the level was stationary or the previous change was
    below `tol` too (at small step sizes the iterates' autocorrelation outgrows any fixed window, so R-hat stays
    above its bound; two small changes in a row, each over a level long enough for Adam to move far, say the
    same: the average has stopped moving);
    otherwise restart from qbar_k with lr_{k+1} = lr_k * `decay`.
    A window whose median ELBO estimate falls more than 1 + 3 standard errors below the best level's (the first
    window's, at first) means the step size diverges: back to the best average, Adam's moments reset, lr cut by
    decay^2, the reference measured again (at most MAX_RESTARTS times).

The rule stops at `max_steps` otherwise (status "max_steps"), reporting the average of the last level. Its tracker's
`estimate()` forecasts how many steps the fit will run, for the progress bar and log lines (display only).
Cost is counted in steps; every step evaluates the log-joint (and its gradient) at num_particles points.

`RelativeTolerance` (Stan ADVI's test, `tol_rel_obj`, for fixed-step fits) and `q_settled` are in
relative_tolerance.py, re-exported here.
"""
import dataclasses
import math

import torch

from .errors import ConfigError
from .relative_tolerance import RelativeTolerance, q_settled  # noqa: F401  (re-exported)

__all__ = ["Adaptive", "RelativeTolerance"]

MAX_RESTARTS = 4


def _flat(params):
    return torch.cat([t.detach().reshape(-1) for g in params.values() for t in g.values()])


def _unflat(params, flat):
    i = 0
    with torch.no_grad():
        for g in params.values():
            for t in g.values():
                t.copy_(flat[i:i + t.numel()].reshape(t.shape))
                i += t.numel()


def split_rhat(x, chains=4):
    """R-hat (Gelman et al. 2013) of x (n, C) split into `chains` consecutive segments, per coordinate (C,);
    coordinates that do not move at all get 1."""
    if x.numel() == 0:  # no coordinates (a model with discrete latents only has no continuous summaries)
        return x.new_ones(x.shape[1:])
    n = x.shape[0] // chains
    seg = x[-n * chains:].reshape(chains, n, -1)
    within = seg.var(1).mean(0)
    between = n * seg.mean(1).var(0)
    var = (n - 1) / n * within + between / n
    r = torch.sqrt(var / within.clamp_min(1e-300))
    return torch.where(within > 0, r, torch.ones_like(r))


@dataclasses.dataclass(frozen=True)
class Adaptive:
    """The default step-size, averaging and stopping rule (see the module docstring). lr: the first level's
    learning rate (Adam; the MAP start makes it posterior-sd units); decay: factor between levels."""

    lr: float = 0.05
    decay: float = 0.5
    window: int = 50
    min_level_steps: int = 200
    max_level_steps: int = 2000
    rhat: float = 1.1
    tol: float = 0.05
    max_steps: int = 20000

    def __post_init__(self):
        for name in ("lr", "tol", "rhat"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"Adaptive {name} must be a positive number, got {v!r}")
        if not 0 < self.decay < 1:
            raise ConfigError(f"Adaptive decay must be in (0, 1), got {self.decay!r}")
        for name in ("window", "min_level_steps", "max_level_steps", "max_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"Adaptive {name} must be a positive int, got {v!r}")

    def tracker(self, state):
        return _Tracker(self, state)


class _Tracker:
    """The running state of `Adaptive` for one fit: levels, iterates, averages. `state_dict` holds it all, so a
    checkpoint resumes it exactly."""

    def __init__(self, rule, state):
        self.rule = rule
        self.level = 0
        self.level_start = state.step
        self.summaries = []          # (C,) marginal summaries of q at every step of this level
        self.window_sums = []        # flat parameter sums, one per window of this level
        self.previous = _summary(state)  # summary of the last level's average (the start for level 0)
        self.previous_probs = _probs(state)
        self.converged = False
        self.last_change = float("nan")
        self.history = []            # one dict per finished level
        self.best = _flat(state.params).clone()   # the start, then every finished level's average
        self.ref_elbo, self.ref_se = float("nan"), 0.0   # the ELBO a window must not fall far below
        self.restarts = 0
        self._forecast = (None, 0)   # (the level and window it was made at, the steps it expects in all)

    def factor(self, t):
        return self.rule.decay ** self.level

    @property
    def lr(self):
        return self.rule.lr * self.factor(0)

    def observe(self, state):
        """Call after every step. True when the fit should stop (converged or max_steps)."""
        rule = self.rule
        self.summaries.append(_summary(state))
        n = state.step - self.level_start
        flat = _flat(state.params)
        if n % rule.window == 1 or rule.window == 1:
            self.window_sums.append(flat.clone())
        else:
            self.window_sums[-1] += flat
        if state.step >= rule.max_steps:
            self._finish_level(state, final=True)
            return True
        if n % rule.window:
            return False
        mean, se = _window_elbo(state.elbo[-rule.window:])
        if math.isnan(self.ref_elbo):
            self.ref_elbo, self.ref_se = mean, se
        elif not mean >= self.ref_elbo - 1.0 - 3.0 * self.ref_se and self.restarts < MAX_RESTARTS:
            self._restart(state)
            return False
        if n < rule.min_level_steps:
            return False
        x = torch.stack(self.summaries[len(self.summaries) // 2:])
        stationary = bool((split_rhat(x) < rule.rhat).all()) if x.shape[0] >= 8 else False
        if not stationary and n < rule.max_level_steps:
            return False
        small_before = self.last_change < rule.tol
        change = self._finish_level(state, final=False, stationary=stationary)
        if change < rule.tol and (stationary or small_before):
            self.converged = True
            return True
        self.best = self.history[-1]["average"]
        self.ref_elbo, self.ref_se = max((_window_elbo(state.elbo[-(n // 2):]), (self.ref_elbo, self.ref_se)))
        self._next_level(state, 1)
        return False

    def estimate(self):
        """About how many steps the fit will run in all, for a progress display (it changes nothing the rule does):
        the steps so far, plus what this level is expected to run, plus the levels expected after it; at most
        `max_steps`. Made anew at every window (the same steps of the same fit give the same estimate) from the
        rule's own state:

        - this level's length: before `min_level_steps` 1.5 x the last finished level's (a smaller step size
          settles more slowly; seen: 0.7 to 3.3 x, mostly 1.6 to 1.9 x), or 2 x `min_level_steps` for the first;
          after it, from the R-hat the rule tests, whose excess over 1 falls about as 1 / n^2 within a level
          (seen on the defaults test models and posteriordb's kidiq and eight schools): the level ends near
          n * sqrt((R-hat - 1) / (rhat - 1)), rounded up to a window, at most `max_level_steps` (a level
          that long is expected not to be stationary); the median of what this window's R-hat and the two
          windows' before imply, as one reading jumps (seen on dogs: 1.9, 3.4, 1.5 x rhat - 1 at three windows in
          a row, and the estimate with it from 1950 to 4400 and back, where the fit ran 1700);
        - the change its average will show: that of the mean of q's summaries over its second half so far (for
          a model without continuous latents: large for the first level, small after);
        - the levels after it, each 1.5 x as long as the one before: none where the stop is expected at this
          level's end (a small change, and the level stationary or the last change small too), one where it is
          expected at the next level's end (the change after the first level is small), else two.

        None (no estimate yet) in the first level's first 2 x `min_level_steps`: before `min_level_steps` the rule
        has tested no R-hat and an estimate would be a prior (400 + 600 = 1000 at the defaults, 2.2 x the steps of a
        450-step fit), and R-hat over the first 100-200 iterates is noisy (seen: 1900 at step 200 of a fit that ran
        500)."""
        rule, n = self.rule, len(self.summaries)
        step = self.level_start + n
        if self.converged:
            return step
        if n < 2 * rule.min_level_steps and not any(not h["restarted"] for h in self.history):
            return None
        key = (self.level_start, n // rule.window)
        if self._forecast[0] != key:
            self._forecast = (key, self._expect(n))
        return max(min(self._forecast[1], rule.max_steps), step)

    def _expect(self, n):
        rule, window = self.rule, self.rule.window

        def level(steps, at_least=0):   # a level's length: whole windows, within the rule's bounds
            steps = max(steps, at_least + window, rule.min_level_steps)
            return min(window * math.ceil(steps / window), rule.max_level_steps)
        done = [h["steps"] for h in self.history if not h["restarted"]]
        length = 1.5 * done[-1] if done else 2 * rule.min_level_steps
        change = float("nan")
        if n >= 16 and self.previous.numel():
            x = torch.stack(self.summaries[n // 2:])
            ends = []   # the level's end as R-hat at this window and the two before imply it: their median
            for m in (n, n - window, n - 2 * window):
                if m >= rule.min_level_steps:
                    excess = split_rhat(torch.stack(self.summaries[m // 2:m])).max().item() - 1
                    if math.isfinite(excess):
                        ends.append(m * max(excess / (rule.rhat - 1), 0.0) ** 0.5)
            if ends:
                length = sorted(ends)[len(ends) // 2]
            now, d = x.mean(0), x.shape[1] // 2
            if d:
                change = max((now[:d] - self.previous[:d]).abs().div(now[d:].exp()).max().item(),
                             (now[d:] - self.previous[d:]).abs().max().item())
        length = level(length, n)
        following = level(1.5 * length)
        small = change < rule.tol if not math.isnan(change) else bool(done)
        if small and (length < rule.max_level_steps or self.last_change < rule.tol):
            after = 0
        elif small or following < rule.max_level_steps:
            after = 1
        else:
            after = 2
        return self.level_start + length + after * following

    def _next_level(self, state, levels):
        self.level += levels
        self.level_start = state.step
        self.summaries, self.window_sums = [], []

    def _restart(self, state):
        """The ELBO fell far below the best so far (a diverging step size, seen with the score path and full
        rank): back to the best average, Adam's moments forgotten, the step size cut twice."""
        _unflat(state.params, self.best)
        state.optimizer.state.clear()
        self.history.append({"level": self.level, "lr": self.lr, "steps": state.step - self.level_start,
                             "stationary": False, "change": float("nan"), "restarted": True,
                             "average": self.best.clone()})
        self.previous, self.previous_probs, self.last_change = _summary(state), _probs(state), float("nan")
        self.ref_elbo, self.restarts = float("nan"), self.restarts + 1   # measured again after the restart
        self._next_level(state, 2)

    def _average(self, steps):
        complete = self.window_sums[:steps // self.rule.window]   # a final partial window is left out
        half = complete[len(complete) // 2:]
        return torch.stack(half).sum(0) / (self.rule.window * len(half))

    def _finish_level(self, state, final, stationary=False):
        """Set params to the level's iterate average; record and return its change from the previous level."""
        if not self.window_sums:
            return float("nan")
        if final and state.step - self.level_start < self.rule.window * 2:
            if self.history:  # too short to average: the last finished level's average stands
                _unflat(state.params, self.history[-1]["average"])
            return float("nan")
        _unflat(state.params, self._average(state.step - self.level_start))
        now, probs = _summary(state), _probs(state)
        d = now.shape[0] // 2
        change = 0.0
        if d:
            sd = now[d:].exp()
            change = max((now[:d] - self.previous[:d]).abs().div(sd).max().item(),
                         (now[d:] - self.previous[d:]).abs().max().item())
        if probs is not None:
            change = max(change, 2 * (probs - self.previous_probs).abs().max().item())
        self.history.append({"level": self.level, "lr": self.lr, "steps": state.step - self.level_start,
                             "stationary": stationary, "change": change, "restarted": False,
                             "average": _flat(state.params)})
        self.previous, self.previous_probs, self.last_change = now, probs, change
        return change

    def snapshot(self):
        """What `observe` may change, kept cheaply (lists by length: observe only appends to them or replaces
        them; the last window sum, which it adds to in place, by a copy): `restore` puts it back."""
        kept = dict(vars(self))
        kept["_lengths"] = (len(self.summaries), len(self.window_sums), len(self.history))
        kept["_last_sum"] = self.window_sums[-1].clone() if self.window_sums else None
        return kept

    def restore(self, kept):
        """Undo everything `observe` did since `snapshot` (an interrupted step)."""
        kept = dict(kept)
        n_summaries, n_sums, n_history = kept.pop("_lengths")
        last_sum = kept.pop("_last_sum")
        vars(self).update(kept)
        del self.summaries[n_summaries:], self.window_sums[n_sums:], self.history[n_history:]
        if last_sum is not None:
            self.window_sums[-1].copy_(last_sum)

    def reopen(self, state, *, next_rate):
        """Let a fit that stopped (converged, or at max_steps) run on when a resume raises max_steps: a new
        level from the current (averaged) q, at the next learning rate (`next_rate`, after convergence) or the
        same one (after the cap, whose level did not settle)."""
        self.converged = False
        if self.history:
            self.best = self.history[-1]["average"]
        self._next_level(state, 1 if next_rate else 0)

    def report(self):
        return [{k: v for k, v in h.items() if k != "average"} for h in self.history]

    def state_dict(self):
        return {"level": self.level, "level_start": self.level_start,
                "summaries": torch.stack(self.summaries) if self.summaries else torch.zeros(0),
                "window_sums": torch.stack(self.window_sums) if self.window_sums else torch.zeros(0),
                "previous": self.previous,
                "previous_probs": self.previous_probs if self.previous_probs is not None else torch.zeros(0),
                "converged": self.converged, "last_change": self.last_change, "best": self.best,
                "ref": torch.tensor([self.ref_elbo, self.ref_se]), "restarts": self.restarts,
                "history": [{k: (v if torch.is_tensor(v) else torch.tensor(float(v))) for k, v in h.items()}
                            for h in self.history]}

    def load_state_dict(self, sd, device):
        self.level, self.level_start = int(sd["level"]), int(sd["level_start"])
        self.summaries = [t.to(device) for t in sd["summaries"]]
        self.window_sums = [t.to(device) for t in sd["window_sums"]]
        self.previous = sd["previous"].to(device)
        self.previous_probs = sd["previous_probs"].to(device) if sd["previous_probs"].numel() else None
        self.converged, self.last_change = bool(sd["converged"]), float(sd["last_change"])
        self.best = sd["best"].to(device)
        self.ref_elbo, self.ref_se = (float(v) for v in sd["ref"])
        self.restarts = int(sd["restarts"])
        self.history = [{"level": int(h["level"]), "lr": float(h["lr"]), "steps": int(h["steps"]),
                         "stationary": bool(h["stationary"]), "change": float(h["change"]),
                         "restarted": bool(h["restarted"]), "average": h["average"].to(device)} for h in sd["history"]]


def _window_elbo(elbo):
    """(median, its standard error from the interquartile range) of the finite per-step ELBO estimates in
    `elbo` (a list of 0-dim tensors): robust to the heavy tails of score-path estimates."""
    w = torch.stack(elbo)
    w = w[torch.isfinite(w)]
    if w.numel() < 4:
        return float("-inf"), 0.0
    q1, med, q3 = torch.quantile(w.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return med, 1.253 * (q3 - q1) / 1.349 / w.numel() ** 0.5


def _summary(state):
    """(2D,) q's marginal means and log sds on the unconstrained scale (empty without continuous latents)."""
    pc = state.params["continuous"]
    if not pc:
        return torch.zeros(0)
    with torch.no_grad():
        cheap = getattr(state.family, "summary_moments", None)  # a family whose moments are Monte Carlo (a flow)
        mean, sd = cheap(pc) if cheap is not None else (state.family.mean(pc), state.family.marginal_sd(pc))
        return torch.cat([mean, sd.log()])


def _probs(state):
    pd = state.params["discrete"]
    if not pd:
        return None
    with torch.no_grad():
        return torch.cat([p.reshape(-1) for p in state.discrete.probs(pd).values()])

