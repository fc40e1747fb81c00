// CUDA kernels of the six CBAM ops. Schemas: csrc/ops.cpp; exact contract
// (outputs, tie and NaN rules, layouts): fastattn/reference.py (ref_<op>).
//
// Every x is read in place as an (N, outer, inner) array with inner contiguous:
//   NCHW-contiguous:  outer = C,     inner = H*W   (o = c, k = p)
//   channels_last:    outer = H*W,   inner = C     (o = p, k = c)
// (p = h*W + w). Other strides are copied to NCHW first. A reduction over the
// contiguous dim is a "row" reduction (one warp per row); one over the strided
// dim is a "column" reduction (32 lanes along inner, 8 rows, the outer dim split
// across blocks, partials merged by a second kernel in a fixed order). No float
// atomics anywhere, so every result is bitwise repeatable on a given GPU model
// for a given x: the column splits follow the SM count, and a row reduction walks
// 16-byte vectors only when x is 16-byte aligned (a view at an odd storage
// offset sums in another order, so its last bits may differ).
//
// Accumulation is in float (at::opmath_type<scalar_t>). The kernels are compiled for float32,
// float16 and bfloat16 only (dispatch.cuh): float64 CUDA tensors run on the reference backend.
// The max/tie decisions compare values rounded to x's dtype exactly as the
// reference does, so argmax and count match bitwise. Caveat: the project
// compiles with --use_fast_math, which flushes float32 denormals to zero; inputs
// or products below ~1.2e-38 may then tie where PyTorch sees them differ.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dispatch.cuh"
#include "message.cuh"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace fastattn {
namespace {

constexpr int kWarpSize = 32;
constexpr int kBlockThreads = 256;
constexpr int kWarpsPerBlock = kBlockThreads / kWarpSize;
// Column reductions: a block is kColTileWidth lanes along inner x kColTileRows rows.
constexpr int kColTileWidth = 32;
constexpr int kColTileRows = kBlockThreads / kColTileWidth;
constexpr int64_t kNoIndex = std::numeric_limits<int64_t>::max();

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

template <bool kChannelsLast>
struct Layout {
  // channel c and position p = h*W + w of the element x[n, o, k]
  __device__ static int64_t channel(int64_t o, int64_t k) { return kChannelsLast ? k : o; }
  __device__ static int64_t position(int64_t o, int64_t k) { return kChannelsLast ? o : k; }
};

__device__ __forceinline__ bool is_nan(float v) { return isnan(v); }

// z = x * gate rounded to scalar_t, as PyTorch computes x * gate[:, :, None, None].
// Max and tie decisions use this rounded value so they match the reference bitwise.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t gated_value(acc_t x, acc_t gate) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return __fmul_rn(x, gate);  // an intrinsic, so never contracted into an FMA
  } else {
    return static_cast<acc_t>(static_cast<scalar_t>(x * gate));  // exact float product, then one rounding
  }
}

// Share of a max's gradient with split_ties (timm, amax): mask / count. A NaN
// max has count 0, and mask / 0 gives the NaN (inf where mask is 1) PyTorch gives.
template <typename acc_t>
__device__ __forceinline__ acc_t split_tie_weight(bool equals_max, int32_t count) {
  if (count == 0) {
    return equals_max ? std::numeric_limits<acc_t>::infinity() : std::numeric_limits<acc_t>::quiet_NaN();
  }
  return equals_max ? acc_t(1) / static_cast<acc_t>(count) : acc_t(0);
}

// ---------------------------------------------------------------------------
// Reduction states. Merges are in a fixed order everywhere, so sums are
// deterministic; the max part is order-free (ties keep the smaller index).
// ---------------------------------------------------------------------------
template <typename acc_t>
struct SumState {
  acc_t sum;

  __device__ static SumState identity() { return {acc_t(0)}; }
  __device__ static SumState merge(const SumState& a, const SumState& b) { return {a.sum + b.sum}; }
  __device__ void add(acc_t value, int64_t /*index*/) { sum += value; }
  __device__ SumState shuffle_xor(int lane_mask) const { return {__shfl_xor_sync(0xffffffffu, sum, lane_mask)}; }
};

template <typename acc_t>
struct PoolState {
  acc_t sum;
  acc_t max;      // NaN as soon as any element is NaN
  int64_t index;  // first index of the max; of the first NaN when max is NaN
  int32_t count;  // elements equal to max (none when max is NaN)

