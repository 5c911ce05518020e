// SPDX-License-Identifier: Apache-2.0
// sm_90 bulk tensor copies (TMA) of 2-D boxes of 16-bit elements into shared memory with the
// 128-byte swizzle (the layout pk/wgmma.h's Swizzle::k128 reads), completing on an mbarrier.
// Elements outside the tensor arrive as zeros. nvcc: a CUtensorMap encoded on the host
// (cuTensorMapEncodeTiled through the runtime's driver entry point) and
// cp.async.bulk.tensor.2d; PK_SIMT: the emulator builds the swizzled box and hands it to its bulk
// copy (pk/mbarrier.h: it lands at issue or when a wait on the barrier needs it).
//
//   host:   pk::TensorMap2D map = pk::make_tensor_map_2d(base, rows, cols, row_stride, box_rows, box_cols);
//   kernel: __global__ void k(const PK_GRID_CONSTANT pk::TensorMap2D map, ...)
//           pk::tma_load_2d(dst, map, col, row, bar);  // dst 1024-byte aligned in shared memory;
//                                                      // box_rows x box_cols, box_cols * 2 == 128
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "pk/mbarrier.h"
#include "pk/simt.h"

#ifdef PK_SIMT_ENABLED
#include <cstring>
#include <vector>
#define PK_GRID_CONSTANT
#else
#include <cuda.h>
#include <cudaTypedefs.h>
#define PK_GRID_CONSTANT __grid_constant__
#endif

namespace pk {

constexpr int kTmaSwizzleBytes = 128;

#ifdef PK_SIMT_ENABLED

struct TensorMap2D {
  const void* base;
  std::uint64_t rows, cols, row_stride;  // in elements
  int box_rows, box_cols;
};

inline TensorMap2D make_tensor_map_2d(const void* base, std::uint64_t rows, std::uint64_t cols,
                                      std::uint64_t row_stride, int box_rows, int box_cols) {
  if (box_cols * 2 != kTmaSwizzleBytes || box_rows < 1 || box_rows > 256 ||
      reinterpret_cast<std::uintptr_t>(base) % 16 != 0 || row_stride * 2 % 16 != 0)
    throw std::invalid_argument("pk::make_tensor_map_2d: box rows of 128 bytes, up to 256 rows, a 16-byte "
                                "aligned base and row stride");
  return TensorMap2D{base, rows, cols, row_stride, box_rows, box_cols};
}

inline void tma_load_2d(void* shared_dst, const TensorMap2D& map, int col, int row, std::uint64_t* bar) {
  if (shared_address(shared_dst) % 1024 != 0) {
    ::pk::simt::report_fault("pk::tma_load_2d: a 128-byte swizzled box must start 1024-byte aligned");
    return;
  }
  const std::size_t bytes = std::size_t(map.box_rows) * kTmaSwizzleBytes;
  std::vector<unsigned char> box(bytes, 0);
  const auto* base = static_cast<const unsigned char*>(map.base);
  for (int r = 0; r < map.box_rows; ++r) {
    for (int c = 0; c < map.box_cols; ++c) {
      const std::int64_t gr = std::int64_t(row) + r, gc = std::int64_t(col) + c;
      if (gr < 0 || gc < 0 || std::uint64_t(gr) >= map.rows || std::uint64_t(gc) >= map.cols) continue;
      const unsigned linear = static_cast<unsigned>(r * kTmaSwizzleBytes + 2 * c);
      const unsigned at = linear ^ (((linear >> 7) & 7u) << 4);  // 16-byte chunk ^= row % 8
      std::memcpy(&box[at], base + (std::uint64_t(gr) * map.row_stride + gc) * 2, 2);
    }
  }
  ::pk::simt::bulk_copy(shared_dst, box.data(), static_cast<unsigned>(bytes), bar);
}

#else

struct TensorMap2D {  // CUtensorMap carries its own alignment
  CUtensorMap map;
};

inline TensorMap2D make_tensor_map_2d(const void* base, std::uint64_t rows, std::uint64_t cols,
                                      std::uint64_t row_stride, int box_rows, int box_cols) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess || found != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) throw std::runtime_error("packed_kernels: the driver has no cuTensorMapEncodeTiled");
  TensorMap2D out;
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {row_stride * 2};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult result = encode(&out.map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, const_cast<void*>(base), dims,
                                 strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                 CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (result != CUDA_SUCCESS)
    throw std::runtime_error("packed_kernels: cuTensorMapEncodeTiled failed (" + std::to_string(int(result)) + ")");
  return out;
}

PK_DEVICE void tma_load_2d(void* shared_dst, const TensorMap2D& map, int col, int row, std::uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
      ::"r"(shared_address(shared_dst)), "l"(reinterpret_cast<std::uint64_t>(&map.map)), "r"(col), "r"(row),
        "r"(shared_address(bar))
      : "memory");
#endif
}

#endif

}  // namespace pk
