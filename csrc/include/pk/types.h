// SPDX-License-Identifier: Apache-2.0
// Element types usable on both sides: pk::half and pk::bfloat16 are CUDA's __half and
// __nv_bfloat16 under nvcc, and bit-identical emulations (round to nearest even) under PK_SIMT.
// Kernels load and store them and do their math in float: pk::to_float / pk::from_float<T>.
#pragma once

#include "pk/simt.h"

#ifdef PK_SIMT_ENABLED
#include <cmath>
#include <cstdint>
#include <cstring>

namespace pk {
namespace detail {

inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline std::uint16_t float_to_half_bits(float value) {
  const std::uint32_t f = float_bits(value);
  const std::uint32_t sign = (f >> 16) & 0x8000u;
  const std::uint32_t magnitude = f & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) return sign | (magnitude > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (magnitude < 0x38800000u) {                         // below 2^-14: a subnormal half
    // Multiplying by 2^24 is exact; nearbyint rounds to nearest even (the default mode).
    return sign | static_cast<std::uint16_t>(std::nearbyint(bits_float(magnitude) * 16777216.0f));
  }
  std::uint32_t h = ((magnitude >> 23) - 112u) << 10 | ((magnitude >> 13) & 0x3ffu);
  const std::uint32_t rest = magnitude & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent
  return static_cast<std::uint16_t>(sign | h);
}

inline float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  const std::uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    const float v = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24
    return sign ? -v : v;
  }
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline std::uint16_t float_to_bfloat16_bits(float value) {
  const std::uint32_t f = float_bits(value);
  if ((f & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((f >> 16) | 0x40u);  // quiet NaN
  return static_cast<std::uint16_t>((f + 0x7fffu + ((f >> 16) & 1u)) >> 16);
}

}  // namespace detail
}  // namespace pk

struct __half {
  std::uint16_t bits;
  __half() = default;
  __half(float f) : bits(::pk::detail::float_to_half_bits(f)) {}
  operator float() const { return ::pk::detail::half_bits_to_float(bits); }
};

struct __nv_bfloat16 {
  std::uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : bits(::pk::detail::float_to_bfloat16_bits(f)) {}
  operator float() const { return ::pk::detail::bits_float(std::uint32_t(bits) << 16); }
};

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return float(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }

#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace pk {

using half = __half;
using bfloat16 = __nv_bfloat16;
static_assert(sizeof(half) == 2 && sizeof(bfloat16) == 2, "16-bit storage types");

PK_HOST_DEVICE float to_float(float v) { return v; }
PK_HOST_DEVICE float to_float(half v) { return __half2float(v); }
PK_HOST_DEVICE float to_float(bfloat16 v) { return __bfloat162float(v); }

template <typename T>
PK_HOST_DEVICE T from_float(float v);
template <>
PK_HOST_DEVICE float from_float<float>(float v) { return v; }
template <>
PK_HOST_DEVICE half from_float<half>(float v) { return __float2half_rn(v); }
template <>
PK_HOST_DEVICE bfloat16 from_float<bfloat16>(float v) { return __float2bfloat16_rn(v); }

}  // namespace pk
