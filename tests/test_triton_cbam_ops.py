"""Op-level parity of the Triton CBAM kernels (triton_kernels/cbam.py) with fastattn.reference.ref_*.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (device "cpu"); with one they
are compiled and run on CUDA tensors (device "cuda"). Index outputs (argmax, tie counts) and maxima
must equal the same-dtype reference exactly; sums follow docs/DESIGN.md §4: error against the float64
reference at most 2x the same-dtype eager reference's error plus a small atol.
"""
import importlib
import os

import torch

if not torch.cuda.is_available():
    # must precede the decoration of the kernels; Triton runs CPU tensors only when interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402
from _contract import TRITON_CBAM_UNITS, assert_equal_values, assert_error_rule, eps_atol  # noqa: E402

from fastattn._ops import ChannelMaxTerm, OutputTerm, SpatialPoolTerm, grad_x_args  # noqa: E402
from fastattn.reference import (  # noqa: E402
    _memory_format,
    ref_cbam_apply,
    ref_cbam_apply_backward,
    ref_cbam_grad_x,
    ref_channel_pool,
    ref_gated_spatial_pool,
    ref_gated_spatial_pool_backward_gate,
)


def _load_triton_cbam():
    """The Triton launchers, installed as fastattn.triton_kernels.cbam."""
    return importlib.import_module("fastattn.triton_kernels.cbam")


tc = _load_triton_cbam()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="Triton runs CPU tensors only in its "
                                                 "interpreter (TRITON_INTERPRET=1)")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# each N, C and H*W of the brief appears, in mixed combinations: C in {1, 3, 17}, HW in {1, 7x7, 13x17}
SHAPES = [(1, 1, 1, 1), (2, 1, 7, 7), (1, 3, 13, 17), (2, 3, 1, 1), (2, 17, 7, 7), (1, 17, 13, 17)]
LAYOUTS = ["contiguous", "channels_last", "sliced"]  # sliced: W not flattenable with H, copied in the launcher


def _skip_unsupported(device, dtype):
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter casts float32 to bfloat16 by truncation, not round-to-nearest-even "
                    "as the GPU and eager PyTorch do, so bfloat16 results cannot match there")


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def _ties(shape, dtype, device, gen):
    """ReLU'd, rounded values: many zeros and repeated small integers, so maxima tie a lot."""
    return (torch.randn(shape, generator=gen) * 3).relu().round().to(dtype).to(device)


