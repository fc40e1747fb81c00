"""Op-level parity of the C++ CPU CBAM kernels (csrc/cpu/cbam_*.cpp) with fastattn.reference.ref_*.

Error rule (docs/DESIGN.md §4): against the float64 reference, a kernel's error may be at most
2x the error of the same-dtype eager reference plus a small atol. Max values, argmax and tie
counts must match the same-dtype reference exactly, NaN positions included. The cases every CBAM
backend shares (hand-made NaN/inf rows, empty batch, other strides, determinism, bad input) are in
tests/test_cbam_op_cases.py (backend "cpu").
"""
import os

import pytest
import torch
from _util import assert_equal_values, assert_error_rule, compiled_ops

from fastattn._ops import ChannelMaxTerm, OutputTerm, SpatialPoolTerm, grad_x_args
from fastattn.reference import (ref_cbam_apply, ref_cbam_apply_backward, ref_cbam_forward_eval, ref_cbam_grad_x,
                                ref_cbam_spatial_conv, ref_cbam_spatial_conv_weight_grad, ref_channel_pool,
                                ref_gated_spatial_pool, ref_gated_spatial_pool_backward_gate)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_ops():
    """torch.ops.fastattn with the CPU kernels of the installed fastattn._C."""
    return compiled_ops("channel_pool", "CPU")


@pytest.fixture(scope="module")
def ops():
    return _load_ops()


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (N, C, H, W): odd and one-element sizes; big C only with a small map, big maps only with small C
SHAPES = [(1, 1, 1, 1), (8, 3, 7, 7), (1, 17, 13, 17), (2, 2048, 1, 1), (1, 2048, 3, 5), (1, 3, 56, 56),
          (8, 17, 1, 1)]
SHAPES_16BIT = [(8, 3, 7, 7), (1, 17, 13, 17), (1, 2048, 2, 3)]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other channel of a wider tensor: neither layout, copied by the kernel
        wide = torch.stack([t, torch.zeros_like(t)], 2).flatten(1, 2)
        return wide[:, ::2]
    return t


