// SPDX-License-Identifier: Apache-2.0
// Batch-norm kernels (+ residual + ReLU), written as bandwidth-bound kernels. Written once for
// nvcc and the SIMT emulator (pk/simt.h). Semantics: packed_kernels/ops/batch_norm.py; layout:
// batch_norm.h.
//
// Work split: a 2-D grid of (channel block, split of the reduction axis) CTAs, sized to one full
// wave (the kernel's resident CTAs per SM x SMs; equal splits, so no tail wave), each reading
// coalesced, 16-byte vectorised chunks (8-byte or scalar ones when the contiguous run or a
// pointer forbids them):
//   channels_last (S == 1): a CTA covers 128 bytes of consecutive channels (64 fp16 / 32 fp32)
//     and a contiguous range of rows; threads run along the channels, VEC channels each.
//   NCHW (S > 1): a CTA covers one channel and a contiguous range of its rows*S values, walked
//     as VEC-value chunks of the spatial runs (a chunk never crosses a run: S % VEC == 0).
// Training forward = three launches: per-(split, channel) partial (mean, M2) of x minus the
// channel's first value (per-thread Welford in fp32, merged across the CTA by Chan's formula,
// stable for |mean| >> std), a finalize that merges the splits per channel, and one elementwise
// pass (normalise, + residual, ReLU). Backward = partial sum g and sum g x_hat per split (g: the
// gradient behind the ReLU, masked by the saved output > 0), a finalize summing the splits into
// grad_bias/grad_weight, and one elementwise pass (grad_input, grad_residual). Eval forward is
// the elementwise pass alone. Every merge runs in a fixed order (no atomics), so results do not
// depend on CTA scheduling: two runs are bitwise equal.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "batch_norm.h"
#include "pk/reduce.h"
#include "pk/simt.h"
#include "pk/types.h"
#include "pk/vec.h"

namespace pk {
namespace batch_norm {
namespace detail {

using index_t = long long;
// Every kernel: __launch_bounds__(kThreads, 1). Without the minimum-blocks hint ptxas capped the
// channels_last backward reduction at 64-80 registers and spilled.
constexpr int kThreads = 256;
constexpr int kRowBytes = 128;       // channels_last: bytes of a row one CTA covers
constexpr int kMinPasses = 2;        // a split gives every thread at least this many chunks
constexpr int kFinalizeChannels = 32;                        // finalize: channels per CTA (x) ...
constexpr int kFinalizeLanes = kThreads / kFinalizeChannels;  // ... times lanes over the splits
// Grids are one full wave: as many CTAs as fit on the SMs at once (registers, shared memory),
// at most 2048 threads per SM (sm_80/90; 1536 on sm_86/89), which bounds the workspace.
#ifdef PK_SIMT_ENABLED
constexpr int kEmulatedMultiprocessors = 2;  // 2 x 4 CTAs: small tests still see several splits
constexpr int kMaxResidentCtas = 4;
#else
constexpr int kMaxResidentCtas = 2048 / kThreads;
#endif

template <typename T>
constexpr int kBlockChannels = kRowBytes / int(sizeof(T));

// Chunks each thread loads before using them, per stream: 32 bytes in flight (16 for 2-byte
// scalars), so that narrow chunks still keep enough bytes in flight to cover DRAM latency.
// channels_last scalars (odd C, rare) take 4: 8 needed over 120 registers there.
template <typename T, int VEC, bool kChannelsLast>
constexpr int kUnroll = VEC * int(sizeof(T)) >= 16           ? 2
                        : VEC * int(sizeof(T)) >= 8 || kChannelsLast ? 4
                                                                 : 8;

// Unsigned division by a runtime constant as a multiply-high and a shift (n < 2^31, d < 2^31):
// q = (mulhi(n, m) + n) >> s with s = ceil(log2 d), m = 2^32 (2^s - d) / d + 1.
struct FastDiv {
  unsigned divisor, multiplier, shift;
};

inline FastDiv make_fast_div(unsigned d) {
  unsigned s = 0;
  while ((1ull << s) < d) ++s;
  const unsigned long long m = ((1ull << 32) * ((1ull << s) - d)) / d + 1;
  return FastDiv{d, static_cast<unsigned>(m), s};
}

PK_DEVICE unsigned divide(unsigned n, const FastDiv& f) {
#ifdef PK_SIMT_ENABLED
  const unsigned high = static_cast<unsigned>((static_cast<unsigned long long>(n) * f.multiplier) >> 32);
#else
  const unsigned high = __umulhi(n, f.multiplier);
#endif
  return (high + n) >> f.shift;
}

// The kernels' view of the activation: see the comment at the top.
struct Geometry {
  index_t channels, spatial, stride_row;
  index_t units;      // rows (channels_last) or VEC-chunks per channel (NCHW)
  index_t per_split;  // units per split (blockIdx.y); the last split may have fewer
  FastDiv chunks_per_row;  // NCHW: S / VEC
};

// One thread's share of its CTA's work: VEC consecutive channels (channels_last) or VEC
// consecutive values of one channel (NCHW), over units first, first + step, ... < end.
template <typename T, int VEC, bool kChannelsLast>
struct Walk {
  static constexpr int kChannels = kChannelsLast ? kBlockChannels<T> : 1;  // per CTA
  static constexpr int kColumns = kChannelsLast ? kChannels / VEC : 1;     // threads along channels
  static constexpr int kRows = kThreads / kColumns;                         // threads along units
  static_assert((!kChannelsLast || kColumns * VEC == kChannels) && kRows * kColumns == kThreads, "tile shape");

