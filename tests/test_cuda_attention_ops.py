"""Parity of the CUDA spatial-attention kernels (csrc/cuda/attention.cu) with fastattn.reference.

Ops under test: torch.ops.fastattn.spatial_attention_forward / spatial_attention_backward on
CUDA tensors. Ground truth is the reference formula in float64 on the GPU (autograd of it for
the backward). Rule (docs/DESIGN.md §4): the kernel's max error against ground truth is at most twice
the error of the same-dtype eager reference plus a small atol scaled to the output's magnitude.

The same-dtype eager reference of the backward op is its formula evaluated eagerly in float32
from the op's own inputs, `out` (in q.dtype) included: dS = P * (dO v^T - rowsum(dO * out)).
Autograd of the forward in float32 never sees `out` rounded to float16/bfloat16, and that
rounding alone (in rowsum(dO * out)) puts any kernel that receives `out` at 2-5x autograd's error
(measured on an H100, reproduced on the CPU by evaluating the formula in float32).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _contract import CUDA_ATTENTION_ATOL, assert_equal_values, assert_error_rule
from _util import check_minus_inf_keys_drop_out, compiled_ops

from fastattn.reference import ref_spatial_attention_forward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the CUDA attention kernels need a CUDA GPU and none is visible")

_REPO = Path(__file__).resolve().parents[1]


def _load_ops():
    """torch.ops.fastattn with the CUDA kernels of the installed fastattn._C."""
    return compiled_ops("spatial_attention_forward", "CUDA")


@pytest.fixture(scope="module")
def ops():
    return _load_ops()


DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channel_last", "strided"]


def _make(n: int, c: int, length: int, dtype: torch.dtype, layout: str, gen: torch.Generator,
          magnitude: float = 1.0) -> torch.Tensor:
    """A random (N, C, L) tensor on the GPU in the given memory layout:
    contiguous (L innermost), channel_last (C innermost, stride(1) == 1) or strided (a slice of a
    larger tensor: neither dense nor with a packed channel stride)."""
    if layout == "contiguous":
        return (torch.randn(n, c, length, generator=gen, device=DEVICE) * magnitude).to(dtype)
    if layout == "channel_last":
        return (torch.randn(n, length, c, generator=gen, device=DEVICE) * magnitude).to(dtype).transpose(1, 2)
    if layout == "strided":
        base = (torch.randn(n, 2 * c, length + 3, generator=gen, device=DEVICE) * magnitude).to(dtype)
        return base[:, ::2, 1:length + 1]
    raise ValueError(layout)


def _ref_grads(q, k, v, grad_out, heads, scale):
    """Autograd of the reference formula at the inputs' own dtype -> (dq, dk, dv)."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out, _ = ref_spatial_attention_forward(*leaves, heads, scale)
    return torch.autograd.grad(out, leaves, grad_out)


