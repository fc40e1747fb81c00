// CPU kernel of cbam_forward_eval: the whole CBAM block at inference, in two passes over x.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "cbam_layout.h"
#include "cbam_pool_apply.h"
#include "row_reduce.h"
#include "spatial_conv.h"
#include "vec_io.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <optional>
#include <vector>

namespace fastattn {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------
// cbam_forward_eval: the whole block at inference, in two passes over x
// ---------------------------------------------------------------------------
// With BatchNorm on its running statistics nothing couples the images, and the spatial gate of a
// row of the map needs only the pooled rows within the conv's reach. So after pass 1 (the channel
// pool) and the shared MLP, pass 2 walks each image's rows in bands: it pools the band's rows over
// channels (with the rows below it that the conv reaches), makes the band's gate (conv, BN,
// sigmoid), and applies both gates to the band while its rows are still in L2. x is read from
// memory twice and y written once, against three reads for the op-by-op forward; no pooled map or
// gate tensor is made, and the small parts cost no op calls. Where the MLP is small beside an image
// and there are images enough for every thread (NCHW), each task pools its image's channels, runs
// the image's MLP and walks the image at once: pass 2 finds the image in cache (an image of a
// ResNet stage is 1-3 MB, the L2 and L3 hold it) and x is read from memory once, in one parallel
// region.
//
// Every value is rounded to x's dtype where the op-by-op forward stores a tensor of that dtype;
// pooling, conv and apply sum in the same order as channel_pool, gated_spatial_pool,
// cbam_spatial_conv and cbam_apply, and the MLP's Linear layers are the same PyTorch ops. The two
// paths differ only in how BatchNorm's scale and shift meet (one multiply-add here), in the last
// bit of exp (both sigmoids) and, where the MLP runs per image, in the Linear layers' last bits
// (a matrix product of 2 rows need not sum as one of 2N rows does).

// The spatial gate's parameters: conv weight (Cin, kh, kw) and BatchNorm folded to a scale and shift
template <typename acc>
struct EvalSpatial {
  std::vector<acc> conv_w;
  acc bn_scale = 1, bn_shift = 0;
};

// Pass 2 over the images' rows in bands (see above). cg: N*C channel gates, padded by a vector.
// y_p may be x itself (the in-place op): a band's rows are written only after every row of its
// conv's reach below it is pooled, and the rows of a chunk's reach that a neighbouring chunk
// writes (its halo) are pooled for every chunk before any chunk writes (prepool), so no row of x
// is read after it was overwritten.
// With `channel_gate_of` the walk makes each image's channel gates itself, by calling it with the
// image before its first band (one task per image then): see cbam_forward_eval_into.
template <typename scalar_t>
void eval_spatial_pass(const Dense& d, int64_t H, int64_t W, const EvalSpatial<acc_type<scalar_t>>& p, int64_t kh,
                       int64_t kw, int64_t ph, int64_t pw, bool light, bool max_first, const acc_type<scalar_t>* cg,
                       scalar_t* y_p, const std::function<void(int64_t)>& channel_gate_of = nullptr) {
  using IO = VecIO<scalar_t>;
  using acc = typename IO::acc;
  using fvec = typename IO::fvec;
  constexpr int64_t kN = IO::kN, kVecs = 4;
  const int64_t C = d.C, HW = d.HW, cin = light ? 1 : 2;
  const scalar_t* x_p = d.t.const_data_ptr<scalar_t>();
  const scalar_t* end = x_p + d.t.numel();
  const int64_t lane_tile = max_lane_tile();
  // bands of about eval_band() bytes of x (at least a few vectors per channel), so that a band, the
  // conv's reach pooled ahead of it and its share of y stay in L2; images split into row chunks
  // only to feed every thread (a chunk pools the conv's reach past its edges once more)
  const int64_t band = std::clamp<int64_t>(
      std::max(ceil_div(8 * kN, W), eval_band() / std::max<int64_t>(1, C * W * int64_t(sizeof(scalar_t)))), 1,
      std::min(H, lane_tile / W + 1));
  int64_t chunks = channel_gate_of ? 1 : std::clamp<int64_t>(ceil_div(2 * at::get_num_threads(), d.N), 1, ceil_div(H, band));
  const int64_t chunk_rows = ceil_div(H, chunks);
  chunks = ceil_div(H, chunk_rows);
  const int64_t buf_rows = chunk_rows + 2 * ph, row_len = round_up(W, kN) + kw;
  const int64_t in_size = cin * buf_rows * row_len + kN;
  const acc channels = acc(C);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C * chunk_rows * W));  // small: one thread
  // pooled (mean, max) of rows [row_begin, row_end) of image n into `in`, the conv input rows
  // [c0 - ph, c0 + chunk_rows + ph) of the chunk starting at row c0, with pw zeros left of each
  // row and zeros past it, as the flavour takes them
  auto pool = [&](acc* in, int64_t n, int64_t c0, int64_t row_begin, int64_t row_end, LaneStates<acc>& st) {
    const acc* cg_n = cg + n * C;
    auto put = [&](int64_t pos, acc sum, acc max) {
      const acc mean = IO::round(sum / channels), mx = IO::round(max);
      acc* at0 = in + (pos / W - c0 + ph) * row_len + pw + pos % W;
      if (light) {
        at0[0] = IO::round(IO::round(acc(0.5) * mean) + IO::round(acc(0.5) * mx));
      } else {
        at0[0] = max_first ? mx : mean;
        at0[buf_rows * row_len] = max_first ? mean : mx;
      }
    };
    for (int64_t pos0 = row_begin * W; pos0 < row_end * W; pos0 += lane_tile) {
      const int64_t len = std::min(lane_tile, row_end * W - pos0);
      if (d.channels_last) {
        for (const auto l : c10::irange(len)) {
          const auto s = reduce_contiguous<scalar_t, true, false>(x_p + (n * HW + pos0 + l) * C, cg_n, C, end);
          put(pos0 + l, s.sum, s.max);
        }
      } else {
        reduce_rows<scalar_t, false>(x_p + n * C * HW + pos0, HW, C, len, cg_n, end, st);
        for (const auto l : c10::irange(len)) put(pos0 + l, st.sum[l], st.max[l]);
      }
    }
  };
  // in place with several chunks per image: each chunk's conv input buffer, its halo rows pooled
  // in a first parallel pass (the chunks' other rows are pooled by the band walk)
  const bool prepool = y_p == x_p && chunks > 1;
  std::vector<acc> chunk_inputs(prepool ? d.N * chunks * in_size : 0, acc(0));
  if (prepool) {
    at::parallel_for(0, d.N * chunks, grain, [&](int64_t begin, int64_t stop) {
      LaneStates<acc> st;
      for (int64_t t = begin; t < stop; ++t) {
        const int64_t n = t / chunks, c0 = (t % chunks) * chunk_rows, c1 = std::min(H, c0 + chunk_rows);
        acc* in = chunk_inputs.data() + t * in_size;
        pool(in, n, c0, std::max<int64_t>(0, c0 - ph), c0, st);
        pool(in, n, c0, c1, std::min(H, c1 + ph), st);
      }
    });
  }
  at::parallel_for(0, d.N * chunks, grain, [&](int64_t begin, int64_t stop) {
    std::vector<acc> own_input(prepool ? 0 : in_size);
    std::vector<acc> sg(round_up(band * W, kN) + kN, 0);
    LaneStates<acc> st;
    for (int64_t t = begin; t < stop; ++t) {
      const int64_t n = t / chunks, c0 = (t % chunks) * chunk_rows, c1 = std::min(H, c0 + chunk_rows);
      if (channel_gate_of) channel_gate_of(n);
      const acc* cg_n = cg + n * C;
      acc* in = prepool ? chunk_inputs.data() + t * in_size : own_input.data();
      if (!prepool) std::fill(own_input.begin(), own_input.end(), acc(0));
      // rows pooled so far, and the last row this walk pools (the halo past c1 is pooled already)
      int64_t pooled_to = prepool ? c0 : std::max<int64_t>(0, c0 - ph);
      const int64_t pool_end = prepool ? c1 : H;
      for (int64_t r = c0; r < c1; r += band) {
        const int64_t r_end = std::min(c1, r + band);
        const int64_t need = std::min(pool_end, r_end + ph);
        pool(in, n, c0, pooled_to, need, st);
        pooled_to = std::max(pooled_to, need);
        // the band's gate: conv (cbam_spatial_conv's sum order), BN on running stats, sigmoid
        for (int64_t yy = r; yy < r_end; ++yy) {
          for (int64_t x0 = 0; x0 < W; x0 += kN * kVecs) {
            const int64_t vecs = std::min(kVecs, ceil_div(W - x0, kN));
            fvec a[kVecs];
            conv_vectors<acc, kVecs>(in + (yy - c0) * row_len + x0, buf_rows * row_len, row_len, cin, kh, kw,
                                     p.conv_w.data(), vecs, a);
            for (int64_t v = 0; v < vecs; ++v) {
              const fvec normed = IO::round(IO::round(a[v]) * fvec(p.bn_scale) + fvec(p.bn_shift));
              const fvec gate = IO::round((fvec(acc(1)) + (fvec(acc(0)) - normed).exp()).reciprocal());
              gate.store(sg.data() + (yy - r) * W + x0 + v * kN);  // lanes past W are overwritten or unread
            }
          }
        }
        // both gates onto the band's rows, still in L2 from the pooling
        if (d.channels_last) {
          for (int64_t pos = r * W; pos < r_end * W; ++pos) {
            const int64_t i = n * HW + pos;
            apply_row<scalar_t, false>(x_p + i * C, y_p + i * C, C, sg[pos - r * W], cg_n, true, end);
          }
        } else {
          // y's rows of the band are short segments a plane apart, too short for the hardware
          // prefetchers: each is prefetched for writing a few KB ahead (the whole op at 8x256x56x56:
          // 2.95 -> 2.10 ms, best of 60 on 2 threads)
          const int64_t seg = (r_end - r) * W;
          const int64_t ahead = std::clamp<int64_t>(ceil_div(kSegmentAhead, seg * int64_t(sizeof(scalar_t))), 2, 32);
          for (const auto c : c10::irange(C)) {
            const int64_t off = (n * C + c) * HW + r * W;
            if (c + ahead < C) prefetch_segment_for_write(y_p + off + ahead * HW, seg);
            apply_row<scalar_t, false>(x_p + off, y_p + off, seg, cg_n[c], sg.data(), false, end);
          }
        }
      }
    }
  });
}

