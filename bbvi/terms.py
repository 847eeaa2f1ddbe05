"""A log-joint may return a dict of named factor terms instead of one tensor: `terms_matrix` lays them out as
(S, E), every term element one column."""
import torch


def terms_matrix(terms):
    """dict of factor terms, each (S,) or (S, n, ...) -> (S, E): every term element, in order, one column each."""
    return torch.cat([v.reshape(v.shape[0], -1) for v in terms.values()], -1)