def _heads_last(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, C, L) -> (N, heads, L, C // heads)."""
    n, c, length = t.shape
    return t.reshape(n, heads, c // heads, length).transpose(-1, -2)


def _heads_merged(t: torch.Tensor) -> torch.Tensor:
    """(N, heads, L, d) -> (N, heads * d, L)."""
    n, heads, length, d = t.shape
    return t.transpose(-1, -2).reshape(n, heads * d, length)


def _eager_backward_op(grad_out, q, k, v, out, heads, scale):
    """The backward op's formula, eagerly in float32 (float64 for float64) from its own inputs -> (dq, dk, dv)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh, kh, vh, gh, oh = (_heads_last(t.to(acc), heads) for t in (q, k, v, grad_out, out))
    p = torch.softmax(scale * qh @ kh.transpose(-1, -2), -1)
    ds = p * (gh @ vh.transpose(-1, -2) - (gh * oh).sum(-1, keepdim=True))
    grads = (scale * ds @ kh, scale * ds.transpose(-1, -2) @ qh, p.transpose(-1, -2) @ gh)
    return tuple(_heads_merged(g).to(q.dtype) for g in grads)


def _check_forward(got, truth, eager) -> None:
    """The error rule for (out, lse); lse is float32 by contract."""
    for name, g, t, e in zip(("out", "lse"), got, truth, eager):
        assert_error_rule(name, g, t.double(), e, CUDA_ATTENTION_ATOL[g.dtype])


def _run_case(ops, n, heads, dqk, dv, lq, lk, dtype, layout, scale, *, backward=True, magnitude=1.0, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q = _make(n, heads * dqk, lq, dtype, layout, gen, magnitude)
    k = _make(n, heads * dqk, lk, dtype, layout, gen)
    v = _make(n, heads * dv, lk, dtype, layout, gen)

    out, lse = ops.spatial_attention_forward(q, k, v, heads, scale)
    torch.cuda.synchronize()
    truth_out, truth_lse = ref_spatial_attention_forward(q.double(), k.double(), v.double(), heads, scale)
    eager_out, eager_lse = ref_spatial_attention_forward(q, k, v, heads, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == (n, heads * dv, lq) and lse.shape == (n, heads, lq)
    # contract: out channel-last when q is (stride(1) == 1, more than one channel), else contiguous
    # (compared by rule, not with eager_out.stride(): for heads=1 the reference returns a channel-last view)
    if q.stride(1) == 1 and q.shape[1] > 1:
        assert out.transpose(1, 2).is_contiguous(), f"out strides {out.stride()}: expected channel-last"
    else:
        assert out.is_contiguous(), f"out strides {out.stride()}: expected contiguous"
    _check_forward((out, lse), (truth_out, truth_lse), (eager_out, eager_lse))
    if not backward:
        return

    grad_out = _make(n, heads * dv, lq, dtype, "channel_last" if out.stride(1) == 1 and out.shape[1] > 1 else "contiguous",
                     gen)
    dq, dk, dv_ = ops.spatial_attention_backward(grad_out, q, k, v, out, lse, heads, scale)
    torch.cuda.synchronize()
    truth = _ref_grads(q.double(), k.double(), v.double(), grad_out.double(), heads, scale)
    eager = _eager_backward_op(grad_out, q, k, v, out, heads, scale)
    # The backward recomputes P from the float32 lse of the contract, whose rounding (relative
    # 2**-24 of |lse|, ~1e-3 absolute at logits of 1e4) the eager autograd never sees.
    lse_rounding = 2.0 ** -22 * truth_lse.abs().max().item()
    for name, got, like, t, e in zip(("dq", "dk", "dv"), (dq, dk, dv_), (q, k, v), truth, eager):
        assert got.dtype == like.dtype and got.shape == like.shape, f"{name}: {got.dtype} {got.shape} vs {like.dtype} {like.shape}"
        if like.is_contiguous() or like.transpose(1, 2).is_contiguous():
            assert got.stride() == like.stride(), f"{name}: strides {got.stride()} != input's {like.stride()}"
        assert_error_rule(name, got, t, e, CUDA_ATTENTION_ATOL[dtype] + lse_rounding)


# (N, heads, d_qk, d_v, Lq, Lk, scale); scale None means d_qk ** -0.5
CASES = [
    (2, 1, 8, 8, 1, 1, None),           # one position
    (2, 2, 32, 32, 49, 49, 1.0),        # 7x7, SAGAN-style scale
    (1, 8, 40, 40, 196, 49, None),      # Lk = Lq / 4, many heads, d not a power of two
    (2, 1, 64, 64, 196, 196, None),
    (1, 2, 80, 80, 784, 196, 1.0),      # 28x28 queries over 14x14 keys
    (1, 1, 96, 48, 49, 196, None),      # d_v != d_qk, more keys than queries
    (1, 2, 128, 128, 784, 784, None),
    (1, 1, 160, 160, 196, 49, None),    # 32-row tiles
    (1, 1, 512, 512, 49, 49, None),     # 16-row tiles, largest head
    (1, 1, 32, 512, 196, 49, 1.0),      # large d_v, small d_qk
    (1, 2, 512, 64, 49, 196, None),     # large d_qk, small d_v
    (1, 1, 64, 64, 4097, 4097, None),   # one past a multiple of every tile
    (1, 8, 8, 8, 4097, 1025, 1.0),      # ~4:1, small head
]


def _case_id(case):
    n, heads, dqk, dv, lq, lk, scale = case
    return f"n{n}h{heads}dqk{dqk}dv{dv}lq{lq}lk{lk}s{'d' if scale is None else scale}"


def run_listed_case(ops, case, dtype, layout):
    """_run_case for an entry of a CASES list."""
    n, heads, dqk, dv, lq, lk, scale = case
    _run_case(ops, n, heads, dqk, dv, lq, lk, dtype, layout, dqk ** -0.5 if scale is None else scale)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_backward_parity(ops, case, dtype, layout):
    run_listed_case(ops, case, dtype, layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1.0, 0.125, 3.0])
def test_scales(ops, dtype, scale):
    _run_case(ops, 2, 2, 64, 32, 196, 196, dtype, "contiguous", scale)


def test_keys_of_minus_inf_logits_drop_out(ops):
    check_minus_inf_keys_drop_out(ops.spatial_attention_forward, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_logits_stay_finite(ops, dtype):
    """Logits of magnitude ~1e4 (unscaled q of std 300, d=64): the online softmax must not overflow."""
    _run_case(ops, 1, 2, 64, 64, 196, 196, dtype, "channel_last", 1.0, magnitude=300.0)


@pytest.mark.parametrize("lq, lk, dtype, layout", [
    (65536, 256, torch.float32, "contiguous"),
    (256, 65536, torch.float16, "channel_last"),
])
def test_long_sequences(ops, lq, lk, dtype, layout):
    _run_case(ops, 1, 1, 8, 8, lq, lk, dtype, layout, 8 ** -0.5)


def test_long_square_forward_rows(ops):
    """Lq = Lk = 65536: compare sampled query rows (each row of out depends only on its own query)."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    n, heads, d, length, dtype = 1, 2, 8, 65536, torch.bfloat16
    q, k, v = (_make(n, heads * d, length, dtype, "contiguous", gen) for _ in range(3))
    out, lse = ops.spatial_attention_forward(q, k, v, heads, d ** -0.5)
    rows = torch.cat([torch.arange(64), torch.randint(64, length - 64, (64,), generator=torch.Generator().manual_seed(2)),
                      torch.arange(length - 64, length)]).to(DEVICE)
    truth_out, truth_lse = ref_spatial_attention_forward(q[:, :, rows].double(), k.double(), v.double(), heads, d ** -0.5)
    eager_out, eager_lse = ref_spatial_attention_forward(q[:, :, rows], k, v, heads, d ** -0.5)
    _check_forward((out[:, :, rows], lse[:, :, rows]), (truth_out, truth_lse), (eager_out, eager_lse))


def test_batch_heads_past_grid_limit(ops):
    """N * heads = 65600 > 65535 blocks on grid y: folded into grid z."""
    _run_case(ops, 4100, 16, 8, 8, 3, 5, torch.float32, "contiguous", 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_deterministic(ops, dtype):
    check_deterministic(ops, dtype)


def check_deterministic(ops, dtype):
    """Two identical forward calls, and two identical backward calls, give the same bits."""
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    q, k, v = (_make(2, 128, 784, dtype, "channel_last", gen) for _ in range(3))
    grad_out = _make(2, 128, 784, dtype, "channel_last", gen)
    first = ops.spatial_attention_forward(q, k, v, 2, 0.125)
    second = ops.spatial_attention_forward(q, k, v, 2, 0.125)
    for name, a, b in zip(("out", "lse"), first, second):
        assert_equal_values(f"{name} of a second identical forward call", b, a)
    grads = [ops.spatial_attention_backward(grad_out, q, k, v, *first, 2, 0.125) for _ in range(2)]
    for name, a, b in zip(("dq", "dk", "dv"), *grads):
        assert_equal_values(f"{name} of a second identical backward call", b, a)


def _raise_clear_errors(ops):
    q = torch.randn(1, 2 * 513, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match="head dims up to 512"):
        ops.spatial_attention_forward(q, q, q, 2, 1.0)
    q = torch.randn(1, 8, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.spatial_attention_forward(q, q.half(), q, 1, 1.0)
    with pytest.raises(RuntimeError, match="must divide"):
        ops.spatial_attention_forward(q, q, q, 3, 1.0)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.spatial_attention_forward(q.double(), q.double(), q.double(), 1, 1.0)
    out, lse = ops.spatial_attention_forward(q, q, q, 2, 1.0)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        ops.spatial_attention_backward(out, q, q, q, out, lse[:, :1], 2, 1.0)


def test_clear_errors(ops):
    """Misuse raises RuntimeError with a clear message. Run in a child process: a crash while
    raising (seen once on the GPU machine) then fails this test instead of killing the session."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('cuda_attention_test', {str(Path(__file__).resolve())!r})\n"
            "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
            "mod._raise_clear_errors(mod._load_ops())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert child.returncode == 0, f"exit code {child.returncode}\n{child.stdout[-2000:]}\n{child.stderr[-4000:]}"
