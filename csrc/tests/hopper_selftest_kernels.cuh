// SPDX-License-Identifier: Apache-2.0
// Self-test kernels for the sm_90 layer (pk/mbarrier.h, pk/wgmma.h), run by hopper_selftest.cpp on
// the emulator (and compiled for sm_90a by tests/test_csrc_compile.py).
#pragma once

#include <cstdint>

#include "pk/async_copy.h"
#include "pk/mbarrier.h"
#include "pk/simt.h"
#include "pk/tma.h"
#include "pk/types.h"
#include "pk/wgmma.h"

namespace hopper_selftest {

// What a kernel leaves out or gets wrong, to check that the emulator notices.
enum Variant : int {
  kCorrect = 0,
  kNoWgmmaWait = 1,       // reads the accumulators before wgmma.wait_group
  kNoWgmmaFence = 2,      // no wgmma.fence before the first mma
  kNoProxyFence = 3,      // wgmma reads cp.async data without fence.proxy.async
  kWrongStride = 4,       // descriptor's stride byte offset off by 16 bytes
  kWrongParity = 5,       // waits on the other phase's parity
  kNoEmptyWait = 6,       // the producer refills a stage before the consumers released it
  kNoExpectTx = 7,        // arrives on the full barrier without the transaction bytes
  kNoTmaWait = 8,         // reads the tensor copy's box without waiting on its barrier
  kNoRealign = 9,         // takes dynamic shared memory as aligned to the swizzle pattern
};

constexpr int kGemmK = 64;  // the whole depth is staged at once

// Where byte `byte_in_k` (0 .. 2 kGemmK) of row r of a K-major rows x kGemmK operand goes, laid
// out for `swizzle`: swizzled modes as K blocks of the swizzle width, each rows x width (groups of 8
// rows, stride 8 width); no swizzle as 16-byte core-matrix columns, each rows x 16 bytes (groups of
// 8 rows 128 bytes apart).
PK_HOST_DEVICE unsigned operand_offset(pk::wgmma::Swizzle swizzle, int rows, int r, int byte_in_k) {
  const int width = pk::wgmma::row_bytes(swizzle);
  const unsigned block = static_cast<unsigned>(byte_in_k / width) * rows * width;
  if (swizzle == pk::wgmma::Swizzle::kNone) return block + (r / 8) * 128 + (r % 8) * 16 + byte_in_k % 16;
  return block + pk::wgmma::swizzled_offset(swizzle, r, byte_in_k % width, 8 * width);
}
// The descriptor of 16-deep step j of that operand.
PK_DEVICE std::uint64_t operand_descriptor(const unsigned char* base, pk::wgmma::Swizzle swizzle, int rows, int j,
                                           int variant) {
  const int width = pk::wgmma::row_bytes(swizzle);
  const unsigned stride = (swizzle == pk::wgmma::Swizzle::kNone ? 128u : 8u * width) + (variant == kWrongStride ? 16u : 0u);
  const unsigned leading = static_cast<unsigned>(rows) * 16;  // no swizzle: the next 16-byte column
  if (swizzle == pk::wgmma::Swizzle::kNone)
    return pk::wgmma::descriptor(base + 2 * j * leading, swizzle, leading, stride);
  const int byte_in_k = 32 * j;
  return pk::wgmma::descriptor(base + (byte_in_k / width) * rows * width + byte_in_k % width, swizzle, leading, stride);
}

// c (64 x N, float) = a (64 x kGemmK) b (N x kGemmK)^T, one warpgroup; the tiles staged by cp.async
// in the layout `write_swizzle` gives and read through descriptors of `read_swizzle`.
template <typename T, int N>
__global__ void wgmma_gemm_kernel(const T* a, const T* b, float* c, int write_swizzle, int read_swizzle, int variant) {
  PK_DYNAMIC_SHARED(unsigned char, smem);
  const auto write = static_cast<pk::wgmma::Swizzle>(write_swizzle);
  const auto read = static_cast<pk::wgmma::Swizzle>(read_swizzle);
  // The 1024-byte aligned start of the tiles (a 128-byte swizzle pattern repeats every 1024).
  unsigned char* const a_tile =
      variant == kNoRealign ? smem : smem + ((1024 - pk::shared_address(smem) % 1024) % 1024);
  unsigned char* const b_tile = a_tile + 64 * kGemmK * 2;
  const int tid = threadIdx.x;
  constexpr int kChunks = kGemmK * 2 / 16;  // 16-byte chunks per row
  for (int i = tid; i < 64 * kChunks; i += 128) {
    const int r = i / kChunks, chunk = i % kChunks;
    pk::async_copy_16(a_tile + operand_offset(write, 64, r, 16 * chunk), a + r * kGemmK + 8 * chunk, true);
  }
  for (int i = tid; i < N * kChunks; i += 128) {
    const int r = i / kChunks, chunk = i % kChunks;
    pk::async_copy_16(b_tile + operand_offset(write, N, r, 16 * chunk), b + r * kGemmK + 8 * chunk, true);
  }
  pk::async_commit();
  pk::async_wait<0>();
  if (variant != kNoProxyFence) pk::fence_proxy_async();
  __syncthreads();
  float acc[N / 2];
  for (float& v : acc) v = 0.0f;
  if (variant != kNoWgmmaFence) pk::wgmma::fence();
  for (int j = 0; j < kGemmK / 16; ++j)
    pk::wgmma::mma<N, T>(acc, operand_descriptor(a_tile, read, 64, j, variant),
                         operand_descriptor(b_tile, read, N, j, variant), j > 0);
  pk::wgmma::commit();
  float early[N / 2];
  for (int i = 0; i < N / 2; ++i) early[i] = acc[i];
  pk::wgmma::wait<0>();
  const float* result = variant == kNoWgmmaWait ? early : acc;
  const int warp = tid / 32, g = tid % 32 / 4, t = tid % 4;
  for (int i = 0; i < N / 2; ++i)
    c[(16 * warp + g + 8 * ((i >> 1) & 1)) * N + 8 * (i >> 2) + 2 * t + (i & 1)] = result[i];
}

// c (64 x N) = a (64 x kGemmK) b^T with b's N x kGemmK box brought by a tensor copy (rows and
// columns past the tensor's arrive as zeros), a staged by cp.async as above, 128-byte swizzle.
template <typename T, int N>
__global__ void tma_gemm_kernel(const T* a, const PK_GRID_CONSTANT pk::TensorMap2D b_map, float* c, int variant) {
  PK_DYNAMIC_SHARED(unsigned char, smem);
  PK_SHARED(std::uint64_t, full, 1);
  constexpr auto kMode = pk::wgmma::Swizzle::k128;
  unsigned char* const a_tile = smem + ((1024 - pk::shared_address(smem) % 1024) % 1024);
  unsigned char* const b_tile = a_tile + 64 * kGemmK * 2;
  const int tid = threadIdx.x;
  if (tid == 0) {
    pk::mbarrier::init(full, 1);
    pk::mbarrier::fence_init();
  }
  __syncthreads();
  if (tid == 0) {
    pk::mbarrier::arrive_expect_tx(full, N * kGemmK * 2);
    pk::tma_load_2d(b_tile, b_map, 0, 0, full);
  }
  constexpr int kChunks = kGemmK * 2 / 16;
  for (int i = tid; i < 64 * kChunks; i += 128)
    pk::async_copy_16(a_tile + operand_offset(kMode, 64, i / kChunks, 16 * (i % kChunks)),
                      a + (i / kChunks) * kGemmK + 8 * (i % kChunks), true);
  pk::async_commit();
  pk::async_wait<0>();
  pk::fence_proxy_async();
  __syncthreads();
  if (variant != kNoTmaWait) pk::mbarrier::wait(full, 0);
  float acc[N / 2];
  pk::wgmma::fence();
  for (int j = 0; j < kGemmK / 16; ++j)
    pk::wgmma::mma<N, T>(acc, operand_descriptor(a_tile, kMode, 64, j, 0), operand_descriptor(b_tile, kMode, N, j, 0),
                         j > 0);
  pk::wgmma::commit();
  pk::wgmma::wait<0>();
  if (variant == kNoTmaWait) pk::mbarrier::wait(full, 0);  // the copy completes before the exit
  const int warp = tid / 32, g = tid % 32 / 4, t = tid % 4;
  for (int i = 0; i < N / 2; ++i)
    c[(16 * warp + g + 8 * ((i >> 1) & 1)) * N + 8 * (i >> 2) + 2 * t + (i & 1)] = acc[i];
}

// out[block][tid] = sum over chunks of x[chunk][tid]: thread 0 streams 128-float chunks into a
// ring of stages by bulk copies completing on full barriers; every thread adds its element and
// arrives on the stage's empty barrier, which thread 0 waits on before refilling the stage.
constexpr int kStages = 3, kChunkFloats = 128;
__global__ void bulk_pipeline_kernel(const float* x, float* out, int chunks, int variant) {
  PK_SHARED(float, ring, kStages * kChunkFloats);
  PK_SHARED(std::uint64_t, full, kStages);
  PK_SHARED(std::uint64_t, empty, kStages);
  const int tid = threadIdx.x;
  const unsigned bytes = kChunkFloats * 4;
  const float* chunk0 = x + std::size_t(blockIdx.x) * chunks * kChunkFloats;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      pk::mbarrier::init(&full[s], 1);
      pk::mbarrier::init(&empty[s], 128);
    }
    pk::mbarrier::fence_init();
  }
  __syncthreads();
  auto produce = [&](int i) {
    const int s = i % kStages;
    if (variant == kNoExpectTx) {
      pk::mbarrier::arrive(&full[s]);
    } else {
      pk::mbarrier::arrive_expect_tx(&full[s], bytes);
    }
    pk::bulk_copy(ring + s * kChunkFloats, chunk0 + std::size_t(i) * kChunkFloats, bytes, &full[s]);
  };
  if (tid == 0)
    for (int i = 0; i < kStages && i < chunks; ++i) produce(i);
  float sum = 0.0f;
  for (int i = 0; i < chunks; ++i) {
    const int s = i % kStages;
    const unsigned phase = (i / kStages) & 1;
    pk::mbarrier::wait(&full[s], variant == kWrongParity ? phase ^ 1u : phase);
    sum += ring[s * kChunkFloats + tid];
    pk::mbarrier::arrive(&empty[s]);
    if (tid == 0 && i + kStages < chunks) {
      if (variant != kNoEmptyWait) pk::mbarrier::wait(&empty[s], phase);
      produce(i + kStages);
    }
  }
  out[blockIdx.x * 128 + tid] = sum;
}

}  // namespace hopper_selftest
