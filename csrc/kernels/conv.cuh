// SPDX-License-Identifier: Apache-2.0
// Block-diagonal grouped 2-D convolution as implicit GEMMs, the group on grid axis z. Written
// once for nvcc and the SIMT emulator (pk/simt.h). Layouts and semantics: conv.h.
//
// One GEMM kernel, three problems that say how to read A (rows x depth) and B (depth x cols)
// and where the result goes, per group g:
//   forward      rows = output pixels (n, oh, ow), cols = output channels, depth = (kh, kw, c_in)
//   input grad   rows = input pixels (n, ih, iw) of one stride phase ((ih + pad) mod stride, the
//                same along w; grid axis z holds (phase, group)), cols = input channels,
//                depth = (kh, kw, c_out) over that phase's contributing taps only
//   weight grad  rows = output channels, cols = (kh, kw, c_in), depth = output pixels, the
//                depth split over grid axis y into fp32 slabs (summed by the caller)
// A block computes a 64x64 tile (128x16 where the forward has at most 16 columns: narrow groups
// waste no tensor-core work or B reads on absent columns, and each slice's copies serve twice
// the rows) over K slices of 32: a 64x32 (128x32) slice of A and a 32x64 (32x16) slice of B are
// staged in shared memory (padding taps, tails and out-of-range rows as zero; row/column
// offsets decoded once, depth offsets once per slice by cursors stepped without division, each
// copying thread stepping its own in the pipeline), then
//   half/bfloat16: 4 warps, each 32x32 (32x16 in a narrow tile) of 16x8x16 mma.sync tiles fed by
//                  ldmatrix (pk/tile.h), fp32 accumulators;
//   float on TF32: 4 warps, each 32x32 of 16x8x8 TF32 mma.sync tiles fed by 32-bit shared loads
//                  (pk/tile.h), fp32 accumulators; operands rounded to TF32 as they are staged;
//   float:         FMA, each thread 8x4 outputs.
// Staging: 16-bit operands whose runs along memory are a multiple of 8 (the forward: input
// channels per group; the gradients: both channel counts) go through a 3-stage cp.async
// pipeline (pk/async_copy.h; 16-byte copies into tiles stored the way memory is contiguous, each
// thread's runs and their row/column offsets fixed in registers, one barrier per slice, a
// prologue applied by each thread to its own copies after its wait, compiled only into the
// kernels launched with one: WithPrologue); fp32
// or other channel counts stage each slice through registers (16-byte loads where the channels
// per group allow, scalar otherwise).
// The accumulators go through shared memory to the epilogue, which writes coalesced along the
// contiguous dimension (channels, NHWC; 16-byte runs where the launcher took them, element by
// element in a narrow tile) and, in the forward, adds bias, reduces the channel
// statistics of the tile (sum and M2 about the tile mean; deterministic: one partial per row
// tile) and applies the epilogue.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "conv.h"
#include "pk/async_copy.h"
#include "pk/divmod.h"
#include "pk/simt.h"
#include "pk/tile.h"
#include "pk/types.h"
#include "pk/vec.h"

namespace pk {
namespace conv {
namespace detail {

using index_t = long long;

constexpr int kThreads = 128;
constexpr int kBlockM = 64, kBlockN = 64, kBlockK = 32;
// The narrow tile: a forward (B stored along depth) with at most kNarrowBlockN columns.
constexpr int kNarrowBlockM = 128, kNarrowBlockN = 16;
// Pipeline depth of the cp.async path: 3 stages of 16-bit A and B tiles take 30 KB, within the
// 48 KB of static shared memory every launch gets (4 would need opt-in dynamic memory).
constexpr int kAsyncStages = 3;

PK_DEVICE float activate(float v, int activation) {
  return activation == static_cast<int>(Activation::kRelu) && v < 0.0f ? 0.0f : v;  // NaN stays NaN, as torch.relu
}

// act(x * scale[c] + shift[c]) per input channel; nullptr scale/shift mean identity.
template <typename T>
struct PrologueView {
  const float* scale;
  const float* shift;
  int activation;

  PK_HOST_DEVICE bool identity() const { return scale == nullptr && shift == nullptr && activation == 0; }
  PK_DEVICE T apply(T v, index_t c) const {
    if (identity()) return v;
    float u = to_float(v);
    if (scale != nullptr) u *= scale[c];
    if (shift != nullptr) u += shift[c];
    return from_float<T>(activate(u, activation));
  }
};

// `V` consecutive elements from `src` (16-byte aligned when V > 1), or zeros for nullptr.
template <int V, typename T>
PK_DEVICE void load_run(const T* src, T (&out)[V]) {
  if (src == nullptr) {
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = from_float<T>(0.0f);
  } else if constexpr (V == 1) {
    out[0] = *src;
  } else {
    const Vec<T, V> v = *reinterpret_cast<const Vec<T, V>*>(src);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = v.v[j];
  }
}

// Sizes every problem shares.
struct Geometry {
  int H, W, OH, OW, KH, KW;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  index_t C_in, C_out, cin_g, cout_g;
};

// Where a run of an operand starts: the operand's base + its row's (A) or column's (B) part +
// its depth step's part, each decoded once. An operand with padding taps (an activation read
// through a tap) is inside iff the spatial coordinates of the two parts add up to a pixel of it.
struct Coord {
  index_t offset;
  int h, w;
};
struct Bounds {
  int h, w;
};
PK_DEVICE bool inside(const Coord& fixed, const Coord& step, Bounds bounds) {
  // A negative coordinate wraps above the bound: one unsigned compare per dimension.
  return (static_cast<unsigned>(fixed.h + step.h) < static_cast<unsigned>(bounds.h)) &
         (static_cast<unsigned>(fixed.w + step.w) < static_cast<unsigned>(bounds.w));
}

// The problem interface. Each problem decodes its indices once: a row's (RowInfo: A's row part
// `a`, and where the row's results go) and a column's (ColInfo: B's column part `b`) per block,
// in shared memory; a depth index's (DepthInfo: A's and B's depth parts) per K slice, in the
// copying thread's registers (the cp.async pipeline) or in shared memory (register staging), so
// a copy in the main loop adds two offsets and compares two coordinates, with no division. A
// depth index is decoded once per block (depth_cursor, by division) and then stepped a slice at
// a time (advance, by multiplications: pk/divmod.h); depth_info reads a cursor's parts.
//   kAAlongDepth / kBAlongDepth   which of the operand's dimensions is contiguous in memory
//   kABounded / kBBounded         which operand has padding taps (against a_bounds() / b_bounds())
//   kPrologueOnA / kPrologueOnB   which operand an input prologue transforms (the channel of a
//                                 run's first element: a_channel(row, depth) / b_channel(col, depth))
//   kPrologue                     whether it does: false here, true in WithPrologue<Problem>, so
//                                 the kernels without one carry no prologue code in their loop
//   kStats                        whether the problem has channel statistics (`stats`, the
//                                 forward's): the gradients' kernels carry no statistics code
//   kTf32                         float only: multiply on TF32 tensor cores (true in
//                                 OnTf32<Problem>) rather than FMAs
//   Out, store_run<V>             the result's element type; V consecutive columns of a row from
//                                 float accumulators (V > 1: 16-byte accesses, the launcher
//                                 checked the alignment)
template <typename Problem>
struct WithPrologue : Problem {
  static constexpr bool kPrologue = true;
};
template <typename Problem>
struct OnTf32 : Problem {
  static constexpr bool kTf32 = true;
};

template <typename T>
struct ForwardProblem {
  static constexpr bool kAAlongDepth = true, kBAlongDepth = true;
  static constexpr bool kABounded = true, kBBounded = false;
  static constexpr bool kPrologueOnA = true, kPrologueOnB = false, kPrologue = false;
  static constexpr bool kTf32 = false;
  static constexpr bool kStats = true;
  using Out = T;
  struct RowInfo {  // output pixel: x's part at its top-left tap, and the pixel itself
    Coord a;
    index_t pixel;
  };
  struct DepthInfo {  // tap (dh, dw) and input channel c: x's part, w's part (the depth index),
    Coord a, b;       // and the prologue's channel
    index_t channel;
  };
  struct ColInfo {  // output channel: its row of w
    Coord b;
  };
  struct DepthCursor {  // depth index k = (th * KW + tw) * cin_g + c
    index_t k;
    int th, tw, c;
  };
  Geometry geo;
  index_t rows, cols, depth;
  Divmod by_cin_g, by_kw;
  const T* x;
  const T* w;
  PrologueView<T> prologue;
  const float* bias;
  const float* out_scale;
  const float* out_shift;
  const T* residual;
  int out_activation;
  T* y;
  float* stats;

