// CPU kernels of spatial attention (DESIGN.md "Spatial attention"; contract:
// fastattn.reference.ref_spatial_attention_forward).
//
// Forward: flash-style. Each task owns (n, head, query block), streams the key
// blocks and keeps an online softmax (running max and sum), so the Lq x Lk
// matrix never exists; it saves the natural log-sum-exp for the backward.
// Backward: recomputes the probabilities from lse (after delta_i = rowsum(dO * O));
// a task owns a range of key blocks of one (n, head), accumulates dk and dv for
// them and its own partial dq; the few partials per (n, head) are summed in a
// fixed order (no atomics, deterministic).
//
// Tiles are row-major with unit inner stride, the layout the tile GEMM wants.
// The rows a task owns are packed per task into per-thread buffers; the
// streamed operands are packed once per call into block panels (channel-major
// d x block or position-major block x d, see plan_panels), so NCHW, channel-last
// and any other strides are read without a user-visible copy. Tile GEMMs go to
// ATen's cpublas::brgemm (oneDNN / MKL kernels) for float and to a plain loop
// for double (gradcheck only).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include "avx512.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastattn {
namespace {

using at::vec::Vectorized;

// ---------------------------------------------------------------------------
// Tile GEMM: C[m x n] (+)= A[m x k] * B[k x n]; row-major, unit inner strides.
// ---------------------------------------------------------------------------
template <typename acc_t>
void plain_gemm(int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
                acc_t* c, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    acc_t* c_row = c + i * ldc;
    if (!accumulate) std::fill(c_row, c_row + n, acc_t(0));
    for (int64_t p = 0; p < k; ++p) {
      const acc_t a_ip = a[i * lda + p];
      const acc_t* b_row = b + p * ldb;
      for (int64_t j = 0; j < n; ++j) c_row[j] += a_ip * b_row[j];
    }
  }
}

void tile_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
               int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.f);
    return;
  }
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
#else
  plain_gemm(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
#endif
}

void tile_gemm(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb,
               double* c, int64_t ldc, bool accumulate) {
  plain_gemm(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

// ---------------------------------------------------------------------------
// Row kernels of the softmax and its gradient (vectorised along the row).
// ---------------------------------------------------------------------------
template <typename acc_t>
inline acc_t nan_max(acc_t a, acc_t b) {  // NaN-propagating, like the reference's amax
  return (std::isnan(a) || a >= b) ? a : b;
}

// at::vec's fast exp maps NaN to a finite value; keep NaN so it propagates.
inline Vectorized<float> exp_keep_nan(const Vectorized<float>& x) {
  return Vectorized<float>::blendv(x.exp_u20(), x, x.isnan());
}
inline Vectorized<double> exp_keep_nan(const Vectorized<double>& x) { return x.exp(); }

// The exp-heavy row kernels are the whole non-GEMM cost of the softmax: their
// float versions run 16 wide where ATen runs AVX-512 (avx512.h).
#ifdef FASTATTN_AVX512
// at::vec's exp_u20, 16 wide. min/max return their second operand on NaN, so NaN stays NaN.
FASTATTN_TARGET_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.7228394f), _mm512_max_ps(_mm512_set1_ps(-104.f), x));
  const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504f), _mm512_set1_ps(0.5f)),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693147181f), x);
  __m512 poly = _mm512_fmadd_ps(r, _mm512_set1_ps(0.00828929059f), _mm512_set1_ps(0.0418978221f));
  poly = _mm512_fmadd_ps(r, poly, _mm512_set1_ps(0.166676521f));
  poly = _mm512_fmadd_ps(r, poly, _mm512_set1_ps(0.499991506f));
  poly = _mm512_fmadd_ps(r, poly, _mm512_set1_ps(0.999999701f));
  poly = _mm512_fmadd_ps(r, poly, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(poly, fx);  // poly * 2^fx, 0 below the smallest denormal
}

template <bool kWithMax>
FASTATTN_TARGET_AVX512 float exp_shifted_sum16(const float* scores, float* probs, int64_t n, float shift,
                                               float* row_max_out) {
  const __m512 shift_v = _mm512_set1_ps(shift);
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
  __m512 max0 = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), max1 = max0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 s0 = _mm512_loadu_ps(scores + j), s1 = _mm512_loadu_ps(scores + j + 16);
    if constexpr (kWithMax) {
      max0 = _mm512_max_ps(max0, s0);
      max1 = _mm512_max_ps(max1, s1);
    }
    const __m512 e0 = exp16(_mm512_sub_ps(s0, shift_v)), e1 = exp16(_mm512_sub_ps(s1, shift_v));
    _mm512_storeu_ps(probs + j, e0);
    _mm512_storeu_ps(probs + j + 16, e1);
    sum0 = _mm512_add_ps(sum0, e0);
    sum1 = _mm512_add_ps(sum1, e1);
  }
  for (; j < n; j += 16) {
    const __mmask16 mask = tail_mask16(n - j);
    const __m512 s0 = _mm512_maskz_loadu_ps(mask, scores + j);
    if constexpr (kWithMax) max0 = _mm512_mask_max_ps(max0, mask, max0, s0);
    const __m512 e0 = exp16(_mm512_sub_ps(s0, shift_v));
    _mm512_mask_storeu_ps(probs + j, mask, e0);
    sum0 = _mm512_mask_add_ps(sum0, mask, sum0, e0);
  }
  if constexpr (kWithMax) *row_max_out = _mm512_reduce_max_ps(_mm512_max_ps(max0, max1));
  return _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
}

