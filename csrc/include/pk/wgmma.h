// SPDX-License-Identifier: Apache-2.0
// Warpgroup MMA (sm_90a wgmma.mma_async m64nNk16, half or bfloat16 -> float) with both operands in
// shared memory, K-major, described by matrix descriptors. nvcc: the PTX instructions
// (sm_90a); PK_SIMT: the emulator reads each element through the descriptor exactly as the
// hardware lays the operand out (start address, leading/stride byte offsets, swizzle mode), so a
// wrong descriptor or layout gives a wrong answer, and runs each mma at issue or only at the wait
// covering it (at random), so reading the accumulators or reusing the operands' shared memory
// before the wait gives a wrong answer too.
//
// A K-major operand (A: 64 rows = M, B: N rows) is stored in rows of 8 ("core matrices"); with a
// swizzle of W = 32/64/128 bytes, row r of a group of 8 is W bytes long at W * (r % 8) from the
// group's start, and address bits 4.. of every element are XORed with bits 7.. (1/2/3 bits), so
// a group must start at a multiple of 8 W bytes (the emulator faults otherwise); groups of 8
// rows are `stride_bytes` apart. Without swizzle a core matrix row is 16 bytes (k 0-7), the next
// 8 k sit `leading_bytes` further on. Per 16-deep step the descriptor's start moves 32 bytes
// along a swizzled row (pk::wgmma::swizzled_offset gives where element bytes go).
//
//   pk::wgmma::fence();                                  // before the first mma after a wait
//   pk::wgmma::mma<N, T>(acc, desc_a, desc_b, accumulate);  // acc: float[N / 2], the D fragment
//   pk::wgmma::commit();
//   pk::wgmma::wait<0>();                                // acc readable, operands reusable
//
// D fragment (per thread of the warpgroup, warp w = its warp % 4, g = lane / 4, t = lane % 4):
// acc[i] is row 16 w + g + 8 ((i >> 1) & 1), column 8 (i >> 2) + 2 t + (i & 1).
#pragma once

#include <cstdint>

#include "pk/mbarrier.h"
#include "pk/simt.h"
#include "pk/types.h"

