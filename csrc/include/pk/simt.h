// SPDX-License-Identifier: Apache-2.0
// The SIMT portability layer: one kernel source compiles under nvcc (real CUDA) and under a host
// C++ compiler with -DPK_SIMT=1 (the CPU emulator, pk/simt_runtime.h).
//
// Rules for a kernel that runs under both (csrc/README.md: "Writing a kernel that runs under both
// compilers"):
//  - write ordinary CUDA: __global__/__device__, threadIdx/blockIdx/blockDim/gridDim,
//    __syncthreads(), __syncthreads_count/_and/_or, __syncwarp(), __shfl_sync/__shfl_xor_sync/__shfl_down_sync/__shfl_up_sync,
//    __ballot_sync/__any_sync/__all_sync, atomicAdd/atomicMax/atomicMin/atomicExch/atomicCAS;
//  - declare shared memory with PK_SHARED(T, name, count), PK_SHARED_2D(T, name, rows, cols)
//    and PK_DYNAMIC_SHARED(T, name) instead of __shared__, and don't take sizeof() of them;
//  - launch with pk::launch(kernel, grid, block, dynamic_shared_bytes, stream, args...)
//    (pk::launch_opt_in where a block takes over 48 KiB of dynamic shared memory);
//  - device helpers are PK_DEVICE (host+device ones PK_HOST_DEVICE);
//  - half/bfloat16 are pk::half / pk::bfloat16 (pk/types.h); do math in float through
//    pk::to_float / pk::from_float<T>;
//  - tensor-core tiles go through pk/tile.h, asynchronous global -> shared copies through
//    pk/async_copy.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(PK_SIMT) && PK_SIMT
#define PK_SIMT_ENABLED 1
#endif

#if defined(PK_SIMT_ENABLED) && defined(__CUDACC__)
#error "PK_SIMT=1 is for the host compiler; nvcc builds the real CUDA kernels"
#endif

#ifdef PK_SIMT_ENABLED
// ============================== the emulator ====================================================
#include <cmath>
#include <tuple>
#include <utility>

#include "pk/simt_runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define PK_DEVICE inline
#define PK_HOST_DEVICE inline

#define threadIdx (::pk::simt::coords().thread_idx)
#define blockIdx (::pk::simt::coords().block_idx)
#define blockDim (::pk::simt::coords().block_dim)
#define gridDim (::pk::simt::coords().grid_dim)

