"""Names ArviZ and netCDF can hold: `check_arviz_names` refuses a variable named as one of ArviZ's dimensions,
`arviz_dims` names every array dimension without clashing with a variable."""
import numpy as np

from .errors import ModelError


_ARVIZ_DIMS = ("chain", "draw")


def check_arviz_names(names, where, what="latent"):
    """ModelError for a name ArviZ cannot hold: `chain` and `draw` are the dimensions of every draw (ArviZ
    drops the whole posterior group when a variable has their name)."""
    for name in names:
        if name in _ARVIZ_DIMS:
            raise ModelError(f"{where}: {what} {name!r} has the name of an ArviZ dimension ({', '.join(_ARVIZ_DIMS)}): "
                             f"an InferenceData cannot hold a variable of that name (ArviZ would drop the whole "
                             f"posterior). Rename the {what}, e.g. to {name + '_'!r}")


def arviz_dims(posterior):
    """dims for az.from_dict: `{name}_dim_{i}` (ArviZ's own names) unless that is the name of a variable or of
    another dimension, then `{name}_dim_{i}_` (with as many `_` as it takes): no variable is ever dropped for a
    dimension of the same name. `posterior`: name -> array (chain, draw, *shape)."""
    taken = set(posterior) | set(_ARVIZ_DIMS)
    dims = {}
    for name, v in posterior.items():
        dims[name] = []
        for i in range(np.ndim(v) - 2):
            d = f"{name}_dim_{i}"
            while d in taken:
                d += "_"
            taken.add(d)
            dims[name].append(d)
    return dims
