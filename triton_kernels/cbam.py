"""Triton kernels of the six CBAM ops of csrc/ops.cpp; the contract is fastattn.reference.ref_<op>.

Twin of csrc/cuda/cbam.cu (CUDA) and csrc/cpu/cbam_*.cpp (CPU). One launcher per op, named like the
op and taking the schema's positional arguments; each allocates the outputs with torch and launches
`_<op>_kernel`.

How x-sized tensors are read: as an (N, C, L) view, L = H*W, through its strides (sN, sC, sL), so
NCHW and channels_last are both read in place; only a tensor whose H and W cannot be flattened
into one stride is copied first. The tile of a program is 2-D, BLOCK along C by BLOCK along L, and
`_pick_tile` makes it wide along whichever of C and L is contiguous, so loads coalesce in both
layouts. Offsets are int64 (program ids are cast first): x may have more than 2^31 elements. All
grids put the large dimension on axis 0; axis 1, when used, is the split count (<= MAX_SPLITS).

Reductions run one pass over x. When the rows alone give too few programs for the GPU (CBAM's
7x7 stages), the reduced axis is split into chunks whose partial results go to a small float32
workspace that a second kernel folds in a fixed order: deterministic, no atomics.

Exactness: the product z = x * gate is rounded to x.dtype before the max and tie comparisons, as
eager PyTorch does, so argmax and tie counts match the reference bit for bit; sums accumulate in
float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastattn._layout import memory_format

# Tuning knobs, module-level so the tests can shrink them to force multi-tile loops and splits.
TILE_ELEMENTS = 2048  # elements per program tile: 4 warps x 16 per thread
MAX_CONTIGUOUS_BLOCK = 256  # widest block along the contiguous axis (16-byte loads for one warp)
NUM_WARPS = 4
PROGRAMS_PER_SM = 4  # reductions split their loop until about this many programs per SM exist
MIN_SPLIT_ELEMENTS = 64  # a split chunk covers at least this many elements of the reduced axis
MAX_SPLITS = 64

_INT32_MAX = tl.constexpr(2147483647)  # "no index yet" sentinel of the argmax accumulators


# --------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------
@triton.jit
def _store_pool_result(mean_ptr, max_ptr, arg_ptr, cnt_ptr, n, r, r_ok, R, out_n_stride, divisor,
                       row_sum, row_max, row_arg, row_cnt, row_first_nan):
    """Stores one block of max-pool rows; a NaN anywhere in a row wins (max NaN, its first index,
    no ties). Outputs are cast to their pointers' dtypes, so the same code writes the final
    outputs and the float32/int32 partials of a split reduction."""
    has_nan = row_first_nan < _INT32_MAX
    row_max = tl.where(has_nan, float("nan"), row_max)
    row_arg = tl.where(has_nan, row_first_nan, row_arg)
    row_cnt = tl.where(has_nan, 0, row_cnt)
    out = n * out_n_stride + r
    tl.store(mean_ptr + out, (row_sum / divisor).to(mean_ptr.dtype.element_ty), mask=r_ok)
    tl.store(max_ptr + out, row_max.to(max_ptr.dtype.element_ty), mask=r_ok)
    tl.store(arg_ptr + n * R + r, row_arg.to(arg_ptr.dtype.element_ty), mask=r_ok)
    tl.store(cnt_ptr + n * R + r, row_cnt.to(cnt_ptr.dtype.element_ty), mask=r_ok)


@triton.jit
def _pool_rows(x_ptr, gate_ptr, mean_ptr, max_ptr, arg_ptr, cnt_ptr,
               R, K, num_r_tiles, k_chunk, out_n_stride, split_stride, divisor,
               s_n, s_r, s_k, HAS_GATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Sum, max, first argmax and tie count along K of x viewed as (N, R, K), for the rows of one
    (n, R-tile) and the K-chunk of program_id(1). With HAS_GATE, reduces z = x * gate[n, k]."""
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    n = pid // num_r_tiles
    r = (pid % num_r_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    rows = x_ptr + n * s_n + r[:, None] * s_r
    # per-lane running state, folded across lanes once at the end
    lane_sum = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
    lane_max = tl.full((BLOCK_R, BLOCK_K), float("-inf"), tl.float32)
    lane_arg = tl.full((BLOCK_R, BLOCK_K), _INT32_MAX, tl.int32)
    lane_cnt = tl.zeros((BLOCK_R, BLOCK_K), tl.int32)
    lane_nan = tl.full((BLOCK_R, BLOCK_K), _INT32_MAX, tl.int32)
    k_begin = split * k_chunk
    for k0 in range(k_begin, tl.minimum(k_begin + k_chunk, K), BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        ok = r_ok[:, None] & k_ok[None, :]
        v = tl.load(rows + k[None, :] * s_k, mask=ok, other=0.0)
        if HAS_GATE:
            g = tl.load(gate_ptr + n * K + k, mask=k_ok, other=0.0)
            v = (v.to(tl.float32) * g.to(tl.float32)[None, :]).to(x_ptr.dtype.element_ty)  # rounded like eager
        v = v.to(tl.float32)
        k32 = k.to(tl.int32)[None, :]
        lane_sum += v
        lane_nan = tl.minimum(lane_nan, tl.where((v != v) & ok, k32, _INT32_MAX))
        bigger = (v > lane_max) & ok
        tie = (v == lane_max) & ok
        lane_arg = tl.where(bigger | (tie & (lane_cnt == 0)), k32, lane_arg)  # k grows: keeps the first
        lane_cnt = tl.where(bigger, 1, lane_cnt + tie.to(tl.int32))
        lane_max = tl.where(bigger, v, lane_max)
    row_max = tl.max(lane_max, axis=1)
    at_max = (lane_max == row_max[:, None]) & (lane_cnt > 0)
    row_cnt = tl.sum(tl.where(at_max, lane_cnt, 0), axis=1)
    row_arg = tl.min(tl.where(at_max, lane_arg, _INT32_MAX), axis=1)
    _store_pool_result(mean_ptr + split * split_stride, max_ptr + split * split_stride,
                       arg_ptr + split * split_stride, cnt_ptr + split * split_stride,
                       n, r, r_ok, R, out_n_stride, divisor,
                       tl.sum(lane_sum, axis=1), row_max, row_arg, row_cnt, tl.min(lane_nan, axis=1))


@triton.jit
def _pool_combine_kernel(part_sum, part_max, part_arg, part_cnt, mean_ptr, max_ptr, arg_ptr, cnt_ptr,
                         num_rows, R, num_splits, out_n_stride, divisor,
                         BLOCK_ROWS: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
    """Folds the (num_splits, N*R) partials of a split max pool, in split order, into the outputs."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    split = tl.arange(0, BLOCK_SPLITS)
    row_ok = row < num_rows
    ok = row_ok[:, None] & (split < num_splits)[None, :]
    at = split.to(tl.int64)[None, :] * num_rows + row[:, None]
    s = tl.load(part_sum + at, mask=ok, other=0.0)
    m = tl.load(part_max + at, mask=ok, other=float("-inf"))
    a = tl.load(part_arg + at, mask=ok, other=_INT32_MAX)
    c = tl.load(part_cnt + at, mask=ok, other=0)
    is_nan = m != m
    m = tl.where(is_nan, float("-inf"), m)
    row_max = tl.max(m, axis=1)
    at_max = (m == row_max[:, None]) & (c > 0)
    row_cnt = tl.sum(tl.where(at_max, c, 0), axis=1)
    row_arg = tl.min(tl.where(at_max, a, _INT32_MAX), axis=1)
    row_first_nan = tl.min(tl.where(is_nan, a, _INT32_MAX), axis=1)  # a NaN chunk's arg is its first NaN
    _store_pool_result(mean_ptr, max_ptr, arg_ptr, cnt_ptr, row // R, row % R, row_ok, R, out_n_stride,
                       divisor, tl.sum(s, axis=1), row_max, row_arg, row_cnt, row_first_nan)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, num_rows, num_parts, BLOCK_ROWS: tl.constexpr,
                         BLOCK_PARTS: tl.constexpr):
    """out[row] = sum over p of part[p, row], in p order; cast to out's dtype."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = row < num_rows
    acc = tl.zeros((BLOCK_PARTS, BLOCK_ROWS), tl.float32)
    for p0 in range(0, num_parts, BLOCK_PARTS):
        p = p0 + tl.arange(0, BLOCK_PARTS)
        ok = (p < num_parts)[:, None] & row_ok[None, :]
        acc += tl.load(part_ptr + p.to(tl.int64)[:, None] * num_rows + row[None, :], mask=ok, other=0.0)
    tl.store(out_ptr + row, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=row_ok)


# --------------------------------------------------------------------------
# Op kernels
# --------------------------------------------------------------------------
@triton.jit
def _channel_pool_kernel(x_ptr, mean_ptr, max_ptr, arg_ptr, cnt_ptr, C, L, num_c_tiles, l_chunk,
                         split_stride, divisor, s_n, s_c, s_l,
                         BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """avg, max, argmax, count over L of x: (N, C, L); rows are (n, c)."""
    _pool_rows(x_ptr, x_ptr, mean_ptr, max_ptr, arg_ptr, cnt_ptr, C, L, num_c_tiles, l_chunk, C, split_stride,
               divisor, s_n, s_c, s_l, False, BLOCK_C, BLOCK_L)


@triton.jit
def _gated_spatial_pool_kernel(x_ptr, gate_ptr, mean_ptr, max_ptr, arg_ptr, cnt_ptr, C, L, num_l_tiles, c_chunk,
                               out_n_stride, split_stride, divisor, s_n, s_c, s_l,
                               BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """mean, max, argmax, count over C of z = x * gate[n, c]; rows are (n, l)."""
    _pool_rows(x_ptr, gate_ptr, mean_ptr, max_ptr, arg_ptr, cnt_ptr, L, C, num_l_tiles, c_chunk, out_n_stride,
               split_stride, divisor, s_n, s_l, s_c, True, BLOCK_L, BLOCK_C)


@triton.jit
def _program_tile(C, L, num_c_tiles, num_l_tiles, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """(n, c, l, c_ok, l_ok, ok) of this program's BLOCK_C x BLOCK_L tile of an (N, C, L) map; programs
    count tiles along L, then along C, then along N."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // (num_c_tiles * num_l_tiles)
    tile = pid % (num_c_tiles * num_l_tiles)
    c = (tile // num_l_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    l = (tile % num_l_tiles) * BLOCK_L + tl.arange(0, BLOCK_L)
    c_ok = c < C
    l_ok = l < L
    return n, c, l, c_ok, l_ok, c_ok[:, None] & l_ok[None, :]


@triton.jit
def _cbam_apply_kernel(x_ptr, ch_ptr, sp_ptr, y_ptr, C, L, num_c_tiles, num_l_tiles,
                       x_s_n, x_s_c, x_s_l, y_s_n, y_s_c, y_s_l,
                       BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """y = x * ch_gate[n, c] * sp_gate[n, l] in float32, one tile per program."""
    n, c, l, c_ok, l_ok, ok = _program_tile(C, L, num_c_tiles, num_l_tiles, BLOCK_C, BLOCK_L)
    x = tl.load(x_ptr + n * x_s_n + c[:, None] * x_s_c + l[None, :] * x_s_l, mask=ok, other=0.0)
    ch = tl.load(ch_ptr + n * C + c, mask=c_ok, other=0.0).to(tl.float32)
    sp = tl.load(sp_ptr + n * L + l, mask=l_ok, other=0.0).to(tl.float32)
    y = x.to(tl.float32) * ch[:, None] * sp[None, :]
    tl.store(y_ptr + n * y_s_n + c[:, None] * y_s_c + l[None, :] * y_s_l, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _split_program(A, num_a_tiles, BLOCK_A: tl.constexpr):
    """(n, a_tile, a, a_ok, split) of a program of the split reductions over an (N, A, B) view: axis 0
    counts the BLOCK_A-wide tiles a of A, then N; axis 1 is the split of B."""
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    n = pid // num_a_tiles
    a_tile = pid % num_a_tiles
    a = a_tile * BLOCK_A + tl.arange(0, BLOCK_A)
    return n, a_tile, a, a < A, split


@triton.jit
def _cbam_apply_backward_kernel(gy_ptr, x_ptr, gate_a_ptr, gate_b_ptr, part_a_ptr, part_b_ptr,
                                N, A, B, num_a_tiles, b_chunk,
                                gy_s_n, gy_s_a, gy_s_b, x_s_n, x_s_a, x_s_b,
                                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """With gx = grad_y * x viewed as (N, A, B) (A, B = C, L or L, C; A is the tile's wide axis):
    part_a[split, n*A + a] = sum over this split's b of gx * gate_b[n, b], and
    part_b[a_tile, n*B + b] = sum over this a-tile of gx * gate_a[n, a]."""
    n, a_tile, a, a_ok, split = _split_program(A, num_a_tiles, BLOCK_A)
    gate_a = tl.load(gate_a_ptr + n * A + a, mask=a_ok, other=0.0).to(tl.float32)
    gy_rows = gy_ptr + n * gy_s_n + a[:, None] * gy_s_a
    x_rows = x_ptr + n * x_s_n + a[:, None] * x_s_a
    acc_a = tl.zeros((BLOCK_A, BLOCK_B), tl.float32)
    b_begin = split * b_chunk
    for b0 in range(b_begin, tl.minimum(b_begin + b_chunk, B), BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b_ok = b < B
        ok = a_ok[:, None] & b_ok[None, :]
        gy = tl.load(gy_rows + b[None, :] * gy_s_b, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_rows + b[None, :] * x_s_b, mask=ok, other=0.0).to(tl.float32)
        gx = gy * x
        gate_b = tl.load(gate_b_ptr + n * B + b, mask=b_ok, other=0.0).to(tl.float32)
        acc_a += gx * gate_b[None, :]
        part_b = tl.sum(gx * gate_a[:, None], axis=0)
        tl.store(part_b_ptr + a_tile * N * B + n * B + b,
                 part_b.to(part_b_ptr.dtype.element_ty), mask=b_ok)
    tl.store(part_a_ptr + split * N * A + n * A + a,
             tl.sum(acc_a, axis=1).to(part_a_ptr.dtype.element_ty), mask=a_ok)


@triton.jit
def _gated_spatial_pool_backward_gate_kernel(gp_ptr, x_ptr, gate_ptr, pmax_ptr, arg_ptr, cnt_ptr, out_ptr,
                                             C, L, num_c_tiles, l_chunk, split_stride,
                                             x_s_n, x_s_c, x_s_l, SPLIT_TIES: tl.constexpr,
                                             BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """out[split, n, c] = sum over this split's l of x * (gp[n, 0, l] / C + w[n, c, l] * gp[n, 1, l]),
    w the spatial max's tie weight; gp, pmax: (N, 2, L) contiguous, arg, cnt: (N, L) contiguous."""
    n, _, c, c_ok, split = _split_program(C, num_c_tiles, BLOCK_C)
    gate = tl.load(gate_ptr + n * C + c, mask=c_ok, other=0.0).to(tl.float32)
    x_rows = x_ptr + n * x_s_n + c[:, None] * x_s_c
    acc = tl.zeros((BLOCK_C, BLOCK_L), tl.float32)
    l_begin = split * l_chunk
    for l0 in range(l_begin, tl.minimum(l_begin + l_chunk, L), BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        l_ok = l < L
        ok = c_ok[:, None] & l_ok[None, :]
        x_raw = tl.load(x_rows + l[None, :] * x_s_l, mask=ok, other=0.0)
        x = x_raw.to(tl.float32)
        g_mean = tl.load(gp_ptr + n * 2 * L + l, mask=l_ok, other=0.0).to(tl.float32) / C
        g_max = tl.load(gp_ptr + n * 2 * L + L + l, mask=l_ok, other=0.0).to(tl.float32)
        if SPLIT_TIES:
            z = (x * gate[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
            pmax = tl.load(pmax_ptr + n * 2 * L + L + l, mask=l_ok, other=0.0).to(tl.float32)
            cnt = tl.load(cnt_ptr + n * L + l, mask=l_ok, other=1).to(tl.float32)
            w = (z == pmax[None, :]).to(tl.float32) / cnt[None, :]  # 0/0 = NaN like the reference
        else:
            arg = tl.load(arg_ptr + n * L + l, mask=l_ok, other=-1)
            w = (c[:, None] == arg[None, :]).to(tl.float32)
        dz = g_mean[None, :] + w * g_max[None, :]
        acc += tl.where(ok, dz * x, 0.0)
    tl.store(out_ptr + split * split_stride + n * C + c, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty),
             mask=c_ok)


@triton.jit
def _cbam_grad_x_kernel(x_ptr, gy_ptr, ch_ptr, sp_ptr, gp_ptr, pooled_ptr, sp_arg_ptr, sp_cnt_ptr,
                        gavg_ptr, gmax_ptr, ch_max_ptr, ch_arg_ptr, ch_cnt_ptr, dx_ptr,
                        C, L, num_c_tiles, num_l_tiles, x_s_n, x_s_c, x_s_l, gy_s_n, gy_s_c, gy_s_l,
                        dx_s_n, dx_s_c, dx_s_l,
                        HAS_GRAD_Y: tl.constexpr, HAS_GRAD_POOLED: tl.constexpr, HAS_GRAD_AVG: tl.constexpr,
                        HAS_GRAD_MAX: tl.constexpr, SPLIT_TIES: tl.constexpr, LOAD_X: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """dx = the sum of the CBAM gradient terms whose inputs are given (ref_cbam_grad_x), one tile per
    program. Small inputs are contiguous: (N, C), (N, L), (N, 2, L)."""
    n, c, l, c_ok, l_ok, ok = _program_tile(C, L, num_c_tiles, num_l_tiles, BLOCK_C, BLOCK_L)
    nc = n * C + c
    nl = n * L + l
    dx = tl.zeros((BLOCK_C, BLOCK_L), tl.float32)
    if LOAD_X:  # only the split_ties masks read x
        x = tl.load(x_ptr + n * x_s_n + c[:, None] * x_s_c + l[None, :] * x_s_l, mask=ok, other=0.0)
    if HAS_GRAD_Y or HAS_GRAD_POOLED:
        ch = tl.load(ch_ptr + nc, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_GRAD_Y:
        gy = tl.load(gy_ptr + n * gy_s_n + c[:, None] * gy_s_c + l[None, :] * gy_s_l, mask=ok, other=0.0)
        sp = tl.load(sp_ptr + nl, mask=l_ok, other=0.0).to(tl.float32)
        dx += gy.to(tl.float32) * ch[:, None] * sp[None, :]
    if HAS_GRAD_POOLED:
        g_mean = tl.load(gp_ptr + n * 2 * L + l, mask=l_ok, other=0.0).to(tl.float32) / C
        g_max = tl.load(gp_ptr + n * 2 * L + L + l, mask=l_ok, other=0.0).to(tl.float32)
        if SPLIT_TIES:
            z = (x.to(tl.float32) * ch[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
            pmax = tl.load(pooled_ptr + n * 2 * L + L + l, mask=l_ok, other=0.0).to(tl.float32)
            cnt = tl.load(sp_cnt_ptr + nl, mask=l_ok, other=1).to(tl.float32)
            w_sp = (z == pmax[None, :]).to(tl.float32) / cnt[None, :]
        else:
            arg = tl.load(sp_arg_ptr + nl, mask=l_ok, other=-1)
            w_sp = (c[:, None] == arg[None, :]).to(tl.float32)
        dx += ch[:, None] * (g_mean[None, :] + w_sp * g_max[None, :])
    if HAS_GRAD_AVG:
        dx += (tl.load(gavg_ptr + nc, mask=c_ok, other=0.0).to(tl.float32) / L)[:, None]
    if HAS_GRAD_MAX:
        g = tl.load(gmax_ptr + nc, mask=c_ok, other=0.0).to(tl.float32)
        if SPLIT_TIES:
            cmax = tl.load(ch_max_ptr + nc, mask=c_ok, other=0.0).to(tl.float32)
            cnt = tl.load(ch_cnt_ptr + nc, mask=c_ok, other=1).to(tl.float32)
            w_ch = (x.to(tl.float32) == cmax[:, None]).to(tl.float32) / cnt[:, None]
        else:
            arg = tl.load(ch_arg_ptr + nc, mask=c_ok, other=-1)
            w_ch = (l[None, :] == arg[:, None]).to(tl.float32)
        dx += w_ch * g[:, None]
    tl.store(dx_ptr + n * dx_s_n + c[:, None] * dx_s_c + l[None, :] * dx_s_l, dx.to(dx_ptr.dtype.element_ty),
             mask=ok)


# --------------------------------------------------------------------------
# Launcher helpers
# --------------------------------------------------------------------------
def _as_ncl(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H*W): a view when H and W flatten into one stride (NCHW,
    channels_last), else a contiguous copy."""
    n, c, h, w = t.shape
    return t.reshape(n, c, h * w)


def _small(t: torch.Tensor, *shape: int) -> torch.Tensor:
    """A gate/index/grad tensor as a contiguous (shape) tensor; these are 1/C or 1/L of x."""
    return t.reshape(shape).contiguous()


def _pick_tile(size_a: int, size_b: int, a_contiguous: bool) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_B) of about TILE_ELEMENTS, wide along the contiguous axis."""
    if a_contiguous:
        block_a = min(triton.next_power_of_2(size_a), MAX_CONTIGUOUS_BLOCK)
        return block_a, min(triton.next_power_of_2(size_b), max(1, TILE_ELEMENTS // block_a))
    block_b = min(triton.next_power_of_2(size_b), MAX_CONTIGUOUS_BLOCK)
    return min(triton.next_power_of_2(size_a), max(1, TILE_ELEMENTS // block_b)), block_b


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # interpreter runs: size splits as for an H100
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _pick_split(row_programs: int, length: int, block: int, device: torch.device) -> tuple[int, int]:
    """(num_splits, chunk) for a reduction over `length` in tiles of `block`, run by `row_programs`
    programs per split: split until the GPU has about PROGRAMS_PER_SM programs per SM."""
    num_tiles = triton.cdiv(length, block)
    want = triton.cdiv(PROGRAMS_PER_SM * _num_sms(device), max(row_programs, 1))
    most = triton.cdiv(num_tiles, triton.cdiv(MIN_SPLIT_ELEMENTS, block))
    tiles_per_split = triton.cdiv(num_tiles, max(1, min(want, most, MAX_SPLITS)))
    return triton.cdiv(num_tiles, tiles_per_split), tiles_per_split * block


def _sum_partials(part: torch.Tensor, out: torch.Tensor) -> None:
    """out (any shape, contiguous) = part (P, out.numel()) summed over P."""
    num_parts, num_rows = part.shape
    block_parts = min(triton.next_power_of_2(num_parts), 16)
    block_rows = max(16, min(1024, TILE_ELEMENTS // block_parts))
    _sum_partials_kernel[(triton.cdiv(num_rows, block_rows),)](part, out, num_rows, num_parts, block_rows,
                                                              block_parts, num_warps=NUM_WARPS)


def _max_pool(x_ncl: torch.Tensor, gate: torch.Tensor | None, mean: torch.Tensor, mx: torch.Tensor,
              arg: torch.Tensor, cnt: torch.Tensor, out_n_stride: int) -> None:
    """Shared launcher of channel_pool (gate None: rows (n, c), reduce L) and gated_spatial_pool
    (rows (n, l), reduce C); mean/max rows land at n * out_n_stride + row."""
    n, c, length = x_ncl.shape
    s_n, s_c, s_l = x_ncl.stride()
    if gate is None:
        rows, reduced, s_r, s_k = c, length, s_c, s_l
    else:
        rows, reduced, s_r, s_k = length, c, s_l, s_c
    if n * rows == 0:
        return
    block_r, block_k = _pick_tile(rows, reduced, s_r == 1 and s_k != 1)
    num_r_tiles = triton.cdiv(rows, block_r)
    num_splits, chunk = _pick_split(n * num_r_tiles, reduced, block_k, x_ncl.device)
    if num_splits == 1:
        outs, stride_n, split_stride, divisor = (mean, mx, arg, cnt), out_n_stride, 0, float(reduced)
    else:
        f32 = torch.empty((2, num_splits, n * rows), dtype=torch.float32, device=x_ncl.device)
        i32 = torch.empty((2, num_splits, n * rows), dtype=torch.int32, device=x_ncl.device)
        outs, stride_n, split_stride, divisor = (f32[0], f32[1], i32[0], i32[1]), rows, n * rows, 1.0
    grid = (n * num_r_tiles, num_splits)
    if gate is None:
        _channel_pool_kernel[grid](x_ncl, *outs, c, length, num_r_tiles, chunk, split_stride, divisor,
                                   s_n, s_c, s_l, block_r, block_k, num_warps=NUM_WARPS)
    else:
        _gated_spatial_pool_kernel[grid](x_ncl, gate, *outs, c, length, num_r_tiles, chunk, stride_n,
                                         split_stride, divisor, s_n, s_c, s_l, block_r, block_k,
                                         num_warps=NUM_WARPS)
    if num_splits > 1:
        block_splits = triton.next_power_of_2(num_splits)
        block_rows = max(16, TILE_ELEMENTS // block_splits)
        _pool_combine_kernel[(triton.cdiv(n * rows, block_rows),)](
            *outs, mean, mx, arg, cnt, n * rows, rows, num_splits, out_n_stride, float(reduced),
            block_rows, block_splits, num_warps=NUM_WARPS)


# --------------------------------------------------------------------------
# Launchers, one per op (schemas of csrc/ops.cpp)
# --------------------------------------------------------------------------
def channel_pool(x: torch.Tensor, split_ties: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """x: (N, C, H, W) -> avg, max (N, C) in x.dtype; argmax (N, C) int64 (first h*W+w of the max,
    first NaN wins); count (N, C) int32 ties of the max. split_ties only matters to the backward."""
    n, c = x.shape[:2]
    x_ncl = _as_ncl(x)
    avg = torch.empty((n, c), dtype=x.dtype, device=x.device)
    mx = torch.empty((n, c), dtype=x.dtype, device=x.device)
    arg = torch.empty((n, c), dtype=torch.int64, device=x.device)
    cnt = torch.empty((n, c), dtype=torch.int32, device=x.device)
    _max_pool(x_ncl, None, avg, mx, arg, cnt, c)
    return avg, mx, arg, cnt


def gated_spatial_pool(x: torch.Tensor, gate: torch.Tensor,
                       split_ties: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (N, C, H, W), gate: (N, C) -> pooled (N, 2, H, W) contiguous [mean, max] over C of
    z = x * gate (z rounded to x.dtype); argmax (N, H, W) int64; count (N, H, W) int32.
    split_ties only matters to the backward."""
    n, c, h, w = x.shape
    x_ncl = _as_ncl(x)
    pooled = torch.empty((n, 2, h, w), dtype=x.dtype, device=x.device)
    arg = torch.empty((n, h, w), dtype=torch.int64, device=x.device)
    cnt = torch.empty((n, h, w), dtype=torch.int32, device=x.device)
    flat = pooled.view(n, 2 * h * w)
    _max_pool(x_ncl, _small(gate, n, c), flat, flat[:, h * w:], arg, cnt, 2 * h * w)
    return pooled, arg, cnt


def cbam_apply(x: torch.Tensor, ch_gate: torch.Tensor, sp_gate: torch.Tensor) -> torch.Tensor:
    """x: (N, C, H, W), ch_gate: (N, C), sp_gate: (N, H, W) or (N, 1, H, W) -> y = x * ch_gate * sp_gate,
    computed in float32, in x's dtype and memory format."""
    n, c, h, w = x.shape
    length = h * w
    x_ncl = _as_ncl(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    if y.numel() == 0:
        return y
    y_ncl = y.view(n, c, length)
    block_c, block_l = _pick_tile(c, length, y_ncl.stride(1) == 1 and length > 1)
    num_c_tiles, num_l_tiles = triton.cdiv(c, block_c), triton.cdiv(length, block_l)
    _cbam_apply_kernel[(n * num_c_tiles * num_l_tiles,)](
        x_ncl, _small(ch_gate, n, c), _small(sp_gate, n, length), y_ncl, c, length, num_c_tiles, num_l_tiles,
        *x_ncl.stride(), *y_ncl.stride(), block_c, block_l, num_warps=NUM_WARPS)
    return y


def cbam_apply_backward(grad_y: torch.Tensor, x: torch.Tensor, ch_gate: torch.Tensor,
                        sp_gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> grad_ch_gate (N, C) = sum over H, W of grad_y * x * sp_gate, in ch_gate.dtype;
    grad_sp_gate (N, H, W) = sum over C of grad_y * x * ch_gate, in sp_gate.dtype."""
    n, c, h, w = x.shape
    length = h * w
    gy_ncl, x_ncl = _as_ncl(grad_y), _as_ncl(x)
    grad_ch = torch.empty((n, c), dtype=ch_gate.dtype, device=x.device)
    grad_sp = torch.empty((n, h, w), dtype=sp_gate.dtype, device=x.device)
    if x.numel() == 0:
        return grad_ch.zero_(), grad_sp.zero_()
    ch, sp = _small(ch_gate, n, c), _small(sp_gate, n, length)
    # A is the axis the tile is wide along (the contiguous one), B the axis each program loops over
    if x_ncl.stride(1) == 1 and length > 1:  # channels_last
        sizes, gates, outs = (c, length), (ch, sp), [grad_ch, grad_sp]
        gy_strides, x_strides = gy_ncl.stride(), x_ncl.stride()
    else:
        sizes, gates, outs = (length, c), (sp, ch), [grad_sp, grad_ch]
        gy_strides = (gy_ncl.stride(0), gy_ncl.stride(2), gy_ncl.stride(1))
        x_strides = (x_ncl.stride(0), x_ncl.stride(2), x_ncl.stride(1))
    size_a, size_b = sizes
    block_a, block_b = _pick_tile(size_a, size_b, True)
    num_a_tiles = triton.cdiv(size_a, block_a)
    num_splits, chunk = _pick_split(n * num_a_tiles, size_b, block_b, x.device)
    # partials are written straight into an output when nothing is left to fold
    part_a = outs[0].view(1, -1) if num_splits == 1 else torch.empty(
        (num_splits, n * size_a), dtype=torch.float32, device=x.device)
    part_b = outs[1].view(1, -1) if num_a_tiles == 1 else torch.empty(
        (num_a_tiles, n * size_b), dtype=torch.float32, device=x.device)
    _cbam_apply_backward_kernel[(n * num_a_tiles, num_splits)](
        gy_ncl, x_ncl, gates[0], gates[1], part_a, part_b, n, size_a, size_b, num_a_tiles, chunk,
        *gy_strides, *x_strides, block_a, block_b, num_warps=NUM_WARPS)
    if num_splits > 1:
        _sum_partials(part_a, outs[0])
    if num_a_tiles > 1:
        _sum_partials(part_b, outs[1])
    return grad_ch, grad_sp


def gated_spatial_pool_backward_gate(grad_pooled: torch.Tensor, x: torch.Tensor, gate: torch.Tensor,
                                     pooled: torch.Tensor, argmax: torch.Tensor, count: torch.Tensor,
                                     split_ties: bool) -> torch.Tensor:
    """-> grad_gate (N, C) in gate.dtype: sum over H, W of x * (grad_mean / C + w_max * grad_max),
    w_max = mask / count (split_ties) or [c == argmax]."""
    n, c, h, w = x.shape
    length = h * w
    x_ncl = _as_ncl(x)
    grad_gate = torch.empty((n, c), dtype=gate.dtype, device=x.device)
    if n * c == 0:
        return grad_gate
    channels_last = x_ncl.stride(1) == 1 and length > 1
    block_c, block_l = _pick_tile(c, length, channels_last)
    num_c_tiles = triton.cdiv(c, block_c)
    num_splits, chunk = _pick_split(n * num_c_tiles, length, block_l, x.device)
    part = grad_gate if num_splits == 1 else torch.empty((num_splits, n * c), dtype=torch.float32,
                                                         device=x.device)
    _gated_spatial_pool_backward_gate_kernel[(n * num_c_tiles, num_splits)](
        _small(grad_pooled, n, 2, length), x_ncl, _small(gate, n, c), _small(pooled, n, 2, length),
        _small(argmax, n, length), _small(count, n, length), part, c, length, num_c_tiles, chunk, n * c,
        *x_ncl.stride(), bool(split_ties), block_c, block_l, num_warps=NUM_WARPS)
    if num_splits > 1:
        _sum_partials(part, grad_gate)
    return grad_gate


def cbam_grad_x(x: torch.Tensor, grad_y: torch.Tensor | None, ch_gate: torch.Tensor | None,
                sp_gate: torch.Tensor | None, grad_pooled: torch.Tensor | None, pooled: torch.Tensor | None,
                sp_argmax: torch.Tensor | None, sp_count: torch.Tensor | None, grad_avg: torch.Tensor | None,
                grad_max: torch.Tensor | None, ch_max: torch.Tensor | None, ch_argmax: torch.Tensor | None,
                ch_count: torch.Tensor | None, split_ties: bool) -> torch.Tensor:
    """The x-sized gradient of the CBAM graph (ref_cbam_grad_x): the sum of the terms whose
    inputs are given, in float32, written once in x's dtype and memory format."""
    n, c, h, w = x.shape
    length = h * w
    x_ncl = _as_ncl(x)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    if dx.numel() == 0:
        return dx
    dx_ncl = dx.view(n, c, length)
    gy_ncl = _as_ncl(grad_y) if grad_y is not None else x_ncl
    unused = x_ncl  # stands in for absent tensors; the kernel never reads it
    ch = _small(ch_gate, n, c) if ch_gate is not None else unused
    sp = _small(sp_gate, n, length) if grad_y is not None else unused
    gp = _small(grad_pooled, n, 2, length) if grad_pooled is not None else unused
    pool = _small(pooled, n, 2, length) if grad_pooled is not None and split_ties else unused
    sp_arg = _small(sp_argmax, n, length) if grad_pooled is not None and not split_ties else unused
    sp_cnt = _small(sp_count, n, length) if grad_pooled is not None and split_ties else unused
    g_avg = _small(grad_avg, n, c) if grad_avg is not None else unused
    g_max = _small(grad_max, n, c) if grad_max is not None else unused
    c_max = _small(ch_max, n, c) if grad_max is not None and split_ties else unused
    c_arg = _small(ch_argmax, n, c) if grad_max is not None and not split_ties else unused
    c_cnt = _small(ch_count, n, c) if grad_max is not None and split_ties else unused
    block_c, block_l = _pick_tile(c, length, dx_ncl.stride(1) == 1 and length > 1)
    num_c_tiles, num_l_tiles = triton.cdiv(c, block_c), triton.cdiv(length, block_l)
    _cbam_grad_x_kernel[(n * num_c_tiles * num_l_tiles,)](
        x_ncl, gy_ncl, ch, sp, gp, pool, sp_arg, sp_cnt, g_avg, g_max, c_max, c_arg, c_cnt, dx_ncl,
        c, length, num_c_tiles, num_l_tiles, *x_ncl.stride(), *gy_ncl.stride(), *dx_ncl.stride(),
        grad_y is not None, grad_pooled is not None, grad_avg is not None, grad_max is not None,
        bool(split_ties), bool(split_ties) and (grad_pooled is not None or grad_max is not None),
        block_c, block_l, num_warps=NUM_WARPS)
    return dx
