"""Parity of the C++ CPU spatial-attention kernels with fastattn.reference."""
from __future__ import annotations

import os

import pytest
import torch

from _contract import CPU_ATTENTION_ATOL, assert_equal_values, assert_error_rule
from _util import compiled_ops

from fastattn.reference import ref_spatial_attention_forward

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_ops():
    """torch.ops.fastattn with the CPU kernels of the installed fastattn._C."""
    return compiled_ops("spatial_attention_forward", "CPU")


ops = _load_ops()

def _make(n, c, length, dtype, layout, gen):
    """(N, C, L) input with the given memory layout: "nchw", "cl" (channel-last) or "strided"."""
    if layout == "cl":
        return torch.randn(n, length, c, generator=gen).to(dtype).transpose(1, 2)
    if layout == "strided":  # every stride > 1: a slice of a bigger tensor
        return torch.randn(n, 2 * c, length + 3, generator=gen).to(dtype)[:, ::2, 1:length + 1]
    return torch.randn(n, c, length, generator=gen).to(dtype)


def _is_channel_last(t):
    return t.stride(1) == 1 and t.shape[1] > 1


def _reference_grads(q, k, v, heads, scale, grad_out, dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, _ = ref_spatial_attention_forward(q, k, v, heads, scale)
    return torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))


