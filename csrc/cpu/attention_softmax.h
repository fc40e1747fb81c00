// Row kernels of the attention softmax and its gradient (csrc/cpu/attention.cpp),
// vectorised along the row.
//
// Scores arrive unscaled (q . k); every kernel applies the softmax scale in one
// FMA with the shift, scale * s - shift, so the forward and the backward turn
// the same dot products into the same logits with a single rounding.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "avx512.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fastattn::attention_cpu {

using at::vec::Vectorized;

template <typename acc_t>
inline acc_t nan_max(acc_t a, acc_t b) {  // NaN-propagating, like the reference's amax
  return (std::isnan(a) || a >= b) ? a : b;
}

// exp8 and exp16: x = n ln2 + r with ln2 split in two (Cody-Waite), e^r by cephes' expf polynomial
// (Horner, highest power first) on |r| <= ln2 / 2, inputs clamped to [kExpMin, kExpMax].
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f, kLog2e = 1.44269504f;
constexpr float kExpMin = -104.f, kExpMax = 88.7228394f;
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// exp within 1 ulp (at::vec's exp_u20 is within 20): the float32 accuracy rule
// (tests/test_float32_accuracy.py) holds the probabilities to eager softmax's.
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

// The 8-wide twin of exp16 below: the same reduction and polynomial, within 1.01 ulp over the
// float32 inputs whose exp is finite (docs/accuracy.md). Inline it costs about what exp_u20 does;
// at::vec's exp is SLEEF's expf8_u10, an out-of-line call that dominated the small-head-dim
// forwards. AVX2 has no scalef: 2^n is applied as 2^(n/2) * 2^(n - n/2), two exact powers of
// two, so a result in the denormal range is rounded once, as scalef rounds it.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(kExpMax), _mm256_max_ps(_mm256_set1_ps(kExpMin), x));
  const __m256 fx =
      _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kLn2Lo), _mm256_fnmadd_ps(fx, _mm256_set1_ps(kLn2Hi), x));
  __m256 poly = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) poly = _mm256_fmadd_ps(r, poly, _mm256_set1_ps(kExpPoly[i]));
  poly = _mm256_add_ps(_mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i n = _mm256_cvtps_epi32(fx), half_n = _mm256_srai_epi32(n, 1);  // n in [-150, 128]
  auto pow2 = [](__m256i e) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  };
  return _mm256_mul_ps(_mm256_mul_ps(poly, pow2(half_n)), pow2(_mm256_sub_epi32(n, half_n)));
}
inline Vectorized<float> exp_vec(const Vectorized<float>& x) { return exp8(x); }
#else
inline Vectorized<float> exp_vec(const Vectorized<float>& x) { return x.exp(); }  // SLEEF's, within 1 ulp
#endif
inline Vectorized<double> exp_vec(const Vectorized<double>& x) { return x.exp(); }

// The exp-heavy row kernels are the whole non-GEMM cost of the softmax: their
// float versions run 16 wide where ATen runs AVX-512 (avx512.h).
#ifdef FASTATTN_AVX512
// exp within ~1 ulp (the reduction above: n * kLn2Hi is exact, so r is exact to ~2^-30). at::vec's exp_u20
// (bounded by 20 ulps) reduces with one rounded ln2, an error that grows with |x|. min/max return
// their second operand on NaN, so NaN stays NaN.
FASTATTN_TARGET_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(kExpMax), _mm512_max_ps(_mm512_set1_ps(kExpMin), x));
  const __m512 fx =
      _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kLn2Lo), _mm512_fnmadd_ps(fx, _mm512_set1_ps(kLn2Hi), x));
  __m512 poly = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) poly = _mm512_fmadd_ps(r, poly, _mm512_set1_ps(kExpPoly[i]));
  poly = _mm512_add_ps(_mm512_fmadd_ps(poly, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(poly, fx);  // e^r * 2^n, 0 below the smallest denormal
}

template <bool kWithMax>
FASTATTN_TARGET_AVX512 float exp_shifted_sum16(const float* scores, float* probs, int64_t n, float scale,
                                               float shift, float* row_max_out) {
  const __m512 scale_v = _mm512_set1_ps(scale), shift_v = _mm512_set1_ps(shift);
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
  __m512 max0 = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), max1 = max0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 s0 = _mm512_loadu_ps(scores + j), s1 = _mm512_loadu_ps(scores + j + 16);
    if constexpr (kWithMax) {
      max0 = _mm512_max_ps(max0, _mm512_mul_ps(s0, scale_v));
      max1 = _mm512_max_ps(max1, _mm512_mul_ps(s1, scale_v));
    }
    const __m512 e0 = exp16(_mm512_fmsub_ps(s0, scale_v, shift_v));
    const __m512 e1 = exp16(_mm512_fmsub_ps(s1, scale_v, shift_v));
    _mm512_storeu_ps(probs + j, e0);
    _mm512_storeu_ps(probs + j + 16, e1);
    sum0 = _mm512_add_ps(sum0, e0);
    sum1 = _mm512_add_ps(sum1, e1);
  }
  for (; j < n; j += 16) {
    const __mmask16 mask = tail_mask16(n - j);
    const __m512 s0 = _mm512_maskz_loadu_ps(mask, scores + j);
    if constexpr (kWithMax) max0 = _mm512_mask_max_ps(max0, mask, max0, _mm512_mul_ps(s0, scale_v));
    const __m512 e0 = exp16(_mm512_fmsub_ps(s0, scale_v, shift_v));
    _mm512_mask_storeu_ps(probs + j, mask, e0);
    sum0 = _mm512_mask_add_ps(sum0, mask, sum0, e0);
  }
  if constexpr (kWithMax) *row_max_out = _mm512_reduce_max_ps(_mm512_max_ps(max0, max1));
  return _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
}

