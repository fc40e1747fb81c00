"""The public functions written the plain eager way: what `backend="reference"` runs, and the
"eager" provider of the benchmark. Their autograd is PyTorch's; the max pools take `amax`'s
gradient rule (split evenly among ties).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn._layout import split_heads


def channel_pool(x: Tensor) -> tuple[Tensor, Tensor]:
    """x: (N, C, H, W) -> (avg, max), each (N, C); max gradients split among ties (amax)."""
    return x.mean((2, 3)), x.amax((2, 3))


def gated_spatial_pool(x: Tensor, ch_gate: Tensor) -> Tensor:
    """x: (N, C, H, W), ch_gate: (N, C) -> (N, 2, H, W): mean and max over C of x * ch_gate."""
    z = x * ch_gate[:, :, None, None]
    return torch.cat([z.mean(1, keepdim=True), z.amax(1, keepdim=True)], 1)


def cbam_apply(x: Tensor, ch_gate: Tensor, sp_gate: Tensor) -> Tensor:
    """x: (N, C, H, W), ch_gate: (N, C), sp_gate: (N, 1, H, W) or (N, H, W) -> x * ch_gate * sp_gate."""
    if sp_gate.dim() == 3:
        sp_gate = sp_gate.unsqueeze(1)
    return x * ch_gate[:, :, None, None] * sp_gate


def spatial_attention(q: Tensor, k: Tensor, v: Tensor, *, heads: int = 1, scale: float | None = None) -> Tensor:
    """Eager bmm-softmax-bmm. q: (N, Cq, Hq, Wq) or (N, Cq, Lq); k: (N, Cq, ...); v: (N, Cv, ...)."""
    spatial_q = q.shape[2:]
    n, cq = q.shape[:2]
    cv = v.shape[1]
    if scale is None:
        scale = (cq // heads) ** -0.5
    qh = split_heads(q.flatten(2), heads)  # flatten, not reshape(n, c, -1): that fails on empty batches
    kh = split_heads(k.flatten(2), heads)
    vh = split_heads(v.flatten(2), heads)
    attn = torch.softmax(scale * (qh @ kh.transpose(-1, -2)), -1)
    out = (attn @ vh).transpose(-1, -2).reshape(n, cv, *spatial_q)
    return out
