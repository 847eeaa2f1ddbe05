"""Reference draws from files: `from_draws` reads Stan-named draws (a CSV with a column per scalar, a DataFrame,
CmdStan's own output CSVs) into an arviz.InferenceData."""
import math
import os
import re

import numpy as np

from .arguments import check_count
from .arviz_names import arviz_dims, check_arviz_names
from .errors import ConfigError, SamplerError

__all__ = ["from_draws"]


_STAN_NAME = re.compile(r"^([^\[\]]+)(?:\[([0-9, ]+)\])?$")
_CMDSTAN_NAME = re.compile(r"^([^.\[\]]+)((?:\.[0-9]+)+)$")   # theta.1.2: CmdStan's own output names


def _open_text(path):
    import gzip
    path = os.fspath(path)
    return gzip.open(path, "rt", newline="") if path.endswith(".gz") else open(path, newline="")


def _is_cmdstan(path):
    """A CmdStan output CSV: its first line is a '#' comment, or its header has a column ending in '__' (lp__)."""
    try:
        with _open_text(path) as f:
            for line in f:
                if line.strip():
                    return line.lstrip().startswith("#") or any(
                        c.strip().strip('"').endswith("__") for c in line.split(","))
    except FileNotFoundError:
        raise ConfigError(f"from_draws: no file {os.fspath(path)!r}") from None
    except (OSError, UnicodeDecodeError):
        return False   # pandas says what is wrong with it
    return False


def _read_cmdstan(path):
    """(column names, float array (draws, columns)) of a CmdStan CSV: '#' lines skipped; draws written before an
    '# Adaptation terminated' comment are warmup draws (save_warmup=1) and are dropped."""
    import csv
    header, rows = None, []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            if text.startswith("#"):
                if header is not None and rows and "adaptation terminated" in text.lower():
                    rows = []
                continue
            fields = next(csv.reader([text]))
            if header is None:
                header = [c.strip() for c in fields]
                continue
            if len(fields) != len(header):
                raise ConfigError(f"from_draws: {os.fspath(path)!r} line {lineno}: {len(fields)} values for the "
                                  f"{len(header)} columns of its header; the file is cut short or malformed")
            try:
                rows.append([float(x) for x in fields])
            except ValueError:
                bad = next(x for x in fields if not _is_number(x))
                raise ConfigError(f"from_draws: {os.fspath(path)!r} line {lineno}: {bad.strip()!r} is not a number "
                                  f"(column {header[fields.index(bad)]!r})") from None
    if header is None or not rows:
        raise ConfigError(f"from_draws: {os.fspath(path)!r} has {'no header line' if header is None else 'no draws'}; "
                          f"a CmdStan CSV has '#' comment lines, a header (lp__, accept_stat__, ..., then the "
                          f"parameters) and a row per draw")
    return header, np.asarray(rows, dtype=np.float64)


def _is_number(x):
    try:
        float(x)
        return True
    except ValueError:
        return False


def _group(names, columns, where, error):
    """Columns with Stan names -> dict name -> array (draws, *shape). `theta[1]` / `theta.1` is index 0 of
    `theta`, `L[2,1]` / `L.2.1` is index (1, 0) of `L`: 1-based indices, placed by their values, not by their
    order in the file (CmdStan writes arrays column-major: L.1.1, L.2.1, L.1.2, ...)."""
    groups = {}
    for col, values in zip(names, columns):
        col = str(col).strip()
        m, dotted = _STAN_NAME.match(col), _CMDSTAN_NAME.match(col)
        if dotted:
            name, idx = dotted.group(1), tuple(int(i) - 1 for i in dotted.group(2)[1:].split("."))
        elif m:
            name = m.group(1)
            idx = tuple(int(i) - 1 for i in m.group(2).split(",")) if m.group(2) else ()
        else:
            raise error(f"from_draws: {where}cannot read parameter name {col!r}")
        if idx in groups.get(name, {}):
            raise error(f"from_draws: {where}column {col!r} appears twice")
        if groups.get(name) and len(next(iter(groups[name]))) != len(idx):
            raise error(f"from_draws: {where}parameter {name!r} has columns with {len(idx)} and with "
                        f"{len(next(iter(groups[name])))} indices")
        if any(i < 0 for i in idx):
            raise error(f"from_draws: {where}column {col!r}: Stan indices start at 1")
        groups.setdefault(name, {})[idx] = values
    out = {}
    for name, cols in groups.items():
        if list(cols) == [()]:
            out[name] = cols[()]
            continue
        shape = tuple(max(i[d] for i in cols) + 1 for d in range(len(next(iter(cols)))))
        if len(cols) != math.prod(shape):
            raise error(f"from_draws: {where}parameter {name!r} has {len(cols)} columns, not a full {shape}")
        n = len(next(iter(cols.values())))
        arr = np.empty((n,) + shape)
        for i, v in cols.items():
            arr[(slice(None),) + i] = v
        out[name] = arr
    return out


