// What the host code hands the tensor-core attention kernels: plain structs, no ATen, so that the
// kernel files compile without torch's headers and the host side (api.cu) builds them once.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastattn {
namespace attention_mma {

// One (N, C, L) tensor seen through its strides. vec: 16-byte copies along the tile's contiguous
// axis are legal (that axis has unit stride, every head's slab and row start is 16-byte aligned);
// decided per launch on the host, else the tile goes element by element.
struct Operand {
  void* ptr;
  int64_t stride_n, stride_c, stride_l;
  bool vec;
  // Element (n, channel0, 0): the start of one head's channel slab.
  template <typename T>
  __device__ T* slab(int64_t n, int64_t channel0) const {
    return static_cast<T*>(ptr) + n * stride_n + channel0 * stride_c;
  }
};

struct Shape {
  int64_t batch_heads;  // N * heads
  int heads, dqk, dv, lq, lk;
};

struct ForwardParams {
  Operand q, k, v, out;
  float* lse;        // (N, heads, Lq) contiguous, natural log
  Shape shape;
  float scale_log2;  // scale * log2(e)
};

struct BackwardParams {
  Operand q, k, v, grad_out, grad_q, grad_k, grad_v;
  const float* lse;    // (N, heads, Lq) contiguous, natural log
  const float* delta;  // (N, heads, Lq) contiguous: rowsum(dO * O)
  Shape shape;
  float scale, scale_log2;
};

// Padded head-dim blocks the kernels are built for; larger heads keep the FFMA kernels (registers:
// a warp's 16 output rows hold d / 2 float accumulators per lane, two such sets in the dk/dv kernel).
constexpr int kMaxForwardHeadDim = 256;
constexpr int kMaxBackwardHeadDim = 128;

// Launchers (launch.cuh, instantiated per dtype in forward_*.cu / backward_*.cu). T is __half or
// __nv_bfloat16; l_contiguous selects tiles stored L-contiguous in shared memory (NCHW inputs),
// else channel-contiguous (channels_last inputs).
template <typename T>
void run_forward(const ForwardParams& params, bool l_contiguous, int head_dim_block, cudaStream_t stream);
template <typename T>
void run_backward(const BackwardParams& params, bool l_contiguous, int head_dim_block, cudaStream_t stream);

}  // namespace attention_mma
}  // namespace fastattn
