"""How far the stochastic-gradient fit's stopping rule overshoots: on the yardstick's posteriors, the steps
`bbvi.fit(model, method="sgd", seed=0)` runs (the adaptive rule, mean-field) against the fewest steps that reach the
same accuracy: the smallest N of a doubling grid at which the same fit capped at max_steps=N (the same trajectory,
stopped early: the rule's levels do not depend on the cap; it returns the average of its last level) already has
every mean within 0.1 reference sd. Only posteriors whose uncapped fit has every mean within 0.1 sd count (a fit
that never gets there has no "steps it needs"). 4000 draws put about 0.016 sd of Monte Carlo error on a mean.
Writes stopping.csv and stopping.md."""
import multiprocessing
import warnings

from common import parse, single_thread, write_table

GRID = (125, 250, 500, 1000, 2000, 4000, 8000, 16000)
TOL = 0.1


def max_mean_error(fit, reference):
    from yardstick import errors
    import torch
    with torch.no_grad():
        return errors(fit.sample(4000, seed=1), reference)[0]


def run_one(job):
    name, cap_all = job
    single_thread()
    import bbvi
    from models import posteriordb
    model, ref = posteriordb.load(name), posteriordb.reference(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = bbvi.fit(model, method="sgd", seed=0, max_steps=cap_all, diagnose=False)
        err = max_mean_error(full, ref)
        row = dict(posterior=name, status=full.status, steps=full.num_steps, max_mean_err_sd=err, needed=None, overshoot=None)
        if err >= TOL:
            return row
        for cap in (n for n in GRID if n < full.num_steps):
            if max_mean_error(bbvi.fit(model, method="sgd", seed=0, max_steps=cap, diagnose=False), ref) < TOL:
                row["needed"] = cap
                break
        else:
            row["needed"] = full.num_steps
    row["overshoot"] = row["steps"] / row["needed"]
    return row


def main(argv=None):
    args = parse(__doc__.splitlines()[0], argv)
    import pandas as pd
    from yardstick import names
    todo = [("kidiq-kidscore_momhs", 300)] if args.quick else [(n, None) for n in names()]   # --quick: 300 steps
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        rows = pool.map(run_one, todo)
    frame = pd.DataFrame(rows).sort_values("posterior").reset_index(drop=True)
    counted = frame.dropna(subset=["needed"])
    note = (f"method='sgd' (mean-field, the adaptive rule), seed 0. needed: the fewest steps of the grid {GRID} at "
            f"which the same fit, capped, has every mean within {TOL} reference sd (the uncapped fit's steps where "
            f"no smaller cap does). {len(counted)} of {len(frame)} posteriors count (the others' uncapped fit is "
            f"more than {TOL} sd off somewhere). Overshoot (steps / needed): median "
            f"{counted.overshoot.median():.2g}, quartiles {counted.overshoot.quantile(0.25):.2g}-"
            f"{counted.overshoot.quantile(0.75):.2g}, max {counted.overshoot.max():.2g}.")
    text = write_table(frame, args.out, "stopping", "Steps the stopping rule runs against steps the answer needs",
                       note)
    print(text)
    return frame


if __name__ == "__main__":
    main()
