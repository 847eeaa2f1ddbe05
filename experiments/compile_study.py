"""compile=True two ways (issue 34, "compile what the eager path runs"): bbvi.compiled.CompiledStep (a hand-written
pure function of the step, make_fx + Inductor with the C++ wrapper) against torch.compile applied to what the eager
step itself runs, with the eager step (algorithms/sgd.py) as the reference. Not run by `make test`; the numbers it
gave are in bbvi/compiled.py's module docstring.

The traced-eager contenders run bbvi.step unchanged (its host verdict, skip-and-count, retry with the particles'
check, Record/Info, torch.optim.Adam's state) with two of its pieces compiled:
    traced       the estimator (estimate_parts, on the step's fast path: checked=False, guard=False; the redone steps
                 stay eager) under torch.compile, its backward by AOTAutograd, and Adam's step compiled as PyTorch
                 documents for compiled optimizers (torch.compile of a function calling opt.step())
    traced_nf    the same, with the noise drawn eagerly first from the same generator (the estimator's one graph
                 break, torch.randn(generator=...), moved out of the compiled region)
    traced_est   `traced` with torch.optim.Adam's step left eager
and (first configuration only) `whole`: torch.compile of sgd._update, breaking the graph wherever dynamo must.

For each configuration (model x family x estimator) in its own process, with Inductor's caches off:
compile seconds (the first two calls less two steady steps), per-step ms (median of --repeats rounds of --steps
steps, the contenders interleaved round-robin in one process), the dynamo graph breaks and recompiles, and the
agreement with the eager step after --agree steps from the same seed (max |difference| of the parameters, float64,
cosine schedule: the learning rate changes at every step).

    python experiments/compile_study.py            # every configuration, one subprocess each
    python experiments/compile_study.py logreg meanfield reparam   # one
"""
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))
warnings.filterwarnings("ignore")

CONFIGS = [(m, f, e) for m in ("logreg", "diamonds") for f in ("meanfield", "fullrank") for e in ("reparam", "score")]


def model_of(name):
    import bbvi
    if name == "logreg":   # experiments/bench.py's: N = 1000, D = 10
        from bench import log_joint, make_data
        X, y = make_data(1000, 10)
        return bbvi.Model(log_joint, {"w": bbvi.Latent(shape=(10,))}, data={"X": X, "y": y}, name="logreg")
    from models import posteriordb   # diamonds: 26 latents, N = 5000
    return posteriordb.load("diamonds-diamonds")


def contenders():
    """(the traced-eager step builders, the function that runs one eager step with the pieces compiled)."""
    import torch

    import bbvi
    from bbvi.algorithms import sgd
    from bbvi.families import _Gaussian

    eager_est = sgd.estimate_parts
    compiled_est = torch.compile(eager_est)
    noise, eager_noise = [None], _Gaussian._noise

    def given_noise(self, params, num, generator, width=None):
        return noise[0]

    def fast(a, k):   # the step's fast path: no particles' check, no pathwise guard (the score path has none)
        return not k.get("checked", True) and not (k.get("guard", True) and a[0].continuous.pathwise)

    def est(*a, **k):   # the fast path compiled; a step redone with the checks stays eager
        if not fast(a, k):
            return eager_est(*a, **k)
        return compiled_est(*a, **k)

    def est_nf(*a, **k):
        if not fast(a, k):
            return eager_est(*a, **k)
        family, params, num, generator = a[2], a[4], a[5], a[6]
        noise[0] = eager_noise(family, params["continuous"], num, generator)
        _Gaussian._noise = given_noise
        try:
            return compiled_est(*a, **k)
        finally:
            _Gaussian._noise = eager_noise

    def traced(state, estimate=est, adam=True):
        opt_step = state.optimizer.step

        @torch.compile(fullgraph=False)
        def compiled_opt_step():   # https://pytorch.org/tutorials/recipes/compiling_optimizer.html
            opt_step()
        if adam:
            state.optimizer.step = compiled_opt_step

        def run():
            sgd.estimate_parts = estimate
            try:
                return bbvi.step(state)
            finally:
                sgd.estimate_parts = eager_est
        return run
    return traced, est_nf


