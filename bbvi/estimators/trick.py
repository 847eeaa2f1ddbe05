"""The log-derivative trick, written once: `fit`'s score terms and `bbvi.expectation` both build on these.

    grad_theta E_p[f] = E_p[(f - b) grad_theta log p_theta]        for any b that does not depend on the draw

As a surrogate it is written in the DiCE form (Foerster et al. 2018): the "magic box"
B(log p) = exp(log p - stop(log p)) has value 1 and derivative B * grad log p, to every order, so

    carrier = mean_s B(log p_s) (f_s - b_s)

has the score estimator as its gradient and unbiased higher derivatives too (the naive mean f log p gets the
second derivative wrong). `with_gradient(value, carrier)` gives the surrogate the estimate's value (mean f)
exactly and the carrier's derivatives. The baselines (baselines.py) supply b_s and the carrier.

bbvi.fit's steps need first derivatives only: they run the backward on the carrier alone (`estimate_parts`) and,
for bbvi's own per-particle baselines, leave the box out (`first_order_term`). Neither changes a bit of the
gradient: the box's value is exactly 1 and its backward multiplies by it.
"""
import torch

__all__ = ["magic_box", "with_gradient"]


def magic_box(log_prob):
    """exp(log_prob - stop(log_prob)): value 1, derivatives those of exp of log_prob (Foerster et al. 2018)."""
    return torch.exp(log_prob - log_prob.detach())


def with_gradient(value, carrier):
    """A scalar whose value is `value`, exactly, and whose derivatives (every order) are the `carrier`'s."""
    return value.detach() + (carrier - carrier.detach())
