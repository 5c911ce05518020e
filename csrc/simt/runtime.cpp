// SPDX-License-Identifier: Apache-2.0
// The SIMT emulator (see pk/simt_runtime.h for what it promises).
#include "pk/simt_runtime.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <new>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_map>
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

enum class State { kRunnable, kAtBarrier, kAtWarpOp, kAtMbarrier, kDone, kFaulted };

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

// A wgmma.mma_async not run yet: its operands are read when it runs.
struct PendingWgmma {
  float* acc;
  int n;
  WgmmaType type;
  std::uint64_t desc_a, desc_b;
  bool scale_d;
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
  const void* waiting_on = nullptr;     // the mbarrier this thread blocks on (kAtMbarrier)
  std::vector<std::uintptr_t> unfenced;  // 16-byte chunks its cp.async wrote since its proxy fence
  bool wgmma_fenced = false;
  std::vector<PendingWgmma> wgmma_pending;
  std::uint64_t wgmma_committed = 0, wgmma_newest = 0, wgmma_waited_through = 0;
};

struct Warp {
  int first = 0;                 // index of lane 0 in the block
  unsigned int existing = 0;     // lanes that exist (a partial last warp has fewer)
  unsigned int arrived = 0;      // lanes waiting in the current warp op
  unsigned int mask = 0;         // the op's participating lanes
  WarpOp op = WarpOp::kSync;
  std::size_t size = 0;
};

struct SharedAllocation {
  const void* site;
  std::size_t bytes;
  void* data;
  std::uint32_t window;  // its shared-window address
};

constexpr std::size_t kSharedAlignment = 1024;  // a 128-byte swizzle pattern repeats every 1024
std::uint32_t round_up_window(std::size_t bytes) {
  return static_cast<std::uint32_t>((bytes + kSharedAlignment - 1) / kSharedAlignment * kSharedAlignment);
}

struct Mbarrier {
  unsigned expected = 0, pending = 0, phase = 0;
  long long tx = 0;  // transaction bytes expected and not yet completed (negative: ahead)
};

// A cp.async.bulk copy not landed yet.
struct PendingBulk {
  void* dst;
  std::vector<unsigned char> data;
  void* bar;
};

struct Launch {
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<SharedAllocation> shared;
  void* dynamic_shared = nullptr;
  void* dynamic_allocation = nullptr;   // dynamic_shared - dynamic_window % 1024
  std::uint32_t dynamic_window = 0;     // the dynamic allocation's shared-window address
  std::size_t dynamic_shared_bytes = 0;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  std::string fault;
  int barrier_count = 0;  // true predicates at the last released barrier
  std::mt19937_64 copy_rng;  // when cp.async copies land
  std::size_t shared_limit = 0;
  std::uint32_t next_window = 0;  // the shared-window address of the next static allocation
  std::unordered_map<const void*, Mbarrier> mbarriers;
  std::vector<PendingBulk> bulk;
  std::unordered_map<std::uintptr_t, int> unfenced_chunks;  // chunk -> the fiber whose cp.async wrote it
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  std::size_t scheduler_stack_size = 0;
};

thread_local Launch* t_launch = nullptr;
thread_local StackPool t_stacks;
thread_local std::uint64_t t_seed = 0x5eed5eedULL;
thread_local std::uint64_t t_launch_count = 0;  // varies the resume orders between launches

void* allocate_poisoned(std::size_t bytes) {
  void* p = ::operator new(bytes ? bytes : 1, std::align_val_t(kSharedAlignment));
  std::memset(p, 0xFF, bytes);  // NaN for float/half/bfloat16, -1 for integers
  return p;
}

void release(void* p) { ::operator delete(p, std::align_val_t(kSharedAlignment)); }

