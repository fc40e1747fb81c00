"""Triton spatial-attention kernels (triton_kernels/attention.py) against the op contract.

Without a GPU the launchers run in Triton's interpreter on CPU tensors (tiny shapes); with one, the
same tests run on CUDA tensors, plus larger cases (L up to 4097, head dims up to 512, L >= 65 536).
Accuracy rule (docs/DESIGN.md §4): error against the float64 reference at most 2x the error of the
eager same-dtype PyTorch formula, plus a small atol: one unit of the dtype at the result's magnitude,
sqrt(d_qk) units for float32 (see tests/_contract.py triton_attention_units).
"""
import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels

import itertools  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from _contract import assert_equal_values, assert_error_rule, eps_atol, triton_attention_units  # noqa: E402
from _util import check_minus_inf_keys_drop_out  # noqa: E402
from fastattn import reference  # noqa: E402
from fastattn.reference import ref_spatial_attention_forward  # noqa: E402


def _load_triton_attention():
    """The Triton launchers, installed as fastattn.triton_kernels.attention."""
    return importlib.import_module("fastattn.triton_kernels.attention")


attention = _load_triton_attention()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
LAYOUTS = ["contiguous", "channel_last", "strided"]

# (N, heads, d_qk, d_v, Lq, Lk, scale); scale None means d_qk ** -0.5.
SMALL_CASES = [
    (1, 1, 8, 8, 1, 1, None),
    (2, 1, 8, 8, 7, 7, 1.0),
    (1, 2, 40, 40, 49, 49, None),
    (2, 2, 8, 24, 7, 49, -0.5),  # a negative scale turns the max into a min
    (1, 1, 64, 40, 49, 7, None),
    (1, 2, 64, 64, 17, 33, 1.0),
]
LARGE_CASES = [
    (2, 1, 64, 64, 196, 196, None),
    (2, 4, 40, 40, 784, 784, None),
    (1, 2, 96, 48, 784, 196, 1.0),
    (1, 2, 160, 160, 196, 196, None),
    (1, 2, 80, 320, 196, 49, None),
    (1, 1, 512, 512, 196, 196, None),
    (1, 2, 64, 64, 4097, 4097, None),
]


# Variant triton_attention_v2 (fastattn._verified) changes the 16-bit kernels only. Beside the small cases
# it gets lengths that are multiples of the interpreter's 16-row tiles (its unmasked full-tile path),
# head dims 16, 40, 80 with d_v != d_qk, and d_v = 300.
V2_CASES = [
    (1, 2, 16, 16, 32, 48, None),
    (1, 1, 80, 40, 33, 16, None),
    (2, 1, 40, 16, 16, 7, 1.0),
    (1, 1, 24, 300, 5, 9, None),  # d_v padded to 512: the forward splits it over two programs
]
V2_LARGE_CASES = [(1, 8, 40, 40, 1024, 1024, None), (1, 1, 512, 512, 196, 196, None), (1, 2, 320, 320, 49, 49, None)]
VARIANTS = ["v1", "v2"]


def _case_id(case):
    n, heads, d_qk, d_v, len_q, len_k, scale = case
    return f"n{n}h{heads}-d{d_qk}x{d_v}-L{len_q}x{len_k}-s{'inv_sqrt_d' if scale is None else scale}"


# every layout for the small cases; the large ones (GPU only) skip the strided view to keep compiles few
CASE_PARAMS = [pytest.param(case, dtype, layout, variant, id=f"{_case_id(case)}-{str(dtype)[6:]}-{layout}-{variant}")
               for cases, layouts, variants in (
                   (SMALL_CASES, LAYOUTS, VARIANTS), (V2_CASES, LAYOUTS, ["v2"]),
                   ([] if INTERPRET else LARGE_CASES, LAYOUTS[:2], VARIANTS),
                   ([] if INTERPRET else V2_LARGE_CASES, LAYOUTS[:2], ["v2"]))
               for case in cases for dtype in DTYPES for layout in layouts for variant in variants
               if variant == "v1" or dtype != torch.float32]  # float32 runs v1's kernels under either


