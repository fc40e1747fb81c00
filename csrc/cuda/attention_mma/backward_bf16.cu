// Tensor-core attention backward (dk/dv and dq kernels), __nv_bfloat16 (one dtype per file so the build parallelises).
#include "launch.cuh"

namespace fastattn {
namespace attention_mma {
template void run_backward<__nv_bfloat16>(const BackwardParams&, bool, int, cudaStream_t);
}  // namespace attention_mma
}  // namespace fastattn