def _randn(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def _pow2_gate(shape, dtype, device, gen):
    """Powers of two: x * gate is exact in every dtype, so tie masks agree between dtypes."""
    return torch.exp2(torch.randint(-2, 3, shape, generator=gen).double()).to(dtype).to(device)


def _f64(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _atol(dtype, truth):
    """TRITON_CBAM_UNITS units of dtype at 1 + |truth| (this file's rule since it was written; kept as
    it was, not re-measured against the max(1, |truth|) of the other tables)."""
    scale = truth.abs().max().item() if truth.numel() else 0.0
    return eps_atol(dtype, TRITON_CBAM_UNITS, 1.0 + scale)


def _assert_close(name, out, eager, truth):
    """docs/DESIGN.md §4: |out - truth| <= 2 |eager - truth| + atol where eager is finite; elsewhere
    (NaN, +-inf) out must equal eager."""
    assert out.shape == eager.shape and out.dtype == eager.dtype, (name, out.shape, out.dtype, eager.shape, eager.dtype)
    finite = eager.isfinite()
    assert_equal_values(f"{name} (non-finite entries)", out[~finite], eager[~finite])
    if not finite.any():
        return
    dtype = out.dtype
    out, eager, truth = out[finite], eager[finite], truth[finite].double()
    assert_error_rule(name, out, truth, eager, _atol(dtype, truth), absolute=True)


def _check_pool(name, out, eager, truth_mean):
    mean, mx, arg, cnt = out
    _assert_close(f"{name} mean", mean, eager[0], truth_mean)
    assert_equal_values(f"{name} max", mx, eager[1])
    assert_equal_values(f"{name} argmax", arg, eager[2])
    assert_equal_values(f"{name} count", cnt, eager[3])


# --------------------------------------------------------------------------
# Forward ops
# --------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("values", ["ties", "randn"])
def test_channel_pool(shape, layout, dtype, device, values):
    _skip_unsupported(device, dtype)
    gen = torch.Generator().manual_seed(0)
    x = _layout((_ties if values == "ties" else _randn)(shape, dtype, device, gen), layout)
    out = tc.channel_pool(x, True)  # split_ties (schema argument) only matters to the backward
    eager = ref_channel_pool(x)
    truth = ref_channel_pool(x.double())
    _check_pool("channel_pool", out, eager, truth[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("values", ["ties", "randn"])
def test_gated_spatial_pool(shape, layout, dtype, device, values):
    _skip_unsupported(device, dtype)
    gen = torch.Generator().manual_seed(1)
    x = _layout((_ties if values == "ties" else _randn)(shape, dtype, device, gen), layout)
    # ties: exact products keep the ties; randn: sigmoid gates make the rounding of z matter
    gate = _pow2_gate(shape[:2], dtype, device, gen) if values == "ties" else \
        torch.rand(shape[:2], generator=gen).to(dtype).to(device)
    pooled, arg, cnt = tc.gated_spatial_pool(x, gate, False)  # split_ties only matters to the backward
    eager = ref_gated_spatial_pool(x, gate)
    truth = ref_gated_spatial_pool(x.double(), gate.double())
    assert pooled.is_contiguous()
    _check_pool("gated_spatial_pool", (pooled[:, 0], pooled[:, 1], arg, cnt),
                (eager[0][:, 0], eager[0][:, 1], eager[1], eager[2]), truth[0][:, 0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gated_spatial_pool_ties_made_by_rounding(layout, dtype, device):
    """x on a fine grid near 1.75 times gates near 0.85: neighbouring products differ by less than
    an ulp of the result, so the max and its ties exist only once z is rounded to x.dtype."""
    _skip_unsupported(device, dtype)
    gen = torch.Generator().manual_seed(14)
    shape = (2, 17, 7, 7)
    x = 1.5 + torch.randint(0, 16, shape, generator=gen).double() * torch.finfo(dtype).eps
    gate = 0.7 + 0.3 * torch.rand(shape[:2], generator=gen).double()
    x, gate = _layout(x.to(dtype).to(device), layout), gate.to(dtype).to(device)
    unrounded = ref_gated_spatial_pool(x.float(), gate.float())
    eager = ref_gated_spatial_pool(x, gate)
    assert not torch.equal(unrounded[2], eager[2]), "input does not exercise the rounding of z"
    pooled, arg, cnt = tc.gated_spatial_pool(x, gate)
    assert_equal_values("pooled", pooled, eager[0])
    assert_equal_values("argmax", arg, eager[1])
    assert_equal_values("count", cnt, eager[2])
    # the backward's tie mask compares the rounded z with the pooled max as well; a float64
    # reference would not round z, so the same-dtype reference is the truth here (error <= atol)
    gp = _randn((2, 2, 7, 7), dtype, device, gen)
    args = (gp, x, gate, pooled, arg, cnt)
    eager = ref_gated_spatial_pool_backward_gate(*args, True)
    _assert_close("grad_gate", tc.gated_spatial_pool_backward_gate(*args, True), eager, eager)
    dx_args = grad_x_args(x, spatial_pool=SpatialPoolTerm(gp, gate, pooled, arg, cnt), split_ties=True)
    eager = ref_cbam_grad_x(*dx_args)
    _assert_close("cbam_grad_x", tc.cbam_grad_x(*dx_args), eager, eager)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cbam_apply(shape, layout, dtype, device):
    _skip_unsupported(device, dtype)
    gen = torch.Generator().manual_seed(2)
    n, c, h, w = shape
    x = _layout(_randn(shape, dtype, device, gen), layout)
    ch = torch.rand((n, c), generator=gen).to(dtype).to(device)
    sp = torch.rand((n, h, w), generator=gen).to(dtype).to(device)
    y = tc.cbam_apply(x, ch, sp)
    assert y.is_contiguous(memory_format=_memory_format(x)), (y.stride(), x.stride())
    _assert_close("cbam_apply", y, ref_cbam_apply(x, ch, sp), ref_cbam_apply(x.double(), ch.double(), sp.double()))
    # the (N, 1, H, W) spatial gate of the modules is accepted as well
    assert_equal_values("cbam_apply (N, 1, H, W) gate", tc.cbam_apply(x, ch, sp.unsqueeze(1)), y)


# --------------------------------------------------------------------------
# Backward ops
# --------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cbam_apply_backward(shape, layout, dtype, device):
    _skip_unsupported(device, dtype)
    gen = torch.Generator().manual_seed(3)
    n, c, h, w = shape
    x = _layout(_randn(shape, dtype, device, gen), layout)
    grad_y = _randn(shape, dtype, device, gen)  # contiguous while x may not be: both strides are read
    ch = torch.rand((n, c), generator=gen).to(dtype).to(device)
    sp = torch.rand((n, h, w), generator=gen).to(dtype).to(device)
    out = tc.cbam_apply_backward(grad_y, x, ch, sp)
    eager = ref_cbam_apply_backward(grad_y, x, ch, sp)
    truth = ref_cbam_apply_backward(*(t.double() for t in (grad_y, x, ch, sp)))
    _assert_close("grad_ch_gate", out[0], eager[0], truth[0])
    _assert_close("grad_sp_gate", out[1], eager[1], truth[1])


def _backward_inputs(shape, layout, dtype, device, seed, nan=False):
    """Tie-heavy x, power-of-two gate, the forward's pooled/argmax/count, random upstream grads."""
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = _ties(shape, dtype, device, gen)
    if nan:  # a NaN in a few positions: its spatial and channel max become NaN, count 0
        x.view(-1)[:: max(1, x.numel() // 3)] = float("nan")
    x = _layout(x, layout)
    gate = _pow2_gate((n, c), dtype, device, gen)
    pooled, sp_arg, sp_cnt = ref_gated_spatial_pool(x, gate)
    _, ch_max, ch_arg, ch_cnt = ref_channel_pool(x)
    grads = dict(grad_y=_randn(shape, dtype, device, gen), grad_pooled=_randn((n, 2, h, w), dtype, device, gen),
                 grad_avg=_randn((n, c), dtype, device, gen), grad_max=_randn((n, c), dtype, device, gen))
    return x, gate, pooled, sp_arg, sp_cnt, ch_max, ch_arg, ch_cnt, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("split_ties", [False, True])
def test_gated_spatial_pool_backward_gate(shape, layout, dtype, device, split_ties):
    _skip_unsupported(device, dtype)
    x, gate, pooled, arg, cnt, *_, grads = _backward_inputs(shape, layout, dtype, device, 4)
    gp = grads["grad_pooled"]
    out = tc.gated_spatial_pool_backward_gate(gp, x, gate, pooled, arg, cnt, split_ties)
    eager = ref_gated_spatial_pool_backward_gate(gp, x, gate, pooled, arg, cnt, split_ties)
    truth = ref_gated_spatial_pool_backward_gate(*(_f64(t) for t in (gp, x, gate, pooled, arg, cnt)), split_ties)
    _assert_close("grad_gate", out, eager, truth)


# which gradient terms of cbam_grad_x are given: all, each alone, none
GRAD_X_TERMS = [("grad_y", "grad_pooled", "grad_avg", "grad_max"), ("grad_y",), ("grad_pooled",), ("grad_avg",),
                ("grad_max",), ()]


def _grad_x_args(x, gate, pooled, sp_arg, sp_cnt, ch_max, ch_arg, ch_cnt, grads, terms, split_ties, sp):
    has = set(terms)
    return grad_x_args(
        x, output=OutputTerm(grads["grad_y"], gate, sp) if "grad_y" in has else None,
        spatial_pool=SpatialPoolTerm(grads["grad_pooled"], gate, pooled, sp_arg, sp_cnt) if "grad_pooled" in has
        else None,
        grad_avg=grads["grad_avg"] if "grad_avg" in has else None,
        channel_max=ChannelMaxTerm(grads["grad_max"], ch_max, ch_arg, ch_cnt) if "grad_max" in has else None,
        split_ties=split_ties)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("split_ties", [False, True])
def test_cbam_grad_x(shape, layout, dtype, device, split_ties):
    _skip_unsupported(device, dtype)
    x, gate, pooled, sp_arg, sp_cnt, ch_max, ch_arg, ch_cnt, grads = _backward_inputs(shape, layout, dtype, device, 5)
    gen = torch.Generator().manual_seed(6)
    sp = torch.rand((shape[0], *shape[2:]), generator=gen).to(dtype).to(device)
    # every subset on one shape; all terms on the others (the interpreter is slow)
    for terms in GRAD_X_TERMS if shape == SHAPES[2] else GRAD_X_TERMS[:1]:
        args = _grad_x_args(x, gate, pooled, sp_arg, sp_cnt, ch_max, ch_arg, ch_cnt, grads, terms, split_ties, sp)
        dx = tc.cbam_grad_x(*args)
        eager = ref_cbam_grad_x(*args)
        assert dx.is_contiguous(memory_format=_memory_format(x)), (dx.stride(), x.stride())
        _assert_close(f"cbam_grad_x {terms}", dx, eager, ref_cbam_grad_x(*(_f64(a) for a in args)))


# --------------------------------------------------------------------------
# NaN, infinities, multi-tile loops and split reductions
# --------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_and_inf(layout, dtype, device):
    """First NaN wins the argmax with count 0; all -inf rows tie everywhere; +inf ties count;
    split_ties turns count 0 into NaN gradients, as PyTorch's amax does."""
    shape = (2, 3, 7, 7)
    x, gate, pooled, sp_arg, sp_cnt, ch_max, ch_arg, ch_cnt, grads = _backward_inputs(
        shape, "contiguous", dtype, device, 7, nan=True)
    x = x.clone()
    x[0, 1] = float("-inf")
    x[1, 2, 3, 1:4] = float("inf")
    x = _layout(x, layout)
    _check_pool("channel_pool", tc.channel_pool(x), ref_channel_pool(x), ref_channel_pool(x.double())[0])
    eager = ref_gated_spatial_pool(x, gate)
    pooled, sp_arg, sp_cnt = tc.gated_spatial_pool(x, gate)
    assert_equal_values("pooled", pooled, eager[0])
    assert_equal_values("spatial argmax", sp_arg, eager[1])
    assert_equal_values("spatial count", sp_cnt, eager[2])
    _, ch_max, ch_arg, ch_cnt = ref_channel_pool(x)
    gp = grads["grad_pooled"]
    sp = torch.rand((shape[0], *shape[2:]), generator=torch.Generator().manual_seed(8)).to(dtype).to(device)
    for split_ties in (False, True):
        args = (gp, x, gate, pooled, sp_arg, sp_cnt)
        _assert_close(f"grad_gate split_ties={split_ties}", tc.gated_spatial_pool_backward_gate(*args, split_ties),
                      ref_gated_spatial_pool_backward_gate(*args, split_ties),
                      ref_gated_spatial_pool_backward_gate(*(_f64(t) for t in args), split_ties))
        for terms in (("grad_pooled",), ("grad_max",), ("grad_y", "grad_avg")):
            args = _grad_x_args(x, gate, pooled, sp_arg, sp_cnt, ch_max, ch_arg, ch_cnt, grads, terms, split_ties, sp)
            _assert_close(f"cbam_grad_x {terms} split_ties={split_ties}", tc.cbam_grad_x(*args),
                          ref_cbam_grad_x(*args), ref_cbam_grad_x(*(_f64(a) for a in args)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_small_tiles_loop_and_split(layout, device, monkeypatch):
    """Tiny tiles make every kernel loop over several tiles and every reduction split its loop
    across programs, then fold the partials (the path of large maps with few rows)."""
    monkeypatch.setattr(tc, "TILE_ELEMENTS", 32)
    monkeypatch.setattr(tc, "MAX_CONTIGUOUS_BLOCK", 8)
    monkeypatch.setattr(tc, "MIN_SPLIT_ELEMENTS", 1)
    monkeypatch.setattr(tc, "MAX_SPLITS", 3)
    shape, dtype = (2, 11, 5, 7), torch.float32
    assert tc._pick_split(2, 5 * 7, 8, torch.device(device)) == (3, 16)  # 5 tiles of 8: 2 per split
    x, gate, pooled, sp_arg, sp_cnt, ch_max, ch_arg, ch_cnt, grads = _backward_inputs(shape, layout, dtype, device, 9)
    _check_pool("channel_pool", tc.channel_pool(x), ref_channel_pool(x), ref_channel_pool(x.double())[0])
    out = tc.gated_spatial_pool(x, gate)
    eager = ref_gated_spatial_pool(x, gate)
    _check_pool("gated_spatial_pool", (out[0][:, 0], out[0][:, 1], out[1], out[2]),
                (eager[0][:, 0], eager[0][:, 1], eager[1], eager[2]),
                ref_gated_spatial_pool(x.double(), gate.double())[0][:, 0])
    # NaNs in some chunks of a split: the fold must pick the first NaN over all chunks
    x_nan = x.clone()
    x_nan[0, 3, 4, 2] = x_nan[0, 3, 0, 5] = x_nan[1, 9, 2, 2] = x_nan[1, 2, 2, 2] = float("nan")
    _check_pool("channel_pool NaN", tc.channel_pool(x_nan), ref_channel_pool(x_nan),
                ref_channel_pool(x_nan.double())[0])
    for o, e in zip(tc.gated_spatial_pool(x_nan, gate), ref_gated_spatial_pool(x_nan, gate)):
        assert_equal_values("gated_spatial_pool NaN", o, e)
    sp = torch.rand((2, 5, 7), generator=torch.Generator().manual_seed(10)).to(device)
    _assert_close("cbam_apply", tc.cbam_apply(x, gate, sp), ref_cbam_apply(x, gate, sp),
                  ref_cbam_apply(x.double(), gate.double(), sp.double()))
    gy = grads["grad_y"]
    bw = tc.cbam_apply_backward(gy, x, gate, sp)
    bw_eager = ref_cbam_apply_backward(gy, x, gate, sp)
    bw_truth = ref_cbam_apply_backward(gy.double(), x.double(), gate.double(), sp.double())
    _assert_close("grad_ch_gate", bw[0], bw_eager[0], bw_truth[0])
    _assert_close("grad_sp_gate", bw[1], bw_eager[1], bw_truth[1])
    for split_ties in (False, True):
        gp = grads["grad_pooled"]
        args = (gp, x, gate, pooled, sp_arg, sp_cnt)
        _assert_close("grad_gate", tc.gated_spatial_pool_backward_gate(*args, split_ties),
                      ref_gated_spatial_pool_backward_gate(*args, split_ties),
                      ref_gated_spatial_pool_backward_gate(*(_f64(t) for t in args), split_ties))
        args = _grad_x_args(x, gate, pooled, sp_arg, sp_cnt, ch_max, ch_arg, ch_cnt, grads, GRAD_X_TERMS[0],
                            split_ties, sp)
        _assert_close("cbam_grad_x", tc.cbam_grad_x(*args), ref_cbam_grad_x(*args),
                      ref_cbam_grad_x(*(_f64(a) for a in args)))


# --------------------------------------------------------------------------
# GPU only: real CBAM shapes and offsets past 2^31
# --------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA device, compiled")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(32, 2048, 7, 7), (8, 256, 56, 56), (1, 64, 129, 127), (3, 5, 300, 301)])
def test_cuda_cbam_shapes(shape, layout, dtype):
    device = "cuda"
    n, c, h, w = shape
    x, gate, pooled, sp_arg, sp_cnt, ch_max, ch_arg, ch_cnt, grads = _backward_inputs(shape, layout, dtype, device, 11)
    xr = _layout(_randn(shape, dtype, device, torch.Generator().manual_seed(12)), layout)
    _check_pool("channel_pool", tc.channel_pool(x), ref_channel_pool(x), ref_channel_pool(x.double())[0])
    _check_pool("channel_pool randn", tc.channel_pool(xr), ref_channel_pool(xr), ref_channel_pool(xr.double())[0])
    for inp, g in ((x, gate), (xr, torch.rand((n, c), device=device).to(dtype))):
        out, eager = tc.gated_spatial_pool(inp, g), ref_gated_spatial_pool(inp, g)
        _check_pool("gated_spatial_pool", (out[0][:, 0], out[0][:, 1], out[1], out[2]),
                    (eager[0][:, 0], eager[0][:, 1], eager[1], eager[2]),
                    ref_gated_spatial_pool(inp.double(), g.double())[0][:, 0])
    sp = torch.rand((n, h, w), device=device).to(dtype)
    _assert_close("cbam_apply", tc.cbam_apply(xr, gate, sp), ref_cbam_apply(xr, gate, sp),
                  ref_cbam_apply(xr.double(), gate.double(), sp.double()))
    gy = grads["grad_y"]
    bw, bw_eager = tc.cbam_apply_backward(gy, xr, gate, sp), ref_cbam_apply_backward(gy, xr, gate, sp)
    bw_truth = ref_cbam_apply_backward(gy.double(), xr.double(), gate.double(), sp.double())
    _assert_close("grad_ch_gate", bw[0], bw_eager[0], bw_truth[0])
    _assert_close("grad_sp_gate", bw[1], bw_eager[1], bw_truth[1])
    for split_ties in (False, True):
        args = (grads["grad_pooled"], x, gate, pooled, sp_arg, sp_cnt)
        _assert_close("grad_gate", tc.gated_spatial_pool_backward_gate(*args, split_ties),
                      ref_gated_spatial_pool_backward_gate(*args, split_ties),
                      ref_gated_spatial_pool_backward_gate(*(_f64(t) for t in args), split_ties))
        args = _grad_x_args(x, gate, pooled, sp_arg, sp_cnt, ch_max, ch_arg, ch_cnt, grads, GRAD_X_TERMS[0],
                            split_ties, sp)
        _assert_close("cbam_grad_x", tc.cbam_grad_x(*args), ref_cbam_grad_x(*args),
                      ref_cbam_grad_x(*(_f64(a) for a in args)))


@needs_cuda
def test_cuda_offsets_past_int32():
    """x strided so its last elements lie past 2^31 elements of storage (inputs), and an output
    of more than 2^31 elements (cbam_apply): both need 64-bit offsets."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    device, dtype = "cuda", torch.float16
    gen = torch.Generator().manual_seed(13)
    storage = torch.zeros(2**31 + 2**23, dtype=dtype, device=device)
    shape = (2, 3, 5, 7)
    x = storage.as_strided(shape, (2**31 - 64, 2**21, 7, 1))
    x.copy_(_ties(shape, dtype, device, gen))
    assert x.storage_offset() + sum((s - 1) * st for s, st in zip(shape, x.stride())) >= 2**31
    xc = x.contiguous()
    gate = _pow2_gate(shape[:2], dtype, device, gen)
    for o, e in zip(tc.channel_pool(x), ref_channel_pool(xc)):
        assert_equal_values("channel_pool (2^31 offsets)", o, e)
    for o, e in zip(tc.gated_spatial_pool(x, gate), ref_gated_spatial_pool(xc, gate)):
        assert_equal_values("gated_spatial_pool (2^31 offsets)", o, e)
    sp = torch.rand((2, 5, 7), generator=gen).to(dtype).to(device)
    assert_equal_values("cbam_apply (2^31 offsets)", tc.cbam_apply(x, gate, sp), ref_cbam_apply(xc, gate, sp))
    del storage, x
    big = torch.ones((2, 1024, 1024, 1040), dtype=dtype, device=device)  # 2.18e9 elements
    big[-1, -1] = 2.0
    ch = torch.full((2, 1024), 0.5, dtype=dtype, device=device)
    spg = torch.full((2, 1024, 1040), 0.25, dtype=dtype, device=device)
    y = tc.cbam_apply(big, ch, spg)
    assert y[-1, -1].eq(0.25).all() and y[-1, -2].eq(0.125).all() and y[0, 0].eq(0.125).all()
    del y
    avg, mx, arg, cnt = tc.channel_pool(big)
    assert mx[-1, -1] == 2.0 and cnt[-1, -1] == 1024 * 1040 and arg[-1, -1] == 0 and cnt[0, 0] == 1024 * 1040