// w as a (rows, cols) matrix: a Linear weight, or a 1x1 conv's (rows, cols, 1, 1)
Tensor as_matrix(const Tensor& w, int64_t rows, int64_t cols, at::ScalarType dtype, const char* op, const char* name) {
  const bool shape_ok = (w.dim() == 2 || (w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1)) && w.size(0) == rows &&
                        w.size(1) == cols;
  TORCH_CHECK(shape_ok && w.device().is_cpu() && w.scalar_type() == dtype, op, ": ", name,
              " must be a CPU tensor of x's dtype ", dtype, " and shape (", rows, ", ", cols, ") or (", rows, ", ",
              cols, ", 1, 1), got ", w.scalar_type(), " of shape ", w.sizes(), " on ", w.device());
  return w.reshape({rows, cols});
}

// one value of a (1,) BatchNorm parameter or statistic, in the accumulation type; `fallback` when absent
double bn_value(const std::optional<Tensor>& t, double fallback, const char* op, const char* name) {
  if (!t) return fallback;
  TORCH_CHECK(t->device().is_cpu() && at::isFloatingType(t->scalar_type()) && t->numel() == 1, op, ": ", name,
              " must be a floating CPU tensor of one value (the spatial gate has one channel), got ",
              t->scalar_type(), " of shape ", t->sizes(), " on ", t->device());
  return t->item<double>();
}

