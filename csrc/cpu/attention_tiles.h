// Tiles of the CPU attention kernels (csrc/cpu/attention.cpp): the tile GEMM,
// packing between strided tensors and row-major tiles, the tile sizes, and the
// per-call panels of the streamed operands.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <vector>

#include "cpu_tuning.h"

namespace fastattn::attention_cpu {

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

// Dot products are summed in chunks of kDotChunk terms: brgemm sums each chunk
// afresh in registers and then adds it to C, so a K-long dot product is a chain
// of K / kDotChunk chunk sums instead of one K-long chain of FMAs, whose rounding
// error grows like sqrt(K) times the chunked one's sqrt(kDotChunk) (MKL, behind
// eager PyTorch, splits its K loop the same way). A matrix-vector product (one
// query or one key) gets chunks of kDotChunkVector: MKL's gemv, which eager runs
// there, keeps several partial sums, and a gemv's cost is its memory traffic.
constexpr int64_t kDotChunk = 64, kDotChunkVector = 16;

inline void tile_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                      float* c, int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.f);
    return;
  }
  const int64_t chunk_size = (m == 1 || n == 1) ? kDotChunkVector : kDotChunk;
  for (int64_t p0 = 0; p0 < k; p0 += chunk_size) {
    const int64_t chunk = std::min(chunk_size, k - p0);
#ifdef CPUBLAS_BRGEMM_F32F32F32
    at::native::cpublas::brgemm(m, n, chunk, lda, ldb, ldc, accumulate || p0 > 0, a + p0, b + p0 * ldb, c,
                                /*is_vnni=*/false);
#else
    plain_gemm(m, n, chunk, a + p0, lda, b + p0 * ldb, ldb, c, ldc, accumulate || p0 > 0);
#endif
  }
}

// double: gradcheck only, one chain
inline void tile_gemm(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb,
                      double* c, int64_t ldc, bool accumulate) {
  plain_gemm(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

// ---------------------------------------------------------------------------
// Packing between strided tensors and row-major tiles of the accumulation dtype.
// ---------------------------------------------------------------------------
constexpr int64_t kTransposeBlock = 16;

// body(r, c) over [r_begin, r_end) x [c_begin, c_end) in kTransposeBlock x kTransposeBlock blocks
// (c outer, r inner within a block), so that a transposing copy keeps its reads and its writes in
// cache. kRowBlocksOuter: blocks walk along r in the outer loop (else along c).
template <bool kRowBlocksOuter, typename Body>
inline void for_each_blocked(int64_t r_begin, int64_t r_end, int64_t c_begin, int64_t c_end, Body&& body) {
  auto block = [&](int64_t r0, int64_t c0) {
    const int64_t r1 = std::min(r_end, r0 + kTransposeBlock), c1 = std::min(c_end, c0 + kTransposeBlock);
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t r = r0; r < r1; ++r) body(r, c);
  };
  if constexpr (kRowBlocksOuter) {
    for (int64_t r0 = r_begin; r0 < r_end; r0 += kTransposeBlock)
      for (int64_t c0 = c_begin; c0 < c_end; c0 += kTransposeBlock) block(r0, c0);
  } else {
    for (int64_t c0 = c_begin; c0 < c_end; c0 += kTransposeBlock)
      for (int64_t r0 = r_begin; r0 < r_end; r0 += kTransposeBlock) block(r0, c0);
  }
}

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
  // transposing gather of the rest
  auto gather = [&](int64_t r_begin, int64_t r_end, int64_t c_begin, int64_t c_end) {
    for_each_blocked</*kRowBlocksOuter=*/true>(r_begin, r_end, c_begin, c_end, [&](int64_t r, int64_t c) {
      dst[r * ld + c] = factor * static_cast<acc_t>(src[r * row_stride + c * col_stride]);
    });
  };
  gather(0, rows_done, cols_done, cols);
  gather(rows_done, rows, 0, cols);
}

// dst[r * row_stride + c * col_stride] = src[r, c] * row_factor[r] (kDivide: / row_factor[r]), rounded
// to scalar_t. Dividing rounds once where multiplying by a reciprocal rounds twice.
template <bool kDivide = false, typename acc_t, typename scalar_t>
void store_matrix(const acc_t* src, int64_t ld, int64_t rows, int64_t cols, const acc_t* row_factor,
                  scalar_t* dst, int64_t row_stride, int64_t col_stride) {
  auto apply = [](acc_t x, acc_t factor) { return kDivide ? x / factor : x * factor; };
  if (col_stride == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t* s = src + r * ld;
      scalar_t* d = dst + r * row_stride;
      const acc_t f = row_factor[r];
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<scalar_t>(apply(s[c], f));
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
            for (int64_t r = 0; r < 8; ++r) out[c * col_stride + r] = apply(out[c * col_stride + r], factors[r]);
        }
    }
  }
  auto scatter = [&](int64_t r_begin, int64_t r_end, int64_t c_begin, int64_t c_end) {
    for_each_blocked</*kRowBlocksOuter=*/false>(r_begin, r_end, c_begin, c_end, [&](int64_t r, int64_t c) {
      dst[r * row_stride + c * col_stride] = static_cast<scalar_t>(apply(src[r * ld + c], row_factor[r]));
    });
  };
  scatter(0, rows_done, cols_done, cols);
  scatter(rows_done, rows, 0, cols);
}

// Positions per streamed panel, so that a d x block operand tile stays within an
// eighth of L2 (cpu_tuning.cpp; brgemm drops to a third of its speed on larger B tiles).
inline int64_t stream_block(int64_t d_max, int64_t length) {
  const int64_t panel_floats = cpu::cpu_tiling().panel_floats;
  const int64_t block = std::clamp<int64_t>(panel_floats / std::max<int64_t>(d_max, 1), 16, 512) / 16 * 16;
  return std::max<int64_t>(std::min(block, length), 1);
}

// Rows a task owns and positions it streams per step. More rows per task means
// fewer passes over the streamed panels, which pays when d is large (each panel
// is big) as long as the rows x stream score tile stays within a sixteenth of L2
// (cpu_tuning.cpp); rows shrink again when there would be too few tasks for the threads.

struct Tiling {
  int64_t rows, stream;
};

inline Tiling choose_tiling(int64_t d_max, int64_t row_len, int64_t stream_len, int64_t batch_heads) {
  const int64_t stream = stream_block(d_max, stream_len);
  int64_t rows = std::clamp<int64_t>(cpu::cpu_tiling().score_tile_floats / stream, 64, 256);
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

}  // namespace fastattn::attention_cpu
