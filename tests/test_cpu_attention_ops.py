"""The C++ CPU spatial-attention kernels: what only they have. Their parity tables and the op cases every
backend shares (NaN, -inf keys, huge logits, empty lengths, determinism, bad input) are in
tests/test_attention_op_cases.py (backend "cpu"); here float64 gradcheck, memory that stays linear in L, and
the AVX2 row kernels on AVX-512 machines."""
from __future__ import annotations

import os

import pytest
import torch

from _util import compiled_ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_ops():
    """torch.ops.fastattn with the CPU kernels of the installed fastattn._C."""
    return compiled_ops("spatial_attention_forward", "CPU")


ops = _load_ops()


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

    selection = "cpu and (parity and float32 and (sagan or one-query) or nan_propagates)"
    shared = os.path.join(REPO, "tests", "test_attention_op_cases.py")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", shared,
                             "-k", selection], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
