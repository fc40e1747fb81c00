"""Float32 spatial attention as accurate as eager PyTorch: FlashAttention's rule, per case (issue 16).

The rule: against a float64 truth (fastattn.reference in float64, autograd for the gradients), the error
of a backend's float32 out, dq, dk and dv is at most 2x the error of eager float32 (the same reference
formula run in float32: MKL's bmm, ATen's softmax and its backward). There is no absolute tolerance: 2x
eager is the whole allowance. The one exception is where eager's error is exactly 0, which happens with a
single key (softmax is the constant 1, so the true dq and dk are 0 and eager's softmax backward subtracts
a number from itself): a kernel that takes delta = rowsum(dO * O) from the saved output, as every flash
kernel does, leaves the rounding of dO . v there, so eager's error is raised to a floor of 4 float32 ulps
of the largest true gradient (FLOOR_ULPS in bench/attention_accuracy.py; the cpu kernel needs up to 3).

The statistic is the median over seeds of the per-seed ratio (kernel max-abs error / eager max-abs
error), per tensor: 3 seeds, 5 for shapes of at most 50 000 logits. The max-abs error of one sample is
noisy: over the grid of bench/attention_accuracy.py the same case's ratio moves by up to 2x between
seeds (most on small shapes, whose maximum is over few elements: one query against 97 keys at d = 16
gave 1.3 to 2.7), so a one-seed ratio would let a kernel 1.5x worse than eager pass or fail by luck. A
median needs most seeds to pass, which a kernel whose typical ratio is near 2 cannot do by chance, and
it is still the max-abs statistic the rule is stated in (an RMS statistic was steadier but lets a few
bad elements through).

The shapes are a subset of bench/attention_accuracy.py's grid (FlashAttention's head dims and lengths:
odd dims, lengths that are not tile multiples, Lq != Lk both ways, several heads, channel-last, strided
and packed q/k/v); `PYTHONPATH=. python bench/attention_accuracy.py` runs the whole grid and prints the
distribution (docs/accuracy.md has the numbers).

Triton: the same rule runs the Triton launchers through the interpreter on a few small shapes. The
interpreter runs tl.dot on numpy (a BLAS sgemm), not on the GPU's FMA chains, so a pass proves the
kernel's algorithm (online softmax, lse, delta, normalisation, the order of its tile sums) accurate in
float32, but says nothing about the summation order of a GPU's tl.dot; that needs the same tests run on
a GPU (they do run there: DEVICE is cuda when one is present).
"""
from __future__ import annotations

import os
import statistics
import sys

import pytest
import torch

from _util import compiled_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.attention_accuracy import TENSORS, Shape, measure_case, ratio  # noqa: E402

MAX_RATIO = 2.0

# (n, heads, d_qk, d_v, len_q, len_k, layout)
CPU_SHAPES = [
    Shape(2, 4, 16, 16, 1, 97, "contiguous"),
    Shape(2, 4, 59, 59, 1, 97, "strided"),  # dk 2.15x eager on an AMD EPYC before the backward renormalised
    Shape(2, 4, 59, 59, 97, 1, "strided"),
    Shape(2, 4, 32, 32, 97, 97, "packed"),
    Shape(2, 4, 64, 64, 113, 211, "strided"),
    Shape(2, 2, 111, 111, 211, 113, "channel_last"),
    Shape(2, 2, 128, 128, 1, 97, "channel_last"),
    Shape(2, 2, 224, 224, 113, 211, "strided"),
    Shape(2, 2, 256, 256, 97, 97, "channel_last"),
    Shape(2, 2, 512, 512, 113, 113, "packed"),
    Shape(2, 2, 512, 512, 97, 1, "channel_last"),
    Shape(1, 2, 32, 32, 1023, 1023, "contiguous"),
    Shape(1, 1, 59, 59, 2047, 2047, "contiguous"),
    Shape(1, 2, 96, 96, 2047, 113, "contiguous"),
    Shape(1, 1, 111, 111, 1023, 2047, "contiguous"),
    Shape(1, 2, 256, 256, 1023, 1023, "channel_last"),
    Shape(2, 2, 40, 80, 113, 211, "contiguous"),  # d_qk != d_v
]
TRITON_SHAPES = [
    # one query: dq, dk were 2.3x and 2.7x eager's (median of 5 seeds) before the backward renormalised
    # its probabilities (the float32 lse's rounding)
    Shape(1, 2, 16, 16, 1, 33, "contiguous"),
    Shape(1, 2, 59, 59, 3, 40, "strided"),
    Shape(1, 1, 59, 59, 17, 1, "strided"),
    Shape(1, 2, 32, 32, 33, 33, "packed"),
    Shape(1, 1, 111, 111, 17, 40, "channel_last"),
]


def assert_float32_rule(forward, backward, shape: Shape) -> None:
    """The rule of the module docstring for one shape; the message lists every tensor's ratios."""
    seeds = range(5 if shape.len_q * shape.len_k <= 50_000 else 3)
    results = [measure_case(forward, backward, shape, seed) for seed in seeds]
    failures, report = [], []
    for name in TENSORS:
        per_seed = [ratio(result, name) for result in results]
        median = statistics.median(per_seed)
        report.append(f"{name}: median {median:.2f} (seeds {', '.join(f'{r:.2f}' for r in per_seed)})")
        if median > MAX_RATIO:
            failures.append(name)
    assert not failures, (f"{shape.id}: error / eager float32 error above {MAX_RATIO} for {failures}; "
                          + "; ".join(report))


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: s.id)
def test_cpu_float32_within_2x_eager(shape):
    ops = compiled_ops("spatial_attention_forward", "CPU")
    assert_float32_rule(ops.spatial_attention_forward, ops.spatial_attention_backward, shape)


def _triton_launchers():
    pytest.importorskip("triton")
    import importlib
    return importlib.import_module("fastattn.triton_kernels.attention")


@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: getattr(s, "id", None))
def test_triton_float32_within_2x_eager(shape):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    attention = _triton_launchers()

    def forward(q, k, v, heads, scale):
        return attention.spatial_attention_forward(q.to(device), k.to(device), v.to(device), heads, scale)

    def backward(grad_out, q, k, v, out, lse, heads, scale):
        return attention.spatial_attention_backward(grad_out.to(device), q.to(device), k.to(device), v.to(device),
                                                    out, lse, heads, scale)

    assert_float32_rule(forward, backward, shape)


def test_rule_catches_a_kernel_twice_as_inaccurate():
    """The rule can fail: eager's own result with its error against the truth tripled fails it."""
    from fastattn.reference import ref_spatial_attention_forward

    def forward(q, k, v, heads, scale):
        truth, lse = ref_spatial_attention_forward(q.double(), k.double(), v.double(), heads, scale)
        eager, _ = ref_spatial_attention_forward(q, k, v, heads, scale)
        return (truth + 3 * (eager.double() - truth)).float(), lse

    def backward(grad_out, q, k, v, out, lse, heads, scale):
        def grads(dtype):
            leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
            o, _ = ref_spatial_attention_forward(*leaves, heads, scale)
            return torch.autograd.grad(o, leaves, grad_out.to(dtype))
        return [(t + 3 * (e.double() - t)).float() for t, e in zip(grads(torch.float64), grads(torch.float32))]

    with pytest.raises(AssertionError, match="above 2.0 for \\['out', 'dq', 'dk', 'dv'\\]"):
        assert_float32_rule(forward, backward, Shape(1, 2, 64, 64, 97, 113, "contiguous"))
