// SPDX-License-Identifier: Apache-2.0
// Tensor-core tiles: mma.sync m16n8k16 (row.col) on half or bfloat16 inputs with float
// accumulators, its operands loaded from shared memory by ldmatrix (x4, .trans where the tile is
// stored the other way). nvcc: the PTX instructions (sm_80+); PK_SIMT: the emulator, which
// distributes every fragment over the lanes exactly as the PTX ISA defines, so code that assumes
// another distribution gets a wrong answer on the CPU too.
//
// Every call is warp-collective: all 32 lanes call it with the same arguments. A tile is given by
// the address of its element (0, 0) in shared memory and its leading dimension in elements; each
// 8-element row segment that ldmatrix reads must be 16-byte aligned (the address 16-byte aligned,
// the leading dimension a multiple of 8), which the emulator checks along with the shared space.
//
//   pk::tile::FragmentA<T> a;                         // 16 x 16 (M x K)
//   pk::tile::FragmentB<T> b0, b1;                    // 16 x 8 (K x N) each: columns 0-7, 8-15
//   pk::tile::Accumulator c;                          // 16 x 8 float (M x N)
//   pk::tile::fill(c, 0.0f);
//   pk::tile::load_a<true>(a, a_tile, lda);           // A(m, k) = a_tile[m * lda + k]  (false: [k * lda + m])
//   pk::tile::load_b<true>(b0, b1, b_tile, ldb);      // B(k, n) = b_tile[n * ldb + k]  (false: [k * ldb + n])
//   pk::tile::mma(c, a, b0);                          // c += a * b0
//   for (float& v : c.x) v *= alpha;                  // element-wise, as with any fragment
//   pk::tile::store(c_ptr, c, ldc);                   // C(m, n) -> c_ptr[m * ldc + n], float
//
// Lane l holds, with g = l / 4 and t = l % 4 (the PTX ISA's groupID and threadID_in_group):
//   A  x[i]: elements (g + 8 (i & 1), 2t + 8 (i >> 1) + {0, 1}), the lower column in the low half
//   B  x[i]: elements (2t + 8 i + {0, 1}, g)
//   C  x[i]: element (g + 8 (i >> 1), 2t + (i & 1))
//
// float through TF32 (sm_80+): mma.sync m16n8k8 .tf32 with float accumulators (the same C
// fragment). ldmatrix moves only 16-bit elements, so each lane loads its own 32-bit elements from
// shared memory (plain LDS, as CUTLASS does for 32-bit operands without the ldmatrix pair trick):
// a row-major A (M x K, K contiguous) and a K-major B (K x N, N contiguous) with leading
// dimensions that are 4 (A) and 8 (B) mod 32 read without bank conflicts.
//   pk::tile::FragmentTf32A a;  pk::tile::FragmentTf32B b;           // 16 x 8, 8 x 8
//   pk::tile::load_a_tf32(a, a_tile, lda);            // A(m, k) = a_tile[m * lda + k]
//   pk::tile::load_b_tf32(b, b_tile, ldb);            // B(k, n) = b_tile[k * ldb + n]
//   pk::tile::mma(c, a, b);                           // c += a * b
// The tensor core reads a .tf32 operand's upper 19 bits (sign, exponent, 10 mantissa bits) and
// ignores the rest; to_tf32 (cvt.rna.tf32.f32: to nearest, ties away from zero) is how a kernel
// rounds instead of truncating. Lane l holds:
//   A  x[i]: element (g + 8 (i & 1), t + 4 (i >> 1))
//   B  x[i]: element (t + 4 i, g)
#pragma once

#include <cstring>

#include "pk/simt.h"
#include "pk/types.h"
#include "pk/vec.h"

#ifdef PK_SIMT_ENABLED
#include <cstdio>
#endif

