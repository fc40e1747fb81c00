// The tiling and prefetch constants of the CPU CBAM kernels, and the arithmetic of tile counts.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#include "cpu_tuning.h"

namespace fastattn {
namespace cpu {

using at::Tensor;
using at::vec::Vectorized;

// Tiling and prefetch constants that are no cache-size decision, tuned at ResNet-50 CBAM shapes on a
// 2-core AVX2 machine. The cache-size decisions come from the caches read at run time (cpu_tuning.h):
// max_lane_tile(), scan_piece(), l2_block(), eval_band().
constexpr int64_t kMaxStreamTile = 8192;     // lanes per task of kernels without per-lane state: long streams
constexpr int64_t kRowBlock = 8;             // rows per pass over a lane tile: lane state stays in registers
constexpr int64_t kRowChunkLimit = 1 << 22;  // rows per task, far below the 2^24 of float-coded indices
constexpr int64_t kPrefetchRows = 4;         // row-at-a-time loops prefetch this many rows ahead...
constexpr int64_t kStreamAhead = 2048;       // ...or this many elements ahead in one contiguous stream
constexpr int64_t kSegmentAhead = 4096;      // bytes ahead that loops over short strided segments prefetch
constexpr int64_t kSums = 4;                 // partial sums of a row reduction: independent chains of adds

inline int64_t max_lane_tile() { return cpu_tiling().lane_tile; }  // lanes per task with per-lane state (L1)
inline int64_t scan_piece() { return cpu_tiling().scan_piece; }      // row elements re-read from L1
inline int64_t l2_block() { return cpu_tiling().l2_block; }          // bytes of x re-read from L2
inline int64_t eval_band() { return cpu_tiling().eval_band; }        // bytes of x per inference band

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;  // float, or double for double

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace cpu
}  // namespace fastattn