@pytest.fixture
def kernels(request, monkeypatch):
    """Run the launchers with (v2) or without (v1) variant triton_attention_v2 switched on."""
    from fastattn import _verified

    variant = request.node.callspec.params.get("variant", "v1")
    monkeypatch.setenv(_verified.ENV, "triton_attention_v2" if variant == "v2" else "")
    assert _verified.enabled("triton_attention_v2") == (variant == "v2")
    return variant


def _randn(n, c, length, dtype, layout, gen, std=1.0):
    """(N, C, L) with the memory layout named: (N, C, L) contiguous, channel-last, or a non-dense view."""
    if layout == "contiguous":
        t = torch.randn(n, c, length, generator=gen, dtype=torch.float64)
    elif layout == "channel_last":
        t = torch.randn(n, length, c, generator=gen, dtype=torch.float64).transpose(1, 2)
    else:  # every other channel and an offset window of positions of a larger buffer
        t = torch.randn(n, 2 * c + 1, length + 5, generator=gen, dtype=torch.float64)[:, 1::2, 3:3 + length]
    return (t * std).to(device=DEVICE, dtype=dtype)


def _inputs(case, dtype, layout, seed=0, std=1.0):
    n, heads, d_qk, d_v, len_q, len_k, scale = case
    gen = torch.Generator().manual_seed(seed)
    q = _randn(n, heads * d_qk, len_q, dtype, layout, gen, std)
    k = _randn(n, heads * d_qk, len_k, dtype, layout, gen, std)
    v = _randn(n, heads * d_v, len_k, dtype, layout, gen)
    return q, k, v, heads, d_qk ** -0.5 if scale is None else scale


