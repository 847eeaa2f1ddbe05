"""VIMCO (Mnih & Rezende 2016): the K-sample importance-weighted bound and a gradient estimator for it with a
leave-one-out learning signal per sample. With K = num_particles draws h_k from q, w_k = p(x, h_k) / q(h_k),

    L_K = log (1/K) sum_k w_k                       (>= the ELBO, -> log p(x) as K grows; Burda et al. 2016)
    g   = sum_k (L_K - L_K^{-k}) grad log q(h_k) - sum_k w~_k grad log q(h_k),    w~ = w / sum w

where L_K^{-k} is L_K with w_k replaced by the geometric mean of the other weights: a baseline for sample k
that does not depend on h_k, so g is unbiased for grad E[L_K]. Every latent goes through log q (the score path),
so it serves discrete latents and log-joints torch cannot differentiate. The value a step reports, and so
`fit.elbo`, is the bound L_K, not the ELBO: `fit.settings['objective']` says so.
"""
import dataclasses
import math

import torch

__all__ = ["VIMCO"]


@dataclasses.dataclass(frozen=True)
class VIMCO:
    """The K-sample importance-weighted bound with VIMCO's leave-one-out signals; K = num_particles (>= 2)."""

    name = "vimco"
    objective = "the importance-weighted bound L_K (K = num_particles; VIMCO), not the ELBO"

    def plan(self, model, report, num_particles):
        from ..errors import ConfigError
        from .record import Plan
        from .score import ScorePath
        if num_particles < 2:
            raise ConfigError(f"estimator='vimco' needs num_particles >= 2 (the K samples of its bound; each "
                              f"sample's baseline comes from the others), got {num_particles}")
        return Plan(ScorePath() if model.dim else None, None, bool(model.discrete), whole=self)

    def estimate(self, model, family, discrete, params, num_particles, generator):
        """(surrogate, num_bad, error): value L_K, gradient g. NaN/inf particles have weight zero and no signal."""
        from .particles import draw, evaluate, log_q
        from .trick import magic_box, with_gradient
        u, k = draw(model, family, discrete, params, num_particles, generator)
        p = evaluate(model, u, k, grad=False)
        lq_c, lq_d = log_q(model, family, discrete, params, u, k)
        lq = lq_c if lq_d is None else (lq_d if lq_c is None else lq_c + lq_d)
        log_w = torch.where(p.valid, p.log_p - lq.detach(), torch.full_like(p.log_p, -math.inf))
        n = p.valid.sum()
        bound = torch.logsumexp(log_w, 0) - torch.log(n.to(log_w.dtype))
        if int(n) < 2:  # no sample has another to lean on: the value, no gradient
            return with_gradient(bound, lq.sum() * 0), p.num_bad, p.error
        finite = torch.where(p.valid, log_w, torch.zeros_like(log_w))
        others = (finite.sum() - finite) / (n - 1)          # mean of the other samples' log weights
        loo = log_w.unsqueeze(0).repeat(log_w.shape[0], 1)   # row k: log_w with sample k replaced
        loo.diagonal().copy_(others)
        bound_minus = torch.logsumexp(loo, 1) - torch.log(n.to(log_w.dtype))
        signal = torch.where(p.valid, bound - bound_minus, torch.zeros_like(bound_minus)).detach()
        w = torch.softmax(log_w, 0).detach()
        carrier = (signal * magic_box(lq)).sum() - (w * lq).sum()
        return with_gradient(bound, carrier), p.num_bad, p.error
