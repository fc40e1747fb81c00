"""Cache sizes A/B: the CPU kernels' tiles derived from two FASTATTN_CPU_CACHE settings, timed side by
side on one build (not a test, not the suite); docs/cpu-tuning.md reports the results.

Each round runs every setting once, in its own process (the cache sizes are read once per process),
alternating the order; each process times every case (median of --reps calls after a warm-up).
Prints per case the median over rounds of each setting's time and the median of the per-round ratios
(each round's two processes ran close together: the ratio is what load shifts least), and writes JSON.

    PYTHONPATH=. python bench/cpu_tuning_ab.py --settings tuned=l1=48K,l2=2M machine= --rounds 4 \
        --out bench/results/cpu-AMD-EPYC-1t-cpu-tuning.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from bench.attention_ab import attention_passes, median_time

# the bench's ResNet-50 CBAM stages (bench/cases.py) and attention shapes of head dims 64, 128, 256:
# the stream block depends on the L2 size only where d > 64 (it is capped at 512 positions)
CBAM_CASES = {f"cbam 8x{c}x{h}x{h}": (8, c, h, h) for c, h in ((256, 56), (512, 28), (1024, 14), (2048, 7))}
ATTENTION_CASES = {  # (N, C, L, heads)
    "attention 4x64x28x28 d64": (4, 64, 784, 1),
    "attention 2x256x32x32 d128": (2, 256, 1024, 2),
    "attention 2x512x32x32 d256": (2, 512, 1024, 2),
}


def worker(reps: int, threads: int, cases: list[str], cpu_time: bool) -> dict:
    from timm.layers.cbam import CbamModule

    import fastattn

    torch.set_num_threads(threads)
    clock = time.thread_time if cpu_time else time.perf_counter
    result = {"tuning": fastattn.cpu_tuning(), "times": {}}
    for name in cases:
        gen = torch.Generator().manual_seed(0)
        if name in CBAM_CASES:
            shape = CBAM_CASES[name]
            module = fastattn.convert(CbamModule(shape[1]))  # the bench's layer, on the cpu backend
            x = torch.randn(shape, generator=gen)
            grad_y = torch.randn(shape, generator=gen)

            def fwd():
                module.eval()
                with torch.no_grad():
                    module(x)

            def fwd_bwd():
                module.train()
                module(x.requires_grad_(True)).backward(grad_y)
        else:
            n, c, length, heads = ATTENTION_CASES[name]
            q, k, v, go = (torch.randn(n, c, length, generator=gen) for _ in range(4))
            (_, fwd), (_, fwd_bwd) = attention_passes(q, k, v, go, heads, (c // heads) ** -0.5)

        for pass_, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            result["times"][f"{name} {pass_}"] = median_time(fn, reps, clock)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs=2, default=["tuned=l1=48K,l2=2M", "machine="],
                        help="two NAME=FASTATTN_CPU_CACHE (empty: the machine's caches); ratios are second / first")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cpu-time", action="store_true", help="the calling thread's CPU time (with --threads 1)")
    parser.add_argument("--cases", nargs="*", default=list(CBAM_CASES) + list(ATTENTION_CASES))
    parser.add_argument("--out", help="JSON file for the raw results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.reps, args.threads, args.cases, args.cpu_time)))
        return
    settings = dict(s.split("=", 1) for s in args.settings)
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    load = [os.getloadavg()]
    for round_ in range(args.rounds):
        for name in list(settings)[::1 if round_ % 2 == 0 else -1]:
            env = {k: v for k, v in os.environ.items() if k != "FASTATTN_CPU_CACHE"}
            if settings[name]:
                env["FASTATTN_CPU_CACHE"] = settings[name]
            cmd = [sys.executable, __file__, "--worker", "--reps", str(args.reps), "--threads", str(args.threads),
                   "--cases", *args.cases] + (["--cpu-time"] if args.cpu_time else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
        load.append(os.getloadavg())
    first, second = settings
    print(f"{args.threads} thread(s), {'thread CPU' if args.cpu_time else 'wall'} time, {args.rounds} alternating "
          f"rounds of the median of {args.reps} calls; load average per round {[round(x[0], 2) for x in load]}")
    for name in settings:
        print(f"{name}: {runs[name][0]['tuning']}")
    summary = {}
    for key in runs[first][0]["times"]:
        t = {name: statistics.median(r["times"][key] for r in runs[name]) * 1e3 for name in settings}
        ratio = statistics.median(b["times"][key] / a["times"][key] for a, b in zip(runs[first], runs[second]))
        summary[key] = {f"{name}_ms": t[name] for name in settings} | {f"{second}/{first}": ratio}
        print(f"{key:36s} {first} {t[first]:9.2f} ms  {second} {t[second]:9.2f} ms  {second}/{first} {ratio:.3f}")
    geo = statistics.geometric_mean(s[f"{second}/{first}"] for s in summary.values())
    print(f"geometric mean {second}/{first} {geo:.3f}")
    if args.out:
        from bench.env import cpu_model
        record = {"schema": "fastattn-cpu-tuning-ab/1", "cpu_model": cpu_model(), "threads": args.threads,
                  "clock": "thread CPU" if args.cpu_time else "wall", "rounds": args.rounds, "reps": args.reps,
                  "settings": settings, "load_average_per_round": load, "summary": summary,
                  "geometric_mean": geo, "runs": runs, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
