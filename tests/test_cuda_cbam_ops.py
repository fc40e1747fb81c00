"""CUDA kernels of the CBAM ops (csrc/cuda/cbam.cu) against the op contract, fastattn.reference.

Values (means, sums, gradients) follow docs/DESIGN.md §4: the kernel's error against a
float64 ground truth is at most 2x the same-dtype reference's error plus a small
atol. Maxima, argmax and tie counts must equal the same-dtype reference exactly,
NaN and inf in the same places. The cases every CBAM backend shares (hand-made NaN/inf rows, empty
batch, other strides, determinism, float64 refused) are in tests/test_cbam_op_cases.py (backend "cuda").
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from _contract import CUDA_CBAM_ATOL, assert_equal_values, assert_error_rule
from _op_cases import GRAD_X_TERMS, cbam_gate, cbam_generator, cbam_grad_x_args, cbam_randn, cbam_x, to_cbam_layout
from _util import compiled_ops

from fastattn.reference import (
    _max_weight,
    _memory_format,
    ref_cbam_apply,
    ref_cbam_apply_backward,
    ref_cbam_grad_x,
    ref_channel_pool,
    ref_gated_spatial_pool,
    ref_gated_spatial_pool_backward_gate,
)

if not torch.cuda.is_available():
    pytest.skip("the CUDA CBAM kernels need a CUDA device; torch.cuda.is_available() is False",
                allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda"


def _load_ops():
    """torch.ops.fastattn with the CUDA kernels of the installed fastattn._C."""
    return compiled_ops("channel_pool", "CUDA")


@pytest.fixture(scope="module")
def ops():
    return _load_ops()


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CHANNELS = [1, 3, 17, 2048]
SPATIAL = [(1, 1), (7, 7), (13, 17), (56, 56)]
BATCHES = [1, 8]
MAX_ELEMENTS = 8 * 2**20  # drops only (8, 2048, 56, 56)
SHAPES = [(n, c, h, w) for c, (h, w), n in itertools.product(CHANNELS, SPATIAL, BATCHES) if n * c * h * w <= MAX_ELEMENTS]
LAYOUTS = ["contiguous", "channels_last"]
KINDS = ["ties", "nan"]  # relu'd and rounded (many ties); random with NaN and +-inf sprinkled in



def _shape_id(shape):
    return "x".join(map(str, shape))


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


cases = pytest.mark.parametrize(
    "shape,dtype,layout,kind",
    list(itertools.product(SHAPES, DTYPES, LAYOUTS, KINDS)),
    ids=lambda v: _shape_id(v) if isinstance(v, tuple) else _dtype_id(v) if isinstance(v, torch.dtype) else str(v))
split_ties_cases = pytest.mark.parametrize("split_ties", [True, False], ids=["split", "first"])


_generator = cbam_generator  # CPU generators: the values do not depend on the device


def _make_x(shape, dtype, layout, kind, gen):
    return cbam_x(shape, dtype, layout, kind, gen, DEVICE)


def _make_gate(shape, dtype, kind, gen):
    return cbam_gate(shape, dtype, kind, gen, DEVICE)


def _randn(shape, dtype, gen):
    return cbam_randn(shape, dtype, gen, DEVICE)


def _rand(shape, dtype, gen):
    return torch.rand(shape, generator=gen).to(device=DEVICE, dtype=dtype)


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------
def _check_values(name: str, out: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor) -> None:
    """docs/DESIGN.md §4 on the finite entries; NaN and inf exactly where the same-dtype reference has them."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, reference {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype}, reference {ref.dtype}"
    out64, ref64, truth64 = out.double(), ref.double(), truth.double()
    nan_ref = ref64.isnan()
    bad = (out64.isnan() != nan_ref).nonzero()
    assert bad.numel() == 0, f"{name}: NaN pattern differs from the reference at {bad.shape[0]} entries, first {bad[0].tolist()}"
    inf_ref = ref64.isinf()
    bad = ((out64.isinf() != inf_ref) | (inf_ref & (out64 != ref64))).nonzero()
    assert bad.numel() == 0, f"{name}: inf pattern differs from the reference at {bad.shape[0]} entries, first {bad[0].tolist()}"
    finite = ~(nan_ref | inf_ref) & truth64.isfinite()
    if not finite.any():
        return
    assert_error_rule(name, out[finite], truth64[finite], ref[finite], CUDA_CBAM_ATOL[out.dtype])


