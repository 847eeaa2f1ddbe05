"""The physical floor of bench.py's step at large N: what the log-joint's own arithmetic and memory traffic cost
on this machine, and how close bbvi's compiled and eager steps, the hand-written step and NumPyro come to it.

Per step of bench.py's logistic regression (S particles, N rows, D coefficients), everything else in a step is
O(S D) and negligible at N = 1e5:
  matmul flops   4 S N D: logits = w X^T (2 S N D) and the gradient g_logits X (2 S N D); the score path
                 needs no gradient through the log-joint, so its matmul flops are 2 S N D
  transcendental per logit: softplus's exp and log1p, and (pathwise) the sigmoid of its gradient, an exp:
                 3 S N (reparam), 2 S N (score)
  memory         X (N D floats) read once per matmul: 2 N D x 4 bytes (reparam), 1 N D x 4 (score), and y;
                 the S x N logits need not leave the cache in a fused step, so they are not counted

The machine's peaks, measured here with the same thread count: float32 GEMM GFLOP/s (1024^3 torch.mm),
memory bandwidth GB/s (a 256 MB copy: read + write), and exp throughput in G/s (torch.exp, the best rate over
arrays of 2^15 to S N floats: cache-resident sizes included).
floor_ms = max(flops / GEMM peak, transcendentals / exp rate, bytes / bandwidth): the step if its three costs
overlapped perfectly at the machine's peaks (a lower bound no real step reaches: the matmul here has K = D = 10,
far from a GEMM's best shape). Each system's row: its ms per step, the GFLOP/s and GB/s that ms implies for the
counts above, and floor_ms / ms (1.0 would be at the floor).

Run by bench.py (`make bench`, after the per-step table, with every system's N = 1e5 time) into
results/floor.md; `python experiments/floor.py` alone times bbvi's compiled and eager steps and the hand-written
step itself.
"""
import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _best(fn, repeats=7, number=5):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t) / number)
    return min(times)


def machine_peaks(S, N):
    """{gemm_gflops, bandwidth_gbs, exp_gps}: this machine's float32 GEMM rate, copy bandwidth, exp rate."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    gemm = 2 * 1024 ** 3 / _best(lambda: torch.mm(a, b)) / 1e9
    big = torch.randn(64 * 2 ** 20, generator=g)   # 256 MB
    out = torch.empty_like(big)
    bandwidth = 2 * big.numel() * 4 / _best(lambda: out.copy_(big), repeats=5, number=2) / 1e9
    exp = 0.0
    for n in (2 ** 15, 2 ** 17, 2 ** 19, S * N):   # cache-resident sizes too: the best rate is the floor
        x = torch.randn(n, generator=g)
        y = torch.empty_like(x)
        exp = max(exp, n / _best(lambda x=x, y=y: torch.exp(x, out=y), number=max(5, 2 ** 20 // n)) / 1e9)
    return {"gemm_gflops": gemm, "bandwidth_gbs": bandwidth, "exp_gps": exp}


def counts(estimator, S, N, D):
    """(matmul flops, transcendentals, bytes) of one step's log-joint work (module docstring)."""
    if estimator == "reparam":
        return 4 * S * N * D, 3 * S * N, 2 * N * D * 4 + N * 4
    return 2 * S * N * D, 2 * S * N, N * D * 4 + N * 4


def floor_rows(times, peaks, S, N, D):
    """times: [(estimator, system, ms per step)] -> rows with the floor and what each ms achieves."""
    rows = []
    for est, system, ms in times:
        flops, transc, nbytes = counts(est, S, N, D)
        parts = {"flops": flops / (peaks["gemm_gflops"] * 1e9), "exp": transc / (peaks["exp_gps"] * 1e9),
                 "memory": nbytes / (peaks["bandwidth_gbs"] * 1e9)}
        floor_ms = 1e3 * max(parts.values())
        rows.append(dict(estimator=est, system=system, ms_per_step=ms, floor_ms=floor_ms,
                         bound_by=max(parts, key=parts.get), achieved_gflops=flops / (ms * 1e-3) / 1e9,
                         achieved_gbs=nbytes / (ms * 1e-3) / 1e9, floor_over_ms=floor_ms / ms))
    return rows


def describe(peaks, S, N, D):
    return (f"Machine peaks measured in the same run ({torch.get_num_threads()} threads): float32 GEMM "
            f"{peaks['gemm_gflops']:.1f} GFLOP/s, copy bandwidth {peaks['bandwidth_gbs']:.1f} GB/s, exp "
            f"{peaks['exp_gps']:.2f} G/s. Counts per step at S = {S}, N = {N}, D = {D}: reparam "
            f"{4 * S * N * D / 1e6:.0f} MFLOP of matmul, {3 * S * N / 1e6:.1f} M transcendentals, "
            f"{(2 * N * D * 4 + N * 4) / 1e6:.1f} MB of data read; score {2 * S * N * D / 1e6:.0f} MFLOP, "
            f"{2 * S * N / 1e6:.1f} M, {(N * D * 4 + N * 4) / 1e6:.1f} MB. floor_ms: the largest of the three at the "
            "machine's peak (perfect overlap, a lower bound); floor_over_ms: how close each step comes to it; "
            "achieved_gflops / achieved_gbs: the counts over the step's time.")


def write(rows, peaks, S, N, D, out):
    import pandas as pd
    text = describe(peaks, S, N, D) + "\n\n" + pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g") + "\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "floor.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results")
    p.add_argument("--N", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    import bench
    S, D = 16, 10
    X, y = bench.make_data(args.N, D)
    times = []
    for est in ("reparam", "score"):
        compiled, _ = bench.bbvi_runner(X, y, est, S, compiled=True)
        runners = {"bbvi compile=True": compiled, "bbvi": bench.bbvi_runner(X, y, est, S),
                   "hand-written torch": bench.hand_runner(X, y, est, S)}
        med = bench.time_steps(runners, args.steps, 5, warmup=3)
        times += [(est, k, 1e3 * v) for k, v in med.items()]
    peaks = machine_peaks(S, args.N)
    print(write(floor_rows(times, peaks, S, args.N, D), peaks, S, args.N, D, args.out))


if __name__ == "__main__":
    main()
