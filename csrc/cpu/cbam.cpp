// CPU kernels of the six CBAM ops declared in csrc/ops.cpp. Their contract (outputs,
// tie and NaN rules, layouts) is fastattn/reference.py: ref_<op>.
//
// Layouts. x is read in place when it is NCHW-contiguous or channels_last-contiguous,
// through one contiguous copy otherwise. Either way one image x[n] is then a
// (rows x lanes) matrix with unit stride along lanes:
//   NCHW           rows = channels (stride H*W),  lanes = positions h*W+w
//   channels_last  rows = positions (stride C),   lanes = channels
// Every kernel vectorizes along lanes (at::vec::Vectorized of the accumulation type:
// float, or double for float64) and walks rows in small blocks, so per-lane state
// stays in registers or L1 while x streams through once. Reductions along rows keep
// one state per lane; reductions along lanes are row sums.
//
// Index bookkeeping inside the vector loops is float-coded (exact below 2^24): row
// and lane indices are local to one task's row chunk or lane tile, both far shorter
// than that, and become int64 when chunks are merged.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "avx512.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace fastattn {
namespace cpu {
namespace {

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

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

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
int64_t prefetch_distance(int64_t tile_lanes, int64_t lanes) {
  return tile_lanes == lanes ? kStreamAhead : kPrefetchRows * lanes;
}

// 0, 1, 2, ... as a vector
template <typename T>
Vectorized<T> iota() {
  return Vectorized<T>::arange(T(0), T(1));
}

// `vecs` consecutive output vectors of one row of a stride-1 k x k conv over `planes` zero-padded
// planes, into a[0, vecs): plane c's input rows start at in + c * plane_stride (kernel row i at
// + i * row_len), its weights at w[(c * kh + i) * kw + j]. Sums in (c, i, j) order, one FMA each.
// The vector count is a constant inside, so that the accumulators live in registers.
template <typename acc, int64_t kVecs>
void conv_vectors_fixed(const acc* in, int64_t plane_stride, int64_t row_len, int64_t planes, int64_t kh, int64_t kw,
                        const acc* w, Vectorized<acc>* out) {
  using fvec = Vectorized<acc>;
  constexpr int64_t kN = fvec::size();
  fvec a[kVecs];
  for (int64_t v = 0; v < kVecs; ++v) a[v] = fvec(acc(0));
  for (int64_t c = 0; c < planes; ++c)
    for (int64_t i = 0; i < kh; ++i) {
      const acc* row = in + c * plane_stride + i * row_len;
      const acc* wr = w + (c * kh + i) * kw;
      for (int64_t j = 0; j < kw; ++j) {
        const fvec wv(wr[j]);
        for (int64_t v = 0; v < kVecs; ++v) a[v] = at::vec::fmadd(wv, fvec::loadu(row + v * kN + j), a[v]);
      }
    }
  for (int64_t v = 0; v < kVecs; ++v) out[v] = a[v];
}

template <typename acc, int64_t kVecs>
void conv_vectors(const acc* in, int64_t plane_stride, int64_t row_len, int64_t planes, int64_t kh, int64_t kw,
                  const acc* w, int64_t vecs, Vectorized<acc>* a) {
  static_assert(kVecs == 4, "conv_vectors dispatches 1 to 4 vectors");
  switch (vecs) {
    case 4: return conv_vectors_fixed<acc, 4>(in, plane_stride, row_len, planes, kh, kw, w, a);
    case 3: return conv_vectors_fixed<acc, 3>(in, plane_stride, row_len, planes, kh, kw, w, a);
    case 2: return conv_vectors_fixed<acc, 2>(in, plane_stride, row_len, planes, kh, kw, w, a);
    default: return conv_vectors_fixed<acc, 1>(in, plane_stride, row_len, planes, kh, kw, w, a);
  }
}

// index - base, float-coded (exact below 2^24) for comparisons with local indices; -1 when out of range
template <typename acc>
acc local_index(int64_t index, int64_t base) {
  const int64_t d = index - base;
  return (d >= 0 && d < (int64_t(1) << 24)) ? acc(d) : acc(-1);
}

// ---------------------------------------------------------------------------
// Max pooling semantics (reference: fastattn.reference._first_max)
// ---------------------------------------------------------------------------
// Sum, max, first index of the max (of the first NaN when there is one) and the count
// of values equal to the max (0 when the max is NaN).
template <typename acc>
struct MaxStats {
  acc sum = 0;
  acc max = -std::numeric_limits<acc>::infinity();
  int64_t arg = 0;
  int64_t count = 0;

  void push(acc v, int64_t index) {
    sum += v;
    if (std::isnan(max)) return;
    if (std::isnan(v)) {
      max = v;
      arg = index;
      count = 0;
    } else if (v > max) {
      max = v;
      arg = index;
      count = 1;
    } else if (v == max) {
      ++count;
    }
  }
  // `later` covers indices after all of this one's
  void merge(const MaxStats& later) {
    sum += later.sum;
    if (std::isnan(max)) return;
    if (std::isnan(later.max) || later.max > max) {
      max = later.max;
      arg = later.arg;
      count = later.count;
    } else if (later.max == max) {
      count += later.count;
    }
  }
};

// Stats of z[i] = round(row[i] * gate[i]) (z = row[i] without a gate), i in [0, len), in two
// passes per L1-sized piece: sum and max, then ties and the first index of a new max. (One pass
// with per-lane max/index/tie state costs more operations per element: measured 1.5x slower.)
// Without kArg only sum and max are exact (the inference forward needs no more): no second pass.
template <typename scalar_t, bool kGated, bool kArg = true>
MaxStats<acc_type<scalar_t>> reduce_contiguous(const scalar_t* row, const acc_type<scalar_t>* gate, int64_t len,
                                                 const scalar_t* end) {
  using IO = VecIO<scalar_t>;
  using acc = typename IO::acc;
  using fvec = typename IO::fvec;
  constexpr int64_t kN = IO::kN;
  constexpr int kU = 4;  // independent accumulators: the adds and maxes are latency-bound otherwise
  const fvec zero(acc(0)), one(acc(1));
  const fvec neg_inf(-std::numeric_limits<acc>::infinity());
  const fvec nan(std::numeric_limits<acc>::quiet_NaN());
  auto gated = [&](fvec v, int64_t i) {
    if constexpr (kGated) {
      return IO::round(v * fvec::loadu(gate + i));  // the gate is padded to a multiple of kN
    } else {
      return v;
    }
  };
  auto value = [&](int64_t i) { return gated(IO::load(row + i), i); };
  // lanes past `stop` are `fill`
  auto value_tail = [&](int64_t i, int64_t stop, fvec fill) {
    return fvec::set(fill, gated(IO::load_tail(row + i, stop - i, end), i), stop - i);
  };

  MaxStats<acc> stats;
  for (int64_t base = 0; base < len; base += kScanPiece) {
    const int64_t stop = std::min(len, base + kScanPiece);
    const int64_t full_stop = base + (stop - base) / kN * kN;
    fvec s[kU], m[kU];
    for (const auto u : c10::irange(kU)) {
      s[u] = zero;
      m[u] = neg_inf;
    }
    int64_t i = base;
    for (; i + kU * kN <= full_stop; i += kU * kN) {
      prefetch(row + i + kStreamAhead);
      if constexpr (kU * kN * sizeof(scalar_t) > 64) prefetch(row + i + kStreamAhead + 64 / sizeof(scalar_t));
      for (const auto u : c10::irange(kU)) {
        const fvec v = value(i + u * kN);
        s[u] = s[u] + v;
        m[u] = at::vec::clamp_min(m[u], v);  // max that keeps m where v is NaN; a NaN shows in the sum
      }
    }
    for (; i < full_stop; i += kN) {
      const fvec v = value(i);
      s[0] = s[0] + v;
      m[0] = at::vec::clamp_min(m[0], v);
    }
    if (i < stop) {
      s[1] = s[1] + value_tail(i, stop, zero);
      m[1] = at::vec::clamp_min(m[1], value_tail(i, stop, neg_inf));
    }
    const acc piece_sum = hsum((s[0] + s[1]) + (s[2] + s[3]));
    if (std::isnan(piece_sum)) {  // a NaN (or inf - inf): rescan with the full rules
      MaxStats<acc> rest;
      for (int64_t k = base; k < len; ++k) rest.push(kGated ? IO::round(acc(row[k]) * gate[k]) : acc(row[k]), k);
      if (base == 0) return rest;
      stats.merge(rest);
      return stats;
    }
    stats.sum += piece_sum;
    const acc piece_max =
        hmax(at::vec::clamp_min(at::vec::clamp_min(m[0], m[1]), at::vec::clamp_min(m[2], m[3])));
    if constexpr (!kArg) {
      stats.max = std::max(stats.max, piece_max);
      continue;
    }
    if (!(piece_max >= stats.max)) continue;
    // ties of piece_max in this piece, and its first index when it is a new max
    const fvec target(piece_max);
    int64_t first = -1;
    for (i = base; first < 0; i += kN) {  // piece_max occurs in the piece: this stops
      const fvec v = i < full_stop ? value(i) : value_tail(i, stop, nan);
      const int bits = (v != target).zero_mask();
      if (bits) first = i + __builtin_ctz(bits);
    }
    fvec ties[kU];
    for (const auto u : c10::irange(kU)) ties[u] = zero;
    i = first - (first - base) % kN;  // the vector holding `first`; no equal value before it
    for (; i + kU * kN <= full_stop; i += kU * kN) {
      for (const auto u : c10::irange(kU)) ties[u] = ties[u] + ((value(i + u * kN) == target) & one);
    }
    for (; i < full_stop; i += kN) ties[0] = ties[0] + ((value(i) == target) & one);
    if (i < stop) ties[1] = ties[1] + ((value_tail(i, stop, nan) == target) & one);
    const int64_t piece_count = static_cast<int64_t>(hsum((ties[0] + ties[1]) + (ties[2] + ties[3])));
    if (piece_max > stats.max) {
      stats.max = piece_max;
      stats.arg = first;
      stats.count = piece_count;
    } else {
      stats.count += piece_count;
    }
  }
  return stats;
}

// Per-lane stats of rows [0, rows) of a (rows x lanes) block; row indices local to the block.
template <typename acc>
struct LaneStates {
  static constexpr int64_t kPad = kMaxLaneTile + Vectorized<acc>::size();
  __at_align__ acc sum[kPad];
  __at_align__ acc max[kPad];
  __at_align__ acc arg[kPad];
  __at_align__ acc count[kPad];

  void reset(int64_t lanes) {
    std::fill_n(sum, lanes, acc(0));
    std::fill_n(max, lanes, -std::numeric_limits<acc>::infinity());
    std::fill_n(arg, lanes, acc(0));
    std::fill_n(count, lanes, acc(0));
  }
  MaxStats<acc> get(int64_t lane, int64_t row_base) const {
    MaxStats<acc> s;
    s.sum = sum[lane];
    s.max = max[lane];
    s.arg = row_base + static_cast<int64_t>(arg[lane]);
    s.count = static_cast<int64_t>(count[lane]);
    return s;
  }
};

// The two passes of reduce_rows over kRows rows [r0, r0 + kRows) and all lanes, with the row
// loop unrolled. Lanes past `lanes` in the last vector hold garbage the caller ignores.
template <int kRows, typename scalar_t, bool kGated>
struct RowPasses {
  using IO = VecIO<scalar_t>;
  using acc = typename IO::acc;
  using fvec = typename IO::fvec;
  static constexpr int64_t kN = IO::kN;