def one(model_name, family, estimator, steps, repeats, agree):
    import torch

    import bbvi
    from bbvi.compiled import CompiledStep
    from torch._dynamo.utils import counters
    torch.set_num_threads(1)
    model = model_of(model_name)
    traced, est_nf = contenders()

    def init(**kw):
        kw = dict(dict(num_particles=16, lr=0.01, schedule=None, steps=1000, seed=0, init_strategy="zero"), **kw)
        return bbvi.init(model, family, estimator, "loo" if estimator == "score" else "default", **kw)

    def build(kind, state):
        if kind == "eager":
            return lambda: bbvi.step(state)
        if kind == "CompiledStep":
            state.compiled = CompiledStep(state)
            return lambda: bbvi.step(state)
        if kind == "traced_est":
            return traced(state, adam=False)
        return traced(state) if kind == "traced" else traced(state, est_nf)

    kinds = ["eager", "CompiledStep", "traced", "traced_nf", "traced_est"]
    row = {"model": model_name, "family": family, "estimator": estimator, "torch": torch.__version__}
    runners, compile_s = {}, {}
    for kind in kinds:
        state = init()
        run = build(kind, state)
        breaks = sum(counters["graph_break"].values())
        t = time.perf_counter()
        run(), run()
        compile_s[kind] = time.perf_counter() - t
        row[f"breaks_{kind}"] = sum(counters["graph_break"].values()) - breaks
        runners[kind] = run
    times = {k: [] for k in kinds}
    for _ in range(repeats):
        for kind in kinds:
            for _ in range(10):
                runners[kind]()
            t = time.perf_counter()
            for _ in range(steps):
                runners[kind]()
            times[kind].append((time.perf_counter() - t) / steps * 1e3)
    for kind in kinds:
        row[f"ms_{kind}"] = statistics.median(times[kind])
        row[f"ms_all_{kind}"] = [round(x, 4) for x in times[kind]]
        row[f"compile_s_{kind}"] = compile_s[kind] - 2 * row[f"ms_{kind}"] / 1e3
    row["graph_breaks"] = {k.splitlines()[0][:120]: v for k, v in counters["graph_break"].items()}
    # agreement with the eager step: float64, the cosine schedule (lr changes every step), `agree` steps
    finals = {}
    for kind in kinds:
        state = init(schedule="auto", steps=agree, lr=0.05, seed=3)
        run = build(kind, state)
        frames = counters["stats"]["unique_graphs"]
        for _ in range(agree):
            run()
        finals[kind] = ({k: v.detach().clone() for k, v in state.params["continuous"].items()},
                        int(state.record.num_bad_particles))
        row[f"new_graphs_{kind}"] = counters["stats"]["unique_graphs"] - frames
    ref = finals["eager"][0]
    for kind in kinds[1:]:
        row[f"maxdiff_{kind}"] = max(float((finals[kind][0][k] - ref[k]).abs().max()) for k in ref)
        row[f"bad_{kind}"] = finals[kind][1]
    row["bad_eager"] = finals["eager"][1]
    return row


def main():
    args = sys.argv[1:]
    steps, repeats, agree = 100, 5, 200
    if len(args) == 3:
        print(json.dumps(one(*args, steps, repeats, agree)))
        return
    configs = [c for c in CONFIGS if not args or c[2] in args]   # e.g. `compile_study.py score`: those only
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    rows = []
    for config in configs:
        out = subprocess.run([sys.executable, __file__, *config], capture_output=True, text=True, env=env)
        line = [x for x in out.stdout.splitlines() if x.startswith("{")]
        if not line:
            print(config, "failed:", out.stderr[-2000:])
            continue
        rows.append(json.loads(line[-1]))
        r = rows[-1]
        print(" ".join(config), " ".join(f"{k} {r['ms_' + k]:.3f} ms ({r['compile_s_' + k]:.1f} s)"
                                          for k in ("eager", "CompiledStep", "traced", "traced_nf",
                                                                                  "traced_est")), flush=True)
    with open(os.environ.get("COMPILE_STUDY_OUT", "/tmp/compile_study.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