  __device__ static PoolState identity() {
    return {acc_t(0), -std::numeric_limits<acc_t>::infinity(), kNoIndex, 0};
  }
  __device__ static PoolState merge(const PoolState& a, const PoolState& b) {
    PoolState r;
    r.sum = a.sum + b.sum;
    const bool a_nan = is_nan(a.max);
    const bool b_nan = is_nan(b.max);
    if (a_nan || b_nan) {
      const bool take_a = a_nan && (!b_nan || a.index < b.index);
      r.max = take_a ? a.max : b.max;
      r.index = take_a ? a.index : b.index;
      r.count = 0;
    } else if (a.max > b.max) {
      r.max = a.max;
      r.index = a.index;
      r.count = a.count;
    } else if (b.max > a.max) {
      r.max = b.max;
      r.index = b.index;
      r.count = b.count;
    } else {
      r.max = a.max;
      r.index = a.index < b.index ? a.index : b.index;
      r.count = a.count + b.count;
    }
    return r;
  }
  // merges in one element whose index is above every index merged so far
  // (each thread visits its elements in increasing order); cheaper per element.
  __device__ void add(acc_t value, int64_t i) {
    sum += value;
    if (value > max) {
      max = value;
      index = i;
      count = 1;
    } else if (value == max) {
      count += 1;
      if (index == kNoIndex) index = i;  // the first element, when it is -inf
    } else if (is_nan(value) && !is_nan(max)) {
      max = value;
      index = i;
      count = 0;
    }
  }
  __device__ PoolState shuffle_xor(int lane_mask) const {
    PoolState r;
    r.sum = __shfl_xor_sync(0xffffffffu, sum, lane_mask);
    r.max = __shfl_xor_sync(0xffffffffu, max, lane_mask);
    r.index = static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(index), lane_mask));
    r.count = __shfl_xor_sync(0xffffffffu, count, lane_mask);
    return r;
  }
};

template <typename State>
__device__ __forceinline__ State warp_reduce(State state) {
#pragma unroll
  for (int lane_mask = kWarpSize / 2; lane_mask > 0; lane_mask /= 2) {
    state = State::merge(state, state.shuffle_xor(lane_mask));
  }
  return state;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
  return warp_reduce(SumState<acc_t>{value}).sum;
}

// ---------------------------------------------------------------------------
// Per-element transforms: value reduced for x[n, o, k] given xv = x[n, o, k]
// ---------------------------------------------------------------------------
struct IdentityTransform {
  template <typename acc_t>
  __device__ acc_t operator()(acc_t xv, int64_t, int64_t, int64_t) const { return xv; }
};

// z = x * gate[n, c], rounded to x's dtype (gated_spatial_pool)
template <typename scalar_t, bool kChannelsLast>
struct GateTransform {
  const scalar_t* gate;  // (N, C)
  int64_t C;

  template <typename acc_t>
  __device__ acc_t operator()(acc_t xv, int64_t n, int64_t o, int64_t k) const {
    const int64_t c = Layout<kChannelsLast>::channel(o, k);
    return gated_value<scalar_t>(xv, static_cast<acc_t>(gate[n * C + c]));
  }
};

// x * (grad_mean / C + w_max * grad_max), summed over p (gated_spatial_pool_backward_gate)
template <typename scalar_t, bool kChannelsLast>
struct BackwardGateTransform {
  const scalar_t* gate;         // (N, C)
  const scalar_t* grad_pooled;  // (N, 2, HW)
  const scalar_t* pooled;       // (N, 2, HW)
  const int64_t* argmax;        // (N, HW)
  const int32_t* count;         // (N, HW)
  int64_t C, HW;
  bool split_ties;

  template <typename acc_t>
  __device__ acc_t operator()(acc_t xv, int64_t n, int64_t o, int64_t k) const {
    const int64_t c = Layout<kChannelsLast>::channel(o, k);
    const int64_t p = Layout<kChannelsLast>::position(o, k);
    const int64_t mean_at = n * 2 * HW + p;
    const int64_t max_at = mean_at + HW;
    const int64_t np = n * HW + p;
    acc_t w;
    if (split_ties) {
      const acc_t z = gated_value<scalar_t>(xv, static_cast<acc_t>(gate[n * C + c]));
      w = split_tie_weight<acc_t>(z == static_cast<acc_t>(pooled[max_at]), count[np]);
    } else {
      w = argmax[np] == c ? acc_t(1) : acc_t(0);
    }
    const acc_t grad_z = static_cast<acc_t>(grad_pooled[mean_at]) / static_cast<acc_t>(C) +
                         w * static_cast<acc_t>(grad_pooled[max_at]);
    return grad_z * xv;
  }
};