  const scalar_t* p[kRows];
  fvec gate[kRows];
  RowPasses(const scalar_t* block, int64_t row_stride, int64_t r0, const acc* row_gate) {
    for (int u = 0; u < kRows; ++u) {
      p[u] = block + (r0 + u) * row_stride;
      if constexpr (kGated) gate[u] = fvec(row_gate[r0 + u]);
    }
  }
  fvec z(int u, fvec v) const {
    if constexpr (kGated) {
      return IO::round(v * gate[u]);
    } else {
      return v;
    }
  }
  // pass 1: sum and max (NaN skipped; a NaN shows in the sum)
  void sum_max(int64_t lanes, int64_t ahead, const scalar_t* end, acc* sum, acc* mx) const {
    int64_t j = 0;
    for (; j + kN <= lanes; j += kN) {
      fvec s = fvec::loadu(sum + j), m = fvec::loadu(mx + j);
      for (int u = 0; u < kRows; ++u) {
        prefetch(p[u] + j + ahead);
        const fvec v = z(u, IO::load(p[u] + j));
        s = s + v;
        m = at::vec::clamp_min(m, v);  // max that keeps m where v is NaN
      }
      s.store(sum + j);
      m.store(mx + j);
    }
    if (j < lanes) {
      fvec s = fvec::loadu(sum + j), m = fvec::loadu(mx + j);
      for (int u = 0; u < kRows; ++u) {
        const fvec v = z(u, IO::load_tail(p[u] + j, lanes - j, end));
        s = s + v;
        m = at::vec::clamp_min(m, v);
      }
      s.store(sum + j);
      m.store(mx + j);
    }
  }
  // pass 2, rows in reverse: ties of each lane's max, and its first row (the last hit). Whole
  // vectors run without the tail's branch, so that the row loop unrolls.
  void ties(int64_t lanes, int64_t r0, const scalar_t* end, const acc* mx, acc* arg, acc* cnt) const {
    int64_t j = 0;
    for (; j + kN <= lanes; j += kN) ties_vector<true>(j, lanes, r0, end, mx, arg, cnt);
    if (j < lanes) ties_vector<false>(j, lanes, r0, end, mx, arg, cnt);
  }
  template <bool kFull>
  void ties_vector(int64_t j, int64_t lanes, int64_t r0, const scalar_t* end, const acc* mx, acc* arg,
                   acc* cnt) const {
    const fvec one(acc(1));
    const fvec target = fvec::loadu(mx + j);
    fvec a = fvec::loadu(arg + j), c = fvec::loadu(cnt + j);
#pragma GCC unroll 16
    for (int u = kRows - 1; u >= 0; --u) {
      const fvec v = z(u, kFull ? IO::load(p[u] + j) : IO::load_tail(p[u] + j, lanes - j, end));
      const fvec eq = v == target;
      a = fvec::blendv(a, fvec(acc(r0 + u)), eq);
      c = c + (eq & one);
    }
    a.store(arg + j);
    c.store(cnt + j);
  }
};

#ifdef FASTATTN_AVX512
// The float row reductions of reduce_rows run 16 wide where ATen runs AVX-512 (avx512.h): the same
// operations on each lane in the same row order as RowPasses, so the same bits.

// rows [r0, r0 + kRows) of a block, 16 lanes from j, times their row gates
template <int kRows, bool kGated>
struct Rows16 {
  __m512 v[kRows];
  FASTATTN_TARGET_AVX512 Rows16(const float* block, int64_t row_stride, int64_t r0, int64_t j, __mmask16 m,
                                const float* row_gate) {
    for (int u = 0; u < kRows; ++u) {
      v[u] = _mm512_maskz_loadu_ps(m, block + (r0 + u) * row_stride + j);
      if constexpr (kGated) v[u] = _mm512_mul_ps(v[u], _mm512_set1_ps(row_gate[r0 + u]));
    }
  }
};

// RowPasses::sum_max over rows [r0, r0 + kRows), 16 lanes at a time
template <int kRows, bool kGated>
FASTATTN_TARGET_AVX512 void sum_max16(const float* block, int64_t row_stride, int64_t r0, int64_t lanes,
                                      const float* row_gate, float* sum, float* mx) {
  const int64_t ahead = kRowBlock * row_stride;
  for (int64_t j = 0; j < lanes; j += 16) {
    const __mmask16 m = tail_mask16(lanes - j);
    for (int u = 0; u < kRows; ++u) prefetch(block + (r0 + u) * row_stride + j + ahead);
    const Rows16<kRows, kGated> z(block, row_stride, r0, j, m, row_gate);
    __m512 s = _mm512_maskz_loadu_ps(m, sum + j), x = _mm512_maskz_loadu_ps(m, mx + j);
    for (int u = 0; u < kRows; ++u) {
      s = _mm512_add_ps(s, z.v[u]);
      x = _mm512_max_ps(z.v[u], x);  // keeps x where the row's value is NaN, as clamp_min does
    }
    _mm512_mask_storeu_ps(sum + j, m, s);
    _mm512_mask_storeu_ps(mx + j, m, x);
  }
}

// RowPasses::ties over rows [r0, r0 + kRows), in reverse, 16 lanes at a time
template <int kRows, bool kGated>
FASTATTN_TARGET_AVX512 void ties16(const float* block, int64_t row_stride, int64_t r0, int64_t lanes,
                                   const float* row_gate, const float* mx, float* arg, float* cnt) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t j = 0; j < lanes; j += 16) {
    const __mmask16 m = tail_mask16(lanes - j);
    const Rows16<kRows, kGated> z(block, row_stride, r0, j, m, row_gate);
    const __m512 target = _mm512_maskz_loadu_ps(m, mx + j);
    __m512 a = _mm512_maskz_loadu_ps(m, arg + j), c = _mm512_maskz_loadu_ps(m, cnt + j);
    for (int u = kRows - 1; u >= 0; --u) {
      const __mmask16 eq = _mm512_cmp_ps_mask(z.v[u], target, _CMP_EQ_OQ);
      a = _mm512_mask_mov_ps(a, eq, _mm512_set1_ps(float(r0 + u)));
      c = _mm512_mask_add_ps(c, eq, c, one);
    }
    _mm512_mask_storeu_ps(arg + j, m, a);
    _mm512_mask_storeu_ps(cnt + j, m, c);
  }
}
#endif

// The row order of reduce_rows' two passes, at either vector width: sum and max over blocks of
// kRowBlock rows, then the rows left over; with kArg, ties over the same rows in reverse.
// pass(k, r0) covers rows [r0, r0 + k), k a std::integral_constant. One schedule for both widths
// keeps their row order, and so their bits, the same.
template <bool kArg, typename SumMax, typename Ties>
void row_schedule(int64_t rows, const SumMax& sum_max, const Ties& ties) {
  using Block = std::integral_constant<int, int(kRowBlock)>;
  using Single = std::integral_constant<int, 1>;
  const int64_t full_rows = rows / kRowBlock * kRowBlock;
  for (int64_t r0 = 0; r0 < full_rows; r0 += kRowBlock) sum_max(Block{}, r0);
  for (int64_t r = full_rows; r < rows; ++r) sum_max(Single{}, r);
  if constexpr (kArg) {
    for (int64_t r = rows - 1; r >= full_rows; --r) ties(Single{}, r);
    for (int64_t r0 = full_rows - kRowBlock; r0 >= 0; r0 -= kRowBlock) ties(Block{}, r0);
  }
}

// Per-lane stats of z = round(x * row_gate[r]) (z = x without a gate) over rows [0, rows) of a
// (rows x lanes) block that fits in L2, in two passes: sum and max; then, re-read from L2 and rows
// in reverse, ties of each lane's max and its first row. (One pass with per-lane max/index/tie
// state costs more operations per element.) The vector loops skip NaN, which shows up as a NaN
// sum; those lanes are rescanned with MaxStats' full rules. Without kArg, no second pass: arg and
// count are left as they are.
template <typename scalar_t, bool kGated, bool kArg = true>
void reduce_rows_impl(const scalar_t* block, int64_t row_stride, int64_t rows, int64_t lanes,
                      const acc_type<scalar_t>* row_gate, const scalar_t* end, LaneStates<acc_type<scalar_t>>& st) {
  using acc = acc_type<scalar_t>;
  st.reset(round_up(lanes, VecIO<scalar_t>::kN));
  bool wide = false;
#ifdef FASTATTN_AVX512
  if constexpr (std::is_same_v<scalar_t, float>) {
    wide = cpu_has_avx512();
    if (wide)
      row_schedule<kArg>(
          rows,
          [&](auto k, int64_t r0) {
            sum_max16<decltype(k)::value, kGated>(block, row_stride, r0, lanes, row_gate, st.sum, st.max);
          },
          [&](auto k, int64_t r0) {
            ties16<decltype(k)::value, kGated>(block, row_stride, r0, lanes, row_gate, st.max, st.arg, st.count);
          });
  }
#endif
  if (!wide) {
    const int64_t ahead = kRowBlock * row_stride;  // prefetch the next block's rows
    row_schedule<kArg>(
        rows,
        [&](auto k, int64_t r0) {
          RowPasses<decltype(k)::value, scalar_t, kGated>(block, row_stride, r0, row_gate)
              .sum_max(lanes, ahead, end, st.sum, st.max);
        },
        [&](auto k, int64_t r0) {
          RowPasses<decltype(k)::value, scalar_t, kGated>(block, row_stride, r0, row_gate)
              .ties(lanes, r0, end, st.max, st.arg, st.count);
        });
  }
  for (const auto l : c10::irange(lanes)) {
    if (!std::isnan(st.sum[l])) continue;
    MaxStats<acc> s;
    for (const auto r : c10::irange(rows)) {
      const acc v = acc(block[r * row_stride + l]);
      s.push(kGated ? VecIO<scalar_t>::round(v * row_gate[r]) : v, r);
    }
    st.sum[l] = s.sum;
    st.max[l] = s.max;
    st.arg[l] = acc(s.arg);
    st.count[l] = acc(s.count);
  }
}

template <typename scalar_t, bool kArg = true>
void reduce_rows(const scalar_t* block, int64_t row_stride, int64_t rows, int64_t lanes,
                 const acc_type<scalar_t>* row_gate, const scalar_t* end, LaneStates<acc_type<scalar_t>>& st) {
  if (row_gate) {
    reduce_rows_impl<scalar_t, true, kArg>(block, row_stride, rows, lanes, row_gate, end, st);
  } else {
    reduce_rows_impl<scalar_t, false, kArg>(block, row_stride, rows, lanes, row_gate, end, st);
  }
}

// ---------------------------------------------------------------------------
// Inputs, layouts and the task grid
// ---------------------------------------------------------------------------
struct Dense {
  Tensor t;            // NCHW- or channels_last-contiguous
  bool channels_last;  // rows = positions, lanes = channels
  int64_t N, C, HW;
  int64_t rows() const { return channels_last ? HW : C; }
  int64_t lanes() const { return channels_last ? C : HW; }
  at::MemoryFormat format() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
};

void check_x(const Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x must be float32, float64, float16 or bfloat16, got ", dt);
}

// x in place when NCHW- or channels_last-contiguous, else a contiguous copy
Dense dense_input(const Tensor& x, const char* op) {
  check_x(x, op);
  Dense d;
  if (x.is_contiguous()) {
    d.t = x;
    d.channels_last = false;
  } else if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    d.t = x;
    d.channels_last = true;
  } else {
    d.t = x.contiguous();
    d.channels_last = false;
  }
  d.N = x.size(0);
  d.C = x.size(1);
  d.HW = x.size(2) * x.size(3);
  return d;
}

// An x-sized output in empty_like(x)'s layout (what the fake kernels promise: x's strides when x
// is dense). Kernels write `work`, which has d's dense layout; it is `out` itself unless x is neither
// NCHW- nor channels_last-contiguous and empty_like(x) picks yet another layout.
struct XSized {
  Tensor out, work;
  XSized(const Tensor& x, const Dense& d) : out(at::empty_like(x)) {
    work = out.is_contiguous(d.format()) ? out : at::empty_like(d.t);
  }
  Tensor finish() const {
    if (!work.is_same(out)) out.copy_(work);
    return out;
  }
};

// A small per-image or per-channel tensor of the expected shape and x's dtype (scalar_t), as a
// contiguous array of the accumulation type with a vector of zeros at the end (vector tails read
// them). Converted on the calling thread: N*C or N*H*W values cost less than a parallel region.
template <typename scalar_t>
std::vector<acc_type<scalar_t>> param_array(const Tensor& t, at::IntArrayRef shape, const char* op,
                                            const char* name) {
  const auto dtype = c10::CppTypeToScalarType<scalar_t>::value;
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have x's dtype ", dtype, ", got ", t.scalar_type());
  const Tensor c = t.contiguous();
  const scalar_t* p = c.const_data_ptr<scalar_t>();
  std::vector<acc_type<scalar_t>> out(c.numel() + Vectorized<acc_type<scalar_t>>::size(), 0);
  for (const auto i : c10::irange(c.numel())) out[i] = static_cast<acc_type<scalar_t>>(p[i]);
  return out;
}

