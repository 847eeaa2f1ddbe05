"""ELBO gradient estimators as surrogate objectives, and the control-variate baselines of the score terms.

With S particles from q and f_s = log p(x, z_s) - log q(z_s) (z_s from unconstrained u_s, the log-det-Jacobian
inside log p), the ELBO estimate is mean_s f_s. The estimators of its gradient in the variational parameters:

    score    g = mean_s (f_s - b_s) grad log q(z_s)                       score.py
    reparam  g = grad [ mean_s log p(T(loc + L eps_s)) + H(q) ]           pathwise.py
    stl      g = grad mean_s [ log p(u_s) - log q_{stop(theta)}(u_s) ]    pathwise.py
    auto     pathwise for continuous latents, score for discrete ones     auto.py
             and for a log-joint torch cannot differentiate
    arm, disarm  antithetic pairs for boolean latents (Yin & Zhou 2019;   antithetic.py
             Dong, Mnih & Tucker 2020), continuous latents pathwise
    vimco    the K-sample importance-weighted bound, leave-one-out        vimco.py
             signals per sample (Mnih & Rezende 2016); reports the bound
    relax    score terms with a learned control variate (an MLP trained    relax.py
             on the gradient's variance) and LOO: unbiased, black-box
             (Grathwohl et al. 2018)
    concrete the Concrete / Gumbel-softmax relaxation of the discrete       concrete.py
             latents, straight-through optional, temperature annealed:
             biased, opt-in (Maddison et al. 2017; Jang et al. 2017)
    sum_over exact sums over the support of chosen discrete latents       sums.py
             (Score/Auto(sum_over=...); local expectation gradients)

Discrete latents go through score terms (unless the estimator is arm/disarm): g_phi = mean_s (f_s - b_s) grad_phi log q_phi(k_s). Baselines
b_s (baselines.py) never depend on z_s. Particles whose log-joint is NaN/inf are dropped from the step (weight
zero) and counted (particles.py).

Where a new piece goes: a baseline is one class with `init_state` and `score_term` (baselines.py's protocol);
an estimator one class with `plan(model, report, num_particles) -> Plan`, whose continuous path has `name`,
`pathwise`, `alone` and optionally `terms` (score.py's protocol); pass an instance as estimator= or baseline=.
"""
from .antithetic import ARM, DisARM
from .concrete import Concrete
from .relax import RELAX
from .auto import Auto
from .baselines import CV, EMA, LOO, NoBaseline, resolve_baseline
from .particles import Particles, draw, evaluate, log_q
from .pathwise import STL, Reparam
from .plan import DEFAULT, Plan, estimate, init_baseline_state, plan_for, resolve_estimator
from .trick import magic_box, with_gradient
from .score import Score, ScorePath
from .vimco import VIMCO

__all__ = ["ARM", "DisARM", "VIMCO", "Concrete", "RELAX", "Score", "ScorePath", "Reparam", "STL", "Auto", "EMA", "LOO", "CV", "NoBaseline", "resolve_estimator",
           "resolve_baseline", "estimate", "Plan", "plan_for", "init_baseline_state", "with_gradient", "magic_box", "DEFAULT",
           "Particles", "draw", "evaluate", "log_q"]