def _eager_lse(q, k, heads, scale):
    """log-sum-exp of the logits computed the plain eager way in q's dtype."""
    n, c, _ = q.shape
    qh = q.reshape(n, heads, c // heads, -1).transpose(-1, -2)
    kh = k.reshape(n, heads, c // heads, -1)
    return torch.logsumexp(scale * (qh @ kh), -1)


def _assert_rule(name, got, truth, eager, magnitude=None, units=1.0):
    """|got - truth| <= 2 |eager - truth| + atol, atol = `units` units of got's dtype at the result's
    magnitude (default: the truth's; at least 1)."""
    assert torch.isfinite(got).all(), f"{name}: {(~torch.isfinite(got)).sum().item()} non-finite values"
    magnitude = truth.abs().max().item() if magnitude is None else magnitude
    assert_error_rule(name, got, truth, eager, eps_atol(got.dtype, units, magnitude), absolute=True)


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("case,dtype,layout,variant", CASE_PARAMS)
def test_forward_matches_reference(case, dtype, layout, variant, device, kernels):
    q, k, v, heads, scale = _inputs(case, dtype, layout)
    out, lse = attention.spatial_attention_forward(q, k, v, heads, scale)
    truth_out, truth_lse = ref_spatial_attention_forward(q.double(), k.double(), v.double(), heads, scale)

    assert out.dtype == q.dtype and out.device == q.device and lse.dtype == torch.float32
    assert lse.shape == (q.shape[0], heads, q.shape[2])
    # layout rule of the contract (csrc/ops.cpp): channel-last out exactly when q.stride(1) == 1 and Cq > 1
    if q.stride(1) == 1 and q.shape[1] > 1:
        assert out.transpose(1, 2).is_contiguous(), f"out strides {out.stride()}, expected channel-last"
    else:
        assert out.is_contiguous(), f"out strides {out.stride()}, expected contiguous"
    units = triton_attention_units(dtype, case[2])
    _assert_rule("out", out, truth_out, reference.spatial_attention(q, k, v, heads=heads, scale=scale), units=units)
    _assert_rule("lse", lse, truth_lse, _eager_lse(q, k, heads, scale), units=units)


def _gradients(case, dtype, layout, std=1.0):
    """(kernel grads, float64 grads, eager same-dtype grads, inputs) for one random grad_out."""
    q, k, v, heads, scale = _inputs(case, dtype, layout, std=std)
    out, lse = attention.spatial_attention_forward(q, k, v, heads, scale)
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    grads = attention.spatial_attention_backward(grad_out, q, k, v, out, lse, heads, scale)

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, _ = ref_spatial_attention_forward(*leaves64, heads, scale)
    truth = torch.autograd.grad(out64, leaves64, grad_out.double())
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    eager_out = reference.spatial_attention(*leaves, heads=heads, scale=scale)
    eager = torch.autograd.grad(eager_out, leaves, grad_out)
    return grads, truth, eager, (q, k, v)


def _assert_grads_rule(grads, truth, eager, inputs, d_qk):
    """The error rule for dq, dk, dv, plus dtype and layout. The atol's magnitude is twice the largest
    gradient of the three: dq and dk come from ds = p * (dp - delta), whose cancellation leaves rounding of
    the size of the dv-like terms even where the true dq, dk are ~0 (e.g. Lk = 1: softmax is constant)."""
    magnitude = 2 * max(t.abs().max().item() for t in truth)
    units = triton_attention_units(inputs[0].dtype, d_qk)
    for name, got, want, eager_grad, x in zip(("dq", "dk", "dv"), grads, truth, eager, inputs):
        assert got.dtype == x.dtype and got.device == x.device, name
        # same layout as the input: its strides when dense, else dense strides in the same order
        assert got.stride() == torch.empty_like(x).stride(), f"{name}: strides {got.stride()} vs input {x.stride()}"
        _assert_rule(name, got, want, eager_grad, magnitude, units)


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("case,dtype,layout,variant", CASE_PARAMS)
def test_backward_matches_reference(case, dtype, layout, variant, device, kernels):
    _assert_grads_rule(*_gradients(case, dtype, layout), d_qk=case[2])


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_huge_logits_stay_finite(dtype, device):
    """Logits of magnitude ~1e4: online softmax subtracts the row max, so nothing overflows."""
    case = (1, 2, 8, 8, 19, 23, 1.0)
    q, k, v, heads, scale = _inputs(case, dtype, "contiguous", std=60.0)
    out, lse = attention.spatial_attention_forward(q, k, v, heads, scale)
    truth_out, truth_lse = ref_spatial_attention_forward(q.double(), k.double(), v.double(), heads, scale)
    assert truth_lse.abs().max() > 5e3  # the case really has huge logits
    for name, got in (("out", out), ("lse", lse)):
        assert torch.isfinite(got).all(), name
    # logits this large carry an absolute float32 rounding error ~1e-3, so compare loosely
    torch.testing.assert_close(out.double(), truth_out, atol=2e-2, rtol=0)
    torch.testing.assert_close(lse.double(), truth_lse.double(), atol=0, rtol=1e-5)

    grads, truth, _, (q, k, v) = _gradients(case, dtype, "contiguous", std=60.0)
    # the softmax is one-hot here, so true dq, dk are ~0 and what is left is the rounding of
    # dp - delta (~eps |dO| |v| d_v) times |k| or |q| (~60): an atol of that size, not the 2x rule
    # (float16 eager overflows at these logits anyway)
    eps = torch.finfo(dtype).eps
    atol = 4 * eps * v.abs().max().item() * v.shape[1] * max(q.abs().max().item(), k.abs().max().item())
    for name, got, want in zip(("dq", "dk", "dv"), grads, truth):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=16 * eps)


@pytest.mark.skipif(not INTERPRET, reason="bfloat16 runs on the GPU; this documents why the interpreter skips it")
def test_bfloat16_in_interpreter_is_skipped():
    pytest.skip("Triton's interpreter multiplies bfloat16 bit patterns as integers in tl.dot; bfloat16 runs on GPU")


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter warns on NaN arithmetic
@pytest.mark.parametrize("nan_in", ["q", "k", "v"])
def test_nan_propagates_like_reference(nan_in, device):
    q, k, v, heads, scale = _inputs((2, 2, 8, 8, 5, 7, None), torch.float32, "contiguous")
    inputs = {"q": q, "k": k, "v": v}
    inputs[nan_in][1, 9, 3] = float("nan")  # batch 1, head 1, one position
    out, lse = attention.spatial_attention_forward(*inputs.values(), heads, scale)
    ref_out, ref_lse = ref_spatial_attention_forward(*inputs.values(), heads, scale)
    assert torch.equal(out.isnan(), ref_out.isnan()) and torch.equal(lse.isnan(), ref_lse.isnan())


@pytest.mark.parametrize("device", [DEVICE])
def test_keys_of_minus_inf_logits_drop_out(device):
    check_minus_inf_keys_drop_out(attention.spatial_attention_forward, device)


@pytest.mark.parametrize("device", [DEVICE])
def test_empty_lengths(device):
    """Lk = 0: softmax over nothing gives out 0 and lse -inf, as the reference; Lq = 0: empty results."""
    q, k, v, heads, scale = _inputs((2, 2, 8, 4, 5, 0, None), torch.float32, "contiguous")
    out, lse = attention.spatial_attention_forward(q, k, v, heads, scale)
    ref_out, ref_lse = ref_spatial_attention_forward(q, k, v, heads, scale)
    assert_equal_values("out", out, ref_out)
    assert_equal_values("lse", lse, ref_lse)
    dq, dk, dv = attention.spatial_attention_backward(torch.ones_like(out), q, k, v, out, lse, heads, scale)
    assert not dq.any() and dk.numel() == 0 and dv.numel() == 0
    q, k, v, heads, scale = _inputs((2, 2, 8, 4, 0, 3, None), torch.float32, "contiguous")
    out, lse = attention.spatial_attention_forward(q, k, v, heads, scale)
    assert out.shape == (2, 8, 0) and lse.shape == (2, 2, 0)
    dq, dk, dv = attention.spatial_attention_backward(out, q, k, v, out, lse, heads, scale)
    assert dq.shape == q.shape and not dk.any() and not dv.any()


@pytest.mark.parametrize("device", [DEVICE])
def test_batch_heads_fold_onto_grid_axis_2(monkeypatch, device):
    """batch*heads past the grid-axis limit folds onto axis 2 (limit shrunk to 2 so it runs in the interpreter)."""
    monkeypatch.setattr(attention, "_MAX_GRID_YZ", 2)
    case = (5, 1, 8, 8, 7, 5, None)  # 5 batch*heads on a 2 x 3 grid: one program has nothing to do
    q, k, v, heads, scale = _inputs(case, torch.float32, "contiguous")
    out, lse = attention.spatial_attention_forward(q, k, v, heads, scale)
    truth_out, truth_lse = ref_spatial_attention_forward(q.double(), k.double(), v.double(), heads, scale)
    _assert_rule("out", out, truth_out, reference.spatial_attention(q, k, v, heads=heads, scale=scale),
                 units=triton_attention_units(torch.float32, case[2]))
    _assert_grads_rule(*_gradients(case, torch.float32, "contiguous"), d_qk=case[2])


def test_every_head_dim_and_length_keeps_a_config():
    """The autotune pruner leaves at least one config within the tile limits for every dtype, d <= 512, length."""
    import triton

    for kernel, candidates in attention._CANDIDATES.items():
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in candidates]
        prune = attention._config_pruner(kernel)
        resident_name = attention._RESIDENT_BLOCK[kernel]
        streamed_name = "BLOCK_M" if resident_name == "BLOCK_N" else "BLOCK_N"
        for dtype, d, length in itertools.product(
                (torch.float32, torch.float16), (8, 40, 64, 80, 96, 128, 160, 256, 320, 512), (1, 49, 196, 4097, 70000)):
            q = torch.empty(0, dtype=dtype)
            block_d = attention._block_d(d)
            kept = prune(configs, {"q_ptr": q}, BLOCK_DQK=block_d, BLOCK_DV=16,
                         LENGTH_BUCKET=attention._length_bucket(length))
            max_resident, max_streamed = attention._tile_limits_v2(kernel, block_d, q.element_size())
            assert kept, (kernel, dtype, d, length)
            for c in kept:
                assert c.kwargs[resident_name] <= max_resident and c.kwargs[streamed_name] <= max_streamed, (
                    kernel, dtype, d, length, c)


