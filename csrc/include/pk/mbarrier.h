// SPDX-License-Identifier: Apache-2.0
// sm_90 asynchronous staging: mbarriers, bulk copies that complete on them, and the proxy fence
// between generic writes (stores, cp.async) and async-proxy reads (wgmma). nvcc: the PTX
// instructions (sm_90+); PK_SIMT: the emulator, where a phase completes only when its arrivals
// and its transaction bytes are all in, a bulk copy lands at issue or only when a wait on its
// barrier needs it (at random), a wait that can never return stops the launch as a deadlock, and
// wgmma reading cp.async data its writer did not fence is a fault.
//
//   PK_DYNAMIC_SHARED(unsigned char, smem);
//   std::uint64_t* full = ...;                        // 8-byte aligned words in shared memory
//   if (threadIdx.x == 0) { pk::mbarrier::init(full, 1); pk::mbarrier::fence_init(); }
//   __syncthreads();
//   if (threadIdx.x == 0) {                           // producer: bytes, then the copy
//     pk::mbarrier::arrive_expect_tx(full, bytes);
//     pk::bulk_copy(stage, global_src, bytes, full);  // 16-byte aligned, bytes % 16 == 0
//   }
//   pk::mbarrier::wait(full, phase);                  // consumers: phase = 0, 1, 0, ... per reuse
//
// Shared-memory addresses (descriptors, alignment to swizzle patterns) come from
// pk::shared_address, the address in the shared window on both sides.
#pragma once

#include <cstdint>

#include "pk/simt.h"

namespace pk {

#ifdef PK_SIMT_ENABLED

PK_DEVICE std::uint32_t shared_address(const void* p) { return ::pk::simt::shared_address(p); }

namespace mbarrier {
PK_DEVICE void init(std::uint64_t* bar, unsigned count) { ::pk::simt::mbarrier_init(bar, count); }
PK_DEVICE void fence_init() {}
PK_DEVICE void arrive(std::uint64_t* bar) { ::pk::simt::mbarrier_arrive(bar, 0); }
PK_DEVICE void arrive_expect_tx(std::uint64_t* bar, unsigned bytes) { ::pk::simt::mbarrier_arrive(bar, bytes); }
PK_DEVICE void wait(std::uint64_t* bar, unsigned phase_parity) { ::pk::simt::mbarrier_wait_parity(bar, phase_parity); }
}  // namespace mbarrier

PK_DEVICE void bulk_copy(void* shared_dst, const void* global_src, unsigned bytes, std::uint64_t* bar) {
  ::pk::simt::bulk_copy(shared_dst, global_src, bytes, bar);
}
PK_DEVICE void fence_proxy_async() { ::pk::simt::fence_proxy_async(); }

#else

PK_DEVICE std::uint32_t shared_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

namespace mbarrier {
PK_DEVICE void init(std::uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)), "r"(count) : "memory");
}
// Makes the initialisation visible to the async proxy (bulk copies completing on it).
PK_DEVICE void fence_init() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
PK_DEVICE void arrive(std::uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(shared_address(bar)) : "memory");
}
PK_DEVICE void arrive_expect_tx(std::uint64_t* bar, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(bar)), "r"(bytes)
               : "memory");
#endif
}
PK_DEVICE void wait(std::uint64_t* bar, unsigned phase_parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned done = 0;
  do {
    asm volatile(
        "{\n.reg .pred ready;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 ready, [%1], %2;\n"
        "selp.u32 %0, 1, 0, ready;\n}\n"
        : "=r"(done)
        : "r"(shared_address(bar)), "r"(phase_parity)
        : "memory");
  } while (!done);
#endif
}
}  // namespace mbarrier

PK_DEVICE void bulk_copy(void* shared_dst, const void* global_src, unsigned bytes, std::uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(shared_address(shared_dst)), "l"(global_src), "r"(bytes), "r"(shared_address(bar))
               : "memory");
#endif
}
PK_DEVICE void fence_proxy_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

#endif

}  // namespace pk
