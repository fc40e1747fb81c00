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
// The terms of dx
// ---------------------------------------------------------------------------
// One side's terms of dx: the channel side (arrays of N*C) or the position side (N*H*W), each array
// padded by a vector; null where not given.
template <typename acc>
struct SideTerms {
  const acc* gate = nullptr;                 // ch_gate or sp_gate
  const acc* mean_grad = nullptr;            // channel: grad_avg / (H*W); position: grad_mean / C
  const acc* mean_grad_plus_miss = nullptr;  // position: mean_grad + max_miss, the pool term of a non-max
  const acc* max_hit = nullptr;              // the max pool's gradient of an element that holds the max
  const acc* max_miss = nullptr;             // and of one that does not
  const acc* max_value = nullptr;            // the max
  const int64_t* argmax = nullptr;           // channel max: its first position; position max: its first channel
  const int32_t* max_count = nullptr;        // ties of the max
};

template <typename acc>
struct GradXTerms {
  bool has_grad_y, has_spatial_pool, has_avg, has_max, split_ties;  // which terms are summed; the tie rule
  SideTerms<acc> channel, position;
};

// an argmax index, local to `base`; -1 (never a hit) for a NaN max (count 0) under the split rule
template <typename acc>
acc local_argmax(const SideTerms<acc>& side, int64_t i, int64_t base, bool split_ties) {
  return split_ties && side.max_count[i] == 0 ? acc(-1) : local_index<acc>(side.argmax[i], base);
}

// A side's terms at one row of a task (NCHW: a channel; channels_last: a position), broadcast over
// the lanes. Same accessors as LaneTerms, whose values differ from vector to vector.
template <typename acc>
struct RowTerms {
  using fvec = Vectorized<acc>;
  fvec gate_v, mean_grad_v, mean_grad_plus_miss_v, max_hit_v, max_miss_v, max_value_v, argmax_v, index_v;

  // row i (of all images' rows), local row index `local_row`; its argmax is a lane, local to lane0
  RowTerms(const SideTerms<acc>& side, bool has_mean, bool has_max, int64_t i, int64_t local_row, int64_t lane0,
           bool split_ties)
      : gate_v(side.gate[i]), index_v(acc(local_row)) {
    if (has_mean) mean_grad_v = fvec(side.mean_grad[i]);
    if (has_mean && side.mean_grad_plus_miss) mean_grad_plus_miss_v = fvec(side.mean_grad_plus_miss[i]);
    if (has_max) {
      max_hit_v = fvec(side.max_hit[i]);
      max_miss_v = fvec(side.max_miss[i]);
      max_value_v = fvec(side.max_value[i]);
      argmax_v = fvec(local_argmax(side, i, lane0, split_ties));
    }
  }
  fvec gate(int64_t) const { return gate_v; }
  fvec mean_grad(int64_t) const { return mean_grad_v; }
  fvec mean_grad_plus_miss(int64_t) const { return mean_grad_plus_miss_v; }
  fvec max_hit(int64_t) const { return max_hit_v; }
  fvec max_miss(int64_t) const { return max_miss_v; }
  fvec max_value(int64_t) const { return max_value_v; }
  fvec argmax(int64_t) const { return argmax_v; }  // local to the task's first lane
  fvec index(int64_t) const { return index_v; }    // the row, local to the task's first row
};

// A side's terms at the lanes of a task's tile (NCHW: positions; channels_last: channels): the
// vector at lanes [j, j + kN) of the tile.
template <typename acc>
struct LaneTerms {
  using fvec = Vectorized<acc>;
  SideTerms<acc> tile;    // the side's arrays from the tile's first lane on
  const acc* argmax_row;  // per lane of the tile: its max's argmax row, local to the task's first row
  fvec lane_iota;