template <bool kPerColumn>
FASTATTN_TARGET_AVX512 void softmax_backward_row16(float* scores, float* dprobs, int64_t n, const float* lse,
                                                   const float* delta) {
  const __m512 lse_row = _mm512_set1_ps(lse[0]), delta_row = _mm512_set1_ps(delta[0]);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = tail_mask16(n - j);
    const __m512 lse_v = kPerColumn ? _mm512_maskz_loadu_ps(mask, lse + j) : lse_row;
    const __m512 delta_v = kPerColumn ? _mm512_maskz_loadu_ps(mask, delta + j) : delta_row;
    const __m512 p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + j), lse_v));
    _mm512_mask_storeu_ps(scores + j, mask, p);
    const __m512 ds = _mm512_mul_ps(p, _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, dprobs + j), delta_v));
    _mm512_mask_storeu_ps(dprobs + j, mask, ds);
  }
}
#endif

template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  acc_t result = -std::numeric_limits<acc_t>::infinity();
  int64_t j = 0;
  if (n >= 4 * V) {
    Vec m0 = Vec::loadu(x), m1 = Vec::loadu(x + V), m2 = Vec::loadu(x + 2 * V), m3 = Vec::loadu(x + 3 * V);
    for (j = 4 * V; j + 4 * V <= n; j += 4 * V) {
      m0 = at::vec::maximum(m0, Vec::loadu(x + j));
      m1 = at::vec::maximum(m1, Vec::loadu(x + j + V));
      m2 = at::vec::maximum(m2, Vec::loadu(x + j + 2 * V));
      m3 = at::vec::maximum(m3, Vec::loadu(x + j + 3 * V));
    }
    for (; j + V <= n; j += V) m0 = at::vec::maximum(m0, Vec::loadu(x + j));
    Vec m = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
    result = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m);
  }
  for (; j < n; ++j) result = nan_max(result, x[j]);
  return result;
}

// probs = exp(scores - shift) (probs may alias scores); returns their sum (NaN
// when a score is NaN) and, with kWithMax, stores the max of scores in *row_max_out.
template <bool kWithMax = false, typename acc_t>
acc_t exp_shifted_sum(const acc_t* scores, acc_t* probs, int64_t n, acc_t shift, acc_t* row_max_out = nullptr) {
#ifdef FASTATTN_AVX512
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx512()) return exp_shifted_sum16<kWithMax>(scores, probs, n, shift, row_max_out);
  }
#endif
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec shift_v(shift);
  Vec sum0(acc_t(0)), sum1(acc_t(0));
  Vec max0(-std::numeric_limits<acc_t>::infinity()), max1 = max0;
  int64_t j = 0;
  for (; j + 2 * V <= n; j += 2 * V) {
    const Vec s0 = Vec::loadu(scores + j), s1 = Vec::loadu(scores + j + V);
    if constexpr (kWithMax) {
      max0 = at::vec::maximum(max0, s0);
      max1 = at::vec::maximum(max1, s1);
    }
    const Vec e0 = exp_keep_nan(s0 - shift_v), e1 = exp_keep_nan(s1 - shift_v);
    e0.store(probs + j);
    e1.store(probs + j + V);
    sum0 = sum0 + e0;
    sum1 = sum1 + e1;
  }
  acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, sum0 + sum1);
  acc_t max = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); },
                                             at::vec::maximum(max0, max1));
  for (; j < n; ++j) {
    max = nan_max(max, scores[j]);
    probs[j] = std::exp(scores[j] - shift);
    sum += probs[j];
  }
  if constexpr (kWithMax) *row_max_out = max;
  return sum;
}

// Online softmax, one query row of one key block: probs = exp(scores - shift)
// and sum += their sum. The shift (running max) is kept while the block's max
// stays within kLazyRescaleMargin above it, which needs one pass and no
// rescaling of the accumulated output; otherwise it moves to the new max.
// Returns the factor by which the row's accumulated output must be rescaled.
constexpr double kLazyRescaleMargin = 8.0;  // probabilities up to e^8 before normalisation: far from overflow

template <typename acc_t>
acc_t online_softmax_row(const acc_t* scores, acc_t* probs, int64_t n, acc_t& shift, acc_t& sum) {
  if (std::isfinite(shift)) {
    acc_t block_max;
    const acc_t block_sum = exp_shifted_sum</*kWithMax=*/true>(scores, probs, n, shift, &block_max);
    if (block_max <= shift + static_cast<acc_t>(kLazyRescaleMargin)) {  // false for NaN
      sum += block_sum;
      return acc_t(1);
    }
  }
  const acc_t new_shift = nan_max(shift, row_max(scores, n));
  if (new_shift == -std::numeric_limits<acc_t>::infinity()) {  // every logit so far is -inf: nothing to add
    std::fill(probs, probs + n, acc_t(0));
    return acc_t(1);
  }
  const acc_t block_sum = exp_shifted_sum(scores, probs, n, new_shift);
  const acc_t rescale = std::exp(shift - new_shift);  // 0 on the first block, NaN once a NaN was seen
  sum = sum * rescale + block_sum;
  shift = new_shift;
  return rescale;
}

