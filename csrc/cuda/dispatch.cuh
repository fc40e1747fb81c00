// The dtypes the CUDA kernels are compiled for: float32, float16, bfloat16. float64 is not among
// them: fastattn/_backend.py sends float64 CUDA tensors to the reference backend, so float64
// kernels would never run (and the Triton backend has none either).
#pragma once

#include <ATen/Dispatch.h>

#define FASTATTN_DISPATCH_FLOAT_HALF_BFLOAT16(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)              \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