// The channel gate from the pooled (N, C) vectors, rounded to scalar_t: sigmoid(mlp(avg) +
// mlp(max)), or with light sigmoid(mlp(0.5 * avg + 0.5 * max)); mlp(v) = w2 relu(w1 v + b1) + b2.
// The two Linear layers are PyTorch's, on the same values as the op-by-op forward; the small steps
// between them are loops here, rounded where PyTorch stores a tensor. (Six small ATen ops less:
// right after pass 1 each costs 5-10 us with the interpreter's and ATen's data out of cache.)
template <typename scalar_t>
std::vector<acc_type<scalar_t>> eval_channel_gate(const acc_type<scalar_t>* avg, const acc_type<scalar_t>* mx,
                                                  int64_t N, int64_t C,
                                                  const Tensor& w1m, const std::optional<Tensor>& b1,
                                                  const Tensor& w2m, const std::optional<Tensor>& b2, bool light) {
  using IO = VecIO<scalar_t>;
  using acc = typename IO::acc;
  const int64_t R = light ? N : 2 * N;  // the MLP's input rows: avg then max, or their blend
  Tensor in = at::empty({R, C}, w1m.options());
  scalar_t* in_p = in.data_ptr<scalar_t>();
  for (const auto i : c10::irange(N * C)) {
    if (light) {
      in_p[i] = static_cast<scalar_t>(IO::round(acc(0.5) * avg[i]) + IO::round(acc(0.5) * mx[i]));
    } else {
      in_p[i] = static_cast<scalar_t>(avg[i]);
      in_p[N * C + i] = static_cast<scalar_t>(mx[i]);
    }
  }
  Tensor h = at::linear(in, w1m, b1).contiguous();
  scalar_t* h_p = h.data_ptr<scalar_t>();
  for (const auto i : c10::irange(h.numel())) h_p[i] = h_p[i] < scalar_t(0) ? scalar_t(0) : h_p[i];  // keeps NaN
  const Tensor out = at::linear(h, w2m, b2).contiguous();
  const scalar_t* out_p = out.const_data_ptr<scalar_t>();
  std::vector<acc> gate(N * C + IO::kN, 0);
  for (const auto i : c10::irange(N * C)) {
    const acc pre = light ? acc(out_p[i]) : IO::round(acc(out_p[i]) + acc(out_p[N * C + i]));
    gate[i] = IO::round(acc(1) / (acc(1) + std::exp(-pre)));
  }
  return gate;
}

