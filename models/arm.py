"""posteriordb's ARM posteriors (Gelman & Hill, *Data Analysis Using Regression and Multilevel/Hierarchical
Models*, 2006) as torch log-joints: the earnings, kidiq, kidiq_with_mom_work, mesquite and nes regressions and
the dogs logistic models.

Twenty-four of them are one Stan program shape, `y ~ normal(X beta, sigma)`, with the design matrix X built from
the data in Stan's `transformed data` block, improper flat priors on `beta` (and on `sigma > 0`) where the program
states none, and `sigma ~ cauchy(0, 2.5)` on `sigma > 0` in the three kidiq models: `regression(name)` builds any
of them from the table DESIGNS. Stan's `sd` is the sample sd (n - 1); it is used as Stan uses it.

The dogs models (ARM ch. 24) are logistic regressions on each dog's running counts of avoided and received shocks
before trial t. posteriordb dropped their reference draws in 2022 when it corrected the data (31 -> 30 dogs); the
bundled data and draws are the ones before that change, the ones Baudart & Mandel (2021) used.
"""
import math

import torch
from torch.distributions import Cauchy, Normal, constraints

import bbvi
from models._data import data as _data

__all__ = ["DESIGNS", "regression", "dogs", "dogs_log", "BUILDERS"]


def _sd(x):
    return x.std(correction=1)


def _ones(d):
    return torch.ones(int(d["N"]), dtype=torch.float64)


def _earnings(name):
    def design(d):
        log_earn, h, male = torch.log(d["earn"]), d["height"], d["male"]
        if name == "log10earn_height":
            return torch.log10(d["earn"]), [_ones(d), h]
        if name == "logearn_height":
            return log_earn, [_ones(d), h]
        if name == "logearn_height_male":
            return log_earn, [_ones(d), h, male]
        if name == "logearn_logheight_male":
            return log_earn, [_ones(d), torch.log(h), male]
        if name == "logearn_interaction_z":
            z = (h - h.mean()) / _sd(h)
            return log_earn, [_ones(d), z, male, z * male]
        raise KeyError(name)
    return design


def _kidiq(name):
    def design(d):
        hs, iq = d["mom_hs"], d["mom_iq"]
        columns = {"kidscore_momhs": [hs], "kidscore_momiq": [iq], "kidscore_momhsiq": [hs, iq]}[name]
        return d["kid_score"], [_ones(d)] + columns
    return design


def _mom_work(name):
    def design(d):
        hs, iq = d["mom_hs"], d["mom_iq"]
        if name == "kidscore_interaction_c":
            a, b = hs - hs.mean(), iq - iq.mean()
        elif name == "kidscore_interaction_c2":
            a, b = hs - 0.5, iq - 100
        elif name == "kidscore_interaction_z":
            a, b = (hs - hs.mean()) / (2 * _sd(hs)), (iq - iq.mean()) / (2 * _sd(iq))
        elif name == "kidscore_mom_work":
            w = d["mom_work"]
            return d["kid_score"], [_ones(d), (w == 2).double(), (w == 3).double(), (w == 4).double()]
        else:
            raise KeyError(name)
        return d["kid_score"], [_ones(d), a, b, a * b]
    return design


def _mesquite(name):
    def design(d):
        d1, d2, ch, th, dens, group = (d[k] for k in ("diam1", "diam2", "canopy_height", "total_height", "density",
                                                       "group"))
        if name == "mesquite":
            return d["weight"], [_ones(d), d1, d2, ch, th, dens, group]
        log_w = torch.log(d["weight"])
        volume, area, shape = torch.log(d1 * d2 * ch), torch.log(d1 * d2), torch.log(d1 / d2)
        if name == "logmesquite":
            return log_w, [_ones(d), torch.log(d1), torch.log(d2), torch.log(ch), torch.log(th), torch.log(dens),
                           group]
        if name == "logmesquite_logva":
            return log_w, [_ones(d), volume, area, group]
        if name == "logmesquite_logvash":
            return log_w, [_ones(d), volume, area, shape, torch.log(th), group]
        if name == "logmesquite_logvolume":
            return log_w, [_ones(d), volume]
        raise KeyError(name)
    return design


def _nes(d):
    age = d["age_discrete"]
    return d["partyid7"], [_ones(d), d["real_ideo"], d["race_adj"], (age == 2).double(), (age == 3).double(),
                           (age == 4).double(), d["educ1"], d["gender"], d["income"]]