template <bool kPerColumn>
FASTATTN_TARGET_AVX512 void softmax_backward_row16(float* scores, float* dprobs, int64_t n, float scale,
                                                   const float* lse, const float* delta, const float* norm) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  const __m512 lse_row = _mm512_set1_ps(lse[0]), delta_row = _mm512_set1_ps(delta[0]);
  const __m512 norm_row = _mm512_set1_ps(norm ? norm[0] : 1.f);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = tail_mask16(n - j);
    const __m512 lse_v = kPerColumn ? _mm512_maskz_loadu_ps(mask, lse + j) : lse_row;
    const __m512 delta_v = kPerColumn ? _mm512_maskz_loadu_ps(mask, delta + j) : delta_row;
    __m512 p = exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(mask, scores + j), scale_v, lse_v));
    if (norm) p = _mm512_mul_ps(p, kPerColumn ? _mm512_maskz_loadu_ps(mask, norm + j) : norm_row);
    _mm512_mask_storeu_ps(scores + j, mask, p);
    const __m512 ds = _mm512_mul_ps(p, _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, dprobs + j), delta_v));
    _mm512_mask_storeu_ps(dprobs + j, mask, ds);
  }
}
#endif

template <typename acc_t, bool kMin>
acc_t row_extreme(const acc_t* x, int64_t n) {  // max (kMin: min) with NaN propagation
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  auto pick = [](const Vec& a, const Vec& b) { return kMin ? at::vec::minimum(a, b) : at::vec::maximum(a, b); };
  acc_t result = (kMin ? 1 : -1) * std::numeric_limits<acc_t>::infinity();
  int64_t j = 0;
  if (n >= 4 * V) {
    Vec m0 = Vec::loadu(x), m1 = Vec::loadu(x + V), m2 = Vec::loadu(x + 2 * V), m3 = Vec::loadu(x + 3 * V);
    for (j = 4 * V; j + 4 * V <= n; j += 4 * V) {
      m0 = pick(m0, Vec::loadu(x + j));
      m1 = pick(m1, Vec::loadu(x + j + V));
      m2 = pick(m2, Vec::loadu(x + j + 2 * V));
      m3 = pick(m3, Vec::loadu(x + j + 3 * V));
    }
    for (; j + V <= n; j += V) m0 = pick(m0, Vec::loadu(x + j));
    Vec m = pick(pick(m0, m1), pick(m2, m3));
    result = at::vec::vec_reduce_all<acc_t>([&](Vec& a, Vec& b) { return pick(a, b); }, m);
  }
  for (; j < n; ++j) result = kMin ? -nan_max(-result, -x[j]) : nan_max(result, x[j]);
  return result;
}

// max over j of scale * x[j]: rounding is monotonic, so it is scale times the max (or the min) of x
template <typename acc_t>
acc_t scaled_row_max(const acc_t* x, int64_t n, acc_t scale) {
  return scale * (scale >= 0 ? row_extreme<acc_t, false>(x, n) : row_extreme<acc_t, true>(x, n));
}

// probs = exp(scale * scores - shift) (probs may alias scores); returns their sum (NaN when a
// score is NaN) and, with kWithMax, stores the max of scale * scores in *row_max_out.
template <bool kWithMax = false, typename acc_t>
acc_t exp_shifted_sum(const acc_t* scores, acc_t* probs, int64_t n, acc_t scale, acc_t shift,
                      acc_t* row_max_out = nullptr) {
#ifdef FASTATTN_AVX512
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx512()) return exp_shifted_sum16<kWithMax>(scores, probs, n, scale, shift, row_max_out);
  }
