// Tensor-core attention backward (dk/dv and dq kernels), __half (one dtype per file so the build parallelises).
#include "launch.cuh"

namespace fastattn {
namespace attention_mma {
template void run_backward<__half>(const BackwardParams&, bool, int, cudaStream_t);
}  // namespace attention_mma
}  // namespace fastattn
