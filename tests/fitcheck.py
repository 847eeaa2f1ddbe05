"""Shared assertion of the reliability tests."""
import torch


def assert_same_fit(a, b):
    assert torch.equal(a.elbo, b.elbo)
    for g in a.params:
        for k in a.params[g]:
            assert torch.equal(a.params[g][k], b.params[g][k]), (g, k)
    assert a.num_steps == b.num_steps and a.num_failed_steps == b.num_failed_steps


def recording(fn):
    """fn()'s value and the messages of the bbvi.ReliabilityWarnings it raised (every one, repeats included)."""
    import warnings

    import bbvi
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if issubclass(w.category, bbvi.ReliabilityWarning)]