  PK_DEVICE RowInfo row_info(int g, index_t m) const {
    const index_t pixels = index_t(geo.OH) * geo.OW;
    const index_t n = m / pixels;
    const int rem = static_cast<int>(m - n * pixels);
    const int h = (rem / geo.OW) * geo.stride_h - geo.pad_h, w = (rem % geo.OW) * geo.stride_w - geo.pad_w;
    return RowInfo{{((n * geo.H + h) * geo.W + w) * geo.C_in + g * geo.cin_g, h, w}, m};
  }
  PK_DEVICE DepthCursor depth_cursor(int, index_t k) const {
    const int kk = static_cast<int>(k);  // depth + kBlockK < 2^31 (check_shape)
    const int tap = kk / by_cin_g.divisor;
    return DepthCursor{k, tap / geo.KW, tap % geo.KW, kk - tap * by_cin_g.divisor};
  }
  PK_DEVICE void advance(DepthCursor& d, int by) const {
    int carry;
    d.k += by;
    by_cin_g.divmod(d.c + by, carry, d.c);
    by_kw.divmod(d.tw + carry, carry, d.tw);
    d.th += carry;
  }
  PK_DEVICE DepthInfo depth_info(int g, const DepthCursor& d) const {
    const int dh = d.th * geo.dil_h, dw = d.tw * geo.dil_w;
    return DepthInfo{{(index_t(dh) * geo.W + dw) * geo.C_in + d.c, dh, dw}, {d.k, 0, 0}, g * geo.cin_g + d.c};
  }
  PK_DEVICE ColInfo col_info(int g, index_t n) const { return ColInfo{{(g * geo.cout_g + n) * depth, 0, 0}}; }
  PK_DEVICE Bounds a_bounds() const { return Bounds{geo.H, geo.W}; }
  PK_DEVICE Bounds b_bounds() const { return Bounds{0, 0}; }
  PK_DEVICE const T* a_base() const { return x; }
  PK_DEVICE const T* b_base() const { return w; }
  PK_DEVICE index_t a_channel(const RowInfo&, const DepthInfo& d) const { return d.channel; }
  PK_DEVICE float pre_epilogue(int g, index_t col, float acc) const {
    return bias != nullptr ? acc + bias[g * geo.cout_g + col] : acc;
  }
  PK_DEVICE int bind(unsigned z) { return static_cast<int>(z); }
  // Columns col .. col + V - 1 of row r (V > 1: one 16-byte access to y and to the residual).
  template <int V>
  PK_DEVICE void store_run(int g, int /*split*/, const RowInfo& r, index_t col, const float* acc) const {
    const index_t at = r.pixel * geo.C_out + g * geo.cout_g + col;
    float res[V], v[V];
    if (residual != nullptr) load_chunk<V>(residual + at, 0, 1, res);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const index_t co = g * geo.cout_g + col + j;
      float u = pre_epilogue(g, col + j, acc[j]);
      if (out_scale != nullptr) u *= out_scale[co];
      if (out_shift != nullptr) u += out_shift[co];
      if (residual != nullptr) u += res[j];
      v[j] = activate(u, out_activation);
    }
    store_chunk<V>(y + at, 0, 1, v);
  }
  PK_DEVICE void store(int g, int split, const RowInfo& r, index_t col, float acc) const {
    store_run<1>(g, split, r, col, &acc);
  }
};

// The input gradient by stride phase. Input row ih reads output row oh through tap kh iff
// oh * stride = ih + pad - kh * dilation, so only taps with kh * dilation = (ih + pad) mod stride
// contribute: input rows of one phase (ih + pad) mod stride share them, and they repeat every
// stride / gcd(stride, dilation) taps. One phase of one dimension, named by its first input row
// (0 <= first < min(stride, size), so phases without rows never launch):
struct Phase1D {
  int first, count;      // the phase's first input row and how many rows it has
  int tap, taps;         // its first contributing tap and how many there are (0: gradient is zero)
  int tap_step;          // taps between contributing ones
  int out_step;          // output rows between the reads of consecutive contributing taps
  int out_offset;        // output row read by the phase's first row through its first tap
};

PK_HOST_DEVICE Phase1D phase_1d(int first, int size, int pad, int kernel, int dilation, int stride) {
  Phase1D p;
  p.first = first;
  p.count = (size - first + stride - 1) / stride;
  const int phase = (first + pad) % stride;
  int a = stride, b = dilation;  // gcd
  while (b != 0) {
    const int t = a % b;
    a = b;
    b = t;
  }
  p.tap_step = stride / a;
  p.tap = -1;
  for (int k = 0; k < p.tap_step && k < kernel; ++k) {
    if (k * dilation % stride == phase) {
      p.tap = k;
      break;
    }
  }
  p.taps = p.tap < 0 ? 0 : (kernel - p.tap + p.tap_step - 1) / p.tap_step;
  p.out_step = p.tap_step * dilation / stride;  // lcm(stride, dilation) / stride
  // first + pad and tap * dilation are both congruent to phase: the division is exact.
  p.out_offset = p.tap < 0 ? 0 : (p.first + pad - p.tap * dilation) / stride;
  return p;
}

// Rows are one phase's input pixels, depth its contributing taps only: blockIdx.z enumerates
// (phase, group), and bind() specialises the problem to the block's phase.
template <typename T>
struct InputGradProblem {
  static constexpr bool kAAlongDepth = true, kBAlongDepth = false;
  static constexpr bool kABounded = true, kBBounded = false;
  static constexpr bool kPrologueOnA = false, kPrologueOnB = false, kPrologue = false;
  static constexpr bool kTf32 = false;
  static constexpr bool kStats = false;
  using Out = T;
  struct RowInfo {  // input pixel: grad's part at the output pixel it reads through the phase's
    Coord a;        // first tap, and the input pixel itself
    index_t pixel;
  };
  struct DepthInfo {  // contributing tap and output channel: grad's part (the tap's output
    Coord a, b;       // offset, negated), w's part
  };
  struct ColInfo {  // input channel
    Coord b;
  };
  struct DepthCursor {  // depth index (th * taps_w + tw) * cout_g + co over the phase's taps
    int th, tw, co;
  };
  Geometry geo;
  index_t rows, cols, depth;
  index_t batch;
  Divmod by_cout_g, by_taps_w;  // the second set by bind()
  int groups, phase_first;  // blockIdx.z = (phase - phase_first) * groups + g,
                            // phase = first row * min(stride_w, W) + first column
  Phase1D ph, pw;
  const T* grad;
  const T* w;
  T* grad_input;

