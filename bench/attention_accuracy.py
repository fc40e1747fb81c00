"""Float32 accuracy of fastattn's spatial attention against eager PyTorch (issue 16; FlashAttention's rule).

For each case (a shape, a memory layout, a seed) it computes out, dq, dk, dv of a fastattn backend in
float32, the same four tensors of the eager formula in float32 (fastattn.reference, autograd), and the
float64 truth (the same formula in float64), and reports per tensor the error of each against the truth
and the ratio fastattn / eager. FlashAttention's rule, which docs/DESIGN.md §4 adopts: the ratio is at most 2.

    PYTHONPATH=. python bench/attention_accuracy.py                      # the grid, cpu backend
    PYTHONPATH=. python bench/attention_accuracy.py --json build/acc.json --library build/old/_C.so

`--library` loads another build of fastattn._C (e.g. the one before a change) in place of the installed
one, so two builds can be compared on the same grid. tests/test_float32_accuracy.py imports
`measure_case` and the grid's shapes from here.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass

import torch

TENSORS = ("out", "dq", "dk", "dv")
LAYOUTS = ("contiguous", "channel_last", "strided", "packed")


@dataclass(frozen=True)
class Shape:
    """One attention call: q (n, heads * d_qk, len_q), k (n, heads * d_qk, len_k), v (n, heads * d_v, len_k)."""
    n: int
    heads: int
    d_qk: int
    d_v: int
    len_q: int
    len_k: int
    layout: str = "contiguous"

    @property
    def id(self) -> str:
        d = f"d{self.d_qk}" if self.d_qk == self.d_v else f"d{self.d_qk}x{self.d_v}"
        return f"n{self.n}h{self.heads}-{d}-L{self.len_q}x{self.len_k}-{self.layout}"


def make_inputs(shape: Shape, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 q, k, v with unit-normal entries in shape.layout: contiguous (N, C, L), channel-last,
    strided (every other channel of an offset window of a larger buffer) or packed (q, k, v channel slices
    of one (N, Cq + Cq + Cv, L) tensor, as a fused qkv projection leaves them; needs len_q == len_k)."""
    gen = torch.Generator().manual_seed(seed)
    cq, cv = shape.heads * shape.d_qk, shape.heads * shape.d_v
    n, lq, lk = shape.n, shape.len_q, shape.len_k

    def randn(c, length):
        if shape.layout == "channel_last":
            return torch.randn(n, length, c, generator=gen).transpose(1, 2)
        if shape.layout == "strided":
            return torch.randn(n, 2 * c + 1, length + 5, generator=gen)[:, 1::2, 3:3 + length]
        return torch.randn(n, c, length, generator=gen)

    if shape.layout == "packed":
        if lq != lk:
            raise ValueError(f"packed q, k, v need len_q == len_k, got {lq} and {lk}")
        qkv = torch.randn(n, 2 * cq + cv, lq, generator=gen)
        return qkv[:, :cq], qkv[:, cq:2 * cq], qkv[:, 2 * cq:]
    return randn(cq, lq), randn(cq, lk), randn(cv, lk)


def _reference(q, k, v, heads, scale, grad_out, dtype):
    from fastattn.reference import ref_spatial_attention_forward
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, _ = ref_spatial_attention_forward(*leaves, heads, scale)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(dtype)))


