// CPU kernels of spatial attention (docs/DESIGN.md "Spatial attention"; contract:
// fastattn.reference.ref_spatial_attention_forward).
//
// Forward: flash-style. Each task owns (n, head, query block), streams the key
// blocks and keeps an online softmax (running max and sum), so the Lq x Lk
// matrix never exists; it saves the natural log-sum-exp for the backward.
// Backward: recomputes the probabilities from lse (after delta_i = rowsum(dO * O); with few
// float32 queries, and for float64, renormalised by one more pass: softmax_normalisation);
// a task owns a range of key blocks of one (n, head), accumulates dk and dv for
// them and its own partial dq; the few partials per (n, head) are summed in a
// fixed order (no atomics, deterministic).
//
// Tiles are row-major with unit inner stride, the layout the tile GEMM wants.
// The rows a task owns are packed per task into per-thread buffers; the
// streamed operands are packed once per call into block panels (channel-major
// d x block or position-major block x d, see plan_panels), so NCHW, channel-last
// and any other strides are read without a user-visible copy. Tile GEMMs go to
// ATen's cpublas::brgemm (oneDNN / MKL kernels) for float and to a plain loop
// for double (gradcheck only).
//
// Float32 accuracy (tests/test_float32_accuracy.py: at most 2x eager float32's
// error against a float64 truth): dot products are summed in chunks
// (attention_tiles.h), the scale is applied to the unscaled q . k in one FMA
// with the softmax shift, so forward and backward get the same logits
// (attention_softmax.h), the output is divided by the row sum (not multiplied by
// its rounded reciprocal), and lse and delta are rounded once from double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention_softmax.h"
#include "attention_tiles.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastattn::attention_cpu {
namespace {

// ---------------------------------------------------------------------------
// Shapes, checks and outputs
// ---------------------------------------------------------------------------
struct AttentionShape {
  int64_t batch, heads, q_len, k_len, d_qk, d_v;
};

AttentionShape check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            int64_t heads) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": expected CPU tensors, got ", t->device());
    TORCH_CHECK(t->dim() == 3, op, ": q, k, v must be (N, C, L), got a ", t->dim(), "-d tensor");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": q, k, v must share a dtype, got ", q.scalar_type(),
                " and ", t->scalar_type());
  }
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": expected a floating dtype, got ", q.scalar_type());
  TORCH_CHECK(heads > 0 && q.size(1) % heads == 0 && v.size(1) % heads == 0, op, ": heads=", heads,
              " must divide the channels of q (", q.size(1), ") and v (", v.size(1), ")");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) && v.size(2) == k.size(2),
              op, ": inconsistent shapes q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  return {q.size(0), heads, q.size(2), k.size(2), q.size(1) / heads, v.size(1) / heads};
}

