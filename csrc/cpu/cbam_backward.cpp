// CPU kernels of the CBAM backward reductions: cbam_apply_backward (the gates' gradients) and
// gated_spatial_pool_backward_gate. The x-sized gradient is cbam_grad_x.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "cbam_layout.h"
#include "cbam_max_grad.h"
#include "vec_io.h"

#include <algorithm>
#include <tuple>
#include <vector>

namespace fastattn {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------
// cbam_apply_backward
// ---------------------------------------------------------------------------
std::tuple<Tensor, Tensor> cbam_apply_backward_cpu(const Tensor& grad_y, const Tensor& x, const Tensor& ch_gate,
                                                   const Tensor& sp_gate) {
  constexpr const char* op = "cbam_apply_backward";
  const Dense d = dense_input(x, op);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have x's shape ", x.sizes(), ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && grad_y.device().is_cpu(), op,
              ": grad_y must be a CPU tensor of x's dtype");
  const Tensor gy = grad_y.contiguous(d.format());
  Tensor d_ch = at::empty({d.N, d.C}, x.options());
  Tensor d_sp = at::empty({d.N, x.size(2), x.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using IO = VecIO<scalar_t>;
    using acc = typename IO::acc;
    using fvec = typename IO::fvec;
    constexpr int64_t kN = IO::kN;
    const auto cg_acc = param_array<scalar_t>(ch_gate, {d.N, d.C}, op, "ch_gate");
    const auto sp_acc = param_array<scalar_t>(sp_gate, {d.N, x.size(2), x.size(3)}, op, "sp_gate");
    // NCHW: rows weigh by ch_gate, lanes by sp_gate; channels_last the other way round
    const acc* row_w = (d.channels_last ? sp_acc : cg_acc).data();
    const acc* lane_w = (d.channels_last ? cg_acc : sp_acc).data();
    const scalar_t* x_p = d.t.const_data_ptr<scalar_t>();
    const scalar_t* gy_p = gy.const_data_ptr<scalar_t>();
    const scalar_t* x_end = x_p + d.t.numel();
    const scalar_t* gy_end = gy_p + gy.numel();
    const int64_t rows = d.rows(), lanes = d.lanes();
    // short tiles: a block of kRowBlock rows of grad_y and x and the next one, prefetched, stay in L1
    const Grid g(d.N, rows, lanes, kN, /*split_rows=*/true, 0, max_lane_tile() / 2);
    // row sums (sum over lanes of g * lane_w) per lane tile, lane sums (sum over rows of g * row_w) per row chunk
    std::vector<acc> row_part(g.N * g.n_tiles * rows, acc(0));
    std::vector<acc> lane_part(g.N * g.n_chunks * lanes, acc(0));
    for_each_task(g, [&](const Grid::Task& k) {
      __at_align__ acc lane_acc[kLaneTileCapacity + kN] = {};
      const acc* lw_base = lane_w + k.n * lanes + k.lane0;
      for (int64_t r0 = k.row0; r0 < k.row0 + k.rows; r0 += kRowBlock) {
        const int64_t rb = std::min(kRowBlock, k.row0 + k.rows - r0);
        fvec racc[kRowBlock], rw[kRowBlock];
        const scalar_t* xr[kRowBlock];
        const scalar_t* gr[kRowBlock];
        for (const auto r : c10::irange(rb)) {
          racc[r] = fvec(acc(0));
          rw[r] = fvec(row_w[k.n * rows + r0 + r]);
          xr[r] = x_p + (k.n * rows + r0 + r) * lanes + k.lane0;
          gr[r] = gy_p + (k.n * rows + r0 + r) * lanes + k.lane0;
        }
        for (int64_t j = 0; j < k.lanes; j += kN) {
          const int64_t nv = std::min(kN, k.lanes - j);
          const fvec lw = fvec::set(fvec(acc(0)), fvec::loadu(lw_base + j), nv);
          fvec la = fvec::loadu(lane_acc + j);
          for (int64_t r = 0; r < rb; ++r) {
            prefetch(gr[r] + j + kRowBlock * lanes);
            prefetch(xr[r] + j + kRowBlock * lanes);
            const fvec gv = nv == kN ? IO::load(gr[r] + j) : IO::load_tail(gr[r] + j, nv, gy_end);
            const fvec xv = nv == kN ? IO::load(xr[r] + j) : IO::load_tail(xr[r] + j, nv, x_end);
            const fvec gx = gv * xv;
            la = la + gx * rw[r];
            racc[r] = racc[r] + gx * lw;
          }
          la.store(lane_acc + j);
        }
        for (const auto r : c10::irange(rb)) row_part[(k.n * g.n_tiles + k.tile) * rows + r0 + r] = hsum(racc[r]);
      }
      std::copy_n(lane_acc, k.lanes, lane_part.data() + (k.n * g.n_chunks + k.chunk) * lanes + k.lane0);
    });
    // NCHW: row sums are grad_ch_gate, lane sums grad_sp_gate; channels_last the other way round
    scalar_t* row_out = (d.channels_last ? d_sp : d_ch).data_ptr<scalar_t>();
    scalar_t* lane_out = (d.channels_last ? d_ch : d_sp).data_ptr<scalar_t>();
    for (const auto n : c10::irange(d.N)) {
      for (const auto r : c10::irange(rows)) {
        acc s = 0;
        for (const auto t : c10::irange(g.n_tiles)) s += row_part[(n * g.n_tiles + t) * rows + r];
        row_out[n * rows + r] = static_cast<scalar_t>(s);
      }
      for (const auto l : c10::irange(lanes)) {
        acc s = 0;
        for (const auto c : c10::irange(g.n_chunks)) s += lane_part[(n * g.n_chunks + c) * lanes + l];
        lane_out[n * lanes + l] = static_cast<scalar_t>(s);
      }
    }
  });
  return {d_ch, d_sp};
}

