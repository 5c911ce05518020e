// SPDX-License-Identifier: Apache-2.0
// Warp and block reductions for any value type with a symmetric merge (merge(a, b) == merge(b, a)
// bit for bit, so every lane of a butterfly ends with the same result).
#pragma once

#include "pk/simt.h"

namespace pk {

constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 32;  // 1024 threads

// Every lane gets the merge of all 32 lanes' values.
template <typename T, typename Merge>
PK_DEVICE T warp_allreduce(T value, Merge merge) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) value = merge(value, shfl_xor(value, offset));
  return value;
}

// Every thread of the block gets the merge of all threads' values. blockDim.x must be a multiple
// of 32 (blockDim.y == blockDim.z == 1); `scratch` holds kMaxWarps values of shared memory and may
// be reused by the next call (the trailing barrier protects it).
template <typename T, typename Merge>
PK_DEVICE T block_allreduce(T value, Merge merge, T* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  value = warp_allreduce(value, merge);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  value = scratch[0];
  for (int w = 1; w < warps; ++w) value = merge(value, scratch[w]);
  __syncthreads();
  return value;
}

struct Sum {
  PK_DEVICE float operator()(float a, float b) const { return a + b; }
};
struct Max {
  PK_DEVICE float operator()(float a, float b) const { return a > b ? a : b; }
};

}  // namespace pk