@pytest.mark.skipif(INTERPRET, reason="65 537 positions are too slow for the interpreter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("len_q,len_k", [(65537, 48), (48, 65537)])
def test_long_sequence_gpu(len_q, len_k, dtype):
    """L >= 65 536 on one side (64-bit offsets, query blocks on grid axis 0); the other side short so
    the float64 reference (Lq x Lk logits) stays small."""
    case = (1, 2, 64, 64, len_q, len_k, None)
    q, k, v, heads, scale = _inputs(case, dtype, "channel_last")
    out, lse = attention.spatial_attention_forward(q, k, v, heads, scale)
    truth_out, truth_lse = ref_spatial_attention_forward(q.double(), k.double(), v.double(), heads, scale)
    _assert_rule("out", out, truth_out, reference.spatial_attention(q, k, v, heads=heads, scale=scale))
    _assert_rule("lse", lse, truth_lse, _eager_lse(q, k, heads, scale))
    _assert_grads_rule(*_gradients(case, dtype, "channel_last"), d_qk=case[2])


@pytest.mark.skipif(INTERPRET, reason="65 536 programs are too slow for the interpreter")
def test_batch_heads_past_grid_limit_gpu():
    case = (33000, 2, 16, 16, 3, 5, None)  # 66 000 batch*heads > 65 535
    q, k, v, heads, scale = _inputs(case, torch.float16, "contiguous")
    out, lse = attention.spatial_attention_forward(q, k, v, heads, scale)
    truth_out, truth_lse = ref_spatial_attention_forward(q.double(), k.double(), v.double(), heads, scale)
    _assert_rule("out", out, truth_out, reference.spatial_attention(q, k, v, heads=heads, scale=scale))
    _assert_grads_rule(*_gradients(case, torch.float16, "contiguous"), d_qk=case[2])


@pytest.mark.parametrize("dtype,variant,expect_v2", [(torch.float16, "v2", True), (torch.float32, "v2", False),
                                                     (torch.float16, "v1", False)])
def test_variant_switch_picks_the_kernels(dtype, variant, expect_v2, kernels):
    """The launchers take the v2 kernels only with triton_attention_v2 on, and only for 16-bit inputs."""
    q, k, v, heads, scale = _inputs((1, 2, 40, 40, 49, 49, None), dtype, "contiguous")
    out, lse = torch.empty_like(q), torch.empty(1, heads, 49, device=q.device)
    plan = attention._forward_launches(q, k, v, out, lse, heads, 40, 40, scale, attention._v2(dtype))
    assert (plan[0][0] is attention._spatial_attention_fwd_kernel_v2) == expect_v2
    assert (plan[0][0] is attention._spatial_attention_fwd_kernel) != expect_v2


@pytest.mark.parametrize("layout,length,copied", [("contiguous", 32, False), ("contiguous", 49, True),
                                                  ("channel_last", 49, False), ("strided", 48, True)])
def test_v2_inputs_are_16_byte_aligned(layout, length, copied):
    """_vector_aligned: the input itself where its strides allow 16-byte tile loads, else an equal copy
    whose pitch is a multiple of 16 and whose NCHW padding is zero (tiles read up to L rounded to 16)."""
    gen = torch.Generator().manual_seed(0)
    if layout == "strided":  # a view of half-precision memory (a converted view would come out dense)
        t = torch.randn(2, 65, length + 5, generator=gen).half()[:, 1::2, 3:3 + length]
    else:
        t = _randn(2, 32, length, torch.float16, layout, gen)
    (aligned,), channels_last = attention._v2_inputs(t)
    assert channels_last == (layout == "channel_last")
    assert (aligned.data_ptr() != t.data_ptr()) == copied and torch.equal(aligned, t)
    unit, pitch = (1, 2) if channels_last else (2, 1)
    assert aligned.stride(unit) == 1 and aligned.stride(pitch) % 16 == 0 and aligned.stride(0) % 16 == 0
    if not channels_last:
        load_len = attention._load_len(length, channels_last)
        assert load_len % 16 == 0
        padded = torch.as_strided(aligned, (2, 32, load_len), aligned.stride())
        assert not padded[:, :, length:].any()
