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
//
// This file is the host side (input preparation, launch plans, the ops). The device code lives in
// cbam/: reduce.cuh (layouts, reduction states, transforms and writers), kernels.cuh (the kernels).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cbam/kernels.cuh"
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

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
