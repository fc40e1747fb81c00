// Backward kernels of the FFMA attention (see csrc/cuda/attention.cu for the whole picture).
#pragma once

#include "tiles.cuh"

namespace fastattn {
namespace {

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------
// delta[bh, i] = sum_c dO[n, h*dv + c, i] * O[n, h*dv + c, i], the D of dS = P * (dP - D).
// Block (64 queries, n * heads); thread (i = tid % 64, part = tid / 64) sums every 4th channel.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
attention_backward_delta_kernel(Operand<const scalar_t> grad_out, Operand<const scalar_t> out,
                                float* __restrict__ delta, AttnShape shape) {
  constexpr int kParts = kThreads / kChunk;
  __shared__ float grad_s[kChunk * kStageStride];  // [c][i]
  __shared__ float out_s[kChunk * kStageStride];   // [c][i]
  __shared__ float partial[kParts][kChunk];

  const int64_t bh = block_batch_head();
  if (bh >= shape.batch_heads) return;
  const Head head(bh, shape);
  const int dv = shape.dv, lq = shape.lq;
  const int q0 = blockIdx.x * kChunk;
  const int i = threadIdx.x % kChunk, part = threadIdx.x / kChunk;
  const scalar_t* grad_slab = head.v(grad_out);
  const scalar_t* out_slab = head.v(out);

  float sum = 0.f;
  for (int c0 = 0; c0 < dv; c0 += kChunk) {
    __syncthreads();
    load_tile<kChunk, kChunk>(grad_s, kStageStride, 1, grad_slab, grad_out.stride_c, grad_out.stride_l, c0, dv, q0, lq, 1.f);
    load_tile<kChunk, kChunk>(out_s, kStageStride, 1, out_slab, out.stride_c, out.stride_l, c0, dv, q0, lq, 1.f);
    __syncthreads();
    for (int c = part; c < kChunk; c += kParts) sum = fmaf(grad_s[c * kStageStride + i], out_s[c * kStageStride + i], sum);
  }
  partial[part][i] = sum;
  __syncthreads();
  if (part == 0 && q0 + i < lq) {
    float total = 0.f;
#pragma unroll
    for (int p = 0; p < kParts; ++p) total += partial[p][i];
    delta[bh * lq + q0 + i] = total;
  }
}

// Shared memory of the dkdv and dq kernels (floats):
//   two resident tiles [round_up(d, 64)][TILE + 1] (k and v, or q and dO)
//   stage  [64][65]
//   p_s    [TILE][65]   P, then dS, of the current 64 x TILE block of the attention matrix
template <int TILE>
size_t backward_smem_bytes(int dqk, int dv) {
  using G = TileGeometry<TILE>;
  return sizeof(float) *
         (static_cast<size_t>(round_up(dqk, kChunk) + round_up(dv, kChunk)) * G::kResidentStride +
          kChunk * kStageStride + TILE * kStageStride);
}

// The products with both operands read along rows of staged tiles (P dO, dS q here, dS k in the dq
// kernel) stay spelled out: through any inlined helper (accumulate_products, a plain function, a
// per-step one) nvcc hoists their row offsets differently and the SASS of these verified kernels
// changes (docs/cuda-attention.md, "FFMA kernels: shared helpers").
//
// Block (key tile of BKV keys, n * heads), looping over all query tiles of 64:
//   dv[j] = sum_i P[i, j] dO[i],   dk[j] = scale * sum_i dS[i, j] q[i],
//   P = exp2(s_log2 - lse * log2(e)),  dS = P * (dO . v[j] - delta[i]).
// Thread (ty, tx) holds keys j = ty + 16 a and query columns i = tx + 16 b of each 64-query tile.
template <typename scalar_t, int BKV>
__global__ void __launch_bounds__(kThreads)
attention_backward_dkdv_kernel(Operand<const scalar_t> grad_out, Operand<const scalar_t> q,
                               Operand<const scalar_t> k, Operand<const scalar_t> v, const float* __restrict__ lse,
                               const float* __restrict__ delta, Operand<scalar_t> grad_k, Operand<scalar_t> grad_v,
                               AttnShape shape, float scale, float scale_log2) {
  using G = TileGeometry<BKV>;
  constexpr int TJ = G::kRowsPerThread;
  constexpr int RS = G::kResidentStride;
  extern __shared__ float smem[];

  const int64_t bh = block_batch_head();
  if (bh >= shape.batch_heads) return;
  const Head head(bh, shape);
  const int dqk = shape.dqk, dv = shape.dv, lq = shape.lq, lk = shape.lk;
  const int k0 = blockIdx.x * BKV;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  const int dqk_pad = round_up(dqk, kChunk), dv_pad = round_up(dv, kChunk);
  float* k_s = smem;                  // [d][j]
  float* v_s = k_s + dqk_pad * RS;    // [c][j]
  float* stage = v_s + dv_pad * RS;   // q chunk or dO chunk as [channel][i]; outputs as [j][channel]
  float* p_s = stage + kChunk * kStageStride;  // [j][i]

  const scalar_t* q_slab = head.qk(q);
  const scalar_t* k_slab = head.qk(k);
  const scalar_t* v_slab = head.v(v);
  const scalar_t* grad_out_slab = head.v(grad_out);
  const float* lse_row = lse + bh * lq;
  const float* delta_row = delta + bh * lq;

  for (int c0 = 0; c0 < dqk_pad; c0 += kChunk) {
    load_tile<kChunk, BKV>(k_s + c0 * RS, RS, 1, k_slab, k.stride_c, k.stride_l, c0, dqk, k0, lk, 1.f);
  }
  for (int c0 = 0; c0 < dv_pad; c0 += kChunk) {
    load_tile<kChunk, BKV>(v_s + c0 * RS, RS, 1, v_slab, v.stride_c, v.stride_l, c0, dv, k0, lk, 1.f);
  }

  float acc_k[G::kAccChunks][TJ][4];  // dk[j][cc * 64 + tx + 16 b] / scale
  float acc_v[G::kAccChunks][TJ][4];  // dv[j][cc * 64 + tx + 16 b]
#pragma unroll
  for (int cc = 0; cc < G::kAccChunks; ++cc) {
    zero(acc_k[cc]);
    zero(acc_v[cc]);
  }

  for (int q0 = 0; q0 < lq; q0 += kChunk) {
    float lse_log2[4], row_delta[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int i = q0 + tx + 16 * b;
      lse_log2[b] = i < lq ? lse_row[i] * kLog2e : 0.f;
      row_delta[b] = i < lq ? delta_row[i] : 0.f;
    }

    // s[a][b] = log2-domain logit of key ty + 16 a and query tx + 16 b, from q times scale * log2(e)
    // summed over d in the forward's order: bitwise the forward's logits, so P = exp2(s - lse2)
    // differs from the forward's P only by the rounding of lse.
    float s[TJ][4];
    zero(s);
    for (int d0 = 0; d0 < dqk; d0 += kChunk) {
      __syncthreads();  // stage and p_s free (resident tiles complete on the first pass)
      load_tile<kChunk, kChunk>(stage, kStageStride, 1, q_slab, q.stride_c, q.stride_l, d0, dqk, q0, lq, scale_log2);
      __syncthreads();
      accumulate_products(s, min(kChunk, dqk - d0), [&](int d, int a) { return k_s[(d0 + d) * RS + ty + 16 * a]; },
                          [&](int d, int b) { return stage[d * kStageStride + tx + 16 * b]; });
    }
    // P, zero outside the valid queries and keys.
#pragma unroll
    for (int a = 0; a < TJ; ++a) {
      const bool key_valid = k0 + ty + 16 * a < lk;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const bool query_valid = q0 + tx + 16 * b < lq;
        s[a][b] = key_valid && query_valid ? exp2f(s[a][b] - lse_log2[b]) : 0.f;
        p_s[(ty + 16 * a) * kStageStride + tx + 16 * b] = s[a][b];
      }
    }

    // dP = v . dO and dv += P dO, one 64-channel chunk of dO at a time.
    float dp[TJ][4];
    zero(dp);
    const int ic = min(kChunk, lq - q0);
#pragma unroll
    for (int cc = 0; cc < G::kAccChunks; ++cc) {
      if (cc * kChunk < dv) {
        __syncthreads();  // p_s written, stage free
        load_tile<kChunk, kChunk>(stage, kStageStride, 1, grad_out_slab, grad_out.stride_c, grad_out.stride_l,
                                  cc * kChunk, dv, q0, lq, 1.f);
        __syncthreads();
        accumulate_products(dp, min(kChunk, dv - cc * kChunk),
                            [&](int c, int a) { return v_s[(cc * kChunk + c) * RS + ty + 16 * a]; },
                            [&](int c, int b) { return stage[c * kStageStride + tx + 16 * b]; });
        // here tx + 16 b indexes channels: dv[j][c] += sum_i P[j][i] dO[i][c]
#pragma unroll 4
        for (int i = 0; i < ic; ++i) {
          float pa[TJ], gb[4];
#pragma unroll
          for (int a = 0; a < TJ; ++a) pa[a] = p_s[(ty + 16 * a) * kStageStride + i];
#pragma unroll
          for (int b = 0; b < 4; ++b) gb[b] = stage[(tx + 16 * b) * kStageStride + i];
#pragma unroll
          for (int a = 0; a < TJ; ++a)
#pragma unroll
            for (int b = 0; b < 4; ++b) acc_v[cc][a][b] = fmaf(pa[a], gb[b], acc_v[cc][a][b]);
        }
      }
    }

    // dS = P * (dP - delta) replaces P in p_s once every thread is done reading P.
    __syncthreads();
#pragma unroll
    for (int a = 0; a < TJ; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) p_s[(ty + 16 * a) * kStageStride + tx + 16 * b] = s[a][b] * (dp[a][b] - row_delta[b]);

    // dk += dS q, one 64-channel chunk of q at a time; tx + 16 b indexes channels.
#pragma unroll
    for (int cc = 0; cc < G::kAccChunks; ++cc) {
      if (cc * kChunk < dqk) {
        __syncthreads();  // p_s written, stage free
        load_tile<kChunk, kChunk>(stage, kStageStride, 1, q_slab, q.stride_c, q.stride_l, cc * kChunk, dqk, q0, lq, 1.f);
        __syncthreads();
#pragma unroll 4
        for (int i = 0; i < ic; ++i) {
          float dsa[TJ], qb[4];
#pragma unroll
          for (int a = 0; a < TJ; ++a) dsa[a] = p_s[(ty + 16 * a) * kStageStride + i];
#pragma unroll
          for (int b = 0; b < 4; ++b) qb[b] = stage[(tx + 16 * b) * kStageStride + i];
#pragma unroll
          for (int a = 0; a < TJ; ++a)
#pragma unroll
            for (int b = 0; b < 4; ++b) acc_k[cc][a][b] = fmaf(dsa[a], qb[b], acc_k[cc][a][b]);
        }
      }
    }
  }