# posterior name -> (design: data -> (response, [columns of X]), sigma's prior: None = flat, or a scale for
# half-Cauchy(0, scale))
DESIGNS = {
    **{f"earnings-{m}": (_earnings(m), None) for m in
       ("log10earn_height", "logearn_height", "logearn_height_male", "logearn_interaction_z", "logearn_logheight_male")},
    **{f"kidiq-{m}": (_kidiq(m), 2.5) for m in ("kidscore_momhs", "kidscore_momhsiq", "kidscore_momiq")},
    **{f"kidiq_with_mom_work-{m}": (_mom_work(m), None) for m in
       ("kidscore_interaction_c", "kidscore_interaction_c2", "kidscore_interaction_z", "kidscore_mom_work")},
    **{f"mesquite-{m}": (_mesquite(m), None) for m in
       ("mesquite", "logmesquite", "logmesquite_logva", "logmesquite_logvash", "logmesquite_logvolume")},
    **{f"nes{year}-nes": (_nes, None) for year in (1972, 1976, 1980, 1984, 1988, 1992, 1996)},
}


def design_matrix(name):
    """(y, X) of the posterior `name` as Stan's transformed data builds them: y (N,), X (N, K) with the
    intercept's column of ones first."""
    design, _ = DESIGNS[name]
    y, columns = design(_data(name))
    return y, torch.stack(columns, -1)


def regression(name):
    """The normal linear regression `name` of DESIGNS: beta (K,) flat, sigma > 0 flat or half-Cauchy."""
    y, X = design_matrix(name)
    _, sigma_scale = DESIGNS[name]
    half = math.log(2.0)

    def log_joint(z, data):
        beta, sigma = z["beta"], z["sigma"]
        lp = Normal(beta @ data["X"].T, sigma[:, None]).log_prob(data["y"]).sum(-1)
        if sigma_scale is not None:
            lp = lp + Cauchy(0.0, sigma_scale).log_prob(sigma) + half
        return lp

    return bbvi.Model(log_joint, {"beta": bbvi.Latent(shape=(X.shape[1],)),
                                  "sigma": bbvi.Latent(support=constraints.positive)},
                      data={"X": X, "y": y}, name=name)


def dogs_counts():
    """y, n_avoid, n_shock (each (dogs, trials)) as the Stan program's transformed parameters compute them:
    n_avoid[j, 1] = n_shock[j, 1] = 0; n_avoid[j, t] = n_avoid[j, t-1] + 1 - y[j, t-1];
    n_shock[j, t] = n_shock[j, t-1] + y[j, t-1]."""
    y = _data("dogs-dogs")["y"]
    prev = y[:, :-1]
    zero = torch.zeros_like(y[:, :1])
    n_avoid = torch.cat([zero, torch.cumsum(1 - prev, -1)], -1)
    n_shock = torch.cat([zero, torch.cumsum(prev, -1)], -1)
    return y, n_avoid, n_shock


def dogs():
    """dogs: logit P(avoid) = beta1 + beta2 n_avoid + beta3 n_shock; beta ~ normal(0, 100)."""
    y, n_avoid, n_shock = dogs_counts()

    def log_joint(z, data):
        b = z["beta"]
        logits = b[:, :1, None] + b[:, 1:2, None] * data["n_avoid"] + b[:, 2:3, None] * data["n_shock"]
        lik = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits, data["y"].expand_as(logits), reduction="none").sum((-1, -2))
        return Normal(0.0, 100.0).log_prob(b).sum(-1) + lik

    return bbvi.Model(log_joint, {"beta": bbvi.Latent(shape=(3,))},
                      data={"y": y, "n_avoid": n_avoid, "n_shock": n_shock}, name="dogs-dogs")


def dogs_log():
    """dogs_log: P(avoid) = inv_logit(beta1 n_avoid + beta2 n_shock); beta1 ~ uniform(-100, 0),
    beta2 ~ uniform(0, 100). Stan declares beta unconstrained and rejects draws outside the uniforms' ranges;
    here the ranges are beta's support (an interval with a bound per element), the same posterior."""
    y, n_avoid, n_shock = dogs_counts()

    def log_joint(z, data):
        b = z["beta"]
        logits = b[:, :1, None] * data["n_avoid"] + b[:, 1:2, None] * data["n_shock"]
        return -torch.nn.functional.binary_cross_entropy_with_logits(
            logits, data["y"].expand_as(logits), reduction="none").sum((-1, -2))   # the uniforms are constants

    box = constraints.interval(torch.tensor([-100.0, 0.0], dtype=torch.float64),
                               torch.tensor([0.0, 100.0], dtype=torch.float64))
    return bbvi.Model(log_joint, {"beta": bbvi.Latent(shape=(2,), support=box)},
                      data={"y": y, "n_avoid": n_avoid, "n_shock": n_shock}, name="dogs-dogs_log")


BUILDERS = {**{name: (lambda name=name: regression(name)) for name in DESIGNS},
            "dogs-dogs": dogs, "dogs-dogs_log": dogs_log}
