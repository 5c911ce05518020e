// SPDX-License-Identifier: Apache-2.0
// The forward convolution on sm_90: the same implicit GEMM as conv.cuh's ForwardProblem (rows =
// output pixels, columns = output channels of the group, depth = (kh, kw, c_in)), computed by one
// warpgroup per BM x BN tile (64 x 128, or 128 x 64 as two m64 halves sharing each weight slice)
// with wgmma (pk/wgmma.h) from shared memory in the 128-byte swizzle:
//   A (BM pixels x 64 depth per slice): gathered by every thread with cp.async (BM / 16 runs of 16
//     bytes, fixed rows, one depth cursor; padding taps and tails zero-filled) into the swizzled
//     tile, then fence.proxy.async so wgmma (async proxy) sees it;
//   B (BN channels x 64 depth): one 2-D tensor copy of the OHWI weight seen as (C_out, depth) rows
//     (pk/tma.h; zeros past the depth), issued by thread 0, completing on the stage's mbarrier.
// kStages stages: slices step + 1 and step + 2 are in flight while the tensor cores run step and
// step - 1 drains (wgmma.wait_group 1), one __syncthreads per slice. The accumulators go through
// shared memory to the forward's epilogue (bias, channel statistics, scale/shift/residual/act),
// as in conv.cuh. Used for 16-bit inputs without an input prologue, with channels per group a
// multiple of 8 and 16-byte aligned x and w, on sm_90 devices (PACKED_KERNELS_SIMT_ARCH=90 in the
// emulator); everything else runs conv.cuh's kernel. conv.cuh's stride-1 input gradient runs
// here too, as the forward of grad with the reversed, channel-swapped weight.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "conv.cuh"
#include "pk/async_copy.h"
#include "pk/mbarrier.h"
#include "pk/simt.h"
#include "pk/tma.h"
#include "pk/wgmma.h"

