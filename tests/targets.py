"""Small models the tests use again and again. Each builds a fresh bbvi.Model; names and data are part of what
the tests read (a model's name goes into files and messages), so a target is only used where it is the same model
as the one it replaced."""
import torch
from torch.distributions import Normal

import bbvi


def two_latents(order=("a", "b"), name="ab", data=None):
    """a ~ N(shift, 1), b ~ N(-3, 1) (shift 3 in the data), latents declared in `order`."""
    def log_joint(z, data):
        return Normal(0.0, 1.0).log_prob(z["a"] - data["shift"]) + Normal(0.0, 1.0).log_prob(z["b"] + 3.0)
    return bbvi.Model(log_joint, latents={k: bbvi.Latent(()) for k in order},
                      data=data or {"shift": torch.tensor(3.0)}, name=name)


def std2():
    """x ~ N(0, I_2), one latent of shape (2,), named 'std2'."""
    return bbvi.Model(lambda z, d: Normal(0, 1).log_prob(z["x"]).sum(-1), {"x": bbvi.Latent(shape=(2,))},
                      name="std2")
