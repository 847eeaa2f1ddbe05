"""The posteriordb posteriors bundled in models/posteriordb/, as torch log-joints (the ARM regressions among them
are built in models/arm.py).

Each matches its Stan model (the spec is models/posteriordb/<name>/model.md): the same priors, Stan's implicit
flat priors where the program states none, the same constraints, and latent names and shapes as the Stan
parameters (`theta[3]` is latent `theta` index 2). Constants Stan's `~` drops may differ; they do not change
the posterior. `load(name)` returns the `bbvi.Model`; `reference(name)` the Stan reference draws.

One constraint torch cannot state, garch's beta1 in (0, 1 - alpha1), is sampled as beta1_raw in (0, 1) with
beta1 = (1 - alpha1) * beta1_raw a derived quantity and log(1 - alpha1) added to the log-joint (the Jacobian,
as Stan adds it for a parameter-dependent bound). The tests check every log-joint against an independent
scipy evaluation at the reference draws.
"""
import math

import torch
from torch.distributions import Beta, Cauchy, Dirichlet, Gamma, Normal, Poisson, StudentT, constraints

import bbvi
from bbvi.constraints import ordered_vector, positive_ordered_vector
from models._data import data as _data
from models._data import names as _names
from models._data import reference  # noqa: F401  (re-exported)
from models.arm import BUILDERS as ARM

__all__ = ["load", "names", "reference", "BUILDERS", "FIRST_TEN"]

# The ten bundled first (the defaults, accuracy and natural-gradient experiments run on these; the yardstick
# experiment on Baudart & Mandel's 36 that are bundled)
FIRST_TEN = ("arK-arK", "diamonds-diamonds", "earnings-logearn_interaction", "eight_schools-eight_schools_centered",
             "eight_schools-eight_schools_noncentered", "garch-garch11", "gp_pois_regr-gp_pois_regr",
             "hmm_example-hmm_example", "low_dim_gauss_mix-low_dim_gauss_mix", "sblrc-blr")

_HALF = math.log(2.0)


def _half(dist, x):
    """log density of a distribution truncated to x > 0 when it is symmetric about 0 (adds log 2)."""
    return dist.log_prob(x) + _HALF


# ---- eight schools ------------------------------------------------------------------------------------------
def eight_schools_centered():
    from models.eight_schools import centered
    return centered


def eight_schools_noncentered():
    from models.eight_schools import model
    return model


# ---- regressions --------------------------------------------------------------------------------------------
def earnings_logearn_interaction():
    d = _data("earnings-logearn_interaction")
    data = {"log_earn": torch.log(d["earn"]), "height": d["height"], "male": d["male"]}

    def log_joint(z, data):
        b, sigma = z["beta"], z["sigma"]
        mean = (b[:, :1] + b[:, 1:2] * data["height"] + b[:, 2:3] * data["male"]
                + b[:, 3:4] * data["height"] * data["male"])
        return Normal(mean, sigma[:, None]).log_prob(data["log_earn"]).sum(-1)   # flat priors

    return bbvi.Model(log_joint, {"beta": bbvi.Latent(shape=(4,)), "sigma": bbvi.Latent(support=constraints.positive)},
                      data=data, name="earnings-logearn_interaction")


def blr(name="sblrc-blr"):
    """posteriordb's blr program; sblrc and sblri are its two simulated data sets (correlated and independent
    predictors)."""
    d = _data(name)

    def log_joint(z, data):
        beta, sigma = z["beta"], z["sigma"]
        return (Normal(0.0, 10.0).log_prob(beta).sum(-1) + _half(Normal(0.0, 10.0), sigma)
                + Normal(beta @ data["X"].T, sigma[:, None]).log_prob(data["y"]).sum(-1))

    return bbvi.Model(log_joint, {"beta": bbvi.Latent(shape=(5,)), "sigma": bbvi.Latent(support=constraints.positive)},
                      data={"X": d["X"], "y": d["y"]}, name=name)


