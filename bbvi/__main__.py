"""Command line: `bbvi <command> ...` (or `python -m bbvi <command> ...`); `bbvi <command> --help` says more.

fit MODEL.py[:name] --out DIR: fits the bbvi.Model defined in a Python file (bbvi.fit; options not given keep
    bbvi.fit's defaults) and writes DIR/posterior.nc (ArviZ draws of q), DIR/summary.txt (fit.summary(), also
    printed), DIR/fit.pt (fit.save; bbvi.load(path, model) reads it back) and DIR/elbo.png (the ELBO trace).
nuts MODEL.py[:name] --out DIR: runs the NUTS reference of the model (bbvi.nuts, Pyro) and writes
    DIR/reference.nc; prints arviz.summary of it.
compare MODEL.py[:name] --reference reference.nc --out DIR: fits the model as `fit` does (and writes the same
    files), compares the fit with the reference draws (bbvi.compare), prints the verdict and the whole table and
    writes DIR/compare.csv.
demo [--out results] [--quick]: fits the bundled eight-schools model (noncentered) with the score-function
    estimator (LOO baseline, mean-field) and with the pathwise estimator (full-rank), runs or loads its NUTS
    reference (Pyro), compares both fits with it and with posteriordb's Stan reference, measures gradient
    variance per estimator and baseline, and writes plots and summary.md to the output folder.
--version: bbvi's version (and torch's and python's).

MODEL.py is a Python file that defines a bbvi.Model at module level; `:name` picks the variable when it defines
more than one. Its folder is on sys.path while it is imported, so it can import its neighbours. Bad input (a
missing file, a model file that raises when imported, no such variable, an option bbvi rejects) is one line
`bbvi: error: ...` on stderr and exit status 2; a fit that fails (bbvi.FitError) exits with status 1. Warnings
from the fit (bbvi.ReliabilityWarning) are printed to stderr.
"""
import argparse
import os
import sys
import traceback
import warnings

_FAMILIES = ("meanfield", "fullrank", "lowrank", "flow")
_ESTIMATORS = ("auto", "score", "reparam", "stl", "arm", "disarm", "vimco", "relax", "concrete")
_BASELINES = ("none", "ema", "loo", "cv")
_DTYPES = ("float32", "float64")