def _input(shape, dtype, layout, ties=False, nan=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if ties:  # many equal values: ReLU'd and rounded to one decimal
        x = x.relu().mul(10).round().div(10)
    if nan:
        x[torch.rand(shape, generator=g) < 0.05] = float("nan")
    return _layout(x.to(dtype), layout)


def _check(name, out, ref_same, ref64, dtype):
    """out vs float64 truth within 2x the eager same-dtype error + atol (tests/_util.py); dtype and shape too."""
    assert out.shape == ref_same.shape and out.dtype == ref_same.dtype == dtype, (name, out.shape, out.dtype)
    assert_error_rule(name, out, ref64.to(torch.float64), ref_same)


def _f64(*ts):
    return [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in ts]


def _expected_format(x):
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _check_layout(out, x):
    """x-sized outputs: the reference's memory format, and exactly the strides of the fake kernel (empty_like)."""
    assert out.is_contiguous(memory_format=_expected_format(x))
    assert out.stride() == torch.empty_like(x).stride()


def _gates(shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    return (torch.rand(n, c, generator=g, dtype=torch.float64).to(dtype),
            torch.rand(n, h, w, generator=g, dtype=torch.float64).to(dtype))


# every shape in float32 and float64, a few in the 16-bit types
CASES = ([(s, d, l) for d in (torch.float32, torch.float64) for s in SHAPES for l in LAYOUTS]
         + [(s, d, l) for d in (torch.float16, torch.bfloat16) for s in SHAPES_16BIT for l in LAYOUTS])
KINDS = ["random", "ties", "nan"]


def _id(case):
    s, d, l = case
    return f"{'x'.join(map(str, s))}-{str(d)[6:]}-{l}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_pools(ops, case):
    for kind in KINDS:
        _check_pools(ops, *case, kind)


def _check_pools(ops, shape, dtype, layout, kind):
    x = _input(shape, dtype, layout, ties=kind == "ties", nan=kind == "nan")
    gate, _ = _gates(shape, dtype)
    if kind == "ties":  # ties survive the gate: gates that are powers of two keep equal products equal
        gate = torch.where(gate > 0.5, 1.0, 0.5).to(dtype)

    avg, mx, arg, cnt = ops.channel_pool(x, True)
    r_avg, r_mx, r_arg, r_cnt = ref_channel_pool(x)
    _check(f"channel_pool avg ({kind})", avg, r_avg, ref_channel_pool(x.double())[0], dtype)
    assert_equal_values("channel_pool max", mx, r_mx)
    assert_equal_values("channel_pool argmax", arg, r_arg)
    assert_equal_values("channel_pool count", cnt, r_cnt)

    pooled, arg, cnt = ops.gated_spatial_pool(x, gate, True)
    r_pooled, r_arg, r_cnt = ref_gated_spatial_pool(x, gate)
    assert pooled.is_contiguous()
    # the mean of z = x * gate rounded to x.dtype: truth from the same rounded z in float64
    z = x * gate[:, :, None, None]
    r64_mean = z.double().mean(1)
    _check("gated_spatial_pool mean", pooled[:, 0], r_pooled[:, 0], r64_mean, dtype)
    assert_equal_values("gated_spatial_pool max", pooled[:, 1], r_pooled[:, 1])
    assert_equal_values("gated_spatial_pool argmax", arg, r_arg)
    assert_equal_values("gated_spatial_pool count", cnt, r_cnt)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_cbam_apply(ops, case):
    shape, dtype, layout = case
    x = _input(shape, dtype, layout, nan=True)
    ch, sp = _gates(shape, dtype)
    y = ops.cbam_apply(x, ch, sp)
    ref = ref_cbam_apply(x, ch, sp)
    _check("cbam_apply", y, ref, ref_cbam_apply(*_f64(x, ch, sp)), dtype)
    if dtype in (torch.float32, torch.float64):  # same products in the same order
        assert_equal_values("cbam_apply (bitwise)", y, ref)
    _check_layout(y, x)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_cbam_apply_backward(ops, case):
    shape, dtype, layout = case
    x = _input(shape, dtype, layout)
    ch, sp = _gates(shape, dtype)
    grad_y = _input(shape, dtype, "contiguous", seed=3)  # often another layout than x
    out = ops.cbam_apply_backward(grad_y, x, ch, sp)
    ref = ref_cbam_apply_backward(grad_y, x, ch, sp)
    ref64 = ref_cbam_apply_backward(*_f64(grad_y, x, ch, sp))
    for name, o, r, r64 in zip(["grad_ch_gate", "grad_sp_gate"], out, ref, ref64):
        _check(name, o, r, r64, dtype)


def _backward_inputs(shape, dtype, layout, kind, seed=5):
    x = _input(shape, dtype, layout, ties=kind == "ties", nan=kind == "nan")
    ch, sp = _gates(shape, dtype)
    if kind == "ties":
        ch = torch.where(ch > 0.5, 1.0, 0.5).to(dtype)
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    grad_pooled = torch.randn(n, 2, h, w, generator=g, dtype=torch.float64).to(dtype)
    grad_avg = torch.randn(n, c, generator=g, dtype=torch.float64).to(dtype)
    grad_max = torch.randn(n, c, generator=g, dtype=torch.float64).to(dtype)
    return x, ch, sp, grad_pooled, grad_avg, grad_max


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_gated_spatial_pool_backward_gate(ops, case):
    for kind in KINDS:
        for split_ties in (True, False):
            _check_backward_gate(ops, *case, kind, split_ties)


def _check_backward_gate(ops, shape, dtype, layout, kind, split_ties):
    x, gate, _, grad_pooled, _, _ = _backward_inputs(shape, dtype, layout, kind)
    pooled, arg, cnt = ref_gated_spatial_pool(x, gate)
    args = (grad_pooled, x, gate, pooled, arg, cnt, split_ties)
    out = ops.gated_spatial_pool_backward_gate(*args)
    ref = ref_gated_spatial_pool_backward_gate(*args)
    # truth: float64 arithmetic with the same-dtype forward's tie masks
    _check(f"grad_gate ({kind}, split_ties={split_ties})", out, ref, _f64_backward_gate(args), dtype)


def _f64_backward_gate(args):
    grad_pooled, x, gate, pooled, arg, cnt, split_ties = args
    acc = torch.float64
    z = x * gate[:, :, None, None]  # same rounding as the kernel's tie test
    if split_ties:
        w = (z == pooled[:, 1:2]).to(acc) / cnt[:, None].to(acc)
    else:
        w = (torch.arange(x.shape[1])[None, :, None, None] == arg[:, None]).to(acc)
    gp = grad_pooled.to(acc)
    dz = gp[:, 0:1] / x.shape[1] + w * gp[:, 1:2]
    return (dz * x.to(acc)).sum((2, 3))


TERMS = {"all": ("grad_y", "grad_pooled", "grad_avg", "grad_max"), "grad_y": ("grad_y",),
         "pool": ("grad_pooled", "grad_avg"), "max": ("grad_max",)}


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_cbam_grad_x(ops, case):
    for kind in KINDS:
        for split_ties in (True, False):
            _check_grad_x(ops, *case, kind, split_ties, "all")
    for terms in TERMS:  # the subsets the autograd formulas of the single ops pass
        if terms != "all":
            _check_grad_x(ops, *case, "ties", False, terms)


def _check_grad_x(ops, shape, dtype, layout, kind, split_ties, terms):
    x, ch, sp, grad_pooled, grad_avg, grad_max = _backward_inputs(shape, dtype, layout, kind)
    grad_y = _input(shape, dtype, "contiguous", seed=7)
    pooled, sp_arg, sp_cnt = ref_gated_spatial_pool(x, ch)
    _, ch_max, ch_arg, ch_cnt = ref_channel_pool(x)
    use = TERMS[terms]
    args = grad_x_args(x, output=OutputTerm(grad_y, ch, sp) if "grad_y" in use else None,
                       spatial_pool=SpatialPoolTerm(grad_pooled, ch, pooled, sp_arg, sp_cnt) if "grad_pooled" in use
                       else None,
                       grad_avg=grad_avg if "grad_avg" in use else None,
                       channel_max=ChannelMaxTerm(grad_max, ch_max, ch_arg, ch_cnt) if "grad_max" in use else None,
                       split_ties=split_ties)
    out = ops.cbam_grad_x(*args)
    ref = ref_cbam_grad_x(*args)
    # truth: float64 arithmetic with the same-dtype forward's tie masks (the x == max tests use x as given)
    args64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() and i not in (0, 5, 10) else a
              for i, a in enumerate(args)]
    ref64 = ref_cbam_grad_x(*args64) if dtype == torch.float64 else _grad_x_f64(args)
    _check(f"cbam_grad_x ({kind}, split_ties={split_ties}, terms={terms})", out, ref, ref64, dtype)
    _check_layout(out, x)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cbam_grad_x_ties_in_some_blocks(ops, layout):
    """cbam_grad_x reads x only in blocks where the split rule meets a tie and finds the other hits
    by argmax: one image with a tied channel max, one with a tied spatial max, one without ties,
    NaN in a fourth; each image is several row blocks (64 channels x 1600 positions)."""
    shape = (4, 64, 40, 40)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g)
    x[1, 5, 7, 9] = x[1, 5, 20, 30] = x[1, 5].abs().max() + 1  # channel 5 of image 1: two maxima
    ch = torch.rand(shape[:2], generator=g) + 0.5
    ch[2, 3] = ch[2, 4] = 1.0
    x[2, 3, 11, 12] = x[2, 4, 11, 12] = x[2, :, 11, 12].abs().max() + 1  # position (11, 12) of image 2: a tie
    x[3, 9, 0, 1] = float("nan")
    sp = torch.rand(shape[0], *shape[2:], generator=g)
    grad_y = torch.randn(shape, generator=g)
    grad_pooled = torch.randn(shape[0], 2, *shape[2:], generator=g)
    grad_avg, grad_max = torch.randn(2, *shape[:2], generator=g)
    x = _layout(x, layout)
    pooled, sp_arg, sp_cnt = ref_gated_spatial_pool(x, ch)
    _, ch_max, ch_arg, ch_cnt = ref_channel_pool(x)
    assert ch_cnt[1, 5] == 2 and sp_cnt[2, 11, 12] == 2 and (ch_cnt[0] == 1).all() and (sp_cnt[0] == 1).all()
    for split_ties in (True, False):
        args = [x, grad_y, ch, sp, grad_pooled, pooled, sp_arg, sp_cnt, grad_avg, grad_max, ch_max, ch_arg, ch_cnt,
                split_ties]
        _check(f"cbam_grad_x (split_ties={split_ties})", ops.cbam_grad_x(*args), ref_cbam_grad_x(*args),
               _grad_x_f64(args), torch.float32)


