// The tensor-core attention as the CUDA ops' host code (csrc/cuda/attention.cu) sees it: whether it
// runs a case, and the calls that run it. Both are for float16 / bfloat16 on sm_80 and newer.
#pragma once

#include <ATen/ATen.h>

#include "params.cuh"

namespace fastattn {
namespace attention_mma {

// Whether the forward (backward) of this case runs on tensor cores: the variant is switched on
// (csrc/cuda/variants.cuh), q is float16 or bfloat16 on an sm_80+ device, the head dims fit the
// largest head-dim block and its shared memory fits the device. Otherwise the FFMA kernels run.
bool forward_applies(const at::Tensor& q, const Shape& shape);
bool backward_applies(const at::Tensor& q, const Shape& shape);

// out, lse: allocated by the caller with the op's shapes and layouts; lq, lk > 0.
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
             const at::Tensor& lse, const Shape& shape, float scale_log2);

// lse (natural log) and delta = rowsum(dO * O): contiguous (N, heads, Lq) float32; lq, lk > 0.
void backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& grad_q, const at::Tensor& grad_k,
              const at::Tensor& grad_v, const Shape& shape, float scale, float scale_log2);

}  // namespace attention_mma
}  // namespace fastattn