  index_t base;     // offset of the thread's first channel's first value
  index_t channel;  // the thread's first channel
  index_t first, end;
  bool active;      // channels_last: the thread's channels exist
  int column, row;  // channels_last: position in the CTA's (kRows, kColumns) thread grid

  PK_DEVICE explicit Walk(const Geometry& g) {
    const index_t begin = static_cast<index_t>(blockIdx.y) * g.per_split;
    const index_t stop = begin + g.per_split;
    end = stop < g.units ? stop : g.units;
    column = static_cast<int>(threadIdx.x) % kColumns;
    row = static_cast<int>(threadIdx.x) / kColumns;
    if (kChannelsLast) {
      channel = static_cast<index_t>(blockIdx.x) * kChannels + column * VEC;
      base = channel;
    } else {
      channel = blockIdx.x;
      base = channel * g.spatial;
    }
    active = channel < g.channels;
    first = begin + row;
  }
  static constexpr int step = kRows;

  PK_DEVICE index_t offset(const Geometry& g, index_t unit) const {
    if (kChannelsLast) return base + unit * g.stride_row;
    const unsigned k = static_cast<unsigned>(unit);
    const unsigned r = divide(k, g.chunks_per_row);
    return base + static_cast<index_t>(r) * g.stride_row + static_cast<index_t>(k - r * g.chunks_per_row.divisor) * VEC;
  }
  // The channel of the thread's i-th value.
  PK_DEVICE index_t channel_of(int i) const { return kChannelsLast ? channel + i : channel; }
};

struct Welford {
  float count, mean, m2;
};

// (na ma + nb mb) / n and M2a + M2b + d^2 na nb / n are symmetric in a and b bit for bit, as
// block_allreduce's butterfly needs.
struct MergeWelford {
  PK_DEVICE Welford operator()(const Welford& a, const Welford& b) const {
    const float n = a.count + b.count;
    if (n == 0.0f) return Welford{0.0f, 0.0f, 0.0f};
    const float d = b.mean - a.mean;
    return Welford{n, (a.count * a.mean + b.count * b.mean) / n, a.m2 + b.m2 + d * d * (a.count * b.count / n)};
  }
};

struct GradSums {
  float g, g_xhat;
};
struct MergeGradSums {
  PK_DEVICE GradSums operator()(const GradSums& a, const GradSums& b) const {
    return GradSums{a.g + b.g, a.g_xhat + b.g_xhat};
  }
};

// Chunks are loaded raw (16-bit values stay packed: fewer registers while loads are in flight)
// and converted to float where they are used.
template <int VEC, typename T>
PK_DEVICE Vec<T, VEC> load_raw(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

template <int VEC, typename T>
PK_DEVICE void load(const T* p, float (&v)[VEC]) {
  load_chunk<VEC>(p, 0, 0, v);
}

template <int VEC, typename T>
PK_DEVICE void store(T* p, const float (&v)[VEC]) {
  store_chunk<VEC>(p, 0, 0, v);
}

// --- training forward: partial statistics, finalize ------------------------------------------

// The shift of a channel's sums: its first value, or 0 when that is not finite (x - inf would
// turn the other values' sums into NaN where torch's mean is inf).
PK_DEVICE float finite_shift(float first) { return fabsf(first) < INFINITY ? first : 0.0f; }

// part_mean/part_m2[split * C + c]: (mean - shift, M2) of the split's values of channel c, shift
// = the channel's first value. The split's count follows from the geometry (finalize_kernel).
template <typename T, int VEC, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads, 1)
    stats_kernel(const T* __restrict__ x, Geometry g, float* __restrict__ part_mean, float* __restrict__ part_m2) {
  using W = Walk<T, VEC, kChannelsLast>;
  const W w(g);
  constexpr int kChunks = kUnroll<T, VEC, kChannelsLast>;
  const index_t split = blockIdx.y;
  if constexpr (kChannelsLast) {
    // Per thread, over its rows, for each of its VEC channels (one shared count): the sum and
    // M2 += d^2 (n - 1) / n, d = y - the previous mean (Welford's M2). As few instructions per
    // value as Welford's mean + d / n, and a sum keeps an inf's mean inf (mean + d / n turns it
    // NaN at the next finite value; torch's mean is inf).
    float shift[VEC], count = 0.0f, sum[VEC], m2[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum[i] = m2[i] = shift[i] = 0.0f;
    if (w.active) {
      load<VEC>(x + w.base, shift);
#pragma unroll
      for (int i = 0; i < VEC; ++i) shift[i] = finite_shift(shift[i]);
      float inv_before = 0.0f;  // 1 / (count - 1): the previous mean is sum * inv_before
      for (index_t u = w.first; u < w.end; u += kChunks * W::step) {
        Vec<T, VEC> v[kChunks];
        bool ok[kChunks];
#pragma unroll
        for (int k = 0; k < kChunks; ++k) {
          ok[k] = u + k * W::step < w.end;
          if (ok[k]) v[k] = load_raw<VEC>(x + w.offset(g, u + k * W::step));
        }
#pragma unroll
        for (int k = 0; k < kChunks; ++k) {
          if (!ok[k]) continue;
          count += 1.0f;
          const float inv = 1.0f / count, weight = 1.0f - inv;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const float y = to_float(v[k].v[i]) - shift[i];
            const float d = y - sum[i] * inv_before;
            sum[i] += y;
            m2[i] += d * d * weight;
          }
          inv_before = inv;
        }
      }
    }
    float mean[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) mean[i] = count > 0.0f ? sum[i] / count : 0.0f;
    // Merge the kRows threads of each channel in a fixed order.
    PK_SHARED(float, s_mean, kThreads * VEC);
    PK_SHARED(float, s_m2, kThreads * VEC);
    PK_SHARED(float, s_count, W::kRows);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      s_mean[threadIdx.x * VEC + i] = mean[i];
      s_m2[threadIdx.x * VEC + i] = m2[i];
    }
    if (w.column == 0) s_count[w.row] = count;  // column 0 always exists
    __syncthreads();
    if (threadIdx.x < W::kChannels) {
      const int j = threadIdx.x;
      const index_t c = static_cast<index_t>(blockIdx.x) * W::kChannels + j;
      if (c < g.channels) {
        Welford acc{0.0f, 0.0f, 0.0f};
        for (int r = 0; r < W::kRows; ++r) {
          const int idx = (r * W::kColumns + j / VEC) * VEC + j % VEC;
          acc = MergeWelford()(acc, Welford{s_count[r], s_mean[idx], s_m2[idx]});
        }
        part_mean[split * g.channels + c] = acc.mean;
        part_m2[split * g.channels + c] = acc.m2;
      }
    }
  } else {
    // Per thread: Chan's merge of each chunk's own (VEC, mean, M2) into a running Welford.
    const float shift = finite_shift(to_float(x[w.base]));
    Welford acc{0.0f, 0.0f, 0.0f};
    for (index_t u = w.first; u < w.end; u += kChunks * W::step) {
      Vec<T, VEC> raw[kChunks];
      bool ok[kChunks];
#pragma unroll
      for (int k = 0; k < kChunks; ++k) {
        ok[k] = u + k * W::step < w.end;
        if (ok[k]) raw[k] = load_raw<VEC>(x + w.offset(g, u + k * W::step));
      }
#pragma unroll
      for (int k = 0; k < kChunks; ++k) {
        if (!ok[k]) continue;
        float v[VEC], sum = 0.0f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          v[i] = to_float(raw[k].v[i]) - shift;
          sum += v[i];
        }
        const float chunk_mean = sum * (1.0f / VEC);
        float chunk_m2 = 0.0f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float d = v[i] - chunk_mean;
          chunk_m2 += d * d;
        }
        const float n = acc.count + VEC;
        const float d = chunk_mean - acc.mean;
        acc.m2 += chunk_m2 + d * d * acc.count * (VEC / n);
        acc.mean = (acc.count * acc.mean + VEC * chunk_mean) / n;  // as MergeWelford: inf stays inf
        acc.count = n;
      }
    }
    PK_SHARED(Welford, scratch, kMaxWarps);
    acc = block_allreduce(acc, MergeWelford(), scratch);
    if (threadIdx.x == 0) {
      part_mean[split * g.channels + w.channel] = acc.mean;
      part_m2[split * g.channels + w.channel] = acc.m2;
    }
  }
}

