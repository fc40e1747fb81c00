// The gradient weights of the max pools, shared by the CBAM backward ops (cbam_backward.cpp,
// cbam_grad_x.cpp).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include "cbam_layout.h"

#include <vector>

namespace fastattn {
namespace cpu {

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

// Per-position terms of the spatial pool's gradient, each N*H*W (+ a vector of padding): grad_mean / C,
// the max pool's hit and miss weights (max_grad_weights) and the max itself; and the tie counts they
// were made from.
// Making them checks grad_pooled, pooled and count (shapes, dtypes).
template <typename acc>
struct SpatialPoolTerms {
  std::vector<acc> mean_grad, max_hit, max_miss, max_value;
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
      t.mean_grad[i] = gp[2 * n * d.HW + hw] / channels;
      max_grad_weights(gp[(2 * n + 1) * d.HW + hw], cnt_p[i], split_ties, t.max_hit[i], t.max_miss[i]);
      t.max_value[i] = pl[(2 * n + 1) * d.HW + hw];
    }
  }
  return t;
}


}  // namespace cpu
}  // namespace fastattn
