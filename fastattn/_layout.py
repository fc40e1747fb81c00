"""Layout helpers shared by the kernels' Python side, the eager functions and the oracle."""
from __future__ import annotations

import torch
from torch import Tensor


def memory_format(x: Tensor) -> torch.memory_format:
    """The memory format an output of x's shape keeps: channels_last when x is stored so (and is not
    also plain contiguous), else contiguous. Every CBAM op's x-sized output follows it."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def channel_last_3d(t: Tensor) -> bool:
    """(N, C, L) stored with C innermost: attention outputs then take that layout too."""
    return t.stride(1) == 1 and t.shape[1] > 1


def split_heads(t: Tensor, heads: int) -> Tensor:
    """(N, C, L) -> (N, heads, L, C // heads)."""
    n, c, length = t.shape
    return t.reshape(n, heads, c // heads, length).transpose(-1, -2)