Tensor index_array(const Tensor& t, at::IntArrayRef shape, at::ScalarType dtype, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  return t.contiguous();
}

// Tasks (image, row chunk, lane tile) over the (rows x lanes) matrices of N images.
struct Grid {
  int64_t N, rows, lanes;
  int64_t lane_tile, n_tiles, row_chunk, n_chunks;

  Grid(int64_t N_, int64_t rows_, int64_t lanes_, int64_t vec_size, bool split_rows, int64_t max_block = 0,
       int64_t max_tile = kMaxLaneTile)
      : N(N_), rows(rows_), lanes(lanes_) {
    n_tiles = std::max<int64_t>(1, ceil_div(lanes, max_tile));
    lane_tile = std::min(max_tile, round_up(std::max<int64_t>(1, ceil_div(lanes, n_tiles)), vec_size));
    n_tiles = std::max<int64_t>(1, ceil_div(lanes, lane_tile));
    // enough tasks to balance the threads; rows split only where the caller can merge chunks
    const int64_t want = 4 * at::get_num_threads();
    int64_t chunks = split_rows ? ceil_div(want, std::max<int64_t>(1, N * n_tiles)) : 1;
    chunks = std::min(chunks, std::max<int64_t>(1, rows / 64));  // chunks of >= 64 rows
    chunks = std::max(chunks, ceil_div(rows, kRowChunkLimit));
    if (max_block > 0) chunks = std::max(chunks, ceil_div(rows, std::max<int64_t>(1, max_block / lane_tile)));
    row_chunk = std::max<int64_t>(1, ceil_div(rows, std::max<int64_t>(1, chunks)));
    n_chunks = std::max<int64_t>(1, ceil_div(rows, row_chunk));
  }
  int64_t tasks() const { return N * n_chunks * n_tiles; }
  struct Task {
    int64_t n, chunk, tile, row0, rows, lane0, lanes;
  };
  Task task(int64_t t) const {
    Task k;
    k.tile = t % n_tiles;
    k.chunk = (t / n_tiles) % n_chunks;
    k.n = t / (n_tiles * n_chunks);
    k.row0 = k.chunk * row_chunk;
    k.rows = std::max<int64_t>(0, std::min(row_chunk, rows - k.row0));
    k.lane0 = k.tile * lane_tile;
    k.lanes = std::max<int64_t>(0, std::min(lane_tile, lanes - k.lane0));
    return k;
  }
};

template <typename F>
void for_each_task(const Grid& g, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / (g.row_chunk * g.lane_tile));  // small inputs stay on one thread
  at::parallel_for(0, g.tasks(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const auto k = g.task(t);
      if (k.rows > 0 && k.lanes > 0) f(k);
    }
  });
}

int64_t row_grain(int64_t row_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_len)); }

// ---------------------------------------------------------------------------
// channel_pool and gated_spatial_pool
// ---------------------------------------------------------------------------
// Max pooling along rows of each image, for every lane: stats(n, lane) handed to `emit` (sum and
// max only without kArg).
template <typename scalar_t, bool kArg = true, typename Emit>
void pool_along_rows(const Dense& d, const acc_type<scalar_t>* row_gate, const Emit& emit) {
  using acc = acc_type<scalar_t>;
  const scalar_t* x = d.t.const_data_ptr<scalar_t>();
  const scalar_t* end = x + d.t.numel();
  const int64_t rows = d.rows(), lanes = d.lanes();
  const Grid g(d.N, rows, lanes, VecIO<scalar_t>::kN, /*split_rows=*/true, kL2Block / sizeof(scalar_t));
  // per (image, chunk) states, merged in chunk order below; a task that has every row emits its own
  const bool whole = g.n_chunks == 1;
  std::vector<MaxStats<acc>> partial(whole ? 0 : g.N * g.n_chunks * lanes);
  for_each_task(g, [&](const Grid::Task& k) {
    LaneStates<acc> st;
    const scalar_t* block = x + (k.n * rows + k.row0) * lanes + k.lane0;
    reduce_rows<scalar_t, kArg>(block, lanes, k.rows, k.lanes, row_gate ? row_gate + k.n * rows + k.row0 : nullptr, end,
                                st);
    if (whole) {
      for (const auto l : c10::irange(k.lanes)) emit(k.n, k.lane0 + l, st.get(l, k.row0));
      return;
    }
    MaxStats<acc>* out = partial.data() + (k.n * g.n_chunks + k.chunk) * lanes + k.lane0;
    for (const auto l : c10::irange(k.lanes)) out[l] = st.get(l, k.row0);
  });
  if (whole) return;
  at::parallel_for(0, d.N * lanes, 1 << 16, [&](int64_t begin, int64_t stop) {
    for (int64_t i = begin; i < stop; ++i) {
      const int64_t n = i / lanes, l = i % lanes;
      MaxStats<acc> s = partial[n * g.n_chunks * lanes + l];
      for (int64_t c = 1; c < g.n_chunks; ++c) s.merge(partial[(n * g.n_chunks + c) * lanes + l]);
      emit(n, l, s);
    }
  });
}

// The channel pool: stats of channel c of image n over all positions, handed to emit(n * C + c, stats)
// (sum and max only without kArg).
template <typename scalar_t, bool kArg, typename Emit>
void channel_stats(const Dense& d, const Emit& emit) {
  using acc = acc_type<scalar_t>;
  if (d.channels_last) {  // per-channel lanes, reduced along positions
    pool_along_rows<scalar_t, kArg>(d, nullptr, [&](int64_t n, int64_t c, const MaxStats<acc>& s) { emit(n * d.C + c, s); });
  } else {  // each (n, c) plane is one contiguous row
    const scalar_t* x_p = d.t.const_data_ptr<scalar_t>();
    const scalar_t* end = x_p + d.t.numel();
    at::parallel_for(0, d.N * d.C, row_grain(d.HW), [&](int64_t begin, int64_t stop) {
      for (int64_t nc = begin; nc < stop; ++nc)
        emit(nc, reduce_contiguous<scalar_t, false, kArg>(x_p + nc * d.HW, nullptr, d.HW, end));
    });
  }
}

// split_ties only selects the backward's tie rule: the forward outputs serve both.
std::tuple<Tensor, Tensor, Tensor, Tensor> channel_pool_cpu(const Tensor& x, bool /*split_ties*/) {
  const Dense d = dense_input(x, "channel_pool");
  TORCH_CHECK(d.HW > 0, "channel_pool: H*W must be positive, got shape ", x.sizes());
  Tensor avg = at::empty({d.N, d.C}, x.options());
  Tensor mx = at::empty({d.N, d.C}, x.options());
  Tensor argmax = at::empty({d.N, d.C}, x.options().dtype(at::kLong));
  Tensor count = at::empty({d.N, d.C}, x.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_pool", [&] {
    using acc = acc_type<scalar_t>;
    scalar_t* avg_p = avg.data_ptr<scalar_t>();
    scalar_t* max_p = mx.data_ptr<scalar_t>();
    int64_t* arg_p = argmax.data_ptr<int64_t>();
    int32_t* cnt_p = count.data_ptr<int32_t>();
    const acc len = acc(d.HW);
    auto emit = [&](int64_t nc, const MaxStats<acc>& s) {
      avg_p[nc] = static_cast<scalar_t>(s.sum / len);
      max_p[nc] = static_cast<scalar_t>(s.max);
      arg_p[nc] = s.arg;
      cnt_p[nc] = static_cast<int32_t>(s.count);
    };
    channel_stats<scalar_t, true>(d, emit);
  });
  return {avg, mx, argmax, count};
}

std::tuple<Tensor, Tensor, Tensor> gated_spatial_pool_cpu(const Tensor& x, const Tensor& gate, bool /*split_ties*/) {
  const Dense d = dense_input(x, "gated_spatial_pool");
  TORCH_CHECK(d.C > 0, "gated_spatial_pool: C must be positive, got shape ", x.sizes());
  Tensor pooled = at::empty({d.N, 2, x.size(2), x.size(3)}, x.options());
  Tensor argmax = at::empty({d.N, x.size(2), x.size(3)}, x.options().dtype(at::kLong));
  Tensor count = at::empty({d.N, x.size(2), x.size(3)}, x.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gated_spatial_pool", [&] {
    using acc = acc_type<scalar_t>;
    const auto gate_acc = param_array<scalar_t>(gate, {d.N, d.C}, "gated_spatial_pool", "gate");
    const acc* g = gate_acc.data();
    scalar_t* pooled_p = pooled.data_ptr<scalar_t>();
    int64_t* arg_p = argmax.data_ptr<int64_t>();
    int32_t* cnt_p = count.data_ptr<int32_t>();
    const acc channels = acc(d.C);
    auto emit = [&](int64_t n, int64_t hw, const MaxStats<acc>& s) {
      pooled_p[(2 * n) * d.HW + hw] = static_cast<scalar_t>(s.sum / channels);
      pooled_p[(2 * n + 1) * d.HW + hw] = static_cast<scalar_t>(s.max);
      arg_p[n * d.HW + hw] = s.arg;
      cnt_p[n * d.HW + hw] = static_cast<int32_t>(s.count);
    };
    if (d.channels_last) {  // each position's C values are one contiguous row
      const scalar_t* x_p = d.t.const_data_ptr<scalar_t>();
      const scalar_t* end = x_p + d.t.numel();
      at::parallel_for(0, d.N * d.HW, row_grain(d.C), [&](int64_t begin, int64_t stop) {
        for (int64_t i = begin; i < stop; ++i) {
          const int64_t n = i / d.HW;
          emit(n, i % d.HW, reduce_contiguous<scalar_t, true>(x_p + i * d.C, g + n * d.C, d.C, end));
        }
      });
    } else {  // per-position lanes, reduced along channels
      pool_along_rows<scalar_t>(d, g, emit);
    }
  });
  return {pooled, argmax, count};
}

// ---------------------------------------------------------------------------
// cbam_apply
// ---------------------------------------------------------------------------
// One row of y = (x * ch_gate) * sp_gate, multiplied in that order as the reference does. `row_w` is
// the row's own gate (NCHW: the channel's; channels_last: the position's), lane_w the lanes' (read
// as whole vectors: padded). kPrefetch: x streams from memory (not for rows already in cache).
template <typename scalar_t, bool kPrefetch = true>
void apply_row(const scalar_t* xr, scalar_t* yr, int64_t lanes, acc_type<scalar_t> row_w,
               const acc_type<scalar_t>* lane_w, bool channels_last, const scalar_t* end) {
  using IO = VecIO<scalar_t>;
  using fvec = typename IO::fvec;
  constexpr int64_t kN = IO::kN;
  const fvec rw(row_w);
  for (int64_t j = 0; j < lanes; j += kN) {
    const int64_t nv = std::min(kN, lanes - j);
    if constexpr (kPrefetch) {
      prefetch(xr + j + kStreamAhead);
      prefetch_for_write(yr + j + kStreamAhead);
    }
    const fvec v = nv == kN ? IO::load(xr + j) : IO::load_tail(xr + j, nv, end);
    const fvec lw = fvec::loadu(lane_w + j);
    IO::store(yr + j, channels_last ? (v * lw) * rw : (v * rw) * lw, nv);
  }
}

// y = x * ch_gate * sp_gate over all of x; cg (N*C) and sp (N*H*W) padded by a vector
template <typename scalar_t>
void apply_gates(const Dense& d, const acc_type<scalar_t>* cg, const acc_type<scalar_t>* sp, scalar_t* y_p) {
  const scalar_t* x_p = d.t.const_data_ptr<scalar_t>();
  const scalar_t* end = x_p + d.t.numel();
  const int64_t rows = d.rows(), lanes = d.lanes();
  const bool cl = d.channels_last;
  at::parallel_for(0, d.N * rows, row_grain(lanes), [=](int64_t begin, int64_t stop) {
    for (int64_t i = begin; i < stop; ++i) {
      const int64_t n = i / rows;
      apply_row<scalar_t>(x_p + i * lanes, y_p + i * lanes, lanes, cl ? sp[i] : cg[i], (cl ? cg : sp) + n * lanes, cl,
                          end);
    }
  });
}

