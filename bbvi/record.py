"""What one step reports (`Info`) and what a fit keeps of every step (`Record`: the ELBO trace and the fault
counters). The eager step and the compiled one both end in `Record.add(info)`; checkpoints, Ctrl-C undo and the
Result read the record through `state_dict` / `snapshot` instead of listing its fields."""
import dataclasses

import torch

__all__ = ["Info", "Record"]


@dataclasses.dataclass
class Info:
    """One step: its ELBO estimate (0-dim, NaN when it was not finite), whether the update was made (`ok`), whether
    its gradient was scaled down to keep the optimizer's statistics finite (`rescaled`), the particles left out for
    a NaN/inf log-joint (`num_bad`: a tensor, an int or None), whether the log-joint raised (`raised`: counted),
    the text of what raised in the log-joint or its gradient (`exception`), and why the step was skipped
    (`failure`, '' when ok)."""

    elbo: torch.Tensor
    ok: bool
    rescaled: bool = False
    num_bad: object = None
    raised: bool = False
    exception: str = ""
    failure: str = ""


# The counters a checkpoint holds, in its flat format (every key at the top level of the file).
_COUNTERS = ("num_failed_steps", "num_rescaled_steps", "consecutive_failures", "num_raised_steps", "last_exception")


@dataclasses.dataclass
class Record:
    """The ELBO estimate of every step and the fault counters. `num_bad_particles` stays a tensor on the fit's
    device (adding to it needs no host read); `last_failure` says why the last skipped step was skipped."""

    num_bad_particles: object
    elbo: list = dataclasses.field(default_factory=list)
    num_failed_steps: int = 0
    num_rescaled_steps: int = 0
    consecutive_failures: int = 0
    last_failure: str = ""
    num_raised_steps: int = 0
    last_exception: str = ""

    def add(self, info):
        if info.raised:
            self.num_raised_steps += 1
        if info.exception:
            self.last_exception = info.exception
        if info.rescaled:
            self.num_rescaled_steps += 1
        if info.num_bad is not None:
            self.num_bad_particles = self.num_bad_particles + info.num_bad
        if info.ok:
            self.consecutive_failures = 0
        else:
            self.num_failed_steps += 1
            self.consecutive_failures += 1
            self.last_failure = info.failure
        self.elbo.append(info.elbo)

    def state_dict(self):
        return {"elbo": torch.stack(self.elbo).cpu() if self.elbo else torch.zeros(0),
                **{k: getattr(self, k) for k in _COUNTERS}, "num_bad_particles": int(self.num_bad_particles)}

    def load_state_dict(self, d, device):
        self.elbo = [e.to(device) for e in d["elbo"]]
        for k in _COUNTERS:
            setattr(self, k, d[k])
        self.num_bad_particles = torch.tensor(d["num_bad_particles"], dtype=torch.int64, device=device)

    def snapshot(self):
        """What a step changes here, to put back with `restore` (a step cut short by Ctrl-C): the counters and the
        trace's length."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "elbo"}, len(self.elbo)

    def restore(self, snap):
        fields, length = snap
        for k, v in fields.items():
            setattr(self, k, v)
        del self.elbo[length:]

    def result_fields(self):
        """The Result's copy: the trace as one tensor on the CPU and the counters."""
        return {"elbo": torch.stack(self.elbo).cpu() if self.elbo else torch.zeros(0),
                "num_failed_steps": self.num_failed_steps, "num_bad_particles": int(self.num_bad_particles),
                "num_rescaled_steps": self.num_rescaled_steps, "num_raised_steps": self.num_raised_steps,
                "last_exception": self.last_exception}