  PK_DEVICE int bind(unsigned z) {
    const int phase = phase_first + static_cast<int>(z) / groups, phases_w = geo.stride_w < geo.W ? geo.stride_w : geo.W;
    ph = phase_1d(phase / phases_w, geo.H, geo.pad_h, geo.KH, geo.dil_h, geo.stride_h);
    pw = phase_1d(phase % phases_w, geo.W, geo.pad_w, geo.KW, geo.dil_w, geo.stride_w);
    rows = batch * ph.count * pw.count;
    depth = index_t(ph.taps) * pw.taps * geo.cout_g;
    by_taps_w = Divmod(pw.taps);
    return static_cast<int>(z) % groups;
  }
  PK_DEVICE RowInfo row_info(int g, index_t m) const {
    const index_t pixels = index_t(ph.count) * pw.count;
    const index_t n = m / pixels;
    const int rem = static_cast<int>(m - n * pixels);
    const int i = rem / pw.count, j = rem % pw.count;
    const int oh = i + ph.out_offset, ow = j + pw.out_offset;
    return RowInfo{{((n * geo.OH + oh) * geo.OW + ow) * geo.C_out + g * geo.cout_g, oh, ow},
                   (n * geo.H + ph.first + i * geo.stride_h) * geo.W + pw.first + j * geo.stride_w};
  }
  PK_DEVICE DepthCursor depth_cursor(int, index_t k) const {
    const int kk = static_cast<int>(k);  // depth + kBlockK < 2^31 (check_shape)
    const int t = kk / by_cout_g.divisor, taps_w = pw.taps > 0 ? pw.taps : 1;
    return DepthCursor{t / taps_w, t % taps_w, kk - t * by_cout_g.divisor};
  }
  PK_DEVICE void advance(DepthCursor& d, int by) const {
    int carry;
    by_cout_g.divmod(d.co + by, carry, d.co);
    by_taps_w.divmod(d.tw + carry, carry, d.tw);
    d.th += carry;
  }
  PK_DEVICE DepthInfo depth_info(int g, const DepthCursor& d) const {
    const int dh = d.th * ph.out_step, dw = d.tw * pw.out_step;
    const int tap = (ph.tap + d.th * ph.tap_step) * geo.KW + pw.tap + d.tw * pw.tap_step;
    return DepthInfo{{-(index_t(dh) * geo.OW + dw) * geo.C_out + d.co, -dh, -dw},
                     {((g * geo.cout_g + d.co) * geo.KH * geo.KW + tap) * geo.cin_g, 0, 0}};
  }
  PK_DEVICE ColInfo col_info(int, index_t n) const { return ColInfo{{n, 0, 0}}; }
  PK_DEVICE Bounds a_bounds() const { return Bounds{geo.OH, geo.OW}; }
  PK_DEVICE Bounds b_bounds() const { return Bounds{0, 0}; }
  PK_DEVICE const T* a_base() const { return grad; }
  PK_DEVICE const T* b_base() const { return w; }
  PK_DEVICE float pre_epilogue(int, index_t, float acc) const { return acc; }
  template <int V>
  PK_DEVICE void store_run(int g, int /*split*/, const RowInfo& r, index_t col, const float* acc) const {
    float v[V];
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = acc[j];
    store_chunk<V>(grad_input + r.pixel * geo.C_in + g * geo.cin_g + col, 0, 1, v);
  }
};

template <typename T>
struct WeightGradProblem {
  static constexpr bool kAAlongDepth = false, kBAlongDepth = false;
  static constexpr bool kABounded = false, kBBounded = true;
  static constexpr bool kPrologueOnA = false, kPrologueOnB = true, kPrologue = false;
  static constexpr bool kTf32 = false;
  static constexpr bool kStats = false;
  using Out = float;
  struct RowInfo {  // output channel: grad's part, and the channel
    Coord a;
    index_t co;
  };
  struct DepthInfo {  // output pixel: grad's part, x's part at its top-left tap
    Coord a, b;
  };
  struct ColInfo {  // tap (dh, dw) and input channel: x's part, and the prologue's channel
    Coord b;
    index_t channel;
  };
  struct DepthCursor {  // output pixel p = (n * OH + oh) * OW + ow
    index_t p, n;
    int oh, ow;
  };
  Geometry geo;
  index_t rows, cols, depth;
  Divmod by_ow, by_oh;
  const T* grad;
  const T* x;
  PrologueView<T> prologue;
  float* partials;

