// The CPU's cache sizes, read once at run time, and the tile sizes of the CPU kernels derived from them.
#pragma once

#include <cstdint>
#include <string>

namespace fastattn {
namespace cpu {

// Bytes per core of the L1 data cache and of L2, and of the L3 a core shares; each level's source is
// "FASTATTN_CPU_CACHE", "sysfs", "sysconf" or "default".
struct CacheSizes {
  int64_t l1, l2, l3;
  std::string l1_source, l2_source, l3_source;
};

// The cache-size decisions of the CPU kernels (the derivations are in cpu_tuning.cpp).
struct CpuTiling {
  int64_t lane_tile;          // lanes per task of the CBAM kernels with per-lane state
  int64_t scan_piece;         // elements of a row that a two-pass row reduction re-reads from L1
  int64_t l2_block;           // bytes of x that a two-pass lane reduction re-reads from L2
  int64_t eval_band;          // bytes of x per row band of the CBAM inference forward's pass 2
  int64_t panel_floats;       // floats of a streamed attention operand tile (d x block)
  int64_t score_tile_floats;  // floats of an attention score tile (rows x stream)
};

// Compile-time room of the per-lane state arrays; CpuTiling::lane_tile never exceeds it.
constexpr int64_t kLaneTileCapacity = 1024;

// FASTATTN_CPU_CACHE (e.g. "l1=32K,l2=1M,l3=32M"; any subset, sizes in bytes with an optional K/M/G
// suffix) overrides what the machine reports, level by level. Read at the first call, then kept: a
// process that wants other sizes sets the variable before its first CPU kernel runs.
const CacheSizes& cache_sizes();
CpuTiling derive_tiling(const CacheSizes& caches);
const CpuTiling& cpu_tiling();  // derive_tiling(cache_sizes()), computed once

}  // namespace cpu
}  // namespace fastattn
