// The AVX-512 paths of the CPU kernels (attention.cpp, row_reduce.h of the CBAM kernels).
//
// The build targets AVX2, so at::vec is 8 floats wide. Where ATen itself runs
// AVX-512 kernels (the CPU has it and ATEN_CPU_CAPABILITY does not lower it), a
// few float loops run 16 wide instead, in functions compiled for avx512f.
#pragma once

#include <ATen/Version.h>

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define FASTATTN_AVX512 1
#define FASTATTN_TARGET_AVX512 __attribute__((target("avx512f")))

namespace fastattn {

// whether the 16-wide paths run
inline bool cpu_has_avx512() {
  static const bool has_avx512 = __builtin_cpu_supports("avx512f") && at::get_cpu_capability() == "AVX512";
  return has_avx512;
}

// the first min(left, 16) lanes
FASTATTN_TARGET_AVX512 inline __mmask16 tail_mask16(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

}  // namespace fastattn
#endif
