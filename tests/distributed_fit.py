"""A data-parallel fit for tests/test_distributed.py, run under torchrun:

    torchrun --nproc_per_node=2 tests/distributed_fit.py OUT [--then-kill-at STEP] [--resume]

Every rank fits the same logistic regression (N = 2000, D = 3, plates {"obs": ("X", "y")}) with
distributed=True and writes its fitted parameters, ELBO trace and status to OUT.full.<rank>.pt (checkpoints in
OUT.full.ck, every 100 steps). --then-kill-at STEP: then the same fit again, checkpointed to OUT.kill.ck, whose
rank 1 kills itself (SIGKILL) after STEP steps. --resume: resume that fit from OUT.kill.ck, writing
OUT.kill.<rank>.pt. --raise-at STEP: a fit whose rank 1's callback raises at STEP, each rank's FitError written to
OUT.raise.<rank>.pt.
"""
import argparse
import os
import signal

import torch
import torch.distributed as dist

import bbvi

N, D, STEPS, BATCH = 2000, 3, 600, 250
SETTINGS = dict(family="fullrank", estimator="reparam", steps=STEPS, lr=0.05, seed=0, progress=False,
                subsample_size=BATCH, diagnose=False)


def model():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)), generator=g)

    def log_joint(z, data):
        eta = z["beta"] @ data["X"].T
        return {"prior": torch.distributions.Normal(0.0, 1.0).log_prob(z["beta"]).sum(-1),
                "obs": -torch.nn.functional.binary_cross_entropy_with_logits(eta, data["y"].expand_as(eta),
                                                                             reduction="none")}
    return bbvi.Model(log_joint, {"beta": bbvi.Latent((D,))}, data={"X": X, "y": y}, plates={"obs": ("X", "y")},
                      name="logistic")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--then-kill-at", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--raise-at", type=int)
    args = ap.parse_args()
    torch.set_num_threads(1)

    def kill(state):
        if dist.get_rank() == 1 and state.step == args.then_kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return False

    def run(name, **kw):
        fit = bbvi.fit(model(), distributed=True, checkpoint=f"{args.out}.{name}.ck", checkpoint_every=100,
                       **kw, **SETTINGS)
        torch.save({"params": fit.params, "elbo": fit.elbo, "status": fit.status,
                    "settings": {k: str(v) for k, v in fit.settings.items()}, "mean": fit.unconstrained_mean(),
                    "cov": fit.unconstrained_covariance(), "num_steps": fit.num_steps},
                   f"{args.out}.{name}.{dist.get_rank()}.pt")
    if args.resume:
        run("kill", resume=f"{args.out}.kill.ck")
        return
    if args.raise_at:   # rank 1's callback raises: every rank must end with a FitError holding its fit
        def fail(state):
            if dist.get_rank() == 1 and state.step == args.raise_at:
                raise ValueError("a callback's own bug")
            return False
        try:
            bbvi.fit(model(), distributed=True, callbacks=[fail], **dict(SETTINGS, diagnose=True))
        except bbvi.FitError as e:
            torch.save({"error": str(e), "num_steps": e.result.num_steps, "params": e.result.params},
                       f"{args.out}.raise.{dist.get_rank()}.pt")
        return
    run("full")
    if args.then_kill_at:
        run("kill", callbacks=[kill])


if __name__ == "__main__":
    main()