Tensor cbam_apply_cpu(const Tensor& x, const Tensor& ch_gate, const Tensor& sp_gate) {
  const Dense d = dense_input(x, "cbam_apply");
  const XSized y_out(x, d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_apply", [&] {
    const auto cg = param_array<scalar_t>(ch_gate, {d.N, d.C}, "cbam_apply", "ch_gate");
    const auto sp = param_array<scalar_t>(sp_gate, {d.N, x.size(2), x.size(3)}, "cbam_apply", "sp_gate");
    apply_gates<scalar_t>(d, cg.data(), sp.data(), y_out.work.data_ptr<scalar_t>());
  });
  return y_out.finish();
}

// ---------------------------------------------------------------------------
// cbam_forward_eval: the whole block at inference, in two passes over x
// ---------------------------------------------------------------------------
// With BatchNorm on its running statistics nothing couples the images, and the spatial gate of a
// row of the map needs only the pooled rows within the conv's reach. So after pass 1 (the channel
// pool) and the shared MLP, pass 2 walks each image's rows in bands: it pools the band's rows over
// channels (with the rows below it that the conv reaches), makes the band's gate (conv, BN,
// sigmoid), and applies both gates to the band while its rows are still in L2. x is read from
// memory twice and y written once, against three reads for the op-by-op forward; no pooled map or
// gate tensor is made, and the small parts cost no op calls.
//
// Every value is rounded to x's dtype where the op-by-op forward stores a tensor of that dtype;
// pooling, conv and apply sum in the same order as channel_pool, gated_spatial_pool,
// cbam_spatial_conv and cbam_apply, and the MLP's Linear layers are the same PyTorch ops. The two
// paths differ only in how BatchNorm's scale and shift meet (one multiply-add here) and in the last
// bit of exp (both sigmoids).

// The spatial gate's parameters: conv weight (Cin, kh, kw) and BatchNorm folded to a scale and shift
template <typename acc>
struct EvalSpatial {
  std::vector<acc> conv_w;
  acc bn_scale = 1, bn_shift = 0;
};

// Pass 2 over the images' rows in bands (see above). cg: N*C channel gates, padded by a vector.
template <typename scalar_t>
void eval_spatial_pass(const Dense& d, int64_t H, int64_t W, const EvalSpatial<acc_type<scalar_t>>& p, int64_t kh,
                       int64_t kw, int64_t ph, int64_t pw, bool light, bool max_first, const acc_type<scalar_t>* cg,
                       scalar_t* y_p) {
  using IO = VecIO<scalar_t>;
  using acc = typename IO::acc;
  using fvec = typename IO::fvec;
  constexpr int64_t kN = IO::kN, kVecs = 4;
  const int64_t C = d.C, HW = d.HW, cin = light ? 1 : 2;
  const scalar_t* x_p = d.t.const_data_ptr<scalar_t>();
  const scalar_t* end = x_p + d.t.numel();
  // bands of about kEvalBand bytes of x (at least a few vectors per channel), so that a band, the
  // conv's reach pooled ahead of it and its share of y stay in L2; images split into row chunks
  // only to feed every thread (a chunk pools the conv's reach past its edges once more)
  const int64_t band = std::clamp<int64_t>(
      std::max(ceil_div(8 * kN, W), kEvalBand / std::max<int64_t>(1, C * W * int64_t(sizeof(scalar_t)))), 1,
      std::min(H, kMaxLaneTile / W + 1));
  int64_t chunks = std::clamp<int64_t>(ceil_div(2 * at::get_num_threads(), d.N), 1, ceil_div(H, band));
  const int64_t chunk_rows = ceil_div(H, chunks);
  chunks = ceil_div(H, chunk_rows);
  const int64_t buf_rows = chunk_rows + 2 * ph, row_len = round_up(W, kN) + kw;
  const acc channels = acc(C);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C * chunk_rows * W));  // small: one thread
  at::parallel_for(0, d.N * chunks, grain, [&](int64_t begin, int64_t stop) {
    // conv input rows [c0 - ph, c1 + ph) of the chunk, with pw zeros left of each row and zeros past it
    std::vector<acc> in(cin * buf_rows * row_len + kN);
    std::vector<acc> sg(round_up(band * W, kN) + kN, 0);
    LaneStates<acc> st;
    for (int64_t t = begin; t < stop; ++t) {
      const int64_t n = t / chunks, c0 = (t % chunks) * chunk_rows, c1 = std::min(H, c0 + chunk_rows);
      const acc* cg_n = cg + n * C;
      std::fill(in.begin(), in.end(), acc(0));
      // pooled (mean, max) at position pos of image n into the conv input, as the flavour takes it
      auto put = [&](int64_t pos, acc sum, acc max) {
        const acc mean = IO::round(sum / channels), mx = IO::round(max);
        acc* at0 = in.data() + (pos / W - c0 + ph) * row_len + pw + pos % W;
        if (light) {
          at0[0] = IO::round(IO::round(acc(0.5) * mean) + IO::round(acc(0.5) * mx));
        } else {
          at0[0] = max_first ? mx : mean;
          at0[buf_rows * row_len] = max_first ? mean : mx;
        }
      };
      auto pool = [&](int64_t row_begin, int64_t row_end) {
        for (int64_t pos0 = row_begin * W; pos0 < row_end * W; pos0 += kMaxLaneTile) {
          const int64_t len = std::min(kMaxLaneTile, row_end * W - pos0);
          if (d.channels_last) {
            for (const auto l : c10::irange(len)) {
              const auto s = reduce_contiguous<scalar_t, true, false>(x_p + (n * HW + pos0 + l) * C, cg_n, C, end);
              put(pos0 + l, s.sum, s.max);
            }
          } else {
            reduce_rows<scalar_t, false>(x_p + n * C * HW + pos0, HW, C, len, cg_n, end, st);
            for (const auto l : c10::irange(len)) put(pos0 + l, st.sum[l], st.max[l]);
          }
        }
      };
      int64_t pooled_to = std::max<int64_t>(0, c0 - ph);
      for (int64_t r = c0; r < c1; r += band) {
        const int64_t r_end = std::min(c1, r + band);
        const int64_t need = std::min(H, r_end + ph);
        pool(pooled_to, need);
        pooled_to = need;
        // the band's gate: conv (cbam_spatial_conv's sum order), BN on running stats, sigmoid
        for (int64_t yy = r; yy < r_end; ++yy) {
          for (int64_t x0 = 0; x0 < W; x0 += kN * kVecs) {
            const int64_t vecs = std::min(kVecs, ceil_div(W - x0, kN));
            fvec a[kVecs];
            conv_vectors<acc, kVecs>(in.data() + (yy - c0) * row_len + x0, buf_rows * row_len, row_len, cin, kh, kw,
                                     p.conv_w.data(), vecs, a);
            for (int64_t v = 0; v < vecs; ++v) {
              const fvec normed = IO::round(IO::round(a[v]) * fvec(p.bn_scale) + fvec(p.bn_shift));
              const fvec gate = IO::round((fvec(acc(1)) + (fvec(acc(0)) - normed).exp()).reciprocal());
              gate.store(sg.data() + (yy - r) * W + x0 + v * kN);  // lanes past W are overwritten or unread
            }
          }
        }
        // both gates onto the band's rows, still in L2 from the pooling
        if (d.channels_last) {
          for (int64_t pos = r * W; pos < r_end * W; ++pos) {
            const int64_t i = n * HW + pos;
            apply_row<scalar_t, false>(x_p + i * C, y_p + i * C, C, sg[pos - r * W], cg_n, true, end);
          }
        } else {
          // y's rows of the band are short segments a plane apart, too short for the hardware
          // prefetchers: each is prefetched for writing a few KB ahead (the whole op at 8x256x56x56:
          // 2.95 -> 2.10 ms, best of 60 on 2 threads)
          const int64_t seg = (r_end - r) * W;
          const int64_t ahead = std::clamp<int64_t>(ceil_div(kSegmentAhead, seg * int64_t(sizeof(scalar_t))), 2, 32);
          for (const auto c : c10::irange(C)) {
            const int64_t off = (n * C + c) * HW + r * W;
            if (c + ahead < C) prefetch_segment_for_write(y_p + off + ahead * HW, seg);
            apply_row<scalar_t, false>(x_p + off, y_p + off, seg, cg_n[c], sg.data(), false, end);
          }
        }
      }
    }
  });
}

// w as a (rows, cols) matrix: a Linear weight, or a 1x1 conv's (rows, cols, 1, 1)
Tensor as_matrix(const Tensor& w, int64_t rows, int64_t cols, at::ScalarType dtype, const char* op, const char* name) {
  const bool shape_ok = (w.dim() == 2 || (w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1)) && w.size(0) == rows &&
                        w.size(1) == cols;
  TORCH_CHECK(shape_ok && w.device().is_cpu() && w.scalar_type() == dtype, op, ": ", name,
              " must be a CPU tensor of x's dtype ", dtype, " and shape (", rows, ", ", cols, ") or (", rows, ", ",
              cols, ", 1, 1), got ", w.scalar_type(), " of shape ", w.sizes(), " on ", w.device());
  return w.reshape({rows, cols});
}

// one value of a (1,) BatchNorm parameter or statistic, in the accumulation type; `fallback` when absent
double bn_value(const std::optional<Tensor>& t, double fallback, const char* op, const char* name) {
  if (!t) return fallback;
  TORCH_CHECK(t->device().is_cpu() && at::isFloatingType(t->scalar_type()) && t->numel() == 1, op, ": ", name,
              " must be a floating CPU tensor of one value (the spatial gate has one channel), got ",
              t->scalar_type(), " of shape ", t->sizes(), " on ", t->device());
  return t->item<double>();
}

// The channel gate from the pooled (N, C) vectors, rounded to scalar_t: sigmoid(mlp(avg) +
// mlp(max)), or with light sigmoid(mlp(0.5 * avg + 0.5 * max)); mlp(v) = w2 relu(w1 v + b1) + b2.
// The two Linear layers are PyTorch's, on the same values as the op-by-op forward; the small steps
// between them are loops here, rounded where PyTorch stores a tensor. (Six small ATen ops less:
// right after pass 1 each costs 5-10 us with the interpreter's and ATen's data out of cache.)
template <typename scalar_t>
std::vector<acc_type<scalar_t>> eval_channel_gate(const std::vector<acc_type<scalar_t>>& avg,
                                                  const std::vector<acc_type<scalar_t>>& mx, int64_t N, int64_t C,
                                                  const Tensor& w1m, const std::optional<Tensor>& b1,
                                                  const Tensor& w2m, const std::optional<Tensor>& b2, bool light) {
  using IO = VecIO<scalar_t>;
  using acc = typename IO::acc;
  const int64_t R = light ? N : 2 * N;  // the MLP's input rows: avg then max, or their blend
  Tensor in = at::empty({R, C}, w1m.options());
  scalar_t* in_p = in.data_ptr<scalar_t>();
  for (const auto i : c10::irange(N * C)) {
    if (light) {
      in_p[i] = static_cast<scalar_t>(IO::round(acc(0.5) * avg[i]) + IO::round(acc(0.5) * mx[i]));
    } else {
      in_p[i] = static_cast<scalar_t>(avg[i]);
      in_p[N * C + i] = static_cast<scalar_t>(mx[i]);
    }
  }
  Tensor h = at::linear(in, w1m, b1).contiguous();
  scalar_t* h_p = h.data_ptr<scalar_t>();
  for (const auto i : c10::irange(h.numel())) h_p[i] = h_p[i] < scalar_t(0) ? scalar_t(0) : h_p[i];  // keeps NaN
  const Tensor out = at::linear(h, w2m, b2).contiguous();
  const scalar_t* out_p = out.const_data_ptr<scalar_t>();
  std::vector<acc> gate(N * C + IO::kN, 0);
  for (const auto i : c10::irange(N * C)) {
    const acc pre = light ? acc(out_p[i]) : IO::round(acc(out_p[i]) + acc(out_p[N * C + i]));
    gate[i] = IO::round(acc(1) / (acc(1) + std::exp(-pre)));
  }
  return gate;
}

