"""One tester for the attention and CBAM ops over every backend (NATTEN's way: the reference computed
once, every backend driven through the same checks).

A backend here is a set of kernels behind the op schema: "cpu" (csrc/cpu), "triton" and "triton-v2"
(triton_kernels/attention.py without and with the variant triton_attention_v2), "cuda" (csrc/cuda
SIMT kernels) and "cuda-mma" (csrc/cuda/attention_mma, the unverified variant cuda_attention_mma).
The CBAM backends are "cpu" (csrc/cpu/cbam_*.cpp), "triton" (triton_kernels/cbam.py) and "cuda"
(csrc/cuda/cbam.cu). `backend_param()` gives one pytest.param per backend, skipped with the reason where
the machine cannot run it. Each backend keeps its own accuracy row of tests/_contract.py: the rule
objects below apply it (`AttentionRule`); the inputs, the layout checks and the case tables are
shared (tests/test_attention_op_cases.py).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import zlib
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from _contract import (CPU_ATTENTION_ATOL, CUDA_ATTENTION_ATOL, assert_error_rule, eps_atol,
                       triton_attention_units)
from fastattn import reference
from fastattn.reference import (ref_cbam_apply, ref_cbam_apply_backward, ref_cbam_grad_x, ref_channel_pool,
                                ref_gated_spatial_pool, ref_gated_spatial_pool_backward_gate,
                                ref_spatial_attention_forward)

VERIFIED_ENV = "FASTATTN_UNVERIFIED_KERNELS"  # fastattn/_verified.py ENV, read by csrc/cuda/variants.cuh too
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------
def _triton_skip() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not INTERPRETED and not torch.cuda.is_available():
        return "Triton needs a GPU or TRITON_INTERPRET=1"
    return None


def _cuda_skip() -> str | None:
    return None if torch.cuda.is_available() else "the CUDA attention kernels need a CUDA GPU and none is visible"


def _mma_skip() -> str | None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return "the tensor-core attention kernels need a CUDA GPU of sm_80 or newer"
    return None


def _compiled(op: str, dispatch_key: str):
    def load():
        from _util import compiled_ops
        return compiled_ops(op, dispatch_key)
    return load


def _triton_launchers(family: str):
    return lambda: importlib.import_module(f"fastattn.triton_kernels.{family}")


@dataclass(frozen=True)
class Backend:
    """name: the id in test names; device: where its tensors live; dtypes: those its tables run;
    env: variables set while a test runs (variant switches); skip: () -> reason it cannot run here, or None;
    load: () -> a namespace with the family's ops (spatial_attention_forward, ...; channel_pool, ...)."""
    name: str
    device: str
    dtypes: tuple
    env: dict = field(default_factory=dict)
    skip: object = None
    load: object = None

    @property
    def rule(self) -> "AttentionRule":
        return RULES[self.name.split("-")[0]]


_TRITON_DEVICE = "cpu" if INTERPRETED else "cuda"
# bfloat16 is left out of the interpreter: its tl.dot multiplies bfloat16 bit patterns as integers
_TRITON_16BIT = (torch.float16,) + (() if INTERPRETED else (torch.bfloat16,))
ATTENTION_BACKENDS = {b.name: b for b in (
    Backend("cpu", "cpu", (torch.float32, torch.float64, torch.float16, torch.bfloat16), {},
                     lambda: None, _compiled("spatial_attention_forward", "CPU")),
    Backend("triton", _TRITON_DEVICE, (torch.float32,) + _TRITON_16BIT, {VERIFIED_ENV: ""},
                     _triton_skip, _triton_launchers("attention")),
    # v2 changes the 16-bit kernels only (float32 runs v1's kernels under either)
    Backend("triton-v2", _TRITON_DEVICE, _TRITON_16BIT, {VERIFIED_ENV: "triton_attention_v2"},
                     _triton_skip, _triton_launchers("attention")),
    Backend("cuda", "cuda", (torch.float32, torch.float16, torch.bfloat16), {}, _cuda_skip,
                     _compiled("spatial_attention_forward", "CUDA")),
    Backend("cuda-mma", "cuda", (torch.float16, torch.bfloat16), {VERIFIED_ENV: "cuda_attention_mma"},
                     _mma_skip, _compiled("spatial_attention_forward", "CUDA")),
)}


