"""The guarded update, in small pieces that the stochastic-gradient step (algorithms/sgd.py) runs in order:

    clear_grads -> (the estimate's backward) -> every guard of `guards_for` (RankMean on a data-parallel fit)
    -> gradient_norm (clip_grad) -> verdict (one host read: finite? would it overflow?) -> rescale if it would
    -> the optimizer's step if finite, else the step is skipped and counted

The compiled step (compiled.py) shares the overflow limit and the verdict. A new guard on the gradient is a class
here with `__call__(leaves, value, num_bad) -> (value, num_bad)`, added to `guards_for`."""
import functools
import math
import operator

import torch


def overflow_limit(t):
    """Largest gradient norm whose square stays far from overflowing t's dtype (1.8e16 for float32)."""
    return math.sqrt(torch.finfo(t.dtype).max) * 1e-3


def clear_grads(opt):
    """opt.zero_grad(set_to_none=True): every parameter's gradient set to None; done here, where the optimizer
    keeps torch's zero_grad, without its profiler record and dynamo guard (~12 us, 2-3% of a small eager step)."""
    if getattr(getattr(opt, "zero_grad", None), "__func__", None) is not torch.optim.Optimizer.zero_grad:
        opt.zero_grad(set_to_none=True)
        return
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = None


def verdict(value, norm):
    """One host sync: [is the step finite, is its gradient so large that the optimizer's squared-gradient
    statistics would overflow (Adam's v = inf freezes every later update at m / sqrt(v) = 0), is the ELBO estimate
    finite]. The checks are made on the host, on the values in the tensors' dtype (value + norm summed there; the
    limit rounded to it): the same answers as the tensor comparisons, without their half-dozen small operations."""
    total, norm_value, value_value = torch.stack([value + norm, norm, value]).tolist()
    return math.isfinite(total), norm_value > limit_in(norm.dtype), math.isfinite(value_value)


@functools.lru_cache(maxsize=None)
def limit_in(dtype):
    """overflow_limit rounded to dtype, as a tensor comparison with it rounds it."""
    return torch.tensor(math.sqrt(torch.finfo(dtype).max) * 1e-3, dtype=dtype).item()


class RankMean:
    """A data-parallel fit (bbvi.distributed): the ranks' mean gradient, ELBO estimate and bad-particle count, so
    that every rank makes the same update. A parameter with no gradient on this rank counts as a zero one."""

    def __init__(self, comm):
        self.comm = comm

    def __call__(self, leaves, value, num_bad):
        local = [p.grad is None for p in leaves]
        for p in leaves:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        value, num_bad = self.comm.average(value, [p.grad for p in leaves], num_bad)
        for p, none in zip(leaves, local):
            if none:
                p.grad = None
        return value, num_bad


def guards_for(comm):
    """The guards a step's gradient passes through after the backward, in order."""
    return (RankMean(comm),) if comm is not None else ()


def gradient_norm(leaves, value, clip_grad):
    """The gradient's global norm, after clipping it to clip_grad (None: no clipping). Without clipping, a sum of
    the per-tensor norms: finite exactly when every gradient entry is, without a square root of a sum of squares."""
    if clip_grad is not None:
        return torch.nn.utils.clip_grad_norm_(leaves, clip_grad)
    grads = [p.grad for p in leaves if p.grad is not None] or [value.reshape(1) * 0]
    return functools.reduce(operator.add, torch._foreach_norm(grads))


def rescale(leaves, norm):
    """Scale a gradient whose norm would overflow the optimizer's squared-gradient statistics down to the limit."""
    torch._foreach_mul_([p.grad for p in leaves if p.grad is not None], (overflow_limit(norm) / norm).item())