def _run_case(n, cq, cv, lq, lk, heads, scale, layout, dtype, backward=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layouts = (layout,) * 3 if isinstance(layout, str) else layout
    q, k, v = (_make(n, c, length, dtype, lay, gen)
               for (c, length), lay in zip(((cq, lq), (cq, lk), (cv, lk)), layouts))
    d_qk = cq // heads
    scale = d_qk ** -0.5 if scale is None else scale

    out, lse = ops.spatial_attention_forward(q, k, v, heads, scale)
    truth_out, truth_lse = ref_spatial_attention_forward(q.double(), k.double(), v.double(), heads, scale)
    eager_out, eager_lse = ref_spatial_attention_forward(q, k, v, heads, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (n, heads, lq)
    assert _is_channel_last(out) == _is_channel_last(q), (out.stride(), q.stride())
    assert_error_rule("out", out, truth_out, eager_out, CPU_ATTENTION_ATOL[dtype])
    assert_error_rule("lse", lse, truth_lse, eager_lse, CPU_ATTENTION_ATOL[torch.float32 if dtype != torch.float64 else dtype])
    if not backward:
        return
    grad_out = torch.randn(out.shape, generator=gen).to(dtype)
    grads = ops.spatial_attention_backward(grad_out, q, k, v, out, lse, heads, scale)
    truth = _reference_grads(q, k, v, heads, scale, grad_out, torch.float64)
    eager = _reference_grads(q, k, v, heads, scale, grad_out, dtype)
    for name, g, t, e, x in zip(("dq", "dk", "dv"), grads, truth, eager, (q, k, v)):
        assert g.shape == x.shape and g.dtype == dtype
        assert _is_channel_last(g) == _is_channel_last(x), (name, g.stride(), x.stride())
        assert_error_rule(name, g, t, e, CPU_ATTENTION_ATOL[dtype])


# (N, Cq, Cv, Lq, Lk, heads, scale) — scale None means d_qk ** -0.5
SHAPES = [
    pytest.param((2, 32, 32, 49, 49, 1, None), id="7x7-d32"),
    pytest.param((1, 64, 64, 196, 196, 1, None), id="14x14-d64"),
    pytest.param((1, 64, 64, 784, 784, 1, None), id="28x28-d64"),
    pytest.param((2, 8, 32, 196, 49, 1, 1.0), id="sagan-4to1-dqk8-dv32"),
    pytest.param((1, 80, 40, 196, 49, 2, None), id="4to1-dqk40-dv20-h2"),
    pytest.param((1, 160, 80, 49, 196, 2, None), id="1to4-dqk80-dv40-h2"),
    pytest.param((2, 96, 96, 49, 49, 1, None), id="d96"),
    pytest.param((1, 128, 64, 196, 196, 1, 1.0), id="dqk128-dv64-scale1"),
    pytest.param((1, 160, 160, 49, 49, 1, None), id="d160"),
    pytest.param((1, 320, 320, 64, 64, 8, None), id="unet-d40-h8"),
    pytest.param((1, 512, 512, 49, 49, 1, None), id="d512"),
    pytest.param((1, 64, 128, 1, 49, 2, None), id="one-query"),
    pytest.param((2, 64, 64, 49, 1, 8, None), id="one-key-d8-h8"),
    pytest.param((1, 16, 16, 1, 1, 1, 1.0), id="one-by-one"),
]


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_parity(shape, layout):
    _run_case(*shape, layout=layout, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [
    pytest.param((1, 80, 40, 196, 49, 2, None), id="4to1-dqk40-dv20-h2"),
    pytest.param((2, 8, 32, 196, 49, 1, 1.0), id="sagan"),
    pytest.param((1, 128, 128, 64, 64, 8, None), id="d16-h8"),
])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_other_dtypes_parity(shape, dtype, layout):
    _run_case(*shape, layout=layout, dtype=dtype)


@pytest.mark.parametrize("layouts", [("strided",) * 3, ("cl", "nchw", "cl"), ("nchw", "cl", "strided")])
def test_any_strides_and_mixed_layouts(layouts):
    _run_case(2, 32, 48, 49, 196, 2, None, layout=layouts, dtype=torch.float32)


def test_long_sequence_not_a_multiple_of_the_tile():
    _run_case(1, 8, 8, 4097, 4097, 1, None, layout="nchw", dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_logits_stay_finite(dtype):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 16, 49, generator=gen, dtype=dtype) * 25
    k = torch.randn(1, 16, 49, generator=gen, dtype=dtype) * 25
    v = torch.randn(1, 16, 49, generator=gen, dtype=dtype)
    out, lse = ops.spatial_attention_forward(q, k, v, 1, 1.0)  # logits of magnitude ~1e4
    truth_out, truth_lse = ref_spatial_attention_forward(q.double(), k.double(), v.double(), 1, 1.0)
    assert truth_lse.abs().max() > 5e3
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), truth_out, atol=1e-3 if dtype == torch.float32 else 1e-9, rtol=0)
    torch.testing.assert_close(lse, truth_lse, atol=1e-2, rtol=1e-6)  # lse is float32 by contract
    grad_out = torch.randn(out.shape, generator=gen, dtype=dtype)
    grads = ops.spatial_attention_backward(grad_out, q, k, v, out, lse, 1, 1.0)
    assert all(torch.isfinite(g).all() for g in grads)


def test_probabilities_are_within_a_few_ulps():
    """With v the identity, out is the softmax itself. 32 rows of 250 logits, uniform in [-103, 0] with a max
    of 0 (so the shift is exact): every probability from 1 down to the denormals within 4 float32 ulps of
    the float64 truth (the exp's 1 ulp, the row sum's and the division's rounding; this kernel: 1.6).
    An exp of 20 ulps, at::vec's exp_u20, fails this."""
    rows, keys = 32, 250  # one key block; 250 is not a multiple of the vector width: the scalar tail runs too
    logits = torch.rand(rows, keys, generator=torch.Generator().manual_seed(0)) * -103
    logits[:, 0] = 0
    q, k, v = torch.ones(rows, 1, 2), logits.view(rows, 1, keys), torch.eye(keys).expand(rows, keys, keys)
    out, _ = ops.spatial_attention_forward(q, k, v, 1, 1.0)
    truth = torch.softmax(logits.double(), 1).unsqueeze(2).expand(rows, keys, 2)
    assert (truth < torch.finfo(torch.float32).tiny).any()  # the denormal range is covered
    torch.testing.assert_close(out.double(), truth, rtol=4 * torch.finfo(torch.float32).eps, atol=2.0**-148)


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_propagates_like_the_reference(where):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 16, 49, generator=gen) for _ in range(3))
    {"q": q, "k": k, "v": v}[where][1, 3, 10] = float("nan")
    out, lse = ops.spatial_attention_forward(q, k, v, 2, 0.25)
    truth_out, truth_lse = ref_spatial_attention_forward(q.double(), k.double(), v.double(), 2, 0.25)
    assert out.isnan().any()
    assert torch.equal(out.isnan(), truth_out.isnan()) and torch.equal(lse.isnan(), truth_lse.isnan())
    finite = ~truth_out.isnan()
    torch.testing.assert_close(out.double()[finite], truth_out[finite], atol=1e-5, rtol=1e-5)


