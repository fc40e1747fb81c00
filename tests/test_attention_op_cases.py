"""The spatial-attention op cases of every backend, through one tester (tests/_op_cases.py).

Ops under test: spatial_attention_forward / spatial_attention_backward of each backend that can run
here: cpu always; triton and triton-v2 (the variant triton_attention_v2) in Triton's interpreter on CPU
tensors without a GPU, compiled with one; cuda and cuda-mma (the variant cuda_attention_mma, sm_80+)
with a GPU, skipped with the reason otherwise. Each backend keeps its own case table (what its kernels'
tiles and the interpreter's speed call for) and its own accuracy row (tests/_contract.py); the inputs,
layout rules, NaN, -inf, huge-logit, empty, determinism and bad-input cases are the same code for all.
Backend-specific cases (tile splits, grid folding, launch plans, AVX-512 bits, memory) stay in
test_{cpu,triton,cuda}_ops.py and test_cuda_attention_mma.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _contract import HUGE_LOGITS_TOLERANCE, assert_equal_values
from _op_cases import (ATTENTION_BACKENDS, INTERPRETED, attention_backend_params, attention_inputs,  # noqa: F401
                       ops, backend_param, case_id, make, run_attention_case, truth_grads)
from _util import check_minus_inf_keys_drop_out

from fastattn.reference import ref_spatial_attention_forward

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
CL, NCHW, STRIDED = "channel_last", "contiguous", "strided"


# --------------------------------------------------------------------------
# Parity tables: (backend, label, case, dtype, layouts[, q_std]);
# case = (N, heads, d_qk, d_v, Lq, Lk, scale), scale None meaning d_qk ** -0.5
# --------------------------------------------------------------------------
def _rows(backends, cases, dtypes, layouts, q_std=1.0):
    """Every backend x case x dtype x layout; cases: (label, case) pairs or bare cases (labelled by case_id)."""
    return [(b, *(c if isinstance(c[0], str) else (case_id(c), c)), d, lay, q_std)
            for b in backends for c in cases for d in dtypes for lay in layouts]


CPU_SHAPES = [  # the CPU kernels' head-dim paths (8-512), tile edges, 1x1
    ("7x7-d32", (2, 1, 32, 32, 49, 49, None)), ("14x14-d64", (1, 1, 64, 64, 196, 196, None)),
    ("28x28-d64", (1, 1, 64, 64, 784, 784, None)), ("sagan-4to1-dqk8-dv32", (2, 1, 8, 32, 196, 49, 1.0)),
    ("4to1-dqk40-dv20-h2", (1, 2, 40, 20, 196, 49, None)), ("1to4-dqk80-dv40-h2", (1, 2, 80, 40, 49, 196, None)),
    ("d96", (2, 1, 96, 96, 49, 49, None)), ("dqk128-dv64-scale1", (1, 1, 128, 64, 196, 196, 1.0)),
    ("d160", (1, 1, 160, 160, 49, 49, None)), ("unet-d40-h8", (1, 8, 40, 40, 64, 64, None)),
    ("d512", (1, 1, 512, 512, 49, 49, None)), ("one-query", (1, 2, 32, 64, 1, 49, None)),
    ("one-key-d8-h8", (2, 8, 8, 8, 49, 1, None)), ("one-by-one", (1, 1, 16, 16, 1, 1, 1.0)),
]
CPU_OTHER_DTYPE_SHAPES = [("4to1-dqk40-dv20-h2", (1, 2, 40, 20, 196, 49, None)),
                          ("sagan", (2, 1, 8, 32, 196, 49, 1.0)), ("d16-h8", (1, 8, 16, 16, 64, 64, None))]
CPU_ROWS = (_rows(["cpu"], CPU_SHAPES, [F32], [NCHW, CL])
            + _rows(["cpu"], CPU_OTHER_DTYPE_SHAPES, [F64, F16, BF16], [NCHW, CL])
            # any strides, and q, k, v in different layouts
            + _rows(["cpu"], [("mixed", (2, 2, 16, 24, 49, 196, None))], [F32],
                    [(STRIDED,) * 3, (CL, NCHW, CL), (NCHW, CL, STRIDED)])
            + _rows(["cpu"], [("long-4097", (1, 1, 8, 8, 4097, 4097, None))], [F32], [NCHW]))

TRITON_SMALL = [
    (1, 1, 8, 8, 1, 1, None),
    (2, 1, 8, 8, 7, 7, 1.0),
    (1, 2, 40, 40, 49, 49, None),
    (2, 2, 8, 24, 7, 49, -0.5),  # a negative scale turns the max into a min
    (1, 1, 64, 40, 49, 7, None),
    (1, 2, 64, 64, 17, 33, 1.0),
]
TRITON_LARGE = [  # GPU only: too slow for the interpreter
    (2, 1, 64, 64, 196, 196, None),
    (2, 4, 40, 40, 784, 784, None),
    (1, 2, 96, 48, 784, 196, 1.0),
    (1, 2, 160, 160, 196, 196, None),
    (1, 2, 80, 320, 196, 49, None),
    (1, 1, 512, 512, 196, 196, None),
    (1, 2, 64, 64, 4097, 4097, None),
]
# triton-v2 beside the small cases: lengths that are multiples of the interpreter's 16-row tiles (its
# unmasked full-tile path), head dims 16, 40, 80 with d_v != d_qk, and d_v = 300
TRITON_V2 = [
    (1, 2, 16, 16, 32, 48, None),
    (1, 1, 80, 40, 33, 16, None),
    (2, 1, 40, 16, 16, 7, 1.0),
    (1, 1, 24, 300, 5, 9, None),  # d_v padded to 512: the forward splits it over two programs
]
TRITON_V2_LARGE = [(1, 8, 40, 40, 1024, 1024, None), (1, 1, 512, 512, 196, 196, None), (1, 2, 320, 320, 49, 49, None)]
_TRITON, _TRITON_V2 = ATTENTION_BACKENDS["triton"].dtypes, ATTENTION_BACKENDS["triton-v2"].dtypes
# the large ones skip the strided view to keep compiles few
TRITON_ROWS = (_rows(["triton"], TRITON_SMALL, _TRITON, [NCHW, CL, STRIDED])
               + _rows(["triton-v2"], TRITON_SMALL + TRITON_V2, _TRITON_V2, [NCHW, CL, STRIDED])
               + ([] if INTERPRETED else _rows(["triton"], TRITON_LARGE, _TRITON, [NCHW, CL])
                  + _rows(["triton-v2"], TRITON_LARGE + TRITON_V2_LARGE, _TRITON_V2, [NCHW, CL])))

CUDA_CASES = [
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
# Head-dim blocks of the tensor-core kernels: 64 (d <= 64), 128, 256 (forward only: the backward of
# d > 128 stays on the FFMA kernels, a mixed pair the cases with d = 256 check). L of 1, 49, 196, 1023,
# 4096 and 4097: edges on either side of a tile.
MMA_CASES = [
    (2, 1, 16, 16, 1, 1, None),
    (2, 2, 16, 16, 49, 49, 1.0),
    (1, 8, 40, 40, 196, 49, None),       # U-Net head dim, 4:1 pooled keys
    (1, 2, 40, 40, 1023, 1023, None),
    (2, 1, 64, 64, 196, 196, None),
    (1, 1, 64, 64, 4096, 4096, None),
    (1, 1, 64, 64, 4097, 1023, None),
    (1, 2, 80, 80, 1023, 196, 1.0),
    (1, 1, 96, 48, 49, 1023, None),     # d_v != d_qk, more keys than queries
    (1, 1, 32, 128, 196, 196, None),    # d_v > d_qk
    (1, 2, 128, 128, 1023, 1023, None),
    (1, 1, 128, 128, 4096, 4096, None),
    (1, 1, 256, 256, 196, 1023, None),
    (1, 1, 256, 64, 1023, 49, None),
    (1, 1, 160, 200, 49, 196, 1.0),
]
_CUDA, _MMA = ATTENTION_BACKENDS["cuda"].dtypes, ATTENTION_BACKENDS["cuda-mma"].dtypes
CUDA_ROWS = (_rows(["cuda"], CUDA_CASES, _CUDA, [NCHW, CL, STRIDED])
             + _rows(["cuda"], [(f"scale{s}", (2, 2, 64, 32, 196, 196, s)) for s in (1.0, 0.125, 3.0)], _CUDA, [NCHW])
             + _rows(["cuda-mma"], MMA_CASES, _MMA, [NCHW, CL, STRIDED])
             + _rows(["cuda-mma"], [(f"scale{s}", (2, 2, 64, 32, 196, 196, s)) for s in (1.0, 0.125, -0.5)], _MMA,
                     [NCHW])
             # huge logits (~1e4, unscaled q of std 300, d=64): the online softmax must not overflow; these
             # kernels hold their full rule there
             + _rows(["cuda", "cuda-mma"], [("huge-logits", (1, 2, 64, 64, 196, 196, 1.0))], _CUDA, [CL], 300.0))


def _layout_id(layouts):
    return layouts if isinstance(layouts, str) else "+".join(layouts)


PARITY = [backend_param(b, label, case, dtype, layouts, q_std,
                        id=f"{b}-{label}-{str(dtype)[6:]}-{_layout_id(layouts)}")
          for b, label, case, dtype, layouts, q_std in CPU_ROWS + TRITON_ROWS + CUDA_ROWS
          if dtype in ATTENTION_BACKENDS[b].dtypes]


@pytest.mark.parametrize("backend,label,case,dtype,layouts,q_std", PARITY)
def test_forward_backward_parity(backend, ops, label, case, dtype, layouts, q_std):
    """out, lse, dq, dk, dv against the float64 reference by the backend's rule; dtypes and layouts."""
    run_attention_case(backend, ops, case, dtype, layouts, q_std=q_std)


