"""The attention modules of fastattn.nn against their reference twins (and timm's
NonLocalAttn): keys, outputs, input and parameter gradients, BatchNorm running
statistics, in train and eval mode, on every attention path available here
(docs/DESIGN.md §4 error rule); gradcheck in float64; the autocast rules of the ops."""
import copy

import pytest
import torch
from timm.layers.non_local_attn import NonLocalAttn as TimmNonLocalAttn
from torch._subclasses.fake_tensor import FakeTensorMode

import fastattn
from fastattn import _ext, reference
from _util import ATOL, GRAD_ATOL, assert_error_rule, attention_backends, interpreted, module_forward_backward, randomize

# name -> (fused class, reference twin class, constructor args, kwargs); 16 channels everywhere
KINDS = {
    "nonlocal": (fastattn.nn.NonLocal2d, reference.NonLocal2d, (16,), {}),
    "nonlocal_subsampled": (fastattn.nn.NonLocal2d, reference.NonLocal2d, (16, 4),
                            dict(sub_sample=True, use_scale=False)),
    "sagan": (fastattn.nn.SelfAttention2d, reference.SelfAttention2d, (16,), {}),
    "unet_chunked": (fastattn.nn.AttentionBlock2d, reference.AttentionBlock2d, (16, 2), dict(groups=4)),
    "unet_per_head": (fastattn.nn.AttentionBlock2d, reference.AttentionBlock2d, (16, 4),
                      dict(groups=8, qkv_layout="per_head")),
    "timm_nonlocal": (fastattn.nn.NonLocalAttn, reference.TimmNonLocalAttn, (16,), dict(rd_divisor=4)),
}


def _pair(kind: str, train: bool = True):
    """(fused, twin) with the same random weights; the twin is built by its own class."""
    fused_cls, twin_cls, args, kwargs = KINDS[kind]
    fused, twin = fused_cls(*args, **kwargs), twin_cls(*args, **kwargs)
    randomize(fused)
    twin.load_state_dict(fused.state_dict())
    return fused.train(train), twin.train(train)


class _FusedPath(torch.nn.Module):
    """Runs m's fused code path on `backend` ("reference": over the functional reference)."""

    def __init__(self, m, backend):
        super().__init__()
        self.m, self.backend = m, backend

    def forward(self, x):
        return type(self.m)._fused(self.m, x, self.backend)


def _paths():
    """(label, backend): the fused code path over the op contract in PyTorch, then every kernel backend here."""
    return [("contract-ops", "reference")] + [(b, b) for b in attention_backends("cpu")]


def _shapes(backend):
    if backend == "triton" and interpreted():
        return [(1, 16, 4, 4)]
    return [(2, 16, 6, 6), (3, 16, 7, 5)]


@pytest.mark.parametrize("kind", list(KINDS))
def test_keys_equal_twin(kind):
    fused, twin = _pair(kind)
    assert list(fused.state_dict()) == list(twin.state_dict())
    fused.load_state_dict(twin.state_dict())


def test_keys_and_numerics_equal_timm():
    timm_block = TimmNonLocalAttn(32)
    randomize(timm_block)
    twin = reference.TimmNonLocalAttn(32)
    fused = fastattn.nn.NonLocalAttn(32)
    assert list(fused.state_dict()) == list(twin.state_dict()) == list(timm_block.state_dict())
    twin.load_state_dict(timm_block.state_dict())
    fused.load_state_dict(timm_block.state_dict())
    assert fused.scale == timm_block.scale == 32 ** -0.5  # C ** -0.5, not d ** -0.5
    x = torch.randn(2, 32, 5, 6)
    torch.testing.assert_close(twin(x), timm_block(x), rtol=0, atol=0)
    torch.testing.assert_close(fused._fused(x, "reference"), timm_block(x))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("label,backend", _paths())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_twin(kind, train, label, backend, channels_last):
    for shape in _shapes(backend):
        fused, eager = _pair(kind, train)
        truth = copy.deepcopy(eager).double()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(shape, generator=g)
        grad_y = torch.randn(shape, generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y_eager, g_eager = module_forward_backward(eager, x, grad_y)
        y_truth, g_truth = module_forward_backward(truth, x.double(), grad_y.double())
        y_fused, g_fused = module_forward_backward(_FusedPath(fused, backend), x, grad_y)
        g_fused = {k.removeprefix("m."): v for k, v in g_fused.items()}

        assert_error_rule(f"{shape} y", y_fused, y_truth, y_eager)
        assert g_fused.keys() == g_truth.keys()
        for name in g_truth:
            assert_error_rule(f"{shape} grad {name}", g_fused[name], g_truth[name], g_eager[name],
                              atol=GRAD_ATOL[g_fused[name].dtype])
        for (name, b_fused), b_truth, b_eager in zip(fused.named_buffers(), truth.buffers(), eager.buffers()):
            if b_fused.is_floating_point():
                assert_error_rule(f"{shape} buffer {name}", b_fused, b_truth, b_eager)
            else:
                assert torch.equal(b_fused, b_eager), f"buffer {name}: {b_fused} != {b_eager}"


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", ["reference"] + [b for b in attention_backends("cpu") if b == "cpu"])
def test_gradcheck_float64(kind, backend):
    """gradcheck of the fused path, input and every parameter, in float64 on a small shape
    (fast mode: random projections of the Jacobian, a few forward passes per input)."""
    fused, _ = _pair(kind)
    path = _FusedPath(fused.double().eval(), backend)  # BN on running statistics: one function at every probe
    names = [n for n, _ in path.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in path.parameters()]
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64, requires_grad=True)

    def fn(inp, *ps):
        return torch.func.functional_call(path, dict(zip(names, ps)), (inp,))
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("label,backend", _paths())
def test_empty_batch(kind, label, backend):
    fused, _ = _pair(kind, train=False)
    assert _FusedPath(fused, backend)(torch.randn(0, 16, 4, 4)).shape == (0, 16, 4, 4)