// Softmax backward on one row of a tile, in place: scores <- p = exp(scores - lse),
// dprobs <- ds = p * (dprobs - delta). lse and delta are one value for the whole
// row (kPerColumn = false, a query row) or one per column (a key row of the
// transposed tile).
template <bool kPerColumn, typename acc_t>
void softmax_backward_row(acc_t* scores, acc_t* dprobs, int64_t n, const acc_t* lse, const acc_t* delta) {
#ifdef FASTATTN_AVX512
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx512()) return softmax_backward_row16<kPerColumn>(scores, dprobs, n, lse, delta);
  }
#endif
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    const Vec lse_v = kPerColumn ? Vec::loadu(lse + j) : Vec(lse[0]);
    const Vec delta_v = kPerColumn ? Vec::loadu(delta + j) : Vec(delta[0]);
    const Vec p = exp_keep_nan(Vec::loadu(scores + j) - lse_v);
    p.store(scores + j);
    (p * (Vec::loadu(dprobs + j) - delta_v)).store(dprobs + j);
  }
  for (; j < n; ++j) {
    const acc_t p = std::exp(scores[j] - lse[kPerColumn ? j : 0]);
    scores[j] = p;
    dprobs[j] = p * (dprobs[j] - delta[kPerColumn ? j : 0]);
  }
}

// ---------------------------------------------------------------------------
// Packing between strided tensors and row-major tiles of the accumulation dtype.
// ---------------------------------------------------------------------------
constexpr int64_t kTransposeBlock = 16;

// dst[r, c] = factor * src[r * row_stride + c * col_stride], dst row-major with leading dim ld.
template <typename scalar_t, typename acc_t>
void pack_matrix(const scalar_t* src, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                 acc_t factor, acc_t* dst, int64_t ld) {
  if (col_stride == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* s = src + r * row_stride;
      acc_t* d = dst + r * ld;
      for (int64_t c = 0; c < cols; ++c) d[c] = factor * static_cast<acc_t>(s[c]);
    }
    return;
  }
  int64_t rows_done = 0, cols_done = 0;
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (row_stride == 1) {  // a plain transpose (NCHW <-> channel-last): 8 x 8 register blocks
      rows_done = rows / 8 * 8;
      cols_done = cols / 8 * 8;
      for (int64_t r0 = 0; r0 < rows_done; r0 += 8)
        for (int64_t c0 = 0; c0 < cols_done; c0 += 8)
          at::vec::transpose_mxn<float, 8, 8>(src + r0 + c0 * col_stride, col_stride, dst + r0 * ld + c0, ld);
      if (factor != 1.f)
        for (int64_t r = 0; r < rows_done; ++r)
          for (int64_t c = 0; c < cols_done; ++c) dst[r * ld + c] *= factor;
    }
  }
  // transposing gather of the rest, blocked so that reads and writes both stay in cache
  auto gather = [&](int64_t r_begin, int64_t r_end, int64_t c_begin, int64_t c_end) {
    for (int64_t r0 = r_begin; r0 < r_end; r0 += kTransposeBlock) {
      const int64_t r1 = std::min(r_end, r0 + kTransposeBlock);
      for (int64_t c0 = c_begin; c0 < c_end; c0 += kTransposeBlock) {
        const int64_t c1 = std::min(c_end, c0 + kTransposeBlock);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = r0; r < r1; ++r)
            dst[r * ld + c] = factor * static_cast<acc_t>(src[r * row_stride + c * col_stride]);
      }
    }
  };
  gather(0, rows_done, cols_done, cols);
  gather(rows_done, rows, 0, cols);
}