Tensor cbam_forward_eval_cpu(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1, const Tensor& w2,
                             const std::optional<Tensor>& b2, const std::optional<Tensor>& conv_w,
                             const std::optional<Tensor>& bn_weight, const std::optional<Tensor>& bn_bias,
                             const std::optional<Tensor>& bn_mean, const std::optional<Tensor>& bn_var, double bn_eps,
                             at::IntArrayRef padding, bool light, bool max_first) {
  constexpr const char* op = "cbam_forward_eval";
  const Dense d = dense_input(x, op);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(d.C > 0 && d.HW > 0, op, ": C and H*W must be positive, got shape ", x.sizes());
  // hidden may be 0: the official MLP has C // reduction hidden units, 0 when reduction > C, and
  // then computes b2 alone (PyTorch's Linear takes empty weights)
  TORCH_CHECK(w1.dim() >= 2, op, ": w1 must be (hidden, C) or (hidden, C, 1, 1), got shape ", w1.sizes());
  const int64_t hidden = w1.size(0), H = x.size(2), W = x.size(3);
  const Tensor w1m = as_matrix(w1, hidden, d.C, dtype, op, "w1");
  const Tensor w2m = as_matrix(w2, d.C, hidden, dtype, op, "w2");
  auto check_bias = [&](const std::optional<Tensor>& t, int64_t size, const char* name) {
    TORCH_CHECK(!t || (t->device().is_cpu() && t->scalar_type() == dtype && t->dim() == 1 && t->size(0) == size), op,
                ": ", name, " must be a CPU tensor of x's dtype ", dtype, " and shape (", size, "), got ",
                t->scalar_type(), " of shape ", t->sizes(), " on ", t->device());
  };
  check_bias(b1, hidden, "b1");
  check_bias(b2, d.C, "b2");
  const bool spatial = conv_w.has_value();
  TORCH_CHECK(spatial == (bn_mean.has_value() && bn_var.has_value()) &&
                  (spatial || (!bn_weight.has_value() && !bn_bias.has_value())),
              op, ": the spatial gate takes conv_w with bn_mean and bn_var (bn_weight, bn_bias optional); ",
              "without conv_w (no spatial gate) all of them are None");
  const int64_t cin = light ? 1 : 2;
  int64_t kh = 0, kw = 0;
  if (spatial) {
    TORCH_CHECK(conv_w->dim() == 4 && conv_w->size(0) == 1 && conv_w->size(1) == cin, op, ": conv_w must be (1, ",
                cin, ", kh, kw), got shape ", conv_w->sizes());
    kh = conv_w->size(2);
    kw = conv_w->size(3);
    TORCH_CHECK(padding.size() == 2 && kh == 2 * padding[0] + 1 && kw == 2 * padding[1] + 1, op,
                ": the spatial conv must keep the map's size (kernel 2 * padding + 1), got a ", kh, "x", kw,
                " kernel with padding ", padding);
    TORCH_CHECK(bn_eps >= 0, op, ": bn_eps must be non-negative, got ", bn_eps);
  }
  const XSized y_out(x, d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op, [&] {
    using acc = acc_type<scalar_t>;
    constexpr int64_t kN = VecIO<scalar_t>::kN;
    // pass 1: the channel pool (sum and max; no argmax at inference), as channel_pool rounds them
    std::vector<acc> avg(d.N * d.C), mx(d.N * d.C);
    const acc len = acc(d.HW);
    channel_stats<scalar_t, false>(d, [&](int64_t nc, const MaxStats<acc>& s) {
      avg[nc] = VecIO<scalar_t>::round(s.sum / len);
      mx[nc] = VecIO<scalar_t>::round(s.max);
    });
    const auto cg = eval_channel_gate<scalar_t>(avg, mx, d.N, d.C, w1m, b1, w2m, b2, light);

    scalar_t* y_p = y_out.work.data_ptr<scalar_t>();
    if (!spatial) {  // the channel gate alone
      const std::vector<acc> ones(d.N * d.HW + kN, acc(1));
      apply_gates<scalar_t>(d, cg.data(), ones.data(), y_p);
      return;
    }
    EvalSpatial<acc> p;
    p.conv_w = param_array<scalar_t>(*conv_w, {1, cin, kh, kw}, op, "conv_w");
    // BatchNorm on running statistics as one scale and shift, folded as PyTorch's CPU kernel folds it
    const acc inv_std = acc(1) / std::sqrt(acc(bn_value(bn_var, 1, op, "bn_var")) + acc(bn_eps));
    p.bn_scale = inv_std * acc(bn_value(bn_weight, 1, op, "bn_weight"));
    p.bn_shift = acc(bn_value(bn_bias, 0, op, "bn_bias")) - acc(bn_value(bn_mean, 0, op, "bn_mean")) * p.bn_scale;
    eval_spatial_pass<scalar_t>(d, H, W, p, kh, kw, padding[0], padding[1], light, max_first, cg.data(), y_p);
  });
  return y_out.finish();
}

// ---------------------------------------------------------------------------
// cbam_apply_backward
// ---------------------------------------------------------------------------
std::tuple<Tensor, Tensor> cbam_apply_backward_cpu(const Tensor& grad_y, const Tensor& x, const Tensor& ch_gate,
                                                   const Tensor& sp_gate) {
  constexpr const char* op = "cbam_apply_backward";
  const Dense d = dense_input(x, op);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have x's shape ", x.sizes(), ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && grad_y.device().is_cpu(), op,
              ": grad_y must be a CPU tensor of x's dtype");
  const Tensor gy = grad_y.contiguous(d.format());
  Tensor d_ch = at::empty({d.N, d.C}, x.options());
  Tensor d_sp = at::empty({d.N, x.size(2), x.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using IO = VecIO<scalar_t>;
    using acc = typename IO::acc;
    using fvec = typename IO::fvec;
    constexpr int64_t kN = IO::kN;
    const auto cg_acc = param_array<scalar_t>(ch_gate, {d.N, d.C}, op, "ch_gate");
    const auto sp_acc = param_array<scalar_t>(sp_gate, {d.N, x.size(2), x.size(3)}, op, "sp_gate");
    // NCHW: rows weigh by ch_gate, lanes by sp_gate; channels_last the other way round
    const acc* row_w = (d.channels_last ? sp_acc : cg_acc).data();
    const acc* lane_w = (d.channels_last ? cg_acc : sp_acc).data();
    const scalar_t* x_p = d.t.const_data_ptr<scalar_t>();
    const scalar_t* gy_p = gy.const_data_ptr<scalar_t>();
    const scalar_t* x_end = x_p + d.t.numel();
    const scalar_t* gy_end = gy_p + gy.numel();
    const int64_t rows = d.rows(), lanes = d.lanes();
    // short tiles: a block of kRowBlock rows of grad_y and x and the next one, prefetched, stay in L1
    const Grid g(d.N, rows, lanes, kN, /*split_rows=*/true, 0, kMaxLaneTile / 2);
    // row sums (sum over lanes of g * lane_w) per lane tile, lane sums (sum over rows of g * row_w) per row chunk
    std::vector<acc> row_part(g.N * g.n_tiles * rows, acc(0));
    std::vector<acc> lane_part(g.N * g.n_chunks * lanes, acc(0));
    for_each_task(g, [&](const Grid::Task& k) {
      __at_align__ acc lane_acc[kMaxLaneTile + kN] = {};
      const acc* lw_base = lane_w + k.n * lanes + k.lane0;
      for (int64_t r0 = k.row0; r0 < k.row0 + k.rows; r0 += kRowBlock) {
        const int64_t rb = std::min(kRowBlock, k.row0 + k.rows - r0);
        fvec racc[kRowBlock], rw[kRowBlock];
        const scalar_t* xr[kRowBlock];
        const scalar_t* gr[kRowBlock];
        for (const auto r : c10::irange(rb)) {
          racc[r] = fvec(acc(0));
          rw[r] = fvec(row_w[k.n * rows + r0 + r]);
          xr[r] = x_p + (k.n * rows + r0 + r) * lanes + k.lane0;
          gr[r] = gy_p + (k.n * rows + r0 + r) * lanes + k.lane0;
        }
        for (int64_t j = 0; j < k.lanes; j += kN) {
          const int64_t nv = std::min(kN, k.lanes - j);
          const fvec lw = fvec::set(fvec(acc(0)), fvec::loadu(lw_base + j), nv);
          fvec la = fvec::loadu(lane_acc + j);
          for (int64_t r = 0; r < rb; ++r) {
            prefetch(gr[r] + j + kRowBlock * lanes);
            prefetch(xr[r] + j + kRowBlock * lanes);
            const fvec gv = nv == kN ? IO::load(gr[r] + j) : IO::load_tail(gr[r] + j, nv, gy_end);
            const fvec xv = nv == kN ? IO::load(xr[r] + j) : IO::load_tail(xr[r] + j, nv, x_end);
            const fvec gx = gv * xv;
            la = la + gx * rw[r];
            racc[r] = racc[r] + gx * lw;
          }
          la.store(lane_acc + j);
        }
        for (const auto r : c10::irange(rb)) row_part[(k.n * g.n_tiles + k.tile) * rows + r0 + r] = hsum(racc[r]);
      }
      std::copy_n(lane_acc, k.lanes, lane_part.data() + (k.n * g.n_chunks + k.chunk) * lanes + k.lane0);
    });
    // NCHW: row sums are grad_ch_gate, lane sums grad_sp_gate; channels_last the other way round
    scalar_t* row_out = (d.channels_last ? d_sp : d_ch).data_ptr<scalar_t>();
    scalar_t* lane_out = (d.channels_last ? d_ch : d_sp).data_ptr<scalar_t>();
    for (const auto n : c10::irange(d.N)) {
      for (const auto r : c10::irange(rows)) {
        acc s = 0;
        for (const auto t : c10::irange(g.n_tiles)) s += row_part[(n * g.n_tiles + t) * rows + r];
        row_out[n * rows + r] = static_cast<scalar_t>(s);
      }
      for (const auto l : c10::irange(lanes)) {
        acc s = 0;
        for (const auto c : c10::irange(g.n_chunks)) s += lane_part[(n * g.n_chunks + c) * lanes + l];
        lane_out[n * lanes + l] = static_cast<scalar_t>(s);
      }
    }
  });
  return {d_ch, d_sp};
}

// ---------------------------------------------------------------------------
// Gradient weights of the max pools (reference: fastattn.reference._max_weight)
// ---------------------------------------------------------------------------
// A position that holds the max gets `hit`, the others `miss`:
//   split_ties: hit = (1 / count) * g, miss = (0 / count) * g  (NaN when count == 0, as PyTorch)
//   otherwise:  hit = 1 * g at the first argmax, miss = 0 * g
template <typename acc>
void max_grad_weights(acc g, int32_t count, bool split_ties, acc& hit, acc& miss) {
  const acc cnt = split_ties ? acc(count) : acc(1);
  hit = (acc(1) / cnt) * g;
  miss = (acc(0) / cnt) * g;
}

// Per-position terms of the spatial max-pool gradient, each N*H*W (+ a vector of padding):
// a = grad_mean / C, hit, miss, and the max itself; and the tie counts they were made from.
// Making them checks grad_pooled, pooled and count (shapes, dtypes).
template <typename acc>
struct SpatialPoolTerms {
  std::vector<acc> a, hit, miss, max;
  Tensor count;  // (N, H, W) int32, contiguous
};

