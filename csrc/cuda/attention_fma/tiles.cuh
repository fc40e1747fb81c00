// Shared pieces of the FFMA attention kernels (forward.cuh, backward.cuh): constants, strided
// operands, tile copies between global and shared memory, row reductions, tile geometry, and the
// register-tile loops of the kernels. Included by csrc/cuda/attention.cu only: everything here
// lives in that translation unit's anonymous namespace.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "../attention_mma/params.cuh"

#include <cmath>
#include <cstdint>
#include <type_traits>

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

// Head h of map n, for the block of flat head index bh = n * heads + h, and its channel slabs.
struct Head {
  int64_t n;
  int h, dqk, dv;
  __device__ Head(int64_t bh, const AttnShape& shape)
      : n(bh / shape.heads), h(static_cast<int>(bh % shape.heads)), dqk(shape.dqk), dv(shape.dv) {}
  // channels [h * dqk, (h + 1) * dqk) of map n of q, k or their gradients
  template <typename T>
  __device__ T* qk(const Operand<T>& t) const { return t.slab(n, static_cast<int64_t>(h) * dqk); }
  // channels [h * dv, (h + 1) * dv) of map n of v, out or their gradients
  template <typename T>
  __device__ T* v(const Operand<T>& t) const { return t.slab(n, static_cast<int64_t>(h) * dv); }
};

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

// Zeroes a register tile.
template <int ROWS, int COLS>
__device__ __forceinline__ void zero(float (&x)[ROWS][COLS]) {
#pragma unroll
  for (int a = 0; a < ROWS; ++a)
#pragma unroll
    for (int b = 0; b < COLS; ++b) x[a][b] = 0.f;
}

// acc[a][b] += sum over k < count of lhs(k, a) * rhs(k, b): the rank-1 updates of a thread's
// ROWS x 4 register tile (rows ty + 16 a, columns tx + 16 b), in k order, one FFMA each. lhs and
// rhs read the two operands from shared memory; all ROWS + 4 loads of a step come first.
template <int ROWS, typename Lhs, typename Rhs>
__device__ __forceinline__ void accumulate_products(float (&acc)[ROWS][4], int count, Lhs lhs, Rhs rhs) {
#pragma unroll 4
  for (int k = 0; k < count; ++k) {
    float x[ROWS], y[4];
#pragma unroll
    for (int a = 0; a < ROWS; ++a) x[a] = lhs(k, a);
#pragma unroll
    for (int b = 0; b < 4; ++b) y[b] = rhs(k, b);
#pragma unroll
    for (int a = 0; a < ROWS; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(x[a], y[b], acc[a][b]);
  }
}

// Writes a thread's accumulators, value(cc, a, b) for row ty + 16 a and channel cc * 64 + tx + 16 b,
// to channels [0, dim) and rows [l0, l0 + TILE) of a slab, times mul: 64 channels at a time
// through the stage as [row][channel].
template <int TILE, typename scalar_t, typename Value>
__device__ __forceinline__ void store_accumulators(scalar_t* slab, const Operand<scalar_t>& dst, float* stage, int dim,
                                                   int l0, int l_end, float mul, int ty, int tx, Value value) {
#pragma unroll
  for (int cc = 0; cc < TileGeometry<TILE>::kAccChunks; ++cc) {
    if (cc * kChunk < dim) {
      __syncthreads();  // stage free
#pragma unroll
      for (int a = 0; a < TILE / 16; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) stage[(ty + 16 * a) * kStageStride + tx + 16 * b] = value(cc, a, b);
      __syncthreads();
      store_tile<kChunk, TILE>(slab, dst.stride_c, dst.stride_l, stage, 1, kStageStride, cc * kChunk, dim, l0, l_end,
                               mul);
    }
  }
}

}  // namespace
}  // namespace fastattn