def diamonds():
    d = _data("diamonds-diamonds")
    X = d["X"][:, 1:]
    means = X.mean(0)
    data = {"Xc": X - means, "Y": d["Y"], "means_X": means}

    def log_joint(z, data):
        b, icpt, sigma = z["b"], z["Intercept"], z["sigma"]
        mean = icpt[:, None] + b @ data["Xc"].T
        return (Normal(0.0, 1.0).log_prob(b).sum(-1) + StudentT(3.0, 8.0, 10.0).log_prob(icpt)
                + _half(StudentT(3.0, 0.0, 10.0), sigma)
                + Normal(mean, sigma[:, None]).log_prob(data["Y"]).sum(-1))

    def derived(z, data):
        return {"b_Intercept": z["Intercept"] - z["b"] @ data["means_X"]}

    return bbvi.Model(log_joint, {"b": bbvi.Latent(shape=(24,)), "Intercept": bbvi.Latent(),
                                  "sigma": bbvi.Latent(support=constraints.positive)},
                      data=data, name="diamonds-diamonds", derived=derived)


# ---- time series --------------------------------------------------------------------------------------------
def arK():
    d = _data("arK-arK")
    K, y = int(d["K"]), d["y"]
    T = len(y)
    lags = torch.stack([y[K - k:T - k] for k in range(1, K + 1)], -1)      # (T-K, K): y[t-k], t = K+1..T
    data = {"lags": lags, "target": y[K:]}

    def log_joint(z, data):
        alpha, beta, sigma = z["alpha"], z["beta"], z["sigma"]
        mean = alpha[:, None] + beta @ data["lags"].T
        return (Normal(0.0, 10.0).log_prob(alpha) + Normal(0.0, 10.0).log_prob(beta).sum(-1)
                + _half(Cauchy(0.0, 2.5), sigma) + Normal(mean, sigma[:, None]).log_prob(data["target"]).sum(-1))

    return bbvi.Model(log_joint, {"alpha": bbvi.Latent(), "beta": bbvi.Latent(shape=(K,)),
                                  "sigma": bbvi.Latent(support=constraints.positive)},
                      data=data, name="arK-arK")


def garch11():
    d = _data("garch-garch11")
    data = {"y": d["y"], "sigma1": float(d["sigma1"])}

    def log_joint(z, data):
        mu, a0, a1, raw = z["mu"], z["alpha0"], z["alpha1"], z["beta1_raw"]
        b1 = (1 - a1) * raw
        y = data["y"]
        sq = (y[None, :-1] - mu[:, None]) ** 2                         # (S, T-1): (y[t-1] - mu)^2
        var = torch.full_like(mu, data["sigma1"] ** 2)
        variances = [var]
        for t in range(sq.shape[1]):                                   # the recursion is sequential in t
            var = a0 + a1 * sq[:, t] + b1 * var
            variances.append(var)
        s = torch.stack(variances, -1).sqrt()
        return Normal(mu[:, None], s).log_prob(y).sum(-1) + torch.log1p(-a1)   # flat priors + Jacobian of beta1

    def derived(z, data):
        return {"beta1": (1 - z["alpha1"]) * z["beta1_raw"]}

    return bbvi.Model(log_joint, {"mu": bbvi.Latent(), "alpha0": bbvi.Latent(support=constraints.positive),
                                  "alpha1": bbvi.Latent(support=constraints.unit_interval),
                                  "beta1_raw": bbvi.Latent(support=constraints.unit_interval)},
                      data=data, name="garch-garch11", derived=derived)


