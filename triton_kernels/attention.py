"""Triton flash attention over the positions of NCHW feature maps (spatial attention).

Launchers named like the ops of csrc/ops.cpp (contract: fastattn.reference.ref_spatial_attention_forward):

* ``spatial_attention_forward(q, k, v, heads, scale) -> (out, lse)``
* ``spatial_attention_backward(grad_out, q, k, v, out, lse, heads, scale) -> (dq, dk, dv)``

q: (N, Cq, Lq), k: (N, Cq, Lk), v: (N, Cv, Lk) with any strides, read in place: every tile is a
pointer block built from the tensor's own strides, so contiguous (N, C, L) and channel-last
(stride(1) == 1) inputs, and channel slices of a fused qkv tensor, need no copy. Head h uses channels
[h*d_qk, (h+1)*d_qk) of q/k and [h*d_v, (h+1)*d_v) of v.

Flash scheme: the forward keeps a running max and sum per query row (online softmax) and saves only
out and the natural-log lse; the backward recomputes the probabilities from lse in three kernels:
delta = rowsum(dO * O), then one program per key block for dk/dv (looping over query blocks) and one
program per query block for dq (looping over key blocks). No atomics, so a given tile config always
gives the same bits; the autotuner picks the config by timing, in each process, so two processes (or
DDP ranks) may sum in other orders. FASTATTN_TRITON_AUTOTUNE=0 pins the preferred config that fits
(for float32 one picked to avoid register spills, see _FLOAT32_FIRST).

Numerics: dots accumulate in float32. Logits stay in natural units (dot * scale, rounded as the eager
formula rounds them); the row max (forward) or lse (backward) is subtracted before the exponent is
scaled to base 2, so that scaling rounds only the small difference, not the logit; logits of magnitude
1e4 stay finite. float16/bfloat16 inputs feed the probabilities to the second dot in the input dtype,
as every flash kernel does. float32 inputs use ``input_precision="ieee"`` (TF32 would give ~1e-3
relative error, far beyond the error rule of docs/DESIGN.md §4); Triton computes such a dot as one
FMA chain per output, whose rounding grows like sqrt(d_qk) units, so the float32 test rule allows
sqrt(d_qk) units of atol (measured on an H100: up to ~4.5x cuBLAS's float32 error at d_qk = 512,
~1e-6 relative).

Variant triton_attention_v2 (fastattn._verified; 16-bit inputs, off until it passes on a GPU): kernels
with the head dims and the divisibility of the lengths as compile-time facts, unmasked full tiles,
16-byte loads at every layout (inputs whose strides allow none are copied to a padded pitch), the scale
folded into the exponent's FMA and 64-row tiles up to d = 512; docs/gpu-static-contract.md has the
compiled code before and after. The static contract (tests/test_gpu_static_contract.py) compiles both.

Grid: axis 0 counts query (or key) blocks, so lengths past 65 535 work; batch*heads goes on axis 1 and
folds onto axis 2 past the 65 535 limit of those axes. Offsets are int64 before they meet a stride.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from fastattn import _verified

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
LOG2E = tl.constexpr(1.4426950408889634)
# Largest size of grid axes 1 and 2 (CUDA); a module attribute so a test can shrink it to exercise the fold.
_MAX_GRID_YZ = 65535
_MAX_HEAD_DIM = 512
# FASTATTN_TRITON_AUTOTUNE=0 skips benchmarking and runs the preferred config that fits (quick compiles).
_AUTOTUNE = os.environ.get("FASTATTN_TRITON_AUTOTUNE", "1") != "0"


# --------------------------------------------------------------------------
# Block-size choice
# --------------------------------------------------------------------------
def _block_d(d: int) -> int:
    """Head dim padded to a power of two (masked), at least 16 because tl.dot needs K >= 16."""
    return max(16, triton.next_power_of_2(d))


def _length_bucket(length: int) -> int:
    """Autotune key for a length: configs are re-tuned per bucket, not per exact length."""
    for bucket in (64, 256, 1024, 4096):
        if length <= bucket:
            return bucket
    return 16384


# Autotune key for the memory layout of the inputs.
LAYOUT_POSITIONS_CONTIGUOUS = 0  # contiguous NCHW, (N, C, L) with stride(2) == 1
LAYOUT_CHANNELS_CONTIGUOUS = 1  # channels_last, stride(1) == 1
LAYOUT_OTHER = 2  # neither, or inputs that disagree


def _layout_key(*tensors: torch.Tensor) -> int:
    """Autotune key for the layout of (N, C, L) inputs: tiles load coalesced along the contiguous axis,
    positions for NCHW and channels for channels_last, so the fastest tile shape differs between them.
    Positions are checked first so that a tensor with L == 1 (both strides 1) counts as NCHW."""
    if all(t.stride(2) == 1 for t in tensors):
        return LAYOUT_POSITIONS_CONTIGUOUS
    if all(t.stride(1) == 1 for t in tensors):
        return LAYOUT_CHANNELS_CONTIGUOUS
    return LAYOUT_OTHER


# (BLOCK_M, BLOCK_N, num_warps, num_stages), in order of preference for 16-bit inputs: with autotuning off
# (FASTATTN_TRITON_AUTOTUNE=0) the first one that survives pruning runs. BLOCK_M is the query block,
# BLOCK_N the key block; forward and dq keep a query block resident and stream key blocks, dk/dv the reverse.
# The last entry of each list is there for float32 at large head dims (see _FLOAT32_FIRST).
_CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2), (32, 16, 8, 1), (32, 16, 4, 1),
            (16, 16, 4, 1), (16, 16, 8, 1)],
    "dq": [(128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 8, 1), (32, 16, 4, 1),
           (16, 16, 4, 1), (16, 16, 8, 1)],
    "dkdv": [(32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 8, 1), (16, 32, 4, 1),
             (16, 16, 4, 1), (16, 16, 16, 1)],
}
# Variant triton_attention_v2 (16-bit inputs only): the same lists plus 8-warp tiles of 64 query rows for
# head dims 256 and 512 (wgmma on Hopper needs 64-row tiles) and the few configs _V2_FIRST names.
_CANDIDATES.update({
    "fwd_v2": _CANDIDATES["fwd"][:4] + [(64, 32, 8, 2), (64, 16, 8, 2)] + _CANDIDATES["fwd"][4:],
    "dq_v2": _CANDIDATES["dq"][:3] + [(64, 32, 8, 2), (64, 16, 8, 2), (32, 16, 8, 2)] + _CANDIDATES["dq"][3:],
    "dkdv_v2": _CANDIDATES["dkdv"][:1] + [(32, 64, 8, 2)] + _CANDIDATES["dkdv"][1:] + [(16, 16, 8, 2)],
})
_RESIDENT_BLOCK = {"fwd": "BLOCK_M", "dq": "BLOCK_M", "dkdv": "BLOCK_N",
                   "fwd_v2": "BLOCK_M", "dq_v2": "BLOCK_M", "dkdv_v2": "BLOCK_N"}

# The preferred config for float32, per kernel and padded head dim (max of BLOCK_DQK, BLOCK_DV). float32
# dots (input_precision="ieee") are FMA chains on CUDA cores that keep whole tiles in registers, so the
# 16-bit favourites spill: ptxas reports e.g. 748 bytes of spill stores for the forward at BLOCK_D 64 in
# (128, 64, 8, 3), ~20 KB for dq at BLOCK_D 64 in (64, 64, 4, 2). Each entry is the first candidate, in
# the order above, with tiles of at most 64 rows (so that every length bucket keeps it) that ptxas
# compiled with 0 bytes of spill stores (Triton 3.8, sm_90a) for NCHW, channels_last and other strides,
# lengths 4096 and 4097, head dims BLOCK_D and a smaller non-multiple of 16, and one head dim much
# smaller than the other. At BLOCK_D 512 no candidate got there for the forward and dk/dv: these entries
# spill least, 92 and 140 bytes for NCHW inputs whose length is not a multiple of 16 (scalar, masked
# loads) and 8 to 48 bytes for mixed head dims such as (80, 320); the old choice spilled up to 1544 and
# 1400. Autotuning still times every candidate.
_FLOAT32_FIRST = {
    "fwd": {16: (32, 16, 8, 1), 32: (32, 16, 8, 1), 64: (32, 16, 8, 1), 128: (32, 16, 8, 1),
            256: (16, 16, 8, 1), 512: (16, 16, 8, 1)},
    "dq": {16: (32, 16, 8, 1), 32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (32, 16, 8, 1),
           256: (32, 16, 8, 1), 512: (16, 16, 8, 1)},
    "dkdv": {16: (32, 64, 4, 2), 32: (32, 32, 4, 2), 64: (16, 32, 8, 1), 128: (16, 16, 4, 1),
             256: (16, 32, 8, 1), 512: (16, 16, 16, 1)},
}


def _tile_limits(block_d: int, element_size: int) -> tuple[int, int]:
    """Largest (resident, streamed) block rows whose tiles of width block_d fit registers and shared
    memory (227 KB on H100; float32 tiles take twice the bytes of 16-bit ones)."""
    width = block_d * element_size // 2
    if width <= 64:
        return 128, 128
    if width <= 128:
        return 128, 64
    if width <= 256:
        return 64, 32
    if width <= 512:
        return 32, 16
    return 16, 16


# The preferred config of variant triton_attention_v2 where it is not the first candidate that fits, per
# kernel and padded head dim: chosen from sm_90 compiles (Triton 3.8) as the one with wgmma where a
# config without spills has it, and cp.async, 16-byte loads and no spills (tests/test_gpu_static_contract.py
# holds them to that). At 512 no 64-row dq or dk/dv tile compiled without spilling.
_V2_FIRST = {
    "fwd_v2": {512: (64, 32, 8, 2)},
    "dq_v2": {256: (64, 32, 8, 2), 512: (32, 16, 8, 2)},
    "dkdv_v2": {256: (32, 64, 8, 2), 512: (16, 16, 8, 2)},
}


def _tile_limits_v2(kernel: str, block_d: int, element_size: int) -> tuple[int, int]:
    """_tile_limits, but 64 query rows for the v2 forward at block_d 512: it splits d_v in two programs."""
    if kernel == "fwd_v2" and element_size == 2 and block_d == 512:
        return 64, 32
    return _tile_limits(block_d, element_size)


def _loads_16_bytes(config: triton.Config, streamed_name: str, block_d: int) -> bool:
    """Whether every thread's share of a streamed 16-bit tile is at least 8 elements (one 16-byte load)."""
    return config.kwargs[streamed_name] * block_d >= 8 * 32 * config.num_warps


