// CPU kernels of the CBAM forward ops: channel_pool, gated_spatial_pool, cbam_apply. Layouts and
// the task grid: cbam_layout.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "cbam_layout.h"
#include "cbam_pool_apply.h"
#include "row_reduce.h"
#include "vec_io.h"

#include <tuple>

namespace fastattn {
namespace cpu {
namespace {

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


}  // namespace
}  // namespace cpu
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("channel_pool", &fastattn::cpu::channel_pool_cpu);
  m.impl("gated_spatial_pool", &fastattn::cpu::gated_spatial_pool_cpu);
  m.impl("cbam_apply", &fastattn::cpu::cbam_apply_cpu);
}
