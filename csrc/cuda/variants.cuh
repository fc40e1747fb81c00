// Which CUDA kernel variants run. A variant that has not passed the GPU test suite on a real GPU
// runs only when FASTATTN_UNVERIFIED_KERNELS names it, with the meaning of fastattn/_verified.py:
// "1" or "all" for every variant, or a comma-separated list of names. Each variant's verified flag
// here mirrors its `verified` entry there (tests/test_build.py checks that they agree).
#pragma once

#include <cstdlib>
#include <algorithm>
#include <string>

namespace fastattn {
namespace variants {

// cuda_attention_mma: attention forward and backward on tensor cores (csrc/cuda/attention_mma/).
constexpr bool kCudaAttentionMmaVerified = false;

// Whether FASTATTN_UNVERIFIED_KERNELS turns on the variant `name`. Read at every call, not cached:
// a getenv per op launch is cheap on the host, and a process (a test) that sets the variable after
// its first CUDA call still gets what it asked for.
inline bool unverified_enabled(const char* name) {
  const char* raw = std::getenv("FASTATTN_UNVERIFIED_KERNELS");
  if (raw == nullptr) return false;
  const std::string text(raw);
  auto trim = [](const std::string& s) {
    const size_t first = s.find_first_not_of(" \t\n\r");
    if (first == std::string::npos) return std::string();
    return s.substr(first, s.find_last_not_of(" \t\n\r") - first + 1);
  };
  const std::string whole = trim(text);
  if (whole.empty() || whole == "0") return false;
  if (whole == "1" || whole == "all") return true;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = std::min(text.find(',', start), text.size());
    if (trim(text.substr(start, comma - start)) == name) return true;
    start = comma + 1;
  }
  return false;
}

inline bool cuda_attention_mma_enabled() {
  return kCudaAttentionMmaVerified || unverified_enabled("cuda_attention_mma");
}

}  // namespace variants
}  // namespace fastattn