def _grad_x_f64(args):
    (x, grad_y, ch, sp, grad_pooled, pooled, sp_arg, sp_cnt, grad_avg, grad_max, ch_max, ch_arg, ch_cnt,
     split_ties) = args
    acc = torch.float64
    n, c, h, w = x.shape
    dx = torch.zeros(x.shape, dtype=acc)
    if grad_y is not None:
        dx = dx + grad_y.to(acc) * ch.to(acc)[:, :, None, None] * sp.to(acc)[:, None]
    if grad_pooled is not None:
        z = x * ch[:, :, None, None]
        if split_ties:
            wsp = (z == pooled[:, 1:2]).to(acc) / sp_cnt[:, None].to(acc)
        else:
            wsp = (torch.arange(c)[None, :, None, None] == sp_arg[:, None]).to(acc)
        gp = grad_pooled.to(acc)
        dx = dx + ch.to(acc)[:, :, None, None] * (gp[:, 0:1] / c + wsp * gp[:, 1:2])
    if grad_avg is not None:
        dx = dx + grad_avg.to(acc)[:, :, None, None] / (h * w)
    if grad_max is not None:
        flat = x.flatten(2)
        if split_ties:
            wch = (flat == ch_max[:, :, None]).to(acc) / ch_cnt[:, :, None].to(acc)
        else:
            wch = (torch.arange(h * w)[None, None] == ch_arg[:, :, None]).to(acc)
        dx = dx + (wch * grad_max.to(acc)[:, :, None]).view(n, c, h, w)
    return dx


