// SPDX-License-Identifier: Apache-2.0
// Asynchronous global -> shared copies for multi-stage pipelines. nvcc: cp.async (sm_80+; a
// plain copy on older targets); PK_SIMT: the emulator's copy queue, which lands each copy either
// at once or only at the wait that covers it (chosen at random), so a missing wait or a missing
// barrier around a stage reads stale or poisoned data.
//
//   pk::async_copy_16(dst, src, valid);  // 16 bytes; zeros when !valid (src must still be a
//                                        // valid global address then: nothing is read from it)
//   pk::async_commit();                  // closes the group of copies issued since the last one
//   pk::async_wait<N>();                 // until at most the N newest groups are in flight
// As on the GPU, a wait covers only the calling thread's copies: other threads see the data after
// the wait and a __syncthreads(). Every group must be waited for before the thread exits (the
// emulator reports one that is not). dst and src are 16-byte aligned.
#pragma once

#include "pk/simt.h"

namespace pk {

#ifdef PK_SIMT_ENABLED

PK_DEVICE void async_copy_16(void* shared_dst, const void* global_src, bool valid) {
  ::pk::simt::async_copy(shared_dst, valid ? global_src : nullptr, 16);
}
PK_DEVICE void async_commit() { ::pk::simt::async_commit(); }
template <int N>
PK_DEVICE void async_wait() {
  ::pk::simt::async_wait(N);
}

#else

PK_DEVICE void async_copy_16(void* shared_dst, const void* global_src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  // src-size 0 reads nothing and zero-fills the 16 bytes (padding taps, tails).
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global_src),
               "r"(valid ? 16 : 0)
               : "memory");
#else
  *static_cast<uint4*>(shared_dst) = valid ? *static_cast<const uint4*>(global_src) : make_uint4(0, 0, 0, 0);
#endif
}
PK_DEVICE void async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
PK_DEVICE void async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

#endif

}  // namespace pk
