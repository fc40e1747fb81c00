// CUDA kernels of spatial (non-local) attention over the L positions of (N, C, L) maps:
//   out[n, h*dv + c, i] = sum_j softmax_j(scale * sum_d q[n, h*dqk + d, i] k[n, h*dqk + d, j]) v[n, h*dv + c, j]
// Flash-style: the Lq x Lk matrix is never written; the forward keeps a running max and
// sum per query (online softmax) and saves lse; the backward recomputes P from lse.
//
// Kernels (one thread block of 256 threads per tile, 16 x 16 thread grid):
//   spatial_attention_forward_kernel   one query tile, loops over key tiles    -> out, lse
//   attention_backward_delta_kernel    D = rowsum(dO * O)                      -> delta
//   attention_backward_dkdv_kernel     one key tile, loops over query tiles    -> dk, dv
//   attention_backward_dq_kernel       one query tile, loops over key tiles    -> dq
// No atomics anywhere: every output element is written by one thread, in a fixed order,
// so the results are bitwise deterministic.
//
// Tiles go through shared memory as float, loaded from strided global memory with the
// warp's consecutive threads along whichever of C or L has unit stride (NCHW-contiguous
// and channel-last inputs are both read in place). Arithmetic is plain float32 FFMA for
// every dtype. Logits are kept in the log2 domain (q pre-scaled by scale * log2(e)) so
// that exp2f, a single fast instruction under --use_fast_math, computes the softmax.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "attention_mma/api.cuh"
#include "message.cuh"

