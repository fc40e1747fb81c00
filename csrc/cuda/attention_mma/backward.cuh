// Backward of spatial attention on tensor cores (FlashAttention-2's split into two kernels, so
// that no gradient needs atomics):
//   P = exp2(scale * log2(e) * q . k - lse * log2(e)),  dP = dO . v,  dS = P * (dP - delta),
//   dv[j] = sum_i P[i, j] dO[i],  dk[j] = scale * sum_i dS[i, j] q[i],  dq[i] = scale * sum_j dS[i, j] k[j]
// with delta = rowsum(dO * O) from the FFMA delta kernel of attention.cu. P is recomputed from the
// forward's lse (natural log, the same in either forward path).
//   attention_mma_backward_dkdv_kernel  one key block (16 keys per warp), streams the queries
//   attention_mma_backward_dq_kernel    one query block (16 queries per warp), streams the keys
// Streamed tiles are double-buffered through cp.async like the forward's. P^T and dS^T (dk/dv) and
// dS (dq) go from accumulators to A operands in registers, as the forward's P does.
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

constexpr float kLog2e = 1.4426950408889634f;

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, Traits::kMinCtasPerSm)
attention_mma_backward_dkdv_kernel(const BackwardParams params) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using T = typename Traits::Element;
  using KTile = typename Traits::KeyBlockTile;
  using QTile = typename Traits::QueryStreamTile;
  constexpr int D = Traits::kHeadDim, kKeys = Traits::kKeyBlock, kQueries = Traits::kQueryTile;
  constexpr int kThreads = Traits::kThreads, kStages = Traits::kStages;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* k_s = reinterpret_cast<T*>(smem_raw);
  T* v_s = k_s + KTile::kElems;
  T* q_s = v_s + KTile::kElems;                 // [kStages] Q tiles
  T* do_s = q_s + kStages * QTile::kElems;      // [kStages] dO tiles
  float* lse_s = reinterpret_cast<float*>(do_s + kStages * QTile::kElems);  // [kStages][kQueries], times log2(e)
  float* delta_s = lse_s + kStages * kQueries;                                // [kStages][kQueries]

  const Shape& shape = params.shape;
  const CtaHead head(shape);
  if (head.bh >= shape.batch_heads) return;
  const int dqk = shape.dqk, dv = shape.dv, lq = shape.lq, lk = shape.lk;
  const int k0 = blockIdx.x * kKeys;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
  const int warp_row0 = 16 * warp;

  const T* q_slab = head.slab<const T>(params.q, dqk);
  const T* k_slab = head.slab<const T>(params.k, dqk);
  const T* v_slab = head.slab<const T>(params.v, dv);
  const T* do_slab = head.slab<const T>(params.grad_out, dv);
  const float* lse_row = params.lse + head.bh * lq;
  const float* delta_row = params.delta + head.bh * lq;

  // Q, dO, lse and delta of query tile `tile` into stage `stage` (lse and delta by plain loads).
  auto load_query_tile = [&](int tile, int stage) {
    const int i0 = tile * kQueries;
    load_tile<QTile, kThreads>(q_s + stage * QTile::kElems, q_slab, params.q, i0, lq, dqk);
    load_tile<QTile, kThreads>(do_s + stage * QTile::kElems, do_slab, params.grad_out, i0, lq, dv);
    for (int i = threadIdx.x; i < kQueries; i += kThreads) {
      const bool valid = i0 + i < lq;
      lse_s[stage * kQueries + i] = valid ? lse_row[i0 + i] * kLog2e : 0.f;
      delta_s[stage * kQueries + i] = valid ? delta_row[i0 + i] : 0.f;
    }
  };

  load_tile<KTile, kThreads>(k_s, k_slab, params.k, k0, lk, dqk);
  load_tile<KTile, kThreads>(v_s, v_slab, params.v, k0, lk, dv);
  load_query_tile(0, 0);
  cp_async_commit();

  float acc_dk[D / 8][4], acc_dv[D / 8][4];  // rows: keys warp_row0 + g (+8); columns: channels
  zero(acc_dk);
  zero(acc_dv);

  const int n_tiles = (lq + kQueries - 1) / kQueries;
  for (int tile = 0; tile < n_tiles; ++tile) {
    const int i0 = tile * kQueries, stage = tile % kStages;
    advance_stages<kStages>(tile, n_tiles, load_query_tile);
    const T* q_tile = q_s + stage * QTile::kElems;
    const T* do_tile = do_s + stage * QTile::kElems;
    const float* lse_tile = lse_s + stage * kQueries;
    const float* delta_tile = delta_s + stage * kQueries;

    // P^T[j][i] = exp2(scale * log2(e) * k[j] . q[i] - lse[i] * log2(e)), 0 for queries past lq.
    float p[kQueries / 8][4];
    zero(p);
    gemm_by_position<KTile, QTile, kQueries>(p, k_s, warp_row0, q_tile, dqk);
    const bool edge = i0 + kQueries > lq;
#pragma unroll
    for (int nb = 0; nb < kQueries / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 8 * nb + 2 * t + e % 2;
        p[nb][e] = exp2f(p[nb][e] * params.scale_log2 - lse_tile[i]);
        if (edge && i0 + i >= lq) p[nb][e] = 0.f;
      }
    // dv += P^T dO
    gemm_weights<QTile, kQueries>(acc_dv, p, do_tile, dv);
    // dP^T[j][i] = v[j] . dO[i];  dS^T = P^T * (dP^T - delta[i]), in place of P^T
    float dp[kQueries / 8][4];
    zero(dp);
    gemm_by_position<KTile, QTile, kQueries>(dp, v_s, warp_row0, do_tile, dv);
#pragma unroll
    for (int nb = 0; nb < kQueries / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[nb][e] *= dp[nb][e] - delta_tile[8 * nb + 2 * t + e % 2];
    // dk += dS^T q (times scale at the end)
    gemm_weights<QTile, kQueries>(acc_dk, p, q_tile, dqk);
  }

  cp_async_wait<0>();
  __syncthreads();  // k_s and v_s become the dk and dv tiles
  const float dk_factor[2] = {params.scale, params.scale}, dv_factor[2] = {1.f, 1.f};
  accumulators_to_tile<KTile>(k_s, acc_dk, warp_row0, dk_factor);
  accumulators_to_tile<KTile>(v_s, acc_dv, warp_row0, dv_factor);
  __syncthreads();
  store_tile<KTile, kThreads>(head.slab<T>(params.grad_k, dqk), params.grad_k, k_s, k0, lk, dqk);
  store_tile<KTile, kThreads>(head.slab<T>(params.grad_v, dv), params.grad_v, v_s, k0, lk, dv);
#endif
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, Traits::kMinCtasPerSm)
attention_mma_backward_dq_kernel(const BackwardParams params) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using T = typename Traits::Element;
  using QTile = typename Traits::QueryBlockTile;
  using KTile = typename Traits::KeyStreamTile;
  constexpr int D = Traits::kHeadDim, kQueries = Traits::kQueryBlock, kKeys = Traits::kKeyTile;
  constexpr int kThreads = Traits::kThreads, kStages = Traits::kStages;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* do_s = q_s + QTile::kElems;
  T* k_s = do_s + QTile::kElems;            // [kStages] K tiles
  T* v_s = k_s + kStages * KTile::kElems;   // [kStages] V tiles

  const Shape& shape = params.shape;
  const CtaHead head(shape);
  if (head.bh >= shape.batch_heads) return;
  const int dqk = shape.dqk, dv = shape.dv, lq = shape.lq, lk = shape.lk;
  const int q0 = blockIdx.x * kQueries;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
  const int warp_row0 = 16 * warp;

  const T* q_slab = head.slab<const T>(params.q, dqk);
  const T* k_slab = head.slab<const T>(params.k, dqk);
  const T* v_slab = head.slab<const T>(params.v, dv);
  const T* do_slab = head.slab<const T>(params.grad_out, dv);

  auto load_key_tile = [&](int tile, int stage) {
    load_kv_stage<KTile, kThreads>(k_s, v_s, stage, k_slab, v_slab, params, tile * kKeys);
  };
  load_tile<QTile, kThreads>(q_s, q_slab, params.q, q0, lq, dqk);
  load_tile<QTile, kThreads>(do_s, do_slab, params.grad_out, q0, lq, dv);
  load_key_tile(0, 0);
  cp_async_commit();

  float lse_log2[2], row_delta[2];  // rows warp_row0 + g and + 8
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = q0 + warp_row0 + lane / 4 + 8 * r;
    lse_log2[r] = i < lq ? params.lse[head.bh * lq + i] * kLog2e : 0.f;
    row_delta[r] = i < lq ? params.delta[head.bh * lq + i] : 0.f;
  }
  float acc[D / 8][4];  // dq / scale: rows queries, columns channels
  zero(acc);

  const int n_tiles = (lk + kKeys - 1) / kKeys;
  for (int tile = 0; tile < n_tiles; ++tile) {
    const int k0 = tile * kKeys, stage = tile % kStages;
    advance_stages<kStages>(tile, n_tiles, load_key_tile);
    const T* k_tile = k_s + stage * KTile::kElems;
    const T* v_tile = v_s + stage * KTile::kElems;

    float p[kKeys / 8][4];  // P, then dS; 0 for keys past lk
    zero(p);
    gemm_by_position<QTile, KTile, kKeys>(p, q_s, warp_row0, k_tile, dqk);
    float dp[kKeys / 8][4];
    zero(dp);
    gemm_by_position<QTile, KTile, kKeys>(dp, do_s, warp_row0, v_tile, dv);
    const bool edge = k0 + kKeys > lk;
#pragma unroll
    for (int nb = 0; nb < kKeys / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float prob = exp2f(p[nb][e] * params.scale_log2 - lse_log2[e / 2]);
        p[nb][e] = prob * (dp[nb][e] - row_delta[e / 2]);
        if (edge && k0 + 8 * nb + 2 * t + e % 2 >= lk) p[nb][e] = 0.f;
      }
    // dq += dS k
    gemm_weights<KTile, kKeys>(acc, p, k_tile, dqk);
  }

  cp_async_wait<0>();
  __syncthreads();  // q_s becomes the dq tile
  const float factor[2] = {params.scale, params.scale};
  accumulators_to_tile<QTile>(q_s, acc, warp_row0, factor);
  __syncthreads();
  store_tile<QTile, kThreads>(head.slab<T>(params.grad_q, dqk), params.grad_q, q_s, q0, lq, dqk);
#endif
}

}  // namespace attention_mma
}  // namespace fastattn