# --------------------------------------------------------------------------
# Special values: NaN, keys of -inf logits, huge logits, no keys or queries
# --------------------------------------------------------------------------
# float32 runs triton's v1 kernels under either variant, and cuda's SIMT kernels under cuda-mma
FLOAT32_BACKENDS = ["cpu", "triton", "cuda"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Triton's interpreter warns on NaN arithmetic
@pytest.mark.parametrize("nan_in", ["q", "k", "v"])
@pytest.mark.parametrize("case,where", [
    pytest.param((2, 2, 8, 8, 49, 49, 0.25), (1, 3, 10), id="d8-L49"),
    pytest.param((2, 2, 8, 8, 5, 7, None), (1, 9, 3), id="d8-L5x7"),  # the NaN in head 1
])
@pytest.mark.parametrize("backend", attention_backend_params(FLOAT32_BACKENDS))
def test_nan_propagates_like_the_reference(backend, ops, case, where, nan_in):
    q, k, v, heads, scale = attention_inputs(case, torch.float32, "contiguous", backend.device, seed=4)
    {"q": q, "k": k, "v": v}[nan_in][where] = float("nan")
    out, lse = ops.spatial_attention_forward(q, k, v, heads, scale)
    truth_out, truth_lse = ref_spatial_attention_forward(q.double(), k.double(), v.double(), heads, scale)
    assert out.isnan().any()
    assert torch.equal(out.isnan(), truth_out.isnan()) and torch.equal(lse.isnan(), truth_lse.isnan())
    finite = ~truth_out.isnan()
    torch.testing.assert_close(out.double()[finite], truth_out[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", attention_backend_params(FLOAT32_BACKENDS))
def test_keys_of_minus_inf_logits_drop_out(backend, ops):
    check_minus_inf_keys_drop_out(ops.spatial_attention_forward, backend.device)


# (case, std of q and k); HUGE_LOGITS_TOLERANCE in tests/_contract.py gives each its slack
HUGE_LOGITS_CASES = {"cpu": ((1, 1, 16, 16, 49, 49, 1.0), 25.0), "triton": ((1, 2, 8, 8, 19, 23, 1.0), 60.0)}


@pytest.mark.parametrize("backend,dtype", [backend_param(b, d, id=f"{b}-{str(d)[6:]}")
                                           for b, dtypes in (("cpu", (F32, F64)), ("triton", (F32, F16)))
                                           for d in dtypes])
def test_huge_logits_stay_finite(backend, ops, dtype):
    """Logits of magnitude ~1e4: online softmax subtracts the row max, so nothing overflows. Logits this
    large carry an absolute float32 rounding error ~1e-3, so out and lse are compared loosely; the
    cuda kernels hold their full rule there (huge-logits rows of the parity table)."""
    case, std = HUGE_LOGITS_CASES[backend.name]
    q, k, v, heads, scale = attention_inputs(case, dtype, "contiguous", backend.device, 3, std, std)
    out, lse = ops.spatial_attention_forward(q, k, v, heads, scale)
    truth_out, truth_lse = ref_spatial_attention_forward(q.double(), k.double(), v.double(), heads, scale)
    assert truth_lse.abs().max() > 5e3  # the case really has huge logits
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    out_atol, lse_atol, lse_rtol, grad_units = HUGE_LOGITS_TOLERANCE[backend.name][dtype]
    torch.testing.assert_close(out.double(), truth_out, atol=out_atol, rtol=0)
    torch.testing.assert_close(lse.double(), truth_lse.double(), atol=lse_atol, rtol=lse_rtol)

    grad_out = make(*out.shape, dtype, "contiguous", torch.Generator().manual_seed(1), backend.device)
    grads = ops.spatial_attention_backward(grad_out, q, k, v, out, lse, heads, scale)
    assert all(torch.isfinite(g).all() for g in grads)
    if grad_units is None:
        return
    # the softmax is one-hot here, so true dq, dk are ~0 and what is left is the rounding of dp - delta
    # (~eps |dO| |v| d_v) times |k| or |q|: an atol of that size, not the 2x rule (float16 eager overflows)
    eps = torch.finfo(dtype).eps
    atol = grad_units * eps * v.abs().max().item() * v.shape[1] * max(q.abs().max().item(), k.abs().max().item())
    for name, got, want in zip(("dq", "dk", "dv"), grads, truth_grads(q, k, v, grad_out, heads, scale)):
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=16 * eps, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", attention_backend_params(FLOAT32_BACKENDS))
def test_empty_lengths(backend, ops):
    """Lk = 0: softmax over nothing gives out 0 and lse -inf, as the reference; Lq = 0: empty results."""
    q, k, v, heads, scale = attention_inputs((2, 2, 8, 4, 5, 0, None), torch.float32, "contiguous", backend.device)
    out, lse = ops.spatial_attention_forward(q, k, v, heads, scale)
    ref_out, ref_lse = ref_spatial_attention_forward(q, k, v, heads, scale)
    assert_equal_values("out", out, ref_out)
    assert_equal_values("lse", lse, ref_lse)
    dq, dk, dv = ops.spatial_attention_backward(torch.ones_like(out), q, k, v, out, lse, heads, scale)
    assert dq.shape == q.shape and not dq.any() and dk.numel() == 0 and dv.numel() == 0
    q, k, v, heads, scale = attention_inputs((2, 2, 8, 4, 0, 3, None), torch.float32, "contiguous", backend.device)
    out, lse = ops.spatial_attention_forward(q, k, v, heads, scale)
    assert out.shape == (2, 8, 0) and lse.shape == (2, 2, 0)
    dq, dk, dv = ops.spatial_attention_backward(out, q, k, v, out, lse, heads, scale)
    assert dq.shape == q.shape and dk.shape == k.shape and not dk.any() and not dv.any()


# --------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------
@pytest.mark.parametrize("backend,dtype", [
    backend_param(b, d, id=f"{b}-{str(d)[6:]}")
    for b, dtypes in (("cpu", (F32,)), ("triton", (F32, F16)), ("cuda", (F32, F16)), ("cuda-mma", (F16, BF16)))
    for d in dtypes])
def test_deterministic(backend, ops, dtype):
    """Two identical forward calls, and two identical backward calls, give the same bits."""
    if INTERPRETED and backend.name == "triton":
        pytest.skip("Triton's interpreter runs the programs one after another: nothing can race there")
    # the GPU case: several key blocks per query block, 2 heads, channel-last
    shape, heads, layout = ((1, 64, 300), 1, NCHW) if backend.device == "cpu" else ((2, 128, 784), 2, CL)
    gen = torch.Generator().manual_seed(5)
    q, k, v, grad_out = (make(*shape, dtype, layout, gen, backend.device) for _ in range(4))
    first = ops.spatial_attention_forward(q, k, v, heads, 0.125)
    second = ops.spatial_attention_forward(q, k, v, heads, 0.125)
    for name, a, b in zip(("out", "lse"), first, second):
        assert_equal_values(f"{name} of a second identical forward call", b, a)
    grads = [ops.spatial_attention_backward(grad_out, q, k, v, *first, heads, 0.125) for _ in range(2)]
    for name, a, b in zip(("dq", "dk", "dv"), *grads):
        assert_equal_values(f"{name} of a second identical backward call", b, a)


# --------------------------------------------------------------------------
# Bad input: clear errors from the compiled ops (the Triton launchers run after fastattn._validate)
# --------------------------------------------------------------------------
def _bad_inputs(device):
    """(backends, call(ops), message pattern) of each misuse."""
    q = torch.randn(1, 8, 10, device=device)
    wide = torch.randn(1, 2 * 513, 4, device=device)

    def lse_cut(ops):
        out, lse = ops.spatial_attention_forward(q, q, q, 2, 1.0)
        return ops.spatial_attention_backward(out, q, q, q, out, lse[:, :1], 2, 1.0)
    return [
        (("cpu", "cuda"), lambda ops: ops.spatial_attention_forward(q, q, q, 3, 1.0), "heads=3 must divide"),
        (("cpu", "cuda"), lambda ops: ops.spatial_attention_forward(q, q.half(), q, 1, 1.0), "dtype"),
        (("cpu",), lambda ops: ops.spatial_attention_forward(q, torch.randn(1, 8, 5), torch.randn(1, 8, 6), 1, 1.0),
         "shapes"),
        (("cpu",), lambda ops: ops.spatial_attention_forward(q, q.double(), q, 1, 1.0), "dtype"),
        (("cuda",), lambda ops: ops.spatial_attention_forward(wide, wide, wide, 2, 1.0), "head dims up to 512"),
        (("cuda",), lambda ops: ops.spatial_attention_forward(q.double(), q.double(), q.double(), 1, 1.0),
         "float32, float16 or bfloat16"),
        (("cuda",), lse_cut, "lse must have shape"),
    ]


def raise_clear_errors(backend_name: str) -> int:
    """Every misuse of the table for backend_name raises RuntimeError matching its pattern -> the count."""
    backend = ATTENTION_BACKENDS[backend_name]
    ops = backend.load()
    cases = [(call, match) for names, call, match in _bad_inputs(backend.device) if backend_name in names]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call(ops)
    return len(cases)


@pytest.mark.parametrize("backend", attention_backend_params(["cpu", "cuda"]))
def test_clear_errors(backend):
    """Misuse raises RuntimeError with a clear message. On the GPU in a child process: a crash while
    raising (seen once on the GPU machine) then fails this test instead of killing the session."""
    if backend.device == "cpu":
        assert raise_clear_errors(backend.name) == 4
        return
    tests = Path(__file__).resolve().parent
    code = (f"import sys; sys.path.insert(0, {str(tests)!r}); import conftest, test_attention_op_cases as m\n"
            f"assert m.raise_clear_errors({backend.name!r}) == 5\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert child.returncode == 0, f"exit code {child.returncode}\n{child.stdout[-2000:]}\n{child.stderr[-4000:]}"
