// SPDX-License-Identifier: Apache-2.0
// Kernels that exercise the SIMT portability layer: the emulator's self-test runs them on the
// CPU (csrc/tests/simt_selftest.cpp) and tests/test_csrc_compile.py compiles them with nvcc.
// Some are wrong on purpose (a missing barrier, out-of-bounds writes, barrier misuse): the
// emulator and the sanitizers must catch them.
#pragma once

#include "pk/async_copy.h"
#include "pk/divmod.h"
#include "pk/reduce.h"
#include "pk/simt.h"
#include "pk/tile.h"
#include "pk/types.h"

namespace selftest {

constexpr int kSumThreads = 128;

// A shared-memory tree reduction, one partial sum per block. kBarrierInLoop=false drops the
// barrier between the tree levels: a real bug that the emulator must expose.
template <bool kBarrierInLoop>
__global__ void block_sum_kernel(const float* x, float* block_sums, int n) {
  PK_SHARED(float, partial, kSumThreads);
  float v = 0.0f;
  for (int i = blockIdx.x * kSumThreads + threadIdx.x; i < n; i += kSumThreads * gridDim.x) v += x[i];
  partial[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kSumThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    if (kBarrierInLoop) __syncthreads();
  }
  if (threadIdx.x == 0) block_sums[blockIdx.x] = partial[0];
}

// Warp collectives, one warp per block; each lane writes what it received.
__global__ void warp_ops_kernel(const float* x, float* down_sum, float* butterfly_max, float* from_lane5,
                                float* from_below, unsigned int* ballot, int* any_all) {
  const int i = blockIdx.x * 32 + threadIdx.x;
  const float v = x[i];
  float s = v;
  for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0xffffffffu, s, offset);
  down_sum[i] = s;  // the warp's sum on lane 0
  butterfly_max[i] = pk::warp_allreduce(v, pk::Max());
  from_lane5[i] = __shfl_sync(0xffffffffu, v, 5);
  from_below[i] = __shfl_up_sync(0xffffffffu, v, 1);
  ballot[i] = __ballot_sync(0xffffffffu, v > 0.0f);
  any_all[2 * i] = __any_sync(0xffffffffu, v > 2.0f);
  any_all[2 * i + 1] = __all_sync(0xffffffffu, v > -3.0f);
}

// Lanes exchange values through shared memory. Without the __syncwarp between the write and the
// read it relies on lockstep warps, which no GPU since Volta promises: the emulator's lanes run
// independently between warp ops, so the reads see unwritten (poisoned) slots.
template <bool kSyncWarp>
__global__ void warp_exchange_kernel(const float* x, float* out) {
  PK_SHARED(float, slots, 32);
  const int lane = threadIdx.x;
  slots[lane] = x[blockIdx.x * 32 + lane];
  if (kSyncWarp) __syncwarp();
  out[blockIdx.x * 32 + lane] = slots[(lane + 1) % 32];
}

// Barrier votes: counts, and/or of a predicate over the block.
__global__ void barrier_votes_kernel(const float* x, int* out) {
  const float v = x[blockIdx.x * blockDim.x + threadIdx.x];
  const int count = __syncthreads_count(v > 0.0f);
  const int all = __syncthreads_and(v > -2.0f);
  const int any = __syncthreads_or(v > 1.5f);
  int* mine = out + 3 * (blockIdx.x * blockDim.x + threadIdx.x);
  mine[0] = count;
  mine[1] = all;
  mine[2] = any;
}

// Block-wide reduction of a struct through pk::block_allreduce.
struct SumMax {
  float sum;
  float max;
};
struct MergeSumMax {
  PK_DEVICE SumMax operator()(const SumMax& a, const SumMax& b) const {
    return SumMax{a.sum + b.sum, a.max > b.max ? a.max : b.max};
  }
};
__global__ void block_allreduce_kernel(const float* x, float* out) {
  PK_SHARED(SumMax, scratch, pk::kMaxWarps);
  const float v = x[blockIdx.x * blockDim.x + threadIdx.x];
  const SumMax r = pk::block_allreduce(SumMax{v, v}, MergeSumMax(), scratch);
  out[2 * (blockIdx.x * blockDim.x + threadIdx.x)] = r.sum;  // every thread must agree
  out[2 * (blockIdx.x * blockDim.x + threadIdx.x) + 1] = r.max;
}

