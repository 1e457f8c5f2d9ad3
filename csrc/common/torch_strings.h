// Tensor facts as plain strings, for the bindings' TORCH_CHECK messages.
//
// Error messages carry only strings: dtypes, shapes, devices and numbers are formatted here and
// by std::to_string. On the H200 test machine (torch 2.11, extension built by the image's gcc) a
// TORCH_CHECK that streamed a number, ScalarType or IntArrayRef into c10::str's ostringstream
// crashed with SIGSEGV instead of raising; strings stream safely there.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace vllm_ampere {

inline const char* dtype_name(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    default: return "another dtype";
  }
}

inline std::string join(at::IntArrayRef values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + std::to_string(values[i]);
  return out + "]";
}

inline std::string shape(const at::Tensor& t) { return join(t.sizes()); }

inline std::string strides(const at::Tensor& t) { return join(t.strides()); }

inline std::string device_name(const at::Tensor& t) {
  return t.is_cuda() ? "cuda:" + std::to_string(t.get_device()) : "cpu";
}

}  // namespace vllm_ampere