// Values in split s: min(per_split, units - s * per_split) units of `unit_values` values each.
PK_DEVICE float split_count(index_t s, index_t units, index_t per_split, float unit_values) {
  const index_t left = units - s * per_split;
  return static_cast<float>(left < per_split ? left : per_split) * unit_values;
}

// One thread per (channel, lane): lane l merges splits l, l + kFinalizeLanes, ...; then the
// lanes are merged in order. Writes the batch mean, unbiased variance and invstd.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    finalize_kernel(const T* __restrict__ x, const float* __restrict__ part_mean, const float* __restrict__ part_m2,
                    index_t channels, index_t stride_c, index_t splits, index_t units, index_t per_split,
                    float unit_values, float eps, float* __restrict__ mean, float* __restrict__ var,
                    float* __restrict__ invstd) {
  const int j = threadIdx.x % kFinalizeChannels;
  const int lane = threadIdx.x / kFinalizeChannels;
  const index_t c = static_cast<index_t>(blockIdx.x) * kFinalizeChannels + j;
  Welford acc{0.0f, 0.0f, 0.0f};
  if (c < channels) {
    for (index_t s = lane; s < splits; s += kFinalizeLanes)
      acc = MergeWelford()(acc, Welford{split_count(s, units, per_split, unit_values), part_mean[s * channels + c],
                                        part_m2[s * channels + c]});
  }
  PK_SHARED(Welford, scratch, kThreads);
  scratch[threadIdx.x] = acc;
  __syncthreads();
  if (lane == 0 && c < channels) {
    for (int l = 1; l < kFinalizeLanes; ++l) acc = MergeWelford()(acc, scratch[l * kFinalizeChannels + j]);
    mean[c] = finite_shift(to_float(x[c * stride_c])) + acc.mean;
    // an infinite mean's M2 may come out inf rather than NaN; the variance is NaN, as torch's
    const bool infinite = fabsf(acc.mean) == INFINITY;
    var[c] = infinite ? NAN : acc.m2 / (acc.count - 1.0f);
    invstd[c] = infinite ? NAN : rsqrtf(acc.m2 / acc.count + eps);
  }
}

