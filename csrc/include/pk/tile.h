// Tensor-core tiles: 16x16x16 matrix multiply-accumulate on half or bfloat16 inputs with a float
// accumulator. nvcc: CUDA's wmma (mma.sync on sm_80+); PK_SIMT: plain arrays.
//
// Like wmma, every call is warp-collective: all 32 lanes of the warp call it with the same
// arguments. Pointers must be 32-byte aligned, and the leading dimension (in elements) a multiple
// of 8 for half/bfloat16 and of 4 for float; the emulator checks both and reports a violation.
//
//   pk::tile::FragmentA<pk::half, pk::tile::RowMajor> a;   // 16x16 (M x K)
//   pk::tile::FragmentB<pk::half, pk::tile::ColMajor> b;   // 16x16 (K x N)
//   pk::tile::Accumulator acc;                             // 16x16 float (M x N)
//   pk::tile::fill(acc, 0.0f);
//   pk::tile::load(a, a_ptr, lda);  pk::tile::load(b, b_ptr, ldb);
//   pk::tile::mma(acc, a, b);                              // acc += a * b
//   for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= alpha;   // element-wise, as in wmma
//   pk::tile::store(c_ptr, acc, ldc);                      // row-major float
#pragma once

#include "pk/simt.h"
#include "pk/types.h"

#ifdef PK_SIMT_ENABLED
#include <cstdio>
#else
#include <mma.h>
#endif

namespace pk {
namespace tile {

constexpr int kM = 16, kN = 16, kK = 16;

#ifdef PK_SIMT_ENABLED

struct RowMajor {
  static constexpr bool row_major = true;
};
struct ColMajor {
  static constexpr bool row_major = false;
};

// Like wmma's fragments, x[0 .. num_elements) are this lane's elements in an unspecified order:
// element-wise updates (scale, bias-free activation) are portable, positional ones are not.
// The emulator gives every lane the whole tile.
template <typename T, typename Layout>
struct FragmentA {
  static constexpr int num_elements = kM * kK;
  float x[num_elements];  // row-major M x K, already converted to float (exact for half/bfloat16)
};
template <typename T, typename Layout>
struct FragmentB {
  static constexpr int num_elements = kK * kN;
  float x[num_elements];  // row-major K x N
};
struct Accumulator {
  static constexpr int num_elements = kM * kN;
  float x[num_elements];  // row-major M x N
};

namespace detail {
// False (after reporting the fault) when wmma would reject the pointer or leading dimension.
inline bool check(const void* p, unsigned ldm, unsigned ldm_multiple, const char* what) {
  char message[160];
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) {
    std::snprintf(message, sizeof message, "%s: pointer not 32-byte aligned", what);
  } else if (ldm % ldm_multiple != 0) {
    std::snprintf(message, sizeof message, "%s: leading dimension %u not a multiple of %u", what, ldm, ldm_multiple);
  } else {
    return true;
  }
  ::pk::simt::report_fault(message);
  return false;
}
// Element (r, c) of a rows x cols matrix stored with leading dimension ldm.
template <typename Layout, typename T>
inline float at(const T* p, int r, int c, unsigned ldm) {
  return to_float(Layout::row_major ? p[r * ldm + c] : p[c * ldm + r]);
}
}  // namespace detail

inline void fill(Accumulator& acc, float value) {
  for (float& v : acc.x) v = value;
}

template <typename T, typename Layout>
inline void load(FragmentA<T, Layout>& a, const T* p, unsigned ldm) {
  __syncwarp();  // collective: the whole warp must be here
  if (!detail::check(p, ldm, 8, "pk::tile::load(A)")) return;  // collective: the whole warp must be here
  for (int r = 0; r < kM; ++r)
    for (int k = 0; k < kK; ++k) a.x[r * kK + k] = detail::at<Layout>(p, r, k, ldm);
}

template <typename T, typename Layout>
inline void load(FragmentB<T, Layout>& b, const T* p, unsigned ldm) {
  __syncwarp();
  if (!detail::check(p, ldm, 8, "pk::tile::load(B)")) return;
  for (int k = 0; k < kK; ++k)
    for (int c = 0; c < kN; ++c) b.x[k * kN + c] = detail::at<Layout>(p, k, c, ldm);
}

template <typename T, typename LayoutA, typename LayoutB>
inline void mma(Accumulator& acc, const FragmentA<T, LayoutA>& a, const FragmentB<T, LayoutB>& b) {
  __syncwarp();
  for (int r = 0; r < kM; ++r)
    for (int c = 0; c < kN; ++c) {
      float sum = acc.x[r * kN + c];
      for (int k = 0; k < kK; ++k) sum += a.x[r * kK + k] * b.x[k * kN + c];
      acc.x[r * kN + c] = sum;
    }
}

inline void store(float* p, const Accumulator& acc, unsigned ldm) {
  __syncwarp();
  if (!detail::check(p, ldm, 4, "pk::tile::store")) return;
  for (int r = 0; r < kM; ++r)
    for (int c = 0; c < kN; ++c) p[r * ldm + c] = acc.x[r * kN + c];
  __syncwarp();  // every lane has written before anyone reads the tile back
}

#else

struct RowMajor {
  static constexpr bool row_major = true;
  using wmma = nvcuda::wmma::row_major;
};
struct ColMajor {
  static constexpr bool row_major = false;
  using wmma = nvcuda::wmma::col_major;
};

template <typename T, typename Layout>
using FragmentA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, kM, kN, kK, T, typename Layout::wmma>;
template <typename T, typename Layout>
using FragmentB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, kM, kN, kK, T, typename Layout::wmma>;
using Accumulator = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, kM, kN, kK, float>;

PK_DEVICE void fill(Accumulator& acc, float value) { nvcuda::wmma::fill_fragment(acc, value); }

// Layouts sit in a non-deduced context of wmma's fragment type: take the fragment type whole.
template <typename Fragment, typename T>
PK_DEVICE void load(Fragment& fragment, const T* p, unsigned ldm) {
  nvcuda::wmma::load_matrix_sync(fragment, p, ldm);
}
template <typename A, typename B>
PK_DEVICE void mma(Accumulator& acc, const A& a, const B& b) {
  nvcuda::wmma::mma_sync(acc, a, b, acc);
}
PK_DEVICE void store(float* p, const Accumulator& acc, unsigned ldm) {
  nvcuda::wmma::store_matrix_sync(p, acc, ldm, nvcuda::wmma::mem_row_major);
  __syncwarp();
}

#endif

}  // namespace tile
}  // namespace pk