// The MLP runs per image where an image has at least this many elements per MLP weight: the
// weights, read once per image then, stay a small part of the traffic
constexpr int64_t kImagePerWeight = 8;

// The block's output into y (x-sized, of d's dense layout; x's own memory for the in-place op)
void cbam_forward_eval_into(const char* op, const Dense& d, const Tensor& x, const Tensor& w1,
                            const std::optional<Tensor>& b1, const Tensor& w2, const std::optional<Tensor>& b2,
                            const std::optional<Tensor>& conv_w, const std::optional<Tensor>& bn_weight,
                            const std::optional<Tensor>& bn_bias, const std::optional<Tensor>& bn_mean,
                            const std::optional<Tensor>& bn_var, double bn_eps, at::IntArrayRef padding, bool light,
                            bool max_first, const Tensor& y) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(d.C > 0 && d.HW > 0, op, ": C and H*W must be positive, got shape ", x.sizes());
  // hidden may be 0: the official MLP has C // reduction hidden units, 0 when reduction > C, and
  // then computes b2 alone (PyTorch's Linear takes empty weights)
  TORCH_CHECK(w1.dim() >= 2, op, ": w1 must be (hidden, C) or (hidden, C, 1, 1), got shape ", w1.sizes());
  const int64_t hidden = w1.size(0), H = x.size(2), W = x.size(3);
  const Tensor w1m = as_matrix(w1, hidden, d.C, dtype, op, "w1");
  const Tensor w2m = as_matrix(w2, d.C, hidden, dtype, op, "w2");
  auto check_bias = [&](const std::optional<Tensor>& t, int64_t size, const char* name) {
    TORCH_CHECK(!t || (t->device().is_cpu() && t->scalar_type() == dtype && t->dim() == 1 && t->size(0) == size), op,
                ": ", name, " must be a CPU tensor of x's dtype ", dtype, " and shape (", size, "), got ",
                t->scalar_type(), " of shape ", t->sizes(), " on ", t->device());
  };
  check_bias(b1, hidden, "b1");
  check_bias(b2, d.C, "b2");
  const bool spatial = conv_w.has_value();
  TORCH_CHECK(spatial == (bn_mean.has_value() && bn_var.has_value()) &&
                  (spatial || (!bn_weight.has_value() && !bn_bias.has_value())),
              op, ": the spatial gate takes conv_w with bn_mean and bn_var (bn_weight, bn_bias optional); ",
              "without conv_w (no spatial gate) all of them are None");
  const int64_t cin = light ? 1 : 2;
  int64_t kh = 0, kw = 0;
  if (spatial) {
    TORCH_CHECK(conv_w->dim() == 4 && conv_w->size(0) == 1 && conv_w->size(1) == cin, op, ": conv_w must be (1, ",
                cin, ", kh, kw), got shape ", conv_w->sizes());
    kh = conv_w->size(2);
    kw = conv_w->size(3);
    TORCH_CHECK(padding.size() == 2 && kh == 2 * padding[0] + 1 && kw == 2 * padding[1] + 1, op,
                ": the spatial conv must keep the map's size (kernel 2 * padding + 1), got a ", kh, "x", kw,
                " kernel with padding ", padding);
    TORCH_CHECK(bn_eps >= 0, op, ": bn_eps must be non-negative, got ", bn_eps);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "cbam_forward_eval", [&] {
    using acc = acc_type<scalar_t>;
    constexpr int64_t kN = VecIO<scalar_t>::kN;
    // Where the MLP's weights are small beside an image, each image's MLP runs on that image's rows
    // alone (the shape decides, not the thread count, so the bits do not depend on it). Then, given
    // an image per task for every thread (NCHW), the band walk pools each image's channels right
    // before walking it: pass 2 re-reads the image from cache, and x comes from memory once.
    const bool mlp_per_image = (w1m.numel() + w2m.numel()) * kImagePerWeight <= d.C * d.HW;
    const bool pipelined = spatial && mlp_per_image && !d.channels_last && d.N >= 2 * at::get_num_threads();
    std::vector<acc> avg(d.N * d.C), mx(d.N * d.C), cg(d.N * d.C + kN, acc(0));
    const acc len = acc(d.HW);
    auto pooled = [&](int64_t nc, const MaxStats<acc>& s) {  // as channel_pool rounds them
      avg[nc] = VecIO<scalar_t>::round(s.sum / len);
      mx[nc] = VecIO<scalar_t>::round(s.max);
    };
    auto gate_of_image = [&](int64_t n) {
      const auto g = eval_channel_gate<scalar_t>(avg.data() + n * d.C, mx.data() + n * d.C, 1, d.C, w1m, b1, w2m,
                                                 b2, light);
      std::copy_n(g.begin(), d.C, cg.begin() + n * d.C);
    };
    // pass 1: the channel pool (sum and max; no argmax at inference), then the MLP
    if (!pipelined) {
      channel_stats<scalar_t, false>(d, pooled);
      if (mlp_per_image) {
        for (const auto n : c10::irange(d.N)) gate_of_image(n);
      } else {
        const auto g = eval_channel_gate<scalar_t>(avg.data(), mx.data(), d.N, d.C, w1m, b1, w2m, b2, light);
        std::copy(g.begin(), g.end(), cg.begin());
      }
    }

    scalar_t* y_p = y.data_ptr<scalar_t>();
    if (!spatial) {  // the channel gate alone
      const std::vector<acc> ones(d.N * d.HW + kN, acc(1));
      apply_gates<scalar_t>(d, cg.data(), ones.data(), y_p);
      return;
    }
    EvalSpatial<acc> p;
    p.conv_w = param_array<scalar_t>(*conv_w, {1, cin, kh, kw}, op, "conv_w");
    // BatchNorm on running statistics as one scale and shift, folded as PyTorch's CPU kernel folds it
    const acc inv_std = acc(1) / std::sqrt(acc(bn_value(bn_var, 1, op, "bn_var")) + acc(bn_eps));
    p.bn_scale = inv_std * acc(bn_value(bn_weight, 1, op, "bn_weight"));
    p.bn_shift = acc(bn_value(bn_bias, 0, op, "bn_bias")) - acc(bn_value(bn_mean, 0, op, "bn_mean")) * p.bn_scale;
    std::function<void(int64_t)> channel_gate_of = nullptr;
    if (pipelined) {
      const scalar_t* x_p = d.t.const_data_ptr<scalar_t>();
      const scalar_t* end = x_p + d.t.numel();
      channel_gate_of = [&, x_p, end](int64_t n) {  // channel_stats' NCHW reduction, one image
        for (int64_t nc = n * d.C; nc < (n + 1) * d.C; ++nc)
          pooled(nc, reduce_contiguous<scalar_t, false, false>(x_p + nc * d.HW, nullptr, d.HW, end));
        gate_of_image(n);
      };
    }
    eval_spatial_pass<scalar_t>(d, H, W, p, kh, kw, padding[0], padding[1], light, max_first, cg.data(), y_p,
                                channel_gate_of);
  });
}