namespace pk {
namespace tile {

constexpr int kM = 16, kN = 8, kK = 16;
constexpr int kKTf32 = 8;  // the depth of one TF32 mma

template <typename T>
struct FragmentA {
  static_assert(sizeof(T) == 2, "tensor-core tiles take half or bfloat16");
  unsigned x[4];  // 8 elements, two per register
};
template <typename T>
struct FragmentB {
  unsigned x[2];  // 4 elements
};
struct FragmentTf32A {
  unsigned x[4];  // 4 float elements, bit patterns
};
struct FragmentTf32B {
  unsigned x[2];
};
struct Accumulator {
  static constexpr int num_elements = 4;
  float x[num_elements];
};

PK_DEVICE void fill(Accumulator& acc, float value) {
#pragma unroll
  for (int i = 0; i < Accumulator::num_elements; ++i) acc.x[i] = value;
}

namespace detail {

// The 8-element row segment this lane points ldmatrix.x4 at. Matrix q = lane / 8 (row r = lane
// % 8 of it) becomes register q; the matrices are ordered so that register i is x[i] above.
//   A, K contiguous:  q covers rows 8 (q & 1).., columns 8 (q >> 1)..  (no transpose)
//   A, M contiguous:  stored rows are K: rows k = 8 (q >> 1) + r, columns m = 8 (q & 1)..  (.trans)
//   B (two fragments, N = 0-7 then 8-15), K contiguous: stored rows are N: n = 8 (q >> 1) + r,
//                     k = 8 (q & 1)..  (no transpose)
//   B, N contiguous:  stored rows are K: k = 8 (q & 1) + r, n = 8 (q >> 1)..  (.trans)
template <bool kIsA, bool kKContiguous, typename T>
PK_DEVICE const T* ldmatrix_row(const T* p, int ld, int lane) {
  const int q = lane / 8, r = lane % 8;
  const int high = q >> 1, low = q & 1;
  if (kIsA == kKContiguous) return p + (8 * low + r) * ld + 8 * high;  // A/K, or B/N contiguous
  return p + (8 * high + r) * ld + 8 * low;
}

#ifdef PK_SIMT_ENABLED

// Per warp of the running block: what the lanes exchange inside one collective (the emulator
// runs one block at a time per OS thread).
struct WarpScratch {
  const unsigned char* rows[32];
  unsigned a[32][4];
  unsigned b[32][2];
};
inline WarpScratch& warp_scratch() {
  thread_local WarpScratch scratch[32];
  const int thread = static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
  return scratch[thread / 32];
}

inline unsigned pack(std::uint16_t low, std::uint16_t high) { return unsigned(low) | unsigned(high) << 16; }
template <typename T>
inline float element(unsigned word, int half) {
  const std::uint16_t bits = static_cast<std::uint16_t>(half ? word >> 16 : word & 0xffffu);
  T v;
  std::memcpy(&v, &bits, 2);
  return to_float(v);
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l's row segment is row l % 8 of matrix
// l / 8; register q gets, of matrix q, row g's elements 2t, 2t + 1 (or with .trans its
// column g's elements in rows 2t, 2t + 1).
template <bool kTranspose>
inline void ldmatrix_x4(unsigned (&out)[4], const void* row, const char* what) {
  WarpScratch& s = warp_scratch();
  const int lane = ::pk::simt::lane_id();
  char message[160];
  if (reinterpret_cast<std::uintptr_t>(row) % 16 != 0) {
    std::snprintf(message, sizeof message, "%s: ldmatrix row address not 16-byte aligned", what);
    ::pk::simt::report_fault(message);
    row = nullptr;
  } else if (!::pk::simt::in_shared_memory(row, 16)) {
    std::snprintf(message, sizeof message, "%s: ldmatrix row address not in shared memory", what);
    ::pk::simt::report_fault(message);
    row = nullptr;
  }
  s.rows[lane] = static_cast<const unsigned char*>(row);
  __syncwarp();  // every lane's row address is published
  const int g = lane / 4, t = lane % 4;
  for (int q = 0; q < 4; ++q) {
    std::uint16_t e[2] = {0, 0};
    for (int j = 0; j < 2; ++j) {
      const unsigned char* source = kTranspose ? s.rows[q * 8 + 2 * t + j] : s.rows[q * 8 + g];
      const int column = kTranspose ? g : 2 * t + j;
      if (source != nullptr) std::memcpy(&e[j], source + 2 * column, 2);
    }
    out[q] = pack(e[0], e[1]);
  }
  __syncwarp();  // every lane has read before any overwrites its row address
}

// D = A B + C for a warp's m16n8 accumulators: each lane publishes its fragments, then reads
// A(row, k) and B(k, col) of every lane through a_at / b_at (the fragment distribution).
template <int kDepth, typename FragA, typename FragB, typename AAt, typename BAt>
inline void emulate_mma(Accumulator& acc, const FragA& a, const FragB& b, AAt a_at, BAt b_at) {
  WarpScratch& s = warp_scratch();
  const int lane = ::pk::simt::lane_id();
  std::memcpy(s.a[lane], a.x, sizeof a.x);
  std::memcpy(s.b[lane], b.x, sizeof b.x);
  __syncwarp();  // every lane's fragments are published
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float sum = acc.x[i];
    for (int k = 0; k < kDepth; ++k) sum += a_at(s, row, k) * b_at(s, k, col);
    acc.x[i] = sum;
  }
  __syncwarp();  // every lane has read before any publishes its next fragments
}

template <typename T>
inline void mma_m16n8k16(Accumulator& acc, const FragmentA<T>& a, const FragmentB<T>& b) {
  // A(row, k) is in lane (row % 8) * 4 + (k % 8) / 2, register (row / 8) + 2 (k / 8);
  // B(k, col) in lane col * 4 + (k % 8) / 2, register k / 8; element k % 2 of the pair.
  emulate_mma<kK>(
      acc, a, b,
      [](const WarpScratch& s, int row, int k) {
        return element<T>(s.a[(row % 8) * 4 + (k % 8) / 2][row / 8 + 2 * (k / 8)], k % 2);
      },
      [](const WarpScratch& s, int k, int col) {
        return element<T>(s.b[col * 4 + (k % 8) / 2][k / 8], k % 2);
      });
}

// The operand value the tensor core multiplies: the upper 19 bits of the register.
inline float tf32_operand(unsigned bits) { return ::pk::detail::bits_float(bits & 0xffffe000u); }

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32. A(row, k) is in lane (row % 8) * 4 + k % 4,
// register row / 8 + 2 (k / 4); B(k, col) in lane col * 4 + k % 4, register k / 4. Products of
// two 11-bit significands are exact in float.
inline void mma_m16n8k8_tf32(Accumulator& acc, const FragmentTf32A& a, const FragmentTf32B& b) {
  emulate_mma<kKTf32>(
      acc, a, b,
      [](const WarpScratch& s, int row, int k) {
        return tf32_operand(s.a[(row % 8) * 4 + k % 4][row / 8 + 2 * (k / 4)]);
      },
      [](const WarpScratch& s, int k, int col) { return tf32_operand(s.b[col * 4 + k % 4][k / 4]); });
}

// A 32-bit element of a shared tile (an LDS): the emulator checks it is in shared memory.
inline unsigned load_shared_b32(const float* p, const char* what) {
  if (!::pk::simt::in_shared_memory(p, 4)) {
    char message[160];
    std::snprintf(message, sizeof message, "%s: address not in shared memory", what);
    ::pk::simt::report_fault(message);
    return 0;
  }
  return ::pk::detail::float_bits(*p);
}

#else

PK_DEVICE unsigned load_shared_b32(const float* p, const char*) { return __float_as_uint(*p); }

PK_DEVICE void mma_m16n8k8_tf32(Accumulator& acc, const FragmentTf32A& a, const FragmentTf32B& b) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(acc.x[0]), "+f"(acc.x[1]), "+f"(acc.x[2]), "+f"(acc.x[3])
      : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
}

PK_DEVICE int lane_id() {
  unsigned lane;
  asm("mov.u32 %0, %%laneid;" : "=r"(lane));
  return static_cast<int>(lane);
}

template <bool kTranspose>
PK_DEVICE void ldmatrix_x4(unsigned (&out)[4], const void* row, const char*) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(out[0]), "=r"(out[1]), "=r"(out[2]), "=r"(out[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(out[0]), "=r"(out[1]), "=r"(out[2]), "=r"(out[3])
                 : "r"(address));
  }
}

template <typename T>
PK_DEVICE void mma_m16n8k16(Accumulator& acc, const FragmentA<T>& a, const FragmentB<T>& b) {
  if constexpr (std::is_same<T, bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(acc.x[0]), "+f"(acc.x[1]), "+f"(acc.x[2]), "+f"(acc.x[3])
        : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(acc.x[0]), "+f"(acc.x[1]), "+f"(acc.x[2]), "+f"(acc.x[3])
        : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
  }
}

#endif

PK_DEVICE int lane() {
#ifdef PK_SIMT_ENABLED
  return ::pk::simt::lane_id();
#else
  return lane_id();
#endif
}

}  // namespace detail