def _cbam_cuda_skip() -> str | None:
    return None if torch.cuda.is_available() else "the CUDA CBAM kernels need a CUDA device and none is visible"


CBAM_BACKENDS = {b.name: b for b in (
    Backend("cpu", "cpu", (torch.float64, torch.float32, torch.float16, torch.bfloat16), {}, lambda: None,
            _compiled("channel_pool", "CPU")),
    # the interpreter casts float32 to bfloat16 by truncation, not round-to-nearest-even as the GPU and eager
    # PyTorch do, so bfloat16 results cannot match there
    Backend("triton", _TRITON_DEVICE, (torch.float32,) + _TRITON_16BIT, {}, _triton_skip, _triton_launchers("cbam")),
    Backend("cuda", "cuda", (torch.float32, torch.float16, torch.bfloat16), {}, _cbam_cuda_skip,
            _compiled("channel_pool", "CUDA")),
)}


def backend_param(name: str, *values, id: str | None = None, family: str = "attention"):
    """pytest.param(backend, *values) skipped with the backend's reason where it cannot run here."""
    backend = (ATTENTION_BACKENDS if family == "attention" else CBAM_BACKENDS)[name]
    reason = backend.skip()
    return pytest.param(backend, *values, id=id or name,
                        marks=[pytest.mark.skip(reason=reason)] if reason else [])


def attention_backend_params(names=None):
    return [backend_param(name) for name in (names or ATTENTION_BACKENDS)]


def cbam_backend_params(names=None):
    return [backend_param(name, family="cbam") for name in (names or CBAM_BACKENDS)]


@pytest.fixture
def ops(request, monkeypatch):
    """The ops of the test's `backend` parameter, with its variant switch set for the test's duration."""
    return backend_ops(request.node.callspec.params["backend"], monkeypatch)


def backend_ops(backend: Backend, monkeypatch):
    """backend's ops, its variant switch set through monkeypatch (so for the calling test only)."""
    for name, value in backend.env.items():
        monkeypatch.setenv(name, value)
    if backend.name.startswith("triton") and VERIFIED_ENV in backend.env:
        from fastattn import _verified
        assert _verified.enabled("triton_attention_v2") == (backend.name == "triton-v2")
    return backend.load()


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------
LAYOUTS = ("contiguous", "channel_last", "strided")


def make(n: int, c: int, length: int, dtype: torch.dtype, layout: str, gen: torch.Generator, device: str,
         std: float = 1.0) -> torch.Tensor:
    """A random (N, C, L) tensor: contiguous, channel_last (stride(1) == 1) or strided (every other channel
    and an offset window of positions of a larger buffer: neither dense nor with a packed channel stride).
    Drawn in float64 on the CPU, so every device gets the same values."""
    if layout == "contiguous":
        t = torch.randn(n, c, length, generator=gen, dtype=torch.float64)
    elif layout == "channel_last":
        t = torch.randn(n, length, c, generator=gen, dtype=torch.float64).transpose(1, 2)
    elif layout == "strided":
        t = torch.randn(n, 2 * c + 1, length + 5, generator=gen, dtype=torch.float64)[:, 1::2, 3:3 + length]
    else:
        raise ValueError(layout)
    return (t * std).to(device=device, dtype=dtype)


def attention_inputs(case, dtype, layouts, device, seed=0, q_std=1.0, k_std=1.0):
    """case = (N, heads, d_qk, d_v, Lq, Lk, scale), scale None meaning d_qk ** -0.5; layouts: one name or
    one per q, k, v -> (q, k, v, heads, scale)."""
    n, heads, d_qk, d_v, len_q, len_k, scale = case
    layouts = (layouts,) * 3 if isinstance(layouts, str) else layouts
    gen = torch.Generator().manual_seed(seed)
    q = make(n, heads * d_qk, len_q, dtype, layouts[0], gen, device, q_std)
    k = make(n, heads * d_qk, len_k, dtype, layouts[1], gen, device, k_std)
    v = make(n, heads * d_v, len_k, dtype, layouts[2], gen, device)
    return q, k, v, heads, d_qk ** -0.5 if scale is None else scale


