"""Quick CPU timing probe of the spatial-attention kernels (not a test, not the benchmark suite).

Times, interleaved in one process, on (N, Cq, Cv, Lq, Lk, heads) cases in float32:
  fastattn      torch.ops.fastattn.spatial_attention_forward / _backward (CPU kernels)
  sdpa          F.scaled_dot_product_attention on the NCHW views (q.view(N, h, d, L).transpose(-1, -2)),
                output permuted back and made contiguous
  sdpa_contig   the same with the permuted q, k, v made contiguous first (SDPA's fast path)
  eager         bmm-softmax-bmm (fastattn.eager.spatial_attention)
and prints medians and the ratios fastattn / competitor (< 1 means fastattn is faster).

    PYTHONPATH=. python bench/attention_cpu_probe.py [--threads 2] [--reps 5] [--bwd]
    PYTHONPATH=. python bench/attention_cpu_probe.py --threads 1 --cpu-time   # steadier on a shared machine
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fastattn.eager import spatial_attention as eager_attention

CASES = {  # name: (N, Cq, Cv, Lq, Lk, heads, scale or None)
    "28x28 C64": (4, 64, 64, 28 * 28, 28 * 28, 1, None),
    "56x56 C32": (2, 32, 32, 56 * 56, 56 * 56, 1, None),
    "SAGAN 32x32": (8, 8, 32, 32 * 32, 16 * 16, 1, 1.0),
    "VAE mid 64x64": (1, 512, 512, 64 * 64, 64 * 64, 1, None),
    "U-Net 32x32 h8": (8, 320, 320, 32 * 32, 32 * 32, 8, None),
}


def load_ops():
    """torch.ops.fastattn with the CPU attention kernels of the installed fastattn._C."""
    from fastattn import _ext
    if not _ext.has_kernel("spatial_attention_forward", "CPU"):
        raise SystemExit(f"fastattn._C has no CPU attention kernels (load error: {_ext.LOAD_ERROR}); run `make build`")
    return torch.ops.fastattn


def heads_view(t, heads):
    n, c, length = t.shape
    return t.view(n, heads, c // heads, length).transpose(-1, -2)


def merge_heads(o):
    n, h, length, dv = o.shape
    return o.transpose(-1, -2).reshape(n, h * dv, length).contiguous()


def make_providers(ops, heads, scale, backward):
    def fastattn(q, k, v, go):
        out, lse = ops.spatial_attention_forward(q, k, v, heads, scale)
        if backward:
            ops.spatial_attention_backward(go, q, k, v, out, lse, heads, scale)

    def sdpa_with(prepare):
        def run(q, k, v, go):
            out = merge_heads(F.scaled_dot_product_attention(*(prepare(heads_view(t, heads)) for t in (q, k, v)),
                                                             scale=scale))
            if backward:
                torch.autograd.grad(out, (q, k, v), go)
        return run

    def eager(q, k, v, go):
        out = eager_attention(q, k, v, heads=heads, scale=scale)
        if backward:
            torch.autograd.grad(out, (q, k, v), go)

    return {"fastattn": fastattn, "sdpa": sdpa_with(lambda t: t), "sdpa_contig": sdpa_with(lambda t: t.contiguous()),
            "eager": eager}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--bwd", action="store_true", help="time forward+backward instead of forward")
    parser.add_argument("--cpu-time", action="store_true",
                        help="measure the calling thread's CPU time (use with --threads 1 on a busy machine)")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--providers", nargs="*", default=["fastattn", "sdpa", "sdpa_contig", "eager"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ops = load_ops()
    torch.manual_seed(0)
    mode = "fwd+bwd" if args.bwd else "fwd"
    clock = time.thread_time if args.cpu_time else time.perf_counter
    print(f"{mode}, float32, {args.threads} threads, median of {args.reps} interleaved runs "
          f"({'thread CPU' if args.cpu_time else 'wall'} ms)")
    for name in args.cases:
        n, cq, cv, lq, lk, heads, scale = CASES[name]
        scale = (cq // heads) ** -0.5 if scale is None else scale
        q, k, v = (torch.randn(n, c, length, requires_grad=args.bwd) for c, length in ((cq, lq), (cq, lk), (cv, lk)))
        go = torch.randn(n, cv, lq)
        providers = {p: f for p, f in make_providers(ops, heads, scale, args.bwd).items() if p in args.providers}
        times = {p: [] for p in providers}
        with torch.set_grad_enabled(args.bwd):
            for fn in providers.values():
                fn(q, k, v, go)  # warm-up (kernel JIT, allocator)
            for _ in range(args.reps):
                for p, fn in providers.items():
                    start = clock()
                    fn(q, k, v, go)
                    times[p].append(clock() - start)
        med = {p: statistics.median(t) * 1e3 for p, t in times.items()}
        line = "  ".join(f"{p} {t:8.2f}" for p, t in med.items())
        ratios = "  ".join(f"/{p} {med['fastattn'] / t:.2f}" for p, t in med.items() if p != "fastattn")
        print(f"{name:16s} {line}   fastattn{ratios}", flush=True)


if __name__ == "__main__":
    main()
