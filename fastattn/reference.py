"""The oracle: pure-PyTorch ground truth of every fastattn op.

The ``ref_*`` functions implement the op contract of ``csrc/ops.cpp`` exactly (same inputs, same
outputs, including the saved index tensors), one per op. Every C++, CUDA and Triton kernel is
tested against them (docs/DESIGN.md, "Op contracts" and "Accuracy rule"). Production code does
not import this module; the tests and the reference kernel set of fastattn._ops do.

Tie rules of the max pools (docs/DESIGN.md, "Semantics"):
* ``split_ties=True`` (timm, ``amax``): the gradient of a max is split evenly
  among all positions equal to it: ``mask * (grad / mask.sum())``. When the
  max is NaN no position equals it and every position gets NaN, as in PyTorch.
* ``split_ties=False`` (official CBAM, ``max_pool2d`` / ``torch.max``): the
  whole gradient goes to one index, the first maximum (the first NaN if any).

The eager public functions (``backend="reference"``) are in fastattn.eager, the twin modules in
fastattn.twins; both are re-exported at the end of this module for code that imports them from here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn._layout import channel_last_3d, memory_format, split_heads


# --------------------------------------------------------------------------
# CBAM ops
# --------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _first_max(values: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Max along ``dim`` with NaN propagation, its first index and its tie count."""
    mx = values.amax(dim)
    eq = values == mx.unsqueeze(dim)
    nan = values.isnan()
    row_has_nan = nan.any(dim)
    # first NaN if the row has one, else the first position equal to the max
    hit = torch.where(row_has_nan.unsqueeze(dim), nan, eq)
    size = values.shape[dim]
    idx = torch.arange(size, device=values.device).view([-1 if d == dim % values.dim() else 1 for d in range(values.dim())])
    argmax = torch.where(hit, idx, size).amin(dim)
    count = eq.sum(dim, dtype=torch.int32)
    return mx, argmax.to(torch.int64), count