// dst[r * row_stride + c * col_stride] = src[r, c] * row_factor[r], rounded to scalar_t.
template <typename acc_t, typename scalar_t>
void store_matrix(const acc_t* src, int64_t ld, int64_t rows, int64_t cols, const acc_t* row_factor,
                  scalar_t* dst, int64_t row_stride, int64_t col_stride) {
  if (col_stride == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t* s = src + r * ld;
      scalar_t* d = dst + r * row_stride;
      const acc_t f = row_factor[r];
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<scalar_t>(s[c] * f);
    }
    return;
  }
  int64_t rows_done = 0, cols_done = 0;
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (row_stride == 1) {  // a plain transpose: 8 x 8 register blocks, then the row factors along dst's rows
      rows_done = rows / 8 * 8;
      cols_done = cols / 8 * 8;
      for (int64_t r0 = 0; r0 < rows_done; r0 += 8)
        for (int64_t c0 = 0; c0 < cols_done; c0 += 8) {
          float* out = dst + r0 + c0 * col_stride;
          at::vec::transpose_mxn<float, 8, 8>(src + r0 * ld + c0, ld, out, col_stride);
          float factors[8];  // a local copy: the compiler may then vectorise the loop below
          std::copy(row_factor + r0, row_factor + r0 + 8, factors);
          for (int64_t c = 0; c < 8; ++c)
            for (int64_t r = 0; r < 8; ++r) out[c * col_stride + r] *= factors[r];
        }
    }
  }
  auto scatter = [&](int64_t r_begin, int64_t r_end, int64_t c_begin, int64_t c_end) {
    for (int64_t c0 = c_begin; c0 < c_end; c0 += kTransposeBlock) {
      const int64_t c1 = std::min(c_end, c0 + kTransposeBlock);
      for (int64_t r0 = r_begin; r0 < r_end; r0 += kTransposeBlock) {
        const int64_t r1 = std::min(r_end, r0 + kTransposeBlock);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = r0; r < r1; ++r)
            dst[r * row_stride + c * col_stride] = static_cast<scalar_t>(src[r * ld + c] * row_factor[r]);
      }
    }
  };
  scatter(0, rows_done, cols_done, cols);
  scatter(rows_done, rows, 0, cols);
}

// Positions per streamed panel, so that a d x block operand tile stays within
// ~256 KiB (measured: brgemm drops to a third of its speed on larger B tiles).
constexpr int64_t kPanelFloats = 64 * 1024;

int64_t stream_block(int64_t d_max, int64_t length) {
  const int64_t block = std::clamp<int64_t>(kPanelFloats / std::max<int64_t>(d_max, 1), 16, 512) / 16 * 16;
  return std::max<int64_t>(std::min(block, length), 1);
}

// Rows a task owns and positions it streams per step. More rows per task means
// fewer passes over the streamed panels, which pays when d is large (each panel
// is big) as long as the rows x stream score tile stays ~128 KiB; rows shrink
// again when there would be too few tasks for the threads.
constexpr int64_t kScoreTileFloats = 32 * 1024;

struct Tiling {
  int64_t rows, stream;
};

Tiling choose_tiling(int64_t d_max, int64_t row_len, int64_t stream_len, int64_t batch_heads) {
  const int64_t stream = stream_block(d_max, stream_len);
  int64_t rows = std::clamp<int64_t>(kScoreTileFloats / stream, 64, 256);
  const int64_t min_tasks = 4 * at::get_num_threads();
  const int64_t rows_for_tasks = (batch_heads * row_len + min_tasks - 1) / min_tasks;
  rows = std::min(rows, std::max<int64_t>((rows_for_tasks + 15) / 16 * 16, 16));
  return {std::max<int64_t>(std::min(rows, row_len), 1), stream};
}

// A tensor (N, C, L) repacked, per (n, head) and per block of `block` positions,
// as the B operand of a tile GEMM in the accumulation dtype: channel-major tiles
// (d x block, rows are the head's channels) or position-major tiles (block x d).
// Packing once per call (O(L * d) memory) reads NCHW, channel-last or any other
// strides, converts reduced dtypes once, and gives tiles a small leading
// dimension (a leading dimension of L = 4096 floats thrashes the cache sets).
enum class Major { Channel, Position };

template <typename acc_t>
at::TensorOptions acc_options(const at::Tensor& like) {
  return like.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
}

template <typename acc_t>
struct Panels {
  at::Tensor storage;  // (N * heads, blocks, block * d)
  const acc_t* base = nullptr;
  int64_t block = 1, ld = 1, block_stride = 0, head_stride = 0;
  // Tile of positions [p0, p0 + block) of head-row nh = n * heads + h; p0 is a multiple of block.
  const acc_t* tile(int64_t nh, int64_t p0) const { return base + nh * head_stride + (p0 / block) * block_stride; }
};

// Independent pieces of work (items of several jobs) run in one parallel region:
// each region ends in a barrier, which costs a scheduler time slice whenever
// the cores are shared with other processes.
class WorkList {
 public:
  void add(int64_t items, std::function<void(int64_t)> run) {
    if (items <= 0) return;
    ends_.push_back(total() + items);
    runs_.push_back(std::move(run));
  }
  void run_parallel() const {
    at::parallel_for(0, total(), 1, [&](int64_t begin, int64_t end) {
      size_t job = 0;
      for (int64_t item = begin; item < end; ++item) {
        while (item >= ends_[job]) ++job;
        runs_[job](item - (job == 0 ? 0 : ends_[job - 1]));
      }
    });
  }

 private:
  int64_t total() const { return ends_.empty() ? 0 : ends_.back(); }
  std::vector<int64_t> ends_;
  std::vector<std::function<void(int64_t)>> runs_;
};