  LaneTerms(const SideTerms<acc>& side, int64_t lane0, const acc* argmax_row)
      : tile(at_offset(side, lane0)), argmax_row(argmax_row), lane_iota(iota<acc>()) {}
  fvec gate(int64_t j) const { return fvec::loadu(tile.gate + j); }
  fvec mean_grad(int64_t j) const { return fvec::loadu(tile.mean_grad + j); }
  fvec mean_grad_plus_miss(int64_t j) const { return fvec::loadu(tile.mean_grad_plus_miss + j); }
  fvec max_hit(int64_t j) const { return fvec::loadu(tile.max_hit + j); }
  fvec max_miss(int64_t j) const { return fvec::loadu(tile.max_miss + j); }
  fvec max_value(int64_t j) const { return fvec::loadu(tile.max_value + j); }
  fvec argmax(int64_t j) const { return fvec::loadu(argmax_row + j); }
  fvec index(int64_t j) const { return lane_iota + fvec(acc(j)); }  // the lanes, local to the tile

 private:
  static SideTerms<acc> at_offset(SideTerms<acc> side, int64_t offset) {
    for (const acc** a : {&side.gate, &side.mean_grad, &side.mean_grad_plus_miss, &side.max_hit, &side.max_miss,
                          &side.max_value})
      if (*a) *a += offset;  // absent terms stay null
    return side;
  }
};

// dx of one vector, every given term, in the reference's order: grad_y * ch_gate * sp_gate, the
// spatial pool's term (the position's max over channels), grad_avg, the channel max's term.
// `channel` and `position` are the RowTerms or LaneTerms of each side. A hit (the element holds the
// max) is found by comparing x with the max (compare_x) or by index.
template <typename scalar_t, typename Channel, typename Position>
Vectorized<acc_type<scalar_t>> dx_vector(const GradXTerms<acc_type<scalar_t>>& t, const Channel& channel,
                                         const Position& position, int64_t j, Vectorized<acc_type<scalar_t>> xv,
                                         Vectorized<acc_type<scalar_t>> gv, bool compare_x) {
  using IO = VecIO<scalar_t>;
  using fvec = typename IO::fvec;
  const fvec cg = channel.gate(j);
  fvec dxv(acc_type<scalar_t>(0));
  if (t.has_grad_y) dxv = (gv * cg) * position.gate(j);
  if (t.has_spatial_pool) {
    const fvec hit = compare_x ? IO::round(xv * cg) == position.max_value(j) : channel.index(j) == position.argmax(j);
    dxv = dxv + cg * (position.mean_grad(j) + fvec::blendv(position.max_miss(j), position.max_hit(j), hit));
  }
  if (t.has_avg) dxv = dxv + channel.mean_grad(j);
  if (t.has_max) {
    const fvec hit = compare_x ? xv == channel.max_value(j) : position.index(j) == channel.argmax(j);
    dxv = dxv + fvec::blendv(channel.max_miss(j), channel.max_hit(j), hit);
  }
  return dxv;
}

// dx_vector where no element holds a max: every max term is its miss
template <typename scalar_t, typename Channel, typename Position>
Vectorized<acc_type<scalar_t>> dx_vector_no_hit(const GradXTerms<acc_type<scalar_t>>& t, const Channel& channel,
                                                const Position& position, int64_t j,
                                                Vectorized<acc_type<scalar_t>> gv) {
  using fvec = typename VecIO<scalar_t>::fvec;
  const fvec cg = channel.gate(j);
  fvec dxv(acc_type<scalar_t>(0));
  if (t.has_grad_y) dxv = (gv * cg) * position.gate(j);
  if (t.has_spatial_pool) dxv = dxv + cg * position.mean_grad_plus_miss(j);
  if (t.has_avg) dxv = dxv + channel.mean_grad(j);
  if (t.has_max) dxv = dxv + channel.max_miss(j);
  return dxv;
}

// The lanes of a tile grouped by the row of their max's argmax: those of local row r are
// lanes[start[r] .. start[r + 1]). Lanes whose argmax lies outside the task's rows are left out.
struct LanesByArgmaxRow {
  std::vector<int32_t> start, lanes;