def ref_channel_pool(x: Tensor, split_ties: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x: (N, C, H, W) -> avg, max (N, C) in x.dtype; argmax (N, C) int64; count (N, C) int32."""
    flat = x.flatten(2)
    avg = flat.to(_acc_dtype(x.dtype)).mean(2).to(x.dtype)
    mx, argmax, count = _first_max(flat, 2)
    return avg, mx, argmax, count


def _gated(x: Tensor, gate: Tensor) -> Tensor:
    return x * gate[:, :, None, None]


def ref_gated_spatial_pool(x: Tensor, gate: Tensor, split_ties: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """x: (N, C, H, W), gate: (N, C) -> pooled (N, 2, H, W) [mean, max], argmax, count (N, H, W)."""
    z = _gated(x, gate)
    mean = z.to(_acc_dtype(x.dtype)).mean(1).to(x.dtype)
    mx, argmax, count = _first_max(z, 1)
    return torch.stack([mean, mx], 1).contiguous(), argmax, count


def ref_cbam_apply(x: Tensor, ch_gate: Tensor, sp_gate: Tensor) -> Tensor:
    """x: (N, C, H, W), ch_gate: (N, C), sp_gate: (N, H, W) -> y (N, C, H, W)."""
    acc = _acc_dtype(x.dtype)
    y = x.to(acc) * ch_gate.to(acc)[:, :, None, None] * sp_gate.to(acc)[:, None]
    return y.to(x.dtype)


def ref_cbam_apply_backward(grad_y: Tensor, x: Tensor, ch_gate: Tensor, sp_gate: Tensor) -> tuple[Tensor, Tensor]:
    """-> grad_ch_gate (N, C), grad_sp_gate (N, H, W), accumulated in float32."""
    acc = _acc_dtype(x.dtype)
    gx = grad_y.to(acc) * x.to(acc)
    d_ch = (gx * sp_gate.to(acc)[:, None]).sum((2, 3))
    d_sp = (gx * ch_gate.to(acc)[:, :, None, None]).sum(1)
    return d_ch.to(ch_gate.dtype), d_sp.to(sp_gate.dtype)


def _max_weight(values: Tensor, mx: Tensor, argmax: Tensor, count: Tensor, dim: int, split_ties: bool) -> Tensor:
    """Share of the max's gradient that each position gets (float, broadcast over ``dim``)."""
    acc = _acc_dtype(values.dtype)
    if split_ties:
        mask = (values == mx.unsqueeze(dim)).to(acc)
        return mask / count.unsqueeze(dim).to(acc)  # 0/0 and x/0 give the NaN PyTorch gives
    size = values.shape[dim]
    idx = torch.arange(size, device=values.device).view([-1 if d == dim else 1 for d in range(values.dim())])
    return (idx == argmax.unsqueeze(dim)).to(acc)


def ref_gated_spatial_pool_backward_gate(grad_pooled: Tensor, x: Tensor, gate: Tensor, pooled: Tensor,
                                         argmax: Tensor, count: Tensor, split_ties: bool) -> Tensor:
    """-> grad_gate (N, C): sum over H, W of x * (grad_mean / C + w_max * grad_max)."""
    acc = _acc_dtype(x.dtype)
    z = _gated(x, gate)
    w = _max_weight(z, pooled[:, 1], argmax, count, 1, split_ties)
    gp = grad_pooled.to(acc)
    dz = gp[:, 0:1] / x.shape[1] + w * gp[:, 1:2]
    return (dz * x.to(acc)).sum((2, 3)).to(gate.dtype)


def ref_cbam_grad_x(x: Tensor, grad_y: Tensor | None, ch_gate: Tensor | None, sp_gate: Tensor | None,
                    grad_pooled: Tensor | None, pooled: Tensor | None, sp_argmax: Tensor | None,
                    sp_count: Tensor | None, grad_avg: Tensor | None, grad_max: Tensor | None,
                    ch_max: Tensor | None, ch_argmax: Tensor | None, ch_count: Tensor | None,
                    split_ties: bool) -> Tensor:
    """The x-sized gradient of the CBAM graph, the sum of the terms whose inputs are given:

    * ``grad_y`` (needs ch_gate, sp_gate):      grad_y * ch_gate * sp_gate
    * ``grad_pooled`` (needs ch_gate, pooled, sp_argmax, sp_count):
                                                ch_gate * (grad_pooled[:, 0] / C + w_sp * grad_pooled[:, 1])
    * ``grad_avg``:                             grad_avg / (H * W)
    * ``grad_max`` (needs ch_max, ch_argmax, ch_count): w_ch * grad_max
    where w_sp, w_ch are the tie weights (``_max_weight``) of the spatial and channel max.
    Accumulated in float32, written once in x.dtype with x's memory format.
    """
    acc = _acc_dtype(x.dtype)
    n, c, h, w = x.shape
    dx = torch.zeros(x.shape, dtype=acc, device=x.device)
    if grad_y is not None:
        dx = dx + grad_y.to(acc) * ch_gate.to(acc)[:, :, None, None] * sp_gate.to(acc)[:, None]
    if grad_pooled is not None:
        z = _gated(x, ch_gate)
        wsp = _max_weight(z, pooled[:, 1], sp_argmax, sp_count, 1, split_ties)
        gp = grad_pooled.to(acc)
        dx = dx + ch_gate.to(acc)[:, :, None, None] * (gp[:, 0:1] / c + wsp * gp[:, 1:2])
    if grad_avg is not None:
        dx = dx + grad_avg.to(acc)[:, :, None, None] / (h * w)
    if grad_max is not None:
        flat = x.flatten(2)
        wch = _max_weight(flat, ch_max, ch_argmax, ch_count, 2, split_ties)
        dx = dx + (wch * grad_max.to(acc)[:, :, None]).view(n, c, h, w)
    return dx.to(x.dtype).contiguous(memory_format=memory_format(x))



def ref_cbam_spatial_conv(x: Tensor, weight: Tensor, padding: list[int]) -> Tensor:
    """The spatial gate's conv: F.conv2d(x, weight, None, 1, padding) accumulated in float32 (float64
    for float64), rounded once to x.dtype. x: (N, 1 or 2, H, W), weight: (O, 1 or 2, kh, kw)."""
    acc = _acc_dtype(x.dtype)
    return F.conv2d(x.to(acc), weight.to(acc), None, 1, list(padding)).to(x.dtype)


def ref_cbam_spatial_conv_weight_grad(grad_out: Tensor, x: Tensor, kh: int, kw: int, padding: list[int]) -> Tensor:
    """The weight gradient of ref_cbam_spatial_conv: (O, I, kh, kw) in x.dtype, accumulated in float32."""
    acc = _acc_dtype(x.dtype)
    weight = x.new_empty(grad_out.shape[1], x.shape[1], kh, kw, dtype=acc)
    return torch.ops.aten.convolution_backward(grad_out.to(acc), x.to(acc), weight, None, [1, 1], list(padding),
                                               [1, 1], False, [0, 0], 1, [False, True, False])[1].to(x.dtype)


def ref_cbam_forward_eval(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                          conv_w: Tensor | None, bn_weight: Tensor | None, bn_bias: Tensor | None,
                          bn_mean: Tensor | None, bn_var: Tensor | None, bn_eps: float, padding: list[int],
                          light: bool, max_first: bool) -> Tensor:
    """The whole CBAM block at inference (BatchNorm on its running statistics), composed of the ops
    above and rounded where they round: channel pool -> shared MLP (w1 (hidden, C), w2 (C, hidden),
    or 1x1 convs' (., ., 1, 1); hidden may be 0) -> sigmoid = ch_gate; gated spatial pool -> conv
    input (light: 0.5 * mean + 0.5 * max; max_first: cat[max, mean]; else cat[mean, max]) -> conv ->
    BatchNorm -> sigmoid = sp_gate (all ones without conv_w); y = x * ch_gate * sp_gate."""
    n, _, h, w = x.shape
    avg, mx, _, _ = ref_channel_pool(x)
    mlp_in = 0.5 * avg + 0.5 * mx if light else torch.cat([avg, mx])
    mlp_out = F.linear(torch.relu(F.linear(mlp_in, w1.flatten(1), b1)), w2.flatten(1), b2)
    ch_gate = torch.sigmoid(mlp_out if light else mlp_out[:n] + mlp_out[n:])
    if conv_w is None:
        return ref_cbam_apply(x, ch_gate, x.new_ones(n, h, w))
    pooled, _, _ = ref_gated_spatial_pool(x, ch_gate)
    if light:
        sp_in = 0.5 * pooled[:, 0:1] + 0.5 * pooled[:, 1:2]
    else:
        sp_in = pooled.flip(1) if max_first else pooled
    conv = ref_cbam_spatial_conv(sp_in, conv_w, padding)
    normed = F.batch_norm(conv, bn_mean, bn_var, bn_weight, bn_bias, False, 0.0, bn_eps)
    return ref_cbam_apply(x, ch_gate, torch.sigmoid(normed).view(n, h, w))


def ref_cbam_forward_eval_(x: Tensor, *args) -> None:
    """ref_cbam_forward_eval written over x (the in-place op; same arguments)."""
    x.copy_(ref_cbam_forward_eval(x, *args))


# --------------------------------------------------------------------------
# Spatial attention
# --------------------------------------------------------------------------
def ref_spatial_attention_forward(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float) -> tuple[Tensor, Tensor]:
    """q: (N, Cq, Lq), k: (N, Cq, Lk), v: (N, Cv, Lk) -> out (N, Cv, Lq), lse (N, heads, Lq) float32."""
    acc = _acc_dtype(q.dtype)
    qh, kh, vh = (split_heads(t.to(acc), heads) for t in (q, k, v))
    logits = scale * (qh @ kh.transpose(-1, -2))  # (N, heads, Lq, Lk)
    lse = torch.logsumexp(logits, -1)
    out = torch.softmax(logits, -1) @ vh  # (N, heads, Lq, dv)
    n, _, lq = q.shape
    out = out.transpose(-1, -2).reshape(n, v.shape[1], lq).to(q.dtype)
    if channel_last_3d(q):
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        out = out.contiguous()
    return out, lse.to(torch.float32)


def ref_spatial_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                   heads: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv with the shape, dtype and strides of q, k, v: the exact gradient of
    ref_spatial_attention_forward, computed in float32 (float64 for float64) by autograd. `out` and
    `lse` are the forward's saved outputs, which the kernels use; the oracle recomputes instead."""
    acc = _acc_dtype(q.dtype)
    with torch.enable_grad():
        leaves = [t.detach().to(acc).requires_grad_() for t in (q, k, v)]
        qh, kh, vh = (split_heads(t, heads) for t in leaves)
        o = torch.softmax(scale * (qh @ kh.transpose(-1, -2)), -1) @ vh  # (N, heads, Lq, dv)
        o = o.transpose(-1, -2).reshape(grad_out.shape)
        grads = torch.autograd.grad(o, leaves, grad_out.to(acc))
    return tuple(torch.empty_like(t).copy_(g) for t, g in zip((q, k, v), grads))


# --------------------------------------------------------------------------
# Re-exports for code that imports the eager functions and the twin modules from here
# (fastattn.reference.OfficialCBAM, fastattn.reference.spatial_attention, ...); not the oracle.
# --------------------------------------------------------------------------
from fastattn.eager import cbam_apply, channel_pool, gated_spatial_pool, spatial_attention  # noqa: E402,F401
from fastattn.twins import (  # noqa: E402,F401
    QKV_LAYOUTS, AttentionBlock2d, BasicConv, ChannelPool, ConvBN, Flatten, NonLocal2d, OfficialCBAM,
    OfficialChannelGate, OfficialSpatialGate, SelfAttention2d, TimmCBAM, TimmChannelAttn, TimmNonLocalAttn,
    TimmSpatialAttn, make_divisible)

_memory_format = memory_format  # the tests' name for it