// --- forward elementwise ---------------------------------------------------------------------

// out = relu?((x - mean) * scale + beta + residual); `spread` is invstd (training) or the
// running variance (eval: spread_is_var).
template <typename T, int VEC, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads, 1)
    normalize_kernel(const T* __restrict__ x, const T* __restrict__ residual, const float* __restrict__ mean_in,
                     const float* __restrict__ spread, const float* __restrict__ weight,
                     const float* __restrict__ bias, Geometry g, bool spread_is_var, float eps, bool relu,
                     T* __restrict__ out) {
  using W = Walk<T, VEC, kChannelsLast>;
  const W w(g);
  constexpr int kChunks = kUnroll<T, VEC, kChannelsLast>;
  if (!w.active) return;  // no barriers below
  float mean[VEC], scale[VEC], beta[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const index_t c = w.channel_of(i);
    mean[i] = mean_in[c];
    const float invstd = spread_is_var ? rsqrtf(spread[c] + eps) : spread[c];
    scale[i] = invstd * (weight ? weight[c] : 1.0f);
    beta[i] = bias ? bias[c] : 0.0f;
  }
  for (index_t u = w.first; u < w.end; u += kChunks * W::step) {
    Vec<T, VEC> v[kChunks], r[kChunks];
    index_t o[kChunks];
    bool ok[kChunks];
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      ok[k] = u + k * W::step < w.end;
      o[k] = ok[k] ? w.offset(g, u + k * W::step) : 0;
      if (ok[k]) v[k] = load_raw<VEC>(x + o[k]);
      if (ok[k] && residual) r[k] = load_raw<VEC>(residual + o[k]);
    }
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      if (!ok[k]) continue;
      float y[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        // (x - mean) first: x * scale + (beta - mean * scale) cancels when |mean| >> std
        y[i] = (to_float(v[k].v[i]) - mean[i]) * scale[i] + beta[i];
        if (residual) y[i] += to_float(r[k].v[i]);
        if (relu && y[i] < 0.0f) y[i] = 0.0f;  // NaN stays NaN, as torch.relu
      }
      store<VEC>(out + o[k], y);
    }
  }
}

// --- backward --------------------------------------------------------------------------------