  template <typename acc>
  LanesByArgmaxRow(const acc* argmax_row, int64_t n_lanes, int64_t n_rows) : start(n_rows + 1, 0) {
    auto in_rows = [&](int64_t l) { return argmax_row[l] >= 0 && argmax_row[l] < acc(n_rows); };
    for (const auto l : c10::irange(n_lanes))
      if (in_rows(l)) ++start[static_cast<int64_t>(argmax_row[l]) + 1];
    for (const auto r : c10::irange(n_rows)) start[r + 1] += start[r];
    lanes.resize(start[n_rows]);
    std::vector<int32_t> next(start.begin(), start.end() - 1);
    for (const auto l : c10::irange(n_lanes))
      if (in_rows(l)) lanes[next[static_cast<int64_t>(argmax_row[l])]++] = static_cast<int32_t>(l);
  }
};

// ---------------------------------------------------------------------------
// One task of cbam_grad_x
// ---------------------------------------------------------------------------
// dx over one task's rows and lane tile: the sum of the given terms. The row's own terms are
// broadcasts (RowTerms), the lanes' are vector loads (LaneTerms); Layout<kChannelsLast> says which
// side is the channel and which the position.
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
// The terms are taken by value and everything else is a local: the stores to dx could otherwise
// alias them and force reloads in the inner loop.
template <typename scalar_t, bool kChannelsLast>
void grad_x_task(const GradXTerms<acc_type<scalar_t>> t, const Grid::Task& k, int64_t rows, int64_t lanes,
                 const scalar_t* x_p, const scalar_t* gy_p, scalar_t* dx_p, int64_t numel) {
  using IO = VecIO<scalar_t>;
  using acc = typename IO::acc;
  using fvec = typename IO::fvec;
  using L = Layout<kChannelsLast>;
  constexpr int64_t kN = IO::kN;
  const scalar_t* x_end = x_p + numel;
  const scalar_t* gy_end = gy_p ? gy_p + numel : nullptr;
  const int64_t l0 = k.n * lanes + k.lane0;
  // The row side's max (NCHW: the channel max) has its argmax along lanes, the lane side's along rows.
  const SideTerms<acc>& row_side = L::row(t.channel, t.position);
  const SideTerms<acc>& lane_side = L::lane(t.channel, t.position);
  const bool row_has_mean = L::row(t.has_avg, t.has_spatial_pool);
  const bool row_has_max = L::row(t.has_max, t.has_spatial_pool);
  const bool lane_has_max = L::lane(t.has_max, t.has_spatial_pool);
  std::vector<acc> lane_argmax_row(round_up(k.lanes, kN), acc(-1));
  if (lane_has_max)
    for (const auto l : c10::irange(k.lanes))
      lane_argmax_row[l] = local_argmax(lane_side, l0 + l, k.row0, t.split_ties);
  const LaneTerms<acc> lane_terms(lane_side, l0, lane_argmax_row.data());
  const int64_t ahead = prefetch_distance(k.lanes, lanes);

  // sparse hits: each max has at most one, at its argmax
  bool sparse = true;
  if (t.split_ties) {
    if (lane_has_max)
      for (const auto l : c10::irange(k.lanes)) sparse = sparse && lane_side.max_count[l0 + l] <= 1;
    if (row_has_max)
      for (int64_t r = k.row0; r < k.row0 + k.rows; ++r) sparse = sparse && row_side.max_count[k.n * rows + r] <= 1;
  }
  const bool read_x = !sparse && (t.has_spatial_pool || t.has_max);
  const bool compare_x = read_x && t.split_ties;
  const fvec zero(acc(0));
  // lanes [j, j + nv) of row ri, every term
  auto full_vector = [&](const RowTerms<acc>& row_terms, int64_t ri, int64_t j, int64_t nv) {
    const scalar_t* xr = x_p + ri * lanes + k.lane0;
    const scalar_t* gr = gy_p ? gy_p + ri * lanes + k.lane0 : nullptr;
    fvec xv = zero, gv = zero;
    if (read_x) xv = nv == kN ? IO::load(xr + j) : IO::load_tail(xr + j, nv, x_end);
    if (t.has_grad_y) gv = nv == kN ? IO::load(gr + j) : IO::load_tail(gr + j, nv, gy_end);
    return dx_vector<scalar_t>(t, L::channel(row_terms, lane_terms), L::position(row_terms, lane_terms), j, xv, gv,
                               compare_x);
  };
  std::optional<LanesByArgmaxRow> argmax_lanes;
  if (sparse && lane_has_max) argmax_lanes.emplace(lane_argmax_row.data(), k.lanes, k.rows);

  for (int64_t r = k.row0; r < k.row0 + k.rows; ++r) {
    const int64_t ri = k.n * rows + r;
    const scalar_t* gr = gy_p ? gy_p + ri * lanes + k.lane0 : nullptr;
    scalar_t* dr = dx_p + ri * lanes + k.lane0;
    const RowTerms<acc> row_terms(row_side, row_has_mean, row_has_max, ri, r - k.row0, k.lane0, t.split_ties);
    if (!sparse) {
      for (int64_t j = 0; j < k.lanes; j += kN) {
        const int64_t nv = std::min(kN, k.lanes - j);
        if (read_x) prefetch(x_p + ri * lanes + k.lane0 + j + ahead);
        if (t.has_grad_y) prefetch(gr + j + ahead);
        prefetch_for_write(dr + j + ahead);
        IO::store(dr + j, full_vector(row_terms, ri, j, nv), nv);
      }
      continue;
    }
    // every element a miss
    for (int64_t j = 0; j < k.lanes; j += kN) {
      const int64_t nv = std::min(kN, k.lanes - j);
      fvec gv = zero;
      if (t.has_grad_y) {
        prefetch(gr + j + ahead);
        gv = nv == kN ? IO::load(gr + j) : IO::load_tail(gr + j, nv, gy_end);
      }
      const fvec dxv =
          dx_vector_no_hit<scalar_t>(t, L::channel(row_terms, lane_terms), L::position(row_terms, lane_terms), j, gv);
      prefetch_for_write(dr + j + ahead);
      IO::store(dr + j, dxv, nv);
    }
    // then the vectors that hold the row's argmax or a lane's
    auto redo = [&](int64_t lane) {
      const int64_t j = lane / kN * kN;
      const int64_t nv = std::min(kN, k.lanes - j);
      IO::store(dr + j, full_vector(row_terms, ri, j, nv), nv);
    };
    if (row_has_max) {
      const int64_t lane = row_side.argmax[ri] - k.lane0;
      if (lane >= 0 && lane < k.lanes) redo(lane);
    }
    if (argmax_lanes)
      for (int32_t b = argmax_lanes->start[r - k.row0]; b < argmax_lanes->start[r - k.row0 + 1]; ++b)
        redo(argmax_lanes->lanes[b]);
  }
}