#endif
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec scale_v(scale), shift_v(shift);
  Vec sum0(acc_t(0)), sum1(acc_t(0));
  Vec max0(-std::numeric_limits<acc_t>::infinity()), max1 = max0;
  int64_t j = 0;
  for (; j + 2 * V <= n; j += 2 * V) {
    const Vec s0 = Vec::loadu(scores + j), s1 = Vec::loadu(scores + j + V);
    if constexpr (kWithMax) {
      max0 = at::vec::maximum(max0, s0 * scale_v);
      max1 = at::vec::maximum(max1, s1 * scale_v);
    }
    const Vec e0 = exp_vec(at::vec::fmsub(s0, scale_v, shift_v)), e1 = exp_vec(at::vec::fmsub(s1, scale_v, shift_v));
    e0.store(probs + j);
    e1.store(probs + j + V);
    sum0 = sum0 + e0;
    sum1 = sum1 + e1;
  }
  acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, sum0 + sum1);
  acc_t max = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); },
                                             at::vec::maximum(max0, max1));
  for (; j < n; ++j) {
    max = nan_max(max, scale * scores[j]);
    probs[j] = std::exp(std::fma(scores[j], scale, -shift));
    sum += probs[j];
  }
  if constexpr (kWithMax) *row_max_out = max;
  return sum;
}

// Online softmax, one query row of one key block: probs = exp(scale * scores - shift)
// and sum += their sum. The shift (running max) is kept while the block's max
// stays within kLazyRescaleMargin above it, which needs one pass and no
// rescaling of the accumulated output; otherwise it moves to the new max.
// Returns the factor by which the row's accumulated output must be rescaled.
constexpr double kLazyRescaleMargin = 8.0;  // probabilities up to e^8 before normalisation: far from overflow

template <typename acc_t>
acc_t online_softmax_row(const acc_t* scores, acc_t* probs, int64_t n, acc_t scale, acc_t& shift, acc_t& sum) {
  if (std::isfinite(shift)) {
    acc_t block_max;
    const acc_t block_sum = exp_shifted_sum</*kWithMax=*/true>(scores, probs, n, scale, shift, &block_max);
    if (block_max <= shift + static_cast<acc_t>(kLazyRescaleMargin)) {  // false for NaN
      sum += block_sum;
      return acc_t(1);
    }
  }
  const acc_t new_shift = nan_max(shift, scaled_row_max(scores, n, scale));
  if (new_shift == -std::numeric_limits<acc_t>::infinity()) {  // every logit so far is -inf: nothing to add
    std::fill(probs, probs + n, acc_t(0));
    return acc_t(1);
  }
  const acc_t block_sum = exp_shifted_sum(scores, probs, n, scale, new_shift);
  const acc_t rescale = std::exp(shift - new_shift);  // 0 on the first block, NaN once a NaN was seen
  sum = sum * rescale + block_sum;
  shift = new_shift;
  return rescale;
}

// Softmax backward on one row of a tile, in place: scores <- p = exp(scale * scores - lse) * norm,
// dprobs <- ds = p * (dprobs - delta). lse, delta and norm are one value for the whole
// row (kPerColumn = false, a query row) or one per column (a key row of the
// transposed tile); norm may be null (no renormalisation, attention.cpp's softmax_normalisation).
template <bool kPerColumn, typename acc_t>
void softmax_backward_row(acc_t* scores, acc_t* dprobs, int64_t n, acc_t scale, const acc_t* lse,
                          const acc_t* delta, const acc_t* norm) {
#ifdef FASTATTN_AVX512
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx512()) return softmax_backward_row16<kPerColumn>(scores, dprobs, n, scale, lse, delta, norm);
  }
#endif
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec scale_v(scale);
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    const Vec lse_v = kPerColumn ? Vec::loadu(lse + j) : Vec(lse[0]);
    const Vec delta_v = kPerColumn ? Vec::loadu(delta + j) : Vec(delta[0]);
    Vec p = exp_vec(at::vec::fmsub(Vec::loadu(scores + j), scale_v, lse_v));
    if (norm) p = p * (kPerColumn ? Vec::loadu(norm + j) : Vec(norm[0]));
    p.store(scores + j);
    (p * (Vec::loadu(dprobs + j) - delta_v)).store(dprobs + j);
  }
  for (; j < n; ++j) {
    acc_t p = std::exp(std::fma(scores[j], scale, -lse[kPerColumn ? j : 0]));
    if (norm) p *= norm[kPerColumn ? j : 0];
    scores[j] = p;
    dprobs[j] = p * (dprobs[j] - delta[kPerColumn ? j : 0]);
  }
}

}  // namespace fastattn::attention_cpu