@pytest.mark.parametrize("kind", list(KINDS))
def test_reference_backend_is_the_twins_forward(kind):
    fused, twin = _pair(kind, train=False)
    fused.backend = "reference"
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(fused(x), twin(x), rtol=0, atol=0)


def test_new_blocks_are_identity():
    """Zero-initialised BN gamma / gamma / proj_out, as the papers do."""
    x = torch.randn(2, 16, 4, 4)
    for fused_cls, _, args, kwargs in KINDS.values():
        torch.testing.assert_close(fused_cls(*args, **kwargs)(x), x)


def test_extra_repr_and_bad_arguments():
    assert "sub_sample=True" in repr(fastattn.nn.NonLocal2d(16, sub_sample=True))
    assert "heads=4" in repr(fastattn.nn.AttentionBlock2d(32, 4))
    assert "backend='reference'" in repr(fastattn.nn.SelfAttention2d(16, backend="reference"))
    assert "scale=0.25" in repr(fastattn.nn.NonLocalAttn(16))
    with pytest.raises(ValueError, match="channels >= 8"):
        fastattn.nn.SelfAttention2d(4)
    with pytest.raises(ValueError, match="heads=3"):
        fastattn.nn.AttentionBlock2d(32, 3)
    with pytest.raises(ValueError, match="qkv_layout"):
        fastattn.nn.AttentionBlock2d(32, 2, qkv_layout="nope")
    with pytest.raises(ValueError, match="backend"):
        fastattn.nn.NonLocal2d(16, backend="nope")


# --------------------------------------------------------------------------
# Autocast: the dtypes eager PyTorch gives (bmm-like attention, promoting CBAM)
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("label,backend", _paths())
def test_autocast_bfloat16_matches_twin(kind, label, backend):
    if backend == "triton" and interpreted():
        pytest.skip("the Triton interpreter lacks bfloat16 math")
    fused, eager = _pair(kind)
    truth = copy.deepcopy(eager).double()
    x = torch.randn(2, 16, 6, 6)
    fused = _FusedPath(fused, backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_eager, y_fused = eager(x), fused(x)
    y_truth = truth(x.double())
    assert y_fused.dtype == y_eager.dtype
    assert_error_rule("y", y_fused.float(), y_truth, y_eager.float(), atol=ATOL[torch.bfloat16])


def test_spatial_attention_autocast_dtypes():
    q, k, v = torch.randn(2, 8, 10), torch.randn(2, 8, 6).bfloat16(), torch.randn(2, 4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastattn.spatial_attention(q, k, v)  # mixed dtypes are no error under autocast
        eager = reference.spatial_attention(q, k.float(), v)
    assert out.dtype == eager.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is never cast, as in PyTorch
        assert fastattn.spatial_attention(q.double(), q.double(), q.double()).dtype == torch.float64
    with pytest.raises(TypeError, match="same dtype"):  # outside autocast mixed dtypes stay an error
        fastattn.spatial_attention(q, k, v)


def test_cbam_primitives_autocast_promote():
    x = torch.randn(2, 3, 4, 4).bfloat16()
    ch, sp = torch.rand(2, 3), torch.rand(2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastattn.cbam_apply(x, ch, sp)
        pooled = fastattn.gated_spatial_pool(x, ch)
        eager = x * ch[:, :, None, None] * sp[:, None]
    assert y.dtype == pooled.dtype == eager.dtype == torch.float32


def _registered_prefixes():
    prefixes = ["triton_"]
    if _ext._C is not None:
        prefixes.append("")
    return prefixes


@pytest.mark.parametrize("prefix", _registered_prefixes())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_ops_have_autocast_kernels(prefix, dtype):
    """torch.ops.fastattn.* themselves follow the rules (checked on fake tensors: no kernel runs)."""
    ops = torch.ops.fastattn
    with FakeTensorMode():
        q, k, v = torch.randn(2, 8, 10), torch.randn(2, 8, 6), torch.randn(2, 4, 6)
        with torch.autocast("cpu", dtype=dtype):
            out, lse = getattr(ops, prefix + "spatial_attention_forward")(q, k, v, 1, 1.0)
            y = getattr(ops, prefix + "cbam_apply")(torch.randn(2, 3, 4, 4, dtype=dtype), torch.randn(2, 3),
                                                    torch.randn(2, 4, 4))
        assert out.dtype == dtype and lse.dtype == torch.float32
        assert y.dtype == torch.float32
        out, _ = getattr(ops, prefix + "spatial_attention_forward")(q, k, v, 1, 1.0)
        assert out.dtype == torch.float32  # autocast off: untouched
