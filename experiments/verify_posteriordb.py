"""Verify each bundled posteriordb translation: bbvi.nuts (4 chains x (1000 warm-up + 1000 draws), seed 0; a dense
mass matrix where two parameters correlate above 0.9, a diagonal one otherwise) on the torch model against
posteriordb's Stan reference draws. Per posterior: the largest |mean difference| in units of
its Monte Carlo standard error (sqrt(MCSE_ref^2 + MCSE_nuts^2), MCSE from ArviZ's bulk ESS), the sd ratios, R-hat,
divergences, NUTS's cost (gradient evaluations over warm-up and draws, seconds). A translation passes when every
mean is within 4 MCSE and every sd within 10%. Writes verify_posteriordb.{csv,md}; NUTS draws are cached by
bbvi.nuts (BBVI_CACHE or <out>/nuts_cache), so a rerun only recomputes the table. The committed record is
models/posteriordb/VERIFIED.csv: --record writes each posterior's row into it as soon as it is verified, and
--missing runs only the posteriors it does not hold yet (make verify-posteriordb passes both)."""
import os
import sys
import time

from common import ROOT, parse, write_table

MEAN_Z = 4.0       # |mean difference| / MCSE of the difference
SD_TOL = 0.10      # |sd ratio - 1|
DENSE_CORR = 0.9   # a posterior with a correlation above this between two parameters gets a dense mass matrix


def needs_dense(reference):
    """Whether two of the reference's parameters correlate above DENSE_CORR (pairs linked exactly, |corr| >
    1 - 1e-9, such as a simplex's components, aside): a diagonal mass matrix then saturates NUTS's tree depth
    (seen: earnings-logearn_logheight_male, |corr| 0.9999, over 25 minutes for its 4 chains on 2 cores)."""
    import numpy as np
    columns = np.stack([v.reshape(-1) for v in flat(reference).values()], -1)
    corr = np.abs(np.corrcoef(columns.T))
    np.fill_diagonal(corr, 0)
    corr[corr > 1 - 1e-9] = 0
    return bool(corr.max() > DENSE_CORR)


def flat(idata, names=None):
    """{Stan name: (chains, draws) array} of every scalar of every variable (1-based indices, as Stan names)."""
    import numpy as np
    out = {}
    for var in idata.posterior.data_vars:
        a = np.asarray(idata.posterior[var].values, dtype=float)
        if a.ndim == 2:
            out[var] = a
            continue
        for idx in np.ndindex(*a.shape[2:]):
            out[f"{var}[{','.join(str(i + 1) for i in idx)}]"] = a[(slice(None), slice(None)) + idx]
    return out


def verify(name, cache_dir):
    import arviz as az
    import numpy as np

    import bbvi
    from models import posteriordb
    model = posteriordb.load(name)
    ref = posteriordb.reference(name)
    dense = needs_dense(ref)
    t = time.perf_counter()
    idata = bbvi.nuts(model, num_chains=4, seed=0, cache_dir=cache_dir, progress=False, full_mass=dense)
    wall = time.perf_counter() - t
    ours, theirs = flat(idata), flat(ref)
    worst_z, worst_sd, worst_rhat, names = 0.0, 1.0, 1.0, []
    for k, r in theirs.items():
        if k not in ours:
            raise KeyError(f"{name}: reference parameter {k} is not in the model's draws")
        o = ours[k]
        ess_o = float(az.ess(o[None] if o.ndim == 1 else o))
        ess_r = float(az.ess(r))
        mcse = np.sqrt(r.var(ddof=1) / ess_r + o.var(ddof=1) / ess_o)
        z = abs(o.mean() - r.mean()) / mcse
        ratio = o.std(ddof=1) / r.std(ddof=1)
        rhat = float(az.rhat(o))
        names.append(k)
        worst_z = max(worst_z, z)
        worst_sd = ratio if abs(ratio - 1) > abs(worst_sd - 1) else worst_sd
        worst_rhat = max(worst_rhat, rhat)
    attrs = idata.posterior.attrs
    evals = attrs.get("num_gradient_evals")
    div = int(np.asarray(idata.sample_stats["diverging"]).sum())
    steps = np.asarray(idata.sample_stats["n_steps"])
    return dict(posterior=name, parameters=len(names), metric="dense" if dense else "diag", max_mean_z=float(worst_z),
                worst_sd_ratio=float(worst_sd),
                max_rhat=worst_rhat, divergences=div,
                passed=bool(worst_z <= MEAN_Z and abs(worst_sd - 1) <= SD_TOL),
                nuts_gradient_evals=int(evals) if evals is not None else -1,
                nuts_draw_evals=int(steps.sum()), nuts_seconds=float(attrs.get("sampling_time_s", wall)),
                wall_s=wall)


RECORD = os.path.join(ROOT, "models", "posteriordb", "VERIFIED.csv")


def recorded():
    """The committed verification record (an empty frame where there is none)."""
    import pandas as pd
    return pd.read_csv(RECORD) if os.path.exists(RECORD) else pd.DataFrame({"posterior": []})


INT_COLUMNS = ("parameters", "divergences", "nuts_gradient_evals", "nuts_draw_evals")


def record_rows(rows, path=None):
    """Put `rows` into the record, replacing the rows of the same posteriors; sorted by posterior."""
    import pandas as pd
    path = path or RECORD
    new = pd.DataFrame(rows)
    frame = new
    if os.path.exists(path):   # (concatenating onto an empty frame would turn the int columns into floats)
        old = pd.read_csv(path)
        frame = pd.concat([old[~old.posterior.isin(new.posterior)], new], ignore_index=True)
    for column in INT_COLUMNS:   # whole numbers stay whole where a row has none (a translation verified otherwise)
        if column in frame:
            frame[column] = frame[column].astype("Int64")
    frame.sort_values("posterior").to_csv(path, index=False)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    record = "--record" in argv     # also write each posterior's row into models/posteriordb/VERIFIED.csv
    missing = "--missing" in argv   # only the posteriors VERIFIED.csv does not hold yet
    args = parse(__doc__.splitlines()[0], [a for a in argv if a not in ("--record", "--missing")],
                 extra=[("--only", "comma-separated posterior names")])
    import pandas as pd

    from models import posteriordb
    cache_dir = os.environ.get("BBVI_CACHE") or os.path.join(args.out, "nuts_cache")
    names = args.only.split(",") if args.only else posteriordb.names()
    if missing:
        names = [n for n in names if n not in set(recorded().posterior)]
    rows = []
    for name in names:
        row = verify(name, cache_dir)
        print(row, flush=True)
        rows.append(row)
        if record:   # after each posterior: an interrupted run keeps what it verified
            record_rows([row])
    frame = pd.DataFrame(rows)
    note = (f"bbvi.nuts (Pyro NUTS, 4 chains x (1000 + 1000), seed 0, float64; metric: dense mass matrix where two "
            f"parameters correlate above {DENSE_CORR}, diagonal otherwise) against posteriordb's Stan "
            f"reference (10 x 1000 draws). max_mean_z: largest |mean difference| / MCSE of the difference; "
            f"passed: every mean within {MEAN_Z:g} MCSE and every sd within {SD_TOL:.0%}. nuts_gradient_evals: "
            f"log-density gradient evaluations over the 4 chains, warm-up and draws.")
    text = write_table(frame, args.out, "verify_posteriordb", "posteriordb translations verified by NUTS", note)
    print(text)
    return frame


if __name__ == "__main__":
    main()