// Each call site owns one per-block allocation, found again by the address of a local static.
#define PK_SHARED(T, name, count)                                                             \
  static char pk_shared_site_##name;                                                         \
  T* const name = static_cast<T*>(                                                           \
      ::pk::simt::shared_storage(&pk_shared_site_##name, sizeof(T) * std::size_t(count)))
#define PK_SHARED_2D(T, name, rows, cols)                                                     \
  static char pk_shared_site_##name;                                                         \
  T(*const name)[cols] = reinterpret_cast<T(*)[cols]>(::pk::simt::shared_storage(            \
      &pk_shared_site_##name, sizeof(T) * std::size_t(rows) * std::size_t(cols)))
#define PK_DYNAMIC_SHARED(T, name) T* const name = static_cast<T*>(::pk::simt::dynamic_shared_storage())

constexpr int warpSize = 32;

inline void __syncthreads() { ::pk::simt::sync_threads(); }
inline int __syncthreads_count(int predicate) { return ::pk::simt::sync_threads(predicate != 0); }
inline int __syncthreads_and(int predicate) {
  return ::pk::simt::sync_threads(predicate != 0) == static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
}
inline int __syncthreads_or(int predicate) { return ::pk::simt::sync_threads(predicate != 0) != 0; }
inline void __syncwarp(unsigned int mask = 0xffffffffu) { ::pk::simt::sync_warp(mask); }
inline void __threadfence() {}
inline void __threadfence_block() {}

namespace pk {
namespace simt {
template <typename T>
inline T shuffle_from(unsigned int mask, T value, int source_lane) {
  static_assert(std::is_trivially_copyable<T>::value, "warp shuffles move trivially copyable values");
  static_assert(sizeof(T) <= kMaxExchangeBytes, "warp shuffles move at most 64 bytes");
  T result;
  warp_exchange(WarpOp::kShuffle, mask, &value, &result, sizeof(T), source_lane, false);
  return result;
}
}  // namespace simt
}  // namespace pk

// Lanes are split into segments of `width`; a source outside the caller's segment returns the
// caller's own value, as on the GPU.
template <typename T>
inline T __shfl_sync(unsigned int mask, T value, int source, int width = warpSize) {
  const int lane = ::pk::simt::lane_id();
  const int base = lane & ~(width - 1);
  return ::pk::simt::shuffle_from(mask, value, base + (source & (width - 1)));
}
template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = warpSize) {
  const int lane = ::pk::simt::lane_id();
  int source = lane ^ lane_mask;
  if ((source & ~(width - 1)) != (lane & ~(width - 1))) source = lane;
  return ::pk::simt::shuffle_from(mask, value, source);
}
template <typename T>
inline T __shfl_down_sync(unsigned int mask, T value, unsigned int delta, int width = warpSize) {
  const int lane = ::pk::simt::lane_id();
  int source = lane + static_cast<int>(delta);
  if (source >= (lane & ~(width - 1)) + width) source = lane;
  return ::pk::simt::shuffle_from(mask, value, source);
}
template <typename T>
inline T __shfl_up_sync(unsigned int mask, T value, unsigned int delta, int width = warpSize) {
  const int lane = ::pk::simt::lane_id();
  int source = lane - static_cast<int>(delta);
  if (source < (lane & ~(width - 1))) source = lane;
  return ::pk::simt::shuffle_from(mask, value, source);
}
inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
  return ::pk::simt::warp_exchange(::pk::simt::WarpOp::kVote, mask, nullptr, nullptr, 0,
                                   ::pk::simt::lane_id(), predicate != 0);
}
inline int __any_sync(unsigned int mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned int mask, int predicate) { return __ballot_sync(mask, !predicate) == 0; }

// Fibers switch only inside barriers and warp ops, so a plain read-modify-write is atomic.
template <typename T>
inline T atomicAdd(T* address, T value) {
  T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
inline T atomicSub(T* address, T value) {
  T old = *address;
  *address = old - value;
  return old;
}
template <typename T>
inline T atomicMax(T* address, T value) {
  T old = *address;
  *address = old < value ? value : old;
  return old;
}
template <typename T>
inline T atomicMin(T* address, T value) {
  T old = *address;
  *address = value < old ? value : old;
  return old;
}
template <typename T>
inline T atomicExch(T* address, T value) {
  T old = *address;
  *address = value;
  return old;
}
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
  T old = *address;
  if (old == compare) *address = value;
  return old;
}

template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

namespace pk {
using Stream = void*;  // a cudaStream_t under nvcc; ignored by the emulator

namespace simt {
template <typename... Params, typename... Args>
void launch_kernel(std::size_t shared_limit, void (*kernel)(Params...), dim3 grid, dim3 block,
                   std::size_t dynamic_shared_bytes, Args&&... args) {
  struct Call {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> args;
  };
  Call call{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  note_kernel(reinterpret_cast<const void*>(kernel));
  // Every thread gets its own copy of the parameters, as on the GPU.
  launch(grid, block, dynamic_shared_bytes,
         [](void* p) {
           Call& c = *static_cast<Call*>(p);
           auto copy = c.args;
           std::apply(c.kernel, copy);
         },
         &call, shared_limit);
}
}  // namespace simt

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t dynamic_shared_bytes,
            Stream /*stream*/, Args&&... args) {
  simt::launch_kernel(simt::kSharedBytesWithoutOptIn, kernel, grid, block, dynamic_shared_bytes,
                      std::forward<Args>(args)...);
}
// pk::launch with up to 227 KiB of dynamic shared memory (sm_90's opt-in limit; sm_80 allows 163).
template <typename... Params, typename... Args>
void launch_opt_in(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t dynamic_shared_bytes,
                   Stream /*stream*/, Args&&... args) {
  simt::launch_kernel(simt::kSharedBytesWithOptIn, kernel, grid, block, dynamic_shared_bytes,
                      std::forward<Args>(args)...);
}
}  // namespace pk

#else
// ============================== nvcc ============================================================
#include <cuda_runtime.h>

#define PK_DEVICE __device__ __forceinline__
#define PK_HOST_DEVICE __host__ __device__ __forceinline__
#define PK_SHARED(T, name, count) __shared__ __align__(32) T name[count]
#define PK_SHARED_2D(T, name, rows, cols) __shared__ __align__(32) T name[rows][cols]
#define PK_DYNAMIC_SHARED(T, name)                          \
  extern __shared__ __align__(32) unsigned char pk_dynamic_shared_[]; \
  T* const name = reinterpret_cast<T*>(pk_dynamic_shared_)

namespace pk {
using Stream = void*;  // a cudaStream_t, passed through torch-free code as void*

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t dynamic_shared_bytes,
            Stream stream, Args&&... args) {
  kernel<<<grid, block, dynamic_shared_bytes, static_cast<cudaStream_t>(stream)>>>(
      static_cast<Params>(std::forward<Args>(args))...);
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess)
    throw std::runtime_error(std::string("packed_kernels: kernel launch failed: ") + cudaGetErrorString(error));
}

template <typename... Params, typename... Args>
void launch_opt_in(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t dynamic_shared_bytes,
                   Stream stream, Args&&... args) {
  const cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(dynamic_shared_bytes));
  if (error != cudaSuccess)
    throw std::runtime_error(std::string("packed_kernels: cannot opt in to ") +
                             std::to_string(dynamic_shared_bytes) + " bytes of shared memory: " +
                             cudaGetErrorString(error));
  launch(kernel, grid, block, dynamic_shared_bytes, stream, std::forward<Args>(args)...);
}
}  // namespace pk

#endif

namespace pk {

// A warp-wide xor shuffle of any trivially copyable value (structs too), all 32 lanes.
template <typename T>
PK_DEVICE T shfl_xor(T value, int lane_mask) {
#ifdef PK_SIMT_ENABLED
  return __shfl_xor_sync(0xffffffffu, value, lane_mask);
#else
  if constexpr (std::is_arithmetic<T>::value) {
    return __shfl_xor_sync(0xffffffffu, value, lane_mask);
  } else {
    static_assert(sizeof(T) % 4 == 0, "shuffle structs made of 32-bit words");
    int words[sizeof(T) / 4];
    memcpy(words, &value, sizeof(T));
#pragma unroll
    for (int i = 0; i < int(sizeof(T) / 4); ++i) words[i] = __shfl_xor_sync(0xffffffffu, words[i], lane_mask);
    T result;
    memcpy(&result, words, sizeof(T));
    return result;
  }
#endif
}

}  // namespace pk