// The gradient behind the ReLU: 0 where the saved output is <= 0, else g (a NaN output passes
// g, as torch's relu backward does; output is read only with relu).
template <int VEC, typename T>
PK_DEVICE float masked_grad(const Vec<T, VEC>& grad, const Vec<T, VEC>& output, int i, bool relu) {
  return relu && to_float(output.v[i]) <= 0.0f ? 0.0f : to_float(grad.v[i]);
}

// part_g/part_gx[split * C + c]: sum g and sum g x_hat over the split's values of channel c.
template <typename T, int VEC, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads, 1)
    backward_reduce_kernel(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ output,
                           const float* __restrict__ mean_in, const float* __restrict__ invstd_in, Geometry g,
                           bool relu, float* __restrict__ part_g, float* __restrict__ part_gx) {
  using W = Walk<T, VEC, kChannelsLast>;
  const W w(g);
  constexpr int kChunks = kUnroll<T, VEC, kChannelsLast>;
  const index_t split = blockIdx.y;
  constexpr int kSums = kChannelsLast ? VEC : 1;  // NCHW: the VEC values share a channel
  // sum g x_hat = invstd sum g (x - mean): invstd is applied once, after the loop
  float mean[kSums], sum_g[kSums], sum_gx[kSums];
#pragma unroll
  for (int i = 0; i < kSums; ++i) {
    mean[i] = w.active ? mean_in[w.channel_of(i)] : 0.0f;
    sum_g[i] = sum_gx[i] = 0.0f;
  }
  if (w.active) {
    for (index_t u = w.first; u < w.end; u += kChunks * W::step) {
      Vec<T, VEC> gv[kChunks], yv[kChunks], xv[kChunks];
      bool ok[kChunks];
#pragma unroll
      for (int k = 0; k < kChunks; ++k) {
        ok[k] = u + k * W::step < w.end;
        if (ok[k]) {
          const index_t o = w.offset(g, u + k * W::step);
          gv[k] = load_raw<VEC>(grad + o);
          if (relu) yv[k] = load_raw<VEC>(output + o);
          xv[k] = load_raw<VEC>(x + o);
        }
      }
#pragma unroll
      for (int k = 0; k < kChunks; ++k) {
        if (!ok[k]) continue;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const int j = i % kSums;
          const float gi = masked_grad(gv[k], yv[k], i, relu);
          sum_g[j] += gi;
          sum_gx[j] += gi * (to_float(xv[k].v[i]) - mean[j]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kSums; ++i) sum_gx[i] *= invstd_in[w.channel_of(i)];
  }
  if constexpr (kChannelsLast) {
    PK_SHARED(float, s_g, kThreads * VEC);
    PK_SHARED(float, s_gx, kThreads * VEC);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      s_g[threadIdx.x * VEC + i] = sum_g[i];
      s_gx[threadIdx.x * VEC + i] = sum_gx[i];
    }
    __syncthreads();
    if (threadIdx.x < W::kChannels) {
      const int j = threadIdx.x;
      const index_t c = static_cast<index_t>(blockIdx.x) * W::kChannels + j;
      if (c < g.channels) {
        float a = 0.0f, b = 0.0f;
        for (int r = 0; r < W::kRows; ++r) {
          const int idx = (r * W::kColumns + j / VEC) * VEC + j % VEC;
          a += s_g[idx];
          b += s_gx[idx];
        }
        part_g[split * g.channels + c] = a;
        part_gx[split * g.channels + c] = b;
      }
    }
  } else {
    GradSums sums{sum_g[0], sum_gx[0]};
    PK_SHARED(GradSums, scratch, kMaxWarps);
    sums = block_allreduce(sums, MergeGradSums(), scratch);
    if (threadIdx.x == 0) {
      part_g[split * g.channels + w.channel] = sums.g;
      part_gx[split * g.channels + w.channel] = sums.g_xhat;
    }
  }
}

// grad_bias = sum over splits of part_g, grad_weight = of part_gx, in a fixed order.
__global__ void __launch_bounds__(kThreads, 1)
    backward_finalize_kernel(const float* __restrict__ part_g, const float* __restrict__ part_gx, index_t channels,
                             index_t splits, float* __restrict__ grad_weight, float* __restrict__ grad_bias) {
  const int j = threadIdx.x % kFinalizeChannels;
  const int lane = threadIdx.x / kFinalizeChannels;
  const index_t c = static_cast<index_t>(blockIdx.x) * kFinalizeChannels + j;
  GradSums acc{0.0f, 0.0f};
  if (c < channels) {
    for (index_t s = lane; s < splits; s += kFinalizeLanes) {
      acc.g += part_g[s * channels + c];
      acc.g_xhat += part_gx[s * channels + c];
    }
  }
  PK_SHARED(GradSums, scratch, kThreads);
  scratch[threadIdx.x] = acc;
  __syncthreads();
  if (lane == 0 && c < channels) {
    for (int l = 1; l < kFinalizeLanes; ++l) acc = MergeGradSums()(acc, scratch[l * kFinalizeChannels + j]);
    grad_bias[c] = acc.g;
    grad_weight[c] = acc.g_xhat;
  }
}

// grad_input = scale (g - [training] (sum_g + x_hat sum_gx) / count), grad_residual = g.
template <typename T, int VEC, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads, 1)
    backward_elementwise_kernel(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ output,
                                const float* __restrict__ mean_in, const float* __restrict__ invstd_in,
                                const float* __restrict__ weight, const float* __restrict__ sum_g_in,
                                const float* __restrict__ sum_gx_in, Geometry g, float inv_count, bool training,
                                bool relu, T* __restrict__ grad_input, T* __restrict__ grad_residual) {
  using W = Walk<T, VEC, kChannelsLast>;
  const W w(g);
  constexpr int kChunks = kUnroll<T, VEC, kChannelsLast>;
  if (!w.active) return;  // no barriers below
  // grad_input = scale (g - mean_g) - (x - mean) * k,  k = scale invstd mean(g x_hat)
  float mean[VEC], scale[VEC], mean_g[VEC], k_x[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const index_t c = w.channel_of(i);
    const float invstd = invstd_in[c];
    mean[i] = mean_in[c];
    scale[i] = invstd * (weight ? weight[c] : 1.0f);
    mean_g[i] = training ? sum_g_in[c] * inv_count : 0.0f;
    k_x[i] = training ? scale[i] * invstd * (sum_gx_in[c] * inv_count) : 0.0f;
  }
  for (index_t u = w.first; u < w.end; u += kChunks * W::step) {
    Vec<T, VEC> gv[kChunks], yv[kChunks], xv[kChunks];
    index_t o[kChunks];
    bool ok[kChunks];
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      ok[k] = u + k * W::step < w.end;
      o[k] = ok[k] ? w.offset(g, u + k * W::step) : 0;
      if (ok[k]) gv[k] = load_raw<VEC>(grad + o[k]);
      if (ok[k] && relu) yv[k] = load_raw<VEC>(output + o[k]);
      if (ok[k] && training) xv[k] = load_raw<VEC>(x + o[k]);
    }
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      if (!ok[k]) continue;
      float gk[VEC], dx[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        gk[i] = masked_grad(gv[k], yv[k], i, relu);
        dx[i] = training ? scale[i] * (gk[i] - mean_g[i]) - (to_float(xv[k].v[i]) - mean[i]) * k_x[i]
                         : scale[i] * gk[i];
      }
      if (grad_residual) store<VEC>(grad_residual + o[k], gk);
      store<VEC>(grad_input + o[k], dx);
    }
  }
}

