"""The functional API: fused CBAM primitives and spatial attention.

Every function validates its arguments (ValueError/TypeError naming the
argument and the shapes), picks a backend (`backend="auto"` falls back to the
next one that can run the case; `fastattn.explain` tells which and why) and
calls a registered op, so autograd, `torch.compile` and `opcheck` all work.
Under torch.autocast the inputs first get the dtypes eager PyTorch would give
them (fastattn._autocast): attention runs in the autocast dtype, as bmm does;
the CBAM primitives promote mixed inputs, as `x * gate` does.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastattn import _autocast, _ops  # noqa: F401  (_ops registers fake kernels, autograd, autocast)
from fastattn import eager
from fastattn._backend import choose
from fastattn._ops import kernels_for
from fastattn._validate import check_attention, check_cbam

TIES = ("split", "first")


def _split_ties(ties: str) -> bool:
    if ties not in TIES:
        raise ValueError(f"ties must be 'split' (timm, amax) or 'first' (official CBAM, max_pool2d), got {ties!r}")
    return ties == "split"


def _cbam_backend(x: Tensor, backend: str, op: str) -> str:
    name, _ = choose("cbam", x.device, x.dtype, backend, op)
    # empty batches go through PyTorch: nothing to fuse, and every kernel is spared the edge case
    return "reference" if x.numel() == 0 else name


def channel_pool(x: Tensor, *, ties: str = "split", backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Average and max over H, W in one read of x.

    x: (N, C, H, W) -> (avg, max), each (N, C). `ties` sets where the gradient of
    a max goes when several positions hold it: "split" evenly among them (timm's
    `amax`), "first" all to the first (official CBAM's `max_pool2d`).
    """
    split = _split_ties(ties)
    check_cbam(x)
    name = _cbam_backend(x, backend, "channel_pool")
    if name == "reference":
        if split:
            return eager.channel_pool(x)
        return x.mean((2, 3)), torch.nn.functional.adaptive_max_pool2d(x, 1).flatten(1)
    avg, mx, _, _ = kernels_for(name).channel_pool(x, split)
    return avg, mx


def gated_spatial_pool(x: Tensor, ch_gate: Tensor, *, ties: str = "split", backend: str = "auto") -> Tensor:
    """Mean and max over channels of x * ch_gate, without writing that product.

    x: (N, C, H, W), ch_gate: (N, C) or (N, C, 1, 1) -> (N, 2, H, W), [:, 0] mean, [:, 1] max.
    """
    split = _split_ties(ties)
    x, ch_gate = _autocast.apply(_autocast.promote, x, ch_gate)
    ch_gate, _ = check_cbam(x, ch_gate)
    name = _cbam_backend(x, backend, "gated_spatial_pool")
    if name == "reference":
        if split:
            return eager.gated_spatial_pool(x, ch_gate)
        z = x * ch_gate[:, :, None, None]
        return torch.stack([z.mean(1), z.max(1)[0]], 1)
    pooled, _, _ = kernels_for(name).gated_spatial_pool(x, ch_gate.contiguous(), split)
    return pooled


def cbam_apply(x: Tensor, ch_gate: Tensor, sp_gate: Tensor, *, backend: str = "auto") -> Tensor:
    """y = x * ch_gate[n, c] * sp_gate[n, h, w] in one pass; y keeps x's memory format.

    x: (N, C, H, W), ch_gate: (N, C) or (N, C, 1, 1), sp_gate: (N, 1, H, W) or (N, H, W).
    """
    x, ch_gate, sp_gate = _autocast.apply(_autocast.promote, x, ch_gate, sp_gate)
    ch_gate, sp_gate = check_cbam(x, ch_gate, sp_gate)
    name = _cbam_backend(x, backend, "cbam_apply")
    if name == "reference":
        return eager.cbam_apply(x, ch_gate, sp_gate)
    return kernels_for(name).cbam_apply(x, ch_gate.contiguous(), sp_gate.contiguous())


def _as_3d(t: Tensor) -> Tensor:
    # (N, C, H, W) -> (N, C, H*W): a view for contiguous and channels_last maps
    return t if t.dim() == 3 else t.flatten(2)


def spatial_attention(q: Tensor, k: Tensor, v: Tensor, *, heads: int = 1, scale: float | None = None,
                      backend: str = "auto") -> Tensor:
    """softmax(scale * Q^T K) V over the positions of feature maps, flash-style.

    q: (N, Cq, Hq, Wq), k: (N, Cq, Hk, Wk), v: (N, Cv, Hk, Wk) -> (N, Cv, Hq, Wq);
    or 3-D (N, C, L). Head h uses channels [h*Cq/heads, (h+1)*Cq/heads) of q and k and
    the matching slice of v. scale=None means (Cq/heads) ** -0.5. Inputs of any
    strides are read in place; the output's memory format follows q. The
    Lq x Lk matrix is never materialised (except by backend="reference").
    Under torch.autocast, float32/16 inputs are cast to the autocast dtype, as for bmm.
    """
    q, k, v = _autocast.apply(_autocast.lower_precision, q, k, v)
    check_attention(q, k, v, heads)
    if scale is None:
        scale = (q.shape[1] // heads) ** -0.5
    name, _ = choose("attention", q.device, q.dtype, backend)
    if name == "reference" or q.numel() == 0:
        return eager.spatial_attention(q, k, v, heads=heads, scale=scale)
    out, _ = kernels_for(name).spatial_attention_forward(_as_3d(q), _as_3d(k), _as_3d(v), heads, float(scale))
    return out.view(q.shape[0], v.shape[1], *q.shape[2:])