// ---------------------------------------------------------------------------
// cbam_grad_x
// ---------------------------------------------------------------------------
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
    using acc = acc_type<scalar_t>;
    constexpr int64_t kN = VecIO<scalar_t>::kN;
    const int64_t NC = d.N * d.C;
    // the channel side (NC + kN each): ch_gate, grad_avg / HW, the channel max's hit, miss and value
    std::vector<acc> channel_gate(NC + kN, 0), avg_grad(NC + kN, 0), channel_max_hit(NC + kN, 0),
        channel_max_miss(NC + kN, 0), channel_max(NC + kN, 0);
    if (ch_gate) channel_gate = param_array<scalar_t>(*ch_gate, {d.N, d.C}, op, "ch_gate");
    if (has_avg) {
      avg_grad = param_array<scalar_t>(*grad_avg, {d.N, d.C}, op, "grad_avg");
      for (const auto i : c10::irange(NC)) avg_grad[i] = avg_grad[i] / acc(d.HW);
    }
    Tensor channel_argmax, channel_count;
    if (has_max) {
      const auto max_grad = param_array<scalar_t>(*grad_max, {d.N, d.C}, op, "grad_max");
      channel_max = param_array<scalar_t>(*ch_max, {d.N, d.C}, op, "ch_max");
      channel_count = index_array(*ch_count, {d.N, d.C}, at::kInt, op, "ch_count");
      channel_argmax = index_array(*ch_argmax, {d.N, d.C}, at::kLong, op, "ch_argmax");
      for (const auto i : c10::irange(NC))
        max_grad_weights(max_grad[i], channel_count.const_data_ptr<int32_t>()[i], split_ties, channel_max_hit[i],
                         channel_max_miss[i]);
    }
    // the position side: sp_gate, and the spatial max pool's terms
    std::vector<acc> position_gate(d.N * d.HW + kN, 0);
    if (sp_gate) position_gate = param_array<scalar_t>(*sp_gate, {d.N, H, W}, op, "sp_gate");
    SpatialPoolTerms<acc> pool_terms;
    std::vector<acc> mean_grad_plus_miss;
    Tensor position_argmax;
    if (has_pool) {  // grad_pooled, pooled and sp_count are checked here
      pool_terms = spatial_pool_terms<scalar_t>(*grad_pooled, *pooled, *sp_count, x, d, split_ties, op);
      position_argmax = index_array(*sp_argmax, {d.N, H, W}, at::kLong, op, "sp_argmax");
      mean_grad_plus_miss.resize(pool_terms.mean_grad.size());
      for (const auto i : c10::irange(mean_grad_plus_miss.size()))
        mean_grad_plus_miss[i] = pool_terms.mean_grad[i] + pool_terms.max_miss[i];
    }
    auto data_or_null = [](const std::vector<acc>& v) { return v.empty() ? nullptr : v.data(); };
    GradXTerms<acc> terms;
    terms.has_grad_y = has_gy;
    terms.has_spatial_pool = has_pool;
    terms.has_avg = has_avg;
    terms.has_max = has_max;
    terms.split_ties = split_ties;
    terms.channel.gate = channel_gate.data();
    terms.channel.mean_grad = avg_grad.data();
    terms.channel.max_hit = channel_max_hit.data();
    terms.channel.max_miss = channel_max_miss.data();
    terms.channel.max_value = channel_max.data();
    terms.channel.argmax = has_max ? channel_argmax.const_data_ptr<int64_t>() : nullptr;
    terms.channel.max_count = has_max ? channel_count.const_data_ptr<int32_t>() : nullptr;
    terms.position.gate = position_gate.data();
    terms.position.mean_grad = data_or_null(pool_terms.mean_grad);
    terms.position.mean_grad_plus_miss = data_or_null(mean_grad_plus_miss);
    terms.position.max_hit = data_or_null(pool_terms.max_hit);
    terms.position.max_miss = data_or_null(pool_terms.max_miss);
    terms.position.max_value = data_or_null(pool_terms.max_value);
    terms.position.argmax = has_pool ? position_argmax.const_data_ptr<int64_t>() : nullptr;
    terms.position.max_count = has_pool ? pool_terms.count.const_data_ptr<int32_t>() : nullptr;
    const scalar_t* x_p = d.t.const_data_ptr<scalar_t>();
    const scalar_t* gy_p = has_gy ? gy.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dx_p = dx.data_ptr<scalar_t>();
    // long lane tiles: each row is one long stream of x, grad_y and dx
    const Grid g(d.N, d.rows(), d.lanes(), kN, /*split_rows=*/true, 0, kMaxStreamTile);
    const int64_t numel = d.t.numel();
    for_each_task(g, [&](const Grid::Task& k) {
      if (d.channels_last) {
        grad_x_task<scalar_t, true>(terms, k, d.rows(), d.lanes(), x_p, gy_p, dx_p, numel);
      } else {
        grad_x_task<scalar_t, false>(terms, k, d.rows(), d.lanes(), x_p, gy_p, dx_p, numel);
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
