// Scalar conversions between the storage formats and float, written so that
// the compiler can vectorise them. Every function is `static inline`
// (internal linkage): this header is compiled once per instruction set and
// the copies must never be merged by the linker.
#pragma once

#include <cstdint>
#include <cstring>

#include "pyopd/common.h"

namespace pyopd {
namespace cpu {

static inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// c ? a : b without control flow (a `?:` lets GCC move float arithmetic into a
// branch, which blocks vectorisation without masked operations).
static inline uint32_t blend_u32(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

static inline float load_as_float(const float* p, int64_t i) { return p[i]; }
static inline float load_as_float(const bf16_t* p, int64_t i) {
  return bits_to_float(uint32_t(p[i].bits) << 16);
}
// IEEE half -> single, branch-free: normals and subnormals by a multiply with
// 2^112, inf/NaN by forcing the exponent to all ones.
static inline float load_as_float(const fp16_t* p, int64_t i) {
  const uint32_t h = p[i].bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  uint32_t mb = float_to_bits(bits_to_float(em << 13) * 0x1p112f);
  mb = blend_u32(em >= 0x7c00u, mb | 0x7f800000u, mb);
  return bits_to_float(mb | sign);
}
static inline double load_as_double(const double* p, int64_t i) { return p[i]; }

// single -> bfloat16, round to nearest even; NaN stays a quiet NaN.
static inline uint16_t bf16_bits_from_float(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(blend_u32(is_nan, (u >> 16) | 0x40u, rounded));
}

// single -> IEEE half, round to nearest even, overflow to inf, NaN kept.
// Branch-free (all three cases computed, then blended) so that a loop that
// stores half-precision gradients vectorises.
static inline uint16_t fp16_bits_from_float(float f) {
  const uint32_t w = float_to_bits(f);
  const uint32_t sign = (w >> 16) & 0x8000u;
  const uint32_t a = w & 0x7fffffffu;
  const bool small = a < 0x38800000u;
  // Below 2^-14: a subnormal half. Adding 0.5 puts the half's last bit at the
  // float's last bit, so the FPU does the round-to-nearest-even. (Large
  // inputs are masked to 0 first so the add never overflows.)
  const uint32_t sub = float_to_bits(bits_to_float(a & (0u - uint32_t(small))) + 0.5f) - 0x3f000000u;
  // Normal: rebias the exponent (-112 << 23) and round the 13 dropped bits.
  const uint32_t norm = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  uint32_t h = blend_u32(small, sub, norm);
  h = blend_u32(a >= 0x477ff000u, 0x7c00u, h);  // rounds past 65504: inf
  h = blend_u32(a > 0x7f800000u, 0x7e00u, h);   // NaN
  return static_cast<uint16_t>(sign | h);
}

static inline void store_from_float(float* p, int64_t i, float v) { p[i] = v; }
static inline void store_from_float(bf16_t* p, int64_t i, float v) {
  p[i].bits = bf16_bits_from_float(v);
}
static inline void store_from_float(fp16_t* p, int64_t i, float v) {
  p[i].bits = fp16_bits_from_float(v);
}
static inline void store_from_double(double* p, int64_t i, double v) { p[i] = v; }

}  // namespace cpu
}  // namespace pyopd