def _errors(got: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    diff = got.double() - truth
    if diff.numel() == 0:
        return 0.0, 0.0
    return diff.abs().max().item(), diff.square().mean().sqrt().item()


def measure_case(forward, backward, shape: Shape, seed: int) -> dict:
    """Errors against the float64 truth of a backend (forward(q, k, v, heads, scale) -> (out, lse),
    backward(grad_out, q, k, v, out, lse, heads, scale) -> (dq, dk, dv), called on float32 tensors) and of
    eager float32, per tensor: {name: {"max": (fused, eager), "rms": (fused, eager)}}, and "magnitude": the
    largest true gradient (max |dq|, |dk|, |dv|)."""
    q, k, v = make_inputs(shape, seed)
    scale = shape.d_qk ** -0.5
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    grad_out = torch.randn(shape.n, shape.heads * shape.d_v, shape.len_q, generator=gen)
    out, lse = forward(q, k, v, shape.heads, scale)
    fused = (out, *backward(grad_out, q, k, v, out, lse, shape.heads, scale))
    truth = _reference(q, k, v, shape.heads, scale, grad_out, torch.float64)
    eager = _reference(q, k, v, shape.heads, scale, grad_out, torch.float32)
    result = {}
    for name, f, t, e in zip(TENSORS, fused, truth, eager):
        (f_max, f_rms), (e_max, e_rms) = _errors(f, t), _errors(e, t)
        result[name] = {"max": (f_max, e_max), "rms": (f_rms, e_rms)}
    result["magnitude"] = max(t.abs().max().item() if t.numel() else 0.0 for t in truth[1:])
    return result


# Where eager's error is exactly 0 (one key: the true dq, dk are 0 and eager's softmax backward
# subtracts a number from itself), eager's error is raised to this many float32 ulps of the largest
# true gradient: a flash kernel's delta = rowsum(dO * O) leaves the rounding of dO . v there.
FLOOR_ULPS = 4


def ratio(result: dict, name: str, stat: str = "max") -> float:
    """fused / eager error of tensor `name` of a measure_case result (stat "max" or "rms"), eager's error
    raised to the floor above where it is exactly 0."""
    fused, eager = result[name][stat]
    if eager == 0.0:
        eager = FLOOR_ULPS * torch.finfo(torch.float32).eps * result["magnitude"]
    if eager == 0.0:
        return 0.0 if fused == 0.0 else math.inf
    return fused / eager


# ---------------------------------------------------------------------------
# The grid: FlashAttention's head dims and lengths (not tile multiples, Lq != Lk both ways), several heads,
# the four layouts. Big L x big d cases are few: the float64 truth materialises Lq x Lk per head.
# ---------------------------------------------------------------------------
HEAD_DIMS = (16, 32, 59, 64, 111, 128, 224, 256, 512)
SHORT_LENGTHS = ((1, 97), (97, 1), (97, 97), (113, 113), (113, 211), (211, 113))
LONG_LENGTHS = ((1023, 1023), (1023, 2047), (2047, 113), (2047, 2047))
LONG_HEAD_DIMS = (32, 59, 96, 111, 224, 256, 512)


def grid() -> list[Shape]:
    shapes = []
    for i, d in enumerate(HEAD_DIMS):
        heads = 4 if d <= 64 else 2
        for j, (lq, lk) in enumerate(SHORT_LENGTHS):
            layout = LAYOUTS[(i + j) % len(LAYOUTS)]
            if layout == "packed" and lq != lk:
                layout = "strided"
            shapes.append(Shape(2, heads, d, d, lq, lk, layout))
    for i, d in enumerate(LONG_HEAD_DIMS):
        for j, (lq, lk) in enumerate(LONG_LENGTHS):
            if d * max(lq, lk) > 2047 * 256 and (lq, lk) != (1023, 1023):
                continue  # the largest cases only at one length
            layout = ("contiguous", "channel_last")[(i + j) % 2]
            shapes.append(Shape(1, 1 if lq * lk > 2e6 else 2, d, d, lq, lk, layout))
    return shapes


def summarize(records: list[dict], stat: str = "max") -> dict:
    """Distribution of the per-tensor ratios fused / eager over records (one per shape and seed) and of
    their median over seeds per shape."""
    ratios = [ratio(r["errors"], name, stat) for r in records for name in TENSORS]
    by_shape: dict[tuple, list[float]] = {}
    for r in records:
        for name in TENSORS:
            by_shape.setdefault((r["shape"], name), []).append(ratio(r["errors"], name, stat))
    medians = [statistics.median(v) for v in by_shape.values()]

    def dist(values):
        values = sorted(values)
        return {"count": len(values), "median": statistics.median(values),
                "p90": values[min(len(values) - 1, int(0.9 * len(values)))], "max": values[-1],
                "above_2": sum(x > 2 for x in values), "above_1.5": sum(x > 1.5 for x in values)}

    worst = sorted(by_shape.items(), key=lambda kv: -statistics.median(kv[1]))[:8]
    return {"per_sample": dist(ratios), "median_over_seeds": dist(medians),
            "worst": [{"shape": s, "tensor": t, "ratios": v} for (s, t), v in worst]}


def _load_ops(library: str | None):
    if library:  # another build: register its ops, and keep `import fastattn` from loading the installed one
        torch.ops.load_library(library)
        sys.modules["fastattn._C"] = types.ModuleType("fastattn._C")
    import fastattn  # noqa: F401
    return torch.ops.fastattn.spatial_attention_forward, torch.ops.fastattn.spatial_attention_backward


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", help="a fastattn._C build to load instead of the installed one")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", help="write every record here")
    parser.add_argument("--only", help="only shapes whose id contains this")
    args = parser.parse_args(argv)
    forward, backward = _load_ops(args.library)
    records = []
    start = time.perf_counter()
    for shape in grid():
        if args.only and args.only not in shape.id:
            continue
        for seed in range(args.seeds):
            errors = measure_case(forward, backward, shape, seed)
            records.append({"shape": shape.id, "seed": seed, "errors": errors})
        line = "  ".join(f"{name} {statistics.median(ratio(r['errors'], name) for r in records[-args.seeds:]):.2f}"
                         for name in TENSORS)
        print(f"{shape.id:42s} median ratio (max-abs)  {line}", flush=True)
    summary = {stat: summarize(records, stat) for stat in ("max", "rms")}
    print(f"{len(records)} records in {time.perf_counter() - start:.0f} s")
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"library": args.library, "grid": [asdict(s) for s in grid()], "records": records,
                       "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