def _check_layout(name: str, out: torch.Tensor, x: torch.Tensor) -> None:
    fmt = _memory_format(x)
    assert out.is_contiguous(memory_format=fmt), f"{name}: expected {fmt} like x (strides {x.stride()}), got strides {out.stride()}"


# --------------------------------------------------------------------------
# Float64 ground truth for the tie-weighted gradients: the tie decisions are
# the same-dtype ones (products rounded to x's dtype), the arithmetic float64.
# --------------------------------------------------------------------------
def _truth_backward_gate(grad_pooled, x, gate, pooled, argmax, count, split_ties):
    z = x * gate[:, :, None, None]
    w = _max_weight(z, pooled[:, 1], argmax, count, 1, split_ties).double()
    gp = grad_pooled.double()
    return ((gp[:, 0:1] / x.shape[1] + w * gp[:, 1:2]) * x.double()).sum((2, 3))


def _truth_grad_x(x, grad_y, ch_gate, sp_gate, grad_pooled, pooled, sp_argmax, sp_count,
                  grad_avg, grad_max, ch_max, ch_argmax, ch_count, split_ties):
    n, c, h, w = x.shape
    dx = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    if grad_y is not None:
        dx += grad_y.double() * ch_gate.double()[:, :, None, None] * sp_gate.double()[:, None]
    if grad_pooled is not None:
        wsp = _max_weight(x * ch_gate[:, :, None, None], pooled[:, 1], sp_argmax, sp_count, 1, split_ties).double()
        gp = grad_pooled.double()
        dx += ch_gate.double()[:, :, None, None] * (gp[:, 0:1] / c + wsp * gp[:, 1:2])
    if grad_avg is not None:
        dx += grad_avg.double()[:, :, None, None] / (h * w)
    if grad_max is not None:
        wch = _max_weight(x.flatten(2), ch_max, ch_argmax, ch_count, 2, split_ties).double()
        dx += (wch * grad_max.double()[:, :, None]).view(n, c, h, w)
    return dx


def _grad_x_inputs(shape, dtype, layout, kind, gen, terms=GRAD_X_TERMS):
    x = _make_x(shape, dtype, layout, kind, gen)
    return x, cbam_grad_x_args(x, gen, kind, layout, terms)


# --------------------------------------------------------------------------
# Op-level parity
# --------------------------------------------------------------------------
@cases
def test_channel_pool(ops, shape, dtype, layout, kind):
    x = _make_x(shape, dtype, layout, kind, _generator("channel_pool", shape, dtype, layout, kind))
    avg, mx, argmax, count = ops.channel_pool(x, True)
    ref_avg, ref_mx, ref_argmax, ref_count = ref_channel_pool(x)
    _check_values("avg", avg, ref_avg, ref_channel_pool(x.double())[0])
    assert_equal_values("max", mx, ref_mx)
    assert_equal_values("argmax", argmax, ref_argmax)
    assert_equal_values("count", count, ref_count)


@cases
def test_gated_spatial_pool(ops, shape, dtype, layout, kind):
    gen = _generator("gated_spatial_pool", shape, dtype, layout, kind)
    x = _make_x(shape, dtype, layout, kind, gen)
    gate = _make_gate(shape, dtype, kind, gen)
    pooled, argmax, count = ops.gated_spatial_pool(x, gate, True)
    ref_pooled, ref_argmax, ref_count = ref_gated_spatial_pool(x, gate)
    assert pooled.is_contiguous(), f"pooled must be contiguous, got strides {pooled.stride()}"
    truth_pooled = ref_gated_spatial_pool(x.double(), gate.double())[0]
    _check_values("mean", pooled[:, 0], ref_pooled[:, 0], truth_pooled[:, 0])
    assert_equal_values("max", pooled[:, 1], ref_pooled[:, 1])
    assert_equal_values("argmax", argmax, ref_argmax)
    assert_equal_values("count", count, ref_count)


