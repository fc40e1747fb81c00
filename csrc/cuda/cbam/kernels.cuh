// The CBAM CUDA kernels: generic row and column reductions, the gate-gradient and partial-sum
// kernels, the elementwise kernel and its ops (see csrc/cuda/cbam.cu for the whole picture).
#pragma once

#include "reduce.cuh"

namespace fastattn {
namespace {

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------
// One warp reduces one contiguous row x[n, o, :] over k; the index kept is k.
template <typename State, int kVec, typename scalar_t, typename Transform, typename Writer>
__global__ void __launch_bounds__(kBlockThreads)
    reduce_rows_kernel(const scalar_t* __restrict__ x, Transform transform, Writer write, int64_t num_rows,
                       int64_t outer, int64_t inner) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= num_rows) return;  // the same for the whole warp, so the shuffles below see every lane
  const int64_t n = row / outer;
  const int64_t o = row - n * outer;
  const scalar_t* row_x = x + row * inner;
  State state = State::identity();
  // kVec > 1 only when inner % kVec == 0 and x is 16-byte aligned
#pragma unroll 4
  for (int64_t k0 = static_cast<int64_t>(lane) * kVec; k0 < inner; k0 += kWarpSize * kVec) {
    const Vec<scalar_t, kVec> v = *reinterpret_cast<const Vec<scalar_t, kVec>*>(row_x + k0);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t k = k0 + j;
      state.add(transform(static_cast<acc_t>(v.v[j]), n, o, k), k);
    }
  }
  state = warp_reduce(state);
  if (lane == 0) write(n, o, state);
}

// The place of a block of the column kernels in their grid of N * num_splits * num_tiles blocks:
// column tile `tile` (of kColTileWidth columns k) of row split `split` of map n.
// Its rows are o in [o_begin, o_end).
struct ColumnBlock {
  int64_t tile, split, n, o_begin, o_end;
  __device__ ColumnBlock(int64_t outer, int64_t num_tiles, int64_t num_splits, int64_t rows_per_split) {
    int64_t block = blockIdx.x;
    tile = block % num_tiles;
    block /= num_tiles;
    split = block % num_splits;
    n = block / num_splits;
    o_begin = split * rows_per_split;
    o_end = o_begin + rows_per_split < outer ? o_begin + rows_per_split : outer;
  }
};

// Partial reduction of the columns x[n, :, k] over the rows of one split; the
// index kept is o. Block (kColTileWidth, kColTileRows); grid = N * tiles * splits.
// partial: (N, num_splits, inner).
template <typename State, typename scalar_t, typename Transform>
__global__ void __launch_bounds__(kBlockThreads)
    reduce_cols_partial_kernel(const scalar_t* __restrict__ x, Transform transform, State* __restrict__ partial,
                               int64_t outer, int64_t inner, int64_t num_tiles, int64_t num_splits,
                               int64_t rows_per_split) {
  using acc_t = at::opmath_type<scalar_t>;
  const ColumnBlock block(outer, num_tiles, num_splits, rows_per_split);
  const int64_t tile = block.tile, split = block.split, n = block.n, o_begin = block.o_begin, o_end = block.o_end;
  const int64_t k = tile * kColTileWidth + threadIdx.x;

  State state = State::identity();
  if (k < inner) {
#pragma unroll 4
    for (int64_t o = o_begin + threadIdx.y; o < o_end; o += kColTileRows) {
      const acc_t xv = static_cast<acc_t>(x[(n * outer + o) * inner + k]);
      state.add(transform(xv, n, o, k), o);
    }
  }
  __shared__ State rows[kColTileRows][kColTileWidth];
  rows[threadIdx.y][threadIdx.x] = state;
  __syncthreads();
  if (threadIdx.y == 0 && k < inner) {
    for (int r = 1; r < kColTileRows; ++r) state = State::merge(state, rows[r][threadIdx.x]);
    partial[(n * num_splits + split) * inner + k] = state;
  }
}

// Merges the splits of reduce_cols_partial_kernel in order: one thread per (n, k).
template <typename State, typename Writer>
__global__ void __launch_bounds__(kBlockThreads)
    reduce_cols_finalize_kernel(const State* __restrict__ partial, Writer write, int64_t batch, int64_t num_splits,
                                int64_t inner) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch * inner) return;
  const int64_t n = i / inner;
  const int64_t k = i - n * inner;
  const State* column = partial + n * num_splits * inner + k;
  State state = column[0];
  for (int64_t split = 1; split < num_splits; ++split) state = State::merge(state, column[split * inner]);
  write(n, k, state);
}

