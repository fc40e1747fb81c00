// CPU kernel of cbam_grad_x: the x-sized gradient of the whole CBAM graph in one pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "cbam_layout.h"
#include "cbam_max_grad.h"
#include "vec_io.h"

#include <algorithm>
#include <optional>
#include <vector>

namespace fastattn {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------
// cbam_grad_x
// ---------------------------------------------------------------------------
// Per-channel and per-position terms of the x-gradient (cbam_grad_x), each array padded by a vector.
template <typename acc>
struct GradXTerms {
  bool has_gy, has_pool, has_avg, has_max, split_ties;
  const acc *c_gate, *c_avg, *c_hit, *c_miss, *c_max;  // (N*C): ch_gate, grad_avg / HW, channel-max hit, miss, max
  const int64_t* c_arg;                                 // (N*C): first argmax position
  const int32_t* c_cnt;                                 // (N*C): ties of the channel max
  const acc *p_gate, *p_a, *p_hit, *p_miss, *p_max;    // (N*HW): sp_gate, grad_mean / C, spatial-max hit, miss, max
  const acc* p_amiss;                                   // (N*HW): grad_mean / C + miss
  const int64_t* p_arg;                                 // (N*HW): first argmax channel
  const int32_t* p_cnt;                                 // (N*HW): ties of the spatial max
};

// dx over one task's rows and lane tile: the sum of the given terms, in the reference's order.
// The row's own terms are broadcasts, the lanes' are vector loads; channel and position swap roles
// between NCHW (rows = channels) and channels_last (rows = positions).
//
// x only decides which elements hold a max (a hit) and take the max pool's gradient; every other
// element takes `miss`, a signed zero (or NaN, then in every element alike). Where each max has
// at most one hit, at its argmax (always under the first-index rule; under timm's split rule when
// no count in the task passes 1, and count 0, a NaN max, has none) the task does not read x: it
// streams grad_y into dx with the miss terms, then recomputes with the hit terms the vectors that
// hold an argmax (one per channel and one per position), hits found by index. Elsewhere (a tie
// under the split rule) every vector takes the full formula, hits found by comparing x with the max.
//
// Argmax indices are compared as floats local to this task's row chunk or lane tile.
// Everything is copied into locals: the stores to dx could otherwise alias captured state and
// force reloads in the inner loop.
template <typename scalar_t, bool kChannelsLast>
void grad_x_task(const GradXTerms<acc_type<scalar_t>> t, const Grid::Task& k, int64_t rows, int64_t lanes,
                 const scalar_t* x_p, const scalar_t* gy_p, scalar_t* dx_p, int64_t numel) {
  using IO = VecIO<scalar_t>;
  using acc = typename IO::acc;
  using fvec = typename IO::fvec;
  constexpr int64_t kN = IO::kN;
  const bool has_gy = t.has_gy, has_pool = t.has_pool, has_avg = t.has_avg, has_max = t.has_max;
  const bool split = t.split_ties;
  const scalar_t* x_end = x_p + numel;
  const scalar_t* gy_end = gy_p ? gy_p + numel : nullptr;
  const int64_t l0 = k.n * lanes + k.lane0;
  // The max indexed by lane (NCHW: the spatial max, one per position; channels_last: the channel
  // max) has its argmax along rows; the max indexed by row has its argmax along lanes.
  const bool lane_max = kChannelsLast ? has_max : has_pool, row_max = kChannelsLast ? has_pool : has_max;
  const int64_t* lane_arg_src = kChannelsLast ? t.c_arg : t.p_arg;
  const int64_t* row_arg_src = kChannelsLast ? t.p_arg : t.c_arg;
  const int32_t* lane_cnt = kChannelsLast ? t.c_cnt : t.p_cnt;
  const int32_t* row_cnt = kChannelsLast ? t.p_cnt : t.c_cnt;
  // an argmax index, local to `base`; -1 (never a hit) for a NaN max under the split rule
  auto arg_local = [&](const int64_t* arg, const int32_t* cnt, int64_t i, int64_t base) {
    return split && cnt[i] == 0 ? acc(-1) : local_index<acc>(arg[i], base);
  };
  std::vector<acc> lane_arg_buf(round_up(k.lanes, kN), acc(-1));  // the lane max's argmax, a local row
  const acc* lane_arg = lane_arg_buf.data();
  if (lane_max)
    for (const auto l : c10::irange(k.lanes)) lane_arg_buf[l] = arg_local(lane_arg_src, lane_cnt, l0 + l, k.row0);
  // the lane dimension's arrays at this tile
  auto at_tile = [&](const acc* a) { return a ? a + l0 : nullptr; };  // absent terms stay null
  const acc* lg = at_tile(kChannelsLast ? t.c_gate : t.p_gate);
  const acc* l_avg = at_tile(t.c_avg);  // read in channels_last only
  const acc* l_hit = at_tile(kChannelsLast ? t.c_hit : t.p_hit);
  const acc* l_miss = at_tile(kChannelsLast ? t.c_miss : t.p_miss);
  const acc* l_max = at_tile(kChannelsLast ? t.c_max : t.p_max);
  const acc* l_a = at_tile(t.p_a);          // read in NCHW only
  const acc* l_amiss = at_tile(t.p_amiss);  // read in NCHW only
  const fvec zero(acc(0));
  const fvec lane_iota = iota<acc>();
  const int64_t ahead = prefetch_distance(k.lanes, lanes);

  // Sparse hits: each max has at most one, at its argmax.
  bool sparse = true;
  if (split) {
    if (lane_max)
      for (const auto l : c10::irange(k.lanes)) sparse = sparse && lane_cnt[l0 + l] <= 1;
    if (row_max)
      for (int64_t r = k.row0; r < k.row0 + k.rows; ++r) sparse = sparse && row_cnt[k.n * rows + r] <= 1;
  }
  const bool read_x = !sparse && (has_pool || has_max);

  // the row's own terms
  struct RowTerms {
    fvec rg, r_avg, r_hit, r_miss, r_max, r_a, r_amiss, r_arg, r_loc;
  };
  auto row_terms = [&](int64_t r) {
    const int64_t ri = k.n * rows + r;
    RowTerms rt;
    rt.r_loc = fvec(acc(r - k.row0));
    if (row_max) rt.r_arg = fvec(arg_local(row_arg_src, row_cnt, ri, k.lane0));
    if constexpr (kChannelsLast) {  // row = position
      rt.rg = fvec(t.p_gate[ri]);
      if (has_pool) {
        rt.r_a = fvec(t.p_a[ri]);
        rt.r_amiss = fvec(t.p_amiss[ri]);
        rt.r_hit = fvec(t.p_hit[ri]);
        rt.r_miss = fvec(t.p_miss[ri]);
        rt.r_max = fvec(t.p_max[ri]);
      }
    } else {  // row = channel
      rt.rg = fvec(t.c_gate[ri]);
      rt.r_avg = fvec(t.c_avg[ri]);
      if (has_max) {
        rt.r_hit = fvec(t.c_hit[ri]);
        rt.r_miss = fvec(t.c_miss[ri]);
        rt.r_max = fvec(t.c_max[ri]);
      }
    }
    return rt;
  };
  // lanes [j, j + nv) of row ri, every term
  auto full_vec = [&](const RowTerms& rt, int64_t ri, int64_t j, int64_t nv) {
    const scalar_t* xr = x_p + ri * lanes + k.lane0;
    const scalar_t* gr = gy_p ? gy_p + ri * lanes + k.lane0 : nullptr;
    fvec xv = zero, gv = zero;
    if (read_x) xv = nv == kN ? IO::load(xr + j) : IO::load_tail(xr + j, nv, x_end);
    if (has_gy) gv = nv == kN ? IO::load(gr + j) : IO::load_tail(gr + j, nv, gy_end);
    const fvec l_loc = lane_iota + fvec(acc(j));
    const fvec la = fvec::loadu(lane_arg + j);
    // the element's channel gate and position gate
    const fvec cg = kChannelsLast ? fvec::loadu(lg + j) : rt.rg;
    const fvec sp = kChannelsLast ? rt.rg : fvec::loadu(lg + j);
    fvec dxv = zero;
    if (has_gy) dxv = (gv * cg) * sp;
    if (has_pool) {  // spatial max over channels: the position's terms
      const fvec pmax = kChannelsLast ? rt.r_max : fvec::loadu(l_max + j);
      const fvec c_loc = kChannelsLast ? l_loc : rt.r_loc;
      const fvec p_arg = kChannelsLast ? rt.r_arg : la;
      const fvec hit = read_x && split ? IO::round(xv * cg) == pmax : c_loc == p_arg;
      const fvec pa = kChannelsLast ? rt.r_a : fvec::loadu(l_a + j);
      const fvec phit = kChannelsLast ? rt.r_hit : fvec::loadu(l_hit + j);
      const fvec pmiss = kChannelsLast ? rt.r_miss : fvec::loadu(l_miss + j);
      dxv = dxv + cg * (pa + fvec::blendv(pmiss, phit, hit));
    }
    if (has_avg) dxv = dxv + (kChannelsLast ? fvec::loadu(l_avg + j) : rt.r_avg);
    if (has_max) {  // channel max over positions: the channel's terms
      const fvec cmax = kChannelsLast ? fvec::loadu(l_max + j) : rt.r_max;
      const fvec p_loc = kChannelsLast ? rt.r_loc : l_loc;
      const fvec c_arg = kChannelsLast ? la : rt.r_arg;
      const fvec hit = read_x && split ? xv == cmax : p_loc == c_arg;
      const fvec chit = kChannelsLast ? fvec::loadu(l_hit + j) : rt.r_hit;
      const fvec cmiss = kChannelsLast ? fvec::loadu(l_miss + j) : rt.r_miss;
      dxv = dxv + fvec::blendv(cmiss, chit, hit);
    }
    return dxv;
  };

  // sparse: the lanes whose argmax is row r, bucket_lanes[bucket_start[r - row0] .. bucket_start[r - row0 + 1])
  std::vector<int32_t> bucket_start, bucket_lanes;
  if (sparse && lane_max) {
    auto in_chunk = [&](int64_t l) { return lane_arg[l] >= 0 && lane_arg[l] < acc(k.rows); };
    bucket_start.assign(k.rows + 1, 0);
    for (const auto l : c10::irange(k.lanes))
      if (in_chunk(l)) ++bucket_start[static_cast<int64_t>(lane_arg[l]) + 1];
    for (const auto r : c10::irange(k.rows)) bucket_start[r + 1] += bucket_start[r];
    bucket_lanes.resize(bucket_start[k.rows]);
    std::vector<int32_t> fill(bucket_start.begin(), bucket_start.end() - 1);
    for (const auto l : c10::irange(k.lanes))
      if (in_chunk(l)) bucket_lanes[fill[static_cast<int64_t>(lane_arg[l])]++] = static_cast<int32_t>(l);
  }

  for (int64_t r = k.row0; r < k.row0 + k.rows; ++r) {
    const int64_t ri = k.n * rows + r;
    const scalar_t* gr = gy_p ? gy_p + ri * lanes + k.lane0 : nullptr;
    scalar_t* dr = dx_p + ri * lanes + k.lane0;
    const RowTerms rt = row_terms(r);
    if (!sparse) {
      for (int64_t j = 0; j < k.lanes; j += kN) {
        const int64_t nv = std::min(kN, k.lanes - j);
        if (read_x) prefetch(x_p + ri * lanes + k.lane0 + j + ahead);
        if (has_gy) prefetch(gr + j + ahead);
        prefetch_for_write(dr + j + ahead);
        IO::store(dr + j, full_vec(rt, ri, j, nv), nv);
      }
      continue;
    }
    // every element a miss: full_vec's sum without hits
    for (int64_t j = 0; j < k.lanes; j += kN) {
      const int64_t nv = std::min(kN, k.lanes - j);
      const fvec cg = kChannelsLast ? fvec::loadu(lg + j) : rt.rg;
      fvec dxv = zero;
      if (has_gy) {
        prefetch(gr + j + ahead);
        const fvec gv = nv == kN ? IO::load(gr + j) : IO::load_tail(gr + j, nv, gy_end);
        const fvec sp = kChannelsLast ? rt.rg : fvec::loadu(lg + j);
        dxv = (gv * cg) * sp;
      }
      if (has_pool) dxv = dxv + cg * (kChannelsLast ? rt.r_amiss : fvec::loadu(l_amiss + j));
      if (has_avg) dxv = dxv + (kChannelsLast ? fvec::loadu(l_avg + j) : rt.r_avg);
      if (has_max) dxv = dxv + (kChannelsLast ? fvec::loadu(l_miss + j) : rt.r_miss);
      prefetch_for_write(dr + j + ahead);
      IO::store(dr + j, dxv, nv);
    }
    // then the vectors that hold the row's argmax or a lane's
    auto redo = [&](int64_t lane) {
      const int64_t j = lane / kN * kN;
      const int64_t nv = std::min(kN, k.lanes - j);
      IO::store(dr + j, full_vec(rt, ri, j, nv), nv);
    };
    if (row_max) {
      const int64_t lane = row_arg_src[ri] - k.lane0;
      if (lane >= 0 && lane < k.lanes) redo(lane);
    }
    if (lane_max)
      for (int32_t b = bucket_start[r - k.row0]; b < bucket_start[r - k.row0 + 1]; ++b) redo(bucket_lanes[b]);
  }
}

Tensor cbam_grad_x_cpu(const Tensor& x, const std::optional<Tensor>& grad_y, const std::optional<Tensor>& ch_gate,
                       const std::optional<Tensor>& sp_gate, const std::optional<Tensor>& grad_pooled,
                       const std::optional<Tensor>& pooled, const std::optional<Tensor>& sp_argmax,
                       const std::optional<Tensor>& sp_count, const std::optional<Tensor>& grad_avg,
                       const std::optional<Tensor>& grad_max, const std::optional<Tensor>& ch_max,
                       const std::optional<Tensor>& ch_argmax, const std::optional<Tensor>& ch_count,
                       bool split_ties) {
  constexpr const char* op = "cbam_grad_x";
  const Dense d = dense_input(x, op);
  const int64_t H = x.size(2), W = x.size(3);
  const bool has_gy = grad_y.has_value(), has_pool = grad_pooled.has_value();
  const bool has_avg = grad_avg.has_value(), has_max = grad_max.has_value();
  TORCH_CHECK(!has_gy || (ch_gate && sp_gate), op, ": grad_y needs ch_gate and sp_gate");
  TORCH_CHECK(!has_pool || (ch_gate && pooled && sp_argmax && sp_count), op,
              ": grad_pooled needs ch_gate, pooled, sp_argmax and sp_count");
  TORCH_CHECK(!has_max || (ch_max && ch_argmax && ch_count), op, ": grad_max needs ch_max, ch_argmax and ch_count");
  Tensor gy;
  if (has_gy) {
    TORCH_CHECK(grad_y->sizes() == x.sizes(), op, ": grad_y must have x's shape ", x.sizes(), ", got ",
                grad_y->sizes());
    TORCH_CHECK(grad_y->scalar_type() == x.scalar_type() && grad_y->device().is_cpu(), op,
                ": grad_y must be a CPU tensor of x's dtype");
    gy = grad_y->contiguous(d.format());
  }
  const XSized dx_out(x, d);
  const Tensor& dx = dx_out.work;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using IO = VecIO<scalar_t>;
    using acc = typename IO::acc;
    using fvec = typename IO::fvec;
    constexpr int64_t kN = IO::kN;
    const int64_t NC = d.N * d.C;
    // per-channel terms (NC + kN each): ch_gate, grad_avg / HW, channel-max hit, miss, max
    std::vector<acc> c_gate(NC + kN, 0), c_avg(NC + kN, 0), c_hit(NC + kN, 0), c_miss(NC + kN, 0),
        c_max(NC + kN, 0);
    if (ch_gate) c_gate = param_array<scalar_t>(*ch_gate, {d.N, d.C}, op, "ch_gate");
    if (has_avg) {
      c_avg = param_array<scalar_t>(*grad_avg, {d.N, d.C}, op, "grad_avg");
      for (const auto i : c10::irange(NC)) c_avg[i] = c_avg[i] / acc(d.HW);
    }
    Tensor ch_arg, ch_cnt;
    if (has_max) {
      const auto gm = param_array<scalar_t>(*grad_max, {d.N, d.C}, op, "grad_max");
      c_max = param_array<scalar_t>(*ch_max, {d.N, d.C}, op, "ch_max");
      ch_cnt = index_array(*ch_count, {d.N, d.C}, at::kInt, op, "ch_count");
      ch_arg = index_array(*ch_argmax, {d.N, d.C}, at::kLong, op, "ch_argmax");
      for (const auto i : c10::irange(NC))
        max_grad_weights(gm[i], ch_cnt.const_data_ptr<int32_t>()[i], split_ties, c_hit[i], c_miss[i]);
    }
    // per-position terms: sp_gate, and those of the spatial max pool
    std::vector<acc> p_gate(d.N * d.HW + kN, 0);
    if (sp_gate) p_gate = param_array<scalar_t>(*sp_gate, {d.N, H, W}, op, "sp_gate");
    SpatialPoolTerms<acc> pool_terms;
    std::vector<acc> p_amiss;
    Tensor sp_arg;
    if (has_pool) {  // grad_pooled, pooled and sp_count are checked here
      pool_terms = spatial_pool_terms<scalar_t>(*grad_pooled, *pooled, *sp_count, x, d, split_ties, op);
      sp_arg = index_array(*sp_argmax, {d.N, H, W}, at::kLong, op, "sp_argmax");
      p_amiss.resize(pool_terms.a.size());
      for (const auto i : c10::irange(p_amiss.size())) p_amiss[i] = pool_terms.a[i] + pool_terms.miss[i];
    }
    auto data_or_null = [](const std::vector<acc>& v) { return v.empty() ? nullptr : v.data(); };
    GradXTerms<acc> terms_set;
    terms_set.has_gy = has_gy;
    terms_set.has_pool = has_pool;
    terms_set.has_avg = has_avg;
    terms_set.has_max = has_max;
    terms_set.split_ties = split_ties;
    terms_set.c_gate = c_gate.data();
    terms_set.c_avg = c_avg.data();
    terms_set.c_hit = c_hit.data();
    terms_set.c_miss = c_miss.data();
    terms_set.c_max = c_max.data();
    terms_set.c_arg = has_max ? ch_arg.const_data_ptr<int64_t>() : nullptr;
    terms_set.c_cnt = has_max ? ch_cnt.const_data_ptr<int32_t>() : nullptr;
    terms_set.p_gate = p_gate.data();
    terms_set.p_a = data_or_null(pool_terms.a);
    terms_set.p_hit = data_or_null(pool_terms.hit);
    terms_set.p_miss = data_or_null(pool_terms.miss);
    terms_set.p_max = data_or_null(pool_terms.max);
    terms_set.p_amiss = data_or_null(p_amiss);
    terms_set.p_arg = has_pool ? sp_arg.const_data_ptr<int64_t>() : nullptr;
    terms_set.p_cnt = has_pool ? pool_terms.count.const_data_ptr<int32_t>() : nullptr;
    const scalar_t* x_p = d.t.const_data_ptr<scalar_t>();
    const scalar_t* gy_p = has_gy ? gy.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dx_p = dx.data_ptr<scalar_t>();
    // long lane tiles: each row is one long stream of x, grad_y and dx
    const Grid g(d.N, d.rows(), d.lanes(), kN, /*split_rows=*/true, 0, kMaxStreamTile);
    const int64_t numel = d.t.numel();
    for_each_task(g, [&](const Grid::Task& k) {
      if (d.channels_last) {
        grad_x_task<scalar_t, true>(terms_set, k, d.rows(), d.lanes(), x_p, gy_p, dx_p, numel);
      } else {
        grad_x_task<scalar_t, false>(terms_set, k, d.rows(), d.lanes(), x_p, gy_p, dx_p, numel);
      }
    });
  });
  return dx_out.finish();
}


}  // namespace
}  // namespace cpu
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("cbam_grad_x", &fastattn::cpu::cbam_grad_x_cpu);
}
