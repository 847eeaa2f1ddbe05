"""`FitOptions`: what a fit ran with, typed. bbvi.fit builds it from its keywords and, once the algorithm's `init`
has chosen its defaults, from the state (the family, the particle count, the estimator and plan, the dtype, the
start); `fit.options` holds it. `fit.settings` is its record as text (`record()`): what checkpoints compare on
resume, what a saved fit and `to_arviz()` keep, what the summary prints. Readers take the typed fields (the
method's name, the dtype, whether estimator='auto' chose the estimator) rather than parsing that text back; the
one place text is read back is `from_record`, for a fit saved before the options were saved typed (2026-12-07)."""
import ast
import dataclasses

import torch

from .config import describe

__all__ = ["FitOptions"]

_AUTO = " (method='auto': "


@dataclasses.dataclass(frozen=True)
class FitOptions:
    model: str
    method: str = "sgd"            # the algorithm that ran: 'sgd' | 'bam' | 'laplace' | an algorithm object's name
    why: str = None                # method='auto': why it chose `method`
    ran: str = None                # a call that ran more than one fit (bbvi.algorithms.fallback): what, in order
    family: str = None             # saving.describe(q's family)
    num_particles: int = None      # draws per step
    steps: int = None
    lr: float = None
    optimizer: str = "adam"        # checkpoint.setting(optimizer): stable text for a callable
    schedule: str = "auto"
    clip_grad: float = None
    tol_rel_obj: float = None
    seed: int = 0
    device: str = "cpu"
    init_strategy: str = "auto"
    max_steps: int = None
    subsample_size: object = None  # an int or {plate: B}, or None (full data)
    subsample_cv: bool = False     # minibatches with control variates
    distributed: int = None        # ranks of a data-parallel fit
    compile: bool = False
    objective: str = None          # a step whose value is not the ELBO says what it is (VIMCO)
    bias: str = None               # an estimator biased by design says so (Concrete)
    estimator: str = None          # saving.describe(the resolved estimator)
    auto_estimator: bool = False   # estimator='auto' chose it
    plan: str = None
    dtype: torch.dtype = None
    start: str = None              # the start's strategy ('map', 'zero', ...)
    extended: str = None           # what resuming with a new length did
    extra: tuple = ()              # (key, text) an algorithm object records beyond these (its `settings(state)`)

    def resolved(self, state, algorithm, estimator_text, auto_estimator):
        """These options with what the algorithm's init chose (from `state`) and what it records of itself."""
        whole = state.plan.whole
        done = dataclasses.replace(
            self, family=describe(state.family), num_particles=state.num_particles,
            objective=getattr(whole, "objective", None), bias=getattr(whole, "bias", None),
            estimator=estimator_text, auto_estimator=auto_estimator, plan=repr(state.plan),
            dtype=next(iter(state.leaves())).dtype, start=state.start.strategy)
        own = algorithm.settings(state) if callable(getattr(algorithm, "settings", None)) else {}
        if "estimator" in own:   # an algorithm with no estimator of fit's (bam, laplace) says what it uses
            own = {"auto_estimator": False, **own}
        return done.with_record(own)

    def with_record(self, entries):
        """These options with `entries` ({key: value}, as an algorithm's `settings(state)` gives them) set: a key
        that names a field sets it, any other is kept in `extra`."""
        names = {f.name for f in dataclasses.fields(self)} - {"extra"}
        extra = dict(self.extra)
        extra.update({k: v for k, v in entries.items() if k not in names})
        return dataclasses.replace(self, **{k: v for k, v in entries.items() if k in names},
                                   extra=tuple(extra.items()))

    def record(self):
        """The text record, `fit.settings`: the keys every fit writes, then those written only where they apply
        (so that checkpoints of fits without them compare as before)."""
        out = dict(model=self.model, family=self.family, num_particles=self.num_particles, steps=self.steps,
                   lr=self.lr, optimizer=self.optimizer, schedule=self.schedule, clip_grad=self.clip_grad,
                   tol_rel_obj=self.tol_rel_obj, seed=self.seed, device=self.device,
                   init_strategy=self.init_strategy, max_steps=self.max_steps)
        if self.subsample_size is not None:
            out["subsample_size"] = self.subsample_size
            if self.subsample_cv:
                out["subsample_cv"] = True
        if self.distributed is not None:
            out["distributed"] = self.distributed
        if self.method != "sgd":
            out["method"] = self.ran or self.method + (f"{_AUTO}{self.why})" if self.why else "")
        if self.compile:
            out["compile"] = True
        for key in ("objective", "bias"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.estimator is not None:
            out.update(estimator=self.estimator, plan=self.plan, dtype=str(self.dtype), start=self.start)
        out.update(self.extra)
        if self.extended is not None:
            out["extended"] = self.extended
        return out

    def saved(self):
        """The options as a saved fit keeps them (torch.load(weights_only=True) reads them back)."""
        out = dataclasses.asdict(self)
        out["dtype"] = str(self.dtype) if self.dtype is not None else None
        out["extra"] = [list(kv) for kv in self.extra]
        return out

    @classmethod
    def from_saved(cls, saved):
        """The options of a saved fit: typed where the file holds them, else read back from its text record."""
        if "options" not in saved:
            return cls.from_record(saved["settings"])
        o = dict(saved["options"])
        o["dtype"] = _dtype(o["dtype"])
        o["extra"] = tuple(tuple(kv) for kv in o["extra"])
        return cls(**o)

    @classmethod
    def from_record(cls, text):
        """The options of a fit saved before they were saved typed: its settings, every value as text."""
        def value(key, default=None):
            v = text.get(key)
            if v is None or v == "None":
                return default
            try:
                return ast.literal_eval(v)
            except (ValueError, SyntaxError):
                return v
        said = text.get("method", "sgd")
        method, why, ran = said.split("; then ", 1)[0], None, said if "; then " in said else None
        if method.endswith(")") and _AUTO in method:
            method, why = method[:-1].split(_AUTO, 1)
        names = {f.name for f in dataclasses.fields(cls)}
        typed = {"num_particles", "steps", "lr", "clip_grad", "tol_rel_obj", "seed", "max_steps",
                 "subsample_size", "subsample_cv", "distributed", "compile"}
        return cls(model=text.get("model"), method=method, why=why, ran=ran,
                   **{k: value(k) for k in typed if k in text},
                   **{k: text[k] for k in ("family", "optimizer", "schedule", "device", "init_strategy",
                                           "objective", "bias", "estimator", "plan", "start", "extended")
                      if k in text},
                   auto_estimator=text.get("estimator", "").startswith("Auto("),
                   dtype=_dtype(text.get("dtype")),
                   extra=tuple((k, v) for k, v in text.items() if k not in names))


def _dtype(text):
    """torch.float64 from 'torch.float64'; None for None."""
    if text is None:
        return None
    return getattr(torch, str(text).removeprefix("torch."))
