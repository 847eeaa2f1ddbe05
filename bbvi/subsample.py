"""Plates and minibatch subsampling (stochastic VI; Hoffman et al. 2013).

A model declares which data entries are indexed by observations: `bbvi.Model(..., data={"X": X, "y": y},
plates={"obs": ("X", "y")})`, and its log-joint returns a factor of that name with one term per row, (S, N).
`bbvi.fit(model, subsample_size=B)` then evaluates each step on B rows of every plate, drawn without replacement
within an epoch (a permutation of the rows from the fit's own generator, consumed B at a time, redrawn when fewer
than B rows are left), and scales that factor by N / B exactly once (`batch_model`): the step's ELBO estimate
and gradient are unbiased for the full data's. Rao-Blackwellized score terms (a factor-dict log-joint) use the
full data's dependency structure, restricted to the minibatch's rows (`structure_rows`). The permutations and positions (`order`) are part of the fit's
state: checkpointed, so a resumed fit draws the same rows.
"""
import torch

from .errors import ConfigError, ModelError

__all__ = ["check_plates", "sizes", "check_subsample", "next_batch", "batch_model", "structure_rows"]


def check_plates(plates, data):
    """The validated plates {factor name: tuple of data keys} (ModelError naming what is wrong)."""
    if plates is None:
        return None
    if not isinstance(plates, dict) or not plates:
        raise ModelError(f"plates must be a dict factor name -> data keys, e.g. {{'obs': ('X', 'y')}}, got {plates!r}")
    if not isinstance(data, dict):
        raise ModelError(f"plates name data entries, so data must be a dict name -> tensor, got "
                         f"{type(data).__name__}")
    out = {}
    for name, keys in plates.items():
        keys = (keys,) if isinstance(keys, str) else tuple(keys)
        if not isinstance(name, str) or not keys:
            raise ModelError(f"plates[{name!r}] must name a factor (a string) and at least one data entry")
        missing = [k for k in keys if k not in data]
        if missing:
            raise ModelError(f"plates[{name!r}] names data entries {missing}; the data has {list(data)}")
        bad = [k for k in keys if not torch.is_tensor(data[k]) or data[k].dim() == 0]
        if bad:
            raise ModelError(f"plates[{name!r}]: data entries {bad} are not tensors with a row dimension")
        rows = {k: data[k].shape[0] for k in keys}
        if len(set(rows.values())) > 1:
            raise ModelError(f"plates[{name!r}]: its data entries must have the same number of rows, got {rows}")
        out[name] = keys
    return out


def sizes(model):
    """{plate: N}: rows of every plate of the model's data."""
    return {name: model.data[keys[0]].shape[0] for name, keys in (model.plates or {}).items()}


def check_subsample(subsample_size, model, report):
    """{plate: B} for bbvi.fit(subsample_size=...) (an int for every plate, or a dict), or None; ConfigError
    when the model has no plates, or its log-joint does not return the plate's factor with one term per row."""
    if subsample_size is None:
        return None
    if not model.plates:
        raise ConfigError(f"subsample_size={subsample_size!r} needs plates: declare which data rows the "
                          f"log-joint's factor terms index, bbvi.Model(..., plates={{'obs': ('X', 'y')}})")
    n = sizes(model)
    want = subsample_size if isinstance(subsample_size, dict) else {p: subsample_size for p in n}
    unknown = [p for p in want if p not in n]
    if unknown:
        raise ConfigError(f"subsample_size names plates {unknown}; model {model.name!r} has {list(n)}")
    factors = dict(report.factors or ())
    for p, b in want.items():
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b:
            raise ConfigError(f"subsample_size for plate {p!r} must be a positive int, got {b!r}")
        if factors.get(p) != n[p]:
            raise ConfigError(f"plate {p!r} has {n[p]} rows, but the log-joint of model {model.name!r} "
                              + (f"returns factor {p!r} with {factors[p]} terms" if p in factors else
                                 f"returns no factor {p!r} (it returns {list(factors) or 'one tensor'})")
                              + f": return {{{p!r}: one term per row, (S, {n[p]}), ...}} so it can be scaled")
    return {p: min(b, n[p]) for p, b in want.items()}


def next_batch(batch, n, order, generator):
    """(indices {plate: (B,)}, new order): the next B rows of each plate's permutation, a new permutation when
    fewer than B are left. `order`: {"perm/<plate>": (N,), "pos/<plate>": ()} or {} at the start."""
    new, idx = dict(order), {}
    for p, b in batch.items():
        perm, pos = order.get(f"perm/{p}"), order.get(f"pos/{p}")
        if perm is None or int(pos) + b > n[p]:
            perm = torch.randperm(n[p], generator=generator, device=generator.device)
            pos = torch.zeros((), dtype=torch.int64)
        start = int(pos)
        idx[p] = perm[start:start + b]
        new[f"perm/{p}"], new[f"pos/{p}"] = perm, torch.tensor(start + b, dtype=torch.int64)
    return idx, new


def batch_model(model, idx):
    """The model on the rows `idx` ({plate: (B,)}) of its plates, each plate's factor scaled by N / B."""
    n = sizes(model)
    data = dict(model.data)
    for p, rows in idx.items():
        for k in model.plates[p]:
            data[k] = model.data[k].index_select(0, rows.to(model.data[k].device))
    before = model.factor_scale or {}   # a data-parallel rank's shard is already scaled (bbvi.distributed)
    scale = {**before, **{p: before.get(p, 1.0) * n[p] / rows.numel() for p, rows in idx.items()}}
    return model.with_data(data, factor_scale=scale)


def structure_rows(factors, idx, num_elements):
    """Rows of the full data's term elements (a Rao-Blackwellization Structure) that a minibatch's elements are:
    the factors in order (a plate's: its chosen rows), then the log-det-Jacobian elements. `factors`: the
    CheckReport's ((name, number of elements), ...)."""
    rows, offset = [], 0
    for name, n in factors:
        rows.append(offset + idx[name].cpu() if name in idx else torch.arange(offset, offset + n))
        offset += n
    rows.append(torch.arange(offset, num_elements))
    return torch.cat(rows)