#include <algorithm>
#include <climits>
#include <string>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastattn {
namespace {

constexpr int kThreads = 256;    // 16 x 16 thread grid: ty = tid / 16 picks rows, tx = tid % 16 columns
constexpr int kChunk = 64;       // width of a staged tile: 64 channels or 64 positions
constexpr int kStageStride = kChunk + 1;  // +1 float of padding: column reads hit distinct banks
constexpr int kMaxHeadDim = 512;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// A (N, C, L) tensor seen through its strides.
template <typename scalar_t>
struct Operand {
  scalar_t* ptr;
  int64_t stride_n, stride_c, stride_l;
  // Element (n, channel0, 0): the start of one head's channel slab.
  __device__ scalar_t* slab(int64_t n, int64_t channel0) const { return ptr + n * stride_n + channel0 * stride_c; }
};

// scalar_t may be const-qualified; the dtype was checked by attention_shape.
template <typename scalar_t>
Operand<scalar_t> operand(const at::Tensor& t) {
  return {static_cast<scalar_t*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

using AttnShape = attention_mma::Shape;  // N * heads, heads, d_qk, d_v, Lq, Lk

__host__ __device__ constexpr int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }
__host__ __device__ constexpr int round_up(int a, int b) { return (a + b - 1) / b * b; }

// (n * heads + h) of this block; grid y is folded into y and z to stay under 65535.
__device__ inline int64_t block_batch_head() {
  return blockIdx.y + static_cast<int64_t>(blockIdx.z) * gridDim.y;
}

// The walk of one thread over a ROWS x COLS tile (channels x positions) in kTileIters steps:
// consecutive threads take consecutive elements along the unit-stride axis of global memory,
// so each warp reads or writes contiguous runs for NCHW-contiguous and channel-last slabs alike.
template <int ROWS, int COLS>
struct TileWalk {
  static_assert(kThreads % ROWS == 0 && kThreads % COLS == 0 && (ROWS * COLS) % kThreads == 0, "tile vs block");
  static constexpr int kIters = ROWS * COLS / kThreads;
  int row, col;        // first element of this thread
  int row_step, col_step;  // per iteration (one of them is 0)
  __device__ TileWalk(bool positions_contiguous) {
    if (positions_contiguous) {
      row = threadIdx.x / COLS, col = threadIdx.x % COLS, row_step = kThreads / COLS, col_step = 0;
    } else {
      row = threadIdx.x % ROWS, col = threadIdx.x / ROWS, row_step = 0, col_step = kThreads / ROWS;
    }
  }
};

// Copies the ROWS x COLS tile [c0, c0 + ROWS) x [l0, l0 + COLS) of a (C, L) strided slab into
// shared memory as float: element (c, l) goes to dst[(c - c0) * dst_c + (l - l0) * dst_l] times
// mul, and zero where c >= c_end or l >= l_end.
template <int ROWS, int COLS, typename scalar_t>
__device__ inline void load_tile(float* dst, int dst_c, int dst_l, const scalar_t* src, int64_t stride_c,
                                 int64_t stride_l, int c0, int c_end, int l0, int l_end, float mul) {
  const TileWalk<ROWS, COLS> w(stride_l == 1);
  const scalar_t* ptr = src + (c0 + w.row) * stride_c + (l0 + w.col) * stride_l;
  const int64_t ptr_step = w.row_step * stride_c + w.col_step * stride_l;
  float values[w.kIters];
#pragma unroll
  for (int it = 0; it < w.kIters; ++it) {  // all loads first, so that they are in flight together
    const int c = c0 + w.row + it * w.row_step, l = l0 + w.col + it * w.col_step;
    values[it] = c < c_end && l < l_end ? static_cast<float>(ptr[it * ptr_step]) * mul : 0.f;
  }
#pragma unroll
  for (int it = 0; it < w.kIters; ++it) {
    dst[(w.row + it * w.row_step) * dst_c + (w.col + it * w.col_step) * dst_l] = values[it];
  }
}

// The inverse of load_tile: writes the in-range part of a ROWS x COLS float tile, times mul,
// to a (C, L) slab.
template <int ROWS, int COLS, typename scalar_t>
__device__ inline void store_tile(scalar_t* dst, int64_t stride_c, int64_t stride_l, const float* src, int src_c,
                                  int src_l, int c0, int c_end, int l0, int l_end, float mul) {
  const TileWalk<ROWS, COLS> w(stride_l == 1);
  scalar_t* ptr = dst + (c0 + w.row) * stride_c + (l0 + w.col) * stride_l;
  const int64_t ptr_step = w.row_step * stride_c + w.col_step * stride_l;
#pragma unroll
  for (int it = 0; it < w.kIters; ++it) {
    const int r = w.row + it * w.row_step, col = w.col + it * w.col_step;
    if (c0 + r < c_end && l0 + col < l_end) ptr[it * ptr_step] = static_cast<scalar_t>(src[r * src_c + col * src_l] * mul);
  }
}

// Max and sum over the 16 threads of a row group (16 consecutive lanes of one warp). The xor
// butterfly leaves the bitwise same result in all 16 lanes.
__device__ inline float row_max(float x) {
#pragma unroll
  for (int offset = 8; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}
__device__ inline float row_sum(float x) {
#pragma unroll
  for (int offset = 8; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Tile geometry of the kernels that keep a full-head-dim tile resident (q in the forward and
// dq kernels, k and v in the dkdv kernel). TILE rows of that tile are split over the 16 row
// groups (TI rows per thread); the float accumulators of up to 512 head channels are split
// into 64-wide chunks over the 16 column groups (4 columns per thread). TILE shrinks as the
// head dim grows so that every thread always holds 8 x 4 = 32 accumulators per output.
template <int TILE>
struct TileGeometry {
  static_assert(TILE == 16 || TILE == 32 || TILE == 64, "tile of 16, 32 or 64 rows");
  static constexpr int kRowsPerThread = TILE / 16;          // TI
  static constexpr int kAccChunks = 8 / kRowsPerThread;     // 64-wide chunks of the head dim held in registers
  static constexpr int kMaxDim = kAccChunks * kChunk;       // 128, 256, 512
  static constexpr int kResidentStride = TILE + 1;          // row stride of a resident [channel][row] tile
};

// The tile height for head dims up to max_dim, as a compile-time constant passed to body.
template <typename Body>
void with_tile_rows(int max_dim, Body&& body) {
  if (max_dim <= TileGeometry<64>::kMaxDim) {
    body(std::integral_constant<int, 64>());
  } else if (max_dim <= TileGeometry<32>::kMaxDim) {
    body(std::integral_constant<int, 32>());
  } else {
    TORCH_CHECK(max_dim <= TileGeometry<16>::kMaxDim, "spatial_attention (CUDA): head dim above the largest tile's");
    body(std::integral_constant<int, 16>());
  }
}

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------
// Block (query tile of BQ rows, n * heads). Shared memory (floats):
//   q_s    [round_up(dqk, 64)][BQ + 1]  q tile, channel-major, times scale * log2(e)
//   stage  [64][65]                     k chunk as [d][j], v chunk as [j][c], output chunk as [i][c]
//   p_s    [BQ][65]                     probabilities of the current key tile, [i][j]
template <int BQ>
size_t forward_smem_bytes(int dqk) {
  using G = TileGeometry<BQ>;
  return sizeof(float) * (static_cast<size_t>(round_up(dqk, kChunk)) * G::kResidentStride + kChunk * kStageStride +
                          BQ * kStageStride);
}

template <typename scalar_t, int BQ>
__global__ void __launch_bounds__(kThreads)
spatial_attention_forward_kernel(Operand<const scalar_t> q, Operand<const scalar_t> k, Operand<const scalar_t> v,
                                 Operand<scalar_t> out, float* __restrict__ lse, AttnShape shape, float scale_log2) {
  using G = TileGeometry<BQ>;
  constexpr int TI = G::kRowsPerThread;
  constexpr int QS = G::kResidentStride;
  extern __shared__ float smem[];

  const int64_t bh = block_batch_head();
  if (bh >= shape.batch_heads) return;
  const int64_t n = bh / shape.heads;
  const int h = static_cast<int>(bh % shape.heads);
  const int dqk = shape.dqk, dv = shape.dv, lq = shape.lq, lk = shape.lk;
  const int q0 = blockIdx.x * BQ;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  const int dqk_pad = round_up(dqk, kChunk);
  float* q_s = smem;
  float* stage = q_s + dqk_pad * QS;
  float* p_s = stage + kChunk * kStageStride;

  const scalar_t* q_slab = q.slab(n, static_cast<int64_t>(h) * dqk);
  const scalar_t* k_slab = k.slab(n, static_cast<int64_t>(h) * dqk);
  const scalar_t* v_slab = v.slab(n, static_cast<int64_t>(h) * dv);
  scalar_t* out_slab = out.slab(n, static_cast<int64_t>(h) * dv);

  for (int c0 = 0; c0 < dqk_pad; c0 += kChunk) {
    load_tile<kChunk, BQ>(q_s + c0 * QS, QS, 1, q_slab, q.stride_c, q.stride_l, c0, dqk, q0, lq, scale_log2);
  }

  // Row i = q0 + ty + 16 a of this thread; running max (log2 domain) and sum of exp2.
  float row_m[TI], row_l[TI];
  float acc[G::kAccChunks][TI][4];  // out[i][cc * 64 + tx + 16 b], unnormalised
#pragma unroll
  for (int a = 0; a < TI; ++a) {
    row_m[a] = -INFINITY;
    row_l[a] = 0.f;
  }
#pragma unroll
  for (int cc = 0; cc < G::kAccChunks; ++cc)
#pragma unroll
    for (int a = 0; a < TI; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[cc][a][b] = 0.f;

  for (int k0 = 0; k0 < lk; k0 += kChunk) {
    // s[a][b]: log2-domain logit of row ty + 16 a and key k0 + tx + 16 b.
    float s[TI][4];
#pragma unroll
    for (int a = 0; a < TI; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) s[a][b] = 0.f;
    for (int d0 = 0; d0 < dqk; d0 += kChunk) {
      __syncthreads();  // stage and p_s are free (and q_s is complete on the first pass)
      load_tile<kChunk, kChunk>(stage, kStageStride, 1, k_slab, k.stride_c, k.stride_l, d0, dqk, k0, lk, 1.f);
      __syncthreads();
      const int dc = min(kChunk, dqk - d0);
#pragma unroll 4
      for (int d = 0; d < dc; ++d) {
        float qa[TI], kb[4];
#pragma unroll
        for (int a = 0; a < TI; ++a) qa[a] = q_s[(d0 + d) * QS + ty + 16 * a];
#pragma unroll
        for (int b = 0; b < 4; ++b) kb[b] = stage[d * kStageStride + tx + 16 * b];
#pragma unroll
        for (int a = 0; a < TI; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b) s[a][b] = fmaf(qa[a], kb[b], s[a][b]);
      }
    }

    // Online softmax: rescale what was accumulated by exp2(m_old - m_new). Column k0 is a
    // valid key, so m_new is finite for finite inputs and exp2(-inf - m_new) = 0 on the first tile.
    // While every logit so far is -inf (inf inputs) the shift is 0, so p and alpha are 0, not NaN.
#pragma unroll
    for (int a = 0; a < TI; ++a) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        if (k0 + tx + 16 * b >= lk) s[a][b] = -INFINITY;
        tile_max = fmaxf(tile_max, s[a][b]);
      }
      const float m_new = fmaxf(row_m[a], row_max(tile_max));
      const float m_shift = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(row_m[a] - m_shift);
      float tile_sum = 0.f;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        s[a][b] = exp2f(s[a][b] - m_shift);
        tile_sum += s[a][b];
      }
      row_l[a] = row_l[a] * alpha + row_sum(tile_sum);
      row_m[a] = m_new;
#pragma unroll
      for (int cc = 0; cc < G::kAccChunks; ++cc)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[cc][a][b] *= alpha;
#pragma unroll
      for (int b = 0; b < 4; ++b) p_s[(ty + 16 * a) * kStageStride + tx + 16 * b] = s[a][b];
    }

    // acc += P V, one 64-channel chunk of v at a time (zero-filled past lk, so P's masked columns meet zeros).
    const int jc = min(kChunk, lk - k0);
#pragma unroll
    for (int cc = 0; cc < G::kAccChunks; ++cc) {
      if (cc * kChunk < dv) {
        __syncthreads();  // p_s written, stage free
        load_tile<kChunk, kChunk>(stage, 1, kStageStride, v_slab, v.stride_c, v.stride_l, cc * kChunk, dv, k0, lk, 1.f);
        __syncthreads();
#pragma unroll 4
        for (int j = 0; j < jc; ++j) {
          float pa[TI], vb[4];
#pragma unroll
          for (int a = 0; a < TI; ++a) pa[a] = p_s[(ty + 16 * a) * kStageStride + j];
#pragma unroll
          for (int b = 0; b < 4; ++b) vb[b] = stage[j * kStageStride + tx + 16 * b];
#pragma unroll
          for (int a = 0; a < TI; ++a)
#pragma unroll
            for (int b = 0; b < 4; ++b) acc[cc][a][b] = fmaf(pa[a], vb[b], acc[cc][a][b]);
        }
      }
    }
  }

  float inv_l[TI];
#pragma unroll
  for (int a = 0; a < TI; ++a) {
    inv_l[a] = 1.f / row_l[a];
    const int i = q0 + ty + 16 * a;
    if (tx == 0 && i < lq) lse[bh * lq + i] = (row_m[a] + log2f(row_l[a])) * kLn2;
  }
#pragma unroll
  for (int cc = 0; cc < G::kAccChunks; ++cc) {
    if (cc * kChunk < dv) {
      __syncthreads();  // stage free
#pragma unroll
      for (int a = 0; a < TI; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) stage[(ty + 16 * a) * kStageStride + tx + 16 * b] = acc[cc][a][b] * inv_l[a];
      __syncthreads();
      store_tile<kChunk, BQ>(out_slab, out.stride_c, out.stride_l, stage, 1, kStageStride, cc * kChunk, dv, q0, lq, 1.f);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------
// delta[bh, i] = sum_c dO[n, h*dv + c, i] * O[n, h*dv + c, i], the D of dS = P * (dP - D).
// Block (64 queries, n * heads); thread (i = tid % 64, part = tid / 64) sums every 4th channel.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
attention_backward_delta_kernel(Operand<const scalar_t> grad_out, Operand<const scalar_t> out,
                                float* __restrict__ delta, AttnShape shape) {
  constexpr int kParts = kThreads / kChunk;
  __shared__ float grad_s[kChunk * kStageStride];  // [c][i]
  __shared__ float out_s[kChunk * kStageStride];   // [c][i]
  __shared__ float partial[kParts][kChunk];

  const int64_t bh = block_batch_head();
  if (bh >= shape.batch_heads) return;
  const int64_t n = bh / shape.heads;
  const int h = static_cast<int>(bh % shape.heads);
  const int dv = shape.dv, lq = shape.lq;
  const int q0 = blockIdx.x * kChunk;
  const int i = threadIdx.x % kChunk, part = threadIdx.x / kChunk;
  const scalar_t* grad_slab = grad_out.slab(n, static_cast<int64_t>(h) * dv);
  const scalar_t* out_slab = out.slab(n, static_cast<int64_t>(h) * dv);

  float sum = 0.f;
  for (int c0 = 0; c0 < dv; c0 += kChunk) {
    __syncthreads();
    load_tile<kChunk, kChunk>(grad_s, kStageStride, 1, grad_slab, grad_out.stride_c, grad_out.stride_l, c0, dv, q0, lq, 1.f);
    load_tile<kChunk, kChunk>(out_s, kStageStride, 1, out_slab, out.stride_c, out.stride_l, c0, dv, q0, lq, 1.f);
    __syncthreads();
    for (int c = part; c < kChunk; c += kParts) sum = fmaf(grad_s[c * kStageStride + i], out_s[c * kStageStride + i], sum);
  }
  partial[part][i] = sum;
  __syncthreads();
  if (part == 0 && q0 + i < lq) {
    float total = 0.f;
#pragma unroll
    for (int p = 0; p < kParts; ++p) total += partial[p][i];
    delta[bh * lq + q0 + i] = total;
  }
}

// Shared memory of the dkdv and dq kernels (floats):
//   two resident tiles [round_up(d, 64)][TILE + 1] (k and v, or q and dO)
//   stage  [64][65]
//   p_s    [TILE][65]   P, then dS, of the current 64 x TILE block of the attention matrix
template <int TILE>
size_t backward_smem_bytes(int dqk, int dv) {
  using G = TileGeometry<TILE>;
  return sizeof(float) *
         (static_cast<size_t>(round_up(dqk, kChunk) + round_up(dv, kChunk)) * G::kResidentStride +
          kChunk * kStageStride + TILE * kStageStride);
}

// Block (key tile of BKV keys, n * heads), looping over all query tiles of 64:
//   dv[j] = sum_i P[i, j] dO[i],   dk[j] = scale * sum_i dS[i, j] q[i],
//   P = exp2(s_log2 - lse * log2(e)),  dS = P * (dO . v[j] - delta[i]).
// Thread (ty, tx) holds keys j = ty + 16 a and query columns i = tx + 16 b of each 64-query tile.
template <typename scalar_t, int BKV>
__global__ void __launch_bounds__(kThreads)
attention_backward_dkdv_kernel(Operand<const scalar_t> grad_out, Operand<const scalar_t> q,
                               Operand<const scalar_t> k, Operand<const scalar_t> v, const float* __restrict__ lse,
                               const float* __restrict__ delta, Operand<scalar_t> grad_k, Operand<scalar_t> grad_v,
                               AttnShape shape, float scale, float scale_log2) {
  using G = TileGeometry<BKV>;
  constexpr int TJ = G::kRowsPerThread;
  constexpr int RS = G::kResidentStride;
  extern __shared__ float smem[];

  const int64_t bh = block_batch_head();
  if (bh >= shape.batch_heads) return;
  const int64_t n = bh / shape.heads;
  const int h = static_cast<int>(bh % shape.heads);
  const int dqk = shape.dqk, dv = shape.dv, lq = shape.lq, lk = shape.lk;
  const int k0 = blockIdx.x * BKV;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  const int dqk_pad = round_up(dqk, kChunk), dv_pad = round_up(dv, kChunk);
  float* k_s = smem;                  // [d][j]
  float* v_s = k_s + dqk_pad * RS;    // [c][j]
  float* stage = v_s + dv_pad * RS;   // q chunk or dO chunk as [channel][i]; outputs as [j][channel]
  float* p_s = stage + kChunk * kStageStride;  // [j][i]

  const scalar_t* q_slab = q.slab(n, static_cast<int64_t>(h) * dqk);
  const scalar_t* k_slab = k.slab(n, static_cast<int64_t>(h) * dqk);
  const scalar_t* v_slab = v.slab(n, static_cast<int64_t>(h) * dv);
  const scalar_t* grad_out_slab = grad_out.slab(n, static_cast<int64_t>(h) * dv);
  const float* lse_row = lse + bh * lq;
  const float* delta_row = delta + bh * lq;

  for (int c0 = 0; c0 < dqk_pad; c0 += kChunk) {
    load_tile<kChunk, BKV>(k_s + c0 * RS, RS, 1, k_slab, k.stride_c, k.stride_l, c0, dqk, k0, lk, 1.f);
  }
  for (int c0 = 0; c0 < dv_pad; c0 += kChunk) {
    load_tile<kChunk, BKV>(v_s + c0 * RS, RS, 1, v_slab, v.stride_c, v.stride_l, c0, dv, k0, lk, 1.f);
  }

  float acc_k[G::kAccChunks][TJ][4];  // dk[j][cc * 64 + tx + 16 b] / scale
  float acc_v[G::kAccChunks][TJ][4];  // dv[j][cc * 64 + tx + 16 b]
#pragma unroll
  for (int cc = 0; cc < G::kAccChunks; ++cc)
#pragma unroll
    for (int a = 0; a < TJ; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) acc_k[cc][a][b] = acc_v[cc][a][b] = 0.f;

  for (int q0 = 0; q0 < lq; q0 += kChunk) {
    float lse_log2[4], row_delta[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int i = q0 + tx + 16 * b;
      lse_log2[b] = i < lq ? lse_row[i] * kLog2e : 0.f;
      row_delta[b] = i < lq ? delta_row[i] : 0.f;
    }

    // s[a][b] = log2-domain logit of key ty + 16 a and query tx + 16 b, from q times scale * log2(e)
    // summed over d in the forward's order: bitwise the forward's logits, so P = exp2(s - lse2)
    // differs from the forward's P only by the rounding of lse.
    float s[TJ][4];
#pragma unroll
    for (int a = 0; a < TJ; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) s[a][b] = 0.f;
    for (int d0 = 0; d0 < dqk; d0 += kChunk) {
      __syncthreads();  // stage and p_s free (resident tiles complete on the first pass)
      load_tile<kChunk, kChunk>(stage, kStageStride, 1, q_slab, q.stride_c, q.stride_l, d0, dqk, q0, lq, scale_log2);
      __syncthreads();
      const int dc = min(kChunk, dqk - d0);
#pragma unroll 4
      for (int d = 0; d < dc; ++d) {
        float ka[TJ], qb[4];
#pragma unroll
        for (int a = 0; a < TJ; ++a) ka[a] = k_s[(d0 + d) * RS + ty + 16 * a];
#pragma unroll
        for (int b = 0; b < 4; ++b) qb[b] = stage[d * kStageStride + tx + 16 * b];
#pragma unroll
        for (int a = 0; a < TJ; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b) s[a][b] = fmaf(ka[a], qb[b], s[a][b]);
      }
    }
    // P, zero outside the valid queries and keys.
#pragma unroll
    for (int a = 0; a < TJ; ++a) {
      const bool key_valid = k0 + ty + 16 * a < lk;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const bool query_valid = q0 + tx + 16 * b < lq;
        s[a][b] = key_valid && query_valid ? exp2f(s[a][b] - lse_log2[b]) : 0.f;
        p_s[(ty + 16 * a) * kStageStride + tx + 16 * b] = s[a][b];
      }
    }

    // dP = v . dO and dv += P dO, one 64-channel chunk of dO at a time.
    float dp[TJ][4];
#pragma unroll
    for (int a = 0; a < TJ; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) dp[a][b] = 0.f;
    const int ic = min(kChunk, lq - q0);
#pragma unroll
    for (int cc = 0; cc < G::kAccChunks; ++cc) {
      if (cc * kChunk < dv) {
        __syncthreads();  // p_s written, stage free
        load_tile<kChunk, kChunk>(stage, kStageStride, 1, grad_out_slab, grad_out.stride_c, grad_out.stride_l,
                                  cc * kChunk, dv, q0, lq, 1.f);
        __syncthreads();
        const int dc = min(kChunk, dv - cc * kChunk);
#pragma unroll 4
        for (int c = 0; c < dc; ++c) {
          float va[TJ], gb[4];
#pragma unroll
          for (int a = 0; a < TJ; ++a) va[a] = v_s[(cc * kChunk + c) * RS + ty + 16 * a];
#pragma unroll
          for (int b = 0; b < 4; ++b) gb[b] = stage[c * kStageStride + tx + 16 * b];
#pragma unroll
          for (int a = 0; a < TJ; ++a)
#pragma unroll
            for (int b = 0; b < 4; ++b) dp[a][b] = fmaf(va[a], gb[b], dp[a][b]);
        }
        // here tx + 16 b indexes channels: dv[j][c] += sum_i P[j][i] dO[i][c]
#pragma unroll 4
        for (int i = 0; i < ic; ++i) {
          float pa[TJ], gb[4];
#pragma unroll
          for (int a = 0; a < TJ; ++a) pa[a] = p_s[(ty + 16 * a) * kStageStride + i];
#pragma unroll
          for (int b = 0; b < 4; ++b) gb[b] = stage[(tx + 16 * b) * kStageStride + i];
#pragma unroll
          for (int a = 0; a < TJ; ++a)
#pragma unroll
            for (int b = 0; b < 4; ++b) acc_v[cc][a][b] = fmaf(pa[a], gb[b], acc_v[cc][a][b]);
        }
      }
    }

    // dS = P * (dP - delta) replaces P in p_s once every thread is done reading P.
    __syncthreads();
#pragma unroll
    for (int a = 0; a < TJ; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) p_s[(ty + 16 * a) * kStageStride + tx + 16 * b] = s[a][b] * (dp[a][b] - row_delta[b]);

    // dk += dS q, one 64-channel chunk of q at a time; tx + 16 b indexes channels.
#pragma unroll
    for (int cc = 0; cc < G::kAccChunks; ++cc) {
      if (cc * kChunk < dqk) {
        __syncthreads();  // p_s written, stage free
        load_tile<kChunk, kChunk>(stage, kStageStride, 1, q_slab, q.stride_c, q.stride_l, cc * kChunk, dqk, q0, lq, 1.f);
        __syncthreads();
#pragma unroll 4
        for (int i = 0; i < ic; ++i) {
          float dsa[TJ], qb[4];
#pragma unroll
          for (int a = 0; a < TJ; ++a) dsa[a] = p_s[(ty + 16 * a) * kStageStride + i];
#pragma unroll
          for (int b = 0; b < 4; ++b) qb[b] = stage[(tx + 16 * b) * kStageStride + i];
#pragma unroll
          for (int a = 0; a < TJ; ++a)
#pragma unroll
            for (int b = 0; b < 4; ++b) acc_k[cc][a][b] = fmaf(dsa[a], qb[b], acc_k[cc][a][b]);
        }
      }
    }
  }

  // Write dk (times scale) and dv through the stage as [j][channel].
  scalar_t* grad_k_slab = grad_k.slab(n, static_cast<int64_t>(h) * dqk);
  scalar_t* grad_v_slab = grad_v.slab(n, static_cast<int64_t>(h) * dv);
#pragma unroll
  for (int cc = 0; cc < G::kAccChunks; ++cc) {
    if (cc * kChunk < dqk) {
      __syncthreads();
#pragma unroll
      for (int a = 0; a < TJ; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) stage[(ty + 16 * a) * kStageStride + tx + 16 * b] = acc_k[cc][a][b];
      __syncthreads();
      store_tile<kChunk, BKV>(grad_k_slab, grad_k.stride_c, grad_k.stride_l, stage, 1, kStageStride, cc * kChunk, dqk,
                              k0, lk, scale);
    }
  }
#pragma unroll
  for (int cc = 0; cc < G::kAccChunks; ++cc) {
    if (cc * kChunk < dv) {
      __syncthreads();
#pragma unroll
      for (int a = 0; a < TJ; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) stage[(ty + 16 * a) * kStageStride + tx + 16 * b] = acc_v[cc][a][b];
      __syncthreads();
      store_tile<kChunk, BKV>(grad_v_slab, grad_v.stride_c, grad_v.stride_l, stage, 1, kStageStride, cc * kChunk, dv,
                              k0, lk, 1.f);
    }
  }
}

// Block (query tile of BQ queries, n * heads), looping over all key tiles of 64:
//   dq[i] = scale * sum_j dS[i, j] k[j],  dS = P * (dO[i] . v[j] - delta[i]).
// Thread (ty, tx) holds queries i = ty + 16 a and key columns j = tx + 16 b of each 64-key tile.
template <typename scalar_t, int BQ>
__global__ void __launch_bounds__(kThreads)
attention_backward_dq_kernel(Operand<const scalar_t> grad_out, Operand<const scalar_t> q, Operand<const scalar_t> k,
                             Operand<const scalar_t> v, const float* __restrict__ lse,
                             const float* __restrict__ delta, Operand<scalar_t> grad_q, AttnShape shape, float scale,
                             float scale_log2) {
  using G = TileGeometry<BQ>;
  constexpr int TI = G::kRowsPerThread;
  constexpr int RS = G::kResidentStride;
  extern __shared__ float smem[];

  const int64_t bh = block_batch_head();
  if (bh >= shape.batch_heads) return;
  const int64_t n = bh / shape.heads;
  const int h = static_cast<int>(bh % shape.heads);
  const int dqk = shape.dqk, dv = shape.dv, lq = shape.lq, lk = shape.lk;
  const int q0 = blockIdx.x * BQ;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  const int dqk_pad = round_up(dqk, kChunk), dv_pad = round_up(dv, kChunk);
  float* q_s = smem;                   // [d][i], times scale * log2(e)
  float* grad_s = q_s + dqk_pad * RS;  // dO as [c][i]
  float* stage = grad_s + dv_pad * RS; // k chunk as [d][j], v chunk as [c][j]; dq as [i][d]
  float* ds_s = stage + kChunk * kStageStride;  // [i][j]

  const scalar_t* q_slab = q.slab(n, static_cast<int64_t>(h) * dqk);
  const scalar_t* k_slab = k.slab(n, static_cast<int64_t>(h) * dqk);
  const scalar_t* v_slab = v.slab(n, static_cast<int64_t>(h) * dv);
  const scalar_t* grad_out_slab = grad_out.slab(n, static_cast<int64_t>(h) * dv);

  for (int c0 = 0; c0 < dqk_pad; c0 += kChunk) {
    load_tile<kChunk, BQ>(q_s + c0 * RS, RS, 1, q_slab, q.stride_c, q.stride_l, c0, dqk, q0, lq, scale_log2);
  }
  for (int c0 = 0; c0 < dv_pad; c0 += kChunk) {
    load_tile<kChunk, BQ>(grad_s + c0 * RS, RS, 1, grad_out_slab, grad_out.stride_c, grad_out.stride_l, c0, dv, q0,
                          lq, 1.f);
  }

  float lse_log2[TI], row_delta[TI];
#pragma unroll
  for (int a = 0; a < TI; ++a) {
    const int i = q0 + ty + 16 * a;
    lse_log2[a] = i < lq ? lse[bh * lq + i] * kLog2e : 0.f;
    row_delta[a] = i < lq ? delta[bh * lq + i] : 0.f;
  }

  float acc[G::kAccChunks][TI][4];  // dq[i][cc * 64 + tx + 16 b] / scale
#pragma unroll
  for (int cc = 0; cc < G::kAccChunks; ++cc)
#pragma unroll
    for (int a = 0; a < TI; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[cc][a][b] = 0.f;

  for (int k0 = 0; k0 < lk; k0 += kChunk) {
    float s[TI][4];
#pragma unroll
    for (int a = 0; a < TI; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) s[a][b] = 0.f;
    for (int d0 = 0; d0 < dqk; d0 += kChunk) {
      __syncthreads();  // stage and ds_s free (resident tiles complete on the first pass)
      load_tile<kChunk, kChunk>(stage, kStageStride, 1, k_slab, k.stride_c, k.stride_l, d0, dqk, k0, lk, 1.f);
      __syncthreads();
      const int dc = min(kChunk, dqk - d0);
#pragma unroll 4
      for (int d = 0; d < dc; ++d) {
        float qa[TI], kb[4];
#pragma unroll
        for (int a = 0; a < TI; ++a) qa[a] = q_s[(d0 + d) * RS + ty + 16 * a];
#pragma unroll
        for (int b = 0; b < 4; ++b) kb[b] = stage[d * kStageStride + tx + 16 * b];
#pragma unroll
        for (int a = 0; a < TI; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b) s[a][b] = fmaf(qa[a], kb[b], s[a][b]);
      }
    }
    // dP = dO . v, one 64-channel chunk of v at a time.
    float dp[TI][4];
#pragma unroll
    for (int a = 0; a < TI; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) dp[a][b] = 0.f;
    for (int c0 = 0; c0 < dv; c0 += kChunk) {
      __syncthreads();
      load_tile<kChunk, kChunk>(stage, kStageStride, 1, v_slab, v.stride_c, v.stride_l, c0, dv, k0, lk, 1.f);
      __syncthreads();
      const int dc = min(kChunk, dv - c0);
#pragma unroll 4
      for (int c = 0; c < dc; ++c) {
        float ga[TI], vb[4];
#pragma unroll
        for (int a = 0; a < TI; ++a) ga[a] = grad_s[(c0 + c) * RS + ty + 16 * a];
#pragma unroll
        for (int b = 0; b < 4; ++b) vb[b] = stage[c * kStageStride + tx + 16 * b];
#pragma unroll
        for (int a = 0; a < TI; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b) dp[a][b] = fmaf(ga[a], vb[b], dp[a][b]);
      }
    }
    // dS = P * (dP - delta), zero outside the valid keys (rows past lq are never stored).
#pragma unroll
    for (int a = 0; a < TI; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const bool key_valid = k0 + tx + 16 * b < lk;
        const float p = exp2f(s[a][b] - lse_log2[a]);
        ds_s[(ty + 16 * a) * kStageStride + tx + 16 * b] = key_valid ? p * (dp[a][b] - row_delta[a]) : 0.f;
      }

    // dq += dS k, one 64-channel chunk of k at a time; tx + 16 b indexes channels.
    const int jc = min(kChunk, lk - k0);
#pragma unroll
    for (int cc = 0; cc < G::kAccChunks; ++cc) {
      if (cc * kChunk < dqk) {
        __syncthreads();  // ds_s written, stage free
        load_tile<kChunk, kChunk>(stage, kStageStride, 1, k_slab, k.stride_c, k.stride_l, cc * kChunk, dqk, k0, lk, 1.f);
        __syncthreads();
#pragma unroll 4
        for (int j = 0; j < jc; ++j) {
          float dsa[TI], kb[4];
#pragma unroll
          for (int a = 0; a < TI; ++a) dsa[a] = ds_s[(ty + 16 * a) * kStageStride + j];
#pragma unroll
          for (int b = 0; b < 4; ++b) kb[b] = stage[(tx + 16 * b) * kStageStride + j];
#pragma unroll
          for (int a = 0; a < TI; ++a)
#pragma unroll
            for (int b = 0; b < 4; ++b) acc[cc][a][b] = fmaf(dsa[a], kb[b], acc[cc][a][b]);
        }
      }
    }
  }

  scalar_t* grad_q_slab = grad_q.slab(n, static_cast<int64_t>(h) * dqk);
#pragma unroll
  for (int cc = 0; cc < G::kAccChunks; ++cc) {
    if (cc * kChunk < dqk) {
      __syncthreads();
#pragma unroll
      for (int a = 0; a < TI; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) stage[(ty + 16 * a) * kStageStride + tx + 16 * b] = acc[cc][a][b];
      __syncthreads();
      store_tile<kChunk, BQ>(grad_q_slab, grad_q.stride_c, grad_q.stride_l, stage, 1, kStageStride, cc * kChunk, dqk,
                             q0, lq, scale);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------
#define FASTATTN_DISPATCH_FLOAT_HALF_BFLOAT16(TYPE, NAME, ...)  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)              \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// "spatial_attention (CUDA): " and the parts (message.cuh says why not TORCH_CHECK's own streaming)
template <typename... Parts>
std::string message(const Parts&... parts) {
  return message_text("spatial_attention (CUDA): ", parts...);
}

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), message(name, " must be a CUDA tensor, got device ", t.device()));
  TORCH_CHECK(t.device() == q.device(), message(name, " is on ", t.device(), " but q is on ", q.device()));
  TORCH_CHECK(t.dim() == 3, message(name, " must be 3-D (N, C, L), got shape ", t.sizes()));
  TORCH_CHECK(t.scalar_type() == q.scalar_type(),
              message(name, " has dtype ", t.scalar_type(), " but q has dtype ", q.scalar_type()));
}

// Checks q, k, v and returns their attention shape.
AttnShape attention_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads) {
  check_operand(q, "q", q);
  check_operand(k, "k", q);
  check_operand(v, "v", q);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              message("dtype must be float32, float16 or bfloat16, got ", dtype));
  TORCH_CHECK(heads >= 1, message("heads must be >= 1, got ", heads));
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0),
              message("batch sizes differ: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes()));
  TORCH_CHECK(k.size(1) == q.size(1),
              message("q and k must have the same channels, got q ", q.sizes(), " and k ", k.sizes()));
  TORCH_CHECK(v.size(2) == k.size(2),
              message("k and v must have the same length, got k ", k.sizes(), " and v ", v.sizes()));
  TORCH_CHECK(q.size(1) % heads == 0 && v.size(1) % heads == 0,
              message("heads=", heads, " must divide the channels of q ", q.sizes(), " and v ", v.sizes()));
  const int64_t dqk = q.size(1) / heads, dv = v.size(1) / heads;
  TORCH_CHECK(dqk >= 1, message("q and k need at least one channel per head, got ", q.sizes(), " with heads=", heads));
  TORCH_CHECK(dqk <= kMaxHeadDim && dv <= kMaxHeadDim,
              message("head dims up to ", kMaxHeadDim, " are supported, got d_qk=", dqk, ", d_v=", dv));
  // positions and channels are int in the kernels (offsets are int64): keep a tile of headroom
  TORCH_CHECK(q.size(2) <= INT_MAX - kChunk && k.size(2) <= INT_MAX - kChunk,
              message("lengths up to ", INT_MAX - kChunk, " are supported, got Lq=", q.size(2), ", Lk=", k.size(2)));
  const int64_t batch_heads = q.size(0) * heads;
  TORCH_CHECK(batch_heads <= int64_t{65535} * 65535, message("N * heads = ", batch_heads, " is too large for the grid"));
  return {batch_heads, static_cast<int>(heads), static_cast<int>(dqk), static_cast<int>(dv),
          static_cast<int>(q.size(2)), static_cast<int>(k.size(2))};
}

// Grid of (tiles along L, N * heads folded into y and z).
dim3 attention_grid(int tiles, int64_t batch_heads) {
  const int64_t y = std::min<int64_t>(batch_heads, 65535);
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(y), static_cast<unsigned>(ceil_div(batch_heads, y)));
}

// Raises the kernel's dynamic shared-memory limit to smem_bytes, after checking the device has it.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t smem_bytes, const char* what) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(smem_bytes <= props->sharedMemPerBlockOptin,
              message(what, " needs ", smem_bytes, " bytes of shared memory per block, the device allows ",
                      props->sharedMemPerBlockOptin));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)));
}

