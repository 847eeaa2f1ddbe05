"""Reading a saved fit back (`bbvi.load`): the file's q, settings and trace on the model given, checked against it
(latents and their order, the family), as a Result. Writing it is `Result.save`."""

from .errors import ConfigError
from .fit_options import FitOptions
from .result import Result
from .saving import check_signature, object_from, plan_from, read
from .subsample import sizes


def _saved_family_name(cfg):
    if cfg is None:
        return "none"
    fields = cfg.get("fields") or {}
    return f"{cfg['type']}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


def _check_loaded_family(family, saved_cfg, params, dim, path):
    """ConfigError when `family` (given to bbvi.load) cannot hold the saved parameters: its parameters (names
    and shapes, from family.init at the saved dimension) must be those in the file."""
    if not dim or not params:
        return
    loc = next(iter(params.values())).new_zeros(dim)
    try:
        expected = family.init(dim, loc)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - a family whose init cannot run here: nothing to compare with
        return
    want = {k: tuple(t.shape) for k, t in expected.items()}
    got = {k: tuple(t.shape) for k, t in params.items()}
    if want != got:
        raise ConfigError(f"bbvi.load({str(path)!r}): the file holds a fit with family {_saved_family_name(saved_cfg)} "
                          f"(parameters {got}), but family={family!r} was given, whose parameters are {want}: leave "
                          f"family out to use the saved {saved_cfg['type'] if saved_cfg else 'family'}, or pass one "
                          f"of the same kind (family= is for a saved family bbvi cannot rebuild by itself)")


def load_result(path, model, device="cpu", family=None):
    """A Result saved by `Result.save`, attached to `model` (the same latents; its data may be new). `family`:
    the family object, needed only when the saved one is a class bbvi cannot rebuild from the file."""
    from . import families
    from .families import Discrete
    from .family_names import resolve_family
    from .model import CheckReport
    saved = read(path, "result")
    check_signature(saved["model"], model, path)
    params = {g: {k: t.to(device) for k, t in grp.items()} for g, grp in saved["params"].items()}
    dtype = next(t for grp in params.values() for t in grp.values()).dtype
    if saved["preconditioner"]:
        model = model.preconditioned(*saved["preconditioner"])
    model = model.to(device, dtype)
    if family is None:
        from types import SimpleNamespace

        from .flows import Flow
        family = object_from(saved["family"], SimpleNamespace(**vars(families), Flow=Flow), "family")
    else:
        family = resolve_family(family)
        _check_loaded_family(family, saved["family"], params["continuous"], model.dim, path)
    options = FitOptions.from_saved(saved)   # typed, or read back from the settings' text of an older file
    return Result(model=model, family=family, discrete=Discrete.for_model(model), plan=plan_from(saved["plan"]),
                  report=CheckReport(saved["report"]["differentiable"], tuple(saved["report"]["nondifferentiable"])),
                  params=params, elbo=saved["elbo"], settings=dict(saved["settings"]), status=saved["status"],
                  num_steps=saved["num_steps"], num_failed_steps=saved["num_failed_steps"],
                  num_bad_particles=saved["num_bad_particles"], wall_time=saved["wall_time"],
                  num_rescaled_steps=saved["num_rescaled_steps"],
                  baseline_state={k: v.to(device) for k, v in saved["baseline_state"].items()},
                  batch=saved["batch"] if "batch" in saved else _saved_batch(options.subsample_size, model),
                  num_particles=saved.get("num_particles", None) or options.num_particles,
                  subsample_cv=saved.get("subsample_cv", options.subsample_cv), options=options)


def _saved_batch(size, model):
    """{plate: B} of a saved minibatch fit (subsample_size: an int or {plate: B}), or None."""
    if size is None:
        return None
    n = sizes(model)
    return {p: min(b, n[p]) for p, b in (size if isinstance(size, dict) else {p: size for p in n}).items()}
