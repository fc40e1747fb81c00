// What the CPU CBAM kernels (csrc/cpu/cbam_*.cpp) share: x as a dense (rows x lanes) matrix per
// image, the checks and conversions of their small inputs, and the task grid. The ops' contract
// (outputs, tie and NaN rules, layouts) is fastattn/reference.py: ref_<op>.
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
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include "cbam_tiling.h"

#include <algorithm>
#include <vector>

namespace fastattn {
namespace cpu {

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

// Which index of an image's (rows x lanes) matrix is the channel and which the position, decided
// once per layout as cbam.cu's Layout does: NCHW rows are channels and lanes positions,
// channels_last the other way round.
template <bool kChannelsLast>
struct Layout {
  // of a per-channel and a per-position thing, the one indexed by rows / by lanes
  template <typename T>
  static const T& row(const T& per_channel, const T& per_position) {
    return kChannelsLast ? per_position : per_channel;
  }
  template <typename T>
  static const T& lane(const T& per_channel, const T& per_position) {
    return kChannelsLast ? per_channel : per_position;
  }
  // of a per-row and a per-lane view (types may differ), the one of the channel / of the position
  template <typename Row, typename Lane>
  static const auto& channel(const Row& row_view, const Lane& lane_view) {
    if constexpr (kChannelsLast) {
      return lane_view;
    } else {
      return row_view;
    }
  }
  template <typename Row, typename Lane>
  static const auto& position(const Row& row_view, const Lane& lane_view) {
    if constexpr (kChannelsLast) {
      return row_view;
    } else {
      return lane_view;
    }
  }
};

inline void check_x(const Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x must be float32, float64, float16 or bfloat16, got ", dt);
}

// x in place when NCHW- or channels_last-contiguous, else a contiguous copy
inline Dense dense_input(const Tensor& x, const char* op) {
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

inline Tensor index_array(const Tensor& t, at::IntArrayRef shape, at::ScalarType dtype, const char* op, const char* name) {
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
       int64_t max_tile = max_lane_tile())
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

inline int64_t row_grain(int64_t row_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_len)); }

// index - base, float-coded (exact below 2^24) for comparisons with local indices; -1 when out of range
template <typename acc>
acc local_index(int64_t index, int64_t base) {
  const int64_t d = index - base;
  return (d >= 0 && d < (int64_t(1) << 24)) ? acc(d) : acc(-1);
}

}  // namespace cpu
}  // namespace fastattn