def test_long_rows_and_many_tiles(ops):
    """Rows longer than the kernels' L1 pieces and lane tiles: maxima in later pieces, ties across pieces."""
    x = torch.zeros(2, 5, 70, 70)
    x[0, 0, 60, 3] = 2.0          # late max
    x[0, 1, 0, 0] = 1.0
    x[0, 1, 69, 69] = 1.0         # tie across pieces
    x[1, 2, 30, 30] = float("nan")
    for layout in ["contiguous", "channels_last"]:
        xl = _layout(x, layout)
        for o, r in zip(ops.channel_pool(xl, False), ref_channel_pool(xl)):
            assert_equal_values("channel_pool", o, r)
    xc = torch.randn(1, 1300, 5, 5).relu().round()
    for layout in ["contiguous", "channels_last"]:
        xl = _layout(xc, layout)
        gate = torch.ones(1, 1300)
        for o, r in zip(ops.gated_spatial_pool(xl, gate, False), ref_gated_spatial_pool(xl, gate)):
            assert_equal_values("gated_spatial_pool", o, r)
        for o, r in zip(ops.channel_pool(xl, True), ref_channel_pool(xl)):
            assert_equal_values("channel_pool", o, r)
    # more positions than one lane tile of the elementwise and gradient kernels
    for layout in ["contiguous", "channels_last"]:
        for kind in ["ties", "nan"]:
            for split_ties in (True, False):
                _check_grad_x(ops, (1, 2, 100, 100), torch.float32, layout, kind, split_ties, "all")
                _check_backward_gate(ops, (1, 2, 100, 100), torch.float32, layout, kind, split_ties)


