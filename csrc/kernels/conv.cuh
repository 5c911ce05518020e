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
// A block computes a 64x64 tile over K slices of 32: a 64x32 slice of A and a 32x64 slice of B
// are staged in shared memory (padding taps, tails and out-of-range rows as zero; row/column
// coordinates decoded once and depth coordinates once per slice into shared memory), then
//   half/bfloat16: 4 warps, each 32x32 of 16x16x16 tensor-core tiles (pk/tile.h), fp32 accumulators;
//   float:         FMA, each thread 8x4 outputs.
// Staging: 16-bit operands with channels per group a multiple of 8 go through a 3-stage cp.async
// pipeline (pk/async_copy.h; 16-byte copies into tiles stored the way memory is contiguous, one
// barrier per slice, a prologue applied by each thread to its own copies after its wait); fp32
// or other channel counts stage each slice through registers (16-byte loads where the channels
// per group allow, scalar otherwise).
// The accumulators go through shared memory to the epilogue, which writes coalesced along the
// contiguous dimension (channels, NHWC) and, in the forward, adds bias, reduces the channel
// statistics of the tile (sum and M2 about the tile mean; deterministic: one partial per row
// tile) and applies the epilogue.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "conv.h"
#include "pk/async_copy.h"
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
constexpr int kLdC = kBlockN + 4;  // the fp32 accumulator tile's row stride
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

// Each problem decodes its indices once: a row's and a column's coordinates per block (RowInfo,
// ColInfo) and a depth step's per K-slice (DepthInfo), kept in shared memory, so the element
// loads in the main loop do no integer division.

template <typename T>
struct ForwardProblem {
  static constexpr bool kAAlongDepth = true;  // which of A's dimensions is contiguous in memory
  static constexpr bool kBAlongDepth = true;
  struct RowInfo {  // output pixel: its image's first pixel, its top-left input coordinate, itself
    index_t image;
    int h, w;
    index_t pixel;
  };
  struct DepthInfo {  // tap offset and input channel within the group
    int dh, dw, c;
  };
  struct ColInfo {};
  Geometry geo;
  index_t rows, cols, depth;
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

  PK_DEVICE RowInfo row_info(index_t m) const {
    const index_t pixels = index_t(geo.OH) * geo.OW;
    const index_t n = m / pixels;
    const int rem = static_cast<int>(m - n * pixels);
    return RowInfo{n * geo.H * geo.W, (rem / geo.OW) * geo.stride_h - geo.pad_h,
                   (rem % geo.OW) * geo.stride_w - geo.pad_w, m};
  }
  PK_DEVICE DepthInfo depth_info(index_t k) const {
    const int tap = static_cast<int>(k / geo.cin_g);
    return DepthInfo{(tap / geo.KW) * geo.dil_h, (tap % geo.KW) * geo.dil_w,
                     static_cast<int>(k - index_t(tap) * geo.cin_g)};
  }
  PK_DEVICE ColInfo col_info(index_t) const { return ColInfo{}; }

