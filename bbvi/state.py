"""FitState: what a fit carries from one step to the next, and how it saves, restores and undoes itself.

Its fields are of three kinds:
- the fit's fixed parts, made once by `init` (model, family, plan, optimizer's settings, the data's shard, ...);
- what a step changes: the parameters and the optimizer's state (tensors), the generator, the step count, the
  estimator's state (`baseline_state`), the data's state (`order`, `anchor`), the adaptive rule's state
  (`tracker`) and the record of every step (`record`: the ELBO trace and the fault counters, bbvi.record);
- speed flags that change no result (`guard_until`, `check_until`, `compiled`).

`state_dict` / `load_state_dict` write and read what a step changes (a checkpoint's contents, in the flat format
checkpoints have always had), `rank_state_dict` the part that differs from rank to rank on a data-parallel fit,
and `snapshot` / `restore` the small parts a step changes (Ctrl-C undo: bbvi.checkpoint.Keeper keeps the tensors).
A new carried part is added to these four methods here, and checkpoints, resume, undo and ranks inherit it."""
import dataclasses

import torch

from .record import Record

__all__ = ["FitState"]


@dataclasses.dataclass
class FitState:
    """Everything that carries from one step to the next."""

    model: object
    family: object
    discrete: object
    plan: object
    report: object
    params: dict
    optimizer: torch.optim.Optimizer
    lr: float
    schedule: object
    generator: torch.Generator
    baseline_state: dict
    num_particles: int
    clip_grad: object
    record: Record
    step: int = 0
    start: object = None
    tracker: object = None
    structure: object = None
    data: object = None                  # the data a step sees (bbvi.data_view.DataView: full, a shard, minibatches)
    order: dict = dataclasses.field(default_factory=dict)   # the minibatches' permutations and positions
    comm: object = None                  # the ranks of a data-parallel fit (bbvi.distributed), else None
    guards: tuple = ()                   # what the gradient passes through after the backward (bbvi.update)
    guard_until: int = 0                 # steps before this one run with the pathwise guard on (`step`): speed only
    check_until: int = 0                 # steps before this one check the particles first (`step`): speed only
    anchor: object = False               # minibatch control variates: False (off), None (to compute) or an Anchor
    compiled: object = None              # compile=True: the CompiledStep that runs in place of `step`'s update
    stop: bool = False                   # the adaptive rule says the fit is done (set by `step`)
    algorithm: object = None             # method='auto': the algorithm it chose (bbvi.algorithms.auto), and why
    why: str = ""
    cap: object = None                   # the steps an algorithm of a fixed length runs (bbvi.algorithms.bam)

    @property
    def batch(self):
        """{plate: B} on minibatch fits (bbvi.subsample), else None."""
        return self.data.batch

    def leaves(self):
        return list(self.params["continuous"].values()) + list(self.params["discrete"].values())

    def _device(self):
        return next(iter(self.leaves())).device

    # ---- the record, read as the state's own attributes (callbacks read state.elbo, state.num_failed_steps) ----
    elbo = property(lambda self: self.record.elbo)
    num_failed_steps = property(lambda self: self.record.num_failed_steps)
    num_rescaled_steps = property(lambda self: self.record.num_rescaled_steps)
    consecutive_failures = property(lambda self: self.record.consecutive_failures)
    last_failure = property(lambda self: self.record.last_failure)
    num_bad_particles = property(lambda self: self.record.num_bad_particles)
    num_raised_steps = property(lambda self: self.record.num_raised_steps)
    last_exception = property(lambda self: self.record.last_exception)

    # ---- saving and loading --------------------------------------------------------------------------------------
    def rank_state_dict(self):
        """What each rank of a data-parallel fit holds of its own: its generator, baseline state and data order."""
        return {"generator": self.generator.get_state().cpu(),
                "baseline_state": {k: v.detach().cpu() for k, v in self.baseline_state.items()},
                "order": {k: v.detach().cpu() for k, v in self.order.items()}}

    def load_rank_state_dict(self, own):
        device = self._device()
        self.generator.set_state(own["generator"].to(self.generator.get_state().device))
        self.baseline_state = {k: v.to(device) for k, v in own["baseline_state"].items()}
        self.order = {k: v if k.startswith("pos/") else v.to(device) for k, v in own.get("order", {}).items()}
        if self.anchor is not False:   # the control variates' sums at the saved anchor point: computed again
            self.anchor = None

    def state_dict(self):
        """What a step changes, on the CPU: rank 0's own part on a data-parallel fit."""
        return {"params": {g: {k: t.detach().cpu() for k, t in grp.items()} for g, grp in self.params.items()},
                "optimizer": self.optimizer.state_dict(), "step": self.step, **self.record.state_dict(),
                "tracker": self.tracker.state_dict() if self.tracker is not None else {},
                **self.rank_state_dict()}

    def load_state_dict(self, d):
        with torch.no_grad():
            for g, grp in self.params.items():
                for k, t in grp.items():
                    t.copy_(d["params"][g][k])
        self.optimizer.load_state_dict(d["optimizer"])
        self.load_rank_state_dict(d)
        device = self._device()
        self.record.load_state_dict(d, device)
        self.step = d["step"]
        if self.tracker is not None:
            self.tracker.load_state_dict(d["tracker"], device)

    # ---- undo (the tensors are kept by checkpoint.Keeper, in buffers reused from step to step) ------------------
    def snapshot(self):
        """What a step (and the adaptive rule's look at it) changes besides the parameters and the optimizer's
        tensors."""
        return (self.generator.get_state(), self.step, self.baseline_state, self.order, self.anchor, self.stop,
                self.record.snapshot(), self.tracker.snapshot() if self.tracker is not None else None)

    def restore(self, snap):
        generator, self.step, self.baseline_state, self.order, self.anchor, self.stop, record, tracker = snap
        self.generator.set_state(generator)
        self.record.restore(record)
        if tracker is not None:
            self.tracker.restore(tracker)
