// The one dtype-dispatch idiom of the kernels: f(Tag<T>) for the storage type T
// of a dtype tag, used by the CPU and the CUDA host code alike (no torch).
#pragma once

#include "pyopd/common.h"

namespace pyopd {

template <typename T> struct Tag { using type = T; };

// All four tags; BF16 / FP16 are the backend's 16-bit storage types.
template <typename BF16, typename FP16, typename F>
inline const char* with_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kBFloat16: return f(Tag<BF16>{});
    case DType::kFloat16: return f(Tag<FP16>{});
    case DType::kFloat64: return f(Tag<double>{});
  }
  return "unknown dtype tag";
}

// float32 / float64 only (the signal kernels).
template <typename F>
inline const char* with_float_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kFloat64: return f(Tag<double>{});
    default: return "dtype must be float32 or float64";
  }
}

}  // namespace pyopd