class _UsageError(Exception):
    """Bad command-line input found by the CLI itself (not by bbvi): printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one line `bbvi: error: ...` (exit status 2), pointing at --help."""

    def error(self, message):
        sys.stderr.write(f"bbvi: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


class _Version(argparse.Action):
    """--version, importing torch and bbvi only when it is asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import torch

        import bbvi
        print(f"bbvi {bbvi.__version__} (torch {torch.__version__}, python {sys.version.split()[0]})")
        parser.exit()


def _split_model_arg(arg):
    """'path/to/model.py:name' -> (path, name); 'path/to/model.py' -> (path, None). A path that exists as it is
    is taken whole (so a ':' inside a file name, or a Windows drive, is not read as `:name`)."""
    if os.path.exists(arg) or ":" not in arg:
        return arg, None
    path, name = arg.rsplit(":", 1)
    if not name.isidentifier():
        return arg, None
    return path, name


def _import_file(path):
    """The module of the Python file at `path`, imported with its folder on sys.path (for the import only)."""
    import importlib.machinery
    import importlib.util
    import re
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file {path!r} does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path!r} is not a file")
    path = os.path.abspath(path)
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    module_name = f"_bbvi_cli_model_{stem}"
    loader = importlib.machinery.SourceFileLoader(module_name, path)    # any file name, not only *.py
    spec = importlib.util.spec_from_file_location(module_name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(path)
    sys.modules[module_name] = module
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(module_name, None)
        from bbvi import BBVIError
        if isinstance(e, (BBVIError, ImportError, SyntaxError)):   # main() reports these as they are
            raise
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
        where = f" (line {lines[-1]})" if lines else ""
        raise _UsageError(f"the model file {path!r} raised {type(e).__name__} when imported{where}: {e}") from e
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    finally:
        try:
            sys.path.remove(folder)      # the first occurrence: the one inserted above
        except ValueError:
            pass
    return module


def load_model(arg):
    """The bbvi.Model named by `arg` ('path/to/model.py[:name]'): the variable `name` of that file, or without
    `:name` its single bbvi.Model (a ModelError lists the candidates when there are none or several)."""
    from bbvi import Model, ModelError
    path, name = _split_model_arg(arg)
    module = _import_file(path)
    if name is not None:
        if not hasattr(module, name):
            found = _models_in(module)
            raise ModelError(f"{path} has no variable {name!r}; its bbvi.Model variables: "
                             f"{', '.join(found) if found else 'none'}")
        value = getattr(module, name)
        if not isinstance(value, Model):
            raise ModelError(f"{name!r} in {path} is a {type(value).__module__}.{type(value).__qualname__}, not a "
                             f"bbvi.Model")
        return value
    found = _models_in(module)
    distinct = {id(getattr(module, n)) for n in found}
    if len(distinct) == 1:
        return getattr(module, found[0])
    if not found:
        raise ModelError(f"{path} defines no bbvi.Model at module level; define one there "
                         f"(model = bbvi.Model(...))")
    raise ModelError(f"{path} defines {len(found)} bbvi.Model variables ({', '.join(found)}); pick one with "
                     f"{path}:name, e.g. {path}:{found[0]}")


def _models_in(module):
    from bbvi import Model
    return [k for k, v in vars(module).items() if isinstance(v, Model) and not k.startswith("__")]


def _fit_kwargs(args):
    """The bbvi.fit keywords the user gave (the others keep bbvi.fit's defaults)."""
    import torch

    from bbvi import ConfigError
    kwargs = {}
    for opt, key in (("family", "family"), ("estimator", "estimator"), ("steps", "steps"),
                     ("num_particles", "num_particles"), ("lr", "lr"), ("seed", "seed"), ("method", "method"),
                     ("max_steps", "max_steps"), ("checkpoint", "checkpoint"), ("resume", "resume")):
        value = getattr(args, opt)
        if value is not None:
            kwargs[key] = value
    if args.baseline is not None:
        kwargs["baseline"] = None if args.baseline.lower() == "none" else args.baseline
    if args.dtype is not None:
        if args.dtype not in _DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(_DTYPES)}, got {args.dtype!r}")
        kwargs["dtype"] = getattr(torch, args.dtype)
    if args.num_draws is not None and args.num_draws < 1:
        raise ConfigError(f"--num-draws must be a positive int, got {args.num_draws}")
    return kwargs


def _draw_kwargs(args):
    """num_draws/seed for to_arviz, summary and compare: the user's, else bbvi's defaults."""
    kwargs = {}
    if args.num_draws is not None:
        kwargs["num_draws"] = args.num_draws
    if args.seed is not None:
        kwargs["seed"] = args.seed
    return kwargs


def _make_out(out):
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise _UsageError(f"cannot create the output folder {out!r}: {e.strerror or e}") from e


def _fit_and_write(model, args):
    """bbvi.fit with the user's options; writes fit.pt, summary.txt, posterior.nc and elbo.png to args.out."""
    import bbvi
    from bbvi import plots
    result = bbvi.fit(model, **_fit_kwargs(args))
    draws = _draw_kwargs(args)
    result.save(os.path.join(args.out, "fit.pt"))
    summary = result.summary(**draws)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(summary + "\n")
    result.to_arviz(**draws).to_netcdf(os.path.join(args.out, "posterior.nc"))
    plots.plot_elbo(result, path=os.path.join(args.out, "elbo.png"))
    print(summary)
    return result


def cmd_fit(args):
    model = load_model(args.model)
    _fit_kwargs(args)                  # bad options fail before the folder is made
    _make_out(args.out)
    _fit_and_write(model, args)
    print(f"\nwrote {os.path.join(args.out, '')}{{posterior.nc, summary.txt, fit.pt, elbo.png}}")


def cmd_nuts(args):
    import inspect

    import pandas as pd

    import arviz as az
    import bbvi
    from bbvi.reference import nuts as reference_nuts
    model = load_model(args.model)
    _make_out(args.out)
    kwargs = dict(num_draws=args.num_draws, num_warmup=args.num_warmup, num_chains=args.num_chains,
                  seed=args.seed)
    if "progress" in inspect.signature(reference_nuts).parameters:
        kwargs["progress"] = sys.stderr.isatty()
    idata = bbvi.nuts(model, **kwargs)
    path = os.path.join(args.out, "reference.nc")
    idata.to_netcdf(path)
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
        print(az.summary(idata).to_string())
    took = idata.posterior.attrs.get("sampling_time_s")
    print(f"\nwrote {path}" + (f" ({float(took):.1f} s of sampling)" if took is not None else ""))


def cmd_compare(args):
    import pandas as pd

    import arviz as az
    import bbvi
    model = load_model(args.model)
    _fit_kwargs(args)
    if not os.path.isfile(args.reference):
        raise FileNotFoundError(f"reference file {args.reference!r} does not exist")
    try:
        reference = az.from_netcdf(args.reference)
    except (OSError, ValueError) as e:
        raise _UsageError(f"cannot read the reference {args.reference!r} as an ArviZ netCDF file: {e}") from e
    if not hasattr(reference, "posterior"):
        raise _UsageError(f"the reference {args.reference!r} has no posterior group")
    _make_out(args.out)
    result = _fit_and_write(model, args)
    table = bbvi.compare(result, reference, **_draw_kwargs(args))
    path = os.path.join(args.out, "compare.csv")
    table.to_csv(path)
    print(f"\nverdict: {table.attrs.get('verdict', '')}")
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
        print(table.to_string())
    print(f"\nwrote {path} and {os.path.join(args.out, '')}{{posterior.nc, summary.txt, fit.pt, elbo.png}}")


def _add_model_arg(p):
    p.add_argument("model", metavar="MODEL.py[:name]",
                   help="a Python file that defines a bbvi.Model at module level; `:name` picks the variable "
                        "(needed when the file defines more than one)")


def _add_fit_options(p):
    g = p.add_argument_group("fit options (those not given keep bbvi.fit's defaults)")
    g.add_argument("--family", metavar="|".join(_FAMILIES),
                   help="variational family (default: meanfield)")
    g.add_argument("--estimator", metavar="|".join(_ESTIMATORS),
                   help="gradient estimator (default: auto, the pathwise estimator where the model allows it)")
    g.add_argument("--baseline", metavar="|".join(_BASELINES),
                   help="baseline of the score-function terms (default: loo)")
    g.add_argument("--steps", type=int, metavar="N",
                   help="run exactly N steps with a cosine learning-rate decay (default: the adaptive rule, "
                        "which stops when the ELBO has converged, at most 20000 steps)")
    g.add_argument("--num-particles", type=int, metavar="S", help="draws of q per step (default: 16; flow: 64)")
    g.add_argument("--lr", type=float, metavar="X", help="learning rate (default: 0.05 with --steps; flow: 0.01)")
    g.add_argument("--seed", type=int, metavar="K",
                   help="random seed of the fit and of the draws written (default: 0)")
    g.add_argument("--dtype", metavar="|".join(_DTYPES), help="floating-point type of the fit (default: float64)")
    g.add_argument("--num-draws", type=int, metavar="N",
                   help="draws of q in posterior.nc, the summary and the comparison (default: 4000)")
    g.add_argument("--method", metavar="auto|sgd|bam|laplace",
                   help="fitting algorithm (default: auto: batch and match where it applies, else sgd)")
    g.add_argument("--max-steps", type=int, metavar="N", help="cap of the adaptive rule's steps (default: 20000)")
    g.add_argument("--checkpoint", metavar="FILE",
                   help="write the fit's state there every 500 steps and at the end, also on Ctrl-C or SIGTERM")
    g.add_argument("--resume", metavar="FILE", help="go on from a checkpoint written with the same options")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")


def build_parser():
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="bbvi", description=__doc__, formatter_class=fmt)
    parser.add_argument("--version", action=_Version, help="print bbvi's version (and torch's) and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{fit,nuts,compare,demo}")

    f = sub.add_parser(
        "fit", formatter_class=fmt, help="fit a model file with bbvi.fit; write the posterior, summary, fit and plot",
        description="Fit the bbvi.Model defined in a Python file with bbvi.fit and write to --out DIR:\n"
                    "  posterior.nc  ArviZ InferenceData of --num-draws draws of q (arviz.from_netcdf reads it)\n"
                    "  summary.txt   fit.summary(): status, ELBO, reliability checks, mean/sd/5%/95% per parameter\n"
                    "  fit.pt        the fitted q (fit.save); bbvi.load('fit.pt', model) reads it back\n"
                    "  elbo.png      the ELBO trace\n"
                    "The summary is also printed; warnings about the fit's reliability go to stderr.",
        epilog="example:\n  bbvi fit my_model.py:model --family fullrank --steps 5000 --out results/fit")
    _add_model_arg(f)
    _add_fit_options(f)

    n = sub.add_parser(
        "nuts", formatter_class=fmt, help="NUTS reference draws of a model file (bbvi.nuts); write reference.nc",
        description="Sample the bbvi.Model defined in a Python file with NUTS (bbvi.nuts, through Pyro) and write\n"
                    "--out DIR/reference.nc (ArviZ InferenceData: posterior and sample_stats); prints\n"
                    "arviz.summary of it (r_hat, ess). Results are cached in $BBVI_CACHE, else .bbvi_cache/nuts\n"
                    "under the current folder, so a second run with the same model and settings is instant.",
        epilog="example:\n  bbvi nuts my_model.py:model --num-chains 4 --out results/ref\n"
               "  bbvi compare my_model.py:model --reference results/ref/reference.nc --out results/cmp")
    _add_model_arg(n)
    n.add_argument("--num-draws", type=int, default=1000, metavar="N", help="draws per chain (default: 1000)")
    n.add_argument("--num-warmup", type=int, default=1000, metavar="N",
                   help="warm-up (adaptation) steps per chain, not kept (default: 1000)")
    n.add_argument("--num-chains", type=int, default=4, metavar="C", help="chains (default: 4)")
    n.add_argument("--seed", type=int, default=0, metavar="K", help="random seed (default: 0)")
    n.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")

    c = sub.add_parser(
        "compare", formatter_class=fmt, help="fit a model file and compare the fit with reference draws",
        description="Fit the bbvi.Model defined in a Python file as `bbvi fit` does (writing the same files to\n"
                    "--out DIR), compare the fit with reference draws (bbvi.compare: per parameter, the error of\n"
                    "the mean and the quantiles in reference sds, the sd ratio, a verdict good/fair/poor), print\n"
                    "the overall verdict and the whole table, and write DIR/compare.csv.",
        epilog="example:\n  bbvi compare my_model.py:model --reference results/ref/reference.nc \\\n"
               "      --estimator score --baseline loo --out results/cmp")
    _add_model_arg(c)
    c.add_argument("--reference", required=True, metavar="FILE.nc",
                   help="reference draws: an ArviZ netCDF file with a posterior group (e.g. from `bbvi nuts`)")
    _add_fit_options(c)

    d = sub.add_parser("demo", help="fit a bundled model, check it against NUTS, write plots and a summary",
                       description="Fit the bundled eight-schools model several ways, check the fits against NUTS\n"
                                   "and posteriordb, and write plots and summary.md to --out.",
                       epilog="example:\n  python -m bbvi demo --quick --out results", formatter_class=fmt)
    d.add_argument("--out", default="results", help="output folder (default: results)")
    d.add_argument("--quick", action="store_true", help="fewer steps and draws (used by the tests)")
    return parser


