// CPU kernels of cbam_spatial_conv and cbam_spatial_conv_weight_grad: the spatial gate's k x k conv.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "cbam_layout.h"
#include "spatial_conv.h"
#include "vec_io.h"

#include <type_traits>
#include <vector>

namespace fastattn {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------
// cbam_spatial_conv and its weight gradient: the spatial gate's k x k conv
// ---------------------------------------------------------------------------
// out[n, o, y, x] = sum over c, i, j of w[o, c, i, j] * x[n, c, y + i - pad_h, x + j - pad_w], zero outside
// x: F.conv2d(x, w, None, stride 1, padding). The CBAM map has 1 or 2 channels in and out, a few
// MFLOP; oneDNN spends more time setting such a conv up than computing it (0.2-0.6 ms per call at
// 8x2x56x56 on a 2-core AVX2 machine, against ~0.1 ms here). Accumulation in float (double for
// double); sums in a fixed order, so results do not depend on the thread count.

// x (N, C, H, W) in the accumulation dtype with pad_h rows and pad_w columns of zeros on each side;
// rows of `row_len` >= W + 2 * pad_w elements, zero past the padding, so that vector loads up to
// row_len never leave the row.
template <typename scalar_t>
std::vector<acc_type<scalar_t>> padded_planes(const Tensor& x, int64_t pad_h, int64_t pad_w, int64_t row_len) {
  const Tensor c = x.contiguous();
  const scalar_t* p = c.const_data_ptr<scalar_t>();
  const int64_t planes = x.size(0) * x.size(1), H = x.size(2), W = x.size(3), Hp = H + 2 * pad_h;
  std::vector<acc_type<scalar_t>> out(planes * Hp * row_len + Vectorized<acc_type<scalar_t>>::size(), 0);
  acc_type<scalar_t>* o = out.data();
  at::parallel_for(0, planes * H, row_grain(W), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* src = p + r * W;
      acc_type<scalar_t>* dst = o + ((r / H) * Hp + r % H + pad_h) * row_len + pad_w;
      for (const auto xx : c10::irange(W)) dst[xx] = static_cast<acc_type<scalar_t>>(src[xx]);
    }
  });
  return out;
}

void check_spatial_conv(const Tensor& x, int64_t channels, int64_t kh, int64_t kw, at::IntArrayRef padding,
                        const char* op) {
  check_x(x, op);
  TORCH_CHECK(x.size(1) == channels, op, ": x must have ", channels, " channels (the weight's), got shape ",
              x.sizes());
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
              ": padding must be two non-negative ints, got ", padding);
  TORCH_CHECK(x.size(2) + 2 * padding[0] >= kh && x.size(3) + 2 * padding[1] >= kw, op, ": a ", kh, "x", kw,
              " kernel does not fit x of shape ", x.sizes(), " padded by ", padding);
}

Tensor cbam_spatial_conv_cpu(const Tensor& x, const Tensor& weight, at::IntArrayRef padding) {
  constexpr const char* op = "cbam_spatial_conv";
  TORCH_CHECK(weight.dim() == 4 && weight.device().is_cpu() && weight.scalar_type() == x.scalar_type(), op,
              ": weight must be a 4-D (out, in, kh, kw) CPU tensor of x's dtype, got ", weight.scalar_type(), " ",
              weight.sizes());
  const int64_t O = weight.size(0), C = weight.size(1), kh = weight.size(2), kw = weight.size(3);
  check_spatial_conv(x, C, kh, kw, padding, op);
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t Ho = H + 2 * padding[0] - kh + 1, Wo = W + 2 * padding[1] - kw + 1;
  Tensor out = at::empty({N, O, Ho, Wo}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using IO = VecIO<scalar_t>;
    using acc = typename IO::acc;
    using fvec = typename IO::fvec;
    constexpr int64_t kN = IO::kN, kVecs = 4;  // output vectors per pass: independent FMA chains
    const int64_t Hp = H + 2 * padding[0], row_len = round_up(Wo, kN) + kw;
    const auto in = padded_planes<scalar_t>(x, padding[0], padding[1], row_len);
    const auto w = param_array<scalar_t>(weight, weight.sizes(), op, "weight");
    scalar_t* out_p = out.data_ptr<scalar_t>();
    at::parallel_for(0, N * O * Ho, row_grain(Wo * C * kh * kw), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / (O * Ho), o = (t / Ho) % O, y = t % Ho;
        scalar_t* out_row = out_p + t * Wo;
        for (int64_t x0 = 0; x0 < Wo; x0 += kN * kVecs) {
          const int64_t vecs = std::min(kVecs, ceil_div(Wo - x0, kN));
          fvec a[kVecs];
          conv_vectors<acc, kVecs>(in.data() + (n * C * Hp + y) * row_len + x0, Hp * row_len, row_len, C, kh, kw,
                                   w.data() + o * C * kh * kw, vecs, a);
          for (int64_t v = 0; v < vecs; ++v) IO::store(out_row + x0 + v * kN, a[v], std::min(kN, Wo - x0 - v * kN));
        }
      }
    });
  });
  return out;
}