def case_id(case) -> str:
    n, heads, d_qk, d_v, len_q, len_k, scale = case
    return f"n{n}h{heads}-d{d_qk}x{d_v}-L{len_q}x{len_k}-s{'inv_sqrt_d' if scale is None else scale}"


def is_channel_last(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and t.shape[1] > 1


def _autograd_grads(forward, q, k, v, grad_out, heads, scale, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    return torch.autograd.grad(forward(*leaves, heads, scale), leaves, grad_out.to(dtype))


def truth_grads(q, k, v, grad_out, heads, scale):
    """Autograd of the reference formula in float64 -> (dq, dk, dv)."""
    return _autograd_grads(lambda *a: ref_spatial_attention_forward(*a)[0], q, k, v, grad_out, heads, scale,
                           torch.float64)


# --------------------------------------------------------------------------
# Accuracy rules: docs/DESIGN.md §4 with each kernel family's row of tests/_contract.py
# --------------------------------------------------------------------------
class AttentionRule:
    """The error rule of one kernel family: check_forward(out, lse, q, k, v, heads, scale) and
    check_backward(grads, grad_out, q, k, v, out, lse, heads, scale)."""


class CpuRule(AttentionRule):
    """CPU_ATTENTION_ATOL relative to max(1, |truth|); lse (float32 by contract) on the float32 row
    (float64's for float64 inputs); the eager results: the reference and its autograd in the dtype."""

    def check_forward(self, out, lse, q, k, v, heads, scale):
        truth_out, truth_lse = ref_spatial_attention_forward(q.double(), k.double(), v.double(), heads, scale)
        eager_out, eager_lse = ref_spatial_attention_forward(q, k, v, heads, scale)
        assert_error_rule("out", out, truth_out, eager_out, CPU_ATTENTION_ATOL[q.dtype])
        lse_row = torch.float64 if q.dtype == torch.float64 else torch.float32
        assert_error_rule("lse", lse, truth_lse, eager_lse, CPU_ATTENTION_ATOL[lse_row])

    def check_backward(self, grads, grad_out, q, k, v, out, lse, heads, scale):
        truth = truth_grads(q, k, v, grad_out, heads, scale)
        eager = _autograd_grads(lambda *a: ref_spatial_attention_forward(*a)[0], q, k, v, grad_out, heads, scale,
                                q.dtype)
        for name, got, t, e in zip(("dq", "dk", "dv"), grads, truth, eager):
            assert_error_rule(name, got, t, e, CPU_ATTENTION_ATOL[q.dtype])


def _eager_lse(q, k, heads, scale):
    """log-sum-exp of the logits computed the plain eager way in q's dtype."""
    n, c, _ = q.shape
    qh = q.reshape(n, heads, c // heads, -1).transpose(-1, -2)
    kh = k.reshape(n, heads, c // heads, -1)
    return torch.logsumexp(scale * (qh @ kh), -1)


def assert_units_rule(name, got, truth, eager, magnitude=None, units=1.0):
    """|got - truth| <= 2 |eager - truth| + atol, atol = `units` units of got's dtype at the result's
    magnitude (default: the truth's; at least 1); every value finite."""
    assert torch.isfinite(got).all(), f"{name}: {(~torch.isfinite(got)).sum().item()} non-finite values"
    magnitude = truth.abs().max().item() if magnitude is None else magnitude
    assert_error_rule(name, got, truth, eager, eps_atol(got.dtype, units, magnitude), absolute=True)


class TritonRule(AttentionRule):
    """Absolute atol of triton_attention_units(dtype, d_qk) units of the dtype at the result's magnitude."""

    def check_forward(self, out, lse, q, k, v, heads, scale):
        truth_out, truth_lse = ref_spatial_attention_forward(q.double(), k.double(), v.double(), heads, scale)
        units = triton_attention_units(q.dtype, q.shape[1] // heads)
        assert_units_rule("out", out, truth_out, reference.spatial_attention(q, k, v, heads=heads, scale=scale),
                          units=units)
        assert_units_rule("lse", lse, truth_lse, _eager_lse(q, k, heads, scale), units=units)

    def check_backward(self, grads, grad_out, q, k, v, out, lse, heads, scale):
        """The atol's magnitude is twice the largest gradient of the three: dq and dk come from
        ds = p * (dp - delta), whose cancellation leaves rounding of the size of the dv-like terms even
        where the true dq, dk are ~0 (e.g. Lk = 1: softmax is constant)."""
        truth = truth_grads(q, k, v, grad_out, heads, scale)
        eager = _autograd_grads(lambda q_, k_, v_, h, s: reference.spatial_attention(q_, k_, v_, heads=h, scale=s),
                                q, k, v, grad_out, heads, scale, q.dtype)
        magnitude = 2 * max(t.abs().max().item() for t in truth)
        units = triton_attention_units(q.dtype, q.shape[1] // heads)
        for name, got, t, e in zip(("dq", "dk", "dv"), grads, truth, eager):
            assert_units_rule(name, got, t, e, magnitude, units)


def _heads_last(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, C, L) -> (N, heads, L, C // heads)."""
    n, c, length = t.shape
    return t.reshape(n, heads, c // heads, length).transpose(-1, -2)


def _heads_merged(t: torch.Tensor) -> torch.Tensor:
    """(N, heads, L, d) -> (N, heads * d, L)."""
    n, heads, length, d = t.shape
    return t.transpose(-1, -2).reshape(n, heads * d, length)


def eager_backward_op(grad_out, q, k, v, out, heads, scale):
    """The backward op's formula, eagerly in float32 (float64 for float64) from its own inputs -> (dq, dk, dv).

    Autograd of the forward in float32 never sees `out` rounded to float16/bfloat16, and that rounding
    alone (in rowsum(dO * out)) puts any kernel that receives `out` at 2-5x autograd's error (measured on
    an H100, reproduced on the CPU by evaluating the formula in float32)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh, kh, vh, gh, oh = (_heads_last(t.to(acc), heads) for t in (q, k, v, grad_out, out))
    p = torch.softmax(scale * qh @ kh.transpose(-1, -2), -1)
    ds = p * (gh @ vh.transpose(-1, -2) - (gh * oh).sum(-1, keepdim=True))
    grads = (scale * ds @ kh, scale * ds.transpose(-1, -2) @ qh, p.transpose(-1, -2) @ gh)
    return tuple(_heads_merged(g).to(q.dtype) for g in grads)


class CudaRule(AttentionRule):
    """CUDA_ATTENTION_ATOL relative (lse on the float32 row); the backward's eager result is the backward
    op's own formula (eager_backward_op), its atol plus the rounding of the float32 lse it is given."""

    def check_forward(self, out, lse, q, k, v, heads, scale):
        truth = ref_spatial_attention_forward(q.double(), k.double(), v.double(), heads, scale)
        eager = ref_spatial_attention_forward(q, k, v, heads, scale)
        for name, got, t, e in zip(("out", "lse"), (out, lse), truth, eager):
            assert_error_rule(name, got, t.double(), e, CUDA_ATTENTION_ATOL[got.dtype])

    def check_backward(self, grads, grad_out, q, k, v, out, lse, heads, scale):
        truth = truth_grads(q, k, v, grad_out, heads, scale)
        eager = eager_backward_op(grad_out, q, k, v, out, heads, scale)
        # P is recomputed from the float32 lse of the contract, whose rounding (relative 2**-24 of |lse|,
        # ~1e-3 absolute at logits of 1e4) the eager formula never sees
        truth_lse = ref_spatial_attention_forward(q.double(), k.double(), v.double(), heads, scale)[1]
        lse_rounding = 2.0 ** -22 * truth_lse.abs().max().item()
        for name, got, t, e in zip(("dq", "dk", "dv"), grads, truth, eager):
            assert_error_rule(name, got, t, e, CUDA_ATTENTION_ATOL[q.dtype] + lse_rounding)


RULES = {"cpu": CpuRule(), "triton": TritonRule(), "cuda": CudaRule()}


# --------------------------------------------------------------------------
# The tester
# --------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def check_forward_layout(out, lse, q, v, heads):
    """dtype, shapes, and the contract's layout rule (csrc/ops.cpp): channel-last out exactly when q is
    (stride(1) == 1 and Cq > 1), else contiguous."""
    n, _, len_q = q.shape
    assert out.dtype == q.dtype and out.device == q.device and lse.dtype == torch.float32
    assert out.shape == (n, v.shape[1], len_q) and lse.shape == (n, heads, len_q), (out.shape, lse.shape)
    if is_channel_last(q):
        assert out.transpose(1, 2).is_contiguous(), f"out strides {out.stride()}, expected channel-last"
    else:
        assert out.is_contiguous(), f"out strides {out.stride()}, expected contiguous"


def check_grad_layout(grads, inputs):
    """Each gradient has its input's dtype, device, and layout: its strides when dense, else dense strides
    in the same order (those of torch.empty_like), on the dimensions of more than one element."""
    for name, got, x in zip(("dq", "dk", "dv"), grads, inputs):
        assert got.dtype == x.dtype and got.device == x.device and got.shape == x.shape, name
        want = torch.empty_like(x).stride()
        # the stride of a dimension of size 1 is never used to address anything
        assert all(a == b for a, b, size in zip(got.stride(), want, x.shape) if size > 1), (
            f"{name}: strides {got.stride()} vs input {x.stride()}")


def run_attention_case(backend: Backend, ops, case, dtype, layouts, *, q_std=1.0, k_std=1.0,
                       backward=True, seed=0):
    """One forward (and backward) of `backend` on a case of the tables, checked with its rule."""
    q, k, v, heads, scale = attention_inputs(case, dtype, layouts, backend.device, seed, q_std, k_std)
    out, lse = ops.spatial_attention_forward(q, k, v, heads, scale)
    _sync(backend.device)
    check_forward_layout(out, lse, q, v, heads)
    backend.rule.check_forward(out, lse, q, k, v, heads, scale)
    if not backward:
        return
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = make(*out.shape, dtype, "channel_last" if is_channel_last(out) else "contiguous", gen, backend.device)
    grads = ops.spatial_attention_backward(grad_out, q, k, v, out, lse, heads, scale)
    _sync(backend.device)
    check_grad_layout(grads, (q, k, v))
    backend.rule.check_backward(grads, grad_out, q, k, v, out, lse, heads, scale)


# --------------------------------------------------------------------------
# CBAM inputs: x (N, C, H, W) of a kind in a layout, gates, and the arguments of every op
# --------------------------------------------------------------------------
CBAM_LAYOUTS = ("contiguous", "channels_last", "strided")


def cbam_generator(*key) -> torch.Generator:
    """A CPU generator seeded by the test case, the same in every process and for every device."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def to_cbam_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """contiguous, channels_last, or strided: neither NCHW- nor channels_last-contiguous (H and W swapped in
    memory; a 1-row or 1-column map stays as it is)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return t.transpose(2, 3).contiguous().transpose(2, 3) if t.shape[2] > 1 and t.shape[3] > 1 else t[:, :, :, :]
    return t.contiguous()


def cbam_randn(shape, dtype, gen, device):
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def cbam_x(shape, dtype, layout, kind, gen, device):
    """ties: relu'd and rounded (many ties); nan: random with NaN and +-inf sprinkled in."""
    x = torch.randn(shape, generator=gen)
    if kind == "ties":
        x = torch.relu(3 * x).round()
    elif kind == "nan":
        flat = x.view(-1)
        for value, every in ((float("nan"), 97), (float("inf"), 211), (float("-inf"), 307)):
            flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // every),), generator=gen)] = value
    return to_cbam_layout(x.to(device=device, dtype=dtype), layout)


def cbam_gate(shape, dtype, kind, gen, device):
    """(N, C) channel gate; for "ties" quarters in [0, 1], so gated products tie across channels too."""
    n, c = shape[:2]
    if kind == "ties":
        return (torch.randint(0, 5, (n, c), generator=gen) / 4).to(device=device, dtype=dtype)
    return cbam_randn((n, c), dtype, gen, device)


GRAD_X_TERMS = ("grad_y", "grad_pooled", "grad_avg", "grad_max")


def cbam_grad_x_args(x, gen, kind, grad_layout, terms=GRAD_X_TERMS):
    """Arguments of cbam_grad_x after x (None where the term is absent); saved tensors from the same-dtype
    reference forward."""
    n, c, h, w = x.shape
    dtype, device = x.dtype, x.device
    ch_gate = cbam_gate(x.shape, dtype, kind, gen, device)
    sp_gate = torch.rand((n, h, w), generator=gen).to(device=device, dtype=dtype)
    pooled, sp_argmax, sp_count = ref_gated_spatial_pool(x, ch_gate)
    _, ch_max, ch_argmax, ch_count = ref_channel_pool(x)
    args = dict(grad_y=to_cbam_layout(cbam_randn(x.shape, dtype, gen, device), grad_layout), ch_gate=ch_gate,
                sp_gate=sp_gate, grad_pooled=cbam_randn((n, 2, h, w), dtype, gen, device), pooled=pooled,
                sp_argmax=sp_argmax, sp_count=sp_count, grad_avg=cbam_randn((n, c), dtype, gen, device),
                grad_max=cbam_randn((n, c), dtype, gen, device), ch_max=ch_max, ch_argmax=ch_argmax,
                ch_count=ch_count)
    needs = {"grad_y": ["ch_gate", "sp_gate"], "grad_pooled": ["ch_gate", "pooled", "sp_argmax", "sp_count"],
             "grad_avg": [], "grad_max": ["ch_max", "ch_argmax", "ch_count"]}
    kept = {name for term in terms for name in [term] + needs[term]}
    return [args[name] if name in kept else None for name in args]


def all_cbam_op_args(x, gen, grad_layout, split_ties=True):
    """{op name: its arguments} for every CBAM op on x; saved tensors from the same-dtype reference."""
    n, c, h, w = x.shape
    device = x.device
    gate = cbam_gate(x.shape, x.dtype, "nan", gen, device)
    sp_gate = torch.rand((n, h, w), generator=gen).to(device=device, dtype=x.dtype)
    grad_y = to_cbam_layout(cbam_randn(x.shape, x.dtype, gen, device), grad_layout)
    pooled, argmax, count = ref_gated_spatial_pool(x, gate)
    grad_pooled = cbam_randn((n, 2, h, w), x.dtype, gen, device)
    return {
        "channel_pool": (x, split_ties),
        "gated_spatial_pool": (x, gate, split_ties),
        "cbam_apply": (x, gate, sp_gate),
        "cbam_apply_backward": (grad_y, x, gate, sp_gate),
        "gated_spatial_pool_backward_gate": (grad_pooled, x, gate, pooled, argmax, count, split_ties),
        "cbam_grad_x": (x, *cbam_grad_x_args(x, gen, "ties", grad_layout), split_ties),
    }


CBAM_REFERENCE = SimpleNamespace(
    channel_pool=lambda x, split_ties: ref_channel_pool(x),
    gated_spatial_pool=lambda x, gate, split_ties: ref_gated_spatial_pool(x, gate),
    cbam_apply=ref_cbam_apply, cbam_apply_backward=ref_cbam_apply_backward,
    gated_spatial_pool_backward_gate=ref_gated_spatial_pool_backward_gate, cbam_grad_x=ref_cbam_grad_x)


def call_all(namespace, all_args):
    """{op name: tuple of outputs} of namespace's ops on all_cbam_op_args."""
    outputs = {}
    for name, args in all_args.items():
        out = getattr(namespace, name)(*args)
        outputs[name] = out if isinstance(out, tuple) else (out,)
    return outputs
