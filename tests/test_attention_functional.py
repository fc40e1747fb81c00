"""fastattn.spatial_attention on every backend: parity with the eager formula
(values and the three gradients), SDPA parity, layouts, stability, gradcheck,
opcheck, torch.compile, bad input. Kernel-level sweeps live in the
per-backend test_*_attention_ops.py files."""
import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from _util import assert_error_rule, compiled_backends, interpreted

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _maps(n, cq, cv, hq, wq, hk, wk, dtype=torch.float32, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, cq, hq, wq, generator=g)
    k = torch.randn(n, cq, hk, wk, generator=g)
    v = torch.randn(n, cv, hk, wk, generator=g)
    out = [t.to(dtype) for t in (q, k, v)]
    if channels_last:
        out = [t.contiguous(memory_format=torch.channels_last) for t in out]
    return out


def _cases(backend):
    small = backend == "triton" and interpreted()
    # (n, cq, cv, hq, wq, hk, wk, heads, scale)
    if small:
        return [(1, 8, 8, 3, 3, 3, 3, 1, None), (2, 16, 8, 4, 2, 2, 2, 2, 1.0)]
    return [(2, 8, 8, 7, 7, 7, 7, 1, None),                 # L = 49
            (1, 64, 64, 14, 14, 7, 7, 2, None),             # Lk = Lq / 4, d = 32
            (2, 16, 64, 8, 8, 4, 4, 1, 1.0),                # SAGAN-like: d_v != d_qk, no scale
            (1, 80, 160, 5, 5, 5, 5, 2, None),              # d = 40 / 80, not powers of two
            (1, 320, 320, 4, 4, 4, 4, 8, None),             # U-Net-like heads
            (1, 4, 4, 1, 1, 1, 1, 1, None)]                 # one position


def _backend_cases():
    return [(b, c) for b in compiled_backends("cpu") for c in _cases(b)]


def _attend(backend, q, k, v, heads, scale):
    if backend == "eager":
        return reference.spatial_attention(q, k, v, heads=heads, scale=scale)
    return fastattn.spatial_attention(q, k, v, heads=heads, scale=scale, backend=backend)