template <typename scalar_t>
SpatialPoolTerms<acc_type<scalar_t>> spatial_pool_terms(const Tensor& grad_pooled, const Tensor& pooled,
                                                        const Tensor& count, const Tensor& x, const Dense& d,
                                                        bool split_ties, const char* op) {
  using acc = acc_type<scalar_t>;
  const int64_t H = x.size(2), W = x.size(3);
  const auto gp = param_array<scalar_t>(grad_pooled, {d.N, 2, H, W}, op, "grad_pooled");
  const auto pl = param_array<scalar_t>(pooled, {d.N, 2, H, W}, op, "pooled");
  const Tensor cnt = index_array(count, {d.N, H, W}, at::kInt, op, "count");
  const int32_t* cnt_p = cnt.const_data_ptr<int32_t>();
  const int64_t len = d.N * d.HW + Vectorized<acc>::size();
  SpatialPoolTerms<acc> t{std::vector<acc>(len, 0), std::vector<acc>(len, 0), std::vector<acc>(len, 0),
                          std::vector<acc>(len, 0), cnt};
  const acc channels = acc(d.C);
  for (const auto n : c10::irange(d.N)) {
    for (const auto hw : c10::irange(d.HW)) {
      const int64_t i = n * d.HW + hw;
      t.a[i] = gp[2 * n * d.HW + hw] / channels;
      max_grad_weights(gp[(2 * n + 1) * d.HW + hw], cnt_p[i], split_ties, t.hit[i], t.miss[i]);
      t.max[i] = pl[(2 * n + 1) * d.HW + hw];
    }
  }
  return t;
}

// ---------------------------------------------------------------------------
// gated_spatial_pool_backward_gate
// ---------------------------------------------------------------------------
Tensor gated_spatial_pool_backward_gate_cpu(const Tensor& grad_pooled, const Tensor& x, const Tensor& gate,
                                            const Tensor& pooled, const Tensor& argmax, const Tensor& count,
                                            bool split_ties) {
  constexpr const char* op = "gated_spatial_pool_backward_gate";
  const Dense d = dense_input(x, op);
  const int64_t H = x.size(2), W = x.size(3);
  Tensor d_gate = at::empty({d.N, d.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using IO = VecIO<scalar_t>;
    using acc = typename IO::acc;
    using fvec = typename IO::fvec;
    constexpr int64_t kN = IO::kN;
    const auto g_acc = param_array<scalar_t>(gate, {d.N, d.C}, op, "gate");
    const auto terms = spatial_pool_terms<scalar_t>(grad_pooled, pooled, count, x, d, split_ties, op);
    const Tensor arg = index_array(argmax, {d.N, H, W}, at::kLong, op, "argmax");
    const acc* gate_p = g_acc.data();
    const acc *t_a = terms.a.data(), *t_hit = terms.hit.data(), *t_miss = terms.miss.data(), *t_max = terms.max.data();
    const int64_t* arg_p = arg.const_data_ptr<int64_t>();
    const scalar_t* x_p = d.t.const_data_ptr<scalar_t>();
    const scalar_t* x_end = x_p + d.t.numel();
    const int64_t rows = d.rows(), lanes = d.lanes();
    const fvec lane_iota = iota<acc>();
    const Grid grid(d.N, rows, lanes, kN, /*split_rows=*/true);
    // grad_gate[n, c] = sum over positions of x * (a + (max hit ? hit : miss)): NCHW sums rows' lanes,
    // channels_last sums lanes over rows; partial sums per lane tile or per row chunk
    std::vector<acc> part(d.channels_last ? grid.N * grid.n_chunks * lanes : grid.N * grid.n_tiles * rows, acc(0));
    for_each_task(grid, [&](const Grid::Task& k) {
      const int64_t base = k.n * rows;
      const int64_t ahead = prefetch_distance(k.lanes, lanes);
      if (!d.channels_last) {  // rows = channels, lanes = positions
        __at_align__ acc lane_arg[kMaxLaneTile + kN];  // argmax channel, local to this row chunk
        for (const auto l : c10::irange(k.lanes)) lane_arg[l] = local_index<acc>(arg_p[k.n * lanes + k.lane0 + l], k.row0);
        const int64_t p0 = k.n * lanes + k.lane0;
        for (int64_t r = k.row0; r < k.row0 + k.rows; ++r) {
          const fvec gr(gate_p[base + r]);
          const fvec rloc(acc(r - k.row0));
          const scalar_t* xr = x_p + (base + r) * lanes + k.lane0;
          auto contrib = [&](int64_t j, const fvec& xv) {
            const fvec hit_mask = split_ties ? IO::round(xv * gr) == fvec::loadu(t_max + p0 + j)
                                             : rloc == fvec::loadu(lane_arg + j);
            const fvec dz = fvec::loadu(t_a + p0 + j) +
                            fvec::blendv(fvec::loadu(t_miss + p0 + j), fvec::loadu(t_hit + p0 + j), hit_mask);
            return dz * xv;
          };
          // kSums partial sums over alternate vectors: one chain of adds would be the loop's bound
          fvec s[kSums];
          for (auto& v : s) v = fvec(acc(0));
          int64_t j = 0;
          for (; j + kSums * kN <= k.lanes; j += kSums * kN)
            for (int64_t u = 0; u < kSums; ++u) {
              prefetch(xr + j + u * kN + ahead);
              s[u] = s[u] + contrib(j + u * kN, IO::load(xr + j + u * kN));
            }
          for (int64_t u = 0; j < k.lanes; j += kN, ++u) {
            const int64_t nv = std::min(kN, k.lanes - j);
            const fvec c = contrib(j, nv == kN ? IO::load(xr + j) : IO::load_tail(xr + j, nv, x_end));
            s[u] = s[u] + (nv == kN ? c : fvec::set(fvec(acc(0)), c, nv));
          }
          static_assert(kSums == 4, "the partial sums add as a tree of four");
          part[(k.n * grid.n_tiles + k.tile) * rows + r] = hsum((s[0] + s[1]) + (s[2] + s[3]));
        }
      } else {  // rows = positions, lanes = channels
        __at_align__ acc lane_acc[kMaxLaneTile + kN] = {};
        const acc* gl = gate_p + k.n * lanes + k.lane0;
        for (int64_t r = k.row0; r < k.row0 + k.rows; ++r) {
          const int64_t p = base + r;
          const fvec a(t_a[p]), hit(t_hit[p]), miss(t_miss[p]), mx(t_max[p]);
          const fvec arg_loc(local_index<acc>(arg_p[p], k.lane0));
          const scalar_t* xr = x_p + p * lanes + k.lane0;
          fvec lidx = lane_iota;
          for (int64_t j = 0; j < k.lanes; j += kN, lidx = lidx + fvec(acc(kN))) {
            const int64_t nv = std::min(kN, k.lanes - j);
            prefetch(xr + j + ahead);
            const fvec xv = nv == kN ? IO::load(xr + j) : IO::load_tail(xr + j, nv, x_end);
            const fvec hit_mask = split_ties ? IO::round(xv * fvec::loadu(gl + j)) == mx : lidx == arg_loc;
            const fvec dz = a + fvec::blendv(miss, hit, hit_mask);
            (fvec::loadu(lane_acc + j) + dz * xv).store(lane_acc + j);
          }
        }
        std::copy_n(lane_acc, k.lanes, part.data() + (k.n * grid.n_chunks + k.chunk) * lanes + k.lane0);
      }
    });
    scalar_t* out = d_gate.data_ptr<scalar_t>();
    const int64_t parts = d.channels_last ? grid.n_chunks : grid.n_tiles;
    const int64_t len = d.channels_last ? lanes : rows;  // = C
    for (const auto n : c10::irange(d.N)) {
      for (const auto c : c10::irange(len)) {
        acc s = 0;
        for (const auto q : c10::irange(parts)) s += part[(n * parts + q) * len + c];
        out[n * len + c] = static_cast<scalar_t>(s);
      }
    }
  });
  return d_gate;
}

// ---------------------------------------------------------------------------
// cbam_grad_x
// ---------------------------------------------------------------------------
// Per-channel and per-position terms of the x-gradient (cbam_grad_x), each array padded by a vector.
template <typename acc>
struct GradXTerms {
  bool has_gy, has_pool, has_avg, has_max, split_ties;
  const acc *c_gate, *c_avg, *c_hit, *c_miss, *c_max;  // (N*C): ch_gate, grad_avg / HW, channel-max hit, miss, max
  const int64_t* c_arg;                                 // (N*C): first argmax position
  const int32_t* c_cnt;                                 // (N*C): ties of the channel max
  const acc *p_gate, *p_a, *p_hit, *p_miss, *p_max;    // (N*HW): sp_gate, grad_mean / C, spatial-max hit, miss, max
  const acc* p_amiss;                                   // (N*HW): grad_mean / C + miss
  const int64_t* p_arg;                                 // (N*HW): first argmax channel
  const int32_t* p_cnt;                                 // (N*HW): ties of the spatial max
};

