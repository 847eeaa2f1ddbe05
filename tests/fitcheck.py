"""Shared assertion of the reliability tests."""
import torch


def assert_same_fit(a, b):
    assert torch.equal(a.elbo, b.elbo)
    for g in a.params:
        for k in a.params[g]:
            assert torch.equal(a.params[g][k], b.params[g][k]), (g, k)
    assert a.num_steps == b.num_steps and a.num_failed_steps == b.num_failed_steps