def _one_line(message):
    return " ".join(str(message).split())


def _format_warning(message, category, filename, lineno, line=None):
    return f"bbvi: {category.__name__}: {message}\n"


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import demo   # imports the bundled models
        demo(args.out, quick=args.quick)
        return 0
    from bbvi import BBVIError, FitError
    commands = {"fit": cmd_fit, "nuts": cmd_nuts, "compare": cmd_compare}
    previous = warnings.formatwarning
    warnings.formatwarning = _format_warning      # shown on stderr, without bbvi's source line
    try:
        commands[args.command](args)
    except FitError as e:
        sys.stderr.write(f"bbvi: error: the fit failed: {_one_line(e)}\n")
        sys.exit(1)
    except (BBVIError, _UsageError, FileNotFoundError, ImportError, SyntaxError) as e:
        message = f"{e.filename}: {e.strerror}" if isinstance(e, FileNotFoundError) and e.filename else e
        if isinstance(e, ImportError) and not isinstance(e, BBVIError):
            message = f"cannot import the model file {args.model!r}: {e}"
        elif isinstance(e, SyntaxError):
            message = f"the model file {args.model!r} is not valid Python: {e}"
        sys.stderr.write(f"bbvi: error: {_one_line(message)}\n")
        sys.exit(2)
    except BrokenPipeError:                       # `bbvi fit ... | head`: the files are written; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    finally:
        warnings.formatwarning = previous
    return 0


if __name__ == "__main__":
    main()