void free_shared(Launch& l) {
  for (SharedAllocation& a : l.shared) release(a.data);
  l.shared.clear();
  if (l.dynamic_allocation) release(l.dynamic_allocation);
  l.dynamic_allocation = l.dynamic_shared = nullptr;
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
  if (f.wgmma_newest > f.wgmma_waited_through || !f.wgmma_pending.empty()) {
    record_fault(l, block_name(f) + ": exits with wgmma.mma_async it never waited for "
                                    "(pk::wgmma::commit / wait<0>() missing)");
    f.wgmma_pending.clear();
  }
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

// --- sm_90: mbarriers, bulk copies, proxy fences, wgmma ------------------------------------------

// A cp.async (generic proxy) write landed: wgmma may read it only after the writer's proxy fence.
void note_generic_write(Launch& l, Fiber& f, const void* dst, std::size_t bytes) {
  const std::uintptr_t first = reinterpret_cast<std::uintptr_t>(dst) / 16;
  const std::uintptr_t last = (reinterpret_cast<std::uintptr_t>(dst) + bytes - 1) / 16;
  for (std::uintptr_t chunk = first; chunk <= last; ++chunk) {
    l.unfenced_chunks[chunk] = f.index;
    f.unfenced.push_back(chunk);
  }
}

void complete_phase_if_done(Launch& l, void* bar, Mbarrier& b) {
  if (b.pending != 0 || b.tx != 0) return;
  ++b.phase;
  b.pending = b.expected;
  for (Fiber& g : l.fibers)  // waiters recheck their parity when they resume
    if (g.state == State::kAtMbarrier && g.waiting_on == bar) g.state = State::kRunnable;
}

// Lands the bulk copies in flight on `bar` (every bar: nullptr); returns whether any landed.
bool land_bulk_copies(Launch& l, const void* bar) {
  bool landed = false;
  std::vector<PendingBulk> still;
  std::vector<PendingBulk> now;
  for (PendingBulk& c : l.bulk) (bar == nullptr || c.bar == bar ? now : still).push_back(std::move(c));
  l.bulk.swap(still);
  for (PendingBulk& c : now) {
    std::memcpy(c.dst, c.data.data(), c.data.size());
    Mbarrier& b = l.mbarriers[c.bar];
    b.tx -= static_cast<long long>(c.data.size());
    complete_phase_if_done(l, c.bar, b);
    landed = true;
  }
  return landed;
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
  // As on a GPU, dynamic shared memory need not start on a swizzle pattern (it follows the
  // static allocations there): 32-byte aligned (PK_DYNAMIC_SHARED's promise), at an offset that
  // changes between launches, so a kernel that assumes more alignment reads a wrong layout. The
  // host storage keeps the window's address bits 0-9.
  l.dynamic_window = static_cast<std::uint32_t>(32 * (1 + t_launch_count % 31));
  if (l.dynamic_shared_bytes) {
    l.dynamic_allocation = allocate_poisoned(l.dynamic_window + l.dynamic_shared_bytes);
    l.dynamic_shared = static_cast<unsigned char*>(l.dynamic_allocation) + l.dynamic_window;
  }
  l.next_window = round_up_window(l.dynamic_window + l.dynamic_shared_bytes);
  l.mbarriers.clear();
  l.bulk.clear();
  l.unfenced_chunks.clear();
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
    f.waiting_on = nullptr;
    f.unfenced.clear();
    f.wgmma_fenced = false;
    f.wgmma_pending.clear();
    f.wgmma_committed = f.wgmma_newest = f.wgmma_waited_through = 0;
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
    int runnable = 0, at_barrier = 0, at_warp_op = 0, at_mbarrier = 0, done = 0;
    for (const Fiber& f : l.fibers) {
      runnable += f.state == State::kRunnable;
      at_mbarrier += f.state == State::kAtMbarrier;
      at_barrier += f.state == State::kAtBarrier;
      at_warp_op += f.state == State::kAtWarpOp;
      done += f.state == State::kDone;
    }
    if (runnable) continue;
    if (done == n) {
      if (!l.bulk.empty())
        l.fault = "block (" + std::to_string(block_idx.x) + "," + std::to_string(block_idx.y) + "," +
                  std::to_string(block_idx.z) + "): exits with cp.async.bulk copies no mbarrier wait "
                  "took in (undefined on a GPU)";
      break;
    }
    if (at_mbarrier) {
      // Nothing else can run: copies still in flight land now, and their transactions may
      // complete the phases the blocked threads wait for.
      if (land_bulk_copies(l, nullptr)) continue;
      for (const Fiber& f : l.fibers) {
        if (f.state != State::kAtMbarrier) continue;
        l.fault = block_name(f) + ": waits on an mbarrier phase that can never complete (missing " +
                  "arrivals or transaction bytes, or a wait on the wrong parity: deadlock on a GPU)";
        break;
      }
      break;
    }
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

namespace {
thread_local const void* t_last_kernel = nullptr;
}  // namespace
void note_kernel(const void* kernel) { t_last_kernel = kernel; }
const void* last_kernel() { return t_last_kernel; }

void launch(dim3 grid, dim3 block, std::size_t dynamic_shared_bytes, void (*body)(void*), void* arg,
            std::size_t shared_limit) {
  if (t_launch != nullptr) throw std::runtime_error("simt: kernels cannot launch kernels");
  const std::uint64_t threads = std::uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock)
    throw std::invalid_argument("simt: a block needs 1 to 1024 threads, got " + std::to_string(threads));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::invalid_argument("simt: empty grid");
  if (dynamic_shared_bytes > shared_limit)
    throw std::invalid_argument("simt: " + std::to_string(dynamic_shared_bytes) + " bytes of dynamic "
                                "shared memory: a launch gets " + std::to_string(shared_limit >> 10) +
                                " KiB (pk::launch: 48 KiB without an opt-in; pk::launch_opt_in: 227 KiB)");
  t_stacks.reserve(threads);
  Launch l;
  l.body = body;
  l.arg = arg;
  l.fibers.resize(threads);
  l.warps.resize((threads + kWarpSize - 1) / kWarpSize);
  l.dynamic_shared_bytes = dynamic_shared_bytes;
  l.shared_limit = shared_limit;
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
  if (total > l.shared_limit) {  // static + dynamic: the launch would fail on a GPU
    record_fault(l, block_name(*l.current) + ": " + std::to_string(total) + " bytes of static + "
                        "dynamic shared memory, over the " + std::to_string(l.shared_limit >> 10) +
                        " KiB this launch gets");
    abandon(l, *l.current);
  }
  l.shared.push_back({site, bytes, allocate_poisoned(bytes), l.next_window});
  l.next_window += round_up_window(bytes);
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
    note_generic_write(l, f, dst, bytes);
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
      note_generic_write(l, f, c.dst, c.bytes);
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

// --- sm_90 ----------------------------------------------------------------------------------

namespace {

const SharedAllocation* allocation_of(const Launch& l, const void* p, std::size_t bytes, std::uint32_t* window) {
  const auto* begin = static_cast<const unsigned char*>(p);
  for (const SharedAllocation& a : l.shared) {
    const auto* base = static_cast<const unsigned char*>(a.data);
    if (begin >= base && begin + bytes <= base + a.bytes) {
      *window = a.window + static_cast<std::uint32_t>(begin - base);
      return &a;
    }
  }
  return nullptr;
}

// Records "<thread>: <what><detail>" and stops the thread (no temporaries left in the caller's
// expression: they would never be destroyed).
[[noreturn]] void fail(Launch& l, const char* what, const char* detail = "") {
  record_fault(l, block_name(*l.current) + ": " + what + detail);
  abandon(l, *l.current);
}

Mbarrier& mbarrier_at(Launch& l, void* bar, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(bar) % 8 != 0 || !in_shared_memory(bar, 8))
    fail(l, what, " on an address that is not an 8-byte aligned shared-memory word");
  auto found = l.mbarriers.find(bar);
  if (found == l.mbarriers.end())
    fail(l, what, " on an mbarrier that was never initialised (or not before a barrier made its "
                  "initialisation visible)");
  return found->second;
}

}  // namespace

std::uint32_t shared_address(const void* p) {
  Launch& l = current_launch("pk::shared_address");
  if (l.dynamic_shared != nullptr) {
    const auto* base = static_cast<const unsigned char*>(l.dynamic_shared);
    const auto* q = static_cast<const unsigned char*>(p);
    if (q >= base && q <= base + l.dynamic_shared_bytes) return l.dynamic_window + static_cast<std::uint32_t>(q - base);
  }
  std::uint32_t window = 0;
  if (allocation_of(l, p, 0, &window) != nullptr) return window;
  fail(l, "takes the shared-memory address of a pointer outside shared memory");
}

void* shared_pointer(std::uint32_t address, std::size_t bytes) {
  Launch& l = current_launch("pk::shared_pointer");
  if (l.dynamic_shared != nullptr && address >= l.dynamic_window &&
      std::size_t(address - l.dynamic_window) + bytes <= l.dynamic_shared_bytes)
    return static_cast<unsigned char*>(l.dynamic_shared) + (address - l.dynamic_window);
  for (const SharedAllocation& a : l.shared)
    if (address >= a.window && std::size_t(address - a.window) + bytes <= a.bytes)
      return static_cast<unsigned char*>(a.data) + (address - a.window);
  return nullptr;
}

void mbarrier_init(void* bar, unsigned count) {
  Launch& l = current_launch("pk::mbarrier::init");
  if (reinterpret_cast<std::uintptr_t>(bar) % 8 != 0 || !in_shared_memory(bar, 8))
    fail(l, "mbarrier.init on an address that is not an 8-byte aligned shared-memory word");
  if (count == 0 || count >= (1u << 20)) fail(l, "mbarrier.init with a count outside [1, 2^20)");
  Mbarrier b;
  b.expected = b.pending = count;
  l.mbarriers[bar] = b;
  std::memset(bar, 0, 8);  // the word holds the barrier's state on a GPU: not data any more
}

void mbarrier_arrive(void* bar, unsigned expect_tx_bytes) {
  Launch& l = current_launch("pk::mbarrier::arrive");
  Mbarrier& b = mbarrier_at(l, bar, "mbarrier.arrive");
  if (b.pending == 0) fail(l, "mbarrier.arrive on a phase that has no pending arrivals left");
  b.tx += expect_tx_bytes;
  --b.pending;
  complete_phase_if_done(l, bar, b);
}

void mbarrier_wait_parity(void* bar, unsigned parity) {
  Launch& l = current_launch("pk::mbarrier::wait");
  Fiber& f = *l.current;
  bool landed = false;
  for (;;) {
    Mbarrier& b = mbarrier_at(l, bar, "mbarrier.try_wait.parity");
    if ((b.phase & 1u) != (parity & 1u)) return;  // the phase of that parity has completed
    if (!landed) {  // the copies this phase waits for land now (a wait that returned early above
      landed = true;  // leaves them in flight: reading their bytes then reads poison)
      if (land_bulk_copies(l, bar)) continue;
    }
    f.waiting_on = bar;
    f.state = State::kAtMbarrier;
    yield(l, f);
    f.waiting_on = nullptr;
  }
}

void bulk_copy(void* dst, const void* src, std::size_t bytes, void* bar) {
  Launch& l = current_launch("pk::bulk_copy");
  mbarrier_at(l, bar, "cp.async.bulk's mbarrier");
  if (bytes == 0 || bytes % 16 != 0 || reinterpret_cast<std::uintptr_t>(dst) % 16 != 0 ||
      reinterpret_cast<std::uintptr_t>(src) % 16 != 0)
    fail(l, "cp.async.bulk needs 16-byte aligned addresses and a size that is a nonzero multiple of 16");
  if (!in_shared_memory(dst, bytes)) fail(l, "cp.async.bulk's destination is not inside shared memory");
  PendingBulk c{dst, std::vector<unsigned char>(static_cast<const unsigned char*>(src),
                                                static_cast<const unsigned char*>(src) + bytes), bar};
  l.bulk.push_back(std::move(c));
  if (l.copy_rng() & 1) {  // landed at once (only this copy: the others stay in flight)
    PendingBulk last = std::move(l.bulk.back());
    l.bulk.pop_back();
    std::memcpy(last.dst, last.data.data(), bytes);
    Mbarrier& b = l.mbarriers[bar];
    b.tx -= static_cast<long long>(bytes);
    complete_phase_if_done(l, bar, b);
  }
}

void fence_proxy_async() {
  Launch& l = current_launch("pk::fence_proxy_async");
  Fiber& f = *l.current;
  for (std::uintptr_t chunk : f.unfenced) {
    auto found = l.unfenced_chunks.find(chunk);
    if (found != l.unfenced_chunks.end() && found->second == f.index) l.unfenced_chunks.erase(found);
  }
  f.unfenced.clear();
}

namespace {

// The shared-window address of element (row, k) (k < 16, 16-bit elements) of a K-major operand
// as its descriptor lays it out (the PTX ISA's canonical layouts, CUTLASS's GmmaDescriptor): rows
// of 8 form core matrices; with swizzle width W (32/64/128 bytes) row r % 8 starts W * (r % 8)
// bytes in and the 16 k of a row are 32 contiguous bytes, without swizzle a core matrix row is
// 16 bytes and k 8-15 sit LBO bytes after k 0-7; groups of 8 rows are SBO bytes apart; swizzling
// then XORs address bits 4.. with bits 7.. (1, 2 or 3 bits for 32, 64, 128 bytes).
struct Descriptor {
  std::uint32_t start, leading, stride;
  int swizzle_bits;  // 0 (none), 1 (32 B), 2 (64 B), 3 (128 B)
  int row_bytes;
};

bool decode(std::uint64_t desc, Descriptor* d, std::string* error) {
  d->start = static_cast<std::uint32_t>(desc & 0x3fff) << 4;
  d->leading = static_cast<std::uint32_t>((desc >> 16) & 0x3fff) << 4;
  d->stride = static_cast<std::uint32_t>((desc >> 32) & 0x3fff) << 4;
  const unsigned base_offset = static_cast<unsigned>((desc >> 49) & 7);
  const unsigned mode = static_cast<unsigned>(desc >> 62);
  static const int kBits[4] = {0, 3, 2, 1};  // layout type 0 none, 1 128 B, 2 64 B, 3 32 B
  d->swizzle_bits = kBits[mode];
  d->row_bytes = d->swizzle_bits ? 16 << d->swizzle_bits : 16;
  if (base_offset != 0) {
    *error = "a wgmma descriptor with a nonzero base offset (not emulated)";
    return false;
  }
  const std::uint32_t phase_mask = (1u << d->swizzle_bits) - 1;
  if (d->swizzle_bits && ((d->start >> 7) & phase_mask) != 0) {
    *error = "a swizzled wgmma operand that starts inside its swizzle pattern (address bits 7.. "
             "not 0: the hardware would need a base offset)";
    return false;
  }
  return true;
}

std::uint32_t element_address(const Descriptor& d, int row, int k) {
  const int k_bytes = 2 * k;
  std::uint32_t a = d.start + d.stride * (row / 8);
  if (d.swizzle_bits == 0) {
    a += 16 * (row % 8) + d.leading * (k_bytes / 16) + k_bytes % 16;
  } else {
    a += d.row_bytes * (row % 8) + k_bytes;
    const std::uint32_t mask = (1u << d.swizzle_bits) - 1;
    a ^= ((a >> 7) & mask) << 4;
  }
  return a;
}

// Reads a K-major rows x 16 operand; false (with a message) where it leaves shared memory or reads
// bytes cp.async wrote that their writer has not fenced for the async proxy.
float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
float bfloat16_to_float(std::uint16_t bits) { return bits_to_float(std::uint32_t(bits) << 16); }
float half_to_float(std::uint16_t h) {  // exact: every half is a float
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | std::uint32_t(mantissa) << 13);
  const float magnitude = exponent == 0 ? std::ldexp(float(mantissa), -24)
                                        : std::ldexp(float(mantissa | 0x400), exponent - 25);
  return sign ? -magnitude : magnitude;
}

bool gather(Launch& l, std::uint64_t desc, int rows, WgmmaType type, std::vector<float>& out, std::string* error) {
  Descriptor d;
  if (!decode(desc, &d, error)) return false;
  out.resize(std::size_t(rows) * 16);
  for (int r = 0; r < rows; ++r) {
    for (int k = 0; k < 16; ++k) {
      const std::uint32_t address = element_address(d, r, k);
      const void* p = shared_pointer(address, 2);
      if (p == nullptr) {
        *error = "a wgmma operand element at shared address " + std::to_string(address) +
                 " outside shared memory (wrong descriptor?)";
        return false;
      }
      if (!l.unfenced_chunks.empty() &&
          l.unfenced_chunks.count(reinterpret_cast<std::uintptr_t>(p) / 16)) {
        *error = "wgmma reads shared memory that cp.async wrote without a fence.proxy.async by its "
                 "writer (pk::fence_proxy_async) before the barrier";
        return false;
      }
      std::uint16_t bits;
      std::memcpy(&bits, p, 2);
      out[std::size_t(r) * 16 + k] = type == WgmmaType::kHalf ? half_to_float(bits) : bfloat16_to_float(bits);
    }
  }
  return true;
}

void run_wgmma(Launch& l, const Fiber& f, const PendingWgmma& op) {
  std::vector<float> a, b;
  std::string error;
  if (!gather(l, op.desc_a, 64, op.type, a, &error) || !gather(l, op.desc_b, op.n, op.type, b, &error)) {
    record_fault(l, block_name(f) + ": " + error);
    return;
  }
  // The D fragment: warp w of the warpgroup holds rows 16 w.., lane (g = lane / 4, t = lane % 4)
  // register i holds row 16 w + g + 8 ((i >> 1) & 1), column 8 (i >> 2) + 2 t + (i & 1).
  const int warp = (f.index / kWarpSize) % 4, g = f.lane / 4, t = f.lane % 4;
  for (int i = 0; i < op.n / 2; ++i) {
    const int row = 16 * warp + g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * t + (i & 1);
    float sum = op.scale_d ? op.acc[i] : 0.0f;
    for (int k = 0; k < 16; ++k) sum += a[std::size_t(row) * 16 + k] * b[std::size_t(col) * 16 + k];
    op.acc[i] = sum;
  }
}

}  // namespace

