"""The data a step sees: one seam, `DataView`, that the stochastic-gradient step and `Result.gradient_samples` both
call.

A view is the model on the rows it holds, its Rao-Blackwellization structure on those rows, the factors' sizes, and
optionally a minibatch size per plate:
- the full data: the model as it is;
- a data-parallel rank (`sharded`): the model on this rank's block of every plate's rows, each plate's factor scaled
  by the number of ranks (bbvi.distributed.shard);
- minibatches (`batch`, on the full data or on a rank's shard): each step B rows of every plate, their factors
  scaled by N / B, with control variates where on (bbvi.subsample).

`for_step` gives one step's model and structure and the data's new state (the minibatches' order, the control
variates' anchor), which the FitState carries (`order`, `anchor`) and checkpoints."""
import dataclasses

import torch

from .distributed import shard
from .subsample import minibatch, structure_rows

__all__ = ["DataView"]


@dataclasses.dataclass(frozen=True)
class DataView:
    model: object
    structure: object = None   # the Rao-Blackwellization structure on these rows, or None
    factors: tuple = ()         # ((factor name, number of term elements), ...) on these rows
    batch: dict = None          # {plate: B}: B rows of each plate per step (bbvi.subsample), or None: every row

    def sharded(self, comm):
        """The view on this rank's rows of every plate (its minibatch sizes capped at them)."""
        part, rows, batch = shard(self.model, self.batch, comm)
        factors = self.factors and tuple((name, rows[name][1] if name in rows else n) for name, n in self.factors)
        structure = self.structure
        if structure is not None:
            idx = {p: torch.arange(first, first + n) for p, (first, n) in rows.items()}
            structure = structure.select(structure_rows(self.factors, idx, structure.continuous.shape[0]))
        return DataView(part, structure, factors, batch)

    def for_step(self, order, anchor, generator, mean):
        """(model, structure, order, anchor) for one step: on minibatches the next one's rows (drawn with
        `generator`; a new control-variate anchor at `mean()`, q's unconstrained mean, when an epoch starts), else
        the view's own, the order and anchor unchanged."""
        if self.batch is None:
            return self.model, self.structure, order, anchor
        model, idx, order, anchor = minibatch(self.model, self.batch, order, generator, anchor, mean)
        structure = self.structure
        if structure is not None:
            structure = structure.select(structure_rows(self.factors, idx, structure.continuous.shape[0]))
        return model, structure, order, anchor
