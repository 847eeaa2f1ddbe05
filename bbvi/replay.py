"""Replay: a deterministic tensor function's aten graph, recorded once a call signature has come back often enough,
then run in place of the function (bbvi.from_pyro's vectorized log-joint: Pyro's handlers, its distributions'
constructors and torch.func.vmap's wrapping are Python work on every call, about half of a step at N = 500).

The graph is make_fx's record of the function's own run (real tensors, not fake ones) at that signature: the ops
the run dispatched below autograd, in order, less those whose results nothing uses (Pyro's per-site
log_prob_sum, the plate's index arange). Replayed, they go through autograd as in the run, so values and gradients
are the run's, bit for bit; the first replay is compared with the run (values, NaN and inf in the same places,
shapes, strides) and a graph that differs, or a run make_fx cannot record, leaves that signature to the function.
A signature is the call's data object (by identity: its non-tensor leaves and anything the function read off its
values are constants of the graph), every input's shape, dtype, device and requires_grad, grad mode and the
default dtype; calls under a torch.func transform, a dispatch mode (make_fx, fake tensors) or a torch function
mode (`with torch.device(...)`) always run the function. The function must have no side effects and draw no
random numbers (vmap with randomness='error' refuses them) and read no state that changes between calls.
"""
import torch

RECORD_AFTER = 100   # calls of one signature before its graph is recorded (recording costs ~0.1-0.2 s on 2 cores)
MAX_SIGNATURES = 8   # graphs kept; the counts of signatures not yet recorded are cleared past 8 * 64


class Replay:
    def __init__(self, fn):
        self.fn, self.graphs, self.seen = fn, {}, {}

    def __call__(self, z, data):
        key = _signature(z, data)
        if key is None:
            return self.fn(z, data)
        graph = self.graphs.get(key)
        if graph is not None:
            return graph[1](z, data) if graph[1] is not None else self.fn(z, data)
        self.seen[key] = count = self.seen.get(key, 0) + 1
        if count < RECORD_AFTER or len(self.graphs) >= MAX_SIGNATURES:
            if len(self.seen) > 64 * MAX_SIGNATURES:
                self.seen.clear()
            return self.fn(z, data)
        out = self.fn(z, data)
        self.graphs[key] = (data, _record(self.fn, z, data, out))   # data kept: its id stays its own
        return out


try:   # what says a call runs under a torch.func transform, a dispatch mode or a torch function mode
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    _MODES = (torch._C._functorch.peek_interpreter_stack, _get_current_dispatch_mode,
              torch._C._is_torch_function_mode_enabled)
except (ImportError, AttributeError):   # a torch without these hooks: the function always runs as it is
    _MODES = None


def _signature(z, data):
    if _MODES is None or _MODES[0]() is not None or _MODES[1]() is not None or _MODES[2]():
        return None
    inputs = []
    for k, v in z.items():
        if type(v) is not torch.Tensor:
            return None
        inputs.append((k, tuple(v.shape), v.dtype, v.device, v.requires_grad))
    return id(data), tuple(inputs), torch.is_grad_enabled(), torch.get_default_dtype()


def _record(fn, z, data, out):
    """The graph of fn at (z, data), dead code removed, where its replay gives `out` (fn's own result) exactly;
    else None."""
    from torch.fx.experimental.proxy_tensor import make_fx
    try:
        graph = make_fx(lambda z, data: fn(z, data))(z, data)   # (a bound method would count self)
        graph.graph.eliminate_dead_code(_kept)
        graph.recompile()
        again = graph(z, data)
    except Exception:  # noqa: BLE001 - what make_fx cannot record runs as it is
        return None
    return graph if isinstance(again, dict) and again.keys() == out.keys() and all(
        _identical(again[k], out[k]) for k in out) else None


def _kept(node):
    """FX's impure nodes (in-place ops, asserts), and any op that returns nothing: a check that raises
    (torch.linalg.cholesky's _linalg_check_errors)."""
    return node.is_impure() or (isinstance(node.target, torch._ops.OpOverload) and not node.target._schema.returns)


def _identical(a, b):
    return (torch.is_tensor(a) and a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
            and a.requires_grad == b.requires_grad and torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))
