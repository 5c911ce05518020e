// SPDX-License-Identifier: Apache-2.0
// The SIMT emulator's runtime: runs a CUDA grid on one CPU thread (PK_SIMT builds only).
//
// Blocks run one after another. Every thread of a block is a cooperative fiber (ucontext) that
// runs until it reaches __syncthreads(), a warp-collective op or its end. __syncthreads()
// releases the block when every thread has arrived; after each release the threads resume in a
// different order (forward, reverse, shuffled), so a missing barrier reads stale or poisoned data
// and gives a wrong answer. Shared memory is allocated per block, filled with 0xFF bytes (NaN
// for floating types) and sized exactly, so AddressSanitizer sees an out-of-bounds index.
// Misuse a GPU would hang on or leave undefined (a barrier some threads never reach, a lane
// missing from a warp op, diverging warp ops) stops the launch with a std::runtime_error.
#pragma once

#include <cstddef>
#include <cstdint>

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace pk {
namespace simt {

constexpr int kWarpSize = 32;
constexpr int kMaxExchangeBytes = 64;  // the largest value one warp shuffle moves

// What the running fiber sees as threadIdx, blockIdx, blockDim and gridDim.
struct ThreadCoords {
  uint3 thread_idx;
  uint3 block_idx;
  uint3 block_dim;
  uint3 grid_dim;
};
const ThreadCoords& coords();

// The static + dynamic shared memory a launch gets without an opt-in, and with one (sm_90's
// cudaFuncAttributeMaxDynamicSharedMemorySize limit).
constexpr std::size_t kSharedBytesWithoutOptIn = std::size_t(48) << 10;
constexpr std::size_t kSharedBytesWithOptIn = std::size_t(227) << 10;

// Runs `body(arg)` as every thread of every block of the grid; throws std::runtime_error when a
// block misuses barriers or warp ops (the message names the block and the fault).
void launch(dim3 grid, dim3 block, std::size_t dynamic_shared_bytes, void (*body)(void*), void* arg,
            std::size_t shared_limit = kSharedBytesWithoutOptIn);

// Block-wide barrier (__syncthreads) and the warp-level one (__syncwarp). sync_threads returns
// how many threads of the block passed a true predicate (__syncthreads_count/_and/_or).
int sync_threads(bool predicate = false);
void sync_warp(unsigned int mask);

// The warp collective behind shuffles and votes: this lane contributes `value` (size bytes) and
// `predicate`, and receives the value of lane `source_lane` (its own when that lane is outside
// the warp or the mask). Returns the ballot of the participating lanes' predicates.
enum class WarpOp : int { kShuffle = 1, kVote = 2, kSync = 3 };
unsigned int warp_exchange(WarpOp op, unsigned int mask, const void* value, void* result,
                           std::size_t size, int source_lane, bool predicate);
int lane_id();

// Per-block shared memory: the first call from a block for `site` allocates `bytes` (poisoned),
// every later call from the same block returns the same storage.
void* shared_storage(const void* site, std::size_t bytes);
void* dynamic_shared_storage();

// Whether [p, p + bytes) lies inside one of the running block's shared-memory allocations.
bool in_shared_memory(const void* p, std::size_t bytes);

// Records a fault found by checks inside device helpers (e.g. a misaligned tile load); the caller
// skips the faulty access, and the launch stops and throws when this thread next yields or ends.
void report_fault(const char* message);

// cp.async (pk/async_copy.h): the calling thread's copy of `bytes` (<= 16) from src (nullptr:
// zeros) to dst. The source is read now; the destination is written either now or at the
// async_wait that covers the copy, at random (seeded like the resume orders). async_commit
// closes a group; async_wait(n) lands every copy of the groups older than the n newest.
void async_copy(void* dst, const void* src, std::size_t bytes);
void async_commit();
void async_wait(int pending_groups);

// --- sm_90 (pk/mbarrier.h, pk/wgmma.h) ---------------------------------------------------------
// Shared-memory addresses as the GPU's shared window numbers them: the dynamic allocation at a
// 32-byte aligned offset below 1024 that changes between launches (a kernel aligns it to a
// swizzle pattern itself, as on a GPU), static ones after it at multiples of 1024; host storage
// has the same address bits 0-9, the ones swizzling reads. shared_address faults outside shared memory;
// shared_pointer returns nullptr where [address, address + bytes) is not inside one allocation.
std::uint32_t shared_address(const void* p);
void* shared_pointer(std::uint32_t address, std::size_t bytes);

// mbarrier objects (8 bytes of shared memory, 8-byte aligned): a phase completes when its pending
// arrivals and its transaction count both reach 0; then the next phase starts with `count`
// pending arrivals. wait_parity(p) returns once the phase of parity p has completed (the current
// phase's parity differs from p), blocking this thread until then; a wait that can never return
// (every thread blocked) stops the launch with a deadlock message.
void mbarrier_init(void* bar, unsigned count);
void mbarrier_arrive(void* bar, unsigned expect_tx_bytes);  // expect_tx (0: none), then one arrival
void mbarrier_wait_parity(void* bar, unsigned parity);
// cp.async.bulk global -> shared with complete_tx on `bar`: the source is read now; the bytes land
// (and complete their transactions) either now or only when a wait on `bar` needs them, at random.
void bulk_copy(void* dst, const void* src, std::size_t bytes, void* bar);
// fence.proxy.async: this thread's landed cp.async (generic proxy) writes become readable by wgmma
// (async proxy); wgmma reading a byte written by cp.async without it is a fault.
void fence_proxy_async();

// wgmma.mma_async m64nNk16 .f32 (half or bfloat16 A and B from shared memory through descriptors,
// both K-major): this thread's N/2 accumulators `acc` (the PTX ISA's D fragment) += A B^T (or =,
// without scale_d). It runs either now or at the wait_group covering it, at random, reading shared
// memory and acc then. fence must precede the first mma_async after the start and after every
// wait (stricter than the ISA, which asks for it only where registers were touched in between).
enum class WgmmaType : int { kHalf = 0, kBfloat16 = 1 };
void wgmma_fence();
void wgmma_mma(float* acc, int n, WgmmaType type, std::uint64_t desc_a, std::uint64_t desc_b, bool scale_d);
void wgmma_commit();
void wgmma_wait(int pending_groups);

// The kernel the last pk::launch / pk::launch_opt_in of this thread ran (tests: which kernel a
// launcher picked).
void note_kernel(const void* kernel);
const void* last_kernel();

// Settings for tests: the seed of the shuffled resume orders.
void set_seed(std::uint64_t seed);

}  // namespace simt
}  // namespace pk