// Both gate gradients of y = x * ch_gate * sp_gate in one pass over x and grad_y.
// In the (N, outer, inner) view inner_gate is indexed by k and outer_gate by o
// (NCHW: sp_gate, ch_gate; channels_last: ch_gate, sp_gate). With g = grad_y * x:
//   partial_inner[n, split, k] = sum over the split's o of g * outer_gate[n, o]
//   partial_outer[n, o, tile]  = sum over the tile's k  of g * inner_gate[n, k]
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    cbam_apply_backward_partial_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ x,
                                       const scalar_t* __restrict__ inner_gate,
                                       const scalar_t* __restrict__ outer_gate, acc_t* __restrict__ partial_inner,
                                       acc_t* __restrict__ partial_outer, int64_t outer, int64_t inner,
                                       int64_t num_tiles, int64_t num_splits, int64_t rows_per_split) {
  const ColumnBlock block(outer, num_tiles, num_splits, rows_per_split);
  const int64_t tile = block.tile, split = block.split, n = block.n, o_begin = block.o_begin, o_end = block.o_end;
  const int64_t k = tile * kColTileWidth + threadIdx.x;
  const bool valid = k < inner;
  const acc_t k_gate = valid ? static_cast<acc_t>(inner_gate[n * inner + k]) : acc_t(0);

  acc_t inner_sum = 0;
  // a warp is one threadIdx.y, so every lane runs the same iterations (warp_sum needs them all)
  for (int64_t o = o_begin + threadIdx.y; o < o_end; o += kColTileRows) {
    acc_t g = 0;
    if (valid) {
      const int64_t offset = (n * outer + o) * inner + k;
      g = static_cast<acc_t>(grad_y[offset]) * static_cast<acc_t>(x[offset]);
      inner_sum += g * static_cast<acc_t>(outer_gate[n * outer + o]);
    }
    const acc_t outer_sum = warp_sum(g * k_gate);
    if (threadIdx.x == 0) partial_outer[(n * outer + o) * num_tiles + tile] = outer_sum;
  }
  __shared__ acc_t rows[kColTileRows][kColTileWidth];
  rows[threadIdx.y][threadIdx.x] = inner_sum;
  __syncthreads();
  if (threadIdx.y == 0 && valid) {
    for (int r = 1; r < kColTileRows; ++r) inner_sum += rows[r][threadIdx.x];
    partial_inner[(n * num_splits + split) * inner + k] = inner_sum;
  }
}

// out[a, b] = sum over t of partial[a, t, b], in order of t; one thread per (a, b).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    sum_partials_kernel(const acc_t* __restrict__ partial, scalar_t* __restrict__ out, int64_t outer_size,
                        int64_t num_partials, int64_t inner_size) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= outer_size * inner_size) return;
  const int64_t a = i / inner_size;
  const int64_t b = i - a * inner_size;
  const acc_t* column = partial + a * num_partials * inner_size + b;
  acc_t sum = 0;
  for (int64_t t = 0; t < num_partials; ++t) sum += column[t * inner_size];
  out[i] = static_cast<scalar_t>(sum);
}

// out[i] = op(x[i], i, n, o, k) for every element of the (N, outer, inner) view,
// kVec consecutive elements per step (kVec > 1 only with 16-byte aligned pointers).
template <int kVec, typename scalar_t, typename Op>
__global__ void __launch_bounds__(kBlockThreads)
    elementwise_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, Op op, int64_t numel,
                       int64_t outer, int64_t inner) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t num_threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t num_chunks = numel / kVec;
  for (int64_t chunk = thread; chunk < num_chunks; chunk += num_threads) {
    const int64_t first = chunk * kVec;
    const Vec<scalar_t, kVec> in = *reinterpret_cast<const Vec<scalar_t, kVec>*>(x + first);
    Vec<scalar_t, kVec> result;
    // coordinates of `first`, then stepped along (one division per chunk, not per element)
    const int64_t row = first / inner;
    int64_t k = first - row * inner;
    int64_t n = row / outer;
    int64_t o = row - n * outer;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      result.v[j] = static_cast<scalar_t>(op(static_cast<acc_t>(in.v[j]), first + j, n, o, k));
      if (++k == inner) {
        k = 0;
        if (++o == outer) {
          o = 0;
          ++n;
        }
      }
    }
    *reinterpret_cast<Vec<scalar_t, kVec>*>(out + first) = result;
  }
  // the last numel % kVec elements
  const int64_t i = num_chunks * kVec + thread;
  if (i < numel) {
    const int64_t row = i / inner;
    const int64_t k = i - row * inner;
    const int64_t n = row / outer;
    const int64_t o = row - n * outer;
    out[i] = static_cast<scalar_t>(op(static_cast<acc_t>(x[i]), i, n, o, k));
  }
}

