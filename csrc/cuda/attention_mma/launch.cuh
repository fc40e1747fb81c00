// Host launchers of the tensor-core attention kernels: pick the kernel for the head-dim block and
// the tile layout, raise its shared-memory limit, launch on the given stream. Included by the
// per-dtype instantiation files (forward_fp16.cu, ...), each of which instantiates one dtype.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "backward.cuh"
#include "forward.cuh"
#include "kernel_traits.cuh"
#include "params.cuh"

namespace fastattn {
namespace attention_mma {

// Grid of (tiles along L, N * heads folded into y and z); the kernels unfold it with cta_batch_head.
inline dim3 launch_grid(int tiles, int64_t batch_heads) {
  const int64_t y = std::min<int64_t>(batch_heads, 65535);
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(y), static_cast<unsigned>((batch_heads + y - 1) / y));
}

inline int tiles(int length, int tile) { return (length + tile - 1) / tile; }

// Launches kernel(params) over (tiles of tile_rows along `length`, N * heads) with kThreads threads,
// after raising its dynamic shared-memory limit to smem_bytes (every configuration fits sm_80's 163 KB).
template <int kThreads, typename Kernel, typename Params>
void launch(Kernel kernel, int smem_bytes, int length, int tile_rows, const Params& params, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  kernel<<<launch_grid(tiles(length, tile_rows), params.shape.batch_heads), kThreads, smem_bytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls body with the head-dim block (std::integral_constant) and the layout flag as compile-time values.
template <int... kBlocks, typename Body>
void with_config(int head_dim_block, bool l_contiguous, Body&& body) {
  bool found = false;
  auto try_block = [&](auto block) {
    if (found || head_dim_block != decltype(block)::value) return;
    found = true;
    if (l_contiguous) {
      body(block, std::true_type());
    } else {
      body(block, std::false_type());
    }
  };
  (try_block(std::integral_constant<int, kBlocks>()), ...);
  TORCH_CHECK(found, "attention_mma: no kernel for head-dim block ", head_dim_block);
}

template <typename T>
void run_forward(const ForwardParams& params, bool l_contiguous, int head_dim_block, cudaStream_t stream) {
  with_config<64, 128, 256>(head_dim_block, l_contiguous, [&](auto block, auto layout) {
    using Traits = ForwardTraits<T, decltype(block)::value, decltype(layout)::value>;
    launch<Traits::kThreads>(attention_mma_forward_kernel<Traits>, Traits::kSmemBytes, params.shape.lq, Traits::kBlockM,
                             params, stream);
  });
}

template <typename T>
void run_backward(const BackwardParams& params, bool l_contiguous, int head_dim_block, cudaStream_t stream) {
  with_config<64, 128>(head_dim_block, l_contiguous, [&](auto block, auto layout) {
    using Traits = BackwardTraits<T, decltype(block)::value, decltype(layout)::value>;
    launch<Traits::kThreads>(attention_mma_backward_dkdv_kernel<Traits>, Traits::kDkdvSmemBytes, params.shape.lk,
                             Traits::kKeyBlock, params, stream);
    launch<Traits::kThreads>(attention_mma_backward_dq_kernel<Traits>, Traits::kDqSmemBytes, params.shape.lq,
                             Traits::kQueryBlock, params, stream);
  });
}

}  // namespace attention_mma
}  // namespace fastattn