// ---------------------------------------------------------------------------
// Writers: store the reduced state of (n, j), j the index along the kept dim
// ---------------------------------------------------------------------------
template <typename scalar_t>
struct PoolWriter {
  scalar_t* mean;
  scalar_t* max;
  int64_t value_stride_n;
  int64_t* argmax;
  int32_t* count;
  int64_t index_stride_n;
  int64_t reduced_size;

  template <typename State>
  __device__ void operator()(int64_t n, int64_t j, const State& s) const {
    using acc_t = decltype(s.sum);
    mean[n * value_stride_n + j] = static_cast<scalar_t>(s.sum / static_cast<acc_t>(reduced_size));
    max[n * value_stride_n + j] = static_cast<scalar_t>(s.max);
    argmax[n * index_stride_n + j] = s.index;
    count[n * index_stride_n + j] = s.count;
  }
};

template <typename scalar_t>
struct SumWriter {
  scalar_t* out;
  int64_t stride_n;

  template <typename State>
  __device__ void operator()(int64_t n, int64_t j, const State& s) const {
    out[n * stride_n + j] = static_cast<scalar_t>(s.sum);
  }
};

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

// Partial reduction of the columns x[n, :, k] over the rows of one split; the
// index kept is o. Block (kColTileWidth, kColTileRows); grid = N * tiles * splits.
// partial: (N, num_splits, inner).
template <typename State, typename scalar_t, typename Transform>
__global__ void __launch_bounds__(kBlockThreads)
    reduce_cols_partial_kernel(const scalar_t* __restrict__ x, Transform transform, State* __restrict__ partial,
                               int64_t outer, int64_t inner, int64_t num_tiles, int64_t num_splits,
                               int64_t rows_per_split) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t block = blockIdx.x;
  const int64_t tile = block % num_tiles;
  block /= num_tiles;
  const int64_t split = block % num_splits;
  const int64_t n = block / num_splits;
  const int64_t k = tile * kColTileWidth + threadIdx.x;
  const int64_t o_begin = split * rows_per_split;
  const int64_t o_end = o_begin + rows_per_split < outer ? o_begin + rows_per_split : outer;

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
  int64_t block = blockIdx.x;
  const int64_t tile = block % num_tiles;
  block /= num_tiles;
  const int64_t split = block % num_splits;
  const int64_t n = block / num_splits;
  const int64_t k = tile * kColTileWidth + threadIdx.x;
  const bool valid = k < inner;
  const int64_t o_begin = split * rows_per_split;
  const int64_t o_end = o_begin + rows_per_split < outer ? o_begin + rows_per_split : outer;
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

// ---------------------------------------------------------------------------
// Host side: input preparation and launchers
// ---------------------------------------------------------------------------
// x viewed as (N, outer, inner), inner contiguous (see the top of the file).
struct CbamInput {
  at::Tensor x;  // NCHW-contiguous, or channels_last-contiguous when channels_last
  bool channels_last = false;
  int64_t N = 0, C = 0, H = 0, W = 0, HW = 0;

  int64_t outer() const { return channels_last ? HW : C; }
  int64_t inner() const { return channels_last ? C : HW; }
  at::MemoryFormat memory_format() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
};

void check_dtype_supported(const at::Tensor& x, const char* op) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              message_text(op, ": x must be float32, float16 or bfloat16, got ", dtype));
}

// Reads NCHW-contiguous and channels_last x in place; copies any other strides to NCHW.
CbamInput prepare_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), message_text(op, ": x must be a CUDA tensor, got device ", x.device()));
  TORCH_CHECK(x.dim() == 4, message_text(op, ": x must be (N, C, H, W), got shape ", x.sizes()));
  check_dtype_supported(x, op);
  CbamInput in;
  if (x.is_contiguous()) {
    in.x = x;
  } else if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    in.x = x;
    in.channels_last = true;
  } else {
    in.x = x.contiguous();
  }
  in.N = x.size(0);
  in.C = x.size(1);
  in.H = x.size(2);
  in.W = x.size(3);
  in.HW = in.H * in.W;
  return in;
}

// A small operand (gate, pooled map, saved index), contiguous, after cheap checks.
at::Tensor small_operand(const at::Tensor& t, const CbamInput& in, const char* op, const char* name,
                         int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK(t.device() == in.x.device(),
              message_text(op, ": ", name, " is on ", t.device(), " but x is on ", in.x.device()));
  TORCH_CHECK(t.scalar_type() == dtype,
              message_text(op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type()));
  TORCH_CHECK(t.numel() == numel, message_text(op, ": ", name, " must have ", numel, " elements for x of shape ",
                                               in.x.sizes(), ", got shape ", t.sizes()));
  return t.contiguous();
}

