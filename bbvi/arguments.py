"""The checks every Result method shares for its arguments: a seed, a count, names picked from a mapping."""
import numbers

from .errors import ConfigError


SEED_LIMIT = 2 ** 63  # bbvi.fit's rule: a seed is an int in [0, 2**63)


def check_seed(seed, where):
    """The one rule for a seed, shared by every Result method and the same as bbvi.fit's: an int (not a bool)
    in [0, 2**63). Returns it as a Python int; anything else is a ConfigError naming `where`."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < SEED_LIMIT:
        raise ConfigError(f"{where}: seed must be an int in [0, 2**63) (as for bbvi.fit), got {seed!r}")
    return int(seed)


def check_count(name, value, where):
    """A count argument (num_draws, num_samples, num_particles): a positive int, else a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{where}: {name} must be a positive int, got {value!r}")
    return int(value)


def pick(mapping, names, what, listing):
    """The entries of `mapping` named by `names` (a name or a list), in that order; ConfigError listing the others."""
    names = [names] if isinstance(names, str) else list(names)
    missing = [n for n in names if n not in mapping]
    if missing:
        raise ConfigError(f"{what} {missing}; {listing} {list(mapping)}")
    return {n: mapping[n] for n in names}