// Allocates the panels of x and adds the job that fills them to `work`.
template <typename scalar_t, typename acc_t>
Panels<acc_t> plan_panels(const at::Tensor& x, int64_t heads, Major major, int64_t block, WorkList& work) {
  const int64_t batch = x.size(0), length = x.size(2), d = x.size(1) / heads;
  const int64_t blocks = (length + block - 1) / block;
  Panels<acc_t> panels;
  panels.storage = at::empty({batch * heads, blocks, block * d}, acc_options<acc_t>(x));
  acc_t* dst = panels.storage.template data_ptr<acc_t>();
  panels.base = dst;
  panels.block = block;
  panels.ld = std::max<int64_t>(major == Major::Channel ? block : d, 1);
  panels.block_stride = block * d;
  panels.head_stride = blocks * block * d;
  const scalar_t* src = x.const_data_ptr<scalar_t>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), ld = panels.ld;
  work.add(batch * heads * blocks, [=](int64_t t) {
    const int64_t nh = t / blocks, p0 = (t % blocks) * block, np = std::min(block, length - p0);
    const scalar_t* head_src = src + (nh / heads) * s0 + (nh % heads) * d * s1 + p0 * s2;
    acc_t* tile = dst + t * block * d;
    if (major == Major::Channel)
      pack_matrix(head_src, d, np, s1, s2, acc_t(1), tile, ld);
    else
      pack_matrix(head_src, np, d, s2, s1, acc_t(1), tile, ld);
  });
  return panels;
}

// ---------------------------------------------------------------------------
// Shapes, checks and outputs
// ---------------------------------------------------------------------------
struct AttentionShape {
  int64_t batch, heads, q_len, k_len, d_qk, d_v;
};

AttentionShape check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            int64_t heads) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": expected CPU tensors, got ", t->device());
    TORCH_CHECK(t->dim() == 3, op, ": q, k, v must be (N, C, L), got a ", t->dim(), "-d tensor");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": q, k, v must share a dtype, got ", q.scalar_type(),
                " and ", t->scalar_type());
  }
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": expected a floating dtype, got ", q.scalar_type());
  TORCH_CHECK(heads > 0 && q.size(1) % heads == 0 && v.size(1) % heads == 0, op, ": heads=", heads,
              " must divide the channels of q (", q.size(1), ") and v (", v.size(1), ")");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) && v.size(2) == k.size(2),
              op, ": inconsistent shapes q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  return {q.size(0), heads, q.size(2), k.size(2), q.size(1) / heads, v.size(1) / heads};
}

