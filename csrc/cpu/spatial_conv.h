// Output vectors of the spatial gate's stride-1 k x k conv, shared by cbam_spatial_conv
// (cbam_spatial_conv.cpp) and the inference block (cbam_eval.cpp).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "cbam_tiling.h"

#include <cstdint>

namespace fastattn {
namespace cpu {

// `vecs` consecutive output vectors of one row of a stride-1 k x k conv over `planes` zero-padded
// planes, into a[0, vecs): plane c's input rows start at in + c * plane_stride (kernel row i at
// + i * row_len), its weights at w[(c * kh + i) * kw + j]. Sums in (c, i, j) order, one FMA each.
// The vector count is a constant inside, so that the accumulators live in registers.
template <typename acc, int64_t kVecs>
void conv_vectors_fixed(const acc* in, int64_t plane_stride, int64_t row_len, int64_t planes, int64_t kh, int64_t kw,
                        const acc* w, Vectorized<acc>* out) {
  using fvec = Vectorized<acc>;
  constexpr int64_t kN = fvec::size();
  fvec a[kVecs];
  for (int64_t v = 0; v < kVecs; ++v) a[v] = fvec(acc(0));
  for (int64_t c = 0; c < planes; ++c)
    for (int64_t i = 0; i < kh; ++i) {
      const acc* row = in + c * plane_stride + i * row_len;
      const acc* wr = w + (c * kh + i) * kw;
      for (int64_t j = 0; j < kw; ++j) {
        const fvec wv(wr[j]);
        for (int64_t v = 0; v < kVecs; ++v) a[v] = at::vec::fmadd(wv, fvec::loadu(row + v * kN + j), a[v]);
      }
    }
  for (int64_t v = 0; v < kVecs; ++v) out[v] = a[v];
}

template <typename acc, int64_t kVecs>
void conv_vectors(const acc* in, int64_t plane_stride, int64_t row_len, int64_t planes, int64_t kh, int64_t kw,
                  const acc* w, int64_t vecs, Vectorized<acc>* a) {
  static_assert(kVecs == 4, "conv_vectors dispatches 1 to 4 vectors");
  switch (vecs) {
    case 4: return conv_vectors_fixed<acc, 4>(in, plane_stride, row_len, planes, kh, kw, w, a);
    case 3: return conv_vectors_fixed<acc, 3>(in, plane_stride, row_len, planes, kh, kw, w, a);
    case 2: return conv_vectors_fixed<acc, 2>(in, plane_stride, row_len, planes, kh, kw, w, a);
    default: return conv_vectors_fixed<acc, 1>(in, plane_stride, row_len, planes, kh, kw, w, a);
  }
}


}  // namespace cpu
}  // namespace fastattn