// An x-sized operand (grad_y) in x's layout, so it is indexed like x.
at::Tensor x_sized_operand(const at::Tensor& t, const CbamInput& in, const char* op, const char* name) {
  TORCH_CHECK(t.device() == in.x.device(),
              message_text(op, ": ", name, " is on ", t.device(), " but x is on ", in.x.device()));
  TORCH_CHECK(t.scalar_type() == in.x.scalar_type(),
              message_text(op, ": ", name, " must have x's dtype ", in.x.scalar_type(), ", got ", t.scalar_type()));
  TORCH_CHECK(t.sizes() == in.x.sizes(),
              message_text(op, ": ", name, " must have x's shape ", in.x.sizes(), ", got ", t.sizes()));
  return t.contiguous(in.memory_format());
}

const at::Tensor& required(const std::optional<at::Tensor>& t, const char* op, const char* name, const char* by) {
  TORCH_CHECK(t.has_value(), message_text(op, ": ", name, " is required when ", by, " is given"));
  return *t;
}

bool is_aligned_16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

unsigned int grid_size(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              message_text(what, ": the input is too large for one launch (", blocks, " blocks)"));
  return static_cast<unsigned int>(std::max<int64_t>(blocks, 1));
}

// How a column reduction splits the outer (reduced) dim across blocks: enough
// blocks to fill the GPU, at least 32 rows per split.
struct ColumnPlan {
  int64_t num_tiles;
  int64_t num_splits;
  int64_t rows_per_split;
};

ColumnPlan plan_columns(int64_t batch, int64_t outer, int64_t inner) {
  ColumnPlan plan;
  plan.num_tiles = ceil_div(inner, kColTileWidth);
  const int64_t base_blocks = batch * plan.num_tiles;
  const int64_t wanted = ceil_div(4 * sm_count(), std::max<int64_t>(base_blocks, 1));
  const int64_t max_splits = std::max<int64_t>(1, outer / (4 * kColTileRows));
  const int64_t splits = std::min(std::max<int64_t>(wanted, 1), max_splits);
  plan.rows_per_split = ceil_div(outer, splits);
  plan.num_splits = ceil_div(outer, plan.rows_per_split);  // no empty split
  return plan;
}

