// SPDX-License-Identifier: Apache-2.0
// The SIMT emulator (see pk/simt_runtime.h for what it promises).
#include "pk/simt_runtime.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <new>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define PK_SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PK_SIMT_ASAN 1
#endif
#endif
#ifdef PK_SIMT_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

namespace pk {
namespace simt {
namespace {

#ifdef PK_SIMT_ASAN
constexpr std::size_t kStackBytes = std::size_t(1) << 20;  // ASan's redzones grow every frame
#else
constexpr std::size_t kStackBytes = std::size_t(256) << 10;
#endif
constexpr int kMaxThreadsPerBlock = 1024;

enum class State { kRunnable, kAtBarrier, kAtWarpOp, kDone, kFaulted };

struct Stack {
  char* mapping = nullptr;  // guard page, then the usable stack
  std::size_t mapped = 0;
  char* bottom() const { return mapping + getpagesize(); }
};

// Fiber stacks outlive launches (mapping them is the slow part); freed with the OS thread.
struct StackPool {
  std::vector<Stack> stacks;
  void reserve(std::size_t count) {
    while (stacks.size() < count) {
      Stack s;
      s.mapped = kStackBytes + getpagesize();
      void* p = mmap(nullptr, s.mapped, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("simt: cannot map a fiber stack");
      s.mapping = static_cast<char*>(p);
      mprotect(s.mapping, getpagesize(), PROT_NONE);  // a stack overflow faults, not corrupts
      stacks.push_back(s);
    }
  }
  ~StackPool() {
    for (Stack& s : stacks) munmap(s.mapping, s.mapped);
  }
};

// A cp.async copy not landed yet: its data (read at issue) and the group it belongs to.
struct PendingCopy {
  void* dst;
  std::size_t bytes;
  unsigned char data[16];
  std::uint64_t group;  // 0 until committed
};

struct Fiber {
  ucontext_t context;
  ThreadCoords coords;
  State state = State::kRunnable;
  int index = 0, lane = 0, warp = 0;
  const Stack* stack = nullptr;
  void* fake_stack = nullptr;  // ASan's bookkeeping across switches
  // The pending warp op of this lane.
  std::size_t size = 0;
  int source_lane = 0;
  bool predicate = false;          // of the pending warp op or barrier
  unsigned int ballot = 0;
  unsigned char in[kMaxExchangeBytes];
  unsigned char out[kMaxExchangeBytes];
  std::vector<PendingCopy> pending;  // cp.async copies issued and not landed
  std::uint64_t groups_committed = 0;
  std::uint64_t newest_copy_group = 0;  // the group of the last copy issued (landed or not)
  std::uint64_t waited_through = 0;     // every group up to this one was waited for
};

struct Warp {
  int first = 0;                 // index of lane 0 in the block
  unsigned int existing = 0;     // lanes that exist (a partial last warp has fewer)
  unsigned int arrived = 0;      // lanes waiting in the current warp op
  unsigned int mask = 0;         // the op's participating lanes
  WarpOp op = WarpOp::kSync;
  std::size_t size = 0;
};

// Static + dynamic shared memory of one block without cudaFuncSetAttribute (which pk::launch
// does not call): the same on every architecture.
constexpr std::size_t kSharedBytesWithoutOptIn = std::size_t(48) << 10;

struct SharedAllocation {
  const void* site;
  std::size_t bytes;
  void* data;
};

struct Launch {
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<SharedAllocation> shared;
  void* dynamic_shared = nullptr;
  std::size_t dynamic_shared_bytes = 0;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  std::string fault;
  int barrier_count = 0;  // true predicates at the last released barrier
  std::mt19937_64 copy_rng;  // when cp.async copies land
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  std::size_t scheduler_stack_size = 0;
};

thread_local Launch* t_launch = nullptr;
thread_local StackPool t_stacks;
thread_local std::uint64_t t_seed = 0x5eed5eedULL;
thread_local std::uint64_t t_launch_count = 0;  // varies the resume orders between launches

void* allocate_poisoned(std::size_t bytes) {
  void* p = ::operator new(bytes ? bytes : 1, std::align_val_t(32));  // as PK_SHARED on a GPU
  std::memset(p, 0xFF, bytes);  // NaN for float/half/bfloat16, -1 for integers
  return p;
}

void release(void* p) { ::operator delete(p, std::align_val_t(32)); }

void free_shared(Launch& l) {
  for (SharedAllocation& a : l.shared) release(a.data);
  l.shared.clear();
  if (l.dynamic_shared) release(l.dynamic_shared);
  l.dynamic_shared = nullptr;
}

// --- context switches (annotated so ASan follows the fiber stacks) --------------------------

void resume(Launch& l, Fiber& f) {
  l.current = &f;
#ifdef PK_SIMT_ASAN
  __sanitizer_start_switch_fiber(&l.scheduler_fake_stack, f.stack->bottom(), kStackBytes);
#endif
  swapcontext(&l.scheduler, &f.context);
#ifdef PK_SIMT_ASAN
  __sanitizer_finish_switch_fiber(l.scheduler_fake_stack, nullptr, nullptr);
#endif
  l.current = nullptr;
}

// Gives control back to the scheduler; returns when the scheduler resumes this fiber.
void yield(Launch& l, Fiber& f, bool forever = false) {
#ifdef PK_SIMT_ASAN
  __sanitizer_start_switch_fiber(forever ? nullptr : &f.fake_stack, l.scheduler_stack_bottom,
                                 l.scheduler_stack_size);
#else
  (void)forever;
#endif
  swapcontext(&f.context, &l.scheduler);
#ifdef PK_SIMT_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

void record_fault(Launch& l, const std::string& message) {
  if (l.fault.empty()) l.fault = message;
}

// Stops the calling fiber for good. Call it in a statement of its own, after record_fault:
// temporaries of the caller's full-expression would never be destroyed (LeakSanitizer).
[[noreturn]] void abandon(Launch& l, Fiber& f) {
  f.state = State::kFaulted;
  yield(l, f, /*forever=*/true);
  std::abort();  // the scheduler never resumes a faulted fiber
}

std::string block_name(const Fiber& f);

void fiber_entry() {
  Launch& l = *t_launch;
  Fiber& f = *l.current;
#ifdef PK_SIMT_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &l.scheduler_stack_bottom, &l.scheduler_stack_size);
#endif
  l.body(l.arg);
  if (f.newest_copy_group > f.waited_through) {
    record_fault(l, block_name(f) + ": exits with cp.async copies it never waited for "
                                    "(pk::async_wait<0>() missing)");
    f.pending.clear();
  }
  f.state = State::kDone;
  yield(l, f, /*forever=*/true);
  std::abort();
}

Launch& current_launch(const char* what) {
  if (t_launch == nullptr || t_launch->current == nullptr) {
    std::fprintf(stderr, "simt: %s called outside a kernel launched by pk::launch\n", what);
    std::abort();
  }
  return *t_launch;
}

// --- warp collectives ------------------------------------------------------------------------

void complete_warp_op(Launch& l, Warp& w) {
  unsigned int ballot = 0;
  for (int lane = 0; lane < kWarpSize; ++lane)
    if ((w.mask >> lane & 1u) && l.fibers[w.first + lane].predicate) ballot |= 1u << lane;
  for (int lane = 0; lane < kWarpSize; ++lane) {
    if (!(w.mask >> lane & 1u)) continue;
    Fiber& g = l.fibers[w.first + lane];
    if (w.size) std::memcpy(g.out, l.fibers[w.first + g.source_lane].in, w.size);
    g.ballot = ballot;
    if (&g != l.current) g.state = State::kRunnable;
  }
  w.arrived = 0;
}

std::string block_name(const Fiber& f) {
  const uint3& b = f.coords.block_idx;
  const uint3& t = f.coords.thread_idx;
  return "block (" + std::to_string(b.x) + "," + std::to_string(b.y) + "," + std::to_string(b.z) +
         ") thread (" + std::to_string(t.x) + "," + std::to_string(t.y) + "," + std::to_string(t.z) + ")";
}

// --- one block -------------------------------------------------------------------------------

std::vector<int> resume_order(std::uint64_t phase, int n, std::mt19937_64& rng) {
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  switch (phase % 3) {
    case 0: break;
    case 1: std::reverse(order.begin(), order.end()); break;
    default: std::shuffle(order.begin(), order.end(), rng); break;
  }
  return order;
}

void run_block(Launch& l, uint3 block_idx, uint3 block_dim, uint3 grid_dim) {
  const int n = static_cast<int>(l.fibers.size());
  free_shared(l);
  if (l.dynamic_shared_bytes) l.dynamic_shared = allocate_poisoned(l.dynamic_shared_bytes);
  for (int i = 0; i < n; ++i) {
    Fiber& f = l.fibers[i];
    f.index = i;
    f.lane = i % kWarpSize;
    f.warp = i / kWarpSize;
    f.state = State::kRunnable;
    f.stack = &t_stacks.stacks[i];
    f.fake_stack = nullptr;
    f.pending.clear();
    f.groups_committed = 0;
    f.newest_copy_group = 0;
    f.waited_through = 0;
    f.coords.thread_idx = {i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y)};
    f.coords.block_idx = block_idx;
    f.coords.block_dim = block_dim;
    f.coords.grid_dim = grid_dim;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack->bottom();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }
  for (std::size_t w = 0; w < l.warps.size(); ++w) {
    Warp& warp = l.warps[w];
    warp = Warp();
    warp.first = static_cast<int>(w) * kWarpSize;
    int lanes = std::min(kWarpSize, n - warp.first);
    warp.existing = lanes == kWarpSize ? ~0u : ((1u << lanes) - 1u);
  }

  const std::uint64_t linear_block =
      block_idx.x + std::uint64_t(grid_dim.x) * (block_idx.y + std::uint64_t(grid_dim.y) * block_idx.z);
  std::mt19937_64 rng(t_seed ^ (linear_block * 0x9E3779B97F4A7C15ULL));
  l.copy_rng.seed(t_seed ^ (linear_block * 0xC2B2AE3D27D4EB4FULL) ^ t_launch_count);
  // Neighbouring blocks and successive launches start the order cycle at different points, so a
  // kernel with a single barrier still meets every order.
  std::uint64_t phase = linear_block + t_launch_count;
  std::vector<int> order = resume_order(phase, n, rng);
  while (l.fault.empty()) {
    for (int i : order) {
      if (l.fibers[i].state == State::kRunnable) resume(l, l.fibers[i]);
      if (!l.fault.empty()) break;
    }
    if (!l.fault.empty()) break;
    int runnable = 0, at_barrier = 0, at_warp_op = 0, done = 0;
    for (const Fiber& f : l.fibers) {
      runnable += f.state == State::kRunnable;
      at_barrier += f.state == State::kAtBarrier;
      at_warp_op += f.state == State::kAtWarpOp;
      done += f.state == State::kDone;
    }
    if (runnable) continue;
    if (done == n) break;
    if (at_warp_op) {
      for (const Fiber& f : l.fibers) {
        if (f.state != State::kAtWarpOp) continue;
        l.fault = block_name(f) + ": waits in a warp op (shuffle/vote/__syncwarp) for lanes " +
                  "that exited or wait at __syncthreads (deadlock on a GPU)";
        break;
      }
      break;
    }
    if (done) {
      l.fault = "block (" + std::to_string(block_idx.x) + "," + std::to_string(block_idx.y) + "," +
                std::to_string(block_idx.z) + "): __syncthreads() reached by " +
                std::to_string(at_barrier) + " of " + std::to_string(n) +
                " threads; the others exited (undefined on a GPU)";
      break;
    }
    l.barrier_count = 0;
    for (Fiber& f : l.fibers) {  // everyone arrived: release
      l.barrier_count += f.predicate;
      f.state = State::kRunnable;
    }
    order = resume_order(++phase, n, rng);
  }
  free_shared(l);
  if (!l.fault.empty()) throw std::runtime_error("simt: " + l.fault);
}

struct LaunchScope {
  explicit LaunchScope(Launch* l) { t_launch = l; }
  ~LaunchScope() {
    free_shared(*t_launch);
    t_launch = nullptr;
  }
};

}  // namespace

// --- public API ------------------------------------------------------------------------------

const ThreadCoords& coords() { return current_launch("threadIdx/blockIdx").current->coords; }

int lane_id() { return current_launch("lane_id").current->lane; }

void set_seed(std::uint64_t seed) { t_seed = seed; }

void launch(dim3 grid, dim3 block, std::size_t dynamic_shared_bytes, void (*body)(void*), void* arg) {
  if (t_launch != nullptr) throw std::runtime_error("simt: kernels cannot launch kernels");
  const std::uint64_t threads = std::uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock)
    throw std::invalid_argument("simt: a block needs 1 to 1024 threads, got " + std::to_string(threads));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::invalid_argument("simt: empty grid");
  if (dynamic_shared_bytes > kSharedBytesWithoutOptIn)
    throw std::invalid_argument("simt: " + std::to_string(dynamic_shared_bytes) + " bytes of dynamic "
                                "shared memory: a launch gets 48 KiB without an opt-in, which "
                                "pk::launch does not make");
  t_stacks.reserve(threads);
  Launch l;
  l.body = body;
  l.arg = arg;
  l.fibers.resize(threads);
  l.warps.resize((threads + kWarpSize - 1) / kWarpSize);
  l.dynamic_shared_bytes = dynamic_shared_bytes;
  LaunchScope scope(&l);
  ++t_launch_count;
  const uint3 block_dim{block.x, block.y, block.z};
  const uint3 grid_dim{grid.x, grid.y, grid.z};
  for (unsigned int z = 0; z < grid.z; ++z)
    for (unsigned int y = 0; y < grid.y; ++y)
      for (unsigned int x = 0; x < grid.x; ++x) run_block(l, uint3{x, y, z}, block_dim, grid_dim);
}

int sync_threads(bool predicate) {
  Launch& l = current_launch("__syncthreads");
  Fiber& f = *l.current;
  f.predicate = predicate;
  f.state = State::kAtBarrier;
  yield(l, f);
  // Read before this thread can reach the next barrier, whose release would overwrite it.
  return l.barrier_count;
}

unsigned int warp_exchange(WarpOp op, unsigned int mask, const void* value, void* result,
                           std::size_t size, int source_lane, bool predicate) {
  Launch& l = current_launch("a warp op");
  Fiber& f = *l.current;
  Warp& w = l.warps[f.warp];
  if (size > kMaxExchangeBytes) {
    record_fault(l, block_name(f) + ": a warp shuffle of more than 64 bytes");
    abandon(l, f);
  }
  mask &= w.existing;
  const unsigned int bit = 1u << f.lane;
  if (!(mask & bit)) {
    record_fault(l, block_name(f) + ": calls a warp op with a mask that excludes itself");
    abandon(l, f);
  }
  if (source_lane < 0 || source_lane >= kWarpSize) source_lane = f.lane;
  if (!(mask >> source_lane & 1u))
    {
    record_fault(l, block_name(f) + ": shuffles from lane " + std::to_string(source_lane) +
                   ", which is not in the mask (undefined on a GPU)");
    abandon(l, f);
  }
  if (w.arrived == 0) {
    w.op = op;
    w.mask = mask;
    w.size = size;
  } else if (w.op != op || w.mask != mask || w.size != size) {
    {
    record_fault(l, block_name(f) + ": lanes of one warp are in different warp ops (divergent "
                               "shuffle/vote/__syncwarp or different masks)");
    abandon(l, f);
  }
  }
  if (size) std::memcpy(f.in, value, size);
  f.source_lane = source_lane;
  f.predicate = predicate;
  w.arrived |= bit;
  if (w.arrived == w.mask) {
    complete_warp_op(l, w);
  } else {
    f.state = State::kAtWarpOp;
    yield(l, f);
  }
  if (result && size) std::memcpy(result, f.out, size);
  return f.ballot;
}

void sync_warp(unsigned int mask) {
  const int lane = lane_id();
  warp_exchange(WarpOp::kSync, mask, nullptr, nullptr, 0, lane, false);
}

void* shared_storage(const void* site, std::size_t bytes) {
  Launch& l = current_launch("shared memory");
  std::size_t total = l.dynamic_shared_bytes + bytes;
  for (const SharedAllocation& a : l.shared) {
    if (a.site == site) return a.data;
    total += a.bytes;
  }
  if (total > kSharedBytesWithoutOptIn) {  // static + dynamic: the launch would fail on a GPU
    record_fault(l, block_name(*l.current) + ": " + std::to_string(total) + " bytes of static + "
                        "dynamic shared memory, over the 48 KiB a launch gets without an opt-in");
    abandon(l, *l.current);
  }
  l.shared.push_back({site, bytes, allocate_poisoned(bytes)});
  return l.shared.back().data;
}

void* dynamic_shared_storage() {
  Launch& l = current_launch("dynamic shared memory");
  if (!l.dynamic_shared)
    {
    record_fault(l, block_name(*l.current) + ": uses dynamic shared memory but the launch "
                                                 "requested 0 bytes");
    abandon(l, *l.current);
  }
  return l.dynamic_shared;
}

void async_copy(void* dst, const void* src, std::size_t bytes) {
  Launch& l = current_launch("pk::async_copy");
  Fiber& f = *l.current;
  PendingCopy c{dst, bytes, {}, 0};
  if (bytes > sizeof c.data) {
    record_fault(l, block_name(f) + ": an async copy of more than 16 bytes");
    abandon(l, f);
  }
  if (src) {
    std::memcpy(c.data, src, bytes);
  } else {
    std::memset(c.data, 0, bytes);
  }
  f.newest_copy_group = f.groups_committed + 1;
  if (l.copy_rng() & 1) {
    std::memcpy(dst, c.data, bytes);  // landed at once
  } else {
    f.pending.push_back(c);
  }
}

void async_commit() {
  Launch& l = current_launch("pk::async_commit");
  Fiber& f = *l.current;
  ++f.groups_committed;
  for (PendingCopy& c : f.pending)
    if (c.group == 0) c.group = f.groups_committed;
}

void async_wait(int pending_groups) {
  Launch& l = current_launch("pk::async_wait");
  Fiber& f = *l.current;
  const std::uint64_t newest_landed =
      f.groups_committed > std::uint64_t(pending_groups) ? f.groups_committed - pending_groups : 0;
  f.waited_through = std::max(f.waited_through, newest_landed);
  std::vector<PendingCopy> still;
  for (const PendingCopy& c : f.pending) {
    if (c.group != 0 && c.group <= newest_landed) {
      std::memcpy(c.dst, c.data, c.bytes);
    } else {
      still.push_back(c);
    }
  }
  f.pending.swap(still);
}

bool in_shared_memory(const void* p, std::size_t bytes) {
  const Launch& l = current_launch("a shared-memory check");
  const auto* begin = static_cast<const unsigned char*>(p);
  auto holds = [&](const void* data, std::size_t size) {
    const auto* base = static_cast<const unsigned char*>(data);
    return data != nullptr && begin >= base && begin + bytes <= base + size;
  };
  for (const SharedAllocation& a : l.shared)
    if (holds(a.data, a.bytes)) return true;
  return holds(l.dynamic_shared, l.dynamic_shared_bytes);
}

void report_fault(const char* message) {
  if (t_launch == nullptr || t_launch->current == nullptr) throw std::runtime_error(message);
  // Recorded only: the scheduler stops the launch when this thread next yields or ends.
  record_fault(*t_launch, block_name(*t_launch->current) + ": " + message);
}

}  // namespace simt
}  // namespace pk