// --- launchers -------------------------------------------------------------------------------

inline index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }

inline int multiprocessors() {
#ifdef PK_SIMT_ENABLED
  return kEmulatedMultiprocessors;
#else
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count < 1)
    throw std::runtime_error("batch_norm kernels: cannot query the number of multiprocessors");
  return count;
#endif
}

// CTAs of kKernel (kThreads each) resident on one SM at once; cached per device.
template <auto kKernel>
int resident_ctas() {
#ifdef PK_SIMT_ENABLED
  return kMaxResidentCtas;
#else
  constexpr int kCachedDevices = 64;
  static std::atomic<int> cached[kCachedDevices];  // static storage: zero (not yet known)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) throw std::runtime_error("batch_norm kernels: no current device");
  const bool cacheable = device >= 0 && device < kCachedDevices;
  if (cacheable) {
    const int known = cached[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int count = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&count, kKernel, kThreads, 0) != cudaSuccess || count < 1)
    throw std::runtime_error("batch_norm kernels: cannot query the kernels' occupancy");
  count = count < kMaxResidentCtas ? count : kMaxResidentCtas;
  if (cacheable) cached[device].store(count, std::memory_order_relaxed);
  return count;
#endif
}

inline void check_layout(const Layout& l) {
  if (l.rows < 1 || l.channels < 1 || l.spatial < 1)
    throw std::invalid_argument("batch_norm kernels: unsupported sizes");
  if (l.spatial == 1 ? !(l.stride_c == 1 && l.stride_row == l.channels)
                     : !(l.stride_c == l.spatial && l.stride_row == l.channels * l.spatial))
    throw std::invalid_argument("batch_norm kernels: expected a contiguous or channels_last layout");
  // NCHW chunks are indexed in 32 bits per channel (FastDiv).
  if (l.spatial > 1 && l.rows * l.spatial >= (index_t(1) << 31))
    throw std::invalid_argument("batch_norm kernels: more than 2^31 - 1 values per channel");
}

