// CUDA kernels of spatial (non-local) attention over the L positions of (N, C, L) maps:
//   out[n, h*dv + c, i] = sum_j softmax_j(scale * sum_d q[n, h*dqk + d, i] k[n, h*dqk + d, j]) v[n, h*dv + c, j]
// Flash-style: the Lq x Lk matrix is never written; the forward keeps a running max and
// sum per query (online softmax) and saves lse; the backward recomputes P from lse.
//
// Kernels (one thread block of 256 threads per tile, 16 x 16 thread grid):
//   spatial_attention_forward_kernel   one query tile, loops over key tiles    -> out, lse
//   attention_backward_delta_kernel    D = rowsum(dO * O)                      -> delta
//   attention_backward_dkdv_kernel     one key tile, loops over query tiles    -> dk, dv
//   attention_backward_dq_kernel       one query tile, loops over key tiles    -> dq
// No atomics anywhere: every output element is written by one thread, in a fixed order,
// so the results are bitwise deterministic.
//
// Tiles go through shared memory as float, loaded from strided global memory with the
// warp's consecutive threads along whichever of C or L has unit stride (NCHW-contiguous
// and channel-last inputs are both read in place). Arithmetic is plain float32 FFMA for
// every dtype. Logits are kept in the log2 domain (q pre-scaled by scale * log2(e)) so
// that exp2f, a single fast instruction under --use_fast_math, computes the softmax.
//
// This file is the host side (checks, dispatch, launches). The kernels live in attention_fma/:
// tiles.cuh (tile copies, register-tile loops, geometry), forward.cuh, backward.cuh; the
// tensor-core variant in attention_mma/ (docs/cuda-attention.md).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "attention_fma/backward.cuh"
#include "attention_fma/forward.cuh"
#include "attention_mma/api.cuh"
#include "dispatch.cuh"
#include "message.cuh"

#include <algorithm>
#include <climits>
#include <string>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastattn {
namespace {

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------
// "spatial_attention (CUDA): " and the parts (message.cuh says why not TORCH_CHECK's own streaming)
template <typename... Parts>
std::string message(const Parts&... parts) {
  return message_text("spatial_attention (CUDA): ", parts...);
}

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), message(name, " must be a CUDA tensor, got device ", t.device()));
  TORCH_CHECK(t.device() == q.device(), message(name, " is on ", t.device(), " but q is on ", q.device()));
  TORCH_CHECK(t.dim() == 3, message(name, " must be 3-D (N, C, L), got shape ", t.sizes()));
  TORCH_CHECK(t.scalar_type() == q.scalar_type(),
              message(name, " has dtype ", t.scalar_type(), " but q has dtype ", q.scalar_type()));
}

// Checks q, k, v and returns their attention shape.
AttnShape attention_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads) {
  check_operand(q, "q", q);
  check_operand(k, "k", q);
  check_operand(v, "v", q);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              message("dtype must be float32, float16 or bfloat16, got ", dtype));
  TORCH_CHECK(heads >= 1, message("heads must be >= 1, got ", heads));
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0),
              message("batch sizes differ: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes()));
  TORCH_CHECK(k.size(1) == q.size(1),
              message("q and k must have the same channels, got q ", q.sizes(), " and k ", k.sizes()));
  TORCH_CHECK(v.size(2) == k.size(2),
              message("k and v must have the same length, got k ", k.sizes(), " and v ", v.sizes()));
  TORCH_CHECK(q.size(1) % heads == 0 && v.size(1) % heads == 0,
              message("heads=", heads, " must divide the channels of q ", q.sizes(), " and v ", v.sizes()));
  const int64_t dqk = q.size(1) / heads, dv = v.size(1) / heads;
  TORCH_CHECK(dqk >= 1, message("q and k need at least one channel per head, got ", q.sizes(), " with heads=", heads));
  TORCH_CHECK(dqk <= kMaxHeadDim && dv <= kMaxHeadDim,
              message("head dims up to ", kMaxHeadDim, " are supported, got d_qk=", dqk, ", d_v=", dv));
  // positions and channels are int in the kernels (offsets are int64): keep a tile of headroom
  TORCH_CHECK(q.size(2) <= INT_MAX - kChunk && k.size(2) <= INT_MAX - kChunk,
              message("lengths up to ", INT_MAX - kChunk, " are supported, got Lq=", q.size(2), ", Lk=", k.size(2)));
  const int64_t batch_heads = q.size(0) * heads;
  TORCH_CHECK(batch_heads <= int64_t{65535} * 65535, message("N * heads = ", batch_heads, " is too large for the grid"));
  return {batch_heads, static_cast<int>(heads), static_cast<int>(dqk), static_cast<int>(dv),
          static_cast<int>(q.size(2)), static_cast<int>(k.size(2))};
}

// Grid of (tiles along L, N * heads folded into y and z).
dim3 attention_grid(int tiles, int64_t batch_heads) {
  const int64_t y = std::min<int64_t>(batch_heads, 65535);
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(y), static_cast<unsigned>(ceil_div(batch_heads, y)));
}

// Raises the kernel's dynamic shared-memory limit to smem_bytes, after checking the device has it.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t smem_bytes, const char* what) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(smem_bytes <= props->sharedMemPerBlockOptin,
              message(what, " needs ", smem_bytes, " bytes of shared memory per block, the device allows ",
                      props->sharedMemPerBlockOptin));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)));
}