namespace pk {
namespace wgmma {

// The descriptor's layout type (bits 62-63).
enum class Swizzle : int { kNone = 0, k128 = 1, k64 = 2, k32 = 3 };

PK_HOST_DEVICE constexpr int swizzle_bits(Swizzle s) {
  return s == Swizzle::k128 ? 3 : s == Swizzle::k64 ? 2 : s == Swizzle::k32 ? 1 : 0;
}
// Bytes of one row of a core-matrix group: 16 without swizzle, else the swizzle width.
PK_HOST_DEVICE constexpr int row_bytes(Swizzle s) { return 16 << swizzle_bits(s); }

// Where byte `byte_in_row` of row `row` of a swizzled K-major operand lives, from a base aligned
// to 8 rows (8 * row_bytes): rows of row_bytes, groups of 8 rows `stride_bytes` apart, 16-byte
// chunks XORed with the row's position in its group (as the hardware reads them).
PK_HOST_DEVICE constexpr unsigned swizzled_offset(Swizzle s, int row, int byte_in_row, unsigned stride_bytes) {
  const unsigned linear = static_cast<unsigned>(row % 8 * row_bytes(s) + byte_in_row) + (row / 8) * stride_bytes;
  const unsigned mask = (1u << swizzle_bits(s)) - 1u;
  return linear ^ (((linear >> 7) & mask) << 4);
}

PK_DEVICE std::uint64_t descriptor(const void* smem, Swizzle swizzle, unsigned leading_bytes, unsigned stride_bytes) {
  const std::uint64_t address = shared_address(smem);
  return ((address >> 4) & 0x3fff) | (std::uint64_t((leading_bytes >> 4) & 0x3fff) << 16) |
         (std::uint64_t((stride_bytes >> 4) & 0x3fff) << 32) | (std::uint64_t(static_cast<int>(swizzle)) << 62);
}

// The descriptor of the operand `bytes` further on (a multiple of 16; the start address field
// does not carry: shared addresses stay below 256 KiB): one add per step instead of a rebuild.
PK_HOST_DEVICE constexpr std::uint64_t advance(std::uint64_t desc, unsigned bytes) { return desc + (bytes >> 4); }

#ifdef PK_SIMT_ENABLED

PK_DEVICE void fence() { ::pk::simt::wgmma_fence(); }
PK_DEVICE void commit() { ::pk::simt::wgmma_commit(); }
template <int kPending>
PK_DEVICE void wait() {
  ::pk::simt::wgmma_wait(kPending);
}
template <int N, typename T>
PK_DEVICE void mma(float (&acc)[N / 2], std::uint64_t desc_a, std::uint64_t desc_b, bool accumulate) {
  static_assert(N == 32 || N == 64 || N == 128, "pk::wgmma::mma: N of 32, 64 or 128");
  static_assert(std::is_same<T, half>::value || std::is_same<T, bfloat16>::value, "half or bfloat16 operands");
  ::pk::simt::wgmma_mma(acc, N, std::is_same<T, half>::value ? ::pk::simt::WgmmaType::kHalf : ::pk::simt::WgmmaType::kBfloat16,
                        desc_a, desc_b, accumulate);
}

#else

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PK_WGMMA_ENABLED 1
#endif

PK_DEVICE void fence() {
#ifdef PK_WGMMA_ENABLED
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
PK_DEVICE void commit() {
#ifdef PK_WGMMA_ENABLED
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int kPending>
PK_DEVICE void wait() {
#ifdef PK_WGMMA_ENABLED
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

namespace detail {
template <int N, typename T>
PK_DEVICE void mma_async(float (&acc)[N / 2], std::uint64_t desc_a, std::uint64_t desc_b, bool accumulate);

#ifdef PK_WGMMA_ENABLED
template <>
PK_DEVICE void mma_async<32, half>(float (&acc)[16], std::uint64_t desc_a, std::uint64_t desc_b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
      "}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      :
        "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3]), "+f"(acc[4]), "+f"(acc[5]), "+f"(acc[6]), "+f"(acc[7]),
        "+f"(acc[8]), "+f"(acc[9]), "+f"(acc[10]), "+f"(acc[11]), "+f"(acc[12]), "+f"(acc[13]), "+f"(acc[14]), "+f"(acc[15])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
}

template <>
PK_DEVICE void mma_async<32, bfloat16>(float (&acc)[16], std::uint64_t desc_a, std::uint64_t desc_b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
      "}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      :
        "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3]), "+f"(acc[4]), "+f"(acc[5]), "+f"(acc[6]), "+f"(acc[7]),
        "+f"(acc[8]), "+f"(acc[9]), "+f"(acc[10]), "+f"(acc[11]), "+f"(acc[12]), "+f"(acc[13]), "+f"(acc[14]), "+f"(acc[15])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
}

template <>
PK_DEVICE void mma_async<64, half>(float (&acc)[32], std::uint64_t desc_a, std::uint64_t desc_b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      :
        "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3]), "+f"(acc[4]), "+f"(acc[5]), "+f"(acc[6]), "+f"(acc[7]),
        "+f"(acc[8]), "+f"(acc[9]), "+f"(acc[10]), "+f"(acc[11]), "+f"(acc[12]), "+f"(acc[13]), "+f"(acc[14]), "+f"(acc[15]),
        "+f"(acc[16]), "+f"(acc[17]), "+f"(acc[18]), "+f"(acc[19]), "+f"(acc[20]), "+f"(acc[21]), "+f"(acc[22]), "+f"(acc[23]),
        "+f"(acc[24]), "+f"(acc[25]), "+f"(acc[26]), "+f"(acc[27]), "+f"(acc[28]), "+f"(acc[29]), "+f"(acc[30]), "+f"(acc[31])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
}

template <>
PK_DEVICE void mma_async<64, bfloat16>(float (&acc)[32], std::uint64_t desc_a, std::uint64_t desc_b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      :
        "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3]), "+f"(acc[4]), "+f"(acc[5]), "+f"(acc[6]), "+f"(acc[7]),
        "+f"(acc[8]), "+f"(acc[9]), "+f"(acc[10]), "+f"(acc[11]), "+f"(acc[12]), "+f"(acc[13]), "+f"(acc[14]), "+f"(acc[15]),
        "+f"(acc[16]), "+f"(acc[17]), "+f"(acc[18]), "+f"(acc[19]), "+f"(acc[20]), "+f"(acc[21]), "+f"(acc[22]), "+f"(acc[23]),
        "+f"(acc[24]), "+f"(acc[25]), "+f"(acc[26]), "+f"(acc[27]), "+f"(acc[28]), "+f"(acc[29]), "+f"(acc[30]), "+f"(acc[31])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
}

template <>
PK_DEVICE void mma_async<128, half>(float (&acc)[64], std::uint64_t desc_a, std::uint64_t desc_b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      :
        "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3]), "+f"(acc[4]), "+f"(acc[5]), "+f"(acc[6]), "+f"(acc[7]),
        "+f"(acc[8]), "+f"(acc[9]), "+f"(acc[10]), "+f"(acc[11]), "+f"(acc[12]), "+f"(acc[13]), "+f"(acc[14]), "+f"(acc[15]),
        "+f"(acc[16]), "+f"(acc[17]), "+f"(acc[18]), "+f"(acc[19]), "+f"(acc[20]), "+f"(acc[21]), "+f"(acc[22]), "+f"(acc[23]),
        "+f"(acc[24]), "+f"(acc[25]), "+f"(acc[26]), "+f"(acc[27]), "+f"(acc[28]), "+f"(acc[29]), "+f"(acc[30]), "+f"(acc[31]),
        "+f"(acc[32]), "+f"(acc[33]), "+f"(acc[34]), "+f"(acc[35]), "+f"(acc[36]), "+f"(acc[37]), "+f"(acc[38]), "+f"(acc[39]),
        "+f"(acc[40]), "+f"(acc[41]), "+f"(acc[42]), "+f"(acc[43]), "+f"(acc[44]), "+f"(acc[45]), "+f"(acc[46]), "+f"(acc[47]),
        "+f"(acc[48]), "+f"(acc[49]), "+f"(acc[50]), "+f"(acc[51]), "+f"(acc[52]), "+f"(acc[53]), "+f"(acc[54]), "+f"(acc[55]),
        "+f"(acc[56]), "+f"(acc[57]), "+f"(acc[58]), "+f"(acc[59]), "+f"(acc[60]), "+f"(acc[61]), "+f"(acc[62]), "+f"(acc[63])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
}

template <>
PK_DEVICE void mma_async<128, bfloat16>(float (&acc)[64], std::uint64_t desc_a, std::uint64_t desc_b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      :
        "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3]), "+f"(acc[4]), "+f"(acc[5]), "+f"(acc[6]), "+f"(acc[7]),
        "+f"(acc[8]), "+f"(acc[9]), "+f"(acc[10]), "+f"(acc[11]), "+f"(acc[12]), "+f"(acc[13]), "+f"(acc[14]), "+f"(acc[15]),
        "+f"(acc[16]), "+f"(acc[17]), "+f"(acc[18]), "+f"(acc[19]), "+f"(acc[20]), "+f"(acc[21]), "+f"(acc[22]), "+f"(acc[23]),
        "+f"(acc[24]), "+f"(acc[25]), "+f"(acc[26]), "+f"(acc[27]), "+f"(acc[28]), "+f"(acc[29]), "+f"(acc[30]), "+f"(acc[31]),
        "+f"(acc[32]), "+f"(acc[33]), "+f"(acc[34]), "+f"(acc[35]), "+f"(acc[36]), "+f"(acc[37]), "+f"(acc[38]), "+f"(acc[39]),
        "+f"(acc[40]), "+f"(acc[41]), "+f"(acc[42]), "+f"(acc[43]), "+f"(acc[44]), "+f"(acc[45]), "+f"(acc[46]), "+f"(acc[47]),
        "+f"(acc[48]), "+f"(acc[49]), "+f"(acc[50]), "+f"(acc[51]), "+f"(acc[52]), "+f"(acc[53]), "+f"(acc[54]), "+f"(acc[55]),
        "+f"(acc[56]), "+f"(acc[57]), "+f"(acc[58]), "+f"(acc[59]), "+f"(acc[60]), "+f"(acc[61]), "+f"(acc[62]), "+f"(acc[63])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
}

#else
// Not sm_90a: the launchers pick wgmma kernels only on sm_90 devices, whose sm_90a code this is not.
template <int N, typename T>
PK_DEVICE void mma_async(float (&)[N / 2], std::uint64_t, std::uint64_t, bool) {
  asm volatile("trap;");
}
#endif
}  // namespace detail

template <int N, typename T>
PK_DEVICE void mma(float (&acc)[N / 2], std::uint64_t desc_a, std::uint64_t desc_b, bool accumulate) {
  static_assert(N == 32 || N == 64 || N == 128, "pk::wgmma::mma: N of 32, 64 or 128");
  detail::mma_async<N, T>(acc, desc_a, desc_b, accumulate);
}

#endif

}  // namespace wgmma
}  // namespace pk