// (N, C, L) with like's channel-last-ness: (N, L, C) memory when like.stride(1) == 1 and C > 1.
at::Tensor empty_nchw_like(const at::Tensor& like, int64_t channels, int64_t length) {
  const int64_t batch = like.size(0);
  if (like.stride(1) == 1 && like.size(1) > 1)
    return at::empty({batch, length, channels}, like.options()).transpose(1, 2);
  return at::empty({batch, channels, length}, like.options());
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------
template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                    const at::Tensor& lse, const AttentionShape& s, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale_acc = static_cast<acc_t>(scale);
  const Tiling tiling = choose_tiling(std::max(s.d_qk, s.d_v), s.q_len, s.k_len, s.batch * s.heads);
  const int64_t q_block = tiling.rows, k_block = tiling.stream;
  WorkList packing;
  const auto keys = plan_panels<scalar_t, acc_t>(k, s.heads, Major::Channel, k_block, packing);     // d_qk x keys
  const auto values = plan_panels<scalar_t, acc_t>(v, s.heads, Major::Position, k_block, packing);  // keys x d_v
  packing.run_parallel();
  const int64_t q_blocks = (s.q_len + q_block - 1) / q_block;
  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  float* lse_data = lse.data_ptr<float>();

  at::parallel_for(0, s.batch * s.heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_tile(q_block * s.d_qk), scores(q_block * k_block), probs(q_block * k_block);
    std::vector<acc_t> acc(q_block * s.d_v), row_shift(q_block), row_sum(q_block);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nh = t / q_blocks, n = nh / s.heads, h = nh % s.heads;
      const int64_t i0 = (t % q_blocks) * q_block, mq = std::min(q_block, s.q_len - i0);
      pack_matrix(q_data + n * q.stride(0) + h * s.d_qk * q.stride(1) + i0 * q.stride(2), mq, s.d_qk, q.stride(2),
                  q.stride(1), acc_t(1), q_tile.data(), s.d_qk);
      std::fill(row_shift.begin(), row_shift.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
      for (int64_t j0 = 0; j0 < s.k_len; j0 += k_block) {
        const int64_t nk = std::min(k_block, s.k_len - j0);
        tile_gemm(mq, nk, s.d_qk, q_tile.data(), s.d_qk, keys.tile(nh, j0), keys.ld, scores.data(), k_block, false);
        for (int64_t i = 0; i < mq; ++i) {
          const acc_t rescale = online_softmax_row(scores.data() + i * k_block, probs.data() + i * k_block, nk,
                                                   scale_acc, row_shift[i], row_sum[i]);
          if (j0 > 0 && rescale != acc_t(1)) {
            acc_t* acc_row = acc.data() + i * s.d_v;
            for (int64_t c = 0; c < s.d_v; ++c) acc_row[c] *= rescale;
          }
        }
        tile_gemm(mq, s.d_v, nk, probs.data(), k_block, values.tile(nh, j0), values.ld, acc.data(), s.d_v, j0 > 0);
      }
      float* lse_row = lse_data + nh * s.q_len + i0;
      for (int64_t i = 0; i < mq; ++i)  // rounded once
        lse_row[i] = static_cast<float>(static_cast<double>(row_shift[i]) + std::log(static_cast<double>(row_sum[i])));
      store_matrix</*kDivide=*/true>(acc.data(), s.d_v, mq, s.d_v, row_sum.data(),
                   out_data + n * out.stride(0) + h * s.d_v * out.stride(1) + i0 * out.stride(2), out.stride(2),
                   out.stride(1));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> spatial_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, int64_t heads, double scale) {
  const AttentionShape s = check_inputs("spatial_attention_forward", q, k, v, heads);
  at::Tensor out = empty_nchw_like(q, v.size(1), s.q_len);
  at::Tensor lse = at::empty({s.batch, heads, s.q_len}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (s.k_len == 0) {  // softmax over nothing: logsumexp -inf, weighted sum of no values 0
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "spatial_attention_forward_cpu",
                                  [&] { forward_kernel<scalar_t>(q, k, v, out, lse, s, scale); });
  return {out, lse};
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------
// The backward's softmax normalisation. The probabilities it recomputes, exp(scale * s - lse), are off
// by the rounding of the float32 lse of the op contract: a relative error of up to half an ulp of lse
// (2-5e-7 at lse ~ 5-8, several float32 roundings) shared by the whole row, which eager's float32
// probabilities do not have. Where that error would show (see needs_row_norm), one more pass over the
// keys sums exp(scale * s - lse) per query in double and keeps norm = 1 / sum; the backward then uses
// p = exp(scale * s - lse) * norm, which is exact to a float32 rounding or two, like eager's softmax
// (and exact to double rounding for float64, which gradcheck needs). Returns lse in the accumulation
// dtype and norm (empty where the pass is skipped).
template <typename scalar_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor> softmax_normalisation(const at::Tensor& lse, const at::Tensor& q,
                                                         const at::Tensor& k, const AttentionShape& s,
                                                         double scale, bool with_norm) {
  at::Tensor lse_acc = lse.to(acc_options<acc_t>(lse)).contiguous();
  if (!with_norm) return {lse_acc, at::Tensor()};
  at::Tensor norm = at::empty_like(lse_acc);
  const Tiling tiling = choose_tiling(s.d_qk, s.q_len, s.k_len, s.batch * s.heads);
  const int64_t q_block = tiling.rows, k_block = tiling.stream;
  WorkList packing;
  const auto keys = plan_panels<scalar_t, acc_t>(k, s.heads, Major::Channel, k_block, packing);  // d_qk x keys
  packing.run_parallel();
  const int64_t q_blocks = (s.q_len + q_block - 1) / q_block;
  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const acc_t* lse_data = lse_acc.const_data_ptr<acc_t>();
  acc_t* norm_data = norm.data_ptr<acc_t>();
  at::parallel_for(0, s.batch * s.heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_tile(q_block * s.d_qk), scores(q_block * k_block);
    std::vector<double> sums(q_block);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nh = t / q_blocks, n = nh / s.heads, h = nh % s.heads;
      const int64_t i0 = (t % q_blocks) * q_block, mq = std::min(q_block, s.q_len - i0);
      pack_matrix(q_data + n * q.stride(0) + h * s.d_qk * q.stride(1) + i0 * q.stride(2), mq, s.d_qk, q.stride(2),
                  q.stride(1), acc_t(1), q_tile.data(), s.d_qk);
      const acc_t* lse_row = lse_data + nh * s.q_len + i0;
      std::fill(sums.begin(), sums.end(), 0.0);
      for (int64_t j0 = 0; j0 < s.k_len; j0 += k_block) {
        const int64_t nk = std::min(k_block, s.k_len - j0);
        tile_gemm(mq, nk, s.d_qk, q_tile.data(), s.d_qk, keys.tile(nh, j0), keys.ld, scores.data(), k_block, false);
        for (int64_t i = 0; i < mq; ++i) {
          acc_t* row = scores.data() + i * k_block;
          sums[i] += exp_shifted_sum(row, row, nk, static_cast<acc_t>(scale), lse_row[i]);
        }
      }
      acc_t* norm_row = norm_data + nh * s.q_len + i0;
      for (int64_t i = 0; i < mq; ++i)  // no correction where lse is not finite (no key, or -inf logits)
        norm_row[i] = std::isfinite(lse_row[i]) ? static_cast<acc_t>(1.0 / sums[i]) : acc_t(1);
    }
  });
  return {lse_acc, norm};
}

// Whether the backward renormalises its probabilities (softmax_normalisation). Always for float64
// (gradcheck). For float32 where a gradient is a short sum over queries: dk and dv of key j are sums
// over the queries, whose own rounding grows with their number while the lse error does not, so with
// few queries the lse error dominates (one query, 97 keys, d = 16..59: dk, dq 1.5-2.4x eager's error
// without the pass; 1.0-1.3x with it). With many queries the pass (one more q . k GEMM, about a fifth
// of the backward) buys little (97 x 97 keys: largest median ratio 1.24 without, 1.02 with; both
// within the rule), so the float32 benchmark cases do not pay it: docs/accuracy.md.
constexpr int64_t kRowNormMaxQueries = 16;

template <typename acc_t>
bool needs_row_norm(const AttentionShape& s) {
  return !std::is_same_v<acc_t, float> || s.q_len <= kRowNormMaxQueries;
}

// Allocates delta_i = rowsum(dO * O), one per (n, head, query), the softmax-
// gradient correction, and adds the job that computes it to `work`.
template <typename scalar_t, typename acc_t>
at::Tensor plan_softmax_grad_delta(const at::Tensor& grad_out, const at::Tensor& out, const AttentionShape& s,
                                   WorkList& work) {
  at::Tensor delta = at::empty({s.batch * s.heads, s.q_len}, acc_options<acc_t>(out));
  acc_t* delta_data = delta.data_ptr<acc_t>();
  const scalar_t* go_data = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* out_data = out.const_data_ptr<scalar_t>();
  const int64_t go_s0 = grad_out.stride(0), go_s1 = grad_out.stride(1), go_s2 = grad_out.stride(2);
  const int64_t o_s0 = out.stride(0), o_s1 = out.stride(1), o_s2 = out.stride(2);
  const int64_t heads = s.heads, q_len = s.q_len, d_v = s.d_v;
  constexpr int64_t q_block = 64;
  const int64_t q_blocks = (q_len + q_block - 1) / q_block;
  work.add(s.batch * heads * q_blocks, [=](int64_t t) {
    std::vector<acc_t> go_tile(q_block * d_v), o_tile(q_block * d_v);
    const int64_t nh = t / q_blocks, n = nh / heads, h = nh % heads;
    const int64_t i0 = (t % q_blocks) * q_block, mq = std::min(q_block, q_len - i0);
    pack_matrix(go_data + n * go_s0 + h * d_v * go_s1 + i0 * go_s2, mq, d_v, go_s2, go_s1, acc_t(1), go_tile.data(),
                d_v);
    pack_matrix(out_data + n * o_s0 + h * d_v * o_s1 + i0 * o_s2, mq, d_v, o_s2, o_s1, acc_t(1), o_tile.data(), d_v);
    for (int64_t i = 0; i < mq; ++i) {  // in double, rounded once
      double dot = 0;
      for (int64_t c = 0; c < d_v; ++c) dot += static_cast<double>(go_tile[i * d_v + c]) * o_tile[i * d_v + c];
      delta_data[nh * q_len + i0 + i] = static_cast<acc_t>(dot);
    }
  });
  return delta;
}

// One pass over (n, head, range of key blocks). A task owns its key blocks,
// streams every query block and accumulates, on tiles transposed to keys x
// queries: dv += P^T dO, dk += dS^T Q, and its own partial dq^T += K^T dS^T.
// The partials of the key ranges of one (n, head) are summed in a fixed order
// at the end, so there are no atomics and results are deterministic.
template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                     const at::Tensor& dv, const AttentionShape& s, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale_acc = static_cast<acc_t>(scale);
  const int64_t batch_heads = s.batch * s.heads;
  at::Tensor lse_acc, row_norm;
  std::tie(lse_acc, row_norm) = softmax_normalisation<scalar_t, acc_t>(lse, q, k, s, scale, needs_row_norm<acc_t>(s));

  const int64_t d_max = std::max(s.d_qk, s.d_v);
  const Tiling tiling = choose_tiling(d_max, s.k_len, s.q_len, batch_heads);
  // A step streams four query panels (q, q^T, dO, dO^T) where the forward's streams two (k, v): each
  // gets half the forward's share of L2, so a step's panels stay in it beside the task's key tiles.
  const int64_t k_block = tiling.rows, q_block = stream_block(2 * d_max, s.q_len);
  const int64_t k_blocks = (s.k_len + k_block - 1) / k_block, q_blocks = (s.q_len + q_block - 1) / q_block;
  // key ranges per (n, head): a task for every thread, each range adding one dq-sized partial
  const int64_t splits = std::clamp<int64_t>((at::get_num_threads() + batch_heads - 1) / batch_heads, 1, k_blocks);
  WorkList preparation;
  const at::Tensor delta = plan_softmax_grad_delta<scalar_t, acc_t>(grad_out, out, s, preparation);
  auto plan = [&](const at::Tensor& x, Major major) {
    return plan_panels<scalar_t, acc_t>(x, s.heads, major, q_block, preparation);
  };
  const Panels<acc_t> queries_t = plan(q, Major::Channel);       // d_qk x queries
  const Panels<acc_t> queries = plan(q, Major::Position);        // queries x d_qk
  const Panels<acc_t> grads_t = plan(grad_out, Major::Channel);  // d_v x queries
  const Panels<acc_t> grads = plan(grad_out, Major::Position);   // queries x d_v
  preparation.run_parallel();
  // dq^T partials: (split, n * heads, query block, d_qk x q_block)
  at::Tensor dq_partial = at::empty({splits, batch_heads, q_blocks, s.d_qk * q_block}, lse_acc.options());
  acc_t* partial_data = dq_partial.data_ptr<acc_t>();
  const acc_t* lse_data = lse_acc.const_data_ptr<acc_t>();
  const acc_t* delta_data = delta.const_data_ptr<acc_t>();
  const acc_t* norm_data = row_norm.defined() ? row_norm.const_data_ptr<acc_t>() : nullptr;
  const scalar_t* k_data = k.const_data_ptr<scalar_t>();
  const scalar_t* v_data = v.const_data_ptr<scalar_t>();
  const std::vector<acc_t> scale_channels(s.d_qk, scale_acc);
  // dq = scale * dq^T tile (d_qk x q_block) of query block qb, written in dq's layout
  auto store_dq = [&](int64_t nh, int64_t qb, const acc_t* tile) {
    const int64_t n = nh / s.heads, h = nh % s.heads, i0 = qb * q_block;
    store_matrix(tile, q_block, s.d_qk, std::min(q_block, s.q_len - i0), scale_channels.data(),
                 dq.data_ptr<scalar_t>() + n * dq.stride(0) + h * s.d_qk * dq.stride(1) + i0 * dq.stride(2),
                 dq.stride(1), dq.stride(2));
  };

  at::parallel_for(0, batch_heads * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> k_tile(k_block * s.d_qk), k_tile_t(s.d_qk * k_block), v_tile(k_block * s.d_v);
    std::vector<acc_t> scores(k_block * q_block), dprobs(k_block * q_block);
    std::vector<acc_t> dk_acc(k_block * s.d_qk), dv_acc(k_block * s.d_v);
    const std::vector<acc_t> scale_rows(k_block, scale_acc), unit_rows(k_block, acc_t(1));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nh = t / splits, split = t % splits, n = nh / s.heads, h = nh % s.heads;
      const int64_t first_block = split * k_blocks / splits, last_block = (split + 1) * k_blocks / splits;
      acc_t* partial = partial_data + (split * batch_heads + nh) * q_blocks * s.d_qk * q_block;
      const acc_t* lse_head = lse_data + nh * s.q_len;
      const acc_t* delta_head = delta_data + nh * s.q_len;
      const acc_t* norm_head = norm_data ? norm_data + nh * s.q_len : nullptr;
      for (int64_t kb = first_block; kb < last_block; ++kb) {
        const int64_t j0 = kb * k_block, nk = std::min(k_block, s.k_len - j0);
        const scalar_t* k_src = k_data + n * k.stride(0) + h * s.d_qk * k.stride(1) + j0 * k.stride(2);
        pack_matrix(k_src, nk, s.d_qk, k.stride(2), k.stride(1), acc_t(1), k_tile.data(), s.d_qk);  // for S^T
        pack_matrix(k_src, s.d_qk, nk, k.stride(1), k.stride(2), acc_t(1), k_tile_t.data(), nk);     // for dq^T
        pack_matrix(v_data + n * v.stride(0) + h * s.d_v * v.stride(1) + j0 * v.stride(2), nk, s.d_v, v.stride(2),
                    v.stride(1), acc_t(1), v_tile.data(), s.d_v);
        for (int64_t qb = 0; qb < q_blocks; ++qb) {
          const int64_t i0 = qb * q_block, mq = std::min(q_block, s.q_len - i0);
          tile_gemm(nk, mq, s.d_qk, k_tile.data(), s.d_qk, queries_t.tile(nh, i0), queries_t.ld, scores.data(), q_block,
                    false);
          tile_gemm(nk, mq, s.d_v, v_tile.data(), s.d_v, grads_t.tile(nh, i0), grads_t.ld, dprobs.data(), q_block,
                    false);
          for (int64_t r = 0; r < nk; ++r)
            softmax_backward_row<true>(scores.data() + r * q_block, dprobs.data() + r * q_block, mq, scale_acc,
                                       lse_head + i0, delta_head + i0, norm_head ? norm_head + i0 : nullptr);
          tile_gemm(nk, s.d_v, mq, scores.data(), q_block, grads.tile(nh, i0), grads.ld, dv_acc.data(), s.d_v, qb > 0);
          tile_gemm(nk, s.d_qk, mq, dprobs.data(), q_block, queries.tile(nh, i0), queries.ld, dk_acc.data(), s.d_qk,
                    qb > 0);
          tile_gemm(s.d_qk, mq, nk, k_tile_t.data(), nk, dprobs.data(), q_block, partial + qb * s.d_qk * q_block,
                    q_block, kb > first_block);
        }
        store_matrix(dk_acc.data(), s.d_qk, nk, s.d_qk, scale_rows.data(),
                     dk.data_ptr<scalar_t>() + n * dk.stride(0) + h * s.d_qk * dk.stride(1) + j0 * dk.stride(2),
                     dk.stride(2), dk.stride(1));
        store_matrix(dv_acc.data(), s.d_v, nk, s.d_v, unit_rows.data(),
                     dv.data_ptr<scalar_t>() + n * dv.stride(0) + h * s.d_v * dv.stride(1) + j0 * dv.stride(2),
                     dv.stride(2), dv.stride(1));
      }
      if (splits == 1)  // this task saw every key of (n, head): its partial is the whole dq
        for (int64_t qb = 0; qb < q_blocks; ++qb) store_dq(nh, qb, partial + qb * s.d_qk * q_block);
    }
  });
  if (splits == 1) return;

  // dq = scale * (sum of the partials, in split order)
  at::parallel_for(0, batch_heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t tile_size = s.d_qk * q_block, split_stride = batch_heads * q_blocks * tile_size;
    std::vector<acc_t> sum(tile_size);
    for (int64_t t = begin; t < end; ++t) {
      const acc_t* tile = partial_data + t * tile_size;
      std::copy(tile, tile + tile_size, sum.begin());
      for (int64_t split = 1; split < splits; ++split) {
        const acc_t* other = tile + split * split_stride;
        for (int64_t e = 0; e < tile_size; ++e) sum[e] += other[e];
      }
      store_dq(t / q_blocks, t % q_blocks, sum.data());
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t heads, double scale) {
  const char* op = "spatial_attention_backward";
  const AttentionShape s = check_inputs(op, q, k, v, heads);
  const std::vector<int64_t> out_shape{s.batch, v.size(1), s.q_len};
  for (const at::Tensor* t : {&grad_out, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == q.scalar_type() && t->sizes() == out_shape, op,
                ": grad_out and out must be CPU ", q.scalar_type(), " tensors of shape ", out_shape, ", got ",
                t->scalar_type(), " ", t->sizes());
  }
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat &&
                  lse.sizes() == at::IntArrayRef({s.batch, heads, s.q_len}),
              op, ": lse must be a CPU float32 tensor of shape (", s.batch, ", ", heads, ", ", s.q_len, "), got ",
              lse.scalar_type(), " ", lse.sizes());
  at::Tensor dq = empty_nchw_like(q, q.size(1), s.q_len);
  at::Tensor dk = empty_nchw_like(k, k.size(1), s.k_len);
  at::Tensor dv = empty_nchw_like(v, v.size(1), s.k_len);
  if (s.batch == 0 || (s.q_len == 0 && s.k_len == 0)) return {dq, dk, dv};
  if (s.q_len == 0 || s.k_len == 0) {  // no query or no key: every gradient is empty or zero
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "spatial_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad_out, q, k, v, out, lse, dq, dk, dv, s, scale);
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fastattn::attention_cpu

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("spatial_attention_forward", &fastattn::attention_cpu::spatial_attention_forward_cpu);
  m.impl("spatial_attention_backward", &fastattn::attention_cpu::spatial_attention_backward_cpu);
}