def _read_one(source):
    """One file or DataFrame -> (dict name -> array (draws, *shape), whether it was a CmdStan file)."""
    import pandas as pd
    if isinstance(source, pd.DataFrame):
        return _group(source.columns, [source[c].to_numpy() for c in source.columns], "", SamplerError), False
    if _is_cmdstan(source):
        header, values = _read_cmdstan(source)
        keep = [j for j, c in enumerate(header) if not c.endswith("__")]   # sampler columns: lp__, divergent__, ...
        return _group([header[j] for j in keep], [values[:, j] for j in keep], f"{os.fspath(source)!r}: ",
                      ConfigError), True
    frame = pd.read_csv(source)
    return _group(frame.columns, [frame[c].to_numpy() for c in frame.columns], "", SamplerError), False


def from_draws(source, num_chains=1):
    """Reference draws with Stan names -> arviz.InferenceData. `source`: a CSV path (.csv or .csv.gz, header =
    names, a row per draw, chains stacked), a pandas DataFrame, a CmdStan output CSV, or a list of paths (one
    chain each, e.g. CmdStan's output-1.csv ... output-4.csv). Stan names map to latents: `theta[1]` (CmdStan:
    `theta.1`) is index 0 of `theta`, `L[2,1]` (`L.2.1`) is index (1, 0) of `L`; indices are 1-based and placed
    by their values, whatever their order in the file (CmdStan writes arrays column-major). In a CmdStan file,
    '#' lines are skipped, the sampler's columns (ending in '__': lp__, accept_stat__, ...) are dropped, and draws
    before an '# Adaptation terminated' comment (save_warmup=1) are warmup and dropped; a malformed line is a
    ConfigError naming the file and line."""
    import arviz as az
    num_chains = check_count("num_chains", num_chains, "from_draws")
    files = list(source) if isinstance(source, (list, tuple)) else None
    if files is not None:
        if not files:
            raise ConfigError("from_draws: the list of files is empty")
        if num_chains not in (1, len(files)):
            raise ConfigError(f"from_draws: {len(files)} files are {len(files)} chains (one each), but "
                              f"num_chains={num_chains}; leave num_chains out")
        chains = [_read_one(f)[0] for f in files]
        first = chains[0]
        for f, c in zip(files[1:], chains[1:]):
            shapes = {k: v.shape for k, v in c.items()}
            if shapes != {k: v.shape for k, v in first.items()}:
                raise ConfigError(f"from_draws: {os.fspath(f)!r} does not have the parameters and number of draws "
                                  f"of {os.fspath(files[0])!r}: {shapes} against "
                                  f"{ {k: v.shape for k, v in first.items()} }")
        posterior = {k: np.stack([c[k] for c in chains]) for k in first}
    else:
        draws, cmdstan = _read_one(source)
        n = len(next(iter(draws.values())))
        if n % num_chains:
            raise (ConfigError if cmdstan else SamplerError)(
                f"from_draws: {n} draws do not split into {num_chains} chains")
        posterior = {k: v.reshape((num_chains, n // num_chains) + v.shape[1:]) for k, v in draws.items()}
    check_arviz_names(posterior, "from_draws", "parameter")
    return az.from_dict(posterior=posterior, dims=arviz_dims(posterior))