// grad_w[o, c, i, j] = sum over n, y, x of grad_out[n, o, y, x] * x[n, c, y + i - pad_h, x + j - pad_w]:
// one task per (o, c, i), its kw sums as independent vector accumulators.
Tensor cbam_spatial_conv_weight_grad_cpu(const Tensor& grad_out, const Tensor& x, int64_t kh, int64_t kw,
                                         at::IntArrayRef padding) {
  constexpr const char* op = "cbam_spatial_conv_weight_grad";
  TORCH_CHECK(kh > 0 && kw > 0, op, ": kernel size must be positive, got ", kh, "x", kw);
  check_spatial_conv(x, x.size(1), kh, kw, padding, op);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = H + 2 * padding[0] - kh + 1, Wo = W + 2 * padding[1] - kw + 1;
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == N && grad_out.size(2) == Ho && grad_out.size(3) == Wo &&
                  grad_out.device().is_cpu() && grad_out.scalar_type() == x.scalar_type(),
              op, ": grad_out must be a CPU tensor of x's dtype and shape (", N, ", out, ", Ho, ", ", Wo, "), got ",
              grad_out.scalar_type(), " ", grad_out.sizes());
  const int64_t O = grad_out.size(1);
  Tensor grad_w = at::empty({O, C, kh, kw}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using IO = VecIO<scalar_t>;
    using acc = typename IO::acc;
    using fvec = typename IO::fvec;
    constexpr int64_t kN = IO::kN;
    const int64_t Hp = H + 2 * padding[0], g_len = round_up(Wo, kN), row_len = g_len + kw;
    const auto in = padded_planes<scalar_t>(x, padding[0], padding[1], row_len);
    const auto g = padded_planes<scalar_t>(grad_out, 0, 0, g_len);  // zeros past Wo
    scalar_t* gw = grad_w.data_ptr<scalar_t>();
    // the kw sums of task t; kKw > 0 makes the kernel width a constant (accumulators in registers)
    auto task = [&](int64_t t, auto kw_const) {
      constexpr int64_t kKw = decltype(kw_const)::value;
      const int64_t width = kKw > 0 ? kKw : kw;
      const int64_t o = t / (C * kh), c = (t / kh) % C, i = t % kh;
      fvec fixed[kKw > 0 ? kKw : 1];
      std::vector<fvec> any(kKw > 0 ? 0 : kw);
      fvec* a = kKw > 0 ? fixed : any.data();
      for (const auto j : c10::irange(width)) a[j] = fvec(acc(0));
      for (const auto n : c10::irange(N))
        for (const auto y : c10::irange(Ho)) {
          const acc* g_row = g.data() + ((n * O + o) * Ho + y) * g_len;
          const acc* in_row = in.data() + ((n * C + c) * Hp + y + i) * row_len;
          for (int64_t x0 = 0; x0 < g_len; x0 += kN) {
            const fvec gv = fvec::loadu(g_row + x0);
            for (const auto j : c10::irange(width)) a[j] = at::vec::fmadd(gv, fvec::loadu(in_row + x0 + j), a[j]);
          }
        }
      for (const auto j : c10::irange(width)) gw[t * kw + j] = static_cast<scalar_t>(hsum(a[j]));
    };
    at::parallel_for(0, O * C * kh, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        switch (kw) {
          case 7: task(t, std::integral_constant<int64_t, 7>{}); break;
          case 5: task(t, std::integral_constant<int64_t, 5>{}); break;
          case 3: task(t, std::integral_constant<int64_t, 3>{}); break;
          default: task(t, std::integral_constant<int64_t, 0>{});
        }
      }
    });
  });
  return grad_w;
}


}  // namespace
}  // namespace cpu
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("cbam_spatial_conv", &fastattn::cpu::cbam_spatial_conv_cpu);
  m.impl("cbam_spatial_conv_weight_grad", &fastattn::cpu::cbam_spatial_conv_weight_grad_cpu);
}
