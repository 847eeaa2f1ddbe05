"""Write a checkpoint and a saved fit with the bbvi of the checkout sys.argv[1] into the folder sys.argv[2]. This
folder's files were written with the checkout of 203b334^ (the last commit before the loop's refactor, issue 34):

    git worktree add /tmp/before 203b334^ && python tests/data/before_the_loop_refactor/write.py /tmp/before OUT
"""
import os
import sys

sys.path.insert(0, sys.argv[1])
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import bbvi  # noqa: E402
from logreg import model, terms, total  # noqa: E402

assert bbvi.__file__.startswith(sys.argv[1])
torch.set_num_threads(1)
out = sys.argv[2]


def stop_at(k):
    return lambda s: s.step >= k


bbvi.fit(model(total), max_steps=400, checkpoint=f"{out}/adaptive_step130.ckpt", callbacks=[stop_at(130)],
         diagnose=False)
bbvi.fit(model(terms, plates=True), steps=60, subsample_size=40, estimator="reparam",
         checkpoint=f"{out}/minibatch_cv_step17.ckpt", callbacks=[stop_at(17)], diagnose=False)
fit = bbvi.fit(model(total), steps=60, diagnose=False)
fit.save(f"{out}/sgd_steps60.result")
print(fit.settings)