  static constexpr bool kPrologue = true;  // may have one
  PK_HOST_DEVICE bool has_prologue() const { return !prologue.identity(); }
  PK_DEVICE const T* a_base() const { return x; }
  PK_DEVICE const T* b_base() const { return w; }
  // Where A's and B's runs start in memory; nullptr for a padding tap (zeros).
  PK_DEVICE const T* a_source(int g, const RowInfo& r, const DepthInfo& d) const {
    const int ih = r.h + d.dh, iw = r.w + d.dw;
    const bool inside = ih >= 0 && ih < geo.H && iw >= 0 && iw < geo.W;
    return inside ? x + (r.image + index_t(ih) * geo.W + iw) * geo.C_in + g * geo.cin_g + d.c : nullptr;
  }
  PK_DEVICE const T* b_source(int g, index_t k, const DepthInfo&, index_t col, const ColInfo&) const {
    return w + (g * geo.cout_g + col) * depth + k;
  }
  // The prologue on a run of A as loaded (padding taps stay zero); false where it changes nothing.
  template <int V>
  PK_DEVICE bool prologue_a(int g, const RowInfo& r, const DepthInfo& d, T (&run)[V]) const {
    if (prologue.identity() || a_source(g, r, d) == nullptr) return false;
#pragma unroll
    for (int j = 0; j < V; ++j) run[j] = prologue.apply(run[j], g * geo.cin_g + d.c + j);
    return true;
  }
  template <int V>
  PK_DEVICE bool prologue_b(int, index_t, const DepthInfo&, index_t, const ColInfo&, T (&)[V]) const {
    return false;
  }
  // A run of V elements along depth: V channels of one tap (cin_g % V == 0).
  template <int V>
  PK_DEVICE void a(int g, const RowInfo& r, const DepthInfo& d, T (&out)[V]) const {
    load_run<V>(a_source(g, r, d), out);
    prologue_a<V>(g, r, d, out);
  }
  template <int V>  // along depth
  PK_DEVICE void b(int g, index_t k, const DepthInfo& d, index_t col, const ColInfo& c, T (&out)[V]) const {
    load_run<V>(b_source(g, k, d, col, c), out);
  }
  PK_DEVICE float pre_epilogue(int g, index_t col, float acc) const {
    return bias != nullptr ? acc + bias[g * geo.cout_g + col] : acc;
  }
  PK_DEVICE int bind(unsigned z) { return static_cast<int>(z); }
  PK_DEVICE void store(int g, int /*split*/, const RowInfo& r, index_t col, float acc) const {
    const index_t m = r.pixel, co = g * geo.cout_g + col;
    float v = pre_epilogue(g, col, acc);
    if (out_scale != nullptr) v *= out_scale[co];
    if (out_shift != nullptr) v += out_shift[co];
    if (residual != nullptr) v += to_float(residual[m * geo.C_out + co]);
    y[m * geo.C_out + co] = from_float<T>(activate(v, out_activation));
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
  static constexpr bool kAAlongDepth = true;
  static constexpr bool kBAlongDepth = false;
  struct RowInfo {  // input pixel: its image's first output pixel, the output coordinate it
    index_t image;  // reads through the phase's first tap, and its own index
    int h, w;
    index_t pixel;
  };
  struct DepthInfo {  // output offset of the tap, the tap, output channel within the group
    int dh, dw, tap, co;
  };
  struct ColInfo {};
  Geometry geo;
  index_t rows, cols, depth;
  index_t batch;
  int groups, phase_first;  // blockIdx.z = (phase - phase_first) * groups + g,
                            // phase = first row * min(stride_w, W) + first column
  Phase1D ph, pw;
  const T* grad;
  const T* w;
  T* grad_input;
  float* stats;  // unused: no statistics here

  PK_DEVICE int bind(unsigned z) {
    const int phase = phase_first + static_cast<int>(z) / groups, phases_w = geo.stride_w < geo.W ? geo.stride_w : geo.W;
    ph = phase_1d(phase / phases_w, geo.H, geo.pad_h, geo.KH, geo.dil_h, geo.stride_h);
    pw = phase_1d(phase % phases_w, geo.W, geo.pad_w, geo.KW, geo.dil_w, geo.stride_w);
    rows = batch * ph.count * pw.count;
    depth = index_t(ph.taps) * pw.taps * geo.cout_g;
    return static_cast<int>(z) % groups;
  }
  PK_DEVICE RowInfo row_info(index_t m) const {
    const index_t pixels = index_t(ph.count) * pw.count;
    const index_t n = m / pixels;
    const int rem = static_cast<int>(m - n * pixels);
    const int i = rem / pw.count, j = rem % pw.count;
    return RowInfo{n * geo.OH * geo.OW, i + ph.out_offset, j + pw.out_offset,
                   (n * geo.H + ph.first + i * geo.stride_h) * geo.W + pw.first + j * geo.stride_w};
  }
  PK_DEVICE DepthInfo depth_info(index_t k) const {
    const int t = static_cast<int>(k / geo.cout_g);
    const int th = t / pw.taps, tw = t - th * pw.taps;
    return DepthInfo{th * ph.out_step, tw * pw.out_step,
                     (ph.tap + th * ph.tap_step) * geo.KW + pw.tap + tw * pw.tap_step,
                     static_cast<int>(k - index_t(t) * geo.cout_g)};
  }
  PK_DEVICE ColInfo col_info(index_t) const { return ColInfo{}; }

  static constexpr bool kPrologue = false;
  PK_DEVICE const T* a_base() const { return grad; }
  PK_DEVICE const T* b_base() const { return w; }
  PK_DEVICE const T* a_source(int g, const RowInfo& r, const DepthInfo& d) const {
    const int oh = r.h - d.dh, ow = r.w - d.dw;
    if (oh < 0 || ow < 0 || oh >= geo.OH || ow >= geo.OW) return nullptr;
    return grad + (r.image + index_t(oh) * geo.OW + ow) * geo.C_out + g * geo.cout_g + d.co;
  }
  template <int V>  // along depth: V output channels of one tap (cout_g % V == 0)
  PK_DEVICE void a(int g, const RowInfo& r, const DepthInfo& d, T (&out)[V]) const {
    load_run<V>(a_source(g, r, d), out);
  }
  PK_DEVICE const T* b_source(int g, index_t, const DepthInfo& d, index_t col, const ColInfo&) const {
    return w + ((g * geo.cout_g + d.co) * geo.KH * geo.KW + d.tap) * geo.cin_g + col;
  }
  template <int V>  // along columns (input channels)
  PK_DEVICE void b(int g, index_t k, const DepthInfo& d, index_t col, const ColInfo& c, T (&out)[V]) const {
    load_run<V>(b_source(g, k, d, col, c), out);
  }
  PK_DEVICE float pre_epilogue(int, index_t, float acc) const { return acc; }
  PK_DEVICE void store(int g, int /*split*/, const RowInfo& r, index_t col, float acc) const {
    grad_input[r.pixel * geo.C_in + g * geo.cin_g + col] = from_float<T>(acc);
  }
};

template <typename T>
struct WeightGradProblem {
  static constexpr bool kAAlongDepth = false;
  static constexpr bool kBAlongDepth = false;
  struct RowInfo {
    index_t co;
  };
  struct DepthInfo {  // output pixel p: its image's first input pixel, its top-left input coordinate
    index_t p, image;
    int h, w;
  };
  struct ColInfo {  // tap offset and input channel within the group
    int dh, dw, c;
  };
  Geometry geo;
  index_t rows, cols, depth;
  const T* grad;
  const T* x;
  PrologueView<T> prologue;
  float* partials;
  float* stats;  // unused

