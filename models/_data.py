"""Bundled posteriordb data (models/posteriordb/, BSD-3, see its LICENSE): data and reference draws."""
import json
import os

import torch

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "posteriordb")


def folder(posterior_name):
    path = os.path.join(HERE, posterior_name)
    if not os.path.isdir(path):
        raise KeyError(f"no bundled posteriordb posterior {posterior_name!r}; have {sorted(names())}")
    return path


def names():
    return sorted(d for d in os.listdir(HERE) if os.path.isdir(os.path.join(HERE, d)))


def data(posterior_name, dtype=torch.float64):
    """data.json with every number list as a tensor (ints stay Python ints)."""
    with open(os.path.join(folder(posterior_name), "data.json")) as f:
        raw = json.load(f)
    return {k: torch.tensor(v, dtype=dtype) if isinstance(v, list) else v for k, v in raw.items()}


def reference(posterior_name):
    """The posteriordb reference draws (Stan NUTS, 10 chains x 1000) as arviz.InferenceData."""
    from bbvi.reference import from_draws
    path = folder(posterior_name)
    with open(os.path.join(path, "reference.json")) as f:
        nchains = json.load(f)["nchains"]
    return from_draws(os.path.join(path, "reference_draws.csv.gz"), num_chains=nchains)
