// The max-pool reductions of the CPU CBAM kernels: sum, max, first argmax and tie count of a
// contiguous row (reduce_contiguous), and per lane along the rows of a block (reduce_rows), with
// the AVX-512 variants of the latter.
#pragma once

#include <c10/util/irange.h>

#include "avx512.h"
#include "cbam_tiling.h"
#include "vec_io.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace fastattn {
namespace cpu {

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
  const int64_t piece = scan_piece();
  for (int64_t base = 0; base < len; base += piece) {
    const int64_t stop = std::min(len, base + piece);
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
  static constexpr int64_t kPad = kLaneTileCapacity + Vectorized<acc>::size();
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


}  // namespace cpu
}  // namespace fastattn
