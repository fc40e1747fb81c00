// Host side of the tensor-core attention: which cases it takes, the per-launch choice of tile
// layout and of 16-byte copies per operand, and the dtype dispatch to the per-dtype launchers.
#include "api.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "../variants.cuh"
#include "kernel_traits.cuh"

namespace fastattn {
namespace attention_mma {
namespace {

// The padded head-dim block of the kernels for head dims up to max_dim (0 if none fits).
int head_dim_block(const Shape& shape, int largest) {
  const int max_dim = std::max(shape.dqk, shape.dv);
  for (int block : {64, 128, 256}) {
    if (max_dim <= block && block <= largest) return block;
  }
  return 0;
}

// Calls body with a value of the kernels' element type for q's dtype: __half or __nv_bfloat16, the
// two that applies() admits.
template <typename Body>
void with_element_type(const at::Tensor& q, Body&& body) {
  if (q.scalar_type() == at::kHalf) {
    body(__half());
  } else {
    body(__nv_bfloat16());
  }
}

// Tiles are L-contiguous in shared memory unless q is channel-last (as the output, which follows q).
bool l_contiguous(const at::Tensor& q) { return !(q.stride(1) == 1 && q.size(1) > 1); }

// Shared memory of the kernels of a configuration (the dtype does not change it: both are 2 bytes).
template <typename Traits>
int forward_smem() { return Traits::kSmemBytes; }
template <typename Traits>
int backward_smem() { return std::max(Traits::kDkdvSmemBytes, Traits::kDqSmemBytes); }

int smem_bytes(bool forward, int block, bool l_contig) {
  auto pick = [&](auto l_tag) {
    constexpr bool kL = decltype(l_tag)::value;
    if (forward) {
      return block == 64 ? forward_smem<ForwardTraits<__half, 64, kL>>()
             : block == 128 ? forward_smem<ForwardTraits<__half, 128, kL>>()
                            : forward_smem<ForwardTraits<__half, 256, kL>>();
    }
    return block == 64 ? backward_smem<BackwardTraits<__half, 64, kL>>()
                       : backward_smem<BackwardTraits<__half, 128, kL>>();
  };
  return l_contig ? pick(std::true_type()) : pick(std::false_type());
}

bool applies(const at::Tensor& q, const Shape& shape, bool forward) {
  if (!variants::cuda_attention_mma_enabled()) return false;
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16) return false;
  const int block = head_dim_block(shape, forward ? kMaxForwardHeadDim : kMaxBackwardHeadDim);
  if (block == 0) return false;
  const auto* props = at::cuda::getDeviceProperties(q.device().index());
  return props->major >= 8 && static_cast<size_t>(smem_bytes(forward, block, l_contiguous(q))) <= props->sharedMemPerBlockOptin;
}

// t (N, C, L) with `head_dim` channels per head, for tiles that are L-contiguous or not: 16-byte
// copies need unit stride along the tile's contiguous axis and 16-byte aligned row starts of every
// head (base pointer, batch stride, the other axis' stride and, channel-contiguous, the head offset).
Operand operand(const at::Tensor& t, int head_dim, bool l_contig) {
  const int64_t unit = l_contig ? t.stride(2) : t.stride(1);
  const int64_t other = l_contig ? t.stride(1) : t.stride(2);
  const bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 && other % 8 == 0 &&
                       (l_contig || head_dim % 8 == 0);
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), unit == 1 && aligned};
}

}  // namespace

bool forward_applies(const at::Tensor& q, const Shape& shape) { return applies(q, shape, true); }
bool backward_applies(const at::Tensor& q, const Shape& shape) { return applies(q, shape, false); }

void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
             const at::Tensor& lse, const Shape& shape, float scale_log2) {
  const bool l_contig = l_contiguous(q);
  const ForwardParams params{operand(q, shape.dqk, l_contig), operand(k, shape.dqk, l_contig),
                             operand(v, shape.dv, l_contig),  operand(out, shape.dv, l_contig),
                             lse.data_ptr<float>(),           shape,
                             scale_log2};
  with_element_type(q, [&](auto element) {
    run_forward<decltype(element)>(params, l_contig, head_dim_block(shape, kMaxForwardHeadDim),
                                   at::cuda::getCurrentCUDAStream());
  });
}

void backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& grad_q, const at::Tensor& grad_k,
              const at::Tensor& grad_v, const Shape& shape, float scale, float scale_log2) {
  const bool l_contig = l_contiguous(q);
  const BackwardParams params{operand(q, shape.dqk, l_contig),
                              operand(k, shape.dqk, l_contig),
                              operand(v, shape.dv, l_contig),
                              operand(grad_out, shape.dv, l_contig),
                              operand(grad_q, shape.dqk, l_contig),
                              operand(grad_k, shape.dqk, l_contig),
                              operand(grad_v, shape.dv, l_contig),
                              lse.data_ptr<float>(),
                              delta.data_ptr<float>(),
                              shape,
                              scale,
                              scale_log2};
  with_element_type(q, [&](auto element) {
    run_backward<decltype(element)>(params, l_contig, head_dim_block(shape, kMaxBackwardHeadDim),
                                    at::cuda::getCurrentCUDAStream());
  });
}

}  // namespace attention_mma
}  // namespace fastattn
