"""Right by default: `bbvi.fit(model, seed=0)` with no tuning on the ten posteriordb posteriors (and the same with
family='fullrank', and the score path with full rank), against Stan's reference draws: accuracy, whether a
bbvi.ReliabilityWarning was raised, cost in steps, gradient evaluations and seconds, next to the old fixed
defaults (zero start, float32, 5000 steps, lr 0.05 cosine) and NUTS. Writes defaults.csv, defaults.md."""
import multiprocessing
import time
import warnings

from common import parse, single_thread, write_table

CONFIGS = {
    "default": {},
    "fullrank": {"family": "fullrank"},
    "fullrank score+loo": {"family": "fullrank", "estimator": "score", "baseline": "loo"},
    "old fixed 5000": {"steps": 5000, "lr": 0.05, "init_strategy": "zero", "dtype": "float32"},
}


def run_one(job):
    single_thread()
    import torch

    import bbvi
    from models import posteriordb
    name, config = job
    kwargs = dict(CONFIGS[config])
    if "dtype" in kwargs:
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    model = posteriordb.load(name)
    ref = posteriordb.reference(name)
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = bbvi.fit(model, seed=0, **kwargs)
            raised = ""
        except Exception as e:  # noqa: BLE001 - the experiment records what a user would see
            fit, raised = getattr(e, "result", None), f"{type(e).__name__}: {str(e)[:120]}"
    wall = time.perf_counter() - t
    warned = [str(w.message) for w in caught if issubclass(w.category, bbvi.ReliabilityWarning)]
    row = dict(posterior=name, config=config, raised=raised, warned=bool(warned),
               warning=warned[0].split("unreliable: ")[-1][:200] if warned else "", wall_s=wall)
    if fit is None:
        return row
    try:
        table = bbvi.compare(fit, ref, num_draws=4000)
    except Exception as e:  # noqa: BLE001
        row["raised"] = row["raised"] or f"compare: {type(e).__name__}: {str(e)[:100]}"
        return row
    err = table["mean_err_sd"].abs()
    row.update(status=fit.status, steps=fit.num_steps, grad_evals=fit.num_gradient_evals, fit_evals=fit.num_fit_evals,
               method=fit.options.method if fit.options is not None else "", max_mean_err_sd=err.max(),
               min_sd_ratio=table["sd_ratio"].min(), max_sd_ratio=table["sd_ratio"].max(),
               khat=fit.reliability.get("khat", table.attrs.get("khat", float("nan"))),
               means_ok=bool((err < 0.1).all()),
               sds_ok=bool(((table["sd_ratio"] - 1).abs() < 0.2).all()), start=fit.options.start)
    return row


def nuts_time(name):
    """Seconds of NUTS sampling (4 chains x 1000 + 1000 warmup, chains in parallel where there are cores), as
    recorded when the reference was computed (bbvi.nuts caches it with its draws)."""
    import bbvi
    from models import posteriordb
    try:
        ref = bbvi.nuts(posteriordb.load(name), num_draws=1000, num_warmup=1000, num_chains=4, seed=0)
    except Exception as e:  # noqa: BLE001
        return name, float("nan"), f"{type(e).__name__}"
    return name, float(ref.posterior.attrs.get("sampling_time_s", float("nan"))), ""


