"""Names to families: 'meanfield' | 'fullrank' | 'lowrank' | 'flow', or any object with the family protocol.
Above families.py and flows.py (the flow extends the full-rank Gaussian), so that neither imports the other back."""
from .errors import ConfigError
from .families import FullRank, LowRank, MeanField

_FAMILIES = {"meanfield": MeanField, "fullrank": FullRank, "lowrank": LowRank, "flow": None}


PROTOCOL = ("init", "rsample", "sample", "log_prob", "entropy", "mean", "covariance", "marginal_sd")


def resolve_family(family):
    """'meanfield' | 'fullrank' | 'lowrank' | 'flow' | any object with the family protocol -> a family object."""
    if isinstance(family, str) and family in _FAMILIES:
        if family == "flow":
            from .flows import Flow  # imports zuko: only when asked for
            return Flow()
        return _FAMILIES[family]()
    if not isinstance(family, (str, type)) and family is not None:
        missing = [m for m in PROTOCOL if not callable(getattr(family, m, None))
                   and not (m == "entropy" and getattr(family, m, 0) is None)]
        if not missing:
            return family
        raise ConfigError(f"family {family!r} lacks {missing} of the family protocol {list(PROTOCOL)} "
                          f"(see bbvi/families.py)")
    raise ConfigError(f"family must be one of {sorted(_FAMILIES)} or a bbvi.MeanField/FullRank/LowRank/Flow object, "
                      f"got {family!r}")