namespace pk {
namespace conv {
namespace detail {

constexpr int kSm90Threads = 128;  // one warpgroup
constexpr int kSm90BlockK = 64;    // a slice row is 128 bytes of 16-bit elements: the 128-byte swizzle
constexpr int kSm90Stages = 4;
constexpr int kSm90RowBytes = kSm90BlockK * 2;
constexpr auto kSm90Swizzle = wgmma::Swizzle::k128;
constexpr unsigned kSm90GroupStride = 8 * kSm90RowBytes;  // bytes between groups of 8 rows
constexpr int kOutsideRow = 1 << 30;  // a row coordinate past every input (rows past the end)

template <int BM, int BN>
struct Sm90Tiles {
  static constexpr int kHalves = BM / 64;  // m64 wgmma row halves
  static constexpr int kABytes = BM * kSm90RowBytes;
  static constexpr int kBBytes = BN * kSm90RowBytes;
  static constexpr int kStageBytes = kABytes + kBBytes;  // a multiple of 1024: stages stay aligned
  static constexpr int kLdC = BN + 4;                    // the fp32 accumulator tile's row stride
  static constexpr std::size_t kStagingBytes = std::size_t(kSm90Stages) * kStageBytes;
  static constexpr std::size_t kAccumulatorBytes = sizeof(float) * BM * kLdC;
  // 1024 bytes of slack to align the stages to the swizzle pattern; the accumulators reuse them.
  static constexpr std::size_t kSharedBytes =
      1024 + (kStagingBytes > kAccumulatorBytes ? kStagingBytes : kAccumulatorBytes);
  static_assert(kStageBytes % 1024 == 0, "stages start on the swizzle pattern");
};

template <typename T, int BM, int BN>
__global__ void __launch_bounds__(kSm90Threads, 1)
    forward_sm90_kernel(ForwardProblem<T> p, const PK_GRID_CONSTANT TensorMap2D w_map) {
  using Config = Sm90Tiles<BM, BN>;
  static_assert(kBlockM == 64 && BM % 64 == 0, "channel statistics per 64-row tile (conv.h)");
  using RowInfo = typename ForwardProblem<T>::RowInfo;
  using DepthInfo = typename ForwardProblem<T>::DepthInfo;
  PK_DYNAMIC_SHARED(unsigned char, shared);
  PK_SHARED(RowInfo, row_info, BM);
  PK_SHARED(std::uint64_t, full, kSm90Stages);  // B of stage s landed (phase = uses of s, mod 2)
  unsigned char* const stages = shared + (1024 - shared_address(shared) % 1024) % 1024;
  float* const Cs = reinterpret_cast<float*>(stages);

  const int g = p.bind(blockIdx.z);
  const int tid = threadIdx.x;
  const index_t m0 = index_t(blockIdx.x) * BM, n0 = index_t(blockIdx.y) * BN;
  const int steps = static_cast<int>((p.depth + kSm90BlockK - 1) / kSm90BlockK);
  static_assert(BM <= kSm90Threads, "a thread decodes one row of the tile");
  if (BM == kSm90Threads || tid < BM) row_info[tid] = p.row_info(g, m0 + tid < p.rows ? m0 + tid : p.rows - 1);
  if (tid == 0) {
    for (int s = 0; s < kSm90Stages; ++s) mbarrier::init(&full[s], 1);
    mbarrier::fence_init();
  }

  // This thread's A runs: rows tid / 8 + 16 t, bytes 16 (tid % 8) of each row, all at depth
  // index 8 (tid % 8) of the slice (one cursor). A row past the end gets a row coordinate no tap
  // brings inside the input, so the bounds test zero-fills it.
  constexpr int kRuns = BM * kSm90RowBytes / 16 / kSm90Threads;
  const int chunk = tid % 8;
  Coord a_fixed[kRuns];
  unsigned a_at[kRuns];
#pragma unroll
  for (int t = 0; t < kRuns; ++t) {
    const int r = tid / 8 + 16 * t;
    const bool valid = m0 + r < p.rows;
    a_fixed[t] = p.row_info(g, valid ? m0 + r : 0).a;
    if (!valid) a_fixed[t].h = kOutsideRow;
    a_at[t] = wgmma::swizzled_offset(kSm90Swizzle, r, 16 * chunk, kSm90GroupStride);
  }
  const int depth = static_cast<int>(p.depth);  // < 2^30 (check_shape)
  typename ForwardProblem<T>::DepthCursor cursor = p.depth_cursor(g, 8 * chunk);
  const int w_row = static_cast<int>(g * p.geo.cout_g + n0);
  __syncthreads();  // barriers initialised, rows decoded

  auto issue = [&](int step) {
    if (step < steps) {
      unsigned char* const a_stage = stages + (step % kSm90Stages) * Config::kStageBytes;
      const DepthInfo d = p.depth_info(g, cursor);
      p.advance(cursor, kSm90BlockK);
      const bool depth_ok = step * kSm90BlockK + 8 * chunk < depth;
#pragma unroll
      for (int t = 0; t < kRuns; ++t) {
        const bool read = depth_ok & inside(a_fixed[t], d.a, p.a_bounds());
        async_copy_16(a_stage + a_at[t], p.x + (read ? a_fixed[t].offset + d.a.offset : 0), read);
      }
      if (tid == 0) {
        std::uint64_t* const bar = &full[step % kSm90Stages];
        mbarrier::arrive_expect_tx(bar, Config::kBBytes);
        tma_load_2d(a_stage + Config::kABytes, w_map, step * kSm90BlockK, w_row, bar);
      }
    }
    async_commit();  // one group per step, empty past the end: the wait below counts steps
  };

  // Descriptors of stage 0's tiles; stage s, step j are kStageBytes s + 32 j bytes on.
  const std::uint64_t a_desc = wgmma::descriptor(stages, kSm90Swizzle, 16, kSm90GroupStride);
  const std::uint64_t b_desc = wgmma::descriptor(stages + Config::kABytes, kSm90Swizzle, 16, kSm90GroupStride);
  float acc[Config::kHalves][BN / 2];
  for (int s = 0; s < kSm90Stages - 2; ++s) issue(s);
  for (int step = 0; step < steps; ++step) {
    async_wait<kSm90Stages - 3>();  // this thread's A runs of `step` landed
    fence_proxy_async();            // ... and are visible to wgmma
    // Every thread's runs of `step` are in; every thread is past the wait for step - 2's wgmma,
    // whose stage the next issue refills.
    __syncthreads();
    issue(step + kSm90Stages - 2);
    const unsigned stage_offset = (step % kSm90Stages) * Config::kStageBytes;
    mbarrier::wait(&full[step % kSm90Stages], (step / kSm90Stages) & 1);
    wgmma::fence();
#pragma unroll
    for (int j = 0; j < kSm90BlockK / 16; ++j)
#pragma unroll
      for (int h = 0; h < Config::kHalves; ++h)  // rows 64 h.. start 64 rows (8 KiB) on
        wgmma::mma<BN, T>(acc[h], wgmma::advance(a_desc, stage_offset + 64 * kSm90RowBytes * h + 32 * j),
                          wgmma::advance(b_desc, stage_offset + 32 * j), step > 0 || j > 0);
    wgmma::commit();
    wgmma::wait<1>();
  }
  wgmma::wait<0>();
  async_wait<0>();  // only empty groups are left
  __syncthreads();  // every wgmma is done before the accumulators overwrite the stages

  // The D fragment to shared memory (pk/wgmma.h): float pairs at (row, 2 t + 8 i').
  const int warp = tid / 32, lane_g = tid % 32 / 4, lane_t = tid % 4;
#pragma unroll
  for (int h = 0; h < Config::kHalves; ++h)
#pragma unroll
    for (int i = 0; i < BN / 2; i += 2) {
      const int row = 64 * h + 16 * warp + lane_g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * lane_t;
      Cs[row * Config::kLdC + col] = acc[h][i];
      Cs[row * Config::kLdC + col + 1] = acc[h][i + 1];
    }
  __syncthreads();

  if (p.stats != nullptr) {  // as conv.cuh's gemm_kernel: sum and M2 about each 64-row tile's mean
    for (int e = tid; e < Config::kHalves * BN; e += kSm90Threads) {
      const int h = e / BN, c = e % BN;
      const index_t n = n0 + c, first = m0 + 64 * h;
      if (n >= p.cols || first >= p.rows) continue;
      const int valid_rows = p.rows - first < 64 ? static_cast<int>(p.rows - first) : 64;
      const float* const column = Cs + 64 * h * Config::kLdC + c;
      float sum = 0.0f;
      for (int r = 0; r < valid_rows; ++r) sum += p.pre_epilogue(g, n, column[r * Config::kLdC]);
      const float mean = sum / static_cast<float>(valid_rows);
      float m2 = 0.0f;
      for (int r = 0; r < valid_rows; ++r) {
        const float dev = p.pre_epilogue(g, n, column[r * Config::kLdC]) - mean;
        m2 = fmaf(dev, dev, m2);
      }
      const index_t row_tile = index_t(blockIdx.x) * Config::kHalves + h;
      float* const out = p.stats + row_tile * 2 * p.geo.C_out + g * p.geo.cout_g + n;
      out[0] = sum;
      out[p.geo.C_out] = m2;
    }
  }
  for (int e = tid; e < BM * BN; e += kSm90Threads) {
    const int r = e / BN, c = e % BN;  // along the output's contiguous dimension
    const index_t m = m0 + r, n = n0 + c;
    if (m < p.rows && n < p.cols) p.store(g, 0, row_info[r], n, Cs[r * Config::kLdC + c]);
  }
}

// The architecture the forward is launched for: the current device's (major * 10 + minor) on a
// GPU; in the emulator PACKED_KERNELS_SIMT_ARCH (default 80), so the tests run either path.
inline int launch_arch() {
#ifdef PK_SIMT_ENABLED
  const char* value = std::getenv("PACKED_KERNELS_SIMT_ARCH");
  return value != nullptr && *value != '\0' ? std::atoi(value) : 80;
#else
  static int cached[64];  // per device, 0 = not asked yet
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 0;
  if (cached[device] == 0) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    cached[device] = major * 10 + minor;
  }
  return cached[device];
#endif
}

template <typename T, int BM, int BN>
void launch_forward_sm90(const ForwardProblem<T>& p, int groups, Stream stream) {
  const index_t tiles_m = ceil_div(p.rows, BM), tiles_n = ceil_div(p.cols, BN);
  if (tiles_m > 0x7fffffff || tiles_n > 65535 || groups > 65535)
    throw std::invalid_argument("pk::conv: the problem exceeds the launch grid");
  // The weight as (C_out, depth) rows; a box is BN channels x one slice.
  const TensorMap2D w_map = make_tensor_map_2d(p.w, static_cast<std::uint64_t>(p.geo.C_out),
                                               static_cast<std::uint64_t>(p.depth),
                                               static_cast<std::uint64_t>(p.depth), BN, kSm90BlockK);
  launch_opt_in(forward_sm90_kernel<T, BM, BN>,
                dim3(static_cast<unsigned>(tiles_m), static_cast<unsigned>(tiles_n), static_cast<unsigned>(groups)),
                dim3(kSm90Threads), Sm90Tiles<BM, BN>::kSharedBytes, stream, p, w_map);
}

// Runs the forward on the sm_90 path and returns true where it applies (see the top).
template <typename T>
bool forward_sm90(const ForwardProblem<T>& p, int groups, Stream stream) {
  if constexpr (std::is_same<T, float>::value) {
    return false;
  } else {
    if (!p.prologue.identity() || p.geo.cin_g % 8 != 0 || !aligned16(p.x) || !aligned16(p.w) ||
        launch_arch() != 90)
      return false;
    // 128 channels per tile where a group has more than 64; else 64, with 128 rows (two m64
    // halves) so each weight slice serves twice the pixels.
    if (p.cols > 64) {
      launch_forward_sm90<T, 64, 128>(p, groups, stream);
    } else {
      launch_forward_sm90<T, 128, 64>(p, groups, stream);
    }
    return true;
  }
}

}  // namespace detail
}  // namespace conv
}  // namespace pk