// Histogram through atomics on dynamic shared memory, then on global memory.
__global__ void histogram_kernel(const int* values, int n, int bins, int* histogram) {
  PK_DYNAMIC_SHARED(int, local);
  for (int b = threadIdx.x; b < bins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
    atomicAdd(&local[values[i]], 1);
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x) atomicAdd(&histogram[b], local[b]);
}

// How a test matrix is stored in global memory.
struct RowMajor {
  static constexpr bool row_major = true;
};
struct ColMajor {
  static constexpr bool row_major = false;
};

// C (M x N, float) = A (M x K, row-major) * B (K x N, LayoutB), one warp per 16x16 tile of C:
// each 16-deep slice of A and B is staged in shared memory as stored in global memory, read by
// pk::tile::load_a / load_b (B transposed by ldmatrix when it is row-major: N contiguous), two
// 16x8 products. `shared_offset` (elements) shifts the shared tiles (1: misaligned ldmatrix).
template <typename T, typename LayoutB>
__global__ void tile_matmul_kernel(const T* a, const T* b, float* c, int M, int N, int K, int shared_offset) {
  using namespace pk::tile;
  constexpr int kLd = 24;  // 16 + 8: rows of 48 bytes, 16-byte aligned
  PK_SHARED(T, a_tile, 16 * kLd + 8);
  PK_SHARED(T, b_tile, 16 * kLd + 8);
  const int tile_m = blockIdx.x, tile_n = blockIdx.y, lane = threadIdx.x;
  FragmentA<T> fa;
  FragmentB<T> fb[2];
  Accumulator acc[2];
  fill(acc[0], 0.0f);
  fill(acc[1], 0.0f);
  for (int k0 = 0; k0 < K; k0 += kK) {
    for (int e = lane; e < 16 * 16; e += 32) {
      const int i = e / 16, j = e % 16;  // A: (m, k); B: (k, n) row-major, (n, k) column-major
      a_tile[i * kLd + j] = a[(tile_m * 16 + i) * K + k0 + j];
      b_tile[i * kLd + j] = LayoutB::row_major ? b[(k0 + i) * N + tile_n * 16 + j] : b[(tile_n * 16 + i) * K + k0 + j];
    }
    __syncwarp();  // the slice is staged
    load_a<true>(fa, a_tile + shared_offset, kLd);
    load_b<!LayoutB::row_major>(fb[0], fb[1], b_tile + shared_offset, kLd);
    mma(acc[0], fa, fb[0]);
    mma(acc[1], fa, fb[1]);
    __syncwarp();  // every lane has loaded before the next slice overwrites the tiles
  }
  for (Accumulator& part : acc)
    for (float& v : part.x) v *= 0.5f;  // element-wise epilogue
  store(c + tile_m * 16 * N + tile_n * 16, acc[0], N);
  store(c + tile_m * 16 * N + tile_n * 16 + 8, acc[1], N);
}

// C (16 x 8, float) = A (16 x K, row-major) * B (K x 8, row-major) on TF32 tiles, one warp:
// each 8-deep slice staged in shared memory as stored (kRound: rounded by pk::tile::to_tf32 on
// the way, else left for the tensor core to truncate), read by load_a_tf32 / load_b_tf32.
template <bool kRound>
__global__ void tile_tf32_kernel(const float* a, const float* b, float* c, int K) {
  using namespace pk::tile;
  constexpr int kLdA = kKTf32 + 4, kLdB = kN + 8;  // the conflict-free paddings conv.cuh uses
  PK_SHARED(float, a_tile, kM * kLdA);
  PK_SHARED(float, b_tile, kKTf32 * kLdB);
  const int lane = threadIdx.x;
  Accumulator acc;
  fill(acc, 0.0f);
  for (int k0 = 0; k0 < K; k0 += kKTf32) {
    for (int e = lane; e < kM * kKTf32; e += 32) {
      const int m = e / kKTf32, k = e % kKTf32;
      a_tile[m * kLdA + k] = kRound ? to_tf32(a[m * K + k0 + k]) : a[m * K + k0 + k];
    }
    for (int e = lane; e < kKTf32 * kN; e += 32) {
      const int k = e / kN, n = e % kN;
      b_tile[k * kLdB + n] = kRound ? to_tf32(b[(k0 + k) * kN + n]) : b[(k0 + k) * kN + n];
    }
    __syncwarp();  // the slice is staged
    FragmentTf32A fa;
    FragmentTf32B fb;
    load_a_tf32(fa, a_tile, kLdA);
    load_b_tf32(fb, b_tile, kLdB);
    mma(acc, fa, fb);
    __syncwarp();  // every lane has loaded before the next slice overwrites the tiles
  }
  store(c, acc, kN);
}