# ---------------------------------------------------------------------------
# cbam_spatial_conv / cbam_spatial_conv_weight_grad: the spatial gate's conv on the cpu backend
# ---------------------------------------------------------------------------
# (x shape, weight shape, padding): CBAM's 7x7 on 2 and 1 channels, the input gradient's 1 -> 2, odd and
# one-pixel maps, asymmetric padding, a kernel as large as the padded map
CONV_CASES = [((8, 2, 56, 56), (1, 2, 7, 7), (3, 3)), ((3, 1, 13, 17), (1, 1, 7, 7), (3, 3)),
              ((2, 1, 9, 11), (2, 1, 7, 7), (3, 3)), ((2, 2, 5, 5), (1, 2, 3, 3), (0, 1)),
              ((1, 2, 1, 1), (1, 2, 7, 7), (3, 3)), ((0, 2, 6, 6), (1, 2, 3, 3), (1, 1))]


def _conv_id(case):
    return "x{}-w{}-p{}".format(*("x".join(map(str, t)) for t in case))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_cbam_spatial_conv(ops, case, dtype):
    """Forward and weight gradient against the oracle (F.conv2d / aten.convolution_backward accumulated in
    float32, rounded once): float64 truth, same-dtype oracle error for the rule."""
    xs, ws, pad = case
    g = torch.Generator().manual_seed(11)
    x64, w64 = torch.randn(xs, generator=g, dtype=torch.float64), torch.randn(ws, generator=g, dtype=torch.float64)
    x, w = x64.to(dtype), w64.to(dtype)
    out = ops.cbam_spatial_conv(x, w, list(pad))
    truth = ref_cbam_spatial_conv(x.double(), w.double(), pad)
    _check("cbam_spatial_conv", out, ref_cbam_spatial_conv(x, w, pad), truth, dtype)
    grad = torch.randn(truth.shape, generator=g, dtype=torch.float64).to(dtype)
    gw = ops.cbam_spatial_conv_weight_grad(grad, x, ws[2], ws[3], list(pad))
    _check("cbam_spatial_conv_weight_grad", gw, ref_cbam_spatial_conv_weight_grad(grad, x, ws[2], ws[3], pad),
           ref_cbam_spatial_conv_weight_grad(grad.double(), x.double(), ws[2], ws[3], pad), dtype)


def test_cbam_spatial_conv_opcheck(ops):
    x, w = torch.randn(2, 2, 9, 10), torch.randn(1, 2, 7, 7)
    torch.library.opcheck(torch.ops.fastattn.cbam_spatial_conv, (x, w, [3, 3]))
    torch.library.opcheck(torch.ops.fastattn.cbam_spatial_conv_weight_grad, (torch.randn(2, 1, 9, 10), x, 7, 7, [3, 3]))