// (N, C, L) with like's channel-last-ness: (N, L, C) memory when like.stride(1) == 1 and C > 1.
at::Tensor empty_nchw_like(const at::Tensor& like, int64_t channels, int64_t length) {
  const int64_t batch = like.size(0);
  if (like.stride(1) == 1 && like.size(1) > 1)
    return at::empty({batch, length, channels}, like.options()).transpose(1, 2);
  return at::empty({batch, channels, length}, like.options());
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------
template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                    const at::Tensor& lse, const AttentionShape& s, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tiling tiling = choose_tiling(std::max(s.d_qk, s.d_v), s.q_len, s.k_len, s.batch * s.heads);
  const int64_t q_block = tiling.rows, k_block = tiling.stream;
  WorkList packing;
  const auto keys = plan_panels<scalar_t, acc_t>(k, s.heads, Major::Channel, k_block, packing);     // d_qk x keys
  const auto values = plan_panels<scalar_t, acc_t>(v, s.heads, Major::Position, k_block, packing);  // keys x d_v
  packing.run_parallel();
  const int64_t q_blocks = (s.q_len + q_block - 1) / q_block;
  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  float* lse_data = lse.data_ptr<float>();

  at::parallel_for(0, s.batch * s.heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_tile(q_block * s.d_qk), scores(q_block * k_block), probs(q_block * k_block);
    std::vector<acc_t> acc(q_block * s.d_v), row_shift(q_block), row_sum(q_block), inv_sum(q_block);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nh = t / q_blocks, n = nh / s.heads, h = nh % s.heads;
      const int64_t i0 = (t % q_blocks) * q_block, mq = std::min(q_block, s.q_len - i0);
      // scale folded into q: scores are scale * q.k directly
      pack_matrix(q_data + n * q.stride(0) + h * s.d_qk * q.stride(1) + i0 * q.stride(2), mq, s.d_qk, q.stride(2),
                  q.stride(1), static_cast<acc_t>(scale), q_tile.data(), s.d_qk);
      std::fill(row_shift.begin(), row_shift.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
      for (int64_t j0 = 0; j0 < s.k_len; j0 += k_block) {
        const int64_t nk = std::min(k_block, s.k_len - j0);
        tile_gemm(mq, nk, s.d_qk, q_tile.data(), s.d_qk, keys.tile(nh, j0), keys.ld, scores.data(), k_block, false);
        for (int64_t i = 0; i < mq; ++i) {
          const acc_t rescale = online_softmax_row(scores.data() + i * k_block, probs.data() + i * k_block, nk,
                                                   row_shift[i], row_sum[i]);
          if (j0 > 0 && rescale != acc_t(1)) {
            acc_t* acc_row = acc.data() + i * s.d_v;
            for (int64_t c = 0; c < s.d_v; ++c) acc_row[c] *= rescale;
          }
        }
        tile_gemm(mq, s.d_v, nk, probs.data(), k_block, values.tile(nh, j0), values.ld, acc.data(), s.d_v, j0 > 0);
      }
      float* lse_row = lse_data + nh * s.q_len + i0;
      for (int64_t i = 0; i < mq; ++i) {
        inv_sum[i] = acc_t(1) / row_sum[i];
        lse_row[i] = static_cast<float>(row_shift[i] + std::log(row_sum[i]));
      }
      store_matrix(acc.data(), s.d_v, mq, s.d_v, inv_sum.data(),
                   out_data + n * out.stride(0) + h * s.d_v * out.stride(1) + i0 * out.stride(2), out.stride(2),
                   out.stride(1));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> spatial_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, int64_t heads, double scale) {
  const AttentionShape s = check_inputs("spatial_attention_forward", q, k, v, heads);
  at::Tensor out = empty_nchw_like(q, v.size(1), s.q_len);
  at::Tensor lse = at::empty({s.batch, heads, s.q_len}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (s.k_len == 0) {  // softmax over nothing: logsumexp -inf, weighted sum of no values 0
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "spatial_attention_forward_cpu",
                                  [&] { forward_kernel<scalar_t>(q, k, v, out, lse, s, scale); });
  return {out, lse};
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------
// Log-sum-exp in the accumulation dtype. float32 lse is used as saved; for
// float64 one more pass over the keys restores full precision (lse was saved in
// float32 by contract), which gradcheck needs.
template <typename scalar_t, typename acc_t>
at::Tensor lse_in_acc_dtype(const at::Tensor& lse, const at::Tensor& q, const at::Tensor& k, const AttentionShape& s,
                            double scale) {
  at::Tensor lse_acc = lse.to(acc_options<acc_t>(lse)).contiguous();
  if constexpr (std::is_same_v<acc_t, float>) {
    return lse_acc;
  } else {
    const Tiling tiling = choose_tiling(s.d_qk, s.q_len, s.k_len, s.batch * s.heads);
    const int64_t q_block = tiling.rows, k_block = tiling.stream;
    WorkList packing;
    const auto keys = plan_panels<scalar_t, acc_t>(k, s.heads, Major::Channel, k_block, packing);  // d_qk x keys
    packing.run_parallel();
    const int64_t q_blocks = (s.q_len + q_block - 1) / q_block;
    const scalar_t* q_data = q.const_data_ptr<scalar_t>();
    acc_t* lse_data = lse_acc.data_ptr<acc_t>();
    at::parallel_for(0, s.batch * s.heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> q_tile(q_block * s.d_qk), scores(q_block * k_block), sums(q_block);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t nh = t / q_blocks, n = nh / s.heads, h = nh % s.heads;
        const int64_t i0 = (t % q_blocks) * q_block, mq = std::min(q_block, s.q_len - i0);
        pack_matrix(q_data + n * q.stride(0) + h * s.d_qk * q.stride(1) + i0 * q.stride(2), mq, s.d_qk,
                    q.stride(2), q.stride(1), static_cast<acc_t>(scale), q_tile.data(), s.d_qk);
        acc_t* lse_row = lse_data + nh * s.q_len + i0;
        std::fill(sums.begin(), sums.end(), acc_t(0));
        for (int64_t j0 = 0; j0 < s.k_len; j0 += k_block) {
          const int64_t nk = std::min(k_block, s.k_len - j0);
          tile_gemm(mq, nk, s.d_qk, q_tile.data(), s.d_qk, keys.tile(nh, j0), keys.ld, scores.data(), k_block, false);
          for (int64_t i = 0; i < mq; ++i) {
            acc_t* row = scores.data() + i * k_block;
            sums[i] += exp_shifted_sum(row, row, nk, lse_row[i]);
          }
        }
        for (int64_t i = 0; i < mq; ++i) {
          if (std::isfinite(lse_row[i])) lse_row[i] += std::log(sums[i]);
        }
      }
    });
    return lse_acc;
  }
}

// Allocates delta_i = rowsum(dO * O), one per (n, head, query), the softmax-
// gradient correction, and adds the job that computes it to `work`.
template <typename scalar_t, typename acc_t>
at::Tensor plan_softmax_grad_delta(const at::Tensor& grad_out, const at::Tensor& out, const AttentionShape& s,
                                   WorkList& work) {
  at::Tensor delta = at::empty({s.batch * s.heads, s.q_len}, acc_options<acc_t>(out));
  acc_t* delta_data = delta.data_ptr<acc_t>();
  const scalar_t* go_data = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* out_data = out.const_data_ptr<scalar_t>();
  const int64_t go_s0 = grad_out.stride(0), go_s1 = grad_out.stride(1), go_s2 = grad_out.stride(2);
  const int64_t o_s0 = out.stride(0), o_s1 = out.stride(1), o_s2 = out.stride(2);
  const int64_t heads = s.heads, q_len = s.q_len, d_v = s.d_v;
  constexpr int64_t q_block = 64;
  const int64_t q_blocks = (q_len + q_block - 1) / q_block;
  work.add(s.batch * heads * q_blocks, [=](int64_t t) {
    std::vector<acc_t> go_tile(q_block * d_v), o_tile(q_block * d_v);
    const int64_t nh = t / q_blocks, n = nh / heads, h = nh % heads;
    const int64_t i0 = (t % q_blocks) * q_block, mq = std::min(q_block, q_len - i0);
    pack_matrix(go_data + n * go_s0 + h * d_v * go_s1 + i0 * go_s2, mq, d_v, go_s2, go_s1, acc_t(1), go_tile.data(),
                d_v);
    pack_matrix(out_data + n * o_s0 + h * d_v * o_s1 + i0 * o_s2, mq, d_v, o_s2, o_s1, acc_t(1), o_tile.data(), d_v);
    for (int64_t i = 0; i < mq; ++i) {
      acc_t dot = 0;
      for (int64_t c = 0; c < d_v; ++c) dot += go_tile[i * d_v + c] * o_tile[i * d_v + c];
      delta_data[nh * q_len + i0 + i] = dot;
    }
  });
  return delta;
}

// One pass over (n, head, range of key blocks). A task owns its key blocks,
// streams every query block and accumulates, on tiles transposed to keys x
// queries: dv += P^T dO, dk += dS^T Q, and its own partial dq^T += K^T dS^T.
// The partials of the key ranges of one (n, head) are summed in a fixed order
// at the end, so there are no atomics and results are deterministic.
template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                     const at::Tensor& dv, const AttentionShape& s, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale_acc = static_cast<acc_t>(scale);
  const int64_t batch_heads = s.batch * s.heads;
  const at::Tensor lse_acc = lse_in_acc_dtype<scalar_t, acc_t>(lse, q, k, s, scale);

  const Tiling tiling = choose_tiling(std::max(s.d_qk, s.d_v), s.k_len, s.q_len, batch_heads);
  const int64_t k_block = tiling.rows, q_block = tiling.stream;
  const int64_t k_blocks = (s.k_len + k_block - 1) / k_block, q_blocks = (s.q_len + q_block - 1) / q_block;
  // key ranges per (n, head): a task for every thread, each range adding one dq-sized partial
  const int64_t splits = std::clamp<int64_t>((at::get_num_threads() + batch_heads - 1) / batch_heads, 1, k_blocks);
  WorkList preparation;
  const at::Tensor delta = plan_softmax_grad_delta<scalar_t, acc_t>(grad_out, out, s, preparation);
  auto plan = [&](const at::Tensor& x, Major major) {
    return plan_panels<scalar_t, acc_t>(x, s.heads, major, q_block, preparation);
  };
  const Panels<acc_t> queries_t = plan(q, Major::Channel);       // d_qk x queries
  const Panels<acc_t> queries = plan(q, Major::Position);        // queries x d_qk
  const Panels<acc_t> grads_t = plan(grad_out, Major::Channel);  // d_v x queries
  const Panels<acc_t> grads = plan(grad_out, Major::Position);   // queries x d_v
  preparation.run_parallel();
  // dq^T partials: (split, n * heads, query block, d_qk x q_block)
  at::Tensor dq_partial = at::empty({splits, batch_heads, q_blocks, s.d_qk * q_block}, lse_acc.options());
  acc_t* partial_data = dq_partial.data_ptr<acc_t>();
  const acc_t* lse_data = lse_acc.const_data_ptr<acc_t>();
  const acc_t* delta_data = delta.const_data_ptr<acc_t>();
  const scalar_t* k_data = k.const_data_ptr<scalar_t>();
  const scalar_t* v_data = v.const_data_ptr<scalar_t>();
  const std::vector<acc_t> scale_channels(s.d_qk, scale_acc);
  // dq = scale * dq^T tile (d_qk x q_block) of query block qb, written in dq's layout
  auto store_dq = [&](int64_t nh, int64_t qb, const acc_t* tile) {
    const int64_t n = nh / s.heads, h = nh % s.heads, i0 = qb * q_block;
    store_matrix(tile, q_block, s.d_qk, std::min(q_block, s.q_len - i0), scale_channels.data(),
                 dq.data_ptr<scalar_t>() + n * dq.stride(0) + h * s.d_qk * dq.stride(1) + i0 * dq.stride(2),
                 dq.stride(1), dq.stride(2));
  };

  at::parallel_for(0, batch_heads * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> k_tile(k_block * s.d_qk), k_tile_t(s.d_qk * k_block), v_tile(k_block * s.d_v);
    std::vector<acc_t> scores(k_block * q_block), dprobs(k_block * q_block);
    std::vector<acc_t> dk_acc(k_block * s.d_qk), dv_acc(k_block * s.d_v);
    const std::vector<acc_t> scale_rows(k_block, scale_acc), unit_rows(k_block, acc_t(1));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nh = t / splits, split = t % splits, n = nh / s.heads, h = nh % s.heads;
      const int64_t first_block = split * k_blocks / splits, last_block = (split + 1) * k_blocks / splits;
      acc_t* partial = partial_data + (split * batch_heads + nh) * q_blocks * s.d_qk * q_block;
      const acc_t* lse_head = lse_data + nh * s.q_len;
      const acc_t* delta_head = delta_data + nh * s.q_len;
      for (int64_t kb = first_block; kb < last_block; ++kb) {
        const int64_t j0 = kb * k_block, nk = std::min(k_block, s.k_len - j0);
        const scalar_t* k_src = k_data + n * k.stride(0) + h * s.d_qk * k.stride(1) + j0 * k.stride(2);
        pack_matrix(k_src, nk, s.d_qk, k.stride(2), k.stride(1), scale_acc, k_tile.data(), s.d_qk);  // scaled: S^T
        pack_matrix(k_src, s.d_qk, nk, k.stride(1), k.stride(2), acc_t(1), k_tile_t.data(), nk);     // for dq^T
        pack_matrix(v_data + n * v.stride(0) + h * s.d_v * v.stride(1) + j0 * v.stride(2), nk, s.d_v, v.stride(2),
                    v.stride(1), acc_t(1), v_tile.data(), s.d_v);
        for (int64_t qb = 0; qb < q_blocks; ++qb) {
          const int64_t i0 = qb * q_block, mq = std::min(q_block, s.q_len - i0);
          tile_gemm(nk, mq, s.d_qk, k_tile.data(), s.d_qk, queries_t.tile(nh, i0), queries_t.ld, scores.data(), q_block,
                    false);
          tile_gemm(nk, mq, s.d_v, v_tile.data(), s.d_v, grads_t.tile(nh, i0), grads_t.ld, dprobs.data(), q_block,
                    false);
          for (int64_t r = 0; r < nk; ++r)
            softmax_backward_row<true>(scores.data() + r * q_block, dprobs.data() + r * q_block, mq, lse_head + i0,
                                       delta_head + i0);
          tile_gemm(nk, s.d_v, mq, scores.data(), q_block, grads.tile(nh, i0), grads.ld, dv_acc.data(), s.d_v, qb > 0);
          tile_gemm(nk, s.d_qk, mq, dprobs.data(), q_block, queries.tile(nh, i0), queries.ld, dk_acc.data(), s.d_qk,
                    qb > 0);
          tile_gemm(s.d_qk, mq, nk, k_tile_t.data(), nk, dprobs.data(), q_block, partial + qb * s.d_qk * q_block,
                    q_block, kb > first_block);
        }
        store_matrix(dk_acc.data(), s.d_qk, nk, s.d_qk, scale_rows.data(),
                     dk.data_ptr<scalar_t>() + n * dk.stride(0) + h * s.d_qk * dk.stride(1) + j0 * dk.stride(2),
                     dk.stride(2), dk.stride(1));
        store_matrix(dv_acc.data(), s.d_v, nk, s.d_v, unit_rows.data(),
                     dv.data_ptr<scalar_t>() + n * dv.stride(0) + h * s.d_v * dv.stride(1) + j0 * dv.stride(2),
                     dv.stride(2), dv.stride(1));
      }
      if (splits == 1)  // this task saw every key of (n, head): its partial is the whole dq
        for (int64_t qb = 0; qb < q_blocks; ++qb) store_dq(nh, qb, partial + qb * s.d_qk * q_block);
    }
  });
  if (splits == 1) return;

  // dq = scale * (sum of the partials, in split order)
  at::parallel_for(0, batch_heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t tile_size = s.d_qk * q_block, split_stride = batch_heads * q_blocks * tile_size;
    std::vector<acc_t> sum(tile_size);
    for (int64_t t = begin; t < end; ++t) {
      const acc_t* tile = partial_data + t * tile_size;
      std::copy(tile, tile + tile_size, sum.begin());
      for (int64_t split = 1; split < splits; ++split) {
        const acc_t* other = tile + split * split_stride;
        for (int64_t e = 0; e < tile_size; ++e) sum[e] += other[e];
      }
      store_dq(t / q_blocks, t % q_blocks, sum.data());
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t heads, double scale) {
  const char* op = "spatial_attention_backward";
  const AttentionShape s = check_inputs(op, q, k, v, heads);
  const std::vector<int64_t> out_shape{s.batch, v.size(1), s.q_len};
  for (const at::Tensor* t : {&grad_out, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == q.scalar_type() && t->sizes() == out_shape, op,
                ": grad_out and out must be CPU ", q.scalar_type(), " tensors of shape ", out_shape, ", got ",
                t->scalar_type(), " ", t->sizes());
  }
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat &&
                  lse.sizes() == at::IntArrayRef({s.batch, heads, s.q_len}),
              op, ": lse must be a CPU float32 tensor of shape (", s.batch, ", ", heads, ", ", s.q_len, "), got ",
              lse.scalar_type(), " ", lse.sizes());
  at::Tensor dq = empty_nchw_like(q, q.size(1), s.q_len);
  at::Tensor dk = empty_nchw_like(k, k.size(1), s.k_len);
  at::Tensor dv = empty_nchw_like(v, v.size(1), s.k_len);
  if (s.batch == 0 || (s.q_len == 0 && s.k_len == 0)) return {dq, dk, dv};
  if (s.q_len == 0 || s.k_len == 0) {  // no query or no key: every gradient is empty or zero
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "spatial_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad_out, q, k, v, out, lse, dq, dk, dv, s, scale);
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("spatial_attention_forward", &fastattn::spatial_attention_forward_cpu);
  m.impl("spatial_attention_backward", &fastattn::spatial_attention_backward_cpu);
}