template <typename State, typename scalar_t, typename Transform, typename Writer>
void reduce_rows(const scalar_t* x, Transform transform, Writer write, int64_t batch, int64_t outer, int64_t inner) {
  const int64_t num_rows = batch * outer;
  const unsigned int blocks = grid_size(ceil_div(num_rows, kWarpsPerBlock), "reduce_rows");
  const auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (inner % kVec == 0 && is_aligned_16(x)) {
    reduce_rows_kernel<State, kVec><<<blocks, kBlockThreads, 0, stream>>>(x, transform, write, num_rows, outer, inner);
  } else {
    reduce_rows_kernel<State, 1><<<blocks, kBlockThreads, 0, stream>>>(x, transform, write, num_rows, outer, inner);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename State, typename scalar_t, typename Transform, typename Writer>
void reduce_columns(const at::Tensor& like, const scalar_t* x, Transform transform, Writer write, int64_t batch,
                    int64_t outer, int64_t inner) {
  const ColumnPlan plan = plan_columns(batch, outer, inner);
  const at::Tensor partial = at::empty({batch * plan.num_splits * inner * static_cast<int64_t>(sizeof(State))},
                                       like.options().dtype(at::kByte));
  State* partial_states = reinterpret_cast<State*>(partial.data_ptr());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned int blocks = grid_size(batch * plan.num_tiles * plan.num_splits, "reduce_columns");
  reduce_cols_partial_kernel<State><<<blocks, dim3(kColTileWidth, kColTileRows), 0, stream>>>(
      x, transform, partial_states, outer, inner, plan.num_tiles, plan.num_splits, plan.rows_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const unsigned int finalize_blocks = grid_size(ceil_div(batch * inner, kBlockThreads), "reduce_columns");
  reduce_cols_finalize_kernel<State><<<finalize_blocks, kBlockThreads, 0, stream>>>(partial_states, write, batch,
                                                                                    plan.num_splits, inner);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void sum_partials(const at::Tensor& partial, scalar_t* out, int64_t outer_size, int64_t num_partials,
                  int64_t inner_size) {
  const unsigned int blocks = grid_size(ceil_div(outer_size * inner_size, kBlockThreads), "sum_partials");
  sum_partials_kernel<scalar_t, acc_t><<<blocks, kBlockThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      partial.const_data_ptr<acc_t>(), out, outer_size, num_partials, inner_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// vectorized when every x-sized pointer is 16-byte aligned
template <typename scalar_t, typename Op>
void launch_elementwise(const CbamInput& in, const scalar_t* x, scalar_t* out, Op op, bool others_aligned) {
  const int64_t numel = in.x.numel();
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vectorized = others_aligned && is_aligned_16(x) && is_aligned_16(out);
  const int64_t steps = vectorized ? numel / kVec : numel;
  const unsigned int blocks = grid_size(std::min(ceil_div(steps, kBlockThreads), sm_count() * 32), "elementwise");
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (vectorized) {
    elementwise_kernel<kVec><<<blocks, kBlockThreads, 0, stream>>>(x, out, op, numel, in.outer(), in.inner());
  } else {
    elementwise_kernel<1><<<blocks, kBlockThreads, 0, stream>>>(x, out, op, numel, in.outer(), in.inner());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_pool_cuda(const at::Tensor& x_arg,
                                                                           bool /*split_ties: read by the autograd formula*/) {
  constexpr const char* op = "channel_pool";
  const CbamInput in = prepare_x(x_arg, op);
  const c10::cuda::CUDAGuard device_guard(in.x.device());
  TORCH_CHECK(in.HW > 0, message_text(op, ": x must have H * W > 0 to take a max, got shape ", in.x.sizes()));
  const auto options = in.x.options();
  at::Tensor avg = at::empty({in.N, in.C}, options);
  at::Tensor max = at::empty({in.N, in.C}, options);
  at::Tensor argmax = at::empty({in.N, in.C}, options.dtype(at::kLong));
  at::Tensor count = at::empty({in.N, in.C}, options.dtype(at::kInt));
  if (in.x.numel() == 0) return {avg, max, argmax, count};

  FASTATTN_DISPATCH_FLOAT_HALF_BFLOAT16(in.x.scalar_type(), "channel_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const PoolWriter<scalar_t> writer{avg.data_ptr<scalar_t>(),  max.data_ptr<scalar_t>(), in.C,
                                      argmax.data_ptr<int64_t>(), count.data_ptr<int32_t>(), in.C, in.HW};
    const scalar_t* x = in.x.const_data_ptr<scalar_t>();
    if (in.channels_last) {  // reduce over p = o, keep c = k
      reduce_columns<PoolState<acc_t>>(in.x, x, IdentityTransform{}, writer, in.N, in.HW, in.C);
    } else {  // reduce over p = k, keep c = o
      reduce_rows<PoolState<acc_t>>(x, IdentityTransform{}, writer, in.N, in.C, in.HW);
    }
  });
  return {avg, max, argmax, count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_spatial_pool_cuda(const at::Tensor& x_arg,
                                                                       const at::Tensor& gate_arg,
                                                                       bool /*split_ties: read by the autograd formula*/) {
  constexpr const char* op = "gated_spatial_pool";
  const CbamInput in = prepare_x(x_arg, op);
  const c10::cuda::CUDAGuard device_guard(in.x.device());
  TORCH_CHECK(in.C > 0, message_text(op, ": x must have C > 0 to take a max, got shape ", in.x.sizes()));
  const at::Tensor gate = small_operand(gate_arg, in, op, "gate", in.N * in.C, in.x.scalar_type());
  const auto options = in.x.options();
  at::Tensor pooled = at::empty({in.N, 2, in.H, in.W}, options);
  at::Tensor argmax = at::empty({in.N, in.H, in.W}, options.dtype(at::kLong));
  at::Tensor count = at::empty({in.N, in.H, in.W}, options.dtype(at::kInt));
  if (in.x.numel() == 0) return {pooled, argmax, count};

  FASTATTN_DISPATCH_FLOAT_HALF_BFLOAT16(in.x.scalar_type(), "gated_spatial_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* pooled_ptr = pooled.data_ptr<scalar_t>();
    // pooled[n, 0, p] = mean, pooled[n, 1, p] = max
    const PoolWriter<scalar_t> writer{pooled_ptr, pooled_ptr + in.HW, 2 * in.HW, argmax.data_ptr<int64_t>(),
                                      count.data_ptr<int32_t>(), in.HW, in.C};
    const scalar_t* x = in.x.const_data_ptr<scalar_t>();
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    if (in.channels_last) {  // reduce over c = k, keep p = o
      reduce_rows<PoolState<acc_t>>(x, GateTransform<scalar_t, true>{g, in.C}, writer, in.N, in.HW, in.C);
    } else {  // reduce over c = o, keep p = k
      reduce_columns<PoolState<acc_t>>(in.x, x, GateTransform<scalar_t, false>{g, in.C}, writer, in.N, in.C, in.HW);
    }
  });
  return {pooled, argmax, count};
}

at::Tensor cbam_apply_cuda(const at::Tensor& x_arg, const at::Tensor& ch_gate_arg, const at::Tensor& sp_gate_arg) {
  constexpr const char* op = "cbam_apply";
  const CbamInput in = prepare_x(x_arg, op);
  const c10::cuda::CUDAGuard device_guard(in.x.device());
  const at::Tensor ch_gate = small_operand(ch_gate_arg, in, op, "ch_gate", in.N * in.C, in.x.scalar_type());
  const at::Tensor sp_gate = small_operand(sp_gate_arg, in, op, "sp_gate", in.N * in.HW, in.x.scalar_type());
  at::Tensor y = at::empty(in.x.sizes(), in.x.options().memory_format(in.memory_format()));
  if (in.x.numel() == 0) return y;

  FASTATTN_DISPATCH_FLOAT_HALF_BFLOAT16(in.x.scalar_type(), "cbam_apply_cuda", [&] {
    const scalar_t* x = in.x.const_data_ptr<scalar_t>();
    const scalar_t* ch = ch_gate.const_data_ptr<scalar_t>();
    const scalar_t* sp = sp_gate.const_data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    if (in.channels_last) {
      launch_elementwise(in, x, out, ApplyOp<scalar_t, true>{ch, sp, in.C, in.HW}, true);
    } else {
      launch_elementwise(in, x, out, ApplyOp<scalar_t, false>{ch, sp, in.C, in.HW}, true);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> cbam_apply_backward_cuda(const at::Tensor& grad_y_arg, const at::Tensor& x_arg,
                                                            const at::Tensor& ch_gate_arg,
                                                            const at::Tensor& sp_gate_arg) {
  constexpr const char* op = "cbam_apply_backward";
  const CbamInput in = prepare_x(x_arg, op);
  const c10::cuda::CUDAGuard device_guard(in.x.device());
  const at::Tensor grad_y = x_sized_operand(grad_y_arg, in, op, "grad_y");
  const at::Tensor ch_gate = small_operand(ch_gate_arg, in, op, "ch_gate", in.N * in.C, in.x.scalar_type());
  const at::Tensor sp_gate = small_operand(sp_gate_arg, in, op, "sp_gate", in.N * in.HW, in.x.scalar_type());
  const auto options = in.x.options();
  if (in.x.numel() == 0) {  // empty sums
    return {at::zeros({in.N, in.C}, options), at::zeros({in.N, in.H, in.W}, options)};
  }
  at::Tensor grad_ch = at::empty({in.N, in.C}, options);
  at::Tensor grad_sp = at::empty({in.N, in.H, in.W}, options);

  FASTATTN_DISPATCH_FLOAT_HALF_BFLOAT16(in.x.scalar_type(), "cbam_apply_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t outer = in.outer();
    const int64_t inner = in.inner();
    const ColumnPlan plan = plan_columns(in.N, outer, inner);
    const auto acc_options = options.dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor partial_inner = at::empty({in.N, plan.num_splits, inner}, acc_options);
    const at::Tensor partial_outer = at::empty({in.N, outer, plan.num_tiles}, acc_options);
    const scalar_t* ch = ch_gate.const_data_ptr<scalar_t>();
    const scalar_t* sp = sp_gate.const_data_ptr<scalar_t>();
    const scalar_t* inner_gate = in.channels_last ? ch : sp;
    const scalar_t* outer_gate = in.channels_last ? sp : ch;
    const unsigned int blocks = grid_size(in.N * plan.num_tiles * plan.num_splits, op);
    cbam_apply_backward_partial_kernel<scalar_t, acc_t>
        <<<blocks, dim3(kColTileWidth, kColTileRows), 0, at::cuda::getCurrentCUDAStream()>>>(
            grad_y.const_data_ptr<scalar_t>(), in.x.const_data_ptr<scalar_t>(), inner_gate, outer_gate,
            partial_inner.data_ptr<acc_t>(), partial_outer.data_ptr<acc_t>(), outer, inner, plan.num_tiles,
            plan.num_splits, plan.rows_per_split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scalar_t* grad_inner = (in.channels_last ? grad_ch : grad_sp).data_ptr<scalar_t>();
    scalar_t* grad_outer = (in.channels_last ? grad_sp : grad_ch).data_ptr<scalar_t>();
    sum_partials<scalar_t, acc_t>(partial_inner, grad_inner, in.N, plan.num_splits, inner);
    sum_partials<scalar_t, acc_t>(partial_outer, grad_outer, in.N * outer, plan.num_tiles, 1);
  });
  return {grad_ch, grad_sp};
}

at::Tensor gated_spatial_pool_backward_gate_cuda(const at::Tensor& grad_pooled_arg, const at::Tensor& x_arg,
                                                 const at::Tensor& gate_arg, const at::Tensor& pooled_arg,
                                                 const at::Tensor& argmax_arg, const at::Tensor& count_arg,
                                                 bool split_ties) {
  constexpr const char* op = "gated_spatial_pool_backward_gate";
  const CbamInput in = prepare_x(x_arg, op);
  const c10::cuda::CUDAGuard device_guard(in.x.device());
  const auto dtype = in.x.scalar_type();
  const at::Tensor gate = small_operand(gate_arg, in, op, "gate", in.N * in.C, dtype);
  const at::Tensor grad_pooled = small_operand(grad_pooled_arg, in, op, "grad_pooled", in.N * 2 * in.HW, dtype);
  const at::Tensor pooled = small_operand(pooled_arg, in, op, "pooled", in.N * 2 * in.HW, dtype);
  const at::Tensor argmax = small_operand(argmax_arg, in, op, "argmax", in.N * in.HW, at::kLong);
  const at::Tensor count = small_operand(count_arg, in, op, "count", in.N * in.HW, at::kInt);
  if (in.x.numel() == 0) return at::zeros({in.N, in.C}, gate.options());  // empty sums
  at::Tensor grad_gate = at::empty({in.N, in.C}, gate.options());

  FASTATTN_DISPATCH_FLOAT_HALF_BFLOAT16(dtype, "gated_spatial_pool_backward_gate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SumWriter<scalar_t> writer{grad_gate.data_ptr<scalar_t>(), in.C};
    const scalar_t* x = in.x.const_data_ptr<scalar_t>();
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad_pooled.const_data_ptr<scalar_t>();
    const scalar_t* pl = pooled.const_data_ptr<scalar_t>();
    const int64_t* am = argmax.const_data_ptr<int64_t>();
    const int32_t* cnt = count.const_data_ptr<int32_t>();
    if (in.channels_last) {  // reduce over p = o, keep c = k
      const BackwardGateTransform<scalar_t, true> transform{g, gp, pl, am, cnt, in.C, in.HW, split_ties};
      reduce_columns<SumState<acc_t>>(in.x, x, transform, writer, in.N, in.HW, in.C);
    } else {  // reduce over p = k, keep c = o
      const BackwardGateTransform<scalar_t, false> transform{g, gp, pl, am, cnt, in.C, in.HW, split_ties};
      reduce_rows<SumState<acc_t>>(x, transform, writer, in.N, in.C, in.HW);
    }
  });
  return grad_gate;
}

at::Tensor cbam_grad_x_cuda(const at::Tensor& x_arg, const std::optional<at::Tensor>& grad_y_arg,
                            const std::optional<at::Tensor>& ch_gate_arg, const std::optional<at::Tensor>& sp_gate_arg,
                            const std::optional<at::Tensor>& grad_pooled_arg,
                            const std::optional<at::Tensor>& pooled_arg,
                            const std::optional<at::Tensor>& sp_argmax_arg,
                            const std::optional<at::Tensor>& sp_count_arg,
                            const std::optional<at::Tensor>& grad_avg_arg,
                            const std::optional<at::Tensor>& grad_max_arg, const std::optional<at::Tensor>& ch_max_arg,
                            const std::optional<at::Tensor>& ch_argmax_arg,
                            const std::optional<at::Tensor>& ch_count_arg, bool split_ties) {
  constexpr const char* op = "cbam_grad_x";
  const CbamInput in = prepare_x(x_arg, op);
  const c10::cuda::CUDAGuard device_guard(in.x.device());
  const auto dtype = in.x.scalar_type();
  const int64_t NC = in.N * in.C;
  const int64_t NHW = in.N * in.HW;
  // each present term's inputs, checked and made contiguous; undefined when absent
  at::Tensor grad_y, ch_gate, sp_gate, grad_pooled, pooled, sp_argmax, sp_count, grad_avg, grad_max, ch_max, ch_argmax,
      ch_count;
  if (grad_y_arg.has_value()) {
    grad_y = x_sized_operand(*grad_y_arg, in, op, "grad_y");
    ch_gate = small_operand(required(ch_gate_arg, op, "ch_gate", "grad_y"), in, op, "ch_gate", NC, dtype);
    sp_gate = small_operand(required(sp_gate_arg, op, "sp_gate", "grad_y"), in, op, "sp_gate", NHW, dtype);
  }
  if (grad_pooled_arg.has_value()) {
    const char* by = "grad_pooled";
    grad_pooled = small_operand(*grad_pooled_arg, in, op, "grad_pooled", 2 * NHW, dtype);
    ch_gate = small_operand(required(ch_gate_arg, op, "ch_gate", by), in, op, "ch_gate", NC, dtype);
    pooled = small_operand(required(pooled_arg, op, "pooled", by), in, op, "pooled", 2 * NHW, dtype);
    sp_argmax = small_operand(required(sp_argmax_arg, op, "sp_argmax", by), in, op, "sp_argmax", NHW, at::kLong);
    sp_count = small_operand(required(sp_count_arg, op, "sp_count", by), in, op, "sp_count", NHW, at::kInt);
  }
  if (grad_avg_arg.has_value()) {
    grad_avg = small_operand(*grad_avg_arg, in, op, "grad_avg", NC, dtype);
  }
  if (grad_max_arg.has_value()) {
    const char* by = "grad_max";
    grad_max = small_operand(*grad_max_arg, in, op, "grad_max", NC, dtype);
    ch_max = small_operand(required(ch_max_arg, op, "ch_max", by), in, op, "ch_max", NC, dtype);
    ch_argmax = small_operand(required(ch_argmax_arg, op, "ch_argmax", by), in, op, "ch_argmax", NC, at::kLong);
    ch_count = small_operand(required(ch_count_arg, op, "ch_count", by), in, op, "ch_count", NC, at::kInt);
  }
  at::Tensor grad_x = at::empty(in.x.sizes(), in.x.options().memory_format(in.memory_format()));
  if (in.x.numel() == 0) return grad_x;

  FASTATTN_DISPATCH_FLOAT_HALF_BFLOAT16(dtype, "cbam_grad_x_cuda", [&] {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
    const int64_t* sp_argmax_ptr = sp_argmax.defined() ? sp_argmax.const_data_ptr<int64_t>() : nullptr;
    const int32_t* sp_count_ptr = sp_count.defined() ? sp_count.const_data_ptr<int32_t>() : nullptr;
    const int64_t* ch_argmax_ptr = ch_argmax.defined() ? ch_argmax.const_data_ptr<int64_t>() : nullptr;
    const int32_t* ch_count_ptr = ch_count.defined() ? ch_count.const_data_ptr<int32_t>() : nullptr;
    const scalar_t* grad_y_ptr = ptr(grad_y);
    const bool grad_y_aligned = grad_y_ptr == nullptr || is_aligned_16(grad_y_ptr);
    const scalar_t* x = in.x.const_data_ptr<scalar_t>();
    scalar_t* out = grad_x.data_ptr<scalar_t>();
    if (in.channels_last) {
      const GradXOp<scalar_t, true> grad_op{grad_y_ptr,   ptr(ch_gate),    ptr(sp_gate), ptr(grad_pooled),
                                            ptr(pooled),  sp_argmax_ptr,   sp_count_ptr, ptr(grad_avg),
                                            ptr(grad_max), ptr(ch_max),    ch_argmax_ptr, ch_count_ptr,
                                            in.C,         in.HW,           split_ties};
      launch_elementwise(in, x, out, grad_op, grad_y_aligned);
    } else {
      const GradXOp<scalar_t, false> grad_op{grad_y_ptr,   ptr(ch_gate),    ptr(sp_gate), ptr(grad_pooled),
                                             ptr(pooled),  sp_argmax_ptr,   sp_count_ptr, ptr(grad_avg),
                                             ptr(grad_max), ptr(ch_max),    ch_argmax_ptr, ch_count_ptr,
                                             in.C,         in.HW,           split_ties};
      launch_elementwise(in, x, out, grad_op, grad_y_aligned);
    }
  });
  return grad_x;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("channel_pool", &fastattn::channel_pool_cuda);
  m.impl("gated_spatial_pool", &fastattn::gated_spatial_pool_cuda);
  m.impl("cbam_apply", &fastattn::cbam_apply_cuda);
  m.impl("cbam_apply_backward", &fastattn::cbam_apply_backward_cuda);
  m.impl("gated_spatial_pool_backward_gate", &fastattn::gated_spatial_pool_backward_gate_cuda);
  m.impl("cbam_grad_x", &fastattn::cbam_grad_x_cuda);
}