// y = x * ch_gate[n, c] * sp_gate[n, p]
template <typename scalar_t, bool kChannelsLast>
struct ApplyOp {
  const scalar_t* ch_gate;  // (N, C)
  const scalar_t* sp_gate;  // (N, HW)
  int64_t C, HW;

  template <typename acc_t>
  __device__ acc_t operator()(acc_t xv, int64_t, int64_t n, int64_t o, int64_t k) const {
    const int64_t c = Layout<kChannelsLast>::channel(o, k);
    const int64_t p = Layout<kChannelsLast>::position(o, k);
    return xv * static_cast<acc_t>(ch_gate[n * C + c]) * static_cast<acc_t>(sp_gate[n * HW + p]);
  }
};

// The sum of the terms of ref_cbam_grad_x whose inputs are given (null pointers are absent).
template <typename scalar_t, bool kChannelsLast>
struct GradXOp {
  const scalar_t* grad_y;       // x-sized, x's layout
  const scalar_t* ch_gate;      // (N, C)
  const scalar_t* sp_gate;      // (N, HW)
  const scalar_t* grad_pooled;  // (N, 2, HW)
  const scalar_t* pooled;       // (N, 2, HW)
  const int64_t* sp_argmax;     // (N, HW)
  const int32_t* sp_count;      // (N, HW)
  const scalar_t* grad_avg;     // (N, C)
  const scalar_t* grad_max;     // (N, C)
  const scalar_t* ch_max;       // (N, C)
  const int64_t* ch_argmax;     // (N, C)
  const int32_t* ch_count;      // (N, C)
  int64_t C, HW;
  bool split_ties;

  template <typename acc_t>
  __device__ acc_t operator()(acc_t xv, int64_t offset, int64_t n, int64_t o, int64_t k) const {
    const int64_t c = Layout<kChannelsLast>::channel(o, k);
    const int64_t p = Layout<kChannelsLast>::position(o, k);
    const int64_t nc = n * C + c;
    const int64_t np = n * HW + p;
    acc_t dx = 0;
    if (grad_y != nullptr) {
      dx += static_cast<acc_t>(grad_y[offset]) * static_cast<acc_t>(ch_gate[nc]) * static_cast<acc_t>(sp_gate[np]);
    }
    if (grad_pooled != nullptr) {
      const acc_t gate = static_cast<acc_t>(ch_gate[nc]);
      const int64_t mean_at = n * 2 * HW + p;
      const int64_t max_at = mean_at + HW;
      acc_t w;
      if (split_ties) {
        w = split_tie_weight<acc_t>(gated_value<scalar_t>(xv, gate) == static_cast<acc_t>(pooled[max_at]),
                                    sp_count[np]);
      } else {
        w = sp_argmax[np] == c ? acc_t(1) : acc_t(0);
      }
      dx += gate * (static_cast<acc_t>(grad_pooled[mean_at]) / static_cast<acc_t>(C) +
                    w * static_cast<acc_t>(grad_pooled[max_at]));
    }
    if (grad_avg != nullptr) {
      dx += static_cast<acc_t>(grad_avg[nc]) / static_cast<acc_t>(HW);
    }
    if (grad_max != nullptr) {
      acc_t w;
      if (split_ties) {
        w = split_tie_weight<acc_t>(xv == static_cast<acc_t>(ch_max[nc]), ch_count[nc]);
      } else {
        w = ch_argmax[nc] == p ? acc_t(1) : acc_t(0);
      }
      dx += w * static_cast<acc_t>(grad_max[nc]);  // a product even when w == 0, so NaN grads propagate
    }
    return dx;
  }
};

}  // namespace
}  // namespace fastattn