void wgmma_fence() {
  Launch& l = current_launch("pk::wgmma::fence");
  l.current->wgmma_fenced = true;
}

void wgmma_mma(float* acc, int n, WgmmaType type, std::uint64_t desc_a, std::uint64_t desc_b, bool scale_d) {
  Launch& l = current_launch("pk::wgmma::mma");
  Fiber& f = *l.current;
  const int threads = static_cast<int>(l.fibers.size());
  if (threads % 128 != 0) fail(l, "wgmma in a block whose size is not a multiple of a warpgroup (128 threads)");
  if (n < 8 || n > 256 || n % 8 != 0) fail(l, "wgmma m64nNk16 with N outside 8..256 in steps of 8");
  if (!f.wgmma_fenced)
    fail(l, "wgmma.mma_async without a wgmma.fence since the start or the last wait (pk::wgmma::fence)");
  PendingWgmma op{acc, n, type, desc_a, desc_b, scale_d, 0};
  f.wgmma_newest = f.wgmma_committed + 1;
  // In issue order: once one waits, every later one waits too.
  if (f.wgmma_pending.empty() && (l.copy_rng() & 1)) {
    run_wgmma(l, f, op);
  } else {
    f.wgmma_pending.push_back(op);
  }
}

void wgmma_commit() {
  Launch& l = current_launch("pk::wgmma::commit");
  Fiber& f = *l.current;
  ++f.wgmma_committed;
  for (PendingWgmma& op : f.wgmma_pending)
    if (op.group == 0) op.group = f.wgmma_committed;
}

void wgmma_wait(int pending_groups) {
  Launch& l = current_launch("pk::wgmma::wait");
  Fiber& f = *l.current;
  const std::uint64_t newest_done =
      f.wgmma_committed > std::uint64_t(pending_groups) ? f.wgmma_committed - pending_groups : 0;
  f.wgmma_waited_through = std::max(f.wgmma_waited_through, newest_done);
  std::vector<PendingWgmma> still;
  for (const PendingWgmma& op : f.wgmma_pending) {
    if (still.empty() && op.group != 0 && op.group <= newest_done) {
      run_wgmma(l, f, op);
    } else {
      still.push_back(op);
    }
  }
  f.wgmma_pending.swap(still);
  f.wgmma_fenced = false;
}

}  // namespace simt
}  // namespace pk