def _configs(kernel: str) -> list[triton.Config]:
    """Autotune candidates; one small config under the interpreter, where tuning is slow."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in _CANDIDATES[kernel]]


def _config_tuple(config: triton.Config) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), the form of _CANDIDATES."""
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _config_pruner(kernel: str):
    resident_name = _RESIDENT_BLOCK[kernel]
    streamed_name = "BLOCK_N" if resident_name == "BLOCK_M" else "BLOCK_M"

    def prune(configs, named_args, **kwargs):
        """Keep tiles that fit the head dim and are not longer than the sequence needs, preferred first."""
        args = {**named_args, **kwargs}
        block_d = max(args["BLOCK_DQK"], args["BLOCK_DV"])
        max_resident, max_streamed = _tile_limits_v2(kernel, block_d, args["q_ptr"].element_size())
        max_len = max(args["LENGTH_BUCKET"], 32)
        kept = [c for c in configs
                if c.kwargs[resident_name] <= min(max_resident, max_len)
                and c.kwargs[streamed_name] <= min(max_streamed, max_len)]
        kept = kept or configs[-1:]
        if kernel in _V2_FIRST:
            narrowest_d = min(args["BLOCK_DQK"], args["BLOCK_DV"])
            kept = [c for c in kept if _loads_16_bytes(c, streamed_name, narrowest_d)] or kept
        first = (_FLOAT32_FIRST if args["q_ptr"].dtype == torch.float32 else _V2_FIRST).get(kernel, {}).get(block_d)
        if first is not None:  # a stable sort: only the favourite moves to the front
            kept.sort(key=lambda c: _config_tuple(c) != first)
        return kept if _AUTOTUNE else kept[:1]

    return prune


_AUTOTUNE_KEY = ["BLOCK_DQK", "BLOCK_DV", "LENGTH_BUCKET", "LAYOUT"]
# Values that change with every shape but do not help code generation: not specialized, so a new
# head count reuses the compiled kernel. Lengths and head dims are specialized (Triton tells only
# "a multiple of 16" and "1" apart, so a few variants at most): when the contiguous one of them is a
# multiple of 16, tile loads vectorise and pipeline. sm_90 PTX of the fp16 forward at d = 128,
# (128, 64) tiles, NCHW: 128 2-byte loads and no cp.async unspecialized; 8 16-byte loads and 24
# cp.async with L a multiple of 16 (compiled here; no GPU to time it on).
_NOT_SPECIALIZED = ["heads", "batch_heads", "LENGTH_BUCKET", "LAYOUT"]


