// Framework-free types shared by the pyopd kernels. No torch, no pybind11.
// Conversions live with each backend (csrc/cpu/float_convert.h, cuda_bf16.h):
// the CPU kernels are compiled once per instruction set, so shared inline
// functions here could be merged across those builds by the linker.
#pragma once

#include <cstdint>

namespace pyopd {

// Element type of an input or output buffer. Values are part of the binary
// interface with pyopd/ops/vocab.py (_DTYPE_TAG); never renumber.
enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// Storage types for the 16-bit formats: raw bits, converted by hand so the
// kernels need neither compiler extensions nor F16C at run time.
struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

}  // namespace pyopd
