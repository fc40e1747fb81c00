// Vector loads and stores of scalar_t memory as Vectorized<acc> registers (float, or double for
// float64), rounding to the 16-bit dtypes, horizontal sums and maxima, and prefetching.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include "cbam_tiling.h"

#include <type_traits>

namespace fastattn {
namespace cpu {

// ---------------------------------------------------------------------------
// Vector loads and stores of scalar_t memory as Vectorized<acc> registers
// ---------------------------------------------------------------------------
template <typename scalar_t>
struct VecIO {
  using acc = acc_type<scalar_t>;
  using fvec = Vectorized<acc>;
  static constexpr int64_t kN = fvec::size();
  static constexpr bool kSame = std::is_same_v<scalar_t, acc>;

  static fvec load(const scalar_t* p) {
    if constexpr (kSame) {
      return fvec::loadu(p);
    } else {
      fvec out;
      at::vec::load_to_float<scalar_t>(p, out);
      return out;
    }
  }
  // lanes [0, n) of p, the rest zero
  static fvec load(const scalar_t* p, int64_t n) {
    if constexpr (kSame) {
      return fvec::loadu(p, n);
    } else {
      scalar_t buf[kN];
      for (const auto i : c10::irange(kN)) buf[i] = i < n ? p[i] : scalar_t(0);
      return load(buf);
    }
  }
  // lanes [0, n) of p, the rest zero; one full load when the vector ends before `end`
  static fvec load_tail(const scalar_t* p, int64_t n, const scalar_t* end) {
    if (p + kN <= end) return fvec::set(fvec(acc(0)), load(p), n);
    return load(p, n);
  }
  static void store(scalar_t* p, fvec v, int64_t n = kN) {
    if constexpr (kSame) {
      v.store(p, n);
    } else {
      const auto packed = at::vec::convert_from_float<scalar_t>(v, v);  // v's lanes, then v's again
#ifdef CPU_CAPABILITY_AVX2
      // the low half holds v: one 16-byte store, where Vectorized's partial store copies through
      // a stack buffer and memcpy (the bfloat16 inference op at 8x256x56x56: see round below)
      if (n == kN) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(__m256i(packed)));
        return;
      }
#endif
      packed.store(p, n);
    }
  }
  // the value v takes when stored as scalar_t: products compare as eager PyTorch rounds them
  static fvec round(fvec v) {
    if constexpr (kSame) {
      return v;
    } else {
#ifdef CPU_CAPABILITY_AVX2
      if constexpr (std::is_same_v<scalar_t, at::Half>) {  // F16C, round to nearest even, as ATen converts
        return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      } else {
        // bfloat16 as c10 rounds it (nearest even: add 0x7FFF plus the kept lsb, drop the low 16
        // bits), kept in float lanes; NaN stays NaN. No packing into 16-bit lanes and back.
        const __m256i bits = _mm256_castps_si256(v);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
        const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
        const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(bits, bias), _mm256_set1_epi32(int(0xFFFF0000u)));
        return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      }
#else
      return std::get<0>(at::vec::convert_to_float<scalar_t>(at::vec::convert_from_float<scalar_t>(v, v)));
#endif
    }
  }
  static acc round(acc v) { return static_cast<acc>(static_cast<scalar_t>(v)); }
};

template <typename T>
T hsum(const Vectorized<T>& v) {
  __at_align__ T buf[Vectorized<T>::size()];
  v.store(buf);
  T s = 0;
  for (const auto i : c10::irange(Vectorized<T>::size())) s += buf[i];
  return s;
}

// max over lanes; NaN lanes never occur here (callers skip NaN in their max vectors)
template <typename T>
T hmax(const Vectorized<T>& v) {
  __at_align__ T buf[Vectorized<T>::size()];
  v.store(buf);
  T m = buf[0];
  for (const auto i : c10::irange(1, Vectorized<T>::size())) m = buf[i] > m ? buf[i] : m;
  return m;
}

// The hardware prefetchers alone leave the loops latency-bound (measured: 2-5x slower), and
// loops that walk several rows at once defeat them entirely. Every loop over x prefetches:
// streams kStreamAhead elements ahead, row walks the row they will read one block later.
inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }
inline void prefetch_for_write(const void* p) { __builtin_prefetch(p, 1, 3); }

// every cache line of [p, p + len)
template <typename scalar_t>
void prefetch_segment_for_write(const scalar_t* p, int64_t len) {
  for (int64_t e = 0; e < len; e += 64 / int64_t(sizeof(scalar_t))) prefetch_for_write(p + e);
}

// How far ahead (in elements) a row-at-a-time loop over a lane tile prefetches: a full-width tile
// makes the rows one contiguous stream; a partial tile jumps a row stride from row to row.
inline int64_t prefetch_distance(int64_t tile_lanes, int64_t lanes) {
  return tile_lanes == lanes ? kStreamAhead : kPrefetchRows * lanes;
}

// 0, 1, 2, ... as a vector
template <typename T>
Vectorized<T> iota() {
  return Vectorized<T>::arange(T(0), T(1));
}

}  // namespace cpu
}  // namespace fastattn