// A's 16 x 16 tile at p (element (m, k) at p[m * ld + k] when K is contiguous, p[k * ld + m]
// otherwise).
template <bool kKContiguous, typename T>
PK_DEVICE void load_a(FragmentA<T>& a, const T* p, int ld) {
  detail::ldmatrix_x4<!kKContiguous>(a.x, detail::ldmatrix_row<true, kKContiguous>(p, ld, detail::lane()),
                                     "pk::tile::load_a");
}

// B's 16 x 16 tile at p as two fragments, columns 0-7 and 8-15 (element (k, n) at p[n * ld + k]
// when K is contiguous, p[k * ld + n] otherwise).
template <bool kKContiguous, typename T>
PK_DEVICE void load_b(FragmentB<T>& columns_0_7, FragmentB<T>& columns_8_15, const T* p, int ld) {
  unsigned x[4];
  detail::ldmatrix_x4<!kKContiguous>(x, detail::ldmatrix_row<false, kKContiguous>(p, ld, detail::lane()),
                                     "pk::tile::load_b");
  columns_0_7.x[0] = x[0];
  columns_0_7.x[1] = x[1];
  columns_8_15.x[0] = x[2];
  columns_8_15.x[1] = x[3];
}

template <typename T>
PK_DEVICE void mma(Accumulator& acc, const FragmentA<T>& a, const FragmentB<T>& b) {
  detail::mma_m16n8k16(acc, a, b);
}