def _with_grads(backend, inputs, grad_out, heads, scale):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = _attend(backend, *inputs, heads, scale)
    return out, torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("backend,case", _backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_reference(backend, case, dtype, channels_last):
    if dtype == torch.float64 and backend != "cpu":
        pytest.skip("float64 runs on the cpu backend only")
    if dtype == torch.bfloat16 and backend == "triton" and interpreted():
        pytest.skip("the Triton interpreter lacks bfloat16 math")
    n, cq, cv, hq, wq, hk, wk, heads, scale = case
    q, k, v = _maps(n, cq, cv, hq, wq, hk, wk, dtype, channels_last)
    grad_out = torch.randn(n, cv, hq, wq).to(dtype)
    truth, g_truth = _with_grads("eager", [t.double() for t in (q, k, v)], grad_out.double(), heads, scale)
    eager, g_eager = _with_grads("eager", [q, k, v], grad_out, heads, scale)
    fused, g_fused = _with_grads(backend, [q, k, v], grad_out, heads, scale)
    assert fused.dtype == dtype and fused.shape == (n, cv, hq, wq)
    if channels_last and cv > 1 and hq * wq > 1:
        assert fused.is_contiguous(memory_format=torch.channels_last), "output must follow q's memory format"
    assert_error_rule("out", fused, truth, eager)
    for name, f, t, e in zip(("dq", "dk", "dv"), g_fused, g_truth, g_eager):
        assert_error_rule(name, f, t, e)


@pytest.mark.parametrize("backend", compiled_backends("cpu"))
def test_three_d_inputs_and_sdpa_parity(backend):
    n, heads, d, lq, lk = 2, 2, 16, 20, 12
    q, k, v = (torch.randn(n, heads * d, length) for length in (lq, lk, lk))
    out = fastattn.spatial_attention(q, k, v, heads=heads, backend=backend)
    split = [t.view(n, heads, d, -1).transpose(-1, -2) for t in (q, k, v)]
    sdpa = F.scaled_dot_product_attention(*split).transpose(-1, -2).reshape(n, heads * d, lq)
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", compiled_backends("cpu"))
def test_large_logits_stay_finite(backend):
    q, k, v = _maps(1, 8, 8, 4, 4, 4, 4)
    q = q * 1e2
    k = k * 1e2  # logits ~ 1e4 * d**-0.5 * d
    out = fastattn.spatial_attention(q, k, v, scale=1.0, backend=backend)
    ref = reference.spatial_attention(q.double(), k.double(), v.double(), scale=1.0)
    assert out.isfinite().all()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", compiled_backends("cpu"))
def test_keys_of_minus_inf_logits_drop_out(backend):
    """A key whose logits are -inf gets weight 0, as in the reference's softmax, even when every key
    of a row's first key block is such a key (the online softmax then starts from a max of -inf);
    a row whose logits are all -inf gives NaN, as torch.softmax does."""
    gen = torch.Generator().manual_seed(7)
    q = torch.rand(1, 8, 40, generator=gen) + 0.1  # positive: a key of -inf channels has -inf logits
    k, v = torch.randn(1, 8, 700, generator=gen), torch.randn(1, 8, 700, generator=gen)
    k[:, :, :600] = -float("inf")  # longer than any backend's key block
    q[:, :, 5] = -q[:, :, 5]       # row 5 sees +inf there: softmax over an inf is NaN
    out = fastattn.spatial_attention(q, k, v, backend=backend)
    ref = reference.spatial_attention(q.double(), k.double(), v.double())
    assert torch.equal(out.isnan(), ref.isnan()) and ref.isnan().any() and not ref[..., :5].isnan().any()
    torch.testing.assert_close(out.double().nan_to_num(), ref.nan_to_num(), atol=1e-5, rtol=1e-5)
    k[:, :, 600:] = -float("inf")  # now every logit of every row but row 5 is -inf
    out = fastattn.spatial_attention(q, k, v, backend=backend)
    assert out[..., :5].isnan().all()


@pytest.mark.parametrize("backend", ["reference"] + [b for b in compiled_backends("cpu") if b == "cpu"])
def test_gradcheck_float64(backend):
    q, k, v = (t.requires_grad_() for t in _maps(1, 4, 6, 3, 2, 2, 2, torch.float64))
    assert torch.autograd.gradcheck(
        lambda a, b, c: fastattn.spatial_attention(a, b, c, heads=2, backend=backend), (q, k, v))


@pytest.mark.parametrize("prefix", ["", "triton_"])
def test_opcheck(prefix):
    backend = "triton" if prefix else "cpu"
    if backend not in compiled_backends("cpu"):
        pytest.skip(f"backend {backend} is not available here")
    q, k, v = (t.flatten(2).requires_grad_() for t in _maps(1, 8, 4, 3, 3, 2, 2))
    forward = getattr(torch.ops.fastattn, prefix + "spatial_attention_forward")
    backward = getattr(torch.ops.fastattn, prefix + "spatial_attention_backward")
    torch.library.opcheck(forward, (q, k, v, 2, 0.5))
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2)  # channel-last (N, C, L)
    torch.library.opcheck(forward, (qt, k.detach(), v.detach(), 1, 1.0))
    out, lse = forward(q.detach(), k.detach(), v.detach(), 2, 0.5)
    torch.library.opcheck(backward, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 2, 0.5))


@pytest.mark.parametrize("backend", [b for b in compiled_backends("cpu") if b == "cpu"])
def test_torch_compile_fullgraph(backend):
    q, k, v = _maps(1, 8, 8, 4, 4, 4, 4)

    def f(a, b, c):
        return fastattn.spatial_attention(a, b, c, heads=2, backend=backend) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


BAD = [
    (dict(q=torch.randn(2, 8, 9)), ValueError, "same rank"),
    (dict(k=torch.randn(3, 8, 4, 4)), ValueError, "batch size"),
    (dict(k=torch.randn(2, 4, 4, 4)), ValueError, "Cq"),
    (dict(v=torch.randn(2, 8, 3, 3)), ValueError, "spatial size"),
    (dict(heads=3), ValueError, "heads=3"),
    (dict(heads=0), ValueError, "heads"),
    (dict(q=torch.ones(2, 8, 4, 4, dtype=torch.int64)), TypeError, "int64"),
    (dict(q=torch.ones(2, 8, 4, 4, dtype=torch.complex64)), TypeError, "complex64"),
    (dict(q=torch.randn(2, 8, 4, 4, dtype=torch.float64)), TypeError, "same dtype"),
    (dict(q=torch.randn(2, 8, 4, 4, device="meta")), ValueError, "same device"),
    (dict(q=torch.randn(2, 8)), ValueError, "3-D or 4-D"),
    (dict(backend="tpu"), ValueError, "backend"),
    (dict(backend="cuda"), fastattn.BackendUnavailable, "cuda"),
]


@pytest.mark.parametrize("override,exc,match", BAD)
def test_bad_input_raises_clear_error(override, exc, match):
    args = dict(q=torch.randn(2, 8, 4, 4), k=torch.randn(2, 8, 4, 4), v=torch.randn(2, 8, 4, 4), heads=2)
    args.update(override)
    with pytest.raises(exc, match=match):
        fastattn.spatial_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
