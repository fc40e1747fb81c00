// Forward of spatial attention on tensor cores (FlashAttention-2's loop):
//   out[i] = sum_j softmax_j(scale * q[i] . k[j]) v[j],   lse[i] = log sum_j exp(scale * q[i] . k[j])
// A CTA owns kBlockM queries of one (n, head), 16 per warp; it streams the keys in tiles of kBlockN,
// K and V double-buffered in shared memory through cp.async (the next tile loads while this one is
// used). Per key tile, each warp: S = Q K^T (mma, float accumulators), online softmax in the log2
// domain (exp2 of scale * log2(e) * S minus the running max), then O += P V with P taken from S's
// accumulators as the A operand (no trip through shared memory). The output is normalised once at
// the end, staged through shared memory and written with 16-byte stores.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernel_traits.cuh"
#include "mma_utils.cuh"
#include "params.cuh"
#include "tile_io.cuh"
#include "warp_gemm.cuh"

namespace fastattn {
namespace attention_mma {

constexpr float kLn2 = 0.6931471805599453f;

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, Traits::kMinCtasPerSm)
attention_mma_forward_kernel(const ForwardParams params) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using T = typename Traits::Element;
  using QTile = typename Traits::QTile;
  using KVTile = typename Traits::KVTile;
  constexpr int D = Traits::kHeadDim, kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kThreads = Traits::kThreads;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* k_s = q_s + QTile::kElems;                        // [kStages] K tiles
  T* v_s = k_s + Traits::kStages * KVTile::kElems;     // [kStages] V tiles

  const Shape& shape = params.shape;
  const CtaHead head(shape);
  if (head.bh >= shape.batch_heads) return;
  const int dqk = shape.dqk, dv = shape.dv, lq = shape.lq, lk = shape.lk;
  const int q0 = blockIdx.x * kBlockM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
  const int warp_row0 = 16 * warp;

  const T* q_slab = head.slab<const T>(params.q, dqk);
  const T* k_slab = head.slab<const T>(params.k, dqk);
  const T* v_slab = head.slab<const T>(params.v, dv);

  auto load_key_tile = [&](int tile, int stage) {
    load_kv_stage<KVTile, kThreads>(k_s, v_s, stage, k_slab, v_slab, params, tile * kBlockN);
  };
  load_tile<QTile, kThreads>(q_s, q_slab, params.q, q0, lq, dqk);
  load_key_tile(0, 0);
  cp_async_commit();

  float acc[D / 8][4];  // O[warp_row0 + g (+8)][8 cb + 2t (+1)], unnormalised
  zero(acc);
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 domain, rows g and g + 8
  float row_sum[2] = {0.f, 0.f};              // this lane's part; summed over the group at the end

  const int n_tiles = (lk + kBlockN - 1) / kBlockN;
  for (int tile = 0; tile < n_tiles; ++tile) {
    const int k0 = tile * kBlockN, stage = tile % Traits::kStages;
    advance_stages<Traits::kStages>(tile, n_tiles, load_key_tile);
    const T* k_tile = k_s + stage * KVTile::kElems;
    const T* v_tile = v_s + stage * KVTile::kElems;

    // S = Q K^T over the 16-channel steps that hold real channels (the rest are zero padding).
    float s[kBlockN / 8][4];
    zero(s);
    gemm_by_position<QTile, KVTile, kBlockN>(s, q_s, warp_row0, k_tile, dqk);

    // Online softmax. Keys past lk (last tile only) get -inf. A row whose logits so far are all
    // -inf keeps a shift of 0, so its weights and alpha are exp2(-inf) = 0, not NaN.
    const bool edge = k0 + kBlockN > lk;
#pragma unroll
    for (int nb = 0; nb < kBlockN / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nb][e] *= params.scale_log2;
        if (edge && k0 + 8 * nb + 2 * t + e % 2 >= lk) s[nb][e] = -INFINITY;
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < kBlockN / 8; ++nb) tile_max = fmaxf(tile_max, fmaxf(s[nb][2 * r], s[nb][2 * r + 1]));
      const float m_new = fmaxf(row_max[r], group_max(tile_max));
      const float m_shift = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(row_max[r] - m_shift);
      row_max[r] = m_new;
      float tile_sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < kBlockN / 8; ++nb)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          s[nb][2 * r + c] = exp2f(s[nb][2 * r + c] - m_shift);
          tile_sum += s[nb][2 * r + c];
        }
      row_sum[r] = row_sum[r] * alpha + tile_sum;
#pragma unroll
      for (int cb = 0; cb < D / 8; ++cb) {
        acc[cb][2 * r] *= alpha;
        acc[cb][2 * r + 1] *= alpha;
      }
    }

    // O += P V, P rounded to T as the A operand; V's zero rows past lk meet P's zeros.
    gemm_weights<KVTile, kBlockN>(acc, s, v_tile, dv);
  }

  // lse (natural log) and out = O / l. As in the FFMA kernel: lse = -inf and out = 0 * inf (NaN)
  // only where every logit is -inf.
  float inv_sum[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = group_sum(row_sum[r]);
    inv_sum[r] = 1.f / total;
    const int i = q0 + warp_row0 + lane / 4 + 8 * r;
    if (t == 0 && i < lq) params.lse[head.bh * lq + i] = (row_max[r] + log2f(total)) * kLn2;
  }
  __syncthreads();  // every warp is done reading q_s: it becomes the output tile
  accumulators_to_tile<QTile>(q_s, acc, warp_row0, inv_sum);
  __syncthreads();
  T* out_slab = head.slab<T>(params.out, dv);
  store_tile<QTile, kThreads>(out_slab, params.out, q_s, q0, lq, dv);
#endif
}

}  // namespace attention_mma
}  // namespace fastattn