Tensor cbam_forward_eval_cpu(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1, const Tensor& w2,
                             const std::optional<Tensor>& b2, const std::optional<Tensor>& conv_w,
                             const std::optional<Tensor>& bn_weight, const std::optional<Tensor>& bn_bias,
                             const std::optional<Tensor>& bn_mean, const std::optional<Tensor>& bn_var, double bn_eps,
                             at::IntArrayRef padding, bool light, bool max_first) {
  constexpr const char* op = "cbam_forward_eval";
  const Dense d = dense_input(x, op);
  const XSized y(x, d);
  cbam_forward_eval_into(op, d, x, w1, b1, w2, b2, conv_w, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, padding,
                         light, max_first, y.work);
  return y.finish();
}

// In place: y written over x, which must be NCHW- or channels_last-contiguous (no copy to write
// back through, no element stored twice). The band walk never reads a row of x it has written
// (eval_spatial_pass); the small inputs are all read before pass 2 writes.
void cbam_forward_eval_cpu_(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1, const Tensor& w2,
                            const std::optional<Tensor>& b2, const std::optional<Tensor>& conv_w,
                            const std::optional<Tensor>& bn_weight, const std::optional<Tensor>& bn_bias,
                            const std::optional<Tensor>& bn_mean, const std::optional<Tensor>& bn_var, double bn_eps,
                            at::IntArrayRef padding, bool light, bool max_first) {
  constexpr const char* op = "cbam_forward_eval_";
  check_x(x, op);
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": x is written in place and must be contiguous or channels_last contiguous, got shape ", x.sizes(),
              " with strides ", x.strides());
  const Dense d = dense_input(x, op);
  cbam_forward_eval_into(op, d, x, w1, b1, w2, b2, conv_w, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, padding,
                         light, max_first, x);
}


}  // namespace
}  // namespace cpu
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("cbam_forward_eval", &fastattn::cpu::cbam_forward_eval_cpu);
  m.impl("cbam_forward_eval_", &fastattn::cpu::cbam_forward_eval_cpu_);
}