// dx over one task's rows and lane tile: the sum of the given terms, in the reference's order.
// The row's own terms are broadcasts, the lanes' are vector loads; channel and position swap roles
// between NCHW (rows = channels) and channels_last (rows = positions).
//
// x only decides which elements hold a max (a hit) and take the max pool's gradient; every other
// element takes `miss`, a signed zero (or NaN, then in every element alike). Where each max has
// at most one hit, at its argmax (always under the first-index rule; under timm's split rule when
// no count in the task passes 1, and count 0, a NaN max, has none) the task does not read x: it
// streams grad_y into dx with the miss terms, then recomputes with the hit terms the vectors that
// hold an argmax (one per channel and one per position), hits found by index. Elsewhere (a tie
// under the split rule) every vector takes the full formula, hits found by comparing x with the max.
//
// Argmax indices are compared as floats local to this task's row chunk or lane tile.
// Everything is copied into locals: the stores to dx could otherwise alias captured state and
// force reloads in the inner loop.
template <typename scalar_t, bool kChannelsLast>
void grad_x_task(const GradXTerms<acc_type<scalar_t>> t, const Grid::Task& k, int64_t rows, int64_t lanes,
                 const scalar_t* x_p, const scalar_t* gy_p, scalar_t* dx_p, int64_t numel) {
  using IO = VecIO<scalar_t>;
  using acc = typename IO::acc;
  using fvec = typename IO::fvec;
  constexpr int64_t kN = IO::kN;
  const bool has_gy = t.has_gy, has_pool = t.has_pool, has_avg = t.has_avg, has_max = t.has_max;
  const bool split = t.split_ties;
  const scalar_t* x_end = x_p + numel;
  const scalar_t* gy_end = gy_p ? gy_p + numel : nullptr;
  const int64_t l0 = k.n * lanes + k.lane0;
  // The max indexed by lane (NCHW: the spatial max, one per position; channels_last: the channel
  // max) has its argmax along rows; the max indexed by row has its argmax along lanes.
  const bool lane_max = kChannelsLast ? has_max : has_pool, row_max = kChannelsLast ? has_pool : has_max;
  const int64_t* lane_arg_src = kChannelsLast ? t.c_arg : t.p_arg;
  const int64_t* row_arg_src = kChannelsLast ? t.p_arg : t.c_arg;
  const int32_t* lane_cnt = kChannelsLast ? t.c_cnt : t.p_cnt;
  const int32_t* row_cnt = kChannelsLast ? t.p_cnt : t.c_cnt;
  // an argmax index, local to `base`; -1 (never a hit) for a NaN max under the split rule
  auto arg_local = [&](const int64_t* arg, const int32_t* cnt, int64_t i, int64_t base) {
    return split && cnt[i] == 0 ? acc(-1) : local_index<acc>(arg[i], base);
  };
  std::vector<acc> lane_arg_buf(round_up(k.lanes, kN), acc(-1));  // the lane max's argmax, a local row
  const acc* lane_arg = lane_arg_buf.data();
  if (lane_max)
    for (const auto l : c10::irange(k.lanes)) lane_arg_buf[l] = arg_local(lane_arg_src, lane_cnt, l0 + l, k.row0);
  // the lane dimension's arrays at this tile
  auto at_tile = [&](const acc* a) { return a ? a + l0 : nullptr; };  // absent terms stay null
  const acc* lg = at_tile(kChannelsLast ? t.c_gate : t.p_gate);
  const acc* l_avg = at_tile(t.c_avg);  // read in channels_last only
  const acc* l_hit = at_tile(kChannelsLast ? t.c_hit : t.p_hit);
  const acc* l_miss = at_tile(kChannelsLast ? t.c_miss : t.p_miss);
  const acc* l_max = at_tile(kChannelsLast ? t.c_max : t.p_max);
  const acc* l_a = at_tile(t.p_a);          // read in NCHW only
  const acc* l_amiss = at_tile(t.p_amiss);  // read in NCHW only
  const fvec zero(acc(0));
  const fvec lane_iota = iota<acc>();
  const int64_t ahead = prefetch_distance(k.lanes, lanes);

  // Sparse hits: each max has at most one, at its argmax.
  bool sparse = true;
  if (split) {
    if (lane_max)
      for (const auto l : c10::irange(k.lanes)) sparse = sparse && lane_cnt[l0 + l] <= 1;
    if (row_max)
      for (int64_t r = k.row0; r < k.row0 + k.rows; ++r) sparse = sparse && row_cnt[k.n * rows + r] <= 1;
  }
  const bool read_x = !sparse && (has_pool || has_max);

  // the row's own terms
  struct RowTerms {
    fvec rg, r_avg, r_hit, r_miss, r_max, r_a, r_amiss, r_arg, r_loc;
  };
  auto row_terms = [&](int64_t r) {
    const int64_t ri = k.n * rows + r;
    RowTerms rt;
    rt.r_loc = fvec(acc(r - k.row0));
    if (row_max) rt.r_arg = fvec(arg_local(row_arg_src, row_cnt, ri, k.lane0));
    if constexpr (kChannelsLast) {  // row = position
      rt.rg = fvec(t.p_gate[ri]);
      if (has_pool) {
        rt.r_a = fvec(t.p_a[ri]);
        rt.r_amiss = fvec(t.p_amiss[ri]);
        rt.r_hit = fvec(t.p_hit[ri]);
        rt.r_miss = fvec(t.p_miss[ri]);
        rt.r_max = fvec(t.p_max[ri]);
      }
    } else {  // row = channel
      rt.rg = fvec(t.c_gate[ri]);
      rt.r_avg = fvec(t.c_avg[ri]);
      if (has_max) {
        rt.r_hit = fvec(t.c_hit[ri]);
        rt.r_miss = fvec(t.c_miss[ri]);
        rt.r_max = fvec(t.c_max[ri]);
      }
    }
    return rt;
  };
  // lanes [j, j + nv) of row ri, every term
  auto full_vec = [&](const RowTerms& rt, int64_t ri, int64_t j, int64_t nv) {
    const scalar_t* xr = x_p + ri * lanes + k.lane0;
    const scalar_t* gr = gy_p ? gy_p + ri * lanes + k.lane0 : nullptr;
    fvec xv = zero, gv = zero;
    if (read_x) xv = nv == kN ? IO::load(xr + j) : IO::load_tail(xr + j, nv, x_end);
    if (has_gy) gv = nv == kN ? IO::load(gr + j) : IO::load_tail(gr + j, nv, gy_end);
    const fvec l_loc = lane_iota + fvec(acc(j));
    const fvec la = fvec::loadu(lane_arg + j);
    // the element's channel gate and position gate
    const fvec cg = kChannelsLast ? fvec::loadu(lg + j) : rt.rg;
    const fvec sp = kChannelsLast ? rt.rg : fvec::loadu(lg + j);
    fvec dxv = zero;
    if (has_gy) dxv = (gv * cg) * sp;
    if (has_pool) {  // spatial max over channels: the position's terms
      const fvec pmax = kChannelsLast ? rt.r_max : fvec::loadu(l_max + j);
      const fvec c_loc = kChannelsLast ? l_loc : rt.r_loc;
      const fvec p_arg = kChannelsLast ? rt.r_arg : la;
      const fvec hit = read_x && split ? IO::round(xv * cg) == pmax : c_loc == p_arg;
      const fvec pa = kChannelsLast ? rt.r_a : fvec::loadu(l_a + j);
      const fvec phit = kChannelsLast ? rt.r_hit : fvec::loadu(l_hit + j);
      const fvec pmiss = kChannelsLast ? rt.r_miss : fvec::loadu(l_miss + j);
      dxv = dxv + cg * (pa + fvec::blendv(pmiss, phit, hit));
    }
    if (has_avg) dxv = dxv + (kChannelsLast ? fvec::loadu(l_avg + j) : rt.r_avg);
    if (has_max) {  // channel max over positions: the channel's terms
      const fvec cmax = kChannelsLast ? fvec::loadu(l_max + j) : rt.r_max;
      const fvec p_loc = kChannelsLast ? rt.r_loc : l_loc;
      const fvec c_arg = kChannelsLast ? la : rt.r_arg;
      const fvec hit = read_x && split ? xv == cmax : p_loc == c_arg;
      const fvec chit = kChannelsLast ? fvec::loadu(l_hit + j) : rt.r_hit;
      const fvec cmiss = kChannelsLast ? fvec::loadu(l_miss + j) : rt.r_miss;
      dxv = dxv + fvec::blendv(cmiss, chit, hit);
    }
    return dxv;
  };

  // sparse: the lanes whose argmax is row r, bucket_lanes[bucket_start[r - row0] .. bucket_start[r - row0 + 1])
  std::vector<int32_t> bucket_start, bucket_lanes;
  if (sparse && lane_max) {
    auto in_chunk = [&](int64_t l) { return lane_arg[l] >= 0 && lane_arg[l] < acc(k.rows); };
    bucket_start.assign(k.rows + 1, 0);
    for (const auto l : c10::irange(k.lanes))
      if (in_chunk(l)) ++bucket_start[static_cast<int64_t>(lane_arg[l]) + 1];
    for (const auto r : c10::irange(k.rows)) bucket_start[r + 1] += bucket_start[r];
    bucket_lanes.resize(bucket_start[k.rows]);
    std::vector<int32_t> fill(bucket_start.begin(), bucket_start.end() - 1);
    for (const auto l : c10::irange(k.lanes))
      if (in_chunk(l)) bucket_lanes[fill[static_cast<int64_t>(lane_arg[l])]++] = static_cast<int32_t>(l);
  }

  for (int64_t r = k.row0; r < k.row0 + k.rows; ++r) {
    const int64_t ri = k.n * rows + r;
    const scalar_t* gr = gy_p ? gy_p + ri * lanes + k.lane0 : nullptr;
    scalar_t* dr = dx_p + ri * lanes + k.lane0;
    const RowTerms rt = row_terms(r);
    if (!sparse) {
      for (int64_t j = 0; j < k.lanes; j += kN) {
        const int64_t nv = std::min(kN, k.lanes - j);
        if (read_x) prefetch(x_p + ri * lanes + k.lane0 + j + ahead);
        if (has_gy) prefetch(gr + j + ahead);
        prefetch_for_write(dr + j + ahead);
        IO::store(dr + j, full_vec(rt, ri, j, nv), nv);
      }
      continue;
    }
    // every element a miss: full_vec's sum without hits
    for (int64_t j = 0; j < k.lanes; j += kN) {
      const int64_t nv = std::min(kN, k.lanes - j);
      const fvec cg = kChannelsLast ? fvec::loadu(lg + j) : rt.rg;
      fvec dxv = zero;
      if (has_gy) {
        prefetch(gr + j + ahead);
        const fvec gv = nv == kN ? IO::load(gr + j) : IO::load_tail(gr + j, nv, gy_end);
        const fvec sp = kChannelsLast ? rt.rg : fvec::loadu(lg + j);
        dxv = (gv * cg) * sp;
      }
      if (has_pool) dxv = dxv + cg * (kChannelsLast ? rt.r_amiss : fvec::loadu(l_amiss + j));
      if (has_avg) dxv = dxv + (kChannelsLast ? fvec::loadu(l_avg + j) : rt.r_avg);
      if (has_max) dxv = dxv + (kChannelsLast ? fvec::loadu(l_miss + j) : rt.r_miss);
      prefetch_for_write(dr + j + ahead);
      IO::store(dr + j, dxv, nv);
    }
    // then the vectors that hold the row's argmax or a lane's
    auto redo = [&](int64_t lane) {
      const int64_t j = lane / kN * kN;
      const int64_t nv = std::min(kN, k.lanes - j);
      IO::store(dr + j, full_vec(rt, ri, j, nv), nv);
    };
    if (row_max) {
      const int64_t lane = row_arg_src[ri] - k.lane0;
      if (lane >= 0 && lane < k.lanes) redo(lane);
    }
    if (lane_max)
      for (int32_t b = bucket_start[r - k.row0]; b < bucket_start[r - k.row0 + 1]; ++b) redo(bucket_lanes[b]);
  }
}

Tensor cbam_grad_x_cpu(const Tensor& x, const std::optional<Tensor>& grad_y, const std::optional<Tensor>& ch_gate,
                       const std::optional<Tensor>& sp_gate, const std::optional<Tensor>& grad_pooled,
                       const std::optional<Tensor>& pooled, const std::optional<Tensor>& sp_argmax,
                       const std::optional<Tensor>& sp_count, const std::optional<Tensor>& grad_avg,
                       const std::optional<Tensor>& grad_max, const std::optional<Tensor>& ch_max,
                       const std::optional<Tensor>& ch_argmax, const std::optional<Tensor>& ch_count,
                       bool split_ties) {
  constexpr const char* op = "cbam_grad_x";
  const Dense d = dense_input(x, op);
  const int64_t H = x.size(2), W = x.size(3);
  const bool has_gy = grad_y.has_value(), has_pool = grad_pooled.has_value();
  const bool has_avg = grad_avg.has_value(), has_max = grad_max.has_value();
  TORCH_CHECK(!has_gy || (ch_gate && sp_gate), op, ": grad_y needs ch_gate and sp_gate");
  TORCH_CHECK(!has_pool || (ch_gate && pooled && sp_argmax && sp_count), op,
              ": grad_pooled needs ch_gate, pooled, sp_argmax and sp_count");
  TORCH_CHECK(!has_max || (ch_max && ch_argmax && ch_count), op, ": grad_max needs ch_max, ch_argmax and ch_count");
  Tensor gy;
  if (has_gy) {
    TORCH_CHECK(grad_y->sizes() == x.sizes(), op, ": grad_y must have x's shape ", x.sizes(), ", got ",
                grad_y->sizes());
    TORCH_CHECK(grad_y->scalar_type() == x.scalar_type() && grad_y->device().is_cpu(), op,
                ": grad_y must be a CPU tensor of x's dtype");
    gy = grad_y->contiguous(d.format());
  }
  const XSized dx_out(x, d);
  const Tensor& dx = dx_out.work;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using IO = VecIO<scalar_t>;
    using acc = typename IO::acc;
    using fvec = typename IO::fvec;
    constexpr int64_t kN = IO::kN;
    const int64_t NC = d.N * d.C;
    // per-channel terms (NC + kN each): ch_gate, grad_avg / HW, channel-max hit, miss, max
    std::vector<acc> c_gate(NC + kN, 0), c_avg(NC + kN, 0), c_hit(NC + kN, 0), c_miss(NC + kN, 0),
        c_max(NC + kN, 0);
    if (ch_gate) c_gate = param_array<scalar_t>(*ch_gate, {d.N, d.C}, op, "ch_gate");
    if (has_avg) {
      c_avg = param_array<scalar_t>(*grad_avg, {d.N, d.C}, op, "grad_avg");
      for (const auto i : c10::irange(NC)) c_avg[i] = c_avg[i] / acc(d.HW);
    }
    Tensor ch_arg, ch_cnt;
    if (has_max) {
      const auto gm = param_array<scalar_t>(*grad_max, {d.N, d.C}, op, "grad_max");
      c_max = param_array<scalar_t>(*ch_max, {d.N, d.C}, op, "ch_max");
      ch_cnt = index_array(*ch_count, {d.N, d.C}, at::kInt, op, "ch_count");
      ch_arg = index_array(*ch_argmax, {d.N, d.C}, at::kLong, op, "ch_argmax");
      for (const auto i : c10::irange(NC))
        max_grad_weights(gm[i], ch_cnt.const_data_ptr<int32_t>()[i], split_ties, c_hit[i], c_miss[i]);
    }
    // per-position terms: sp_gate, and those of the spatial max pool
    std::vector<acc> p_gate(d.N * d.HW + kN, 0);
    if (sp_gate) p_gate = param_array<scalar_t>(*sp_gate, {d.N, H, W}, op, "sp_gate");
    SpatialPoolTerms<acc> pool_terms;
    std::vector<acc> p_amiss;
    Tensor sp_arg;
    if (has_pool) {  // grad_pooled, pooled and sp_count are checked here
      pool_terms = spatial_pool_terms<scalar_t>(*grad_pooled, *pooled, *sp_count, x, d, split_ties, op);
      sp_arg = index_array(*sp_argmax, {d.N, H, W}, at::kLong, op, "sp_argmax");
      p_amiss.resize(pool_terms.a.size());
      for (const auto i : c10::irange(p_amiss.size())) p_amiss[i] = pool_terms.a[i] + pool_terms.miss[i];
    }
    auto data_or_null = [](const std::vector<acc>& v) { return v.empty() ? nullptr : v.data(); };
    GradXTerms<acc> terms_set;
    terms_set.has_gy = has_gy;
    terms_set.has_pool = has_pool;
    terms_set.has_avg = has_avg;
    terms_set.has_max = has_max;
    terms_set.split_ties = split_ties;
    terms_set.c_gate = c_gate.data();
    terms_set.c_avg = c_avg.data();
    terms_set.c_hit = c_hit.data();
    terms_set.c_miss = c_miss.data();
    terms_set.c_max = c_max.data();
    terms_set.c_arg = has_max ? ch_arg.const_data_ptr<int64_t>() : nullptr;
    terms_set.c_cnt = has_max ? ch_cnt.const_data_ptr<int32_t>() : nullptr;
    terms_set.p_gate = p_gate.data();
    terms_set.p_a = data_or_null(pool_terms.a);
    terms_set.p_hit = data_or_null(pool_terms.hit);
    terms_set.p_miss = data_or_null(pool_terms.miss);
    terms_set.p_max = data_or_null(pool_terms.max);
    terms_set.p_amiss = data_or_null(p_amiss);
    terms_set.p_arg = has_pool ? sp_arg.const_data_ptr<int64_t>() : nullptr;
    terms_set.p_cnt = has_pool ? pool_terms.count.const_data_ptr<int32_t>() : nullptr;
    const scalar_t* x_p = d.t.const_data_ptr<scalar_t>();
    const scalar_t* gy_p = has_gy ? gy.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dx_p = dx.data_ptr<scalar_t>();
    // long lane tiles: each row is one long stream of x, grad_y and dx
    const Grid g(d.N, d.rows(), d.lanes(), kN, /*split_rows=*/true, 0, kMaxStreamTile);
    const int64_t numel = d.t.numel();
    for_each_task(g, [&](const Grid::Task& k) {
      if (d.channels_last) {
        grad_x_task<scalar_t, true>(terms_set, k, d.rows(), d.lanes(), x_p, gy_p, dx_p, numel);
      } else {
        grad_x_task<scalar_t, false>(terms_set, k, d.rows(), d.lanes(), x_p, gy_p, dx_p, numel);
      }
    });
  });
  return dx_out.finish();
}