template <typename T>
index_t channel_blocks(const Layout& l) {
  return l.spatial == 1 ? ceil_div(l.channels, kBlockChannels<T>) : l.channels;
}

// The most splits a reduction grid uses (the workspace holds 2 x splits x C partials).
template <typename T>
index_t max_reduce_splits(const Layout& l) {
  const index_t target = index_t(kMaxResidentCtas) * multiprocessors();
  const index_t splits = ceil_div(target, channel_blocks<T>(l));
  return splits > 1 ? splits : 1;
}

struct Plan {
  dim3 grid;
  Geometry geometry;
  index_t splits;
};

// Splits of the reduction axis: ctas_per_sm CTAs per SM over all channel blocks (one wave), each
// split at least kMinPasses chunks per thread; the splits' sizes differ by at most the last one.
template <typename T, int VEC, bool kChannelsLast>
Plan make_plan(const Layout& l, int ctas_per_sm) {
  using W = Walk<T, VEC, kChannelsLast>;
  const index_t blocks = channel_blocks<T>(l);
  const index_t units = kChannelsLast ? l.rows : l.rows * l.spatial / VEC;
  index_t splits = ceil_div(index_t(ctas_per_sm) * multiprocessors(), blocks);
  const index_t most = ceil_div(units, index_t(kMinPasses) * W::kRows);
  splits = splits < most ? splits : most;
  splits = splits > 1 ? splits : 1;
  const index_t per_split = ceil_div(units, splits);
  splits = ceil_div(units, per_split);
  if (blocks > 0x7fffffff || splits > 65535) throw std::invalid_argument("batch_norm kernels: grid too large");
  Plan p;
  p.grid = dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
  p.splits = splits;
  p.geometry = Geometry{l.channels, l.spatial, l.stride_row, units, per_split,
                        make_fast_div(kChannelsLast ? 1u : static_cast<unsigned>(l.spatial / VEC))};
  return p;
}

template <typename F>
void dispatch_dtype(ScalarType dtype, F&& f) {
  switch (dtype) {
    case ScalarType::kFloat32: return f(float{});
    case ScalarType::kFloat16: return f(half{});
    case ScalarType::kBFloat16: return f(bfloat16{});
  }
  throw std::invalid_argument("batch_norm kernels support float32, float16 and bfloat16");
}

// True when chunks of `vec` elements never cross the contiguous run (C or S) and every pointer
// is aligned to a chunk.
template <typename T>
bool chunks_fit(const Layout& l, std::initializer_list<const void*> pointers, int vec) {
  const index_t run = l.spatial == 1 ? l.channels : l.spatial;
  bool fit = run % vec == 0;
  for (const void* p : pointers) fit = fit && reinterpret_cast<std::uintptr_t>(p) % (vec * sizeof(T)) == 0;
  return fit;
}

template <int VEC, typename F>
void with_layout(const Layout& l, F&& f) {
  if (l.spatial == 1) return f(std::integral_constant<int, VEC>{}, std::true_type{});
  return f(std::integral_constant<int, VEC>{}, std::false_type{});
}

// Calls f(integral_constant<int, VEC>, integral_constant<bool, channels_last>): 16-byte chunks
// where they fit, else 8-byte ones (e.g. 14x14 fp16 maps), else scalars.
template <typename T, typename F>
void dispatch_shape(const Layout& l, std::initializer_list<const void*> pointers, F&& f) {
  constexpr int kWide = kVec16<T>, kNarrow = kVec16<T> / 2;
  if (chunks_fit<T>(l, pointers, kWide)) return with_layout<kWide>(l, f);
  if (chunks_fit<T>(l, pointers, kNarrow)) return with_layout<kNarrow>(l, f);
  return with_layout<1>(l, f);
}

}  // namespace detail

// --- the torch-free entry points (batch_norm.h); defined once per extension -------------------

std::int64_t workspace_floats(ScalarType dtype, const Layout& l) {
  detail::check_layout(l);
  std::int64_t floats = 0;
  detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    floats = 2 * detail::max_reduce_splits<T>(l) * l.channels;
  });
  return floats;
}

