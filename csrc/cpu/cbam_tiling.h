// The tiling and prefetch constants of the CPU CBAM kernels, and the arithmetic of tile counts.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace fastattn {
namespace cpu {

using at::Tensor;
using at::vec::Vectorized;

// Tiling and prefetch constants, tuned at ResNet-50 CBAM shapes on a 2-core AVX2 machine.
constexpr int64_t kMaxLaneTile = 512;        // lanes per task of kernels with per-lane state (in L1)
constexpr int64_t kMaxStreamTile = 8192;     // lanes per task of kernels without: long streams
constexpr int64_t kRowBlock = 8;             // rows per pass over a lane tile: lane state stays in registers
constexpr int64_t kRowChunkLimit = 1 << 22;  // rows per task, far below the 2^24 of float-coded indices
constexpr int64_t kL2Block = 512 * 1024;     // bytes of x a two-pass lane reduction re-reads from L2
constexpr int64_t kScanPiece = 2048;         // two-pass row reductions re-read pieces this long from L1
constexpr int64_t kPrefetchRows = 4;         // row-at-a-time loops prefetch this many rows ahead...
constexpr int64_t kStreamAhead = 2048;       // ...or this many elements ahead in one contiguous stream
constexpr int64_t kEvalBand = 192 * 1024;    // bytes of x per row band of the inference forward's pass 2
constexpr int64_t kSegmentAhead = 4096;      // bytes ahead that loops over short strided segments prefetch
constexpr int64_t kSums = 4;                 // partial sums of a row reduction: independent chains of adds

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;  // float, or double for double

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace cpu
}  // namespace fastattn