def hmm_example():
    d = _data("hmm_example-hmm_example")

    def log_joint(z, data):
        mu = z["mu"]                                                      # (S, 2), positive ordered
        log_theta = torch.log(torch.stack([z["theta1"], z["theta2"]], -2))  # (S, from j, to k)
        y = data["y"]
        emit = Normal(mu[:, None, :], 1.0).log_prob(y[None, :, None])     # (S, N, K)
        g = emit[:, 0]
        for t in range(1, y.shape[0]):
            g = torch.logsumexp(g[:, :, None] + log_theta, dim=1) + emit[:, t]
        prior = Normal(3.0, 1.0).log_prob(mu[:, 0]) + Normal(10.0, 1.0).log_prob(mu[:, 1])
        return prior + torch.logsumexp(g, -1)

    return bbvi.Model(log_joint, {"theta1": bbvi.Latent(shape=(2,), support=constraints.simplex),
                                  "theta2": bbvi.Latent(shape=(2,), support=constraints.simplex),
                                  "mu": bbvi.Latent(shape=(2,), support=positive_ordered_vector)},
                      data={"y": d["y"]}, name="hmm_example-hmm_example")


def log_matrix_product(m):
    """The product of the matrices m[:, 0] m[:, 1] ... m[:, T-1] in the log semiring (logsumexp for sum, + for
    product): (S, T, K, K) -> (S, K, K), by pairwise products in log2(T) vectorized rounds instead of T
    sequential ones (the forward algorithm's recursion, associated differently; the same sum)."""
    while m.shape[1] > 1:
        odd = m[:, -1:] if m.shape[1] % 2 else m[:, :0]
        pairs = m[:, : m.shape[1] - odd.shape[1]]
        a, b = pairs[:, 0::2], pairs[:, 1::2]
        m = torch.cat([torch.logsumexp(a[..., :, :, None] + b[..., None, :, :], dim=-2), odd], 1)
    return m[:, 0]


def hmm_drive_1():
    """bball_drive_event_1's two-state HMM (none / drive) on 1/speed u and hoop distance v, states summed out by
    the forward algorithm: theta1, theta2 simplex[2] (rows of the transition matrix) with Dirichlet(alpha[k])
    priors, phi and lambda ordered[2] (the states' emission means) with normal priors, emission sds tau and rho
    fixed by the data."""
    d = _data("bball_drive_event_1-hmm_drive_1")
    data = {"u": d["u"], "v": d["v"], "alpha": d["alpha"], "tau": float(d["tau"]), "rho": float(d["rho"])}

    def log_joint(z, data):
        phi, lam = z["phi"], z["lambda"]                                  # (S, 2), ordered
        theta = torch.stack([z["theta1"], z["theta2"]], -2)               # (S, from j, to k)
        alpha = data["alpha"]
        prior = (Dirichlet(alpha[0]).log_prob(z["theta1"]) + Dirichlet(alpha[1]).log_prob(z["theta2"])
                 + Normal(0.0, 1.0).log_prob(phi[:, 0]) + Normal(3.0, 1.0).log_prob(phi[:, 1])
                 + Normal(0.0, 1.0).log_prob(lam[:, 0]) + Normal(3.0, 1.0).log_prob(lam[:, 1]))
        emit = (Normal(phi[:, None, :], data["tau"]).log_prob(data["u"][None, :, None])
                + Normal(lam[:, None, :], data["rho"]).log_prob(data["v"][None, :, None]))   # (S, N, K)
        steps = torch.log(theta)[:, None] + emit[:, 1:, None, :]          # (S, N-1, j, k): into k at t
        return prior + torch.logsumexp(emit[:, 0] + torch.logsumexp(log_matrix_product(steps), -1), -1)

    return bbvi.Model(log_joint, {"theta1": bbvi.Latent(shape=(2,), support=constraints.simplex),
                                  "theta2": bbvi.Latent(shape=(2,), support=constraints.simplex),
                                  "phi": bbvi.Latent(shape=(2,), support=ordered_vector),
                                  "lambda": bbvi.Latent(shape=(2,), support=ordered_vector)},
                      data=data, name="bball_drive_event_1-hmm_drive_1")


