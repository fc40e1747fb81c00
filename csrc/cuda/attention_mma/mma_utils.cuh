// PTX wrappers of the tensor-core attention (sm_80+): cp.async, ldmatrix, mma.sync m16n8k16,
// and the fragment layouts they imply, from the PTX ISA ("Matrix Fragments for mma.m16n8k16",
// "ldmatrix"). Notation: lane = threadIdx.x % 32, g = lane / 4 (group), t = lane % 4 (thread in group).
//
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D (16x8, f32) = A (16x16) * B (16x8) + C.
//   A, four .b32 registers of two 16-bit elements each (low half = lower column):
//     a0 = A[g    ][2t, 2t+1]    a1 = A[g + 8][2t, 2t+1]
//     a2 = A[g    ][2t+8, 2t+9]  a3 = A[g + 8][2t+8, 2t+9]
//   B, two registers (low half = lower row):
//     b0 = B[2t, 2t+1][g]        b1 = B[2t+8, 2t+9][g]
//   C and D, four floats:
//     c0, c1 = C[g][2t, 2t+1]    c2, c3 = C[g + 8][2t, 2t+1]
// So the C fragments of two adjacent n8 blocks (columns 16kk..16kk+7 and 16kk+8..16kk+15) are,
// packed pairwise to 16 bits, exactly the A fragment of the k16 block kk: a0 = (c0, c1) of the
// first, a1 = (c2, c3) of the first, a2 = (c0, c1) of the second, a3 = (c2, c3) of the second.
// That is how P (and dS) go from one mma's accumulator to the next mma's A operand in registers.
//
// ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8x8 matrices; lanes 8i..8i+7 give the addresses
// of rows 0..7 of matrix i (16 contiguous bytes each, 16-byte aligned). Register r_i of a lane
// receives M_i[g][2t, 2t+1]; with .trans it receives M_i[2t][g], M_i[2t+1][g] (the transpose).
//
// Both A and B are read as a logical X[row][k] with each lane needing X[row0 + g (+8)][k0 + 2t (+1) (+8)]:
// A is X = A (row = m), B is X = B^T (row = n). For the B operand of two n8 blocks at once, the x4
// load returns b0, b1 of rows row0..row0+7 and then b0, b1 of rows row0+8..row0+15.
// When X is stored with k contiguous (X[row][k] at base[row * stride + k]) a plain ldmatrix of the
// 8x8 block (rb, kb) gives M[g][2t] = X[row0 + rb + g][k0 + kb + 2t]. When X is stored transposed
// (X[row][k] at base[k * stride + row]), the rows handed to ldmatrix are k0 + kb + 0..7 and .trans
// gives M[2t][g] = X[row0 + rb + g][k0 + kb + 2t]: the same register contents. That is how an
// L-contiguous (NCHW) tile is read as the operand of either product without a transpose.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fastattn {
namespace attention_mma {

// Copies src_bytes (0..16) from global to shared memory and zero-fills the rest of the 16 bytes,
// asynchronously (cp.async.cg: cached in L2 only). src must be 16-byte aligned even for 0 bytes.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The 16x16 block (row0.., k0..) of X, as the A fragment (kOrderA: a0..a3) or as the B fragments
// of the two n8 blocks row0..row0+7 and row0+8..row0+15 ({b0, b1} then {b0, b1}).
// kKContiguous: X[row][k] = base[row * stride + k]; otherwise X[row][k] = base[k * stride + row].
template <bool kKContiguous, bool kOrderA, typename T>
__device__ __forceinline__ void load_fragment(uint32_t (&r)[4], const T* base, int stride, int row0, int k0) {
  const int lane = threadIdx.x % 32;
  const int matrix = lane / 8, row_in_matrix = lane % 8;
  // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
  // B: matrices (rows 0-7, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 0-7), (rows 8-15, k 8-15)
  const int rb = kOrderA ? (matrix % 2) * 8 : (matrix / 2) * 8;
  const int kb = kOrderA ? (matrix / 2) * 8 : (matrix % 2) * 8;
  if constexpr (kKContiguous) {
    ldmatrix_x4(r, base + (row0 + rb + row_in_matrix) * stride + k0 + kb);
  } else {
    ldmatrix_x4_trans(r, base + (k0 + kb + row_in_matrix) * stride + row0 + rb);
  }
}

// d += a * b for one m16n8k16 block, float accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A float rounded to T (explicitly: torch builds with the implicit 16-bit conversions switched off).
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats rounded to T and packed into one register, lo in the low 16 bits.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// The A fragment of k16 block kk from the accumulators of n8 blocks 2kk and 2kk + 1 (see above).
template <typename T>
__device__ __forceinline__ void accumulators_to_a(uint32_t (&a)[4], const float (&first)[4], const float (&second)[4]) {
  a[0] = pack2<T>(first[0], first[1]);
  a[1] = pack2<T>(first[2], first[3]);
  a[2] = pack2<T>(second[0], second[1]);
  a[3] = pack2<T>(second[2], second[3]);
}

// Max and sum over the 4 lanes of a group (the lanes holding one accumulator row).
__device__ __forceinline__ float group_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float group_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace attention_mma
}  // namespace fastattn