std::tuple<at::Tensor, at::Tensor> spatial_attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, int64_t heads, double scale) {
  const AttnShape shape = attention_shape(q, k, v, heads);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t n = q.size(0), cv = v.size(1), lq = q.size(2);
  // out is channel-last when q is (as the reference does), else contiguous
  const bool channel_last = q.stride(1) == 1 && q.size(1) > 1;
  at::Tensor out = channel_last ? at::empty({n, lq, cv}, q.options()).transpose(1, 2) : at::empty({n, cv, lq}, q.options());
  at::Tensor lse = at::empty({n, heads, lq}, q.options().dtype(at::kFloat));
  if (shape.batch_heads == 0 || lq == 0) return {out, lse};
  if (shape.lk == 0) {  // softmax over no keys: the reference's empty sum
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const float scale_log2 = static_cast<float>(scale) * kLog2e;
  if (attention_mma::forward_applies(q, shape)) {  // tensor cores, when switched on (variants.cuh)
    attention_mma::forward(q, k, v, out, lse, shape, scale_log2);
    return {out, lse};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTATTN_DISPATCH_FLOAT_HALF_BFLOAT16(q.scalar_type(), "spatial_attention_forward_cuda", [&] {
    with_tile_rows(std::max(shape.dqk, shape.dv), [&](auto tile) {
      constexpr int BQ = decltype(tile)::value;
      auto kernel = spatial_attention_forward_kernel<scalar_t, BQ>;
      const size_t smem = forward_smem_bytes<BQ>(shape.dqk);
      allow_dynamic_smem(kernel, smem, "the forward kernel");
      kernel<<<attention_grid(ceil_div(shape.lq, BQ), shape.batch_heads), kThreads, smem, stream>>>(
          operand<const scalar_t>(q), operand<const scalar_t>(k), operand<const scalar_t>(v), operand<scalar_t>(out),
          lse.data_ptr<float>(), shape, scale_log2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t heads, double scale) {
  const AttnShape shape = attention_shape(q, k, v, heads);
  check_operand(grad_out, "grad_out", q);
  check_operand(out, "out", q);
  const std::vector<int64_t> out_shape{q.size(0), v.size(1), q.size(2)};
  const std::vector<int64_t> lse_shape{q.size(0), heads, q.size(2)};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape) && out.sizes() == at::IntArrayRef(out_shape),
              message("backward: grad_out and out must have shape ", at::IntArrayRef(out_shape), ", got ",
                      grad_out.sizes(), " and ", out.sizes()));
  TORCH_CHECK(lse.is_cuda() && lse.device() == q.device() && lse.scalar_type() == at::kFloat,
              message("backward: lse must be a float32 tensor on ", q.device(), ", got ", lse.scalar_type(), " on ",
                      lse.device()));
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lse_shape),
              message("backward: lse must have shape (N, heads, Lq) = ", at::IntArrayRef(lse_shape), ", got ",
                      lse.sizes()));
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::empty_like(k);
  at::Tensor grad_v = at::empty_like(v);
  if (shape.batch_heads == 0) return {grad_q, grad_k, grad_v};
  if (shape.lq == 0 || shape.lk == 0) {  // no attention pairs: every gradient is zero
    grad_q.zero_();
    grad_k.zero_();
    grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor delta = at::empty({q.size(0), heads, q.size(2)}, q.options().dtype(at::kFloat));
  const float scale_f = static_cast<float>(scale);
  const float scale_log2 = scale_f * kLog2e;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int max_dim = std::max(shape.dqk, shape.dv);

  FASTATTN_DISPATCH_FLOAT_HALF_BFLOAT16(q.scalar_type(), "spatial_attention_backward_cuda", [&] {
    const auto grad_out_op = operand<const scalar_t>(grad_out);
    const auto q_op = operand<const scalar_t>(q);
    const auto k_op = operand<const scalar_t>(k);
    const auto v_op = operand<const scalar_t>(v);

    attention_backward_delta_kernel<scalar_t>
        <<<attention_grid(ceil_div(shape.lq, kChunk), shape.batch_heads), kThreads, 0, stream>>>(
            grad_out_op, operand<const scalar_t>(out), delta.data_ptr<float>(), shape);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // Tensor cores when switched on (variants.cuh). Either forward's lse fits either backward:
    // both are the natural-log log-sum-exp of the float32 logits.
    if (attention_mma::backward_applies(q, shape)) {
      attention_mma::backward(grad_out, q, k, v, lse_c, delta, grad_q, grad_k, grad_v, shape, scale_f, scale_log2);
      return;
    }
    with_tile_rows(max_dim, [&](auto tile) {
      constexpr int TILE = decltype(tile)::value;
      const size_t smem = backward_smem_bytes<TILE>(shape.dqk, shape.dv);

      auto dkdv_kernel = attention_backward_dkdv_kernel<scalar_t, TILE>;
      allow_dynamic_smem(dkdv_kernel, smem, "the dk/dv kernel");
      dkdv_kernel<<<attention_grid(ceil_div(shape.lk, TILE), shape.batch_heads), kThreads, smem, stream>>>(
          grad_out_op, q_op, k_op, v_op, lse_c.data_ptr<float>(), delta.data_ptr<float>(), operand<scalar_t>(grad_k),
          operand<scalar_t>(grad_v), shape, scale_f, scale_log2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      auto dq_kernel = attention_backward_dq_kernel<scalar_t, TILE>;
      allow_dynamic_smem(dq_kernel, smem, "the dq kernel");
      dq_kernel<<<attention_grid(ceil_div(shape.lq, TILE), shape.batch_heads), kThreads, smem, stream>>>(
          grad_out_op, q_op, k_op, v_op, lse_c.data_ptr<float>(), delta.data_ptr<float>(), operand<scalar_t>(grad_q),
          shape, scale_f, scale_log2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("spatial_attention_forward", &spatial_attention_forward_cuda);
  m.impl("spatial_attention_backward", &spatial_attention_backward_cuda);
}

}  // namespace fastattn