# ---- mixtures and GPs ---------------------------------------------------------------------------------------
def low_dim_gauss_mix():
    d = _data("low_dim_gauss_mix-low_dim_gauss_mix")

    def log_joint(z, data):
        mu, sigma, theta = z["mu"], z["sigma"], z["theta"]
        y = data["y"][None, :]
        a = torch.log(theta)[:, None] + Normal(mu[:, :1], sigma[:, :1]).log_prob(y)
        b = torch.log1p(-theta)[:, None] + Normal(mu[:, 1:], sigma[:, 1:]).log_prob(y)
        return (_half(Normal(0.0, 2.0), sigma).sum(-1) + Normal(0.0, 2.0).log_prob(mu).sum(-1)
                + Beta(5.0, 5.0).log_prob(theta) + torch.logaddexp(a, b).sum(-1))

    return bbvi.Model(log_joint, {"mu": bbvi.Latent(shape=(2,), support=ordered_vector),
                                  "sigma": bbvi.Latent(shape=(2,), support=constraints.positive),
                                  "theta": bbvi.Latent(support=constraints.unit_interval)},
                      data={"y": d["y"]}, name="low_dim_gauss_mix-low_dim_gauss_mix")


def gp_cholesky(x, rho, alpha):
    """L of alpha^2 exp(-(x_i - x_j)^2 / (2 rho^2)) + 1e-10 I, batched over particles: (S, N, N)."""
    sq = (x[:, None] - x[None, :]) ** 2
    cov = alpha[:, None, None] ** 2 * torch.exp(-sq / (2 * rho[:, None, None] ** 2))
    return torch.linalg.cholesky(cov + 1e-10 * torch.eye(len(x), dtype=x.dtype, device=x.device))


def gp_pois_regr():
    d = _data("gp_pois_regr-gp_pois_regr")

    def f_of(z, data):
        L = gp_cholesky(data["x"], z["rho"], z["alpha"])
        return (L @ z["f_tilde"][..., None]).squeeze(-1)

    def log_joint(z, data):
        f = f_of(z, data)
        rho = z["rho"]
        # torch's Gamma.log_prob casts its value to the dtype of the Gamma's parameters: build them in rho's
        # dtype, or a float64 fit would see rho rounded to float32
        return (Gamma(rho.new_tensor(25.0), rho.new_tensor(4.0)).log_prob(rho) + _half(Normal(0.0, 2.0), z["alpha"])
                + Normal(0.0, 1.0).log_prob(z["f_tilde"]).sum(-1)
                + Poisson(torch.exp(f)).log_prob(data["k"]).sum(-1))

    return bbvi.Model(log_joint, {"rho": bbvi.Latent(support=constraints.positive),
                                  "alpha": bbvi.Latent(support=constraints.positive),
                                  "f_tilde": bbvi.Latent(shape=(11,))},
                      data={"x": d["x"], "k": d["k"]}, name="gp_pois_regr-gp_pois_regr",
                      derived=lambda z, data: {"f": f_of(z, data)})


BUILDERS = {
    "arK-arK": arK,
    "diamonds-diamonds": diamonds,
    "earnings-logearn_interaction": earnings_logearn_interaction,
    "eight_schools-eight_schools_centered": eight_schools_centered,
    "eight_schools-eight_schools_noncentered": eight_schools_noncentered,
    "garch-garch11": garch11,
    "gp_pois_regr-gp_pois_regr": gp_pois_regr,
    "hmm_example-hmm_example": hmm_example,
    "low_dim_gauss_mix-low_dim_gauss_mix": low_dim_gauss_mix,
    "sblrc-blr": blr,
    "sblri-blr": lambda: blr("sblri-blr"),
    "bball_drive_event_1-hmm_drive_1": hmm_drive_1,
    **ARM,
}


def names():
    return sorted(n for n in _names() if n in BUILDERS)


def load(name):
    """The bbvi.Model of the posteriordb posterior `name` (see names())."""
    if name not in BUILDERS:
        raise KeyError(f"unknown posterior {name!r}; have {sorted(BUILDERS)}")
    return BUILDERS[name]()
