"""The guarded update's checks, shared by the eager step (fit.py) and the compiled one (compiled.py): clearing the
gradients, the one host read that says whether a step is finite and whether its gradient would overflow the
optimizer's statistics, and that overflow limit."""
import functools
import math

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
