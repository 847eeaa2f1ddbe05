"""Data-parallel fits over torch.distributed: `bbvi.fit(model, distributed=True)` under `torchrun`.

Every rank builds the same model on the same data, as a torchrun script does. Each rank then steps on a shard of
every plate (a contiguous block of rows, a view: nothing is copied), that plate's factor scaled by the world
size K, so the mean over ranks of the ranks' log-joints is exactly the full data's; with `subsample_size=B`
each rank draws its B rows from its own shard, scaled by K n_r / B. Each rank draws its own particles (its
generator is seeded with seed + rank), and one all-reduce per step averages the ranks' gradients, ELBO
estimates and counts of bad particles: the averaged gradient is an unbiased estimate of the full data's ELBO
gradient from K x S particles, every rank makes the same update, and the parameters stay bit-identical on every
rank (tested). A step that is not finite on one rank is not finite on any, so it is skipped everywhere.

The start (MAP/Laplace or zero) is computed on the full data and rank 0's is broadcast, the whitening
preconditioner included. Rank 0 writes the checkpoints, holding every rank's own state (generator, baseline,
data order), and runs the end-of-fit check on the full data; every rank returns the same fitted q.
Gloo on the CPU, NCCL on CUDA (device='cuda' becomes cuda:LOCAL_RANK).
"""
import atexit
import os

import torch

from .errors import ConfigError

__all__ = ["Comm", "connect", "shard"]

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class Comm:
    """The ranks of a data-parallel fit: rank, world size, and the few collectives a fit needs."""

    def __init__(self, rank, world_size, device):
        self.rank, self.world_size, self.device = rank, world_size, device   # NCCL reduces CUDA tensors only

    def broadcast(self, tensors):
        """Rank 0's values into `tensors`, in place, on every rank."""
        import torch.distributed as dist
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t, src=0)

    def average(self, value, grads, num_bad):
        """One all-reduce: the ranks' mean ELBO estimate (0-dim), their mean gradients (written into `grads` in
        place) and the sum of their bad particles. A NaN on one rank makes the mean NaN on every rank."""
        import torch.distributed as dist
        dt = value.dtype
        bad = value.new_zeros(1) if num_bad is None else num_bad.to(dt).reshape(1)
        flat = torch.cat([value.detach().reshape(1), *[g.reshape(-1).to(dt) for g in grads], bad])
        dist.all_reduce(flat)
        flat[:-1] /= self.world_size
        offset = 1
        with torch.no_grad():
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        return flat[0], flat[-1].round().to(torch.int64)

    def any(self, flag):
        """True on every rank when `flag` is true on some rank (a callback's stop, a failed checkpoint write)."""
        import torch.distributed as dist
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj):
        """[every rank's obj] on rank 0, None elsewhere."""
        import torch.distributed as dist
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def share(self, obj):
        """Rank 0's obj on every rank."""
        import torch.distributed as dist
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def connect(device):
    """(Comm, device) for a fit with distributed=True: joins the process group torchrun describes (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT) unless one is already initialised; gloo on the CPU, NCCL on CUDA,
    where device='cuda' becomes this process's cuda:LOCAL_RANK. ConfigError outside torchrun."""
    import torch.distributed as dist
    if not dist.is_available():
        raise ConfigError("distributed=True needs torch.distributed, which this torch build does not have")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        missing = [k for k in _ENV if k not in os.environ]
        if missing:
            raise ConfigError(f"distributed=True runs under torchrun (e.g. `torchrun --nproc_per_node=2 "
                              f"script.py`), which sets {', '.join(_ENV)}; {', '.join(missing)} not set here. "
                              f"Without torchrun, fit in one process: leave out distributed=True")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave)
    backend = dist.get_backend()
    if device.type == "cuda" and backend != "nccl" or device.type == "cpu" and backend != "gloo":
        raise ConfigError(f"distributed=True on device {str(device)!r} needs a "
                          f"{'nccl' if device.type == 'cuda' else 'gloo'} process group; the initialised one is "
                          f"{backend!r}")
    return Comm(dist.get_rank(), dist.get_world_size(), device), device


def _leave():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(model, batch, comm):
    """(this rank's model, its rows {plate: (first, count)}, its subsample sizes): the model on this rank's
    contiguous block of every plate's rows (views), each plate's factor scaled by the world size; `batch`
    ({plate: B} or None) capped at the shard's rows. ConfigError for a model without plates or a plate with
    fewer rows than ranks."""
    if not model.plates:
        raise ConfigError(f"distributed=True splits the data's rows over the ranks: declare them as plates, "
                          f"bbvi.Model(..., plates={{'obs': ('X', 'y')}}), with the log-joint's factor 'obs' one "
                          f"term per row (model {model.name!r} has no plates)")
    k, r = comm.world_size, comm.rank
    data, rows = dict(model.data), {}
    for p, keys in model.plates.items():
        n = model.data[keys[0]].shape[0]
        if n < k:
            raise ConfigError(f"plate {p!r} has {n} rows, fewer than the {k} ranks: each rank needs rows of its own")
        first, stop = r * n // k, (r + 1) * n // k
        rows[p] = (first, stop - first)
        for key in keys:
            data[key] = model.data[key].narrow(0, first, stop - first)
    part = model.with_data(data, factor_scale={p: float(k) for p in model.plates})
    if batch is not None:
        batch = {p: min(b, rows[p][1]) for p, b in batch.items()}
    return part, rows, batch
