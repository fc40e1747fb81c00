// Tensor-core attention forward, __half (one dtype per file so the build parallelises).
#include "launch.cuh"

namespace fastattn {
namespace attention_mma {
template void run_forward<__half>(const ForwardParams&, bool, int, cudaStream_t);
}  // namespace attention_mma
}  // namespace fastattn