@cases
def test_cbam_apply(ops, shape, dtype, layout, kind):
    gen = _generator("cbam_apply", shape, dtype, layout, kind)
    n, c, h, w = shape
    x = _make_x(shape, dtype, layout, kind, gen)
    ch_gate = _make_gate(shape, dtype, kind, gen)
    sp_gate = _rand((n, h, w), dtype, gen)
    y = ops.cbam_apply(x, ch_gate, sp_gate)
    _check_layout("y", y, x)
    _check_values("y", y, ref_cbam_apply(x, ch_gate, sp_gate), ref_cbam_apply(x.double(), ch_gate.double(), sp_gate.double()))


@cases
def test_cbam_apply_backward(ops, shape, dtype, layout, kind):
    gen = _generator("cbam_apply_backward", shape, dtype, layout, kind)
    n, c, h, w = shape
    x = _make_x(shape, dtype, layout, kind, gen)
    grad_y = to_cbam_layout(_randn(shape, dtype, gen), layout)
    ch_gate = _make_gate(shape, dtype, kind, gen)
    sp_gate = _rand((n, h, w), dtype, gen)
    d_ch, d_sp = ops.cbam_apply_backward(grad_y, x, ch_gate, sp_gate)
    ref_ch, ref_sp = ref_cbam_apply_backward(grad_y, x, ch_gate, sp_gate)
    truth_ch, truth_sp = ref_cbam_apply_backward(grad_y.double(), x.double(), ch_gate.double(), sp_gate.double())
    _check_values("grad_ch_gate", d_ch, ref_ch, truth_ch)
    _check_values("grad_sp_gate", d_sp, ref_sp, truth_sp)


@cases
@split_ties_cases
def test_gated_spatial_pool_backward_gate(ops, shape, dtype, layout, kind, split_ties):
    gen = _generator("backward_gate", shape, dtype, layout, kind)
    n, c, h, w = shape
    x = _make_x(shape, dtype, layout, kind, gen)
    gate = _make_gate(shape, dtype, kind, gen)
    pooled, argmax, count = ref_gated_spatial_pool(x, gate)
    grad_pooled = _randn((n, 2, h, w), dtype, gen)
    args = (grad_pooled, x, gate, pooled, argmax, count, split_ties)
    out = ops.gated_spatial_pool_backward_gate(*args)
    _check_values("grad_gate", out, ref_gated_spatial_pool_backward_gate(*args), _truth_backward_gate(*args))


@cases
@split_ties_cases
def test_cbam_grad_x(ops, shape, dtype, layout, kind, split_ties):
    x, args = _grad_x_inputs(shape, dtype, layout, kind, _generator("grad_x", shape, dtype, layout, kind))
    dx = ops.cbam_grad_x(x, *args, split_ties)
    _check_layout("grad_x", dx, x)
    _check_values("grad_x", dx, ref_cbam_grad_x(x, *args, split_ties), _truth_grad_x(x, *args, split_ties))


@pytest.mark.parametrize("terms", [(), ("grad_y",), ("grad_pooled",), ("grad_avg",), ("grad_max",),
                                   ("grad_avg", "grad_max"), ("grad_y", "grad_pooled")], ids=lambda t: "+".join(t) or "none")
@pytest.mark.parametrize("shape", [(2, 17, 13, 17), (1, 3, 1, 1)], ids=_shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_cbam_grad_x_absent_terms(ops, terms, shape, layout, dtype):
    x, args = _grad_x_inputs(shape, dtype, layout, "ties", _generator("grad_x_terms", shape, terms, layout, dtype), terms)
    for split_ties in (True, False):
        dx = ops.cbam_grad_x(x, *args, split_ties)
        _check_layout("grad_x", dx, x)
        _check_values("grad_x", dx, ref_cbam_grad_x(x, *args, split_ties), _truth_grad_x(x, *args, split_ties))
