"""The op registry: per op of csrc/ops.cpp, its schema, fake kernel, kind of autograd and the dtypes
each backend runs it in.

csrc/ops.cpp declares the compiled ops (tests/test_structure.py checks that these schemas are
the same as `torch.ops.fastattn.<op>.default._schema`); fastattn._ops derives from this table the
Triton ops' registrations (`triton_<op>`, same schema), the fake kernels and the autograd of every
op; the README's support table is generated from it (`support_table`) and tested against it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from fastattn._layout import channel_last_3d

GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = GPU_DTYPES + (torch.float64,)

# How an op is differentiated:
FORMULA = "formula"                        # an autograd formula of its own (fastattn._ops._autograd_for)
NO_DOUBLE_BACKWARD = "no_double_backward"  # a backward op: differentiating it again raises
INTERNAL = "internal"                      # a helper of the fused block's forward and backward; raises
INFERENCE = "inference"                    # the fused block's inference forward; raises
INPLACE_INFERENCE = "inplace_inference"    # the same writing over x: mutating, so no autograd formula can be
                                           # registered; an Autograd kernel raises when a gradient is wanted


# ---------------------------------------------------------------------------
# Fake kernels: output metadata only (shapes, dtypes, strides)
# ---------------------------------------------------------------------------
def _fake_channel_pool(x, split_ties):
    n, c = x.shape[:2]
    return (x.new_empty(n, c), x.new_empty(n, c), x.new_empty(n, c, dtype=torch.int64),
            x.new_empty(n, c, dtype=torch.int32))


def _fake_gated_spatial_pool(x, gate, split_ties):
    n, _, h, w = x.shape
    return x.new_empty(n, 2, h, w), x.new_empty(n, h, w, dtype=torch.int64), x.new_empty(n, h, w, dtype=torch.int32)


def _fake_like_x(x, *args):
    return torch.empty_like(x)


def _fake_mutates_x(x, *args):
    return None  # the op writes over x and returns nothing: x's metadata is unchanged


def _fake_cbam_apply_backward(grad_y, x, ch_gate, sp_gate):
    return torch.empty_like(ch_gate, memory_format=torch.contiguous_format), \
        torch.empty_like(sp_gate, memory_format=torch.contiguous_format)


def _fake_gated_spatial_pool_backward_gate(grad_pooled, x, gate, pooled, argmax, count, split_ties):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _fake_spatial_attention_forward(q, k, v, heads, scale):
    n, _, lq = q.shape
    cv = v.shape[1]
    if channel_last_3d(q):
        out = q.new_empty(n, lq, cv).transpose(1, 2)
    else:
        out = q.new_empty(n, cv, lq)
    return out, q.new_empty(n, heads, lq, dtype=torch.float32)


def _fake_spatial_attention_backward(grad_out, q, k, v, out, lse, heads, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fake_cbam_spatial_conv(x, weight, padding):
    n, _, h, w = x.shape
    return x.new_empty(n, weight.shape[0], h + 2 * padding[0] - weight.shape[2] + 1,
                       w + 2 * padding[1] - weight.shape[3] + 1)


def _fake_cbam_spatial_conv_weight_grad(grad_out, x, kh, kw, padding):
    return x.new_empty(grad_out.shape[1], x.shape[1], kh, kw)


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    schema: str                 # "(args) -> returns", as declared in csrc/ops.cpp
    family: str                 # "cbam" or "attention": the backend choice and the Triton module
    fake: Callable
    autograd: str               # FORMULA, NO_DOUBLE_BACKWARD, INTERNAL or INFERENCE
    dtypes: dict                # backend -> the dtypes it runs the op in; a backend without the op is absent

    @property
    def triton(self) -> bool:
        return "triton" in self.dtypes


# the named groups of the long optional-tensor argument lists (csrc/cpu/cbam_grad_x.cpp's GradXTerms)
_APPLY_TERMS = ("grad_y", "ch_gate", "sp_gate")                          # y = x * ch_gate * sp_gate
_SPATIAL_POOL_TERMS = ("grad_pooled", "pooled", "sp_argmax", "sp_count")  # the gated spatial pool
_CHANNEL_POOL_TERMS = ("grad_avg", "grad_max", "ch_max", "ch_argmax", "ch_count")  # the channel pool
_GATE_CONV = ("conv_w", "bn_weight", "bn_bias", "bn_mean", "bn_var")      # the spatial gate's conv + BN


def _optional(*names: str) -> str:
    """'Tensor? a, Tensor? b, ...': optional tensor arguments of a schema."""
    return ", ".join(f"Tensor? {name}" for name in names)


_ALL = {"cpu": CPU_DTYPES, "cuda": GPU_DTYPES, "triton": GPU_DTYPES}
_CPU_ONLY = {"cpu": CPU_DTYPES}

OPS: dict[str, OpSpec] = {spec.name: spec for spec in (
    OpSpec("channel_pool",
           "(Tensor x, bool split_ties) -> (Tensor avg, Tensor max, Tensor argmax, Tensor count)",
           "cbam", _fake_channel_pool, FORMULA, _ALL),
    OpSpec("gated_spatial_pool",
           "(Tensor x, Tensor gate, bool split_ties) -> (Tensor pooled, Tensor argmax, Tensor count)",
           "cbam", _fake_gated_spatial_pool, FORMULA, _ALL),
    OpSpec("cbam_apply", "(Tensor x, Tensor ch_gate, Tensor sp_gate) -> Tensor",
           "cbam", _fake_like_x, FORMULA, _ALL),
    OpSpec("cbam_apply_backward", "(Tensor grad_y, Tensor x, Tensor ch_gate, Tensor sp_gate) -> (Tensor, Tensor)",
           "cbam", _fake_cbam_apply_backward, NO_DOUBLE_BACKWARD, _ALL),
    OpSpec("gated_spatial_pool_backward_gate",
           "(Tensor grad_pooled, Tensor x, Tensor gate, Tensor pooled, Tensor argmax, Tensor count, "
           "bool split_ties) -> Tensor",
           "cbam", _fake_gated_spatial_pool_backward_gate, NO_DOUBLE_BACKWARD, _ALL),
    OpSpec("cbam_grad_x", f"(Tensor x, {_optional(*_APPLY_TERMS, *_SPATIAL_POOL_TERMS, *_CHANNEL_POOL_TERMS)}, "
           "bool split_ties) -> Tensor", "cbam", _fake_like_x, NO_DOUBLE_BACKWARD, _ALL),
    # the cpu backend's direct conv for the spatial gate (the other backends call F.conv2d)
    OpSpec("cbam_spatial_conv", "(Tensor x, Tensor weight, int[2] padding) -> Tensor",
           "cbam", _fake_cbam_spatial_conv, INTERNAL, _CPU_ONLY),
    OpSpec("cbam_spatial_conv_weight_grad",
           "(Tensor grad_out, Tensor x, int kh, int kw, int[2] padding) -> Tensor",
           "cbam", _fake_cbam_spatial_conv_weight_grad, INTERNAL, _CPU_ONLY),
    OpSpec("cbam_forward_eval", f"(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, {_optional(*_GATE_CONV)}, "
           "float bn_eps, int[2] padding, bool light, bool max_first) -> Tensor", "cbam", _fake_like_x, INFERENCE,
           _CPU_ONLY),
    OpSpec("cbam_forward_eval_", f"(Tensor(a!) x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, {_optional(*_GATE_CONV)}, "
           "float bn_eps, int[2] padding, bool light, bool max_first) -> ()", "cbam", _fake_mutates_x,
           INPLACE_INFERENCE, _CPU_ONLY),
    OpSpec("spatial_attention_forward",
           "(Tensor q, Tensor k, Tensor v, int heads, float scale) -> (Tensor out, Tensor lse)",
           "attention", _fake_spatial_attention_forward, FORMULA, _ALL),
    OpSpec("spatial_attention_backward",
           "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int heads, float scale) "
           "-> (Tensor dq, Tensor dk, Tensor dv)",
           "attention", _fake_spatial_attention_backward, NO_DOUBLE_BACKWARD, _ALL),
)}

# The public functions and the ops a call and its backward run: their dtypes are the ops' common ones.
PUBLIC_FUNCTIONS = {
    "spatial_attention": ("spatial_attention_forward", "spatial_attention_backward"),
    "channel_pool": ("channel_pool", "cbam_grad_x"),
    "gated_spatial_pool": ("gated_spatial_pool", "gated_spatial_pool_backward_gate", "cbam_grad_x"),
    "cbam_apply": ("cbam_apply", "cbam_apply_backward", "cbam_grad_x"),
}

_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def dtypes(backend: str, ops) -> tuple:
    """The dtypes `backend` runs every op of `ops` in (in CPU_DTYPES order)."""
    return tuple(d for d in CPU_DTYPES if all(d in OPS[op].dtypes.get(backend, ()) for op in ops))


def support_table() -> list[str]:
    """The rows of the README's "Backends × dtypes × ops" table for the public functions."""
    rows = []
    for fn, ops in PUBLIC_FUNCTIONS.items():
        cells = [", ".join(_SHORT[d] for d in dtypes(b, ops)) or "—" for b in ("cpu", "cuda", "triton")]
        rows.append(f"| `{fn}` fwd + bwd | " + " | ".join(cells) + " | all |")
    return rows