def test_backward_is_deterministic():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 64, 300, generator=gen) for _ in range(3))
    out, lse = ops.spatial_attention_forward(q, k, v, 1, 0.125)
    grad_out = torch.randn(out.shape, generator=gen)
    first = ops.spatial_attention_backward(grad_out, q, k, v, out, lse, 1, 0.125)
    second = ops.spatial_attention_backward(grad_out, q, k, v, out, lse, 1, 0.125)
    for name, a, b in zip(("dq", "dk", "dv"), first, second):
        assert_equal_values(name, a, b)


class _Attention(torch.autograd.Function):
    """The two ops as one differentiable function, for gradcheck."""

    @staticmethod
    def forward(ctx, q, k, v, heads, scale):
        out, lse = ops.spatial_attention_forward(q, k, v, heads, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.heads, ctx.scale = heads, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        return (*ops.spatial_attention_backward(grad_out, q, k, v, out, lse, ctx.heads, ctx.scale), None, None)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: _Attention.apply(q, k, v, 2, 0.7), (q, k, v), fast_mode=True)


def test_bad_input_raises():
    q = torch.randn(1, 8, 10)
    with pytest.raises(RuntimeError, match="heads"):
        ops.spatial_attention_forward(q, q, q, 3, 1.0)
    with pytest.raises(RuntimeError, match="shapes"):
        ops.spatial_attention_forward(q, torch.randn(1, 8, 5), torch.randn(1, 8, 6), 1, 1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.spatial_attention_forward(q, q.double(), q, 1, 1.0)


_MEMORY_SCRIPT = r"""
import resource, torch
import fastattn  # noqa: F401  (loads fastattn._C)
ops = torch.ops.fastattn
length, d = 16384, 64
small = torch.randn(1, d, 256)  # warm-up: kernel JIT and thread pools are not the kernel's memory
o, l = ops.spatial_attention_forward(small, small, small, 1, 0.125)
ops.spatial_attention_backward(o, small, small, small, o, l, 1, 0.125)
q, k, v, grad_out = (torch.randn(1, d, length) for _ in range(4))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out, lse = ops.spatial_attention_forward(q, k, v, 1, d ** -0.5)
dq, dk, dv = ops.spatial_attention_backward(grad_out, q, k, v, out, lse, 1, d ** -0.5)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outputs = sum(t.numel() * t.element_size() for t in (out, lse, dq, dk, dv))
print((after - before) * 1024 - outputs)
"""


def test_memory_stays_linear_in_length():
    import subprocess
    import sys

    script = _MEMORY_SCRIPT
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    growth = int(result.stdout.strip().splitlines()[-1])
    # the 16384 x 16384 float32 score matrix alone would be 1 GiB
    assert growth < 64 * 2**20, f"peak RSS grew by {growth / 2**20:.1f} MiB beyond inputs and outputs"


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512" or os.environ.get("ATEN_CPU_CAPABILITY"),
                    reason="the AVX2 row kernels are what the other tests already run")
def test_avx2_row_kernels():
    """On AVX-512 machines the softmax row kernels run 16 wide; rerun some cases with ATen lowered to AVX2."""
    import subprocess
    import sys

    selection = "float32_parity and (sagan or one-query) or nan_propagates"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
                             "-k", selection], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