  PK_DEVICE RowInfo row_info(index_t co) const { return RowInfo{co}; }
  PK_DEVICE DepthInfo depth_info(index_t p) const {
    const index_t pixels = index_t(geo.OH) * geo.OW;
    const index_t n = p / pixels;
    const int rem = static_cast<int>(p - n * pixels);
    return DepthInfo{p, n * geo.H * geo.W, (rem / geo.OW) * geo.stride_h - geo.pad_h,
                     (rem % geo.OW) * geo.stride_w - geo.pad_w};
  }
  PK_DEVICE ColInfo col_info(index_t col) const {
    const int tap = static_cast<int>(col / geo.cin_g);
    return ColInfo{(tap / geo.KW) * geo.dil_h, (tap % geo.KW) * geo.dil_w,
                   static_cast<int>(col - index_t(tap) * geo.cin_g)};
  }

  static constexpr bool kPrologue = true;  // may have one
  PK_HOST_DEVICE bool has_prologue() const { return !prologue.identity(); }
  PK_DEVICE const T* a_base() const { return grad; }
  PK_DEVICE const T* b_base() const { return x; }
  PK_DEVICE const T* a_source(int g, const RowInfo& r, const DepthInfo& d) const {
    return grad + d.p * geo.C_out + g * geo.cout_g + r.co;
  }
  PK_DEVICE const T* b_source(int g, index_t, const DepthInfo& d, index_t, const ColInfo& c) const {
    const int ih = d.h + c.dh, iw = d.w + c.dw;
    const bool inside = ih >= 0 && ih < geo.H && iw >= 0 && iw < geo.W;
    return inside ? x + (d.image + index_t(ih) * geo.W + iw) * geo.C_in + g * geo.cin_g + c.c : nullptr;
  }
  template <int V>
  PK_DEVICE bool prologue_a(int, const RowInfo&, const DepthInfo&, T (&)[V]) const {
    return false;
  }
  // The prologue on a run of B as loaded (padding taps stay zero); false where it changes nothing.
  template <int V>
  PK_DEVICE bool prologue_b(int g, index_t k, const DepthInfo& d, index_t col, const ColInfo& c, T (&run)[V]) const {
    if (prologue.identity() || b_source(g, k, d, col, c) == nullptr) return false;
#pragma unroll
    for (int j = 0; j < V; ++j) run[j] = prologue.apply(run[j], g * geo.cin_g + c.c + j);
    return true;
  }
  template <int V>  // along rows (output channels)
  PK_DEVICE void a(int g, const RowInfo& r, const DepthInfo& d, T (&out)[V]) const {
    load_run<V>(a_source(g, r, d), out);
  }
  template <int V>  // along columns: V input channels of one tap (cin_g % V == 0)
  PK_DEVICE void b(int g, index_t k, const DepthInfo& d, index_t col, const ColInfo& c, T (&out)[V]) const {
    load_run<V>(b_source(g, k, d, col, c), out);
    prologue_b<V>(g, k, d, col, c, out);
  }
  PK_DEVICE float pre_epilogue(int, index_t, float acc) const { return acc; }
  PK_DEVICE int bind(unsigned z) { return static_cast<int>(z); }
  PK_DEVICE void store(int g, int split, const RowInfo& r, index_t col, float acc) const {
    const index_t co = r.co;
    partials[((index_t(split) * geo.C_out) + g * geo.cout_g + co) * cols + col] = acc;
  }
};

// A staged operand tile in shared memory: A is kBlockM rows x kBlockK depth, B kBlockK depth x
// kBlockN columns; `i` is A's row or B's column. 16-bit tiles are stored contiguous along the
// dimension that is contiguous in memory, so a run of 16 bytes is one copy (cp.async's unit) and
// wmma reads the tile in the matching layout; fp32 tiles are stored the way the FMA loop reads
// them without bank conflicts (A row-major, B depth-major). Rows are padded by 8 elements: 16-bit
// rows stay a multiple of 8 elements (wmma's leading-dimension rule), every 16-row fragment
// stays 32-byte aligned, and rows start on other banks.
template <bool kDepthContiguous, int kExtent>
struct TileLayout {
  static constexpr bool kAlongDepth = kDepthContiguous;
  static constexpr int kLd = kDepthContiguous ? kBlockK + 8 : kExtent + 8;
  static constexpr int kElements = (kDepthContiguous ? kExtent : kBlockK) * kLd;
  PK_HOST_DEVICE static constexpr int at(int i, int k) { return kDepthContiguous ? i * kLd + k : k * kLd + i; }
};

template <typename T, typename Problem, int STAGES>
struct Tiles {
  static constexpr bool kTensorCores = !std::is_same<T, float>::value;
  using A = TileLayout<kTensorCores ? Problem::kAAlongDepth : true, kBlockM>;
  using B = TileLayout<kTensorCores ? Problem::kBAlongDepth : false, kBlockN>;
  using FragmentA = tile::FragmentA<T, typename std::conditional<A::kAlongDepth, tile::RowMajor, tile::ColMajor>::type>;
  using FragmentB = tile::FragmentB<T, typename std::conditional<B::kAlongDepth, tile::ColMajor, tile::RowMajor>::type>;
  static constexpr int kStageElements = A::kElements + B::kElements;
  static_assert(kStageElements * sizeof(T) % 32 == 0, "every stage's tiles start 32-byte aligned");
  static constexpr std::size_t kStagingBytes = sizeof(T) * STAGES * kStageElements;
  static constexpr std::size_t kAccumulatorBytes = sizeof(float) * kBlockM * kLdC;
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

// At least 1 block per SM: with ptxas's own occupancy target the bf16 forward spilled on sm_90.
// VEC: elements per load along each operand's contiguous dimension (16 bytes, or 1); the
// launcher picks VEC > 1 only where every run of VEC stays inside one tap and is aligned.
// STAGES: 1 stages each K slice through registers (loads, prologue, store to shared memory,
// compute); > 1 (16-bit, 16-byte runs) is a cp.async pipeline that keeps STAGES - 1 slices in
// flight while the tensor cores work on the oldest. cp.async cannot transform what it copies, so
// there a prologue runs on the shared tile: each thread transforms the runs it copied itself
// between its wait (which makes its own copies visible to it) and the barrier (which publishes
// them), with no extra barrier; padding taps stay zero.
template <typename T, int VEC, int STAGES, typename Problem>
__global__ void __launch_bounds__(kThreads, 1) gemm_kernel(Problem p, index_t split_len) {
  using Config = Tiles<T, Problem, STAGES>;
  using TileA = typename Config::A;
  using TileB = typename Config::B;
  constexpr bool kTensorCores = Config::kTensorCores;
  static_assert(STAGES == 1 || (kTensorCores && VEC * sizeof(T) == 16), "cp.async moves 16-byte runs");
  const int g = p.bind(blockIdx.z);
  const index_t m0 = index_t(blockIdx.x) * kBlockM;
  if (m0 >= p.rows) return;  // the whole block: a stride phase with fewer rows than the grid has
  // wmma wants 32-byte aligned tiles: PK_SHARED declares them so. No realignment through an
  // integer here: nvcc then loses the address space and the tiles load by generic LD/ST.
  PK_SHARED(unsigned char, shared, Config::kSharedBytes);
  T* const staging = reinterpret_cast<T*>(shared);  // STAGES x (A tile, B tile)
  float* const Cs = reinterpret_cast<float*>(shared);

  const int tid = threadIdx.x;
  const index_t tiles_n = (p.cols + kBlockN - 1) / kBlockN;
  const int split = static_cast<int>(blockIdx.y / tiles_n);
  const index_t n0 = (blockIdx.y % tiles_n) * kBlockN;
  const index_t k_begin = index_t(split) * split_len;
  const index_t k_end = k_begin + split_len < p.depth ? k_begin + split_len : p.depth;
  const T zero = from_float<T>(0.0f);

  float acc[kTensorCores ? 1 : 8][kTensorCores ? 1 : 4];
  tile::Accumulator frag_acc[kTensorCores ? 2 : 1][kTensorCores ? 2 : 1];
  const int warp = tid / 32, warp_m = warp / 2, warp_n = warp % 2;  // 2x2 warps of 32x32
  if constexpr (kTensorCores) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) tile::fill(frag_acc[i][j], 0.0f);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }

  // Decoded indices: rows and columns once, depth per K slice (the pipeline decodes a slice one
  // step before it issues the slice's copies).
  PK_SHARED(typename Problem::RowInfo, row_info, kBlockM);
  PK_SHARED(typename Problem::ColInfo, col_info, kBlockN);
  // Slot ring: a slice's decoded depth is read by its issue and, with a prologue, once more after
  // its wait, STAGES - 1 steps later.
  constexpr int kSlots = STAGES > 2 ? STAGES : 2;
  PK_SHARED(typename Problem::DepthInfo, depth_info, kSlots * kBlockK);
  for (int r = tid; r < kBlockM; r += kThreads) row_info[r] = p.row_info(m0 + r);
  for (int c = tid; c < kBlockN; c += kThreads) col_info[c] = p.col_info(n0 + c);
  const index_t steps = k_end > k_begin ? (k_end - k_begin + kBlockK - 1) / kBlockK : 0;
  auto decode = [&](index_t step) {
    if (step >= steps) return;
    const index_t k0 = k_begin + step * kBlockK;
    typename Problem::DepthInfo* const slot = depth_info + (step % kSlots) * kBlockK;
    for (int kk = tid; kk < kBlockK; kk += kThreads) slot[kk] = p.depth_info(k0 + kk);
  };