// Transpose through a padded 2-D shared tile, with a 2-D thread block (16 x 16) on a 2-D grid.
constexpr int kTile = 16;
__global__ void transpose_kernel(const float* in, float* out, int rows, int cols) {
  PK_SHARED_2D(float, tile, kTile, kTile + 1);
  const int c = blockIdx.x * kTile + threadIdx.x, r = blockIdx.y * kTile + threadIdx.y;
  if (r < rows && c < cols) tile[threadIdx.y][threadIdx.x] = in[r * cols + c];
  __syncthreads();
  const int tc = blockIdx.y * kTile + threadIdx.x, tr = blockIdx.x * kTile + threadIdx.y;
  if (tr < cols && tc < rows) out[tr * rows + tc] = tile[threadIdx.x][threadIdx.y];
}

// Deliberate out-of-bounds writes: one past a shared array, one past a global buffer.
__global__ void oob_shared_write_kernel(float* out) {
  PK_SHARED(float, buffer, 64);
  buffer[threadIdx.x + 1] = 1.0f;  // thread 63 writes buffer[64]
  __syncthreads();
  out[threadIdx.x] = buffer[threadIdx.x];
}
__global__ void oob_global_write_kernel(float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = 1.0f;  // off by one
}

// A two-stage cp.async pipeline (pk/async_copy.h): step s copies 16 bytes per thread into stage
// s % 2 (every third step zero-filled instead) while the block reads the previous step's stage,
// each thread its neighbour's chunk. kWait=false drops the wait before the barrier: the emulator
// lands some copies only at a later wait, so the reads see poisoned or stale data.
constexpr int kCopyThreads = 32;
template <bool kWait>
__global__ void async_pipeline_kernel(const float* x, float* out, int steps) {
  PK_SHARED(float, stages, 2 * kCopyThreads * 4);
  const int t = threadIdx.x;
  const float* const src = x + blockIdx.x * steps * kCopyThreads * 4;
  auto issue = [&](int s) {
    if (s < steps) pk::async_copy_16(stages + (s % 2) * kCopyThreads * 4 + t * 4, src + (s * kCopyThreads + t) * 4, s % 3 != 2);
    pk::async_commit();
  };
  issue(0);
  for (int s = 0; s < steps; ++s) {
    if (kWait) pk::async_wait<0>();
    __syncthreads();  // step s landed for every thread; every read of step s - 1 is done
    issue(s + 1);     // into the stage step s - 1 used
    const float* const chunk = stages + (s % 2) * kCopyThreads * 4 + (t + 1) % kCopyThreads * 4;
    for (int j = 0; j < 4; ++j) out[((blockIdx.x * steps + s) * kCopyThreads + t) * 4 + j] = chunk[j];
  }
  pk::async_wait<0>();
}
// Issues a copy and exits without waiting for it (the emulator reports it).
__global__ void async_not_waited_kernel(const float* x, float* out) {
  PK_SHARED(float, chunk, 4);
  if (threadIdx.x == 0) pk::async_copy_16(chunk, x, true);
  pk::async_commit();
  out[threadIdx.x] = 1.0f;
}

// Barrier misuse a GPU would hang on or leave undefined.
__global__ void early_exit_kernel(float* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}
__global__ void divergent_warp_op_kernel(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x < 16)
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  else
    v = static_cast<float>(__ballot_sync(0xffffffffu, v > 20.0f));
  out[threadIdx.x] = v;
}

// pk::Divmod on the device (the multiply-high path the kernels take).
__global__ void divmod_kernel(const int* n, int count, pk::Divmod by, int* quotient, int* remainder) {
  for (int i = threadIdx.x; i < count; i += blockDim.x) by.divmod(n[i], quotient[i], remainder[i]);
}

}  // namespace selftest
