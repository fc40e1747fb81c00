// Warp-level building blocks shared by the forward and backward kernels: the two products every
// kernel is made of (X Y^T over channels, and weights-in-registers times a tile), and the trip of
// accumulators back to a shared-memory tile. Each warp owns 16 rows; the accumulator layout is the
// m16n8k16 C fragment (mma_utils.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_traits.cuh"
#include "mma_utils.cuh"
#include "params.cuh"

namespace fastattn {
namespace attention_mma {

// This CTA's (n, head); the grid's y is folded into y and z to stay under 65535 per axis.
struct CtaHead {
  int64_t bh, n;  // bh = n * heads + h
  int h;
  __device__ explicit CtaHead(const Shape& shape)
      : bh(blockIdx.y + static_cast<int64_t>(blockIdx.z) * gridDim.y),
        n(bh / shape.heads),
        h(static_cast<int>(bh % shape.heads)) {}
  // The start of this head's channel slab in an operand of head_dim channels per head.
  template <typename T>
  __device__ T* slab(const Operand& op, int head_dim) const {
    return op.slab<T>(n, static_cast<int64_t>(h) * head_dim);
  }
};

// Writes a warp's 16 x (8 * kBlocks) float accumulators (rows row0.., channels 0..), times the
// per-row factor, into a tile as T. Lane holds rows row0 + g and row0 + g + 8, columns 8 nb + 2t, +1.
template <typename Tile, int kBlocks, typename T>
__device__ __forceinline__ void accumulators_to_tile(T* tile, const float (&acc)[kBlocks][4], int row0,
                                                     const float (&factor)[2]) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int nb = 0; nb < kBlocks; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int position = row0 + g + 8 * (e / 2), channel = 8 * nb + 2 * t + e % 2;
      tile[Tile::offset(position, channel)] = from_float<T>(acc[nb][e] * factor[e / 2]);
    }
}

template <int kBlocks>
__device__ __forceinline__ void zero(float (&acc)[kBlocks][4]) {
#pragma unroll
  for (int nb = 0; nb < kBlocks; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nb][e] = 0.f;
}

// acc (16 rows of the warp x 8 kCols/8 columns) += X Y^T over channels [0, channels): X's rows are
// the warp's 16 positions of tile x from row0, Y's the kCols positions of tile y.
template <typename XTile, typename YTile, int kCols, typename T>
__device__ __forceinline__ void gemm_by_position(float (&acc)[kCols / 8][4], const T* x, int row0, const T* y,
                                                 int channels) {
#pragma unroll
  for (int kk = 0; kk < XTile::kChannels / 16; ++kk) {
    if (16 * kk < channels) {
      uint32_t a[4];
      XTile::template fragment_by_position<kOrderA>(a, x, row0, 16 * kk);
#pragma unroll
      for (int nb2 = 0; nb2 < kCols / 16; ++nb2) {
        uint32_t b[4];
        YTile::template fragment_by_position<kOrderB>(b, y, 16 * nb2, 16 * kk);
        mma_16816<T>(acc[2 * nb2], a, b[0], b[1]);
        mma_16816<T>(acc[2 * nb2 + 1], a, b[2], b[3]);
      }
    }
  }
}

// acc (16 rows x kChannels) += W Y, W the warp's 16 x kPositions weights in accumulators (P, dS),
// Y[position][channel] tile y; channels past `channels` are skipped (their accumulators stay 0).
template <typename YTile, int kPositions, typename T>
__device__ __forceinline__ void gemm_weights(float (&acc)[YTile::kChannels / 8][4], const float (&w)[kPositions / 8][4],
                                             const T* y, int channels) {
#pragma unroll
  for (int kk = 0; kk < kPositions / 16; ++kk) {
    uint32_t a[4];
    accumulators_to_a<T>(a, w[2 * kk], w[2 * kk + 1]);
#pragma unroll
    for (int cb2 = 0; cb2 < YTile::kChannels / 16; ++cb2) {
      if (16 * cb2 < channels) {
        uint32_t b[4];
        YTile::template fragment_by_channel<kOrderB>(b, y, 16 * cb2, 16 * kk);
        mma_16816<T>(acc[2 * cb2], a, b[0], b[1]);
        mma_16816<T>(acc[2 * cb2 + 1], a, b[2], b[3]);
      }
    }
  }
}

}  // namespace attention_mma
}  // namespace fastattn
