// Tile sizes of the tensor-core attention kernels, named once per kernel, and the layout of a
// tile in shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "mma_utils.cuh"

namespace fastattn {
namespace attention_mma {

// A positions x channels tile of one head in shared memory, in its 16-bit dtype. kLContiguous
// (NCHW inputs): stored [channel][position], positions contiguous; otherwise [position][channel].
// Rows are padded by 8 elements (16 bytes): row starts then step 16 bytes modulo 128, so the 8 rows
// an ldmatrix reads (and the 16-byte chunks cp.async writes) fall in distinct bank groups.
template <int kPositions_, int kChannels_, bool kLContiguous_>
struct SmemTile {
  static constexpr int kPositions = kPositions_, kChannels = kChannels_;
  static constexpr bool kLContiguous = kLContiguous_;
  static constexpr int kRows = kLContiguous ? kChannels : kPositions;
  static constexpr int kWidth = kLContiguous ? kPositions : kChannels;  // the contiguous axis
  static constexpr int kStride = kWidth + 8;
  static constexpr int kElems = kRows * kStride;
  static_assert(kWidth % 16 == 0 && kRows % 16 == 0, "tiles are whole 16 x 16 blocks");

  __device__ static int offset(int position, int channel) {
    return kLContiguous ? channel * kStride + position : position * kStride + channel;
  }
  // The 16 x 16 block at (position0, channel0) of X[position][channel] (Q, K, V, dO as the
  // operand whose rows are positions: A of Q K^T, B of Q K^T, ...).
  template <bool kOrderA, typename T>
  __device__ static void fragment_by_position(uint32_t (&r)[4], const T* tile, int position0, int channel0) {
    load_fragment<!kLContiguous, kOrderA>(r, tile, kStride, position0, channel0);
  }
  // The 16 x 16 block at (channel0, position0) of X[channel][position] (V as B of P V, dO as B of
  // P^T dO, Q as B of dS^T Q, K as B of dS K).
  template <bool kOrderA, typename T>
  __device__ static void fragment_by_channel(uint32_t (&r)[4], const T* tile, int channel0, int position0) {
    load_fragment<kLContiguous, kOrderA>(r, tile, kStride, channel0, position0);
  }
};

constexpr bool kOrderA = true, kOrderB = false;

// What every kernel's traits share: the dtype, the padded head dim, the tile layout, 4 warps of 16
// rows each, and two cp.async stages for the streamed tiles.
template <typename T, int kHeadDim_, bool kLContiguous_>
struct KernelTraits {
  using Element = T;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kLContiguous = kLContiguous_;
  static constexpr int kWarps = 4, kThreads = 32 * kWarps;
  static constexpr int kRowsPerCta = 16 * kWarps;
  static constexpr int kStages = 2;
};

// Forward: a CTA of 4 warps owns 64 queries (16 per warp) and walks the keys in tiles of kBlockN,
// double-buffered through cp.async. Q is read from shared memory at each key tile (not held in
// registers): at d = 256 the 128 output accumulators per lane leave no room for it.
template <typename T, int kHeadDim_, bool kLContiguous_>
struct ForwardTraits : KernelTraits<T, kHeadDim_, kLContiguous_> {
  using Base = KernelTraits<T, kHeadDim_, kLContiguous_>;
  static constexpr int kBlockM = Base::kRowsPerCta;
  static constexpr int kBlockN = kHeadDim_ <= 128 ? 64 : 32;
  // CTAs per SM the register budget must allow (__launch_bounds__): 16 warps at d = 64, 8 above.
  static constexpr int kMinCtasPerSm = kHeadDim_ <= 64 ? 4 : 2;
  using QTile = SmemTile<kBlockM, kHeadDim_, kLContiguous_>;
  using KVTile = SmemTile<kBlockN, kHeadDim_, kLContiguous_>;
  static constexpr int kSmemBytes = sizeof(T) * (QTile::kElems + 2 * Base::kStages * KVTile::kElems);
};

// Backward, FlashAttention-2's split: the dk/dv kernel holds a key tile (16 keys per warp) and walks
// the queries; the dq kernel holds a query tile and walks the keys, so every gradient element is
// summed by one lane in a fixed order (no atomics).
template <typename T, int kHeadDim_, bool kLContiguous_>
struct BackwardTraits : KernelTraits<T, kHeadDim_, kLContiguous_> {
  using Base = KernelTraits<T, kHeadDim_, kLContiguous_>;
  static constexpr int kMinCtasPerSm = 2;  // 8 warps per SM: two gradient tiles of d / 2 floats per lane
  // dk/dv kernel: 64 resident keys, queries streamed kQueryTile at a time (32 at d = 128 keeps
  // dk, dv (64 + 64 floats per lane) and the 16-column S^T and dP^T blocks within 255 registers).
  static constexpr int kKeyBlock = Base::kRowsPerCta;
  static constexpr int kQueryTile = kHeadDim_ <= 64 ? 64 : 32;
  // dq kernel: 64 resident queries, keys streamed 64 at a time.
  static constexpr int kQueryBlock = Base::kRowsPerCta;
  static constexpr int kKeyTile = 64;

  using KeyBlockTile = SmemTile<kKeyBlock, kHeadDim_, kLContiguous_>;
  using QueryStreamTile = SmemTile<kQueryTile, kHeadDim_, kLContiguous_>;
  using QueryBlockTile = SmemTile<kQueryBlock, kHeadDim_, kLContiguous_>;
  using KeyStreamTile = SmemTile<kKeyTile, kHeadDim_, kLContiguous_>;
  // dk/dv: K, V resident; Q, dO and the queries' lse * log2(e) and delta per stage.
  static constexpr int kDkdvSmemBytes =
      sizeof(T) * (2 * KeyBlockTile::kElems + 2 * Base::kStages * QueryStreamTile::kElems) +
      sizeof(float) * 2 * Base::kStages * kQueryTile;
  // dq: Q, dO resident; K, V per stage.
  static constexpr int kDqSmemBytes =
      sizeof(T) * (2 * QueryBlockTile::kElems + 2 * Base::kStages * KeyStreamTile::kElems);
};

}  // namespace attention_mma
}  // namespace fastattn