// ---------------------------------------------------------------------------
// gated_spatial_pool_backward_gate
// ---------------------------------------------------------------------------
Tensor gated_spatial_pool_backward_gate_cpu(const Tensor& grad_pooled, const Tensor& x, const Tensor& gate,
                                            const Tensor& pooled, const Tensor& argmax, const Tensor& count,
                                            bool split_ties) {
  constexpr const char* op = "gated_spatial_pool_backward_gate";
  const Dense d = dense_input(x, op);
  const int64_t H = x.size(2), W = x.size(3);
  Tensor d_gate = at::empty({d.N, d.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using IO = VecIO<scalar_t>;
    using acc = typename IO::acc;
    using fvec = typename IO::fvec;
    constexpr int64_t kN = IO::kN;
    const auto g_acc = param_array<scalar_t>(gate, {d.N, d.C}, op, "gate");
    const auto terms = spatial_pool_terms<scalar_t>(grad_pooled, pooled, count, x, d, split_ties, op);
    const Tensor arg = index_array(argmax, {d.N, H, W}, at::kLong, op, "argmax");
    const acc* gate_p = g_acc.data();
    const acc *mean_grad = terms.mean_grad.data(), *max_hit = terms.max_hit.data();
    const acc *max_miss = terms.max_miss.data(), *max_value = terms.max_value.data();
    const int64_t* arg_p = arg.const_data_ptr<int64_t>();
    const scalar_t* x_p = d.t.const_data_ptr<scalar_t>();
    const scalar_t* x_end = x_p + d.t.numel();
    const int64_t rows = d.rows(), lanes = d.lanes();
    const fvec lane_iota = iota<acc>();
    const Grid grid(d.N, rows, lanes, kN, /*split_rows=*/true);
    // grad_gate[n, c] = sum over positions of x * (mean_grad + (max hit ? hit : miss)): NCHW sums rows' lanes,
    // channels_last sums lanes over rows; partial sums per lane tile or per row chunk
    std::vector<acc> part(d.channels_last ? grid.N * grid.n_chunks * lanes : grid.N * grid.n_tiles * rows, acc(0));
    for_each_task(grid, [&](const Grid::Task& k) {
      const int64_t base = k.n * rows;
      const int64_t ahead = prefetch_distance(k.lanes, lanes);
      if (!d.channels_last) {  // rows = channels, lanes = positions
        __at_align__ acc lane_arg[kLaneTileCapacity + kN];  // argmax channel, local to this row chunk
        for (const auto l : c10::irange(k.lanes)) lane_arg[l] = local_index<acc>(arg_p[k.n * lanes + k.lane0 + l], k.row0);
        const int64_t p0 = k.n * lanes + k.lane0;
        for (int64_t r = k.row0; r < k.row0 + k.rows; ++r) {
          const fvec row_gate(gate_p[base + r]);
          const fvec local_row(acc(r - k.row0));
          const scalar_t* xr = x_p + (base + r) * lanes + k.lane0;
          auto contrib = [&](int64_t j, const fvec& xv) {
            const fvec hit_mask = split_ties ? IO::round(xv * row_gate) == fvec::loadu(max_value + p0 + j)
                                             : local_row == fvec::loadu(lane_arg + j);
            const fvec dz = fvec::loadu(mean_grad + p0 + j) +
                            fvec::blendv(fvec::loadu(max_miss + p0 + j), fvec::loadu(max_hit + p0 + j), hit_mask);
            return dz * xv;
          };
          // kSums partial sums over alternate vectors: one chain of adds would be the loop's bound
          fvec s[kSums];
          for (auto& v : s) v = fvec(acc(0));
          int64_t j = 0;
          for (; j + kSums * kN <= k.lanes; j += kSums * kN)
            for (int64_t u = 0; u < kSums; ++u) {
              prefetch(xr + j + u * kN + ahead);
              s[u] = s[u] + contrib(j + u * kN, IO::load(xr + j + u * kN));
            }
          for (int64_t u = 0; j < k.lanes; j += kN, ++u) {
            const int64_t nv = std::min(kN, k.lanes - j);
            const fvec c = contrib(j, nv == kN ? IO::load(xr + j) : IO::load_tail(xr + j, nv, x_end));
            s[u] = s[u] + (nv == kN ? c : fvec::set(fvec(acc(0)), c, nv));
          }
          static_assert(kSums == 4, "the partial sums add as a tree of four");
          part[(k.n * grid.n_tiles + k.tile) * rows + r] = hsum((s[0] + s[1]) + (s[2] + s[3]));
        }
      } else {  // rows = positions, lanes = channels
        __at_align__ acc lane_acc[kLaneTileCapacity + kN] = {};
        const acc* lane_gate = gate_p + k.n * lanes + k.lane0;
        for (int64_t r = k.row0; r < k.row0 + k.rows; ++r) {
          const int64_t p = base + r;
          const fvec mean(mean_grad[p]), hit(max_hit[p]), miss(max_miss[p]), mx(max_value[p]);
          const fvec arg_loc(local_index<acc>(arg_p[p], k.lane0));
          const scalar_t* xr = x_p + p * lanes + k.lane0;
          fvec lidx = lane_iota;
          for (int64_t j = 0; j < k.lanes; j += kN, lidx = lidx + fvec(acc(kN))) {
            const int64_t nv = std::min(kN, k.lanes - j);
            prefetch(xr + j + ahead);
            const fvec xv = nv == kN ? IO::load(xr + j) : IO::load_tail(xr + j, nv, x_end);
            const fvec hit_mask = split_ties ? IO::round(xv * fvec::loadu(lane_gate + j)) == mx : lidx == arg_loc;
            const fvec dz = mean + fvec::blendv(miss, hit, hit_mask);
            (fvec::loadu(lane_acc + j) + dz * xv).store(lane_acc + j);
          }
        }
        std::copy_n(lane_acc, k.lanes, part.data() + (k.n * grid.n_chunks + k.chunk) * lanes + k.lane0);
      }
    });
    scalar_t* out = d_gate.data_ptr<scalar_t>();
    const int64_t parts = d.channels_last ? grid.n_chunks : grid.n_tiles;
    const int64_t len = d.channels_last ? lanes : rows;  // = C
    for (const auto n : c10::irange(d.N)) {
      for (const auto c : c10::irange(len)) {
        acc s = 0;
        for (const auto q : c10::irange(parts)) s += part[(n * parts + q) * len + c];
        out[n * len + c] = static_cast<scalar_t>(s);
      }
    }
  });
  return d_gate;
}


}  // namespace
}  // namespace cpu
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("cbam_apply_backward", &fastattn::cpu::cbam_apply_backward_cpu);
  m.impl("gated_spatial_pool_backward_gate", &fastattn::cpu::gated_spatial_pool_backward_gate_cpu);
}