  PK_DEVICE RowInfo row_info(int g, index_t co) const { return RowInfo{{g * geo.cout_g + co, 0, 0}, co}; }
  PK_DEVICE DepthCursor depth_cursor(int, index_t p) const {
    const index_t pixels = index_t(geo.OH) * geo.OW;
    const index_t n = p / pixels;
    const int rem = static_cast<int>(p - n * pixels);
    return DepthCursor{p, n, rem / geo.OW, rem % geo.OW};
  }
  PK_DEVICE void advance(DepthCursor& d, int by) const {
    int carry;
    d.p += by;
    by_ow.divmod(d.ow + by, carry, d.ow);
    by_oh.divmod(d.oh + carry, carry, d.oh);
    d.n += carry;
  }
  PK_DEVICE DepthInfo depth_info(int, const DepthCursor& d) const {
    const int h = d.oh * geo.stride_h - geo.pad_h, w = d.ow * geo.stride_w - geo.pad_w;
    return DepthInfo{{d.p * geo.C_out, 0, 0}, {((d.n * geo.H + h) * geo.W + w) * geo.C_in, h, w}};
  }
  PK_DEVICE ColInfo col_info(int g, index_t col) const {
    const int tap = static_cast<int>(col / geo.cin_g), c = static_cast<int>(col - index_t(tap) * geo.cin_g);
    const int dh = (tap / geo.KW) * geo.dil_h, dw = (tap % geo.KW) * geo.dil_w;
    return ColInfo{{(index_t(dh) * geo.W + dw) * geo.C_in + g * geo.cin_g + c, dh, dw}, g * geo.cin_g + c};
  }
  PK_DEVICE Bounds a_bounds() const { return Bounds{0, 0}; }
  PK_DEVICE Bounds b_bounds() const { return Bounds{geo.H, geo.W}; }
  PK_DEVICE const T* a_base() const { return grad; }
  PK_DEVICE const T* b_base() const { return x; }
  PK_DEVICE index_t b_channel(const ColInfo& c, const DepthInfo&) const { return c.channel; }
  PK_DEVICE float pre_epilogue(int, index_t, float acc) const { return acc; }
  PK_DEVICE int bind(unsigned z) { return static_cast<int>(z); }
  template <int V>
  PK_DEVICE void store_run(int g, int split, const RowInfo& r, index_t col, const float* acc) const {
    float v[V];
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = acc[j];
    store_chunk<V>(partials + ((index_t(split) * geo.C_out) + g * geo.cout_g + r.co) * cols + col, 0, 1, v);
  }
};

// A staged operand tile in shared memory: A is BLOCK_M rows x kBlockK depth, B kBlockK depth x
// BLOCK_N columns; `i` is A's row or B's column. 16-bit tiles are stored contiguous along the
// dimension that is contiguous in memory, so a run of 16 bytes is one copy (cp.async's unit) and
// ldmatrix reads the tile in the matching layout (transposing where depth is not contiguous);
// fp32 tiles are stored the way the FMA loop reads them without bank conflicts (A row-major, B
// depth-major). Rows are padded by 8 elements: 16-bit rows stay a multiple of 16 bytes (every
// 8-element segment ldmatrix reads is 16-byte aligned) and 8 consecutive rows start on
// different banks.
template <bool kDepthContiguous, int kExtent, int kPad = 8>
struct TileLayout {
  static constexpr bool kAlongDepth = kDepthContiguous;
  static constexpr int kLd = kDepthContiguous ? kBlockK + kPad : kExtent + kPad;
  static constexpr int kElements = (kDepthContiguous ? kExtent : kBlockK) * kLd;
  PK_HOST_DEVICE static constexpr int at(int i, int k) { return kDepthContiguous ? i * kLd + k : k * kLd + i; }
};

template <typename T, typename Problem, int STAGES, int BLOCK_M, int BLOCK_N>
struct Tiles {
  static constexpr bool kSixteenBit = !std::is_same<T, float>::value;
  static_assert(kSixteenBit ? !Problem::kTf32 : STAGES == 1, "TF32: float, register-staged");
  // float keeps the FMA loop's layouts on TF32 too: A row-major and B depth-major are what the
  // TF32 fragments' 32-bit shared loads read, conflict-free with A's rows padded by 4 (a warp's
  // A loads (g, t) hit bank 4g + t) and B's by 8 (8t + g).
  static constexpr bool kTensorCores = kSixteenBit || Problem::kTf32;
  using A = TileLayout<kSixteenBit ? Problem::kAAlongDepth : true, BLOCK_M, kSixteenBit ? 8 : 4>;
  using B = TileLayout<kSixteenBit ? Problem::kBAlongDepth : false, BLOCK_N>;
  static constexpr int kStageElements = A::kElements + B::kElements;
  static_assert(kStageElements * sizeof(T) % 32 == 0, "every stage's tiles start 32-byte aligned");
  static constexpr std::size_t kStagingBytes = sizeof(T) * STAGES * kStageElements;
  static constexpr int kLdC = BLOCK_N + 4;  // the fp32 accumulator tile's row stride
  static constexpr std::size_t kAccumulatorBytes = sizeof(float) * BLOCK_M * kLdC;
  // The accumulator tile reuses the staging buffers after the main loop.
  static constexpr std::size_t kSharedBytes = kStagingBytes > kAccumulatorBytes ? kStagingBytes : kAccumulatorBytes;
};

// Run e of an operand tile of extent kExtent (along i) with runs of VEC elements: its first
// element (i, k). Consecutive runs walk the dimension contiguous in memory (coalesced).
template <bool kAlongDepth, int kExtent, int VEC>
PK_DEVICE void run_start(int e, int& i, int& k) {
  if (kAlongDepth) {
    i = e / (kBlockK / VEC);
    k = e % (kBlockK / VEC) * VEC;
  } else {
    k = e / (kExtent / VEC);
    i = e % (kExtent / VEC) * VEC;
  }
}

// Run t of thread `tid` when every thread copies kRuns runs of the tile, all at one depth index
// of the slice (so one depth cursor serves them). Along depth, a row's kBlockK / VEC runs go to
// consecutive threads (16-byte runs, a row's 64 bytes together), and a tile with fewer runs than
// the threads' (a narrow one) leaves the last threads' runs past its extent (i >= kExtent: not
// copied); across depth, the kThreads / kBlockK threads of a depth row take its runs in turn.
template <bool kAlongDepth, int kExtent, int VEC, int kRuns>
PK_DEVICE void thread_run_start(int tid, int t, int& i, int& k) {
  constexpr int kRowThreads = kAlongDepth ? kBlockK / VEC : kThreads / kBlockK;
  static_assert(kThreads % kRowThreads == 0, "a depth row's runs divide the threads");
  static_assert(kAlongDepth ? kThreads / kRowThreads * kRuns >= kExtent : kRowThreads * kRuns * VEC == kExtent,
                "the threads' runs cover the tile");
  if (kAlongDepth) {
    i = tid / kRowThreads + t * (kThreads / kRowThreads);
    k = tid % kRowThreads * VEC;
  } else {
    k = tid / kRowThreads;
    i = (tid % kRowThreads + t * kRowThreads) * VEC;
  }
}

// A run whose part of the tile is valid (`valid`) is read unless it falls on a padding tap of an
// operand that has them; otherwise it is zero.
template <bool kBounded>
PK_DEVICE bool run_is_read(bool valid, const Coord& fixed, const Coord& step, Bounds bounds) {
  if constexpr (kBounded) return valid & inside(fixed, step, bounds);  // &: no branches
  return valid;
}

// The input prologue on a run read from memory, its first element at `channel`.
template <typename Problem, typename T, int V>
PK_DEVICE void apply_prologue(const Problem& p, index_t channel, T (&run)[V]) {
#pragma unroll
  for (int j = 0; j < V; ++j) run[j] = p.prologue.apply(run[j], channel + j);
}

// An element as the register-staged loop stores it: on TF32 rounded to nearest once here
// (cvt.rna), so an operand is off by half a TF32 unit at most, where the tensor core's own
// truncation of the low 13 bits would cost a whole one.
template <bool kTf32, typename T>
PK_DEVICE T staged(T v) {
  if constexpr (kTf32) return tile::to_tf32(v);
  return v;
}

// At least 1 block per SM: with ptxas's own occupancy target the bf16 forward spilled on sm_90.
// VEC: elements per load along each operand's contiguous dimension (16 bytes, or 1); the
// launcher picks VEC > 1 only where every run of VEC stays inside one tap and is aligned.
// BLOCK_M x BLOCK_N: the tile, kBlockM x kBlockN or the narrow kNarrowBlockM x kNarrowBlockN
// (16-bit, B along depth), which writes its few columns element by element: the forward's
// operands take 16-byte runs there whatever its output channels are.
// STAGES: 1 stages each K slice through registers (loads, prologue, store to shared memory,
// compute); > 1 (16-bit, 16-byte runs) is a cp.async pipeline that keeps STAGES - 1 slices in
// flight while the tensor cores work on the oldest. cp.async cannot transform what it copies, so
// there a prologue runs on the shared tile: each thread transforms the runs it copied itself
// between its wait (which makes its own copies visible to it) and the barrier (which publishes
// them), with no extra barrier; padding taps stay zero.
template <typename T, int VEC, int STAGES, int BLOCK_M, int BLOCK_N, typename Problem>
__global__ void __launch_bounds__(kThreads, 1) gemm_kernel(Problem p, index_t split_len) {
  using Config = Tiles<T, Problem, STAGES, BLOCK_M, BLOCK_N>;
  using TileA = typename Config::A;
  using TileB = typename Config::B;
  using RowInfo = typename Problem::RowInfo;
  using ColInfo = typename Problem::ColInfo;
  using DepthInfo = typename Problem::DepthInfo;
  constexpr bool kTensorCores = Config::kTensorCores, kTf32 = Problem::kTf32;
  static_assert(STAGES == 1 || (kTensorCores && VEC * sizeof(T) == 16), "cp.async moves 16-byte runs");
  static_assert((BLOCK_M == kBlockM && BLOCK_N == kBlockN) || (kTensorCores && Problem::kBAlongDepth),
                "narrow tiles: tensor cores, B along depth");
  static_assert(BLOCK_M % kBlockM == 0, "whole statistics row tiles");
  constexpr int kLdC = Config::kLdC;
  const int g = p.bind(blockIdx.z);
  const index_t m0 = index_t(blockIdx.x) * BLOCK_M;
  if (m0 >= p.rows) return;  // the whole block: a stride phase with fewer rows than the grid has
  // PK_SHARED declares the tiles 32-byte aligned in the shared space. No realignment through an
  // integer here: nvcc then loses the address space and the tiles load by generic LD/ST.
  PK_SHARED(unsigned char, shared, Config::kSharedBytes);
  T* const staging = reinterpret_cast<T*>(shared);  // STAGES x (A tile, B tile)
  float* const Cs = reinterpret_cast<float*>(shared);

  const int tid = threadIdx.x;
  const index_t tiles_n = (p.cols + BLOCK_N - 1) / BLOCK_N;
  const int split = static_cast<int>(blockIdx.y / tiles_n);
  const index_t n0 = (blockIdx.y % tiles_n) * BLOCK_N;
  const index_t k_begin = index_t(split) * split_len;
  const index_t k_end = k_begin + split_len < p.depth ? k_begin + split_len : p.depth;

  float acc[kTensorCores ? 1 : 8][kTensorCores ? 1 : 4];
  // 2x2 warps of 32x32 (2 x 4 tensor-core tiles of 16x8 each); in a narrow tile 4x1 warps of 32x16.
  constexpr int kWarpsN = BLOCK_N >= 64 ? 2 : 1, kWarpsM = kThreads / 32 / kWarpsN;
  constexpr int kWarpRows = BLOCK_M / kWarpsM, kWarpCols = BLOCK_N / kWarpsN;
  constexpr int kWarpTilesM = kWarpRows / tile::kM, kWarpTilesN = kWarpCols / tile::kN;
  static_assert(kWarpTilesM >= 1 && kWarpTilesN % 2 == 0, "whole tiles, B loaded 16 columns at a time");
  tile::Accumulator frag_acc[kTensorCores ? kWarpTilesM : 1][kTensorCores ? kWarpTilesN : 1];
  const int warp = tid / 32, warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  if constexpr (kTensorCores) {
#pragma unroll
    for (int i = 0; i < kWarpTilesM; ++i)
#pragma unroll
      for (int j = 0; j < kWarpTilesN; ++j) tile::fill(frag_acc[i][j], 0.0f);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }

  // Decoded indices: rows and columns once per block, in shared memory (the copies and the
  // epilogue read them).
  PK_SHARED(RowInfo, row_info, BLOCK_M);
  PK_SHARED(ColInfo, col_info, BLOCK_N);
  // One thread per row and per column (no loop: nvcc unrolls one whose start it cannot bound).
  static_assert(BLOCK_M <= kThreads && BLOCK_N <= kThreads, "a thread per row and per column");
  if (tid < BLOCK_M) row_info[tid] = p.row_info(g, m0 + tid);
  if (tid < BLOCK_N) col_info[tid] = p.col_info(g, n0 + tid);
  // Slices, in int: the launcher checks that a slab's slices fit.
  const int steps = k_end > k_begin ? static_cast<int>((k_end - k_begin + kBlockK - 1) / kBlockK) : 0;
  const T* const a_base = p.a_base();
  const T* const b_base = p.b_base();

  // The tensor-core or FMA work on one staged slice.
  auto compute = [&](const T* As, const T* Bs) {
    if constexpr (kTf32) {
#pragma unroll
      for (int kk = 0; kk < kBlockK; kk += tile::kKTf32) {
        tile::FragmentTf32A a[kWarpTilesM];
        tile::FragmentTf32B b[kWarpTilesN];
#pragma unroll
        for (int i = 0; i < kWarpTilesM; ++i)
          tile::load_a_tf32(a[i], As + TileA::at(warp_m * kWarpRows + i * tile::kM, kk), TileA::kLd);
#pragma unroll
        for (int j = 0; j < kWarpTilesN; ++j)
          tile::load_b_tf32(b[j], Bs + TileB::at(warp_n * kWarpCols + j * tile::kN, kk), TileB::kLd);
#pragma unroll
        for (int i = 0; i < kWarpTilesM; ++i)
#pragma unroll
          for (int j = 0; j < kWarpTilesN; ++j) tile::mma(frag_acc[i][j], a[i], b[j]);
      }
    } else if constexpr (kTensorCores) {
#pragma unroll
      for (int kk = 0; kk < kBlockK; kk += tile::kK) {
        tile::FragmentA<T> a[kWarpTilesM];
        tile::FragmentB<T> b[kWarpTilesN];
#pragma unroll
        for (int i = 0; i < kWarpTilesM; ++i)
          tile::load_a<TileA::kAlongDepth>(a[i], As + TileA::at(warp_m * kWarpRows + i * tile::kM, kk), TileA::kLd);
#pragma unroll
        for (int j = 0; j < kWarpTilesN; j += 2)  // a 16-column load fills two fragments
          tile::load_b<TileB::kAlongDepth>(b[j], b[j + 1], Bs + TileB::at(warp_n * kWarpCols + j * tile::kN, kk),
                                           TileB::kLd);
#pragma unroll
        for (int i = 0; i < kWarpTilesM; ++i)
#pragma unroll
          for (int j = 0; j < kWarpTilesN; ++j) tile::mma(frag_acc[i][j], a[i], b[j]);
      }
    } else {
      const int ty = tid / 16, tx = tid % 16;  // thread (ty, tx) owns rows ty + 8i, cols tx + 16j
#pragma unroll 4
      for (int kk = 0; kk < kBlockK; ++kk) {
        float a[8], b[4];
#pragma unroll
        for (int i = 0; i < 8; ++i) a[i] = to_float(As[TileA::at(ty + 8 * i, kk)]);
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = to_float(Bs[TileB::at(tx + 16 * j, kk)]);
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
  };

  if constexpr (STAGES == 1) {
    T* const As = staging;
    T* const Bs = staging + TileA::kElements;
    // Every thread copies runs at any depth index of a slice: thread kk < kBlockK decodes depth
    // index kk of every slice into one of two shared slots, its cursor stepped a slice at a time.
    static_assert(kBlockK <= kThreads, "one thread per depth index of a slice");
    PK_SHARED(DepthInfo, depth_info, 2 * kBlockK);
    typename Problem::DepthCursor cursor{};
    if (tid < kBlockK) cursor = p.depth_cursor(g, k_begin + tid);
    for (int step = 0; step < steps; ++step) {
      const index_t k0 = k_begin + index_t(step) * kBlockK;
      DepthInfo* const slot = depth_info + (step % 2) * kBlockK;
      if (tid < kBlockK) {
        slot[tid] = p.depth_info(g, cursor);
        p.advance(cursor, kBlockK);
      }
      __syncthreads();  // the decoded indices are written and the previous step's compute is done
      // A run lies wholly inside or outside the tile's valid range (the extents are multiples of VEC).
      for (int e = tid; e < BLOCK_M * kBlockK / VEC; e += kThreads) {
        constexpr bool kAlong = Problem::kAAlongDepth;
        int r, kk;
        run_start<kAlong, BLOCK_M, VEC>(e, r, kk);
        const RowInfo& row = row_info[r];
        const DepthInfo& d = slot[kk];
        const bool read = run_is_read<Problem::kABounded>(m0 + r < p.rows && k0 + kk < k_end, row.a, d.a,
                                                          p.a_bounds());
        T run[VEC];
        load_run<VEC>(read ? a_base + (row.a.offset + d.a.offset) : nullptr, run);
        if constexpr (Problem::kPrologue && Problem::kPrologueOnA)
          if (read) apply_prologue(p, p.a_channel(row, d), run);
#pragma unroll
        for (int j = 0; j < VEC; ++j) As[TileA::at(r + (kAlong ? 0 : j), kk + (kAlong ? j : 0))] = staged<kTf32>(run[j]);
      }
      for (int e = tid; e < kBlockK * BLOCK_N / VEC; e += kThreads) {
        constexpr bool kAlong = Problem::kBAlongDepth;
        int c, kk;
        run_start<kAlong, BLOCK_N, VEC>(e, c, kk);
        const ColInfo& col = col_info[c];
        const DepthInfo& d = slot[kk];
        const bool read = run_is_read<Problem::kBBounded>(n0 + c < p.cols && k0 + kk < k_end, col.b, d.b,
                                                          p.b_bounds());
        T run[VEC];
        load_run<VEC>(read ? b_base + (col.b.offset + d.b.offset) : nullptr, run);
        if constexpr (Problem::kPrologue && Problem::kPrologueOnB)
          if (read) apply_prologue(p, p.b_channel(col, d), run);
#pragma unroll
        for (int j = 0; j < VEC; ++j) Bs[TileB::at(c + (kAlong ? 0 : j), kk + (kAlong ? j : 0))] = staged<kTf32>(run[j]);
      }
      __syncthreads();
      compute(As, Bs);
      // No barrier here: the next step's first barrier comes before it overwrites the tiles, and
      // its decoded indices go to the other slot.
    }
  } else {
    // Every thread copies the same runs of every slice, all of an operand's at one depth index
    // (thread_run_start): their tile positions, their rows' and columns' decoded parts and a
    // depth cursor per operand stay in registers. A copy adds the cursor's depth part, compares
    // two coordinates and issues: no division, no shared memory and no barrier for the depth
    // indices (each thread steps its own cursors a slice per issue). Out-of-range runs and
    // padding taps are zero-filled (their source is the operand's base, unread). A narrow B tile
    // has fewer runs than threads: the threads past it copy none (b_in_tile).
    constexpr int kRunsA = BLOCK_M * kBlockK / VEC / kThreads;
    constexpr int kRunsB = (kBlockK * BLOCK_N / VEC + kThreads - 1) / kThreads;
    constexpr bool kBPartial = kRunsB * VEC * kThreads != kBlockK * BLOCK_N;
    static_assert(kRunsA * VEC * kThreads == BLOCK_M * kBlockK, "every thread copies the same number of A's runs");
    int a_row[kRunsA], a_k[kRunsA], b_col[kRunsB], b_k[kRunsB];
    Coord a_fixed[kRunsA], b_fixed[kRunsB];
    bool a_valid[kRunsA], b_valid[kRunsB], b_in_tile[kRunsB];
    __syncthreads();  // rows and columns decoded
#pragma unroll
    for (int t = 0; t < kRunsA; ++t) {
      thread_run_start<Problem::kAAlongDepth, BLOCK_M, VEC, kRunsA>(tid, t, a_row[t], a_k[t]);
      a_fixed[t] = row_info[a_row[t]].a;
      a_valid[t] = m0 + a_row[t] < p.rows;
    }
#pragma unroll
    for (int t = 0; t < kRunsB; ++t) {
      thread_run_start<Problem::kBAlongDepth, BLOCK_N, VEC, kRunsB>(tid, t, b_col[t], b_k[t]);
      b_in_tile[t] = !kBPartial || b_col[t] < BLOCK_N;
      b_fixed[t] = col_info[b_in_tile[t] ? b_col[t] : 0].b;
      b_valid[t] = n0 + b_col[t] < p.cols;
    }
    // The depth cursors: A's, and B's unless B's runs sit at A's index (both operands stored
    // along depth, or both across it: thread_run_start's index depends on nothing else).
    constexpr bool kSharedDepth = Problem::kAAlongDepth == Problem::kBAlongDepth;
    constexpr int kDepths = kSharedDepth ? 1 : 2;
    constexpr int kADepth = 0, kBDepth = kDepths - 1;
    using Cursor = typename Problem::DepthCursor;
    Cursor cursor[kDepths];
#pragma unroll
    for (int i = 0; i < kDepths; ++i)
      cursor[i] = p.depth_cursor(g, k_begin + (i == kADepth ? a_k[0] : b_k[0]));
    // With a prologue, a second set trails by STAGES - 1 slices: the slice each wait completes.
    Cursor landed[kDepths];
    if constexpr (Problem::kPrologue) {
#pragma unroll
      for (int i = 0; i < kDepths; ++i) landed[i] = cursor[i];
    }
    auto slice_depths = [&](Cursor (&from)[kDepths], DepthInfo (&depths)[kDepths]) {
#pragma unroll
      for (int i = 0; i < kDepths; ++i) {
        depths[i] = p.depth_info(g, from[i]);
        p.advance(from[i], kBlockK);
      }
    };
    // depth_left: the slice's valid depth indices (kBlockK but in the last slice of a slab).
    auto a_read = [&](int t, int depth_left, const DepthInfo& d) {
      return run_is_read<Problem::kABounded>(a_valid[t] & (a_k[t] < depth_left), a_fixed[t], d.a, p.a_bounds());
    };
    auto b_read = [&](int t, int depth_left, const DepthInfo& d) {
      return run_is_read<Problem::kBBounded>(b_valid[t] & (b_k[t] < depth_left), b_fixed[t], d.b, p.b_bounds());
    };
    auto depth_left = [&](int step) {
      const index_t left = k_end - k_begin - index_t(step) * kBlockK;
      return left < kBlockK ? static_cast<int>(left) : kBlockK;
    };
    // Copies of slice `step` (the cursors' slice: issues come in order) into stage step % STAGES
    // (`stage`, counted by the caller rather than divided).
    auto issue = [&](int step, int stage) {
      if (step < steps) {
        const int left = depth_left(step);
        DepthInfo depths[kDepths];
        slice_depths(cursor, depths);
        T* const As = staging + stage * Config::kStageElements;
        T* const Bs = As + TileA::kElements;
#pragma unroll
        for (int t = 0; t < kRunsA; ++t) {
          const DepthInfo& d = depths[kADepth];
          const bool read = a_read(t, left, d);
          async_copy_16(As + TileA::at(a_row[t], a_k[t]), a_base + (read ? a_fixed[t].offset + d.a.offset : 0), read);
        }
#pragma unroll
        for (int t = 0; t < kRunsB; ++t) {
          if (!b_in_tile[t]) continue;
          const DepthInfo& d = depths[kBDepth];
          const bool read = b_read(t, left, d);
          async_copy_16(Bs + TileB::at(b_col[t], b_k[t]), b_base + (read ? b_fixed[t].offset + d.b.offset : 0), read);
        }
      }
      async_commit();  // one group per step, empty past the end: the wait below counts steps
    };
    // Prologue: slices 0 .. STAGES-2 in flight.
    for (int s = 0; s < STAGES - 1; ++s) issue(s, s);
    // The input prologue on the runs this thread copied for slice `step` (the same runs issue()
    // took, at the trailing cursors: transforms come in order too).
    auto transform_own = [&](int step, int stage) {
      const int left = depth_left(step);
      DepthInfo depths[kDepths];
      slice_depths(landed, depths);
      T* const As = staging + stage * Config::kStageElements;
      T* const Bs = As + TileA::kElements;
      if constexpr (Problem::kPrologueOnA) {
#pragma unroll
        for (int t = 0; t < kRunsA; ++t) {
          const DepthInfo& d = depths[kADepth];
          if (!a_read(t, left, d)) continue;
          Vec<T, VEC>* const run = reinterpret_cast<Vec<T, VEC>*>(As + TileA::at(a_row[t], a_k[t]));
          Vec<T, VEC> v = *run;
          apply_prologue(p, p.a_channel(row_info[a_row[t]], d), v.v);
          *run = v;
        }
      }
      if constexpr (Problem::kPrologueOnB) {
#pragma unroll
        for (int t = 0; t < kRunsB; ++t) {
          const DepthInfo& d = depths[kBDepth];
          if (!b_in_tile[t] || !b_read(t, left, d)) continue;
          Vec<T, VEC>* const run = reinterpret_cast<Vec<T, VEC>*>(Bs + TileB::at(b_col[t], b_k[t]));
          Vec<T, VEC> v = *run;
          apply_prologue(p, p.b_channel(col_info[b_col[t]], d), v.v);
          *run = v;
        }
      }
    };
    // stage: step % STAGES; newest: (step + STAGES - 1) % STAGES, the ring position issued next
    for (int step = 0, stage = 0, newest = STAGES - 1; step < steps; ++step) {
      async_wait<STAGES - 2>();  // this thread's copies of slice `step` have landed
      if constexpr (Problem::kPrologue) transform_own(step, stage);
      // Every thread's copies of slice `step` landed (and are transformed), and every thread is
      // done computing step - 1, whose stage the next issue overwrites.
      __syncthreads();
      issue(step + STAGES - 1, newest);
      const T* const As = staging + stage * Config::kStageElements;
      compute(As, As + TileA::kElements);
      newest = stage;
      stage = stage + 1 == STAGES ? 0 : stage + 1;
    }
    async_wait<0>();  // only empty groups are left; the accumulators overwrite the stages next
  }
  __syncthreads();  // every compute is done before the accumulators overwrite the staging tiles

  // The accumulators go to shared memory, over the staging tiles.
  if constexpr (kTensorCores) {
#pragma unroll
    for (int i = 0; i < kWarpTilesM; ++i)
#pragma unroll
      for (int j = 0; j < kWarpTilesN; ++j)
        tile::store(Cs + (warp_m * kWarpRows + i * tile::kM) * kLdC + warp_n * kWarpCols + j * tile::kN,
                    frag_acc[i][j], kLdC);
  } else {
    const int ty = tid / 16, tx = tid % 16;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Cs[(ty + 8 * i) * kLdC + tx + 16 * j] = acc[i][j];
  }
  __syncthreads();

  if constexpr (Problem::kStats) {
    // Per column of each kBlockM-row tile of this block, the sum of y and its M2 about the
    // tile's own mean (two passes over the tile in shared memory: no cancellation when |mean| >>
    // std). One thread per column and row tile; the caller merges the tiles with Chan's formula.
    constexpr int kStatTiles = BLOCK_M / kBlockM;
    static_assert(kStatTiles * BLOCK_N <= kThreads, "a thread per column and row tile");
    const int c = kStatTiles == 1 ? tid : tid % BLOCK_N, h = kStatTiles == 1 ? 0 : tid / BLOCK_N;
    const index_t n = n0 + c, tile_m0 = m0 + h * kBlockM;  // a block's first tile holds rows
    if (p.stats != nullptr && h < kStatTiles && c < BLOCK_N && n < p.cols && (h == 0 || tile_m0 < p.rows)) {
      const int valid_rows = p.rows - tile_m0 < kBlockM ? static_cast<int>(p.rows - tile_m0) : kBlockM;
      const float* const column = Cs + h * kBlockM * kLdC + c;
      float sum = 0.0f;
      for (int r = 0; r < valid_rows; ++r) sum += p.pre_epilogue(g, n, column[r * kLdC]);
      const float mean = sum / static_cast<float>(valid_rows);
      float m2 = 0.0f;
      for (int r = 0; r < valid_rows; ++r) {
        const float d = p.pre_epilogue(g, n, column[r * kLdC]) - mean;
        m2 = fmaf(d, d, m2);
      }
      const index_t tile = index_t(blockIdx.x) * kStatTiles + h;
      float* const out = p.stats + tile * 2 * p.geo.C_out + g * p.geo.cout_g + n;
      out[0] = sum;
      out[p.geo.C_out] = m2;
    }
  }
  // Runs of kOut columns (16 bytes of the result where the launcher took 16-byte runs: the
  // columns per group are then a multiple of it, so a run is wholly inside or outside; a narrow
  // tile's result goes element by element), each thread's consecutive along the output's
  // contiguous dimension.
  constexpr int kOut = VEC > 1 && BLOCK_N == kBlockN ? kVec16<typename Problem::Out> : 1;
  static_assert(BLOCK_N % kOut == 0 && BLOCK_M * BLOCK_N % (kOut * kThreads) == 0, "whole runs per thread");
#pragma unroll 1
  for (int i = 0; i < BLOCK_M * BLOCK_N / (kOut * kThreads); ++i) {
    const int e = (tid + i * kThreads) * kOut, r = e / BLOCK_N, c = e % BLOCK_N;
    if (m0 + r >= p.rows || n0 + c >= p.cols) continue;
    float run[kOut];
    if constexpr (kOut % 4 == 0) {  // 16-byte shared loads (kLdC and c are multiples of 4)
#pragma unroll
      for (int q = 0; q < kOut; q += 4) {
        const Vec<float, 4> v = *reinterpret_cast<const Vec<float, 4>*>(Cs + r * kLdC + c + q);
#pragma unroll
        for (int j = 0; j < 4; ++j) run[q + j] = v.v[j];
      }
    } else {
#pragma unroll
      for (int j = 0; j < kOut; ++j) run[j] = Cs[r * kLdC + c + j];
    }
    p.template store_run<kOut>(g, split, row_info[r], n0 + c, run);
  }
}

inline index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }

inline Geometry geometry(const Shape& s) {
  Geometry geo;
  geo.H = static_cast<int>(s.height);
  geo.W = static_cast<int>(s.width);
  geo.OH = static_cast<int>(s.out_height);
  geo.OW = static_cast<int>(s.out_width);
  geo.KH = static_cast<int>(s.kernel_h);
  geo.KW = static_cast<int>(s.kernel_w);
  geo.stride_h = s.stride_h;
  geo.stride_w = s.stride_w;
  geo.pad_h = s.pad_top;
  geo.pad_w = s.pad_left;
  geo.dil_h = s.dilation_h;
  geo.dil_w = s.dilation_w;
  geo.C_in = s.in_channels;
  geo.C_out = s.out_channels;
  geo.cin_g = s.in_channels / s.groups;
  geo.cout_g = s.out_channels / s.groups;
  return geo;
}

inline void check_shape(const Shape& s) {
  const bool ok = s.batch > 0 && s.in_channels > 0 && s.out_channels > 0 && s.groups > 0 &&
                  s.in_channels % s.groups == 0 && s.out_channels % s.groups == 0 &&
                  s.kernel_h > 0 && s.kernel_w > 0 && s.out_height > 0 && s.out_width > 0 &&
                  s.stride_h > 0 && s.stride_w > 0 && s.dilation_h > 0 && s.dilation_w > 0 &&
                  s.pad_top >= 0 && s.pad_left >= 0 && s.groups <= 65535 &&
                  s.height < (1 << 30) && s.width < (1 << 30) &&
                  // the forward's and input gradient's depth indices are decoded in 32 bits, a
                  // slice past the end included
                  s.kernel_h * s.kernel_w * std::max(s.in_channels, s.out_channels) / s.groups < (1LL << 30);
  if (!ok) throw std::invalid_argument("pk::conv: invalid convolution shape");
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

inline bool all_aligned16(std::initializer_list<const void*> ptrs) {
  bool aligned = true;
  for (const void* ptr : ptrs) aligned = aligned && aligned16(ptr);  // nullptr (absent) is aligned
  return aligned;
}

// Which accesses take 16-byte runs: the operands' (the kernel's VEC) and the result's.
struct Runs {
  bool operands, result;
};

// The gradients read an operand across depth in runs of the other channel count, so both take
// 16-byte runs, or neither: where both group widths are multiples of the run (a run never
// crosses a tap, a group or a tile edge) and the tensors read and written in runs are 16-byte
// aligned.
template <typename T>
Runs vectorizable(const Geometry& geo, std::initializer_list<const void*> accessed) {
  const bool runs = geo.cin_g % kVec16<T> == 0 && geo.cout_g % kVec16<T> == 0 && all_aligned16(accessed);
  return Runs{runs, runs};
}

// The forward reads both operands along its depth, in runs of input channels: they take 16-byte
// runs wherever the input channels per group allow, the result (and the residual, read with it)
// only where the output channels per group do too.
template <typename T>
Runs forward_runs(const Geometry& geo, const void* x, const void* w, const void* y, const void* residual) {
  const bool operands = geo.cin_g % kVec16<T> == 0 && all_aligned16({x, w});
  return Runs{operands, operands && geo.cout_g % kVec16<T> == 0 && all_aligned16({y, residual})};
}

template <typename T, typename Problem>
void launch_gemm(const Problem& p, Runs runs, index_t grid_z, index_t splits, index_t split_len, Stream stream) {
  constexpr bool kFma = std::is_same<T, float>::value;
  // The narrow tile where the columns fit it, on the cp.async pipeline, with B's runs along depth
  // (the forward's weight rows: a column's runs on consecutive threads); it writes the result
  // element by element. Else 16-byte runs only where the result takes them too.
  const bool narrow = !kFma && Problem::kBAlongDepth && runs.operands && p.cols <= kNarrowBlockN;
  const bool vectorized = narrow || (runs.operands && runs.result);
  const index_t block_m = narrow ? kNarrowBlockM : kBlockM, block_n = narrow ? kNarrowBlockN : kBlockN;
  const index_t tiles_m = ceil_div(p.rows, block_m), tiles_n = ceil_div(p.cols, block_n);
  if (tiles_m > 0x7fffffff || tiles_n * splits > 65535 || grid_z > 65535 || ceil_div(split_len, kBlockK) > 0x7fffffff)
    throw std::invalid_argument("pk::conv: the problem exceeds the launch grid");
  const dim3 grid(static_cast<unsigned>(tiles_m), static_cast<unsigned>(tiles_n * splits),
                  static_cast<unsigned>(grid_z));
  constexpr int kVec = kVec16<T>;
  if (!vectorized) {
    launch(gemm_kernel<T, 1, 1, kBlockM, kBlockN, Problem>, grid, dim3(kThreads), 0, stream, p, split_len);
  } else if constexpr (kFma) {  // register-staged
    launch(gemm_kernel<T, kVec, 1, kBlockM, kBlockN, Problem>, grid, dim3(kThreads), 0, stream, p, split_len);
  } else {
    if constexpr (Problem::kBAlongDepth) {
      if (narrow) {
        launch(gemm_kernel<T, kVec, kAsyncStages, kNarrowBlockM, kNarrowBlockN, Problem>, grid, dim3(kThreads), 0,
               stream, p, split_len);
        return;
      }
    }
    launch(gemm_kernel<T, kVec, kAsyncStages, kBlockM, kBlockN, Problem>, grid, dim3(kThreads), 0, stream, p,
           split_len);
  }
}

// Whether a float launch multiplies on TF32 tensor cores: where the caller allows it (torch's
// cudnn.allow_tf32) and the GPU has them (sm_80+).
inline bool use_tf32(bool allow_tf32);

// float with TF32 runs OnTf32<Problem>; everything else Problem itself.
template <typename T, typename Problem>
void launch_gemm_on(const Problem& p, bool tf32, Runs runs, index_t grid_z, index_t splits, index_t split_len,
                    Stream stream) {
  if constexpr (std::is_same<T, float>::value) {
    if (use_tf32(tf32)) {
      launch_gemm<T>(OnTf32<Problem>{p}, runs, grid_z, splits, split_len, stream);
      return;
    }
  }
  launch_gemm<T>(p, runs, grid_z, splits, split_len, stream);
}

// A problem with an input prologue runs the kernels that apply it; without one, the kernels
// that carry no prologue code.
template <typename T, typename Problem>
void launch_gemm_with_prologue(const Problem& p, bool tf32, Runs runs, index_t grid_z, index_t splits,
                               index_t split_len, Stream stream) {
  if (p.prologue.identity()) {
    launch_gemm_on<T>(p, tf32, runs, grid_z, splits, split_len, stream);
  } else {
    launch_gemm_on<T>(WithPrologue<Problem>{p}, tf32, runs, grid_z, splits, split_len, stream);
  }
}

// The sm_90 forward (conv_sm90.cuh): runs it and returns true where it applies.
template <typename T>
bool forward_sm90(const ForwardProblem<T>& p, int groups, Stream stream);
// The architecture the kernels launch for (conv_sm90.cuh).
inline int launch_arch();

inline bool use_tf32(bool allow_tf32) { return allow_tf32 && launch_arch() >= 80; }

template <typename T>
void forward(const Shape& s, const void* x, const void* w, const Prologue& pro, const Epilogue& epi,
             void* y, float* stats, Stream stream, bool tf32) {
  ForwardProblem<T> p;
  p.geo = geometry(s);
  p.rows = s.batch * s.out_height * s.out_width;
  p.cols = p.geo.cout_g;
  p.depth = s.kernel_h * s.kernel_w * p.geo.cin_g;
  p.by_cin_g = Divmod(static_cast<int>(p.geo.cin_g));
  p.by_kw = Divmod(p.geo.KW);
  p.x = static_cast<const T*>(x);
  p.w = static_cast<const T*>(w);
  p.prologue = PrologueView<T>{pro.scale, pro.shift, static_cast<int>(pro.activation)};
  p.bias = epi.bias;
  p.out_scale = epi.scale;
  p.out_shift = epi.shift;
  p.residual = static_cast<const T*>(epi.residual);
  p.out_activation = static_cast<int>(epi.activation);
  p.y = static_cast<T*>(y);
  p.stats = stats;
  if (forward_sm90<T>(p, s.groups, stream)) return;
  launch_gemm_with_prologue<T>(p, tf32, forward_runs<T>(p.geo, x, w, y, epi.residual), s.groups, 1, p.depth,
                               stream);
}

// At stride 1, d loss / d x[ih] = sum over taps k of grad[ih + p - k d] w[k]: the forward
// convolution of grad with the taps reversed (k' = K - 1 - k) and padding d (K - 1) - p, its
// input and output channels swapped within each group. With 16-bit types and channels per group
// of grad a multiple of 8, it replaces the mma.sync input gradient where that forward is the
// sm_90 wgmma kernel, and elsewhere where the input channels per group are not a multiple of 8:
// the input gradient would then read both operands element by element, the forward reads grad
// and the rewritten weight along its depth in 16-byte runs (a narrow column tile for a few
// input channels, as the stem's 3) and writes only its result element by element.
template <typename T>
bool input_grad_as_forward(const Shape& s) {
  return !std::is_same<T, float>::value && s.stride_h == 1 && s.stride_w == 1 &&
         s.pad_top <= s.dilation_h * (s.kernel_h - 1) && s.pad_left <= s.dilation_w * (s.kernel_w - 1) &&
         (s.out_channels / s.groups) % 8 == 0 && (launch_arch() == 90 || (s.in_channels / s.groups) % 8 != 0);
}

inline Shape input_grad_forward_shape(const Shape& s) {
  Shape t = s;
  t.in_channels = s.out_channels;
  t.height = s.out_height;
  t.width = s.out_width;
  t.out_channels = s.in_channels;
  t.out_height = s.height;
  t.out_width = s.width;
  t.pad_top = static_cast<int>(s.dilation_h * (s.kernel_h - 1) - s.pad_top);
  t.pad_left = static_cast<int>(s.dilation_w * (s.kernel_w - 1) - s.pad_left);
  return t;
}

// w_t (C_in, KH, KW, C_out/groups) = w (C_out, KH, KW, C_in/groups) with the taps reversed and
// the channels swapped within each group: the forward weight of input_grad_forward_shape.
template <typename T>
__global__ void reversed_swapped_weight_kernel(const T* w, T* w_t, Geometry geo, index_t total) {
  const index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const index_t co = i % geo.cout_g, tap_and_c = i / geo.cout_g;
  const int kw = static_cast<int>(tap_and_c % geo.KW), kh = static_cast<int>(tap_and_c / geo.KW % geo.KH);
  const index_t c = tap_and_c / geo.KW / geo.KH, g = c / geo.cin_g;
  const index_t source_row = (g * geo.cout_g + co) * geo.KH + (geo.KH - 1 - kh);
  w_t[i] = w[(source_row * geo.KW + (geo.KW - 1 - kw)) * geo.cin_g + (c - g * geo.cin_g)];
}

template <typename T>
void input_grad(const Shape& s, const void* grad, const void* w, void* grad_input, void* workspace,
                Stream stream, bool tf32) {
  if constexpr (!std::is_same<T, float>::value) {
    if (workspace != nullptr && input_grad_as_forward<T>(s) && aligned16(grad) && aligned16(workspace)) {
      const Geometry geo = geometry(s);
      const index_t total = s.in_channels * s.kernel_h * s.kernel_w * geo.cout_g;
      constexpr int kRewriteThreads = 256;
      launch(reversed_swapped_weight_kernel<T>, dim3(static_cast<unsigned>(ceil_div(total, kRewriteThreads))),
             dim3(kRewriteThreads), 0, stream, static_cast<const T*>(w), static_cast<T*>(workspace), geo, total);
      forward<T>(input_grad_forward_shape(s), grad, workspace, Prologue{nullptr, nullptr, Activation::kNone},
                 Epilogue{nullptr, nullptr, nullptr, nullptr, Activation::kNone}, grad_input, nullptr, stream,
                 false);
      return;
    }
  }
  InputGradProblem<T> p;
  p.geo = geometry(s);
  p.batch = s.batch;
  // The grid covers the largest phase (the one starting at row and column 0); rows and depth
  // become the block's phase's in bind().
  p.rows = s.batch * ceil_div(s.height, s.stride_h) * ceil_div(s.width, s.stride_w);
  p.cols = p.geo.cin_g;
  p.depth = s.kernel_h * s.kernel_w * p.geo.cout_g;
  p.by_cout_g = Divmod(static_cast<int>(p.geo.cout_g));
  p.groups = s.groups;
  p.grad = static_cast<const T*>(grad);
  p.w = static_cast<const T*>(w);
  p.grad_input = static_cast<T*>(grad_input);
  const Runs vectorized = vectorizable<T>(p.geo, {grad, w, grad_input});
  const index_t phases_h = std::min<index_t>(s.stride_h, s.height), phases_w = std::min<index_t>(s.stride_w, s.width);
  if (phases_h * phases_w > 0x7fffffff) throw std::invalid_argument("pk::conv: too many stride phases");
  const int phases = static_cast<int>(phases_h * phases_w);
  const int phases_per_launch = std::max(1, std::min(phases, 65535 / s.groups));
  for (p.phase_first = 0; p.phase_first < phases; p.phase_first += phases_per_launch) {
    const int count = std::min(phases_per_launch, phases - p.phase_first);
    launch_gemm_on<T>(p, tf32, vectorized, index_t(count) * s.groups, 1, p.depth, stream);
  }
}

// Slabs after the first start at multiples of kBlockK; a slab whose range is empty writes zeros.
inline index_t split_length(index_t depth, index_t splits) {
  return ceil_div(ceil_div(depth, splits), kBlockK) * kBlockK;
}

template <typename T>
void weight_grad(const Shape& s, const void* grad, const void* x, const Prologue& pro, float* partials,
                 int splits, Stream stream, bool tf32) {
  if (splits < 1) throw std::invalid_argument("pk::conv: weight_grad needs splits >= 1");
  WeightGradProblem<T> p;
  p.geo = geometry(s);
  p.rows = p.geo.cout_g;
  p.cols = s.kernel_h * s.kernel_w * p.geo.cin_g;
  p.depth = s.batch * s.out_height * s.out_width;
  p.by_ow = Divmod(p.geo.OW);
  p.by_oh = Divmod(p.geo.OH);
  p.grad = static_cast<const T*>(grad);
  p.x = static_cast<const T*>(x);
  p.prologue = PrologueView<T>{pro.scale, pro.shift, static_cast<int>(pro.activation)};
  p.partials = partials;
  launch_gemm_with_prologue<T>(p, tf32, vectorizable<T>(p.geo, {grad, x, partials}), s.groups, splits,
                               split_length(p.depth, splits), stream);
}

}  // namespace detail

std::int64_t forward_row_tiles(const Shape& s) {
  return detail::ceil_div(s.batch * s.out_height * s.out_width, detail::kBlockM);
}

std::int64_t forward_rows_per_tile() { return detail::kBlockM; }

int weight_grad_splits(const Shape& s) {
  // Enough blocks to fill a large GPU twice over, while every slab keeps >= 8 depth steps.
  constexpr detail::index_t kTargetBlocks = 264, kMaxSplits = 64;
  const detail::index_t blocks = detail::ceil_div(s.out_channels / s.groups, detail::kBlockM) *
                                 detail::ceil_div(s.kernel_h * s.kernel_w * (s.in_channels / s.groups),
                                                  detail::kBlockN) * s.groups;
  const detail::index_t depth = s.batch * s.out_height * s.out_width;
  detail::index_t splits = detail::ceil_div(kTargetBlocks, blocks);
  const detail::index_t most = depth / (8 * detail::kBlockK);
  if (splits > most) splits = most;
  if (splits > kMaxSplits) splits = kMaxSplits;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

#define PK_CONV_DISPATCH(dtype, T, ...)                                              \
  switch (dtype) {                                                                   \
    case ScalarType::kFloat32: { using T = float; __VA_ARGS__; break; }              \
    case ScalarType::kFloat16: { using T = ::pk::half; __VA_ARGS__; break; }         \
    case ScalarType::kBFloat16: { using T = ::pk::bfloat16; __VA_ARGS__; break; }    \
    default: throw std::invalid_argument("pk::conv: unsupported dtype");             \
  }

void forward(ScalarType dtype, const Shape& s, const void* x, const void* w, const Prologue& pro,
             const Epilogue& epi, void* y, float* stats, Stream stream, bool tf32) {
  detail::check_shape(s);
  PK_CONV_DISPATCH(dtype, T, detail::forward<T>(s, x, w, pro, epi, y, stats, stream, tf32));
}

std::int64_t input_grad_workspace_bytes(ScalarType dtype, const Shape& s) {
  detail::check_shape(s);
  std::int64_t bytes = 0;
  PK_CONV_DISPATCH(dtype, T, if (detail::input_grad_as_forward<T>(s)) bytes = s.in_channels * s.kernel_h *
                   s.kernel_w * (s.out_channels / s.groups) * static_cast<std::int64_t>(sizeof(T)));
  return bytes;
}

void input_grad(ScalarType dtype, const Shape& s, const void* grad, const void* w, void* grad_input,
                Stream stream, void* workspace, bool tf32) {
  detail::check_shape(s);
  PK_CONV_DISPATCH(dtype, T, detail::input_grad<T>(s, grad, w, grad_input, workspace, stream, tf32));
}

void weight_grad(ScalarType dtype, const Shape& s, const void* grad, const void* x, const Prologue& pro,
                 float* partials, int splits, Stream stream, bool tf32) {
  detail::check_shape(s);
  PK_CONV_DISPATCH(dtype, T, detail::weight_grad<T>(s, grad, x, pro, partials, splits, stream, tf32));
}

#undef PK_CONV_DISPATCH

}  // namespace conv
}  // namespace pk

#include "conv_sm90.cuh"  // defines forward_sm90
