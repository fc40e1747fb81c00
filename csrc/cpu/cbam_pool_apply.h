// The loops of the CBAM forward that the op-by-op forward (cbam_forward.cpp) and the inference
// block (cbam_eval.cpp) share: max pooling along rows, the channel pool, and applying both gates.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include "cbam_layout.h"
#include "row_reduce.h"
#include "vec_io.h"

#include <vector>

namespace fastattn {
namespace cpu {

// ---------------------------------------------------------------------------
// channel_pool and gated_spatial_pool
// ---------------------------------------------------------------------------
// Max pooling along rows of each image, for every lane: stats(n, lane) handed to `emit` (sum and
// max only without kArg).
template <typename scalar_t, bool kArg = true, typename Emit>
void pool_along_rows(const Dense& d, const acc_type<scalar_t>* row_gate, const Emit& emit) {
  using acc = acc_type<scalar_t>;
  const scalar_t* x = d.t.const_data_ptr<scalar_t>();
  const scalar_t* end = x + d.t.numel();
  const int64_t rows = d.rows(), lanes = d.lanes();
  const Grid g(d.N, rows, lanes, VecIO<scalar_t>::kN, /*split_rows=*/true, l2_block() / int64_t(sizeof(scalar_t)));
  // per (image, chunk) states, merged in chunk order below; a task that has every row emits its own
  const bool whole = g.n_chunks == 1;
  std::vector<MaxStats<acc>> partial(whole ? 0 : g.N * g.n_chunks * lanes);
  for_each_task(g, [&](const Grid::Task& k) {
    LaneStates<acc> st;
    const scalar_t* block = x + (k.n * rows + k.row0) * lanes + k.lane0;
    reduce_rows<scalar_t, kArg>(block, lanes, k.rows, k.lanes, row_gate ? row_gate + k.n * rows + k.row0 : nullptr, end,
                                st);
    if (whole) {
      for (const auto l : c10::irange(k.lanes)) emit(k.n, k.lane0 + l, st.get(l, k.row0));
      return;
    }
    MaxStats<acc>* out = partial.data() + (k.n * g.n_chunks + k.chunk) * lanes + k.lane0;
    for (const auto l : c10::irange(k.lanes)) out[l] = st.get(l, k.row0);
  });
  if (whole) return;
  at::parallel_for(0, d.N * lanes, 1 << 16, [&](int64_t begin, int64_t stop) {
    for (int64_t i = begin; i < stop; ++i) {
      const int64_t n = i / lanes, l = i % lanes;
      MaxStats<acc> s = partial[n * g.n_chunks * lanes + l];
      for (int64_t c = 1; c < g.n_chunks; ++c) s.merge(partial[(n * g.n_chunks + c) * lanes + l]);
      emit(n, l, s);
    }
  });
}

// The channel pool: stats of channel c of image n over all positions, handed to emit(n * C + c, stats)
// (sum and max only without kArg).
template <typename scalar_t, bool kArg, typename Emit>
void channel_stats(const Dense& d, const Emit& emit) {
  using acc = acc_type<scalar_t>;
  if (d.channels_last) {  // per-channel lanes, reduced along positions
    pool_along_rows<scalar_t, kArg>(d, nullptr, [&](int64_t n, int64_t c, const MaxStats<acc>& s) { emit(n * d.C + c, s); });
  } else {  // each (n, c) plane is one contiguous row
    const scalar_t* x_p = d.t.const_data_ptr<scalar_t>();
    const scalar_t* end = x_p + d.t.numel();
    at::parallel_for(0, d.N * d.C, row_grain(d.HW), [&](int64_t begin, int64_t stop) {
      for (int64_t nc = begin; nc < stop; ++nc)
        emit(nc, reduce_contiguous<scalar_t, false, kArg>(x_p + nc * d.HW, nullptr, d.HW, end));
    });
  }
}

// ---------------------------------------------------------------------------
// cbam_apply
// ---------------------------------------------------------------------------
// One row of y = (x * ch_gate) * sp_gate, multiplied in that order as the reference does. `row_w` is
// the row's own gate (NCHW: the channel's; channels_last: the position's), lane_w the lanes' (read
// as whole vectors: padded). kPrefetch: x streams from memory (not for rows already in cache).
template <typename scalar_t, bool kPrefetch = true>
void apply_row(const scalar_t* xr, scalar_t* yr, int64_t lanes, acc_type<scalar_t> row_w,
               const acc_type<scalar_t>* lane_w, bool channels_last, const scalar_t* end) {
  using IO = VecIO<scalar_t>;
  using fvec = typename IO::fvec;
  constexpr int64_t kN = IO::kN;
  const fvec rw(row_w);
  for (int64_t j = 0; j < lanes; j += kN) {
    const int64_t nv = std::min(kN, lanes - j);
    if constexpr (kPrefetch) {
      prefetch(xr + j + kStreamAhead);
      prefetch_for_write(yr + j + kStreamAhead);
    }
    const fvec v = nv == kN ? IO::load(xr + j) : IO::load_tail(xr + j, nv, end);
    const fvec lw = fvec::loadu(lane_w + j);
    IO::store(yr + j, channels_last ? (v * lw) * rw : (v * rw) * lw, nv);
  }
}

// y = x * ch_gate * sp_gate over all of x; cg (N*C) and sp (N*H*W) padded by a vector
template <typename scalar_t>
void apply_gates(const Dense& d, const acc_type<scalar_t>* cg, const acc_type<scalar_t>* sp, scalar_t* y_p) {
  const scalar_t* x_p = d.t.const_data_ptr<scalar_t>();
  const scalar_t* end = x_p + d.t.numel();
  const int64_t rows = d.rows(), lanes = d.lanes();
  const bool cl = d.channels_last;
  at::parallel_for(0, d.N * rows, row_grain(lanes), [=](int64_t begin, int64_t stop) {
    for (int64_t i = begin; i < stop; ++i) {
      const int64_t n = i / rows;
      apply_row<scalar_t>(x_p + i * lanes, y_p + i * lanes, lanes, cl ? sp[i] : cg[i], (cl ? cg : sp) + n * lanes, cl,
                          end);
    }
  });
}


}  // namespace cpu
}  // namespace fastattn