void forward(ScalarType dtype, const Layout& l, const void* x, const void* residual,
             const float* running_mean, const float* running_var, const float* weight,
             const float* bias, bool training, float eps, bool relu, void* out, float* batch_mean,
             float* batch_var, float* batch_invstd, float* workspace, Stream stream) {
  detail::check_layout(l);
  if (training && l.rows * l.spatial < 2)
    throw std::invalid_argument("batch_norm: expected more than 1 value per channel when training");
  if (training ? !(batch_mean && batch_var && batch_invstd && workspace) : !(running_mean && running_var))
    throw std::invalid_argument("batch_norm: missing statistics buffers");
  detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    detail::dispatch_shape<T>(l, {x, residual, out}, [&](auto vec, auto channels_last) {
      constexpr int VEC = decltype(vec)::value;
      constexpr bool CL = decltype(channels_last)::value;
      const T* xt = static_cast<const T*>(x);
      if (training) {
        const detail::Plan p =
            detail::make_plan<T, VEC, CL>(l, detail::resident_ctas<detail::stats_kernel<T, VEC, CL>>());
        float* part_mean = workspace;
        float* part_m2 = workspace + p.splits * l.channels;
        launch(detail::stats_kernel<T, VEC, CL>, p.grid, dim3(detail::kThreads), 0, stream, xt, p.geometry,
               part_mean, part_m2);
        launch(detail::finalize_kernel<T>,
               dim3(static_cast<unsigned>(detail::ceil_div(l.channels, detail::kFinalizeChannels))),
               dim3(detail::kThreads), 0, stream, xt, static_cast<const float*>(part_mean),
               static_cast<const float*>(part_m2), l.channels, l.stride_c, p.splits, p.geometry.units,
               p.geometry.per_split, static_cast<float>(CL ? 1 : VEC), eps, batch_mean, batch_var, batch_invstd);
      }
      const detail::Plan p =
          detail::make_plan<T, VEC, CL>(l, detail::resident_ctas<detail::normalize_kernel<T, VEC, CL>>());
      launch(detail::normalize_kernel<T, VEC, CL>, p.grid, dim3(detail::kThreads), 0, stream, xt,
             static_cast<const T*>(residual), training ? static_cast<const float*>(batch_mean) : running_mean,
             training ? static_cast<const float*>(batch_invstd) : running_var, weight, bias, p.geometry,
             !training, eps, relu, static_cast<T*>(out));
    });
  });
}

void backward(ScalarType dtype, const Layout& l, const void* grad, const void* x,
              const void* output, const float* mean, const float* invstd, const float* weight,
              bool training, bool relu, void* grad_input, float* grad_weight, float* grad_bias,
              void* grad_residual, float* workspace, Stream stream) {
  detail::check_layout(l);
  if (relu && !output) throw std::invalid_argument("batch_norm backward: relu needs the forward output");
  if (!(grad_weight && grad_bias && workspace))
    throw std::invalid_argument("batch_norm backward: missing grad_weight, grad_bias or workspace");
  detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    detail::dispatch_shape<T>(l, {grad, x, output, grad_input, grad_residual}, [&](auto vec, auto channels_last) {
      constexpr int VEC = decltype(vec)::value;
      constexpr bool CL = decltype(channels_last)::value;
      const T* gt = static_cast<const T*>(grad);
      const T* xt = static_cast<const T*>(x);
      const T* yt = static_cast<const T*>(output);
      const detail::Plan r =
          detail::make_plan<T, VEC, CL>(l, detail::resident_ctas<detail::backward_reduce_kernel<T, VEC, CL>>());
      float* part_g = workspace;
      float* part_gx = workspace + r.splits * l.channels;
      launch(detail::backward_reduce_kernel<T, VEC, CL>, r.grid, dim3(detail::kThreads), 0, stream, gt, xt, yt,
             mean, invstd, r.geometry, relu, part_g, part_gx);
      launch(detail::backward_finalize_kernel,
             dim3(static_cast<unsigned>(detail::ceil_div(l.channels, detail::kFinalizeChannels))),
             dim3(detail::kThreads), 0, stream, static_cast<const float*>(part_g), static_cast<const float*>(part_gx),
             static_cast<detail::index_t>(l.channels), r.splits, grad_weight, grad_bias);
      const detail::Plan p =
          detail::make_plan<T, VEC, CL>(l, detail::resident_ctas<detail::backward_elementwise_kernel<T, VEC, CL>>());
      launch(detail::backward_elementwise_kernel<T, VEC, CL>, p.grid, dim3(detail::kThreads), 0, stream, gt, xt,
             yt, mean, invstd, weight, static_cast<const float*>(grad_bias), static_cast<const float*>(grad_weight),
             p.geometry, 1.0f / static_cast<float>(l.rows * l.spatial), training, relu,
             static_cast<T*>(grad_input), static_cast<T*>(grad_residual));
    });
  });
}

}  // namespace batch_norm
}  // namespace pk
