"""A numpy model of the tensor-core attention's register choreography (no GPU needed).

The kernels in csrc/cuda/attention_mma/ cannot run here, so this replays their index maps against
the layouts the PTX ISA documents: ldmatrix (x4, plain and .trans) hands lane l of matrix i the
elements M_i[l // 4][2 (l % 4) + {0, 1}] (transposed: M_i[2 (l % 4) + {0, 1}][l // 4]), and
mma.m16n8k16 reads its A, B fragments and writes its C fragment as mma_utils.cuh's header lists.
The address arithmetic of load_fragment / SmemTile below mirrors the C++ line for line; an error in
either the C++ maps or their comments shows up as a wrong product here.
"""
from __future__ import annotations

import numpy as np
import pytest

LANES = range(32)


# ---- the C++ maps, mirrored ---------------------------------------------------------------------
def load_fragment(k_contiguous: bool, order_a: bool, buffer: np.ndarray, stride: int, row0: int, k0: int):
    """mma_utils.cuh load_fragment: per lane, the row address it hands ldmatrix and whether .trans."""
    addresses = []
    for lane in LANES:
        matrix, row_in_matrix = lane // 8, lane % 8
        rb = (matrix % 2) * 8 if order_a else (matrix // 2) * 8
        kb = (matrix // 2) * 8 if order_a else (matrix % 2) * 8
        if k_contiguous:
            addresses.append((row0 + rb + row_in_matrix) * stride + k0 + kb)
        else:
            addresses.append((k0 + kb + row_in_matrix) * stride + row0 + rb)
    return ldmatrix_x4(buffer, addresses, trans=not k_contiguous)


class SmemTile:
    """kernel_traits.cuh SmemTile: positions x channels, [channel][position] when l_contiguous."""

    def __init__(self, positions: int, channels: int, l_contiguous: bool):
        self.l_contiguous = l_contiguous
        rows, width = (channels, positions) if l_contiguous else (positions, channels)
        self.stride = width + 8
        self.buffer = np.full(rows * self.stride, np.nan)

    def offset(self, position, channel):
        return channel * self.stride + position if self.l_contiguous else position * self.stride + channel

    def fill(self, values: np.ndarray):  # values[position][channel]
        for p in range(values.shape[0]):
            for c in range(values.shape[1]):
                self.buffer[self.offset(p, c)] = values[p, c]

    def by_position(self, order_a, position0, channel0):
        return load_fragment(not self.l_contiguous, order_a, self.buffer, self.stride, position0, channel0)

    def by_channel(self, order_a, channel0, position0):
        return load_fragment(self.l_contiguous, order_a, self.buffer, self.stride, channel0, position0)


def accumulators_to_a(first, second):
    """mma_utils.cuh accumulators_to_a: per lane, a0..a3 as pairs."""
    return [[(f[0], f[1]), (f[2], f[3]), (s[0], s[1]), (s[2], s[3])] for f, s in zip(first, second)]


# ---- the documented hardware behaviour ----------------------------------------------------------
def ldmatrix_x4(buffer, addresses, trans):
    regs = [[None] * 4 for _ in LANES]
    for i in range(4):
        rows = [buffer[addresses[8 * i + r]: addresses[8 * i + r] + 8] for r in range(8)]
        m = np.array(rows)
        for lane in LANES:
            g, t = lane // 4, lane % 4
            regs[lane][i] = (m[2 * t, g], m[2 * t + 1, g]) if trans else (m[g, 2 * t], m[g, 2 * t + 1])
    return regs


def mma_16816(acc, a, b0, b1):
    """acc[lane] (4 floats) += A B, with A and B rebuilt from the fragments as the PTX ISA lays them out."""
    A, B = np.full((16, 16), np.nan), np.full((16, 8), np.nan)
    for lane in LANES:
        g, t = lane // 4, lane % 4
        for reg, (row, col) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            A[row, col], A[row, col + 1] = a[lane][reg]
        B[2 * t, g], B[2 * t + 1, g] = b0[lane]
        B[2 * t + 8, g], B[2 * t + 9, g] = b1[lane]
    C = A @ B
    for lane in LANES:
        g, t = lane // 4, lane % 4
        acc[lane] += np.array([C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]])


def gather(acc_blocks, rows=16):
    """Per-lane C fragments of n8 blocks -> the (16, 8 * blocks) matrix they hold."""
    out = np.zeros((rows, 8 * len(acc_blocks)))
    for nb, acc in enumerate(acc_blocks):
        for lane in LANES:
            g, t = lane // 4, lane % 4
            out[g, 8 * nb + 2 * t: 8 * nb + 2 * t + 2] = acc[lane][:2]
            out[g + 8, 8 * nb + 2 * t: 8 * nb + 2 * t + 2] = acc[lane][2:]
    return out


# ---- warp_gemm.cuh's two products, replayed -----------------------------------------------------
def gemm_by_position(x_tile, row0, y_tile, cols, channels):
    acc = [np.zeros((32, 4)) for _ in range(cols // 8)]
    for kk in range(0, channels, 16):
        a = x_tile.by_position(True, row0, kk)
        for nb2 in range(cols // 16):
            b = y_tile.by_position(False, 16 * nb2, kk)
            mma_16816(acc[2 * nb2], a, [r[0] for r in b], [r[1] for r in b])
            mma_16816(acc[2 * nb2 + 1], a, [r[2] for r in b], [r[3] for r in b])
    return acc


def gemm_weights(w_blocks, y_tile, channels):
    acc = [np.zeros((32, 4)) for _ in range(channels // 8)]
    for kk in range(len(w_blocks) // 2):
        a = accumulators_to_a(w_blocks[2 * kk], w_blocks[2 * kk + 1])
        for cb2 in range(channels // 16):
            b = y_tile.by_channel(False, 16 * cb2, 16 * kk)
            mma_16816(acc[2 * cb2], a, [r[0] for r in b], [r[1] for r in b])
            mma_16816(acc[2 * cb2 + 1], a, [r[2] for r in b], [r[3] for r in b])
    return acc


@pytest.mark.parametrize("l_contiguous", [True, False], ids=["nchw", "channels_last"])
def test_attention_products_of_one_warp(l_contiguous):
    """S = Q K^T (A and B read by position), then O = S V with S's accumulators as A and V read by
    channel: the forward's two products (and, with the roles renamed, the backward's four)."""
    rng = np.random.default_rng(0)
    rows, keys, d = 32, 32, 32  # a warp's rows start at 16: the tile's second warp
    q, k, v = rng.integers(-4, 5, (rows, d)), rng.integers(-4, 5, (keys, d)), rng.integers(-4, 5, (keys, d))
    q_tile, k_tile, v_tile = (SmemTile(t.shape[0], d, l_contiguous) for t in (q, k, v))
    for tile, values in zip((q_tile, k_tile, v_tile), (q, k, v)):
        tile.fill(values)
    s = gemm_by_position(q_tile, 16, k_tile, keys, d)
    np.testing.assert_array_equal(gather(s), q[16:32] @ k.T)
    o = gemm_weights(s, v_tile, d)
    np.testing.assert_array_equal(gather(o), q[16:32] @ k.T @ v)
