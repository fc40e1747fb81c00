"""Old build vs new build of the CPU attention kernels, timed side by side (not a test, not the suite).

Each round runs every build once, in its own process (two builds of fastattn._C cannot be loaded into
one), alternating the order; each process times every case (median of --reps calls after a warm-up).
Prints per case and pass the median over rounds of each build's time and the ratio new / old.

    PYTHONPATH=. python bench/attention_ab.py build/old/_C.so fastattn/_C*.so --rounds 4 --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

# (N, Cq, Cv, Lq, Lk, heads, scale or None): the default benchmark's attention cases (bench/cases.py)
# and the head dims where the kernel's blocked summation does the most extra work
CASES = {
    "non-local 4x64x28x28": (4, 64, 64, 784, 784, 1, None),
    "non-local 2x32x56x56": (2, 32, 32, 3136, 3136, 1, None),
    "sagan 8x64x32x32": (8, 8, 32, 1024, 256, 1, 1.0),
    "vae-mid 1x512x64x64": (1, 512, 512, 4096, 4096, 1, None),
    "unet 8x320x32x32 h8": (8, 320, 320, 1024, 1024, 8, None),
    "d256 2x512x1024 h2": (2, 512, 512, 1024, 1024, 2, None),
    "nlnet-head 1x256x4096": (1, 256, 256, 4096, 4096, 1, None),  # the mmcv NLNet head's attention, half length
}


def median_time(fn, reps: int, clock) -> float:
    """Median of reps timed calls of fn after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def attention_passes(q, k, v, go, heads, scale):
    """[("fwd", fn), ("fwd+bwd", fn)]: the cpu ops' forward, and forward then backward, on these tensors."""
    ops = torch.ops.fastattn

    def fwd():
        return ops.spatial_attention_forward(q, k, v, heads, scale)

    def fwd_bwd():
        out, lse = fwd()
        ops.spatial_attention_backward(go, q, k, v, out, lse, heads, scale)

    return [("fwd", fwd), ("fwd+bwd", fwd_bwd)]


def worker(library: str, reps: int, threads: int, cases: list[str], cpu_time: bool) -> dict:
    torch.ops.load_library(library)
    torch.set_num_threads(threads)
    clock = time.thread_time if cpu_time else time.perf_counter
    result = {}
    for name in cases:
        n, cq, cv, lq, lk, heads, scale = CASES[name]
        scale = (cq // heads) ** -0.5 if scale is None else scale
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(n, c, length, generator=gen) for c, length in ((cq, lq), (cq, lk), (cv, lk)))
        go = torch.randn(n, cv, lq, generator=gen)

        for pass_, fn in attention_passes(q, k, v, go, heads, scale):
            result[f"{name} {pass_}"] = median_time(fn, reps, clock)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("libraries", nargs=2, help="old and new fastattn._C builds")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cpu-time", action="store_true", help="the calling thread's CPU time (with --threads 1)")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.reps, args.threads, args.cases, args.cpu_time)))
        return
    runs: dict[str, list[dict]] = {lib: [] for lib in args.libraries}
    for round_ in range(args.rounds):
        for lib in args.libraries[::1 if round_ % 2 == 0 else -1]:
            cmd = [sys.executable, __file__, *args.libraries, "--worker", lib, "--reps", str(args.reps),
                   "--threads", str(args.threads), "--cases", *args.cases] + (["--cpu-time"] if args.cpu_time else [])
            runs[lib].append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    old, new = args.libraries
    print(f"{args.threads} thread(s), {'thread CPU' if args.cpu_time else 'wall'} time, median over {args.rounds} "
          f"alternating rounds of the median of {args.reps} calls")
    ratios = []
    for key in runs[old][0]:
        t_old = statistics.median(r[key] for r in runs[old]) * 1e3
        t_new = statistics.median(r[key] for r in runs[new]) * 1e3
        ratios.append(t_new / t_old)
        spread = [f"{r[key] * 1e3:.1f}" for r in runs[new]]
        print(f"{key:32s} old {t_old:9.2f} ms  new {t_new:9.2f} ms  new/old {t_new / t_old:.3f}  (new rounds {spread})")
    print(f"geometric mean new/old {statistics.geometric_mean(ratios):.3f}")


if __name__ == "__main__":
    main()