// ---------------------------------------------------------------------------
// cbam_spatial_conv and its weight gradient: the spatial gate's k x k conv
// ---------------------------------------------------------------------------
// out[n, o, y, x] = sum over c, i, j of w[o, c, i, j] * x[n, c, y + i - pad_h, x + j - pad_w], zero outside
// x: F.conv2d(x, w, None, stride 1, padding). The CBAM map has 1 or 2 channels in and out, a few
// MFLOP; oneDNN spends more time setting such a conv up than computing it (0.2-0.6 ms per call at
// 8x2x56x56 on a 2-core AVX2 machine, against ~0.1 ms here). Accumulation in float (double for
// double); sums in a fixed order, so results do not depend on the thread count.

// x (N, C, H, W) in the accumulation dtype with pad_h rows and pad_w columns of zeros on each side;
// rows of `row_len` >= W + 2 * pad_w elements, zero past the padding, so that vector loads up to
// row_len never leave the row.
template <typename scalar_t>
std::vector<acc_type<scalar_t>> padded_planes(const Tensor& x, int64_t pad_h, int64_t pad_w, int64_t row_len) {
  const Tensor c = x.contiguous();
  const scalar_t* p = c.const_data_ptr<scalar_t>();
  const int64_t planes = x.size(0) * x.size(1), H = x.size(2), W = x.size(3), Hp = H + 2 * pad_h;
  std::vector<acc_type<scalar_t>> out(planes * Hp * row_len + Vectorized<acc_type<scalar_t>>::size(), 0);
  acc_type<scalar_t>* o = out.data();
  at::parallel_for(0, planes * H, row_grain(W), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* src = p + r * W;
      acc_type<scalar_t>* dst = o + ((r / H) * Hp + r % H + pad_h) * row_len + pad_w;
      for (const auto xx : c10::irange(W)) dst[xx] = static_cast<acc_type<scalar_t>>(src[xx]);
    }
  });
  return out;
}

void check_spatial_conv(const Tensor& x, int64_t channels, int64_t kh, int64_t kw, at::IntArrayRef padding,
                        const char* op) {
  check_x(x, op);
  TORCH_CHECK(x.size(1) == channels, op, ": x must have ", channels, " channels (the weight's), got shape ",
              x.sizes());
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
              ": padding must be two non-negative ints, got ", padding);
  TORCH_CHECK(x.size(2) + 2 * padding[0] >= kh && x.size(3) + 2 * padding[1] >= kw, op, ": a ", kh, "x", kw,
              " kernel does not fit x of shape ", x.sizes(), " padded by ", padding);
}

Tensor cbam_spatial_conv_cpu(const Tensor& x, const Tensor& weight, at::IntArrayRef padding) {
  constexpr const char* op = "cbam_spatial_conv";
  TORCH_CHECK(weight.dim() == 4 && weight.device().is_cpu() && weight.scalar_type() == x.scalar_type(), op,
              ": weight must be a 4-D (out, in, kh, kw) CPU tensor of x's dtype, got ", weight.scalar_type(), " ",
              weight.sizes());
  const int64_t O = weight.size(0), C = weight.size(1), kh = weight.size(2), kw = weight.size(3);
  check_spatial_conv(x, C, kh, kw, padding, op);
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t Ho = H + 2 * padding[0] - kh + 1, Wo = W + 2 * padding[1] - kw + 1;
  Tensor out = at::empty({N, O, Ho, Wo}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using IO = VecIO<scalar_t>;
    using acc = typename IO::acc;
    using fvec = typename IO::fvec;
    constexpr int64_t kN = IO::kN, kVecs = 4;  // output vectors per pass: independent FMA chains
    const int64_t Hp = H + 2 * padding[0], row_len = round_up(Wo, kN) + kw;
    const auto in = padded_planes<scalar_t>(x, padding[0], padding[1], row_len);
    const auto w = param_array<scalar_t>(weight, weight.sizes(), op, "weight");
    scalar_t* out_p = out.data_ptr<scalar_t>();
    at::parallel_for(0, N * O * Ho, row_grain(Wo * C * kh * kw), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / (O * Ho), o = (t / Ho) % O, y = t % Ho;
        scalar_t* out_row = out_p + t * Wo;
        for (int64_t x0 = 0; x0 < Wo; x0 += kN * kVecs) {
          const int64_t vecs = std::min(kVecs, ceil_div(Wo - x0, kN));
          fvec a[kVecs];
          conv_vectors<acc, kVecs>(in.data() + (n * C * Hp + y) * row_len + x0, Hp * row_len, row_len, C, kh, kw,
                                   w.data() + o * C * kh * kw, vecs, a);
          for (int64_t v = 0; v < vecs; ++v) IO::store(out_row + x0 + v * kN, a[v], std::min(kN, Wo - x0 - v * kN));
        }
      }
    });
  });
  return out;
}

// grad_w[o, c, i, j] = sum over n, y, x of grad_out[n, o, y, x] * x[n, c, y + i - pad_h, x + j - pad_w]:
// one task per (o, c, i), its kw sums as independent vector accumulators.
Tensor cbam_spatial_conv_weight_grad_cpu(const Tensor& grad_out, const Tensor& x, int64_t kh, int64_t kw,
                                         at::IntArrayRef padding) {
  constexpr const char* op = "cbam_spatial_conv_weight_grad";
  TORCH_CHECK(kh > 0 && kw > 0, op, ": kernel size must be positive, got ", kh, "x", kw);
  check_spatial_conv(x, x.size(1), kh, kw, padding, op);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = H + 2 * padding[0] - kh + 1, Wo = W + 2 * padding[1] - kw + 1;
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == N && grad_out.size(2) == Ho && grad_out.size(3) == Wo &&
                  grad_out.device().is_cpu() && grad_out.scalar_type() == x.scalar_type(),
              op, ": grad_out must be a CPU tensor of x's dtype and shape (", N, ", out, ", Ho, ", ", Wo, "), got ",
              grad_out.scalar_type(), " ", grad_out.sizes());
  const int64_t O = grad_out.size(1);
  Tensor grad_w = at::empty({O, C, kh, kw}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using IO = VecIO<scalar_t>;
    using acc = typename IO::acc;
    using fvec = typename IO::fvec;
    constexpr int64_t kN = IO::kN;
    const int64_t Hp = H + 2 * padding[0], g_len = round_up(Wo, kN), row_len = g_len + kw;
    const auto in = padded_planes<scalar_t>(x, padding[0], padding[1], row_len);
    const auto g = padded_planes<scalar_t>(grad_out, 0, 0, g_len);  // zeros past Wo
    scalar_t* gw = grad_w.data_ptr<scalar_t>();
    // the kw sums of task t; kKw > 0 makes the kernel width a constant (accumulators in registers)
    auto task = [&](int64_t t, auto kw_const) {
      constexpr int64_t kKw = decltype(kw_const)::value;
      const int64_t width = kKw > 0 ? kKw : kw;
      const int64_t o = t / (C * kh), c = (t / kh) % C, i = t % kh;
      fvec fixed[kKw > 0 ? kKw : 1];
      std::vector<fvec> any(kKw > 0 ? 0 : kw);
      fvec* a = kKw > 0 ? fixed : any.data();
      for (const auto j : c10::irange(width)) a[j] = fvec(acc(0));
      for (const auto n : c10::irange(N))
        for (const auto y : c10::irange(Ho)) {
          const acc* g_row = g.data() + ((n * O + o) * Ho + y) * g_len;
          const acc* in_row = in.data() + ((n * C + c) * Hp + y + i) * row_len;
          for (int64_t x0 = 0; x0 < g_len; x0 += kN) {
            const fvec gv = fvec::loadu(g_row + x0);
            for (const auto j : c10::irange(width)) a[j] = at::vec::fmadd(gv, fvec::loadu(in_row + x0 + j), a[j]);
          }
        }
      for (const auto j : c10::irange(width)) gw[t * kw + j] = static_cast<scalar_t>(hsum(a[j]));
    };
    at::parallel_for(0, O * C * kh, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        switch (kw) {
          case 7: task(t, std::integral_constant<int64_t, 7>{}); break;
          case 5: task(t, std::integral_constant<int64_t, 5>{}); break;
          case 3: task(t, std::integral_constant<int64_t, 3>{}); break;
          default: task(t, std::integral_constant<int64_t, 0>{});
        }
      }
    });
  });
  return grad_w;
}

}  // namespace
}  // namespace cpu
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("channel_pool", &fastattn::cpu::channel_pool_cpu);
  m.impl("cbam_spatial_conv", &fastattn::cpu::cbam_spatial_conv_cpu);
  m.impl("cbam_spatial_conv_weight_grad", &fastattn::cpu::cbam_spatial_conv_weight_grad_cpu);
  m.impl("gated_spatial_pool", &fastattn::cpu::gated_spatial_pool_cpu);
  m.impl("cbam_apply", &fastattn::cpu::cbam_apply_cpu);
  m.impl("cbam_forward_eval", &fastattn::cpu::cbam_forward_eval_cpu);
  m.impl("cbam_apply_backward", &fastattn::cpu::cbam_apply_backward_cpu);
  m.impl("gated_spatial_pool_backward_gate", &fastattn::cpu::gated_spatial_pool_backward_gate_cpu);
  m.impl("cbam_grad_x", &fastattn::cpu::cbam_grad_x_cpu);
}
