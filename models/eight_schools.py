"""Eight schools (Rubin 1981; Gelman et al., BDA), noncentered, exactly as posteriordb's
`eight_schools_noncentered`:

    theta_trans[j] ~ N(0, 1), mu ~ N(0, 5), tau ~ half-Cauchy(0, 5),
    y[j] ~ N(mu + tau * theta_trans[j], sigma[j]),   derived theta[j] = mu + tau * theta_trans[j].

`centered` is the same joint written with theta as the latent (a funnel: hard for every method)."""
from torch.distributions import Cauchy, Normal, constraints

import bbvi
from models._data import data as _data

POSTERIOR = "eight_schools-eight_schools_noncentered"
DATA = _data(POSTERIOR)


def log_joint(z, data):
    mu, tau, tt = z["mu"], z["tau"], z["theta_trans"]
    theta = mu[:, None] + tau[:, None] * tt
    return (Normal(0.0, 1.0).log_prob(tt).sum(-1) + Normal(0.0, 5.0).log_prob(mu)
            + Cauchy(0.0, 5.0).log_prob(tau) + Normal(theta, data["sigma"]).log_prob(data["y"]).sum(-1))


def derived(z, data):
    return {"theta": z["mu"][:, None] + z["tau"][:, None] * z["theta_trans"]}


model = bbvi.Model(log_joint, latents={"theta_trans": bbvi.Latent(shape=(8,)), "mu": bbvi.Latent(),
                                       "tau": bbvi.Latent(support=constraints.positive)},
                   data=DATA, name="eight_schools_noncentered", derived=derived)


def factors_log_joint(z, data):
    """The noncentered joint as factor terms: theta_trans[j] appears only in its prior and school j's term."""
    mu, tau, tt = z["mu"], z["tau"], z["theta_trans"]
    return {"prior_theta_trans": Normal(0.0, 1.0).log_prob(tt), "prior_mu": Normal(0.0, 5.0).log_prob(mu),
            "prior_tau": Cauchy(0.0, 5.0).log_prob(tau),
            "obs": Normal(mu[:, None] + tau[:, None] * tt, data["sigma"]).log_prob(data["y"])}


model_factors = bbvi.Model(factors_log_joint, latents=dict(model.latents), data=DATA,
                           name="eight_schools_noncentered_factors", derived=derived)


def centered_log_joint(z, data):
    mu, tau, theta = z["mu"], z["tau"], z["theta"]
    return (Normal(0.0, 5.0).log_prob(mu) + Cauchy(0.0, 5.0).log_prob(tau)
            + Normal(mu[:, None], tau[:, None]).log_prob(theta).sum(-1)
            + Normal(theta, data["sigma"]).log_prob(data["y"]).sum(-1))


centered = bbvi.Model(centered_log_joint, latents={"theta": bbvi.Latent(shape=(8,)), "mu": bbvi.Latent(),
                                                   "tau": bbvi.Latent(support=constraints.positive)},
                      data=DATA, name="eight_schools_centered")

def centered_factors_log_joint(z, data):
    """The centered joint as factor terms: theta[j] appears only in its prior term and school j's term."""
    mu, tau, theta = z["mu"], z["tau"], z["theta"]
    return {"prior_mu": Normal(0.0, 5.0).log_prob(mu), "prior_tau": Cauchy(0.0, 5.0).log_prob(tau),
            "prior_theta": Normal(mu[:, None], tau[:, None]).log_prob(theta),
            "obs": Normal(theta, data["sigma"]).log_prob(data["y"])}


centered_factors = bbvi.Model(centered_factors_log_joint, latents=dict(centered.latents), data=DATA,
                              name="eight_schools_centered_factors")

__all__ = ["model", "model_factors", "centered", "centered_factors", "POSTERIOR"]