  // The tensor-core or FMA work on one staged slice.
  auto compute = [&](const T* As, const T* Bs) {
    if constexpr (kTensorCores) {
#pragma unroll
      for (int kk = 0; kk < kBlockK; kk += tile::kK) {
        typename Config::FragmentA a[2];
        typename Config::FragmentB b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) tile::load(a[i], As + TileA::at(warp_m * 32 + i * 16, kk), TileA::kLd);
#pragma unroll
        for (int j = 0; j < 2; ++j) tile::load(b[j], Bs + TileB::at(warp_n * 32 + j * 16, kk), TileB::kLd);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) tile::mma(frag_acc[i][j], a[i], b[j]);
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
    for (index_t step = 0; step < steps; ++step) {
      const index_t k0 = k_begin + step * kBlockK;
      const typename Problem::DepthInfo* const slot = depth_info + (step % kSlots) * kBlockK;
      decode(step);
      __syncthreads();  // the decoded indices are written and the previous step's compute is done
      // A run lies wholly inside or outside the tile's valid range (the extents are multiples of VEC).
      for (int e = tid; e < kBlockM * kBlockK / VEC; e += kThreads) {
        constexpr bool kAlong = Problem::kAAlongDepth;
        int r, kk;
        run_start<kAlong, kBlockM, VEC>(e, r, kk);
        T run[VEC];
        if (m0 + r < p.rows && k0 + kk < k_end) {
          p.template a<VEC>(g, row_info[r], slot[kk], run);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) run[j] = zero;
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) As[TileA::at(r + (kAlong ? 0 : j), kk + (kAlong ? j : 0))] = run[j];
      }
      for (int e = tid; e < kBlockK * kBlockN / VEC; e += kThreads) {
        constexpr bool kAlong = Problem::kBAlongDepth;
        int c, kk;
        run_start<kAlong, kBlockN, VEC>(e, c, kk);
        const index_t k = k0 + kk, n = n0 + c;
        T run[VEC];
        if (n < p.cols && k < k_end) {
          p.template b<VEC>(g, k, slot[kk], n, col_info[c], run);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) run[j] = zero;
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) Bs[TileB::at(c + (kAlong ? 0 : j), kk + (kAlong ? j : 0))] = run[j];
      }
      __syncthreads();
      compute(As, Bs);
      // No barrier here: the next step's first barrier comes before it overwrites the tiles, and
      // its decoded indices go to the other slot.
    }
  } else {
    // Copies of slice `step` into stage step % STAGES, from its decoded slot; out-of-range runs
    // and padding taps are zero-filled (their source is the operand's base, unread).
    auto issue = [&](index_t step) {
      if (step < steps) {
        const index_t k0 = k_begin + step * kBlockK;
        const typename Problem::DepthInfo* const slot = depth_info + (step % kSlots) * kBlockK;
        T* const As = staging + (step % STAGES) * Config::kStageElements;
        T* const Bs = As + TileA::kElements;
        static_assert(kBlockM * kBlockK / VEC % kThreads == 0 && kBlockK * kBlockN / VEC % kThreads == 0,
                      "every thread issues the same number of copies");
#pragma unroll
        for (int t = 0; t < kBlockM * kBlockK / VEC / kThreads; ++t) {
          int r, kk;
          run_start<Problem::kAAlongDepth, kBlockM, VEC>(tid + t * kThreads, r, kk);
          const T* src = m0 + r < p.rows && k0 + kk < k_end ? p.a_source(g, row_info[r], slot[kk]) : nullptr;
          async_copy_16(As + TileA::at(r, kk), src != nullptr ? src : p.a_base(), src != nullptr);
        }
#pragma unroll
        for (int t = 0; t < kBlockK * kBlockN / VEC / kThreads; ++t) {
          int c, kk;
          run_start<Problem::kBAlongDepth, kBlockN, VEC>(tid + t * kThreads, c, kk);
          const index_t k = k0 + kk, n = n0 + c;
          const T* src = n < p.cols && k < k_end ? p.b_source(g, k, slot[kk], n, col_info[c]) : nullptr;
          async_copy_16(Bs + TileB::at(c, kk), src != nullptr ? src : p.b_base(), src != nullptr);
        }
      }
      async_commit();  // one group per step, empty past the end: the wait below counts steps
    };
    // Prologue: slices 0 .. STAGES-2 in flight, slice STAGES-1 decoded.
    for (int s = 0; s < STAGES - 1; ++s) {
      decode(s);
      __syncthreads();  // slice s decoded; slice s - 2 (same slot) issued by every thread
      issue(s);
    }
    // The prologue on the runs this thread copied for slice `step` (the same runs issue() took).
    auto transform_own = [&](index_t step) {
      if constexpr (Problem::kPrologue) {
        const index_t k0 = k_begin + step * kBlockK;
        const typename Problem::DepthInfo* const slot = depth_info + (step % kSlots) * kBlockK;
        T* const As = staging + (step % STAGES) * Config::kStageElements;
        T* const Bs = As + TileA::kElements;
#pragma unroll
        for (int t = 0; t < kBlockM * kBlockK / VEC / kThreads; ++t) {
          int r, kk;
          run_start<Problem::kAAlongDepth, kBlockM, VEC>(tid + t * kThreads, r, kk);
          if (m0 + r >= p.rows || k0 + kk >= k_end) continue;
          Vec<T, VEC>* const run = reinterpret_cast<Vec<T, VEC>*>(As + TileA::at(r, kk));
          Vec<T, VEC> v = *run;
          if (p.template prologue_a<VEC>(g, row_info[r], slot[kk], v.v)) *run = v;
        }
#pragma unroll
        for (int t = 0; t < kBlockK * kBlockN / VEC / kThreads; ++t) {
          int c, kk;
          run_start<Problem::kBAlongDepth, kBlockN, VEC>(tid + t * kThreads, c, kk);
          const index_t k = k0 + kk, n = n0 + c;
          if (n >= p.cols || k >= k_end) continue;
          Vec<T, VEC>* const run = reinterpret_cast<Vec<T, VEC>*>(Bs + TileB::at(c, kk));
          Vec<T, VEC> v = *run;
          if (p.template prologue_b<VEC>(g, k, slot[kk], n, col_info[c], v.v)) *run = v;
        }
      }
    };
    bool with_prologue = false;
    if constexpr (Problem::kPrologue) with_prologue = p.has_prologue();
    decode(STAGES - 1);
    for (index_t step = 0; step < steps; ++step) {
      async_wait<STAGES - 2>();  // this thread's copies of slice `step` have landed
      if (with_prologue) transform_own(step);
      // Every thread's copies of slice `step` landed (and are transformed), every thread is done
      // computing step - 1 (whose stage the next issue overwrites), slice step + STAGES - 1 is decoded.
      __syncthreads();
      issue(step + STAGES - 1);
      // Its slot (step's, in a ring of STAGES) was last read by transform_own(step), above the barrier.
      decode(step + STAGES);
      const T* const As = staging + (step % STAGES) * Config::kStageElements;
      compute(As, As + TileA::kElements);
    }
    async_wait<0>();  // only empty groups are left; the accumulators overwrite the stages next
  }
  __syncthreads();  // every compute is done before the accumulators overwrite the staging tiles

  // The accumulators go to shared memory, over the staging tiles.
  if constexpr (kTensorCores) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        tile::store(Cs + (warp_m * 32 + i * 16) * kLdC + warp_n * 32 + j * 16, frag_acc[i][j], kLdC);
  } else {
    const int ty = tid / 16, tx = tid % 16;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Cs[(ty + 8 * i) * kLdC + tx + 16 * j] = acc[i][j];
  }
  __syncthreads();

  if (p.stats != nullptr) {
    // Forward only: per column of this row tile, the sum of y and its M2 about the tile's own
    // mean (two passes over the tile in shared memory: no cancellation when |mean| >> std).
    // One thread per column; the caller merges the tiles with Chan's formula.
    const index_t valid_rows = p.rows - m0 < kBlockM ? p.rows - m0 : kBlockM;
    for (int c = tid; c < kBlockN; c += kThreads) {
      const index_t n = n0 + c;
      if (n >= p.cols) continue;
      float sum = 0.0f;
      for (int r = 0; r < valid_rows; ++r) sum += p.pre_epilogue(g, n, Cs[r * kLdC + c]);
      const float mean = sum / static_cast<float>(valid_rows);
      float m2 = 0.0f;
      for (int r = 0; r < valid_rows; ++r) {
        const float d = p.pre_epilogue(g, n, Cs[r * kLdC + c]) - mean;
        m2 = fmaf(d, d, m2);
      }
      float* const out = p.stats + index_t(blockIdx.x) * 2 * p.geo.C_out + g * p.geo.cout_g + n;
      out[0] = sum;
      out[p.geo.C_out] = m2;
    }
  }
  for (int e = tid; e < kBlockM * kBlockN; e += kThreads) {
    const int r = e / kBlockN, c = e % kBlockN;  // along the output's contiguous dimension
    const index_t m = m0 + r, n = n0 + c;
    if (m < p.rows && n < p.cols) p.store(g, split, row_info[r], n, Cs[r * kLdC + c]);
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
                  s.height < (1 << 30) && s.width < (1 << 30);
  if (!ok) throw std::invalid_argument("pk::conv: invalid convolution shape");
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

// 16-byte runs where both group widths are multiples of the run (so a run never crosses a tap,
// a group or a tile edge) and the operands the main loop reads are 16-byte aligned.
template <typename T>
bool vectorizable(const Geometry& geo, const void* first, const void* second) {
  constexpr int kVec = kVec16<T>;
  return geo.cin_g % kVec == 0 && geo.cout_g % kVec == 0 && aligned16(first) && aligned16(second);
}

template <typename T, typename Problem>
void launch_gemm(const Problem& p, bool vectorized, index_t grid_z, index_t splits, index_t split_len,
                 Stream stream) {
  const index_t tiles_m = ceil_div(p.rows, kBlockM), tiles_n = ceil_div(p.cols, kBlockN);
  if (tiles_m > 0x7fffffff || tiles_n * splits > 65535 || grid_z > 65535)
    throw std::invalid_argument("pk::conv: the problem exceeds the launch grid");
  const dim3 grid(static_cast<unsigned>(tiles_m), static_cast<unsigned>(tiles_n * splits),
                  static_cast<unsigned>(grid_z));
  constexpr int kVec = kVec16<T>;
  if (!vectorized) {
    launch(gemm_kernel<T, 1, 1, Problem>, grid, dim3(kThreads), 0, stream, p, split_len);
  } else if constexpr (std::is_same<T, float>::value) {  // FMA: register-staged
    launch(gemm_kernel<T, kVec, 1, Problem>, grid, dim3(kThreads), 0, stream, p, split_len);
  } else {
    launch(gemm_kernel<T, kVec, kAsyncStages, Problem>, grid, dim3(kThreads), 0, stream, p, split_len);
  }
}

template <typename T>
void forward(const Shape& s, const void* x, const void* w, const Prologue& pro, const Epilogue& epi,
             void* y, float* stats, Stream stream) {
  ForwardProblem<T> p;
  p.geo = geometry(s);
  p.rows = s.batch * s.out_height * s.out_width;
  p.cols = p.geo.cout_g;
  p.depth = s.kernel_h * s.kernel_w * p.geo.cin_g;
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
  launch_gemm<T>(p, vectorizable<T>(p.geo, x, w), s.groups, 1, p.depth, stream);
}

template <typename T>
void input_grad(const Shape& s, const void* grad, const void* w, void* grad_input, Stream stream) {
  InputGradProblem<T> p;
  p.geo = geometry(s);
  p.batch = s.batch;
  // The grid covers the largest phase (the one starting at row and column 0); rows and depth
  // become the block's phase's in bind().
  p.rows = s.batch * ceil_div(s.height, s.stride_h) * ceil_div(s.width, s.stride_w);
  p.cols = p.geo.cin_g;
  p.depth = s.kernel_h * s.kernel_w * p.geo.cout_g;
  p.groups = s.groups;
  p.grad = static_cast<const T*>(grad);
  p.w = static_cast<const T*>(w);
  p.grad_input = static_cast<T*>(grad_input);
  p.stats = nullptr;
  const bool vectorized = vectorizable<T>(p.geo, grad, w);
  const index_t phases_h = std::min<index_t>(s.stride_h, s.height), phases_w = std::min<index_t>(s.stride_w, s.width);
  if (phases_h * phases_w > 0x7fffffff) throw std::invalid_argument("pk::conv: too many stride phases");
  const int phases = static_cast<int>(phases_h * phases_w);
  const int phases_per_launch = std::max(1, std::min(phases, 65535 / s.groups));
  for (p.phase_first = 0; p.phase_first < phases; p.phase_first += phases_per_launch) {
    const int count = std::min(phases_per_launch, phases - p.phase_first);
    launch_gemm<T>(p, vectorized, index_t(count) * s.groups, 1, p.depth, stream);
  }
}

// Slabs after the first start at multiples of kBlockK; a slab whose range is empty writes zeros.
inline index_t split_length(index_t depth, index_t splits) {
  return ceil_div(ceil_div(depth, splits), kBlockK) * kBlockK;
}

template <typename T>
void weight_grad(const Shape& s, const void* grad, const void* x, const Prologue& pro, float* partials,
                 int splits, Stream stream) {
  if (splits < 1) throw std::invalid_argument("pk::conv: weight_grad needs splits >= 1");
  WeightGradProblem<T> p;
  p.geo = geometry(s);
  p.rows = p.geo.cout_g;
  p.cols = s.kernel_h * s.kernel_w * p.geo.cin_g;
  p.depth = s.batch * s.out_height * s.out_width;
  p.grad = static_cast<const T*>(grad);
  p.x = static_cast<const T*>(x);
  p.prologue = PrologueView<T>{pro.scale, pro.shift, static_cast<int>(pro.activation)};
  p.partials = partials;
  p.stats = nullptr;
  launch_gemm<T>(p, vectorizable<T>(p.geo, grad, x), s.groups, splits, split_length(p.depth, splits),
                 stream);
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
             const Epilogue& epi, void* y, float* stats, Stream stream) {
  detail::check_shape(s);
  PK_CONV_DISPATCH(dtype, T, detail::forward<T>(s, x, w, pro, epi, y, stats, stream));
}

void input_grad(ScalarType dtype, const Shape& s, const void* grad, const void* w, void* grad_input,
                Stream stream) {
  detail::check_shape(s);
  PK_CONV_DISPATCH(dtype, T, detail::input_grad<T>(s, grad, w, grad_input, stream));
}

void weight_grad(ScalarType dtype, const Shape& s, const void* grad, const void* x, const Prologue& pro,
                 float* partials, int splits, Stream stream) {
  detail::check_shape(s);
  PK_CONV_DISPATCH(dtype, T, detail::weight_grad<T>(s, grad, x, pro, partials, splits, stream));
}

#undef PK_CONV_DISPATCH

}  // namespace conv
}  // namespace pk
