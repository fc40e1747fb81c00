// Device pieces of the CBAM kernels (kernels.cuh): launch geometry, vector loads, the two
// layouts, the reduction states and their warp reductions, and the Transform / Writer functors the
// generic reductions are written over. Included by csrc/cuda/cbam.cu only: everything here lives in
// that translation unit's anonymous namespace.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <limits>
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

}  // namespace
}  // namespace fastattn
