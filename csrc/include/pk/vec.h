// SPDX-License-Identifier: Apache-2.0
// Vectorised global loads and stores: VEC elements of T as one aligned access (16 bytes for
// VEC * sizeof(T) == 16), converted to and from float.
#pragma once

#include "pk/simt.h"
#include "pk/types.h"

namespace pk {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// The VEC elements of chunk `k`: contiguous (and aligned) when VEC > 1, else element k * stride.
template <int VEC, typename T>
PK_DEVICE void load_chunk(const T* base, long long k, long long stride, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_float(base[k * stride]);
  } else {
    const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(base + k * VEC);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(v.v[i]);
  }
}

template <int VEC, typename T>
PK_DEVICE void store_chunk(T* base, long long k, long long stride, const float (&in)[VEC]) {
  if constexpr (VEC == 1) {
    base[k * stride] = from_float<T>(in[0]);
  } else {
    Vec<T, VEC> v;
#pragma unroll
    for (int i = 0; i < VEC; ++i) v.v[i] = from_float<T>(in[i]);
    *reinterpret_cast<Vec<T, VEC>*>(base + k * VEC) = v;
  }
}

// Elements per 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / int(sizeof(T));

}  // namespace pk