  // Write dk (times scale) and dv through the stage as [j][channel].
  scalar_t* grad_k_slab = head.qk(grad_k);
  scalar_t* grad_v_slab = head.v(grad_v);  // both before the stores, as the SASS-verified original
  store_accumulators<BKV>(grad_k_slab, grad_k, stage, dqk, k0, lk, scale, ty, tx,
                          [&](int cc, int a, int b) { return acc_k[cc][a][b]; });
  store_accumulators<BKV>(grad_v_slab, grad_v, stage, dv, k0, lk, 1.f, ty, tx,
                          [&](int cc, int a, int b) { return acc_v[cc][a][b]; });
}

// Block (query tile of BQ queries, n * heads), looping over all key tiles of 64:
//   dq[i] = scale * sum_j dS[i, j] k[j],  dS = P * (dO[i] . v[j] - delta[i]).
// Thread (ty, tx) holds queries i = ty + 16 a and key columns j = tx + 16 b of each 64-key tile.
template <typename scalar_t, int BQ>
__global__ void __launch_bounds__(kThreads)
attention_backward_dq_kernel(Operand<const scalar_t> grad_out, Operand<const scalar_t> q, Operand<const scalar_t> k,
                             Operand<const scalar_t> v, const float* __restrict__ lse,
                             const float* __restrict__ delta, Operand<scalar_t> grad_q, AttnShape shape, float scale,
                             float scale_log2) {
  using G = TileGeometry<BQ>;
  constexpr int TI = G::kRowsPerThread;
  constexpr int RS = G::kResidentStride;
  extern __shared__ float smem[];

  const int64_t bh = block_batch_head();
  if (bh >= shape.batch_heads) return;
  const Head head(bh, shape);
  const int dqk = shape.dqk, dv = shape.dv, lq = shape.lq, lk = shape.lk;
  const int q0 = blockIdx.x * BQ;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  const int dqk_pad = round_up(dqk, kChunk), dv_pad = round_up(dv, kChunk);
  float* q_s = smem;                   // [d][i], times scale * log2(e)
  float* grad_s = q_s + dqk_pad * RS;  // dO as [c][i]
  float* stage = grad_s + dv_pad * RS; // k chunk as [d][j], v chunk as [c][j]; dq as [i][d]
  float* ds_s = stage + kChunk * kStageStride;  // [i][j]

  const scalar_t* q_slab = head.qk(q);
  const scalar_t* k_slab = head.qk(k);
  const scalar_t* v_slab = head.v(v);
  const scalar_t* grad_out_slab = head.v(grad_out);

  for (int c0 = 0; c0 < dqk_pad; c0 += kChunk) {
    load_tile<kChunk, BQ>(q_s + c0 * RS, RS, 1, q_slab, q.stride_c, q.stride_l, c0, dqk, q0, lq, scale_log2);
  }
  for (int c0 = 0; c0 < dv_pad; c0 += kChunk) {
    load_tile<kChunk, BQ>(grad_s + c0 * RS, RS, 1, grad_out_slab, grad_out.stride_c, grad_out.stride_l, c0, dv, q0,
                          lq, 1.f);
  }

  float lse_log2[TI], row_delta[TI];
#pragma unroll
  for (int a = 0; a < TI; ++a) {
    const int i = q0 + ty + 16 * a;
    lse_log2[a] = i < lq ? lse[bh * lq + i] * kLog2e : 0.f;
    row_delta[a] = i < lq ? delta[bh * lq + i] : 0.f;
  }

  float acc[G::kAccChunks][TI][4];  // dq[i][cc * 64 + tx + 16 b] / scale
#pragma unroll
  for (int cc = 0; cc < G::kAccChunks; ++cc) zero(acc[cc]);

  for (int k0 = 0; k0 < lk; k0 += kChunk) {
    float s[TI][4];
    zero(s);
    for (int d0 = 0; d0 < dqk; d0 += kChunk) {
      __syncthreads();  // stage and ds_s free (resident tiles complete on the first pass)
      load_tile<kChunk, kChunk>(stage, kStageStride, 1, k_slab, k.stride_c, k.stride_l, d0, dqk, k0, lk, 1.f);
      __syncthreads();
      accumulate_products(s, min(kChunk, dqk - d0), [&](int d, int a) { return q_s[(d0 + d) * RS + ty + 16 * a]; },
                          [&](int d, int b) { return stage[d * kStageStride + tx + 16 * b]; });
    }
    // dP = dO . v, one 64-channel chunk of v at a time.
    float dp[TI][4];
    zero(dp);
    for (int c0 = 0; c0 < dv; c0 += kChunk) {
      __syncthreads();
      load_tile<kChunk, kChunk>(stage, kStageStride, 1, v_slab, v.stride_c, v.stride_l, c0, dv, k0, lk, 1.f);
      __syncthreads();
      accumulate_products(dp, min(kChunk, dv - c0), [&](int c, int a) { return grad_s[(c0 + c) * RS + ty + 16 * a]; },
                          [&](int c, int b) { return stage[c * kStageStride + tx + 16 * b]; });
    }
    // dS = P * (dP - delta), zero outside the valid keys (rows past lq are never stored).
#pragma unroll
    for (int a = 0; a < TI; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const bool key_valid = k0 + tx + 16 * b < lk;
        const float p = exp2f(s[a][b] - lse_log2[a]);
        ds_s[(ty + 16 * a) * kStageStride + tx + 16 * b] = key_valid ? p * (dp[a][b] - row_delta[a]) : 0.f;
      }

    // dq += dS k, one 64-channel chunk of k at a time; tx + 16 b indexes channels.
    const int jc = min(kChunk, lk - k0);
#pragma unroll
    for (int cc = 0; cc < G::kAccChunks; ++cc) {
      if (cc * kChunk < dqk) {
        __syncthreads();  // ds_s written, stage free
        load_tile<kChunk, kChunk>(stage, kStageStride, 1, k_slab, k.stride_c, k.stride_l, cc * kChunk, dqk, k0, lk, 1.f);
        __syncthreads();
#pragma unroll 4
        for (int j = 0; j < jc; ++j) {
          float dsa[TI], kb[4];
#pragma unroll
          for (int a = 0; a < TI; ++a) dsa[a] = ds_s[(ty + 16 * a) * kStageStride + j];
#pragma unroll
          for (int b = 0; b < 4; ++b) kb[b] = stage[(tx + 16 * b) * kStageStride + j];
#pragma unroll
          for (int a = 0; a < TI; ++a)
#pragma unroll
            for (int b = 0; b < 4; ++b) acc[cc][a][b] = fmaf(dsa[a], kb[b], acc[cc][a][b]);
        }
      }
    }
  }

  store_accumulators<BQ>(head.qk(grad_q), grad_q, stage, dqk, q0, lq, scale, ty, tx,
                         [&](int cc, int a, int b) { return acc[cc][a][b]; });
}

}  // namespace
}  // namespace fastattn