std::tuple<at::Tensor, at::Tensor> spatial_attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, int64_t heads, double scale) {
  const AttnShape shape = attention_shape(q, k, v, heads);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t n = q.size(0), cv = v.size(1), lq = q.size(2);
  // out is channel-last when q is (as the reference does), else contiguous
  const bool channel_last = q.stride(1) == 1 && q.size(1) > 1;
  at::Tensor out = channel_last ? at::empty({n, lq, cv}, q.options()).transpose(1, 2) : at::empty({n, cv, lq}, q.options());
  at::Tensor lse = at::empty({n, heads, lq}, q.options().dtype(at::kFloat));
  if (shape.batch_heads == 0 || lq == 0) return {out, lse};
  if (shape.lk == 0) {  // softmax over no keys: the reference's empty sum
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const float scale_log2 = static_cast<float>(scale) * kLog2e;
  if (attention_mma::forward_applies(q, shape)) {  // tensor cores, when switched on (variants.cuh)
    attention_mma::forward(q, k, v, out, lse, shape, scale_log2);
    return {out, lse};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTATTN_DISPATCH_FLOAT_HALF_BFLOAT16(q.scalar_type(), "spatial_attention_forward_cuda", [&] {
    with_tile_rows(std::max(shape.dqk, shape.dv), [&](auto tile) {
      constexpr int BQ = decltype(tile)::value;
      auto kernel = spatial_attention_forward_kernel<scalar_t, BQ>;
      const size_t smem = forward_smem_bytes<BQ>(shape.dqk);
      allow_dynamic_smem(kernel, smem, "the forward kernel");
      kernel<<<attention_grid(ceil_div(shape.lq, BQ), shape.batch_heads), kThreads, smem, stream>>>(
          operand<const scalar_t>(q), operand<const scalar_t>(k), operand<const scalar_t>(v), operand<scalar_t>(out),
          lse.data_ptr<float>(), shape, scale_log2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t heads, double scale) {
  const AttnShape shape = attention_shape(q, k, v, heads);
  check_operand(grad_out, "grad_out", q);
  check_operand(out, "out", q);
  const std::vector<int64_t> out_shape{q.size(0), v.size(1), q.size(2)};
  const std::vector<int64_t> lse_shape{q.size(0), heads, q.size(2)};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape) && out.sizes() == at::IntArrayRef(out_shape),
              message("backward: grad_out and out must have shape ", at::IntArrayRef(out_shape), ", got ",
                      grad_out.sizes(), " and ", out.sizes()));
  TORCH_CHECK(lse.is_cuda() && lse.device() == q.device() && lse.scalar_type() == at::kFloat,
              message("backward: lse must be a float32 tensor on ", q.device(), ", got ", lse.scalar_type(), " on ",
                      lse.device()));
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lse_shape),
              message("backward: lse must have shape (N, heads, Lq) = ", at::IntArrayRef(lse_shape), ", got ",
                      lse.sizes()));
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::empty_like(k);
  at::Tensor grad_v = at::empty_like(v);
  if (shape.batch_heads == 0) return {grad_q, grad_k, grad_v};
  if (shape.lq == 0 || shape.lk == 0) {  // no attention pairs: every gradient is zero
    grad_q.zero_();
    grad_k.zero_();
    grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor delta = at::empty({q.size(0), heads, q.size(2)}, q.options().dtype(at::kFloat));
  const float scale_f = static_cast<float>(scale);
  const float scale_log2 = scale_f * kLog2e;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int max_dim = std::max(shape.dqk, shape.dv);

  FASTATTN_DISPATCH_FLOAT_HALF_BFLOAT16(q.scalar_type(), "spatial_attention_backward_cuda", [&] {
    const auto grad_out_op = operand<const scalar_t>(grad_out);
    const auto q_op = operand<const scalar_t>(q);
    const auto k_op = operand<const scalar_t>(k);
    const auto v_op = operand<const scalar_t>(v);

    attention_backward_delta_kernel<scalar_t>
        <<<attention_grid(ceil_div(shape.lq, kChunk), shape.batch_heads), kThreads, 0, stream>>>(
            grad_out_op, operand<const scalar_t>(out), delta.data_ptr<float>(), shape);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // Tensor cores when switched on (variants.cuh). Either forward's lse fits either backward:
    // both are the natural-log log-sum-exp of the float32 logits.
    if (attention_mma::backward_applies(q, shape)) {
      attention_mma::backward(grad_out, q, k, v, lse_c, delta, grad_q, grad_k, grad_v, shape, scale_f, scale_log2);
      return;
    }
    with_tile_rows(max_dim, [&](auto tile) {
      constexpr int TILE = decltype(tile)::value;
      const size_t smem = backward_smem_bytes<TILE>(shape.dqk, shape.dv);

      auto dkdv_kernel = attention_backward_dkdv_kernel<scalar_t, TILE>;
      allow_dynamic_smem(dkdv_kernel, smem, "the dk/dv kernel");
      dkdv_kernel<<<attention_grid(ceil_div(shape.lk, TILE), shape.batch_heads), kThreads, smem, stream>>>(
          grad_out_op, q_op, k_op, v_op, lse_c.data_ptr<float>(), delta.data_ptr<float>(), operand<scalar_t>(grad_k),
          operand<scalar_t>(grad_v), shape, scale_f, scale_log2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      auto dq_kernel = attention_backward_dq_kernel<scalar_t, TILE>;
      allow_dynamic_smem(dq_kernel, smem, "the dq kernel");
      dq_kernel<<<attention_grid(ceil_div(shape.lq, TILE), shape.batch_heads), kThreads, smem, stream>>>(
          grad_out_op, q_op, k_op, v_op, lse_c.data_ptr<float>(), delta.data_ptr<float>(), operand<scalar_t>(grad_q),
          shape, scale_f, scale_log2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("spatial_attention_forward", &spatial_attention_forward_cuda);
  m.impl("spatial_attention_backward", &spatial_attention_backward_cuda);
}

}  // namespace fastattn
