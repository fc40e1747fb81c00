// Forward kernel of the FFMA attention (see csrc/cuda/attention.cu for the whole picture).
#pragma once

#include "tiles.cuh"

namespace fastattn {
namespace {

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------
// Block (query tile of BQ rows, n * heads). Shared memory (floats):
//   q_s    [round_up(dqk, 64)][BQ + 1]  q tile, channel-major, times scale * log2(e)
//   stage  [64][65]                     k chunk as [d][j], v chunk as [j][c], output chunk as [i][c]
//   p_s    [BQ][65]                     probabilities of the current key tile, [i][j]
template <int BQ>
size_t forward_smem_bytes(int dqk) {
  using G = TileGeometry<BQ>;
  return sizeof(float) * (static_cast<size_t>(round_up(dqk, kChunk)) * G::kResidentStride + kChunk * kStageStride +
                          BQ * kStageStride);
}

template <typename scalar_t, int BQ>
__global__ void __launch_bounds__(kThreads)
spatial_attention_forward_kernel(Operand<const scalar_t> q, Operand<const scalar_t> k, Operand<const scalar_t> v,
                                 Operand<scalar_t> out, float* __restrict__ lse, AttnShape shape, float scale_log2) {
  using G = TileGeometry<BQ>;
  constexpr int TI = G::kRowsPerThread;
  constexpr int QS = G::kResidentStride;
  extern __shared__ float smem[];

  const int64_t bh = block_batch_head();
  if (bh >= shape.batch_heads) return;
  const Head head(bh, shape);
  const int dqk = shape.dqk, dv = shape.dv, lq = shape.lq, lk = shape.lk;
  const int q0 = blockIdx.x * BQ;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  const int dqk_pad = round_up(dqk, kChunk);
  float* q_s = smem;
  float* stage = q_s + dqk_pad * QS;
  float* p_s = stage + kChunk * kStageStride;

  const scalar_t* q_slab = head.qk(q);
  const scalar_t* k_slab = head.qk(k);
  const scalar_t* v_slab = head.v(v);
  scalar_t* out_slab = head.v(out);

  for (int c0 = 0; c0 < dqk_pad; c0 += kChunk) {
    load_tile<kChunk, BQ>(q_s + c0 * QS, QS, 1, q_slab, q.stride_c, q.stride_l, c0, dqk, q0, lq, scale_log2);
  }

  // Row i = q0 + ty + 16 a of this thread; running max (log2 domain) and sum of exp2.
  float row_m[TI], row_l[TI];
  float acc[G::kAccChunks][TI][4];  // out[i][cc * 64 + tx + 16 b], unnormalised
#pragma unroll
  for (int a = 0; a < TI; ++a) {
    row_m[a] = -INFINITY;
    row_l[a] = 0.f;
  }
#pragma unroll
  for (int cc = 0; cc < G::kAccChunks; ++cc) zero(acc[cc]);

  for (int k0 = 0; k0 < lk; k0 += kChunk) {
    // s[a][b]: log2-domain logit of row ty + 16 a and key k0 + tx + 16 b.
    float s[TI][4];
    zero(s);
    for (int d0 = 0; d0 < dqk; d0 += kChunk) {
      __syncthreads();  // stage and p_s are free (and q_s is complete on the first pass)
      load_tile<kChunk, kChunk>(stage, kStageStride, 1, k_slab, k.stride_c, k.stride_l, d0, dqk, k0, lk, 1.f);
      __syncthreads();
      accumulate_products(s, min(kChunk, dqk - d0), [&](int d, int a) { return q_s[(d0 + d) * QS + ty + 16 * a]; },
                          [&](int d, int b) { return stage[d * kStageStride + tx + 16 * b]; });
    }

    // Online softmax: rescale what was accumulated by exp2(m_old - m_new). Column k0 is a
    // valid key, so m_new is finite for finite inputs and exp2(-inf - m_new) = 0 on the first tile.
    // While every logit so far is -inf (inf inputs) the shift is 0, so p and alpha are 0, not NaN.
#pragma unroll
    for (int a = 0; a < TI; ++a) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        if (k0 + tx + 16 * b >= lk) s[a][b] = -INFINITY;
        tile_max = fmaxf(tile_max, s[a][b]);
      }
      const float m_new = fmaxf(row_m[a], row_max(tile_max));
      const float m_shift = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(row_m[a] - m_shift);
      float tile_sum = 0.f;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        s[a][b] = exp2f(s[a][b] - m_shift);
        tile_sum += s[a][b];
      }
      row_l[a] = row_l[a] * alpha + row_sum(tile_sum);
      row_m[a] = m_new;
#pragma unroll
      for (int cc = 0; cc < G::kAccChunks; ++cc)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[cc][a][b] *= alpha;
#pragma unroll
      for (int b = 0; b < 4; ++b) p_s[(ty + 16 * a) * kStageStride + tx + 16 * b] = s[a][b];
    }

    // acc += P V, one 64-channel chunk of v at a time (zero-filled past lk, so P's masked columns meet zeros).
    const int jc = min(kChunk, lk - k0);
#pragma unroll
    for (int cc = 0; cc < G::kAccChunks; ++cc) {
      if (cc * kChunk < dv) {
        __syncthreads();  // p_s written, stage free
        load_tile<kChunk, kChunk>(stage, 1, kStageStride, v_slab, v.stride_c, v.stride_l, cc * kChunk, dv, k0, lk, 1.f);
        __syncthreads();
        accumulate_products(acc[cc], jc, [&](int j, int a) { return p_s[(ty + 16 * a) * kStageStride + j]; },
                            [&](int j, int b) { return stage[j * kStageStride + tx + 16 * b]; });
      }
    }
  }

  float inv_l[TI];
#pragma unroll
  for (int a = 0; a < TI; ++a) {
    inv_l[a] = 1.f / row_l[a];
    const int i = q0 + ty + 16 * a;
    if (tx == 0 && i < lq) lse[bh * lq + i] = (row_m[a] + log2f(row_l[a])) * kLn2;
  }
  store_accumulators<BQ>(out_slab, out, stage, dv, q0, lq, 1.f, ty, tx,
                         [&](int cc, int a, int b) { return acc[cc][a][b] * inv_l[a]; });
}

}  // namespace
}  // namespace fastattn