// x rounded to TF32 (10 mantissa bits; to nearest, ties away from zero; NaN and infinities
// kept): cvt.rna.tf32.f32, whose result has its low 13 bits zero.
PK_DEVICE float to_tf32(float x) {
#ifdef PK_SIMT_ENABLED
  const std::uint32_t bits = ::pk::detail::float_bits(x);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return ::pk::detail::bits_float(0x7fffffffu);  // canonical NaN
  return ::pk::detail::bits_float((bits + 0x1000u) & 0xffffe000u);  // a carry may reach infinity, as rna
#else
  unsigned bits;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(x));
  return __uint_as_float(bits);
#endif
}

// A's 16 x 8 tile at p, row-major (element (m, k) at p[m * ld + k]), in shared memory.
PK_DEVICE void load_a_tf32(FragmentTf32A& a, const float* p, int ld) {
  const int lane = detail::lane(), g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    a.x[i] = detail::load_shared_b32(p + (g + 8 * (i & 1)) * ld + t + 4 * (i >> 1), "pk::tile::load_a_tf32");
}

// B's 8 x 8 tile at p, K-major (element (k, n) at p[k * ld + n]), in shared memory.
PK_DEVICE void load_b_tf32(FragmentTf32B& b, const float* p, int ld) {
  const int lane = detail::lane(), g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < 2; ++i) b.x[i] = detail::load_shared_b32(p + (t + 4 * i) * ld + g, "pk::tile::load_b_tf32");
}

PK_DEVICE void mma(Accumulator& acc, const FragmentTf32A& a, const FragmentTf32B& b) {
  detail::mma_m16n8k8_tf32(acc, a, b);
}

// C(m, n) -> p[m * ld + n] as float pairs (p 8-byte aligned, ld even). Other lanes' elements are
// visible to this one only after a __syncwarp() or __syncthreads().
PK_DEVICE void store(float* p, const Accumulator& acc, int ld) {
  const int lane = detail::lane(), g = lane / 4, t = lane % 4;
#ifdef PK_SIMT_ENABLED
  if (reinterpret_cast<std::uintptr_t>(p) % 8 != 0 || ld % 2 != 0) {
    ::pk::simt::report_fault("pk::tile::store: pointer not 8-byte aligned or odd leading dimension");
    return;
  }
#endif
#pragma unroll
  for (int h = 0; h < 2; ++h)
    *reinterpret_cast<Vec<float, 2>*>(p + (g + 8 * h) * ld + 2 * t) = Vec<float, 2>{{acc.x[2 * h], acc.x[2 * h + 1]}};
}

}  // namespace tile
}  // namespace pk
