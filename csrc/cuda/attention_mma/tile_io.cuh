// Moves of one head's positions x channels tile between a strided (C, L) slab in global memory and
// a SmemTile. Main path: 16-byte cp.async along the tile's contiguous axis, the tail of a partial
// chunk and the rows past the edge zero-filled by cp.async itself (src-size < 16); fallback, when
// the operand's unit-stride axis is not the tile's or a row start is not 16-byte aligned
// (Operand::vec false, decided per launch): element by element.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "mma_utils.cuh"
#include "params.cuh"

namespace fastattn {
namespace attention_mma {

// Starts copying positions [p0, p0 + kPositions) x channels [0, kChannels) of `slab` into `dst`,
// zeros where position >= p_end or channel >= c_end. The vec path is asynchronous (the caller
// commits and waits on the cp.async group); the fallback has finished when it returns.
template <typename Tile, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* dst, const T* slab, const Operand& op, int p0, int p_end, int c_end) {
  if (op.vec) {
    constexpr int kChunksPerRow = Tile::kWidth / 8;
    constexpr int kChunks = Tile::kRows * kChunksPerRow;
    static_assert(kChunks % kThreads == 0, "whole chunks per thread");
#pragma unroll
    for (int it = 0; it < kChunks / kThreads; ++it) {
      const int idx = threadIdx.x + it * kThreads;
      const int row = idx / kChunksPerRow, col = idx % kChunksPerRow * 8;
      const T* src;
      int valid;  // elements of this chunk inside the slab: a prefix along the contiguous axis
      if constexpr (Tile::kLContiguous) {
        src = slab + row * op.stride_c + (p0 + col);
        valid = row < c_end ? p_end - (p0 + col) : 0;
      } else {
        src = slab + (p0 + row) * op.stride_l + col;
        valid = p0 + row < p_end ? c_end - col : 0;
      }
      valid = valid < 0 ? 0 : (valid > 8 ? 8 : valid);
      cp_async_16(dst + row * Tile::kStride + col, valid > 0 ? src : slab, valid * static_cast<int>(sizeof(T)));
    }
  } else {
    constexpr int kElems = Tile::kRows * Tile::kWidth;
#pragma unroll 4
    for (int idx = threadIdx.x; idx < kElems; idx += kThreads) {
      const int row = idx / Tile::kWidth, col = idx % Tile::kWidth;
      const int position = p0 + (Tile::kLContiguous ? col : row), channel = Tile::kLContiguous ? row : col;
      dst[row * Tile::kStride + col] = position < p_end && channel < c_end
                                           ? slab[channel * op.stride_c + position * op.stride_l]
                                           : from_float<T>(0.f);
    }
  }
}

// Writes the in-range part (position < p_end, channel < c_end) of a tile to `slab`: whole 16-byte
// chunks with one store where op.vec, the rest element by element.
template <typename Tile, int kThreads, typename T>
__device__ __forceinline__ void store_tile(T* slab, const Operand& op, const T* src, int p0, int p_end, int c_end) {
  constexpr int kChunksPerRow = Tile::kWidth / 8;
  constexpr int kChunks = Tile::kRows * kChunksPerRow;
#pragma unroll 2
  for (int idx = threadIdx.x; idx < kChunks; idx += kThreads) {
    const int row = idx / kChunksPerRow, col = idx % kChunksPerRow * 8;
    const int position0 = p0 + (Tile::kLContiguous ? col : row), channel0 = Tile::kLContiguous ? row : col;
    const T* from = src + row * Tile::kStride + col;
    const int valid = Tile::kLContiguous ? (channel0 < c_end ? p_end - position0 : 0)
                                         : (position0 < p_end ? c_end - channel0 : 0);
    if (valid <= 0) continue;
    if (op.vec && valid >= 8) {
      T* to = Tile::kLContiguous ? slab + channel0 * op.stride_c + position0 : slab + position0 * op.stride_l + channel0;
      *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(from);
    } else {
      for (int e = 0; e < (valid < 8 ? valid : 8); ++e) {
        const int position = position0 + (Tile::kLContiguous ? e : 0), channel = channel0 + (Tile::kLContiguous ? 0 : e);
        slab[channel * op.stride_c + position * op.stride_l] = from[e];
      }
    }
  }
}

// K and V of the key tile at k0 into stage `stage` of the double-buffered k_s and v_s (the forward's
// and the dq kernel's streamed operands).
template <typename KVTile, int kThreads, typename T, typename Params>
__device__ __forceinline__ void load_kv_stage(T* k_s, T* v_s, int stage, const T* k_slab, const T* v_slab,
                                              const Params& params, int k0) {
  load_tile<KVTile, kThreads>(k_s + stage * KVTile::kElems, k_slab, params.k, k0, params.shape.lk, params.shape.dqk);
  load_tile<KVTile, kThreads>(v_s + stage * KVTile::kElems, v_slab, params.v, k0, params.shape.lk, params.shape.dv);
}

// The head of each step of a kernel's loop over streamed tiles: waits for tile `tile` (its cp.async
// group and every warp being done with the other stage), then starts load(tile + 1, its stage) if
// there is a next tile. The caller has committed tile 0's group before the loop.
template <int kStages, typename Load>
__device__ __forceinline__ void advance_stages(int tile, int n_tiles, Load load) {
  cp_async_wait<0>();
  __syncthreads();
  if (tile + 1 < n_tiles) load(tile + 1, (tile + 1) % kStages);
  cp_async_commit();
}

}  // namespace attention_mma
}  // namespace fastattn