def main(argv=None):
    args = parse(__doc__.splitlines()[0], argv, extra=[("--configs", "comma-separated subset of CONFIGS")])
    import pandas as pd
    from tqdm.auto import tqdm

    from models import posteriordb
    names = list(posteriordb.FIRST_TEN)
    configs = args.configs.split(",") if args.configs else list(CONFIGS)
    if args.quick:
        names, configs = names[:1], ["default"]
    jobs = [(n, c) for n in names for c in configs]
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        rows = []
        for row in tqdm(pool.imap_unordered(run_one, jobs), total=len(jobs), desc="defaults"):
            rows.append(row)
            pd.DataFrame(rows).to_csv(f"{args.out}/defaults_partial.csv", index=False)
    frame = pd.DataFrame(rows).sort_values(["posterior", "config"], key=lambda c: c.map(
        {k: i for i, k in enumerate(configs)}).fillna(0) if c.name == "config" else c)
    if not args.quick and not args.no_nuts:
        nuts = dict((n, (s, e)) for n, s, e in map(nuts_time, tqdm(names, desc="nuts")))
        frame["nuts_s"] = frame.posterior.map(lambda n: nuts[n][0])
    frame["silent_miss"] = ~frame.means_ok.fillna(False).astype(bool) & ~frame.warned & (frame.raised == "")
    note = ("seed 0, no other option unless the config says; max |mean error| in reference sds over every reference "
            "parameter; means_ok: every mean within 0.1 sd; sds_ok: every sd within 20%; warned: a "
            "bbvi.ReliabilityWarning was raised; silent_miss: means off by more than 0.1 sd with no warning and no "
            "error (the failure this table exists to count); grad_evals: log-joint gradient evaluations of the whole "
            "call (fit.num_gradient_evals: the fit's, the end-of-fit check's and any fit it tried and did not "
            "return); fit_evals: the returned fit's own (start and steps); method: the algorithm of the q returned; "
            "wall_s: the whole bbvi.fit call (start, steps, end-of-fit check).")
    text = write_table(frame.drop(columns=["warning"]), args.out, "defaults", "Right by default", note)
    frame.to_csv(f"{args.out}/defaults_full.csv", index=False)
    print(text)
    return frame


def readme_block(frame):
    """The defaults block (docs/accuracy.md, "Right by default"): accuracy and warnings per posterior and config, then cost, from defaults.csv."""
    f = frame.copy()
    f["posterior"] = f.posterior.str.split("-").str[-1]

    def cell(r):
        if isinstance(r.raised, str) and r.raised:
            return f"raised {r.raised.split(':')[0]}"
        full = "fullrank" in r.config    # mean-field sds are too small wherever the posterior is correlated
        sds = f", sd {r.min_sd_ratio:.2f}-{r.max_sd_ratio:.2f}" if full else ""
        ok = "ok" if r.means_ok and (not full or r.sds_ok) else "MISS"
        return f"{ok} {r.max_mean_err_sd:.2g}{sds}" + (" (warned)" if r.warned else " (silent)")
    f["cell"] = f.apply(cell, axis=1)
    acc = f.pivot(index="posterior", columns="config", values="cell")[[c for c in CONFIGS if c in set(f.config)]]
    f["cost"] = f.apply(lambda r: f"{r.steps:.0f} / {r.grad_evals / 1e3:.0f}k / {r.wall_s:.1f} s", axis=1)
    cost = f.pivot(index="posterior", columns="config", values="cost")[[c for c in CONFIGS if c in set(f.config)]]
    if "nuts_s" in f:
        cost["NUTS 4x(1000+1000), s"] = f.groupby("posterior").nuts_s.first().map(
            lambda v: f"{v:.1f}" if v == v else "not measured")
    n = f.groupby("config").agg(right=("means_ok", "sum"), silent=("silent_miss", "sum"), total=("means_ok", "size"))
    lines = [f"- `{c}`: means within 0.1 sd on {int(n.right[c])}/{int(n.total[c])}, silent misses "
             f"{int(n.silent[c])}" for c in acc.columns]
    return "\n".join([
        "Cells: ok/MISS (every mean within 0.1 reference sd and, for full rank, every sd within 20%), max |mean "
        "error| in reference sds, sd ratio range, and whether a `bbvi.ReliabilityWarning` was raised. "
        "`old fixed 5000` is the old defaults' settings (zero start, float32, 5000 steps, lr 0.05 cosine) run "
        "with today's end-of-fit check; before it, that run had no check at all.", "",
        acc.to_markdown(), "", *lines, "",
        "Cost: steps of the q returned / log-joint gradient evaluations / seconds, the last two for the whole "
        "`bbvi.fit` call (start, steps, end-of-fit check, and a fit tried and not returned: the default's "
        "Gaussian before a flow; 2 fits at a time on 2 cores)" + (", and NUTS's sampling time for the same model"
        if "nuts_s" in f else "") + ". Steps and gradient evaluations do not depend on the machine's load; "
        "seconds do.", "",
        cost.to_markdown()])


if __name__ == "__main__":
    main()