@pytest.mark.parametrize("call,match", [
    (lambda o: o.cbam_spatial_conv(torch.randn(2, 3, 8, 8), torch.randn(1, 2, 7, 7), [3, 3]), "x must have 2 channels"),
    (lambda o: o.cbam_spatial_conv(torch.randn(2, 2, 8, 8), torch.randn(1, 2, 7, 7).double(), [3, 3]), "dtype"),
    (lambda o: o.cbam_spatial_conv(torch.randn(2, 2, 8, 8), torch.randn(1, 2, 7, 7), [-1, 3]), "non-negative"),
    (lambda o: o.cbam_spatial_conv(torch.randn(2, 2, 4, 4), torch.randn(1, 2, 7, 7), [1, 1]), "does not fit"),
    (lambda o: o.cbam_spatial_conv(torch.randn(2, 8, 8), torch.randn(1, 2, 7, 7), [3, 3]), "4-D"),
    (lambda o: o.cbam_spatial_conv_weight_grad(torch.randn(2, 1, 7, 8), torch.randn(2, 2, 8, 8), 7, 7, [3, 3]),
     "grad_out"),
    (lambda o: o.cbam_spatial_conv_weight_grad(torch.randn(2, 1, 8, 8), torch.randn(2, 2, 8, 8), 0, 7, [3, 3]),
     "kernel size"),
], ids=["channels", "dtype", "padding", "kernel-too-big", "rank", "grad-out-shape", "kernel-size"])
def test_cbam_spatial_conv_bad_input(ops, call, match):
    with pytest.raises(RuntimeError, match=match):
        call(ops)


def test_cbam_spatial_conv_has_no_derivative(ops):
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="internal op"):
        ops.cbam_spatial_conv(x, torch.randn(1, 2, 7, 7), [3, 3]).sum().backward()


# cbam_forward_eval: its numbers are checked through fastattn.nn.CBAM (tests/test_cbam_modules.py,
# test_cpu_inference_is_one_op); here its registration and its argument checks
def _eval_args(c=8, hidden=2, light=False, spatial=True, **override):
    g = torch.Generator().manual_seed(3)
    args = {"x": torch.randn(2, c, 6, 7, generator=g), "w1": torch.randn(hidden, c, 1, 1, generator=g),
            "b1": None, "w2": torch.randn(c, hidden, 1, 1, generator=g), "b2": torch.randn(c, generator=g),
            "conv_w": torch.randn(1, 1 if light else 2, 7, 7, generator=g) if spatial else None,
            "bn_weight": torch.rand(1, generator=g) if spatial else None,
            "bn_bias": torch.randn(1, generator=g) if spatial else None,
            "bn_mean": torch.randn(1, generator=g) if spatial else None,
            "bn_var": torch.rand(1, generator=g) + 0.5 if spatial else None,
            "bn_eps": 1e-5, "padding": [3, 3], "light": light, "max_first": False}
    args.update(override)
    return tuple(args.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["timm", "light", "no-spatial", "max-first", "no-hidden", "channels-last"])
def test_cbam_forward_eval_matches_oracle(ops, kind, dtype):
    """The op against ref_cbam_forward_eval: float64 truth, same-dtype oracle error for the rule."""
    args = _eval_args(hidden=0 if kind == "no-hidden" else 2, light=kind == "light", spatial=kind != "no-spatial",
                      max_first=kind == "max-first")
    if kind == "channels-last":
        args = (args[0].contiguous(memory_format=torch.channels_last),) + args[1:]
    args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args)
    y = ops.cbam_forward_eval(*args)
    assert y.is_contiguous(memory_format=_expected_format(args[0]))
    _check("cbam_forward_eval", y, ref_cbam_forward_eval(*args), ref_cbam_forward_eval(*_f64(*args)), dtype)


@pytest.mark.parametrize("kind", ["timm", "light", "no-spatial", "channels-last"])
def test_cbam_forward_eval_opcheck(ops, kind):
    args = _eval_args(light=kind == "light", spatial=kind != "no-spatial")
    if kind == "channels-last":
        args = (args[0].contiguous(memory_format=torch.channels_last),) + args[1:]
    torch.library.opcheck(torch.ops.fastattn.cbam_forward_eval, args)