def _autotune(kernel: str):
    return triton.autotune(configs=_configs(kernel), key=_AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": _config_pruner(kernel)})


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------
@triton.jit
def _batch_head(heads, batch_heads):
    """(bh, n, h, valid) of this program from grid axes 1 and 2 (axis 2 folds batch*heads past 65 535);
    valid is False for the spare programs of the last fold."""
    bh = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
    return bh, (bh // heads).to(tl.int64), (bh % heads).to(tl.int64), bh < batch_heads


@triton.jit
def _program_offsets(BLOCK: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """(rows, qk channels, v channels) of this program: its BLOCK rows of the resident block (grid axis 0)
    and the padded head dims, int64 before they meet a stride."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, tl.arange(0, BLOCK_DQK).to(tl.int64), tl.arange(0, BLOCK_DV).to(tl.int64)


@triton.jit
def _masked_program_offsets(length, dim_qk, dim_v,
                            BLOCK: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """_program_offsets and their masks: rows < length, channels < the runtime head dims."""
    offs, offs_dqk, offs_dv = _program_offsets(BLOCK, BLOCK_DQK, BLOCK_DV)
    return offs, offs_dqk, offs_dv, offs < length, offs_dqk < dim_qk, offs_dv < dim_v


@triton.jit
def _head_base(ptr, n, h, dim, stride_n, stride_c):
    """Where head h of batch n starts in an (N, heads * dim, L) tensor."""
    return ptr + n * stride_n + h * dim * stride_c


@triton.jit
def _load_head_tile(ptr, n, h, dim, stride_n, stride_c, stride_l, offs_l, offs_c, mask_l, mask_c):
    """Positions offs_l x channels offs_c of head h of batch n (see _head_base), zero where masked.
    Triton evaluates a call's keyword arguments first: the mask comes before the head's base, as when the
    kernels spelled the load out (a helper taking the base as an argument would change the PTX)."""
    return tl.load(_head_base(ptr, n, h, dim, stride_n, stride_c) + offs_l[:, None] * stride_l
                   + offs_c[None, :] * stride_c, mask=mask_l[:, None] & mask_c[None, :], other=0.0)


@_autotune("fwd")
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _spatial_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    stride_qn, stride_qc, stride_ql,
    stride_kn, stride_kc, stride_kl,
    stride_vn, stride_vc, stride_vl,
    stride_on, stride_oc, stride_ol,
    heads, batch_heads, len_q, len_k, dim_qk, dim_v,
    scale,
    LENGTH_BUCKET, LAYOUT,  # autotune keys only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    bh, n, h, valid = _batch_head(heads, batch_heads)
    if valid:
        offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_dqk = tl.arange(0, BLOCK_DQK).to(tl.int64)
        offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
        mask_m = offs_m < len_q
        mask_dqk = offs_dqk < dim_qk
        mask_dv = offs_dv < dim_v

        q_base = q_ptr + n * stride_qn + h * dim_qk * stride_qc
        k_base = k_ptr + n * stride_kn + h * dim_qk * stride_kc
        v_base = v_ptr + n * stride_vn + h * dim_v * stride_vc
        q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_dqk[None, :] * stride_qc,
                    mask=mask_m[:, None] & mask_dqk[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for start_n in range(0, len_k, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
            mask_n = offs_n < len_k
            k_t = tl.load(k_base + offs_dqk[:, None] * stride_kc + offs_n[None, :] * stride_kl,
                          mask=mask_dqk[:, None] & mask_n[None, :], other=0.0)
            s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a max still -inf (every logit so far -inf) shifts by 0: p and alpha are 0, not NaN
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2((m_i - m_shift) * LOG2E)  # rescales what was summed under the old max
            p = tl.exp2((s - m_shift[:, None]) * LOG2E)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_dv[None, :] * stride_vc,
                        mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        acc = acc / l_i[:, None]
        out_base = out_ptr + n * stride_on + h * dim_v * stride_oc
        tl.store(out_base + offs_m[:, None] * stride_ol + offs_dv[None, :] * stride_oc,
                 acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])
        lse = m_i + tl.log(l_i)
        tl.store(lse_ptr + bh.to(tl.int64) * len_q + offs_m, lse, mask=mask_m)


@triton.jit(do_not_specialize=["heads", "batch_heads"])
def _spatial_attention_bwd_delta_kernel(
    out_ptr, dout_ptr, delta_ptr,
    stride_on, stride_oc, stride_ol,
    stride_dn, stride_dc, stride_dl,
    heads, batch_heads, len_q, dim_v,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta[n, h, i] = sum_c dO[n, h*dv + c, i] * O[n, h*dv + c, i], the softmax-backward row term."""
    bh, n, h, valid = _batch_head(heads, batch_heads)
    if valid:
        offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
        mask = (offs_m < len_q)[:, None] & (offs_dv < dim_v)[None, :]
        o = tl.load(out_ptr + n * stride_on + (h * dim_v + offs_dv[None, :]) * stride_oc + offs_m[:, None] * stride_ol,
                    mask=mask, other=0.0)
        do = tl.load(dout_ptr + n * stride_dn + (h * dim_v + offs_dv[None, :]) * stride_dc
                     + offs_m[:, None] * stride_dl, mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(delta_ptr + bh.to(tl.int64) * len_q + offs_m, delta, mask=offs_m < len_q)


@triton.jit(do_not_specialize=["heads", "batch_heads"])
def _spatial_attention_bwd_norm_kernel(
    q_ptr, k_ptr, lse_ptr, norm_ptr,
    stride_qn, stride_qc, stride_ql,
    stride_kn, stride_kc, stride_kl,
    heads, batch_heads, len_q, len_k, dim_qk,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
):
    """norm[n, h, i] = 1 / sum_j exp(s_ij - lse_i), with s and p computed as the dk/dv and dq kernels
    compute them (float32 with few queries, see _renormalises)."""
    bh, n, h, valid = _batch_head(heads, batch_heads)
    if valid:
        offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_dqk = tl.arange(0, BLOCK_DQK).to(tl.int64)
        mask_m = offs_m < len_q
        mask_dqk = offs_dqk < dim_qk
        k_base = _head_base(k_ptr, n, h, dim_qk, stride_kn, stride_kc)
        q = _load_head_tile(q_ptr, n, h, dim_qk, stride_qn, stride_qc, stride_ql, offs_m, offs_dqk, mask_m, mask_dqk)
        row_ptrs = bh.to(tl.int64) * len_q + offs_m
        lse = tl.load(lse_ptr + row_ptrs, mask=mask_m, other=0.0)
        total = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, len_k, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
            mask_n = offs_n < len_k
            k_t = tl.load(k_base + offs_dqk[:, None] * stride_kc + offs_n[None, :] * stride_kl,
                          mask=mask_dqk[:, None] & mask_n[None, :], other=0.0)
            s = tl.dot(q, k_t, input_precision="ieee") * scale
            total += tl.sum(tl.where(mask_n[None, :], tl.exp2((s - lse[:, None]) * LOG2E), 0.0), 1)
        # no correction where lse is not finite (every logit -inf)
        norm = tl.where((lse == lse) & (tl.abs(lse) < float("inf")), 1.0 / total, 1.0)
        tl.store(norm_ptr + row_ptrs, norm, mask=mask_m)


@_autotune("dkdv")
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _spatial_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, norm_ptr,
    stride_qn, stride_qc, stride_ql,
    stride_kn, stride_kc, stride_kl,
    stride_vn, stride_vc, stride_vl,
    stride_dn, stride_dc, stride_dl,
    stride_dkn, stride_dkc, stride_dkl,
    stride_dvn, stride_dvc, stride_dvl,
    heads, batch_heads, len_q, len_k, dim_qk, dim_v,
    scale,
    LENGTH_BUCKET, LAYOUT,  # autotune keys only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RENORM: tl.constexpr = False,
):
    """One key block: dv = P^T dO and dk = scale * dS^T Q, summed over all query blocks.
    RENORM: P is multiplied by norm (per query, _spatial_attention_bwd_norm_kernel)."""
    bh, n, h, valid = _batch_head(heads, batch_heads)
    if valid:
        offs_n, offs_dqk, offs_dv, mask_n, mask_dqk, mask_dv = _masked_program_offsets(
            len_k, dim_qk, dim_v, BLOCK_N, BLOCK_DQK, BLOCK_DV)
        q_base = _head_base(q_ptr, n, h, dim_qk, stride_qn, stride_qc)
        do_base = _head_base(dout_ptr, n, h, dim_v, stride_dn, stride_dc)
        k = _load_head_tile(k_ptr, n, h, dim_qk, stride_kn, stride_kc, stride_kl, offs_n, offs_dqk, mask_n, mask_dqk)
        v = _load_head_tile(v_ptr, n, h, dim_v, stride_vn, stride_vc, stride_vl, offs_n, offs_dv, mask_n, mask_dv)
        row_base = bh.to(tl.int64) * len_q

        dk = tl.zeros([BLOCK_N, BLOCK_DQK], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        for start_m in range(0, len_q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
            mask_m = offs_m < len_q
            q_t = tl.load(q_base + offs_dqk[:, None] * stride_qc + offs_m[None, :] * stride_ql,
                          mask=mask_dqk[:, None] & mask_m[None, :], other=0.0)
            lse = tl.load(lse_ptr + row_base + offs_m, mask=mask_m, other=0.0)
            s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * scale  # (BLOCK_N, BLOCK_M)
            p_t = tl.where(mask_m[None, :], tl.exp2((s_t - lse[None, :]) * LOG2E), 0.0)
            if RENORM:
                p_t *= tl.load(norm_ptr + row_base + offs_m, mask=mask_m, other=0.0)[None, :]
            do = tl.load(do_base + offs_m[:, None] * stride_dl + offs_dv[None, :] * stride_dc,
                         mask=mask_m[:, None] & mask_dv[None, :], other=0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            delta = tl.load(delta_ptr + row_base + offs_m, mask=mask_m, other=0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)

        tl.store(dk_ptr + n * stride_dkn + (h * dim_qk + offs_dqk[None, :]) * stride_dkc + offs_n[:, None] * stride_dkl,
                 (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_dqk[None, :])
        tl.store(dv_ptr + n * stride_dvn + (h * dim_v + offs_dv[None, :]) * stride_dvc + offs_n[:, None] * stride_dvl,
                 dv.to(dv_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_dv[None, :])


@_autotune("dq")
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _spatial_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, norm_ptr,
    stride_qn, stride_qc, stride_ql,
    stride_kn, stride_kc, stride_kl,
    stride_vn, stride_vc, stride_vl,
    stride_dn, stride_dc, stride_dl,
    stride_dqn, stride_dqc, stride_dql,
    heads, batch_heads, len_q, len_k, dim_qk, dim_v,
    scale,
    LENGTH_BUCKET, LAYOUT,  # autotune keys only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RENORM: tl.constexpr = False,
):
    """One query block: dq = scale * dS K, summed over all key blocks.
    RENORM: P is multiplied by norm (per query, _spatial_attention_bwd_norm_kernel)."""
    bh, n, h, valid = _batch_head(heads, batch_heads)
    if valid:
        offs_m, offs_dqk, offs_dv, mask_m, mask_dqk, mask_dv = _masked_program_offsets(
            len_q, dim_qk, dim_v, BLOCK_M, BLOCK_DQK, BLOCK_DV)
        k_base = _head_base(k_ptr, n, h, dim_qk, stride_kn, stride_kc)
        v_base = _head_base(v_ptr, n, h, dim_v, stride_vn, stride_vc)
        q = _load_head_tile(q_ptr, n, h, dim_qk, stride_qn, stride_qc, stride_ql, offs_m, offs_dqk, mask_m, mask_dqk)
        do = _load_head_tile(dout_ptr, n, h, dim_v, stride_dn, stride_dc, stride_dl, offs_m, offs_dv, mask_m, mask_dv)
        row_base = bh.to(tl.int64) * len_q
        lse = tl.load(lse_ptr + row_base + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptr + row_base + offs_m, mask=mask_m, other=0.0)
        if RENORM:
            norm = tl.load(norm_ptr + row_base + offs_m, mask=mask_m, other=0.0)

        dq = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
        for start_n in range(0, len_k, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
            mask_n = offs_n < len_k
            k_t = tl.load(k_base + offs_dqk[:, None] * stride_kc + offs_n[None, :] * stride_kl,
                          mask=mask_dqk[:, None] & mask_n[None, :], other=0.0)
            v_t = tl.load(v_base + offs_dv[:, None] * stride_vc + offs_n[None, :] * stride_vl,
                          mask=mask_dv[:, None] & mask_n[None, :], other=0.0)
            s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale
            p = tl.where(mask_n[None, :], tl.exp2((s - lse[:, None]) * LOG2E), 0.0)
            if RENORM:
                p *= norm[:, None]
            dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)

        tl.store(dq_ptr + n * stride_dqn + (h * dim_qk + offs_dqk[None, :]) * stride_dqc + offs_m[:, None] * stride_dql,
                 (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_dqk[None, :])


# --------------------------------------------------------------------------
# Kernels, variant triton_attention_v2 (fastattn._verified): taken only when that variant is enabled
# --------------------------------------------------------------------------
# What the compiler is told that the kernels above leave to runtime values: the exact head dims
# (HEAD_DQK, HEAD_DV), so a head's channel offset and the mask on a padded head dim keep 16-byte vectors
# (channels_last d = 40: 5 vectors of 8 halves a row); and whether each length is a multiple of its block
# (EVEN_M, EVEN_N), so every full tile loads without a mask and only the last one is masked. Exponents
# are base 2 with the scale folded in: p = exp2(fma(q.k, scale * log2(e), -row_max)), one FMA a logit.
# Tile loads are only as wide as the row pitch allows, so the launcher hands these kernels inputs whose
# non-unit strides are multiples of 16 elements (a padded copy where they are not, see _vector_aligned).
@triton.jit
def _load_tile(base, offs_r, offs_c, stride_r, stride_c, limit_r, limit_c,
               MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """base[r * stride_r + c * stride_c] for r in offs_r, c in offs_c; zero past limit_r (rows, if MASK_R)
    and limit_c (columns, if MASK_C). Unmasked when neither can run past its limit."""
    ptrs = base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    if MASK_R:
        if MASK_C:
            tile = tl.load(ptrs, mask=(offs_r < limit_r)[:, None] & (offs_c < limit_c)[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=(offs_r < limit_r)[:, None], other=0.0)
    else:
        if MASK_C:
            tile = tl.load(ptrs, mask=(offs_c < limit_c)[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(base, value, offs_r, offs_c, stride_r, stride_c, limit_r, limit_c,
                MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """The store twin of _load_tile."""
    ptrs = base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    if MASK_R:
        if MASK_C:
            tl.store(ptrs, value, mask=(offs_r < limit_r)[:, None] & (offs_c < limit_c)[None, :])
        else:
            tl.store(ptrs, value, mask=(offs_r < limit_r)[:, None])
    else:
        if MASK_C:
            tl.store(ptrs, value, mask=(offs_c < limit_c)[None, :])
        else:
            tl.store(ptrs, value)


@triton.jit
def _load_rows(ptrs, offs, limit, MASK: tl.constexpr):
    """A per-row float32 vector (lse, delta), zero past limit if MASK."""
    if MASK:
        row = tl.load(ptrs, mask=offs < limit, other=0.0)
    else:
        row = tl.load(ptrs)
    return row


def _even(length: str, block: str):
    """Heuristic: whether the length argument is a multiple of the block (no partial tile)."""
    return lambda args: args[length] % args[block] == 0


@triton.jit
def _fwd_v2_key_block(q, k_base, v_base, start_n, offs_dqk, offs_dv, stride_kc, stride_kl, stride_vc, stride_vl,
                      len_k, load_len_k, qk_scale, m_i, l_i, acc,
                      BLOCK_N: tl.constexpr, HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr,
                      MASK_N: tl.constexpr, MASK_DQK: tl.constexpr, MASK_DV: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax: (m_i, l_i, acc) updated, m_i in base-2 logit units."""
    offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
    k_t = _load_tile(k_base, offs_dqk, offs_n, stride_kc, stride_kl, HEAD_DQK, load_len_k, MASK_DQK, MASK_N)
    qk = tl.dot(q, k_t, input_precision=DOT_PRECISION)
    s = qk * qk_scale
    if MASK_N:
        s = tl.where((offs_n < len_k)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a max still -inf (every logit so far -inf) shifts by 0: p and alpha are 0, not NaN
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(tl.fma(qk, qk_scale, -m_shift[:, None]))
    if MASK_N:
        p = tl.where((offs_n < len_k)[None, :], p, 0.0)
    v = _load_tile(v_base, offs_n, offs_dv, stride_vl, stride_vc, load_len_k, HEAD_DV, MASK_N, MASK_DV)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@_autotune("fwd_v2")
@triton.heuristics({"EVEN_M": _even("len_q", "BLOCK_M"), "EVEN_N": _even("len_k", "BLOCK_N")})
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _spatial_attention_fwd_kernel_v2(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    stride_qn, stride_qc, stride_ql,
    stride_kn, stride_kc, stride_kl,
    stride_vn, stride_vc, stride_vl,
    stride_on, stride_oc, stride_ol,
    heads, batch_heads, len_q, len_k,
    load_len_q, load_len_k,  # lengths tile loads may read up to (see _load_len)
    qk_scale,  # scale * log2(e)
    LENGTH_BUCKET, LAYOUT,  # autotune keys only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    DV_CHUNKS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[:, chunk of d_v] for one query block; with DV_CHUNKS > 1 each chunk of BLOCK_DV output channels
    is a program of its own that recomputes the logits (a 64 x 512 float32 accumulator would spill)."""
    bh, n, h, valid = _batch_head(heads, batch_heads)
    if valid:
        offs_m = (tl.program_id(0) // DV_CHUNKS).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_dqk = tl.arange(0, BLOCK_DQK).to(tl.int64)
        offs_dv = (tl.program_id(0) % DV_CHUNKS).to(tl.int64) * BLOCK_DV + tl.arange(0, BLOCK_DV)
        MASK_DQK: tl.constexpr = HEAD_DQK != BLOCK_DQK
        MASK_DV: tl.constexpr = HEAD_DV != BLOCK_DV * DV_CHUNKS

        k_base = _head_base(k_ptr, n, h, HEAD_DQK, stride_kn, stride_kc)
        v_base = _head_base(v_ptr, n, h, HEAD_DV, stride_vn, stride_vc)
        q = _load_tile(_head_base(q_ptr, n, h, HEAD_DQK, stride_qn, stride_qc), offs_m, offs_dqk, stride_ql, stride_qc,
                       load_len_q, HEAD_DQK, not EVEN_M, MASK_DQK)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        len_k_full = len_k if EVEN_N else len_k // BLOCK_N * BLOCK_N
        for start_n in range(0, len_k_full, BLOCK_N):
            m_i, l_i, acc = _fwd_v2_key_block(
                q, k_base, v_base, start_n, offs_dqk, offs_dv, stride_kc, stride_kl, stride_vc, stride_vl,
                len_k, load_len_k, qk_scale, m_i, l_i, acc, BLOCK_N, HEAD_DQK, HEAD_DV, False, MASK_DQK, MASK_DV, DOT_PRECISION)
        if not EVEN_N:
            m_i, l_i, acc = _fwd_v2_key_block(
                q, k_base, v_base, len_k_full, offs_dqk, offs_dv, stride_kc, stride_kl, stride_vc, stride_vl,
                len_k, load_len_k, qk_scale, m_i, l_i, acc, BLOCK_N, HEAD_DQK, HEAD_DV, True, MASK_DQK, MASK_DV, DOT_PRECISION)

        acc = acc / l_i[:, None]
        _store_tile(_head_base(out_ptr, n, h, HEAD_DV, stride_on, stride_oc), acc.to(out_ptr.dtype.element_ty),
                    offs_m, offs_dv, stride_ol, stride_oc, len_q, HEAD_DV, not EVEN_M, MASK_DV)
        lse = (m_i + tl.log2(l_i)) / LOG2E  # natural log, as the op returns; every d_v chunk has the same bits
        lse_ptrs = lse_ptr + bh.to(tl.int64) * len_q + offs_m
        if EVEN_M:
            tl.store(lse_ptrs, lse)
        else:
            tl.store(lse_ptrs, lse, mask=offs_m < len_q)


@triton.jit(do_not_specialize=["heads", "batch_heads"])
def _spatial_attention_bwd_delta_kernel_v2(
    out_ptr, dout_ptr, delta_ptr,
    stride_on, stride_oc, stride_ol,
    stride_dn, stride_dc, stride_dl,
    heads, batch_heads, len_q,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HEAD_DV: tl.constexpr,
):
    """delta = rowsum(dO * O) as _spatial_attention_bwd_delta_kernel, with the exact head dim known."""
    bh, n, h, valid = _batch_head(heads, batch_heads)
    if valid:
        offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
        o = _load_tile(_head_base(out_ptr, n, h, HEAD_DV, stride_on, stride_oc), offs_m, offs_dv, stride_ol, stride_oc,
                       len_q, HEAD_DV, True, HEAD_DV != BLOCK_DV)
        do = _load_tile(_head_base(dout_ptr, n, h, HEAD_DV, stride_dn, stride_dc),
                        offs_m, offs_dv, stride_dl, stride_dc, len_q, HEAD_DV, True, HEAD_DV != BLOCK_DV)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(delta_ptr + bh.to(tl.int64) * len_q + offs_m, delta, mask=offs_m < len_q)


@triton.jit
def _dkdv_v2_query_block(k, v, q_base, do_base, lse_ptrs, delta_ptrs, start_m, offs_dqk, offs_dv,
                         stride_qc, stride_ql, stride_dc, stride_dl, len_q, load_len_q, qk_scale, dk, dv,
                         BLOCK_M: tl.constexpr, HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr,
                         MASK_M: tl.constexpr, MASK_DQK: tl.constexpr, MASK_DV: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """One query block's share of dk (unscaled) and dv for the resident key block."""
    offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
    q_t = _load_tile(q_base, offs_dqk, offs_m, stride_qc, stride_ql, HEAD_DQK, load_len_q, MASK_DQK, MASK_M)
    lse2 = _load_rows(lse_ptrs + offs_m, offs_m, len_q, MASK_M) * LOG2E
    p_t = tl.exp2(tl.fma(tl.dot(k, q_t, input_precision=DOT_PRECISION), qk_scale, -lse2[None, :]))
    if MASK_M:
        p_t = tl.where((offs_m < len_q)[None, :], p_t, 0.0)
    do = _load_tile(do_base, offs_m, offs_dv, stride_dl, stride_dc, load_len_q, HEAD_DV, MASK_M, MASK_DV)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    delta = _load_rows(delta_ptrs + offs_m, offs_m, len_q, MASK_M)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
    return dk, dv


@_autotune("dkdv_v2")
@triton.heuristics({"EVEN_M": _even("len_q", "BLOCK_M"), "EVEN_N": _even("len_k", "BLOCK_N")})
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _spatial_attention_bwd_dkdv_kernel_v2(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qn, stride_qc, stride_ql,
    stride_kn, stride_kc, stride_kl,
    stride_vn, stride_vc, stride_vl,
    stride_dn, stride_dc, stride_dl,
    stride_dkn, stride_dkc, stride_dkl,
    stride_dvn, stride_dvc, stride_dvl,
    heads, batch_heads, len_q, len_k,
    load_len_q, load_len_k,  # lengths tile loads may read up to (see _load_len)
    scale, qk_scale,  # scale and scale * log2(e)
    LENGTH_BUCKET, LAYOUT,  # autotune keys only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key block: dv = P^T dO and dk = scale * dS^T Q, summed over all query blocks."""
    bh, n, h, valid = _batch_head(heads, batch_heads)
    if valid:
        offs_n, offs_dqk, offs_dv = _program_offsets(BLOCK_N, BLOCK_DQK, BLOCK_DV)
        MASK_DQK: tl.constexpr = HEAD_DQK != BLOCK_DQK
        MASK_DV: tl.constexpr = HEAD_DV != BLOCK_DV

        q_base = _head_base(q_ptr, n, h, HEAD_DQK, stride_qn, stride_qc)
        do_base = _head_base(dout_ptr, n, h, HEAD_DV, stride_dn, stride_dc)
        k = _load_tile(_head_base(k_ptr, n, h, HEAD_DQK, stride_kn, stride_kc), offs_n, offs_dqk, stride_kl, stride_kc,
                       load_len_k, HEAD_DQK, not EVEN_N, MASK_DQK)
        v = _load_tile(_head_base(v_ptr, n, h, HEAD_DV, stride_vn, stride_vc), offs_n, offs_dv, stride_vl, stride_vc,
                       load_len_k, HEAD_DV, not EVEN_N, MASK_DV)
        lse_ptrs = lse_ptr + bh.to(tl.int64) * len_q
        delta_ptrs = delta_ptr + bh.to(tl.int64) * len_q

        dk = tl.zeros([BLOCK_N, BLOCK_DQK], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        len_q_full = len_q if EVEN_M else len_q // BLOCK_M * BLOCK_M
        for start_m in range(0, len_q_full, BLOCK_M):
            dk, dv = _dkdv_v2_query_block(
                k, v, q_base, do_base, lse_ptrs, delta_ptrs, start_m, offs_dqk, offs_dv,
                stride_qc, stride_ql, stride_dc, stride_dl, len_q, load_len_q, qk_scale, dk, dv,
                BLOCK_M, HEAD_DQK, HEAD_DV, False, MASK_DQK, MASK_DV, DOT_PRECISION)
        if not EVEN_M:
            dk, dv = _dkdv_v2_query_block(
                k, v, q_base, do_base, lse_ptrs, delta_ptrs, len_q_full, offs_dqk, offs_dv,
                stride_qc, stride_ql, stride_dc, stride_dl, len_q, load_len_q, qk_scale, dk, dv,
                BLOCK_M, HEAD_DQK, HEAD_DV, True, MASK_DQK, MASK_DV, DOT_PRECISION)

        _store_tile(_head_base(dk_ptr, n, h, HEAD_DQK, stride_dkn, stride_dkc),
                    (dk * scale).to(dk_ptr.dtype.element_ty), offs_n, offs_dqk, stride_dkl, stride_dkc, len_k, HEAD_DQK,
                    not EVEN_N, MASK_DQK)
        _store_tile(_head_base(dv_ptr, n, h, HEAD_DV, stride_dvn, stride_dvc), dv.to(dv_ptr.dtype.element_ty),
                    offs_n, offs_dv, stride_dvl, stride_dvc, len_k, HEAD_DV, not EVEN_N, MASK_DV)


@triton.jit
def _dq_v2_key_block(q, do, lse2, delta, k_base, v_base, start_n, offs_dqk, offs_dv,
                     stride_kc, stride_kl, stride_vc, stride_vl, len_k, load_len_k, qk_scale, dq,
                     BLOCK_N: tl.constexpr, HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr,
                     MASK_N: tl.constexpr, MASK_DQK: tl.constexpr, MASK_DV: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """One key block's share of dq (unscaled) for the resident query block."""
    offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
    k_t = _load_tile(k_base, offs_dqk, offs_n, stride_kc, stride_kl, HEAD_DQK, load_len_k, MASK_DQK, MASK_N)
    v_t = _load_tile(v_base, offs_dv, offs_n, stride_vc, stride_vl, HEAD_DV, load_len_k, MASK_DV, MASK_N)
    p = tl.exp2(tl.fma(tl.dot(q, k_t, input_precision=DOT_PRECISION), qk_scale, -lse2[:, None]))
    if MASK_N:
        p = tl.where((offs_n < len_k)[None, :], p, 0.0)
    dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)


@_autotune("dq_v2")
@triton.heuristics({"EVEN_M": _even("len_q", "BLOCK_M"), "EVEN_N": _even("len_k", "BLOCK_N")})
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _spatial_attention_bwd_dq_kernel_v2(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qn, stride_qc, stride_ql,
    stride_kn, stride_kc, stride_kl,
    stride_vn, stride_vc, stride_vl,
    stride_dn, stride_dc, stride_dl,
    stride_dqn, stride_dqc, stride_dql,
    heads, batch_heads, len_q, len_k,
    load_len_q, load_len_k,  # lengths tile loads may read up to (see _load_len)
    scale, qk_scale,  # scale and scale * log2(e)
    LENGTH_BUCKET, LAYOUT,  # autotune keys only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One query block: dq = scale * dS K, summed over all key blocks."""
    bh, n, h, valid = _batch_head(heads, batch_heads)
    if valid:
        offs_m, offs_dqk, offs_dv = _program_offsets(BLOCK_M, BLOCK_DQK, BLOCK_DV)
        MASK_DQK: tl.constexpr = HEAD_DQK != BLOCK_DQK
        MASK_DV: tl.constexpr = HEAD_DV != BLOCK_DV

        k_base = _head_base(k_ptr, n, h, HEAD_DQK, stride_kn, stride_kc)
        v_base = _head_base(v_ptr, n, h, HEAD_DV, stride_vn, stride_vc)
        q = _load_tile(_head_base(q_ptr, n, h, HEAD_DQK, stride_qn, stride_qc), offs_m, offs_dqk, stride_ql, stride_qc,
                       load_len_q, HEAD_DQK, not EVEN_M, MASK_DQK)
        do = _load_tile(_head_base(dout_ptr, n, h, HEAD_DV, stride_dn, stride_dc),
                        offs_m, offs_dv, stride_dl, stride_dc, load_len_q, HEAD_DV, not EVEN_M, MASK_DV)
        row_ptrs = bh.to(tl.int64) * len_q + offs_m
        lse2 = _load_rows(lse_ptr + row_ptrs, offs_m, len_q, not EVEN_M) * LOG2E
        delta = _load_rows(delta_ptr + row_ptrs, offs_m, len_q, not EVEN_M)

        dq = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
        len_k_full = len_k if EVEN_N else len_k // BLOCK_N * BLOCK_N
        for start_n in range(0, len_k_full, BLOCK_N):
            dq = _dq_v2_key_block(q, do, lse2, delta, k_base, v_base, start_n, offs_dqk, offs_dv,
                                  stride_kc, stride_kl, stride_vc, stride_vl, len_k, load_len_k, qk_scale, dq,
                                  BLOCK_N, HEAD_DQK, HEAD_DV, False, MASK_DQK, MASK_DV, DOT_PRECISION)
        if not EVEN_N:
            dq = _dq_v2_key_block(q, do, lse2, delta, k_base, v_base, len_k_full, offs_dqk, offs_dv,
                                  stride_kc, stride_kl, stride_vc, stride_vl, len_k, load_len_k, qk_scale, dq,
                                  BLOCK_N, HEAD_DQK, HEAD_DV, True, MASK_DQK, MASK_DV, DOT_PRECISION)

        _store_tile(_head_base(dq_ptr, n, h, HEAD_DQK, stride_dqn, stride_dqc),
                    (dq * scale).to(dq_ptr.dtype.element_ty), offs_m, offs_dqk, stride_dql, stride_dqc, len_q, HEAD_DQK,
                    not EVEN_M, MASK_DQK)


# --------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(q, k, v, heads: int, **more) -> tuple[int, int]:
    """Cheap invariants (the Python layer validates user input); returns (d_qk, d_v)."""
    named = {"q": q, "k": k, "v": v, **more}
    for name, t in named.items():
        if t.dim() != 3:
            raise ValueError(f"spatial_attention (triton): {name} must be 3-D (N, C, L), got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"spatial_attention (triton): {name} is on {t.device}, q on {q.device}")
    for name in ("q", "k", "v", "grad_out", "out"):
        if name in named and named[name].dtype not in _DTYPES:
            raise TypeError(f"spatial_attention (triton): {name} has dtype {named[name].dtype}, "
                            f"expected one of {_DTYPES}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"spatial_attention (triton): q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    n, cq, _ = q.shape
    if k.shape[:2] != (n, cq) or v.shape[0] != n or v.shape[2] != k.shape[2]:
        raise ValueError(f"spatial_attention (triton): shapes do not match: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if heads < 1 or cq % heads or v.shape[1] % heads:
        raise ValueError(f"spatial_attention (triton): heads={heads} must divide Cq={cq} and Cv={v.shape[1]}")
    d_qk, d_v = cq // heads, v.shape[1] // heads
    if max(d_qk, d_v) > _MAX_HEAD_DIM:
        raise ValueError(f"spatial_attention (triton): head dims d_qk={d_qk}, d_v={d_v}; at most {_MAX_HEAD_DIM}")
    if not q.is_cuda and not _INTERPRET:
        raise ValueError("spatial_attention (triton): needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return d_qk, d_v


def _grid(batch_heads: int, length_of_axis0: int, block_meta: str, per_block: int = 1):
    """(blocks along the sequence (times per_block programs each), batch*heads on axis 1, folded onto
    axis 2 past _MAX_GRID_YZ)."""
    axis1 = min(batch_heads, _MAX_GRID_YZ)
    axis2 = triton.cdiv(batch_heads, axis1)
    return lambda meta: (triton.cdiv(length_of_axis0, meta[block_meta]) * per_block, axis1, axis2)


def _dot_precision(dtype: torch.dtype) -> str:
    # "ieee": full float32 products (no TF32); 16-bit operands ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _on_device(t: torch.Tensor):
    """Launch on the tensor's GPU: Triton launches on the current device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _v2(dtype: torch.dtype) -> bool:
    """Whether the launchers take the triton_attention_v2 kernels: 16-bit inputs with that variant enabled.
    float32 keeps the kernels above (its dots are FMA chains on CUDA cores, tuned against spills)."""
    return dtype != torch.float32 and _verified.enabled("triton_attention_v2")


def _v2_inputs(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], bool]:
    """(tensors, channels_last) for the v2 kernels: all in one orientation, channels_last if every one has
    unit channel stride, else NCHW; each one itself if its tiles can load 16 bytes at a time, else a copy."""
    channels_last = _layout_key(*tensors) == LAYOUT_CHANNELS_CONTIGUOUS
    return [_vector_aligned(t, channels_last) for t in tensors], channels_last


def _vector_aligned(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t (N, C, L) if the v2 kernels can load its tiles 16 bytes at a time: unit stride along positions
    (NCHW) or channels (channels_last), the other strides multiples of 16 elements (what Triton's
    specialization tells the compiler), 16-byte aligned data, and for NCHW L a multiple of 16. Otherwise
    a copy with the pitch padded to a multiple of 16 (with NCHW and L = 49 or 196 each channel's row
    starts at an address no wide load could take) and the padding zeroed (NCHW tiles read up to L rounded
    to 16, see _load_len)."""
    n, c, length = t.shape
    unit, pitch = (1, 2) if channels_last else (2, 1)
    if (t.stride(unit) == 1 and t.stride(pitch) % 16 == 0 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0
            and (channels_last or length % 16 == 0)):
        return t
    size = t.shape[unit]
    buffer = t.new_empty((n, t.shape[pitch], size + (-size) % 16))
    buffer[:, :, size:].zero_()
    aligned = buffer[:, :, :size]
    return (aligned.transpose(1, 2) if channels_last else aligned).copy_(t)


def _load_len(length: int, channels_last: bool) -> int:
    """How far along the positions the v2 kernels' tile loads may read: with NCHW inputs (from
    _vector_aligned) up to L rounded to 16, zeros past L, so that a partial tile's mask keeps 16-byte
    vectors; softmax masks and stores use L itself. channels_last tiles mask whole rows: L."""
    return length if channels_last else length + (-length) % 16


def _forward_launches(q, k, v, out, lse, heads: int, d_qk: int, d_v: int, scale: float, v2: bool):
    """The forward's kernel launches as (kernel, grid, args, kwargs); inputs checked, lengths > 0."""
    n, _, len_q = q.shape
    len_k = k.shape[2]
    batch_heads = n * heads
    bucket = _length_bucket(max(len_q, len_k))
    blocks = dict(BLOCK_DQK=_block_d(d_qk), BLOCK_DV=_block_d(d_v), DOT_PRECISION=_dot_precision(q.dtype))
    grid = _grid(batch_heads, len_q, "BLOCK_M")
    if v2:
        # d_v 512 in two programs of 256 channels: 64-row tiles (wgmma) without spilling the accumulator
        dv_chunks = 2 if blocks["BLOCK_DV"] == 512 else 1
        blocks["BLOCK_DV"] //= dv_chunks
        grid = _grid(batch_heads, len_q, "BLOCK_M", dv_chunks)
        (q, k, v), channels_last = _v2_inputs(q, k, v)
        args = (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                heads, batch_heads, len_q, len_k, _load_len(len_q, channels_last), _load_len(len_k, channels_last),
                float(scale) * LOG2E.value, bucket, _layout_key(q, k, v))
        return [(_spatial_attention_fwd_kernel_v2, grid, args,
                 dict(blocks, HEAD_DQK=d_qk, HEAD_DV=d_v, DV_CHUNKS=dv_chunks))]
    args = (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            heads, batch_heads, len_q, len_k, d_qk, d_v, float(scale), bucket, _layout_key(q, k, v))
    return [(_spatial_attention_fwd_kernel, grid, args, blocks)]


def _backward_launches(grad_out, q, k, v, out, lse, delta, dq, dk, dv, heads: int, d_qk: int, d_v: int,
                       scale: float, v2: bool):
    """The backward's kernel launches (delta, dk/dv, dq) as (kernel, grid, args, kwargs)."""
    n, _, len_q = q.shape
    len_k = k.shape[2]
    batch_heads = n * heads
    block_dv = _block_d(d_v)
    bucket = _length_bucket(max(len_q, len_k))
    blocks = dict(BLOCK_DQK=_block_d(d_qk), BLOCK_DV=block_dv, DOT_PRECISION=_dot_precision(q.dtype))
    delta_block_m = 16 if _INTERPRET else max(16, min(128, 8192 // block_dv))
    delta_grid = _grid(batch_heads, len_q, "BLOCK_M")({"BLOCK_M": delta_block_m})
    if v2:
        (q, k, v, grad_out), channels_last = _v2_inputs(q, k, v, grad_out)
        lengths = (heads, batch_heads, len_q, len_k, _load_len(len_q, channels_last), _load_len(len_k, channels_last),
                   float(scale), float(scale) * LOG2E.value, bucket, _layout_key(q, k, v, grad_out))
        more = dict(blocks, HEAD_DQK=d_qk, HEAD_DV=d_v)
        return [
            (_spatial_attention_bwd_delta_kernel_v2, delta_grid,
             (out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, batch_heads, len_q),
             dict(BLOCK_M=delta_block_m, BLOCK_DV=block_dv, HEAD_DV=d_v)),
            (_spatial_attention_bwd_dkdv_kernel_v2, _grid(batch_heads, len_k, "BLOCK_N"),
             (q, k, v, grad_out, lse, delta, dk, dv,
              *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(), *lengths),
             more),
            (_spatial_attention_bwd_dq_kernel_v2, _grid(batch_heads, len_q, "BLOCK_M"),
             (q, k, v, grad_out, lse, delta, dq,
              *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *lengths),
             more),
        ]
    layout = _layout_key(q, k, v, grad_out)
    launches = [
        (_spatial_attention_bwd_delta_kernel, delta_grid,
         (out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, batch_heads, len_q, d_v),
         dict(BLOCK_M=delta_block_m, BLOCK_DV=block_dv)),
    ]
    norm = lse  # read only with RENORM
    if _renormalises(q.dtype, len_q):
        norm = torch.empty_like(delta)
        block_n = 16 if _INTERPRET else max(16, min(64, 8192 // blocks["BLOCK_DQK"]))
        launches.append((_spatial_attention_bwd_norm_kernel, _grid(batch_heads, len_q, "BLOCK_M")({"BLOCK_M": 16}),
                         (q, k, lse, norm, *q.stride(), *k.stride(), heads, batch_heads, len_q, len_k, d_qk,
                          float(scale)),
                         dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_DQK=blocks["BLOCK_DQK"])))
        blocks = dict(blocks, RENORM=True)
    return launches + [
        (_spatial_attention_bwd_dkdv_kernel, _grid(batch_heads, len_k, "BLOCK_N"),
         (q, k, v, grad_out, lse, delta, dk, dv, norm,
          *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
          heads, batch_heads, len_q, len_k, d_qk, d_v, float(scale), bucket, layout),
         blocks),
        (_spatial_attention_bwd_dq_kernel, _grid(batch_heads, len_q, "BLOCK_M"),
         (q, k, v, grad_out, lse, delta, dq, norm,
          *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
          heads, batch_heads, len_q, len_k, d_qk, d_v, float(scale), bucket, layout),
         blocks),
    ]


# Queries up to which the float32 backward renormalises its probabilities (csrc/cpu/attention.cpp,
# needs_row_norm, says why: the float32 lse's rounding is shared by a whole row of P and dominates
# the gradients of short sums over queries).
_RENORM_MAX_QUERIES = 16


def _renormalises(dtype: torch.dtype, len_q: int) -> bool:
    return dtype == torch.float32 and len_q <= _RENORM_MAX_QUERIES


def _launch(launches, device_of: torch.Tensor) -> None:
    with _on_device(device_of):
        for kernel, grid, args, kwargs in launches:
            kernel[grid](*args, **kwargs)


def spatial_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (N, Cq, Lq), k: (N, Cq, Lk), v: (N, Cv, Lk) -> out (N, Cv, Lq) in q.dtype, lse (N, heads, Lq) float32.

    out is channel-last ((N, Lq, Cv) memory) when q.stride(1) == 1 and Cq > 1, else contiguous.
    """
    d_qk, d_v = _check_inputs(q, k, v, heads)
    n, cq, len_q = q.shape
    cv, len_k = v.shape[1], k.shape[2]
    if q.stride(1) == 1 and cq > 1:
        out = torch.empty((n, len_q, cv), dtype=q.dtype, device=q.device).transpose(1, 2)
    else:
        out = torch.empty((n, cv, len_q), dtype=q.dtype, device=q.device)
    lse = torch.empty((n, heads, len_q), dtype=torch.float32, device=q.device)
    if n * heads == 0 or len_q == 0:
        return out, lse
    if len_k == 0:  # softmax over nothing: empty sum, as the reference gives
        return out.zero_(), lse.fill_(float("-inf"))
    _launch(_forward_launches(q, k, v, out, lse, heads, d_qk, d_v, scale, _v2(q.dtype)), q)
    return out, lse


def spatial_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor, heads: int,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of out = softmax(scale * q^T k) v for q, k, v, given out and lse of the forward.

    grad_out, out: (N, Cv, Lq), any strides; lse: (N, heads, Lq) float32.
    Returns dq, dk, dv with the shape, dtype and memory layout of q, k, v.
    """
    d_qk, d_v = _check_inputs(q, k, v, heads, grad_out=grad_out, out=out, lse=lse)
    n, cq, len_q = q.shape
    cv, len_k = v.shape[1], k.shape[2]
    if grad_out.shape != (n, cv, len_q) or out.shape != (n, cv, len_q) or lse.shape != (n, heads, len_q):
        raise ValueError(f"spatial_attention_backward (triton): grad_out {tuple(grad_out.shape)}, out "
                         f"{tuple(out.shape)}, lse {tuple(lse.shape)} do not match (N, Cv, Lq)=({n}, {cv}, {len_q})")
    if lse.dtype != torch.float32:
        raise TypeError(f"spatial_attention_backward (triton): lse must be float32, got {lse.dtype}")
    lse = lse.contiguous()
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.preserve_format) for t in (q, k, v))
    if n * heads == 0 or len_q == 0 or len_k == 0:  # nothing flows: every gradient is zero
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((n, heads, len_q), dtype=torch.float32, device=q.device)
    _launch(_backward_launches(grad_out, q, k, v, out, lse, delta, dq, dk, dv, heads, d_qk, d_v, scale,
                               _v2(q.dtype)), q)
    return dq, dk, dv
