// Error messages of the CUDA ops' host code.
//
// Each message is assembled into one std::string without iostreams and handed to TORCH_CHECK as
// its only message argument (c10::str passes a lone string through). On the GPU machine (torch
// 2.11), streaming an integer into a TORCH_CHECK message from nvcc-compiled host code crashed
// inside libstdc++'s ostream (gdb: basic_ostream::_M_insert<long> in this library).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace fastattn {
namespace message_detail {

inline std::string part(const char* text) { return text; }
inline std::string part(const std::string& text) { return text; }
inline std::string part(int64_t value) { return std::to_string(value); }
inline std::string part(int value) { return std::to_string(value); }
inline std::string part(size_t value) { return std::to_string(value); }
inline std::string part(at::ScalarType dtype) { return c10::toString(dtype); }
inline std::string part(const c10::Device& device) { return device.str(); }
inline std::string part(at::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + std::to_string(sizes[i]);
  return text + "]";
}

}  // namespace message_detail

// The parts (text, integers, dtypes, devices, shapes) written one after another.
template <typename... Parts>
std::string message_text(const Parts&... parts) {
  std::string text;
  for (const std::string& piece : {message_detail::part(parts)...}) text += piece;
  return text;
}

}  // namespace fastattn