@pytest.mark.parametrize("override,match", [
    ({"x": torch.randn(2, 8, 6)}, "4-D"),
    ({"x": torch.ones(2, 8, 6, 7, dtype=torch.int32)}, "float32, float64"),
    ({"w1": torch.randn(2, 9)}, "w1 must be a CPU tensor of x's dtype .* shape \\(2, 8\\)"),
    ({"w1": torch.randn(2, 8, 3, 3)}, "w1 must be"),
    ({"w2": torch.randn(8, 3, 1, 1)}, "w2 must be .* shape \\(8, 2\\)"),
    ({"w2": torch.randn(8, 2).double()}, "w2 must be a CPU tensor of x's dtype"),
    ({"b1": torch.randn(3)}, "b1 must be .* shape \\(2\\)"),
    ({"b2": torch.randn(8).half()}, "b2 must be a CPU tensor of x's dtype"),
    ({"conv_w": torch.randn(1, 1, 7, 7)}, "conv_w must be \\(1, 2, kh, kw\\)"),
    ({"padding": [2, 3]}, "keep the map's size"),
    ({"bn_mean": None}, "bn_mean and bn_var"),
    ({"bn_var": torch.ones(2)}, "bn_var must be a floating CPU tensor of one value"),
    ({"bn_eps": -1.0}, "bn_eps must be non-negative"),
], ids=["x-rank", "x-dtype", "w1-shape", "w1-kernel", "w2-shape", "w2-dtype", "b1-shape", "b2-dtype",
        "conv-channels", "padding", "bn-missing", "bn-two-values", "eps"])
def test_cbam_forward_eval_bad_input(ops, override, match):
    with pytest.raises(RuntimeError, match=match):
        ops.cbam_forward_eval(*_eval_args(**override))


def test_cbam_forward_eval_bn_without_conv_is_refused(ops):
    args = list(_eval_args(spatial=False))
    args[6] = torch.ones(1)  # bn_weight without conv_w
    with pytest.raises(RuntimeError, match="without conv_w"):
        ops.cbam_forward_eval(*args)


def test_cbam_forward_eval_has_no_derivative(ops):
    args = list(_eval_args())
    args[0] = args[0].requires_grad_()
    with pytest.raises(RuntimeError, match="inference forward and has no derivative"):
        ops.cbam_forward_eval(*args).sum().backward()


_WIDE_SCRIPT = """
import sys, torch
from _util import compiled_ops
ops = compiled_ops("channel_pool", "CPU")
gen = torch.Generator().manual_seed(0)
outs = []
for shape in [(2, 37, 13, 17), (3, 64, 14, 14), (1, 17, 56, 56)]:
    x = torch.randn(*shape, generator=gen)
    x[0, 1, 2, 3] = float("nan")
    tied = torch.relu(x).round()  # many ties of the max, along both dimensions
    gate = torch.rand(shape[0], shape[1], generator=gen)
    for t in (x, tied, x.contiguous(memory_format=torch.channels_last)):
        outs += [*ops.channel_pool(t, True), *ops.gated_spatial_pool(t, gate, True)]
torch.save(outs, sys.argv[1])
"""


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512" or os.environ.get("ATEN_CPU_CAPABILITY"),
                    reason="without AVX-512 every test already runs the 8-wide row reductions")
def test_wide_row_reductions_give_the_avx2_bits(tmp_path):
    """On AVX-512 machines the float row reductions (pools over channels, max ties) run 16 wide; they
    must give the bits of the 8-wide code, which runs with ATen lowered to AVX2."""
    import subprocess
    import sys

    outputs = {}
    for capability in ("avx2", None):
        path = tmp_path / f"{capability}.pt"
        env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "tests")}
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        result = subprocess.run([sys.executable, "-c", _WIDE_SCRIPT, str(path)], capture_output=True, text=True,
                                timeout=300, env=env, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[capability] = torch.load(path)
    assert len(outputs["avx2"]) == len(outputs[None]) == 63
    for i, (narrow, wide) in enumerate(zip(outputs["avx2"], outputs[None])):
        torch.testing.assert_close(wide, narrow, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"output {i}: {m}")
