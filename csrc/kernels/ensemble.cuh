// SPDX-License-Identifier: Apache-2.0
// Ensemble reduction kernels, one block per output row (b, s). Written once for nvcc and the
// SIMT emulator (pk/simt.h). Semantics and gradients: packed_kernels/ops/ensemble.py.
//
// Each estimator's softmax statistics come from an online pass over its classes (running max,
// sum of exp, and a weighted sum, merged across threads by rescaling); a second pass over the
// classes produces the outputs. Loads are 16-byte vectors when the row is contiguous and aligned.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "ensemble.h"
#include "pk/reduce.h"
#include "pk/simt.h"
#include "pk/types.h"
#include "pk/vec.h"

namespace pk {
namespace ensemble {
namespace detail {

using index_t = long long;
constexpr int kMaxThreads = 512;
// Two resident blocks per SM (<= 64 registers a thread): measured spill-free for every kernel
// here, where ptxas's own choice for 512 threads spilled in scores_backward.
constexpr int kMinBlocksPerSM = 2;
// Dynamic shared memory of scores_backward: a launch gets 48 KiB of static + dynamic without an
// opt-in, and the kernel's static arrays (per-estimator lse/entropy/dot, reduction scratch) take
// about 2 KiB of it.
constexpr std::size_t kScoresBackwardSharedBytes = 44 * 1024;

// Online softmax statistics of one estimator row: sum = sum_c exp(x_c - max),
// dot = sum_c exp(x_c - max) * w_c, argmax = the first class holding the max.
struct RowStats {
  float max;
  float sum;
  float dot;
  int argmax;
};

PK_DEVICE RowStats empty_stats() { return RowStats{-INFINITY, 0.0f, 0.0f, INT_MAX}; }

template <bool kWithDot, int VEC>
PK_DEVICE void add_chunk(RowStats& s, const float (&x)[VEC], const float (&w)[VEC], int first_class) {
  float chunk_max = x[0];
  int chunk_arg = 0;
#pragma unroll
  for (int i = 1; i < VEC; ++i)
    if (x[i] > chunk_max) {
      chunk_max = x[i];
      chunk_arg = i;
    }
  if (chunk_max == -INFINITY) {  // nothing to add; keeps exp(-inf - -inf) out
    if (s.argmax == INT_MAX) s.argmax = first_class;
    return;
  }
  if (chunk_max > s.max) {
    const float scale = expf(s.max - chunk_max);  // 0 for the first chunk
    s.sum *= scale;
    if (kWithDot) s.dot *= scale;
    s.max = chunk_max;
    s.argmax = first_class + chunk_arg;
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float e = expf(x[i] - s.max);
    s.sum += e;
    if (kWithDot && e != 0.0f) s.dot += e * w[i];  // a masked class (x = -inf): 0 log 0 = 0
  }
}

struct MergeStats {
  PK_DEVICE RowStats operator()(RowStats a, RowStats b) const {
    if (a.max == b.max)
      return RowStats{a.max, a.sum + b.sum, a.dot + b.dot, a.argmax < b.argmax ? a.argmax : b.argmax};
    if (b.max > a.max) {
      const RowStats t = a;
      a = b;
      b = t;
    }
    const float scale = expf(b.max - a.max);
    return RowStats{a.max, a.sum + b.sum * scale, a.dot + b.dot * scale, a.argmax};
  }
};

// A maximum and the first index holding it (torch.argmax's tie rule).
struct ArgMax {
  float value;
  int index;
};
PK_DEVICE ArgMax argmax_merge(const ArgMax& a, const ArgMax& b) {
  if (a.value > b.value) return a;
  if (b.value > a.value) return b;
  return a.index < b.index ? a : b;
}

// The statistics of estimator row `x` (classes at stride S), reduced over the block.
template <bool kWithDot, int VEC, typename T>
PK_DEVICE RowStats row_stats(const T* x, const T* w, int C, index_t S, RowStats* scratch) {
  RowStats s = empty_stats();
  for (int k = threadIdx.x; k < C / VEC; k += blockDim.x) {
    float v[VEC], wv[VEC];
    load_chunk<VEC>(x, k, S, v);
    if (kWithDot) {
      if (w == x) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) wv[i] = v[i];
      } else {
        load_chunk<VEC>(w, k, S, wv);
      }
    }
    add_chunk<kWithDot>(s, v, wv, k * VEC);
  }
  return block_allreduce(s, MergeStats(), scratch);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM)
    mean_forward_kernel(const T* __restrict__ logits, T* __restrict__ out, int M, index_t B, int C,
                        index_t S, float inv_m) {
  PK_SHARED(float, lse, kMaxEstimators);
  PK_SHARED(RowStats, scratch, kMaxWarps);
  const index_t row = blockIdx.x;
  const index_t offset = (row / S) * C * S + row % S;
  const index_t estimator_stride = B * C * S;
  for (int m = 0; m < M; ++m) {
    const T* x = logits + m * estimator_stride + offset;
    const RowStats s = row_stats<false, VEC>(x, x, C, S, scratch);
    if (threadIdx.x == 0) lse[m] = s.max + logf(s.sum);
  }
  __syncthreads();
  for (int k = threadIdx.x; k < C / VEC; k += blockDim.x) {
    float acc[VEC] = {};
    for (int m = 0; m < M; ++m) {
      float v[VEC];
      load_chunk<VEC>(logits + m * estimator_stride + offset, k, S, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += expf(v[i] - lse[m]);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] *= inv_m;
    store_chunk<VEC>(out + offset, k, S, acc);
  }
}

// dx_mj = p_mj (g_j - sum_c g_c p_mc) / M
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM)
    mean_backward_kernel(const T* __restrict__ grad, const T* __restrict__ logits,
                         T* __restrict__ grad_logits, int M, index_t B, int C, index_t S, float inv_m) {
  PK_SHARED(float, lse, kMaxEstimators);
  PK_SHARED(float, dot, kMaxEstimators);
  PK_SHARED(RowStats, scratch, kMaxWarps);
  const index_t row = blockIdx.x;
  const index_t offset = (row / S) * C * S + row % S;
  const index_t estimator_stride = B * C * S;
  const T* g = grad + offset;
  for (int m = 0; m < M; ++m) {
    const RowStats s = row_stats<true, VEC>(logits + m * estimator_stride + offset, g, C, S, scratch);
    if (threadIdx.x == 0) {
      lse[m] = s.max + logf(s.sum);
      dot[m] = __fdividef(s.dot, s.sum);
    }
  }
  __syncthreads();
  for (int k = threadIdx.x; k < C / VEC; k += blockDim.x) {
    float gv[VEC];
    load_chunk<VEC>(g, k, S, gv);
    for (int m = 0; m < M; ++m) {
      float v[VEC];
      load_chunk<VEC>(logits + m * estimator_stride + offset, k, S, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] = expf(v[i] - lse[m]) * (gv[i] - dot[m]) * inv_m;
      store_chunk<VEC>(grad_logits + m * estimator_stride + offset, k, S, v);
    }
  }
}

// The larger of two values, NaN if either is (torch's amax; fmaxf drops NaN).
PK_DEVICE float nan_max(float a, float b) { return a != a ? a : (b != b ? b : fmaxf(a, b)); }

struct Summary {
  float entropy;
  float msp;
  float max_logit;
};
struct MergeSummary {
  PK_DEVICE Summary operator()(const Summary& a, const Summary& b) const {
    return Summary{a.entropy + b.entropy, nan_max(a.msp, b.msp), nan_max(a.max_logit, b.max_logit)};
  }
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM)
    scores_forward_kernel(const T* __restrict__ logits, T* __restrict__ probs, T* __restrict__ msp_out,
                          T* __restrict__ max_logit_out, T* __restrict__ entropy_out,
                          T* __restrict__ mi_out, T* __restrict__ vr_out, int M, index_t B, int C,
                          float inv_m) {
  PK_SHARED(float, lse, kMaxEstimators);
  PK_SHARED(float, estimator_entropy, kMaxEstimators);
  PK_SHARED(int, vote, kMaxEstimators);
  PK_SHARED(RowStats, scratch, kMaxWarps);
  PK_SHARED(Summary, summary_scratch, kMaxWarps);
  const index_t row = blockIdx.x;
  const index_t offset = row * C;
  const index_t estimator_stride = B * C;
  for (int m = 0; m < M; ++m) {
    const T* x = logits + m * estimator_stride + offset;
    const RowStats s = row_stats<true, VEC>(x, x, C, 1, scratch);
    if (threadIdx.x == 0) {
      lse[m] = s.max + logf(s.sum);
      estimator_entropy[m] = lse[m] - __fdividef(s.dot, s.sum);  // H = lse - E_p[x]
      vote[m] = s.argmax;
    }
  }
  __syncthreads();
  Summary summary{0.0f, 0.0f, -INFINITY};
  for (int k = threadIdx.x; k < C / VEC; k += blockDim.x) {
    float q[VEC] = {}, mean_x[VEC] = {};
    for (int m = 0; m < M; ++m) {
      float v[VEC];
      load_chunk<VEC>(logits + m * estimator_stride + offset, k, 1, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        q[i] += expf(v[i] - lse[m]);
        mean_x[i] += v[i];
      }
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      q[i] *= inv_m;
      mean_x[i] *= inv_m;
      summary.msp = nan_max(summary.msp, q[i]);
      summary.max_logit = nan_max(summary.max_logit, mean_x[i]);
      if (q[i] != 0.0f) summary.entropy -= q[i] * logf(q[i]);  // 0 log 0 = 0; NaN stays
    }
    store_chunk<VEC>(probs + offset, k, 1, q);
  }
  summary = block_allreduce(summary, MergeSummary(), summary_scratch);
  if (threadIdx.x == 0) {
    float mean_entropy = 0.0f;
    int modal_votes = 0;
    for (int m = 0; m < M; ++m) {
      mean_entropy += estimator_entropy[m];
      int votes = 0;
      for (int j = 0; j < M; ++j) votes += vote[j] == vote[m];
      modal_votes = votes > modal_votes ? votes : modal_votes;
    }
    msp_out[row] = from_float<T>(summary.msp);
    max_logit_out[row] = from_float<T>(summary.max_logit);
    entropy_out[row] = from_float<T>(summary.entropy);
    mi_out[row] = from_float<T>(summary.entropy - mean_entropy * inv_m);
    vr_out[row] = from_float<T>(1.0f - float(modal_votes) * inv_m);
  }
}

struct BestPair {
  ArgMax q;       // the modal class of the mean prediction
  ArgMax mean_x;  // the class of the largest estimator-mean logit
};
struct MergeBestPair {
  PK_DEVICE BestPair operator()(const BestPair& a, const BestPair& b) const {
    return BestPair{argmax_merge(a.q, b.q), argmax_merge(a.mean_x, b.mean_x)};
  }
};

// With p_m = softmax(x_m), q = mean_m p_m, G_c = g_probs_c - (g_H + g_MI) log q_c + g_msp [c = argmax q]:
//   dx_mj = p_mj (G_j - sum_c G_c p_mc) / M + g_max_logit / M [j = argmax_c mean_m x_mc]
//         + g_MI / M * p_mj (x_mj - lse_m + H_m)
// Needs M * blockDim.x floats of dynamic shared memory: each thread's share of sum_c G_c p_mc.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM)
    scores_backward_kernel(const T* __restrict__ grad_probs, const T* __restrict__ grad_msp,
                           const T* __restrict__ grad_max_logit, const T* __restrict__ grad_entropy,
                           const T* __restrict__ grad_mi, const T* __restrict__ logits,
                           T* __restrict__ grad_logits, int M, index_t B, int C, float inv_m) {
  PK_SHARED(float, lse, kMaxEstimators);
  PK_SHARED(float, estimator_entropy, kMaxEstimators);
  PK_SHARED(float, dot, kMaxEstimators);
  PK_SHARED(RowStats, scratch, kMaxWarps);
  PK_SHARED(BestPair, best_scratch, kMaxWarps);
  PK_DYNAMIC_SHARED(float, partial_dot);  // [M][blockDim.x]
  const index_t row = blockIdx.x;
  const index_t offset = row * C;
  const index_t estimator_stride = B * C;
  const int threads = blockDim.x;
  const int tid = threadIdx.x;
  const float g_msp = to_float(grad_msp[row]);
  const float g_max_logit = to_float(grad_max_logit[row]);
  const float g_mi = to_float(grad_mi[row]);
  const float g_log_q = to_float(grad_entropy[row]) + g_mi;  // coefficient of -log q
  const T* g = grad_probs + offset;

  for (int m = 0; m < M; ++m) {
    const T* x = logits + m * estimator_stride + offset;
    const RowStats s = row_stats<true, VEC>(x, x, C, 1, scratch);
    if (tid == 0) {
      lse[m] = s.max + logf(s.sum);
      estimator_entropy[m] = lse[m] - __fdividef(s.dot, s.sum);
    }
  }
  __syncthreads();

  for (int m = 0; m < M; ++m) partial_dot[m * threads + tid] = 0.0f;
  BestPair best{ArgMax{-INFINITY, INT_MAX}, ArgMax{-INFINITY, INT_MAX}};
  for (int k = tid; k < C / VEC; k += threads) {
    float gv[VEC], q[VEC] = {}, mean_x[VEC] = {};
    load_chunk<VEC>(g, k, 1, gv);
    for (int m = 0; m < M; ++m) {
      float v[VEC];
      load_chunk<VEC>(logits + m * estimator_stride + offset, k, 1, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        q[i] += expf(v[i] - lse[m]);
        mean_x[i] += v[i];
      }
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      q[i] *= inv_m;
      mean_x[i] *= inv_m;
      best = MergeBestPair()(best, BestPair{ArgMax{q[i], k * VEC + i}, ArgMax{mean_x[i], k * VEC + i}});
      gv[i] -= g_log_q * (q[i] != 0.0f ? logf(q[i]) : 0.0f);
    }
    for (int m = 0; m < M; ++m) {
      float v[VEC];
      load_chunk<VEC>(logits + m * estimator_stride + offset, k, 1, v);
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum += expf(v[i] - lse[m]) * gv[i];
      partial_dot[m * threads + tid] += sum;
    }
  }
  best = block_allreduce(best, MergeBestPair(), best_scratch);  // its barriers publish partial_dot

  const int lane = tid % kWarpSize;
  for (int m = tid / kWarpSize; m < M; m += threads / kWarpSize) {
    float sum = 0.0f;
    for (int t = lane; t < threads; t += kWarpSize) sum += partial_dot[m * threads + t];
    sum = warp_allreduce(sum, Sum());
    if (lane == 0) {
      const float x_at_best = to_float(logits[m * estimator_stride + offset + best.q.index]);
      dot[m] = sum + g_msp * expf(x_at_best - lse[m]);
    }
  }
  __syncthreads();

  for (int k = tid; k < C / VEC; k += threads) {
    float gv[VEC], q[VEC] = {};
    load_chunk<VEC>(g, k, 1, gv);
    for (int m = 0; m < M; ++m) {
      float v[VEC];
      load_chunk<VEC>(logits + m * estimator_stride + offset, k, 1, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) q[i] += expf(v[i] - lse[m]);
    }
    float big_g[VEC], max_logit_term[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      q[i] *= inv_m;
      const int c = k * VEC + i;
      big_g[i] = gv[i] - g_log_q * (q[i] != 0.0f ? logf(q[i]) : 0.0f) + (c == best.q.index ? g_msp : 0.0f);
      max_logit_term[i] = c == best.mean_x.index ? g_max_logit * inv_m : 0.0f;
    }
    for (int m = 0; m < M; ++m) {
      float v[VEC];
      load_chunk<VEC>(logits + m * estimator_stride + offset, k, 1, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float p = expf(v[i] - lse[m]);
        const float p_log_p = p != 0.0f ? p * (v[i] - lse[m] + estimator_entropy[m]) : 0.0f;
        v[i] = p * (big_g[i] - dot[m]) * inv_m + max_logit_term[i] + g_mi * inv_m * p_log_p;
      }
      store_chunk<VEC>(grad_logits + m * estimator_stride + offset, k, 1, v);
    }
  }
}

// --- launchers -------------------------------------------------------------------------------

inline int threads_for(index_t C, int vec, int cap = kMaxThreads) {
  const index_t work = (C + vec - 1) / vec;
  index_t threads = (work + kWarpSize - 1) / kWarpSize * kWarpSize;
  if (threads > cap) threads = cap;
  return static_cast<int>(threads < kWarpSize ? kWarpSize : threads);
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

inline void check_sizes(std::int64_t M, std::int64_t B, std::int64_t C, std::int64_t S) {
  if (M < 1 || M > kMaxEstimators)
    throw std::invalid_argument("ensemble kernels support 1 to " + std::to_string(kMaxEstimators) +
                                " estimators, got " + std::to_string(M));
  if (B < 1 || C < 1 || S < 1 || C > INT_MAX || B * S > INT_MAX)
    throw std::invalid_argument("ensemble kernels: unsupported sizes");
}

template <typename T>
void mean_forward(const T* x, T* out, int M, index_t B, int C, index_t S, Stream stream) {
  constexpr int V = kVec16<T>;
  const dim3 grid(static_cast<unsigned>(B * S));
  if (S == 1 && C % V == 0 && aligned16(x) && aligned16(out))
    launch(mean_forward_kernel<T, V>, grid, dim3(threads_for(C, V)), 0, stream, x, out, M, B, C, S, 1.0f / M);
  else
    launch(mean_forward_kernel<T, 1>, grid, dim3(threads_for(C, 1)), 0, stream, x, out, M, B, C, S, 1.0f / M);
}

template <typename T>
void mean_backward(const T* g, const T* x, T* gx, int M, index_t B, int C, index_t S, Stream stream) {
  constexpr int V = kVec16<T>;
  const dim3 grid(static_cast<unsigned>(B * S));
  if (S == 1 && C % V == 0 && aligned16(g) && aligned16(x) && aligned16(gx))
    launch(mean_backward_kernel<T, V>, grid, dim3(threads_for(C, V)), 0, stream, g, x, gx, M, B, C, S, 1.0f / M);
  else
    launch(mean_backward_kernel<T, 1>, grid, dim3(threads_for(C, 1)), 0, stream, g, x, gx, M, B, C, S, 1.0f / M);
}

template <typename T>
void scores_forward(const T* x, T* probs, T* msp, T* max_logit, T* entropy, T* mi, T* vr, int M,
                    index_t B, int C, Stream stream) {
  constexpr int V = kVec16<T>;
  const dim3 grid(static_cast<unsigned>(B));
  if (C % V == 0 && aligned16(x) && aligned16(probs))
    launch(scores_forward_kernel<T, V>, grid, dim3(threads_for(C, V)), 0, stream, x, probs, msp,
           max_logit, entropy, mi, vr, M, B, C, 1.0f / M);
  else
    launch(scores_forward_kernel<T, 1>, grid, dim3(threads_for(C, 1)), 0, stream, x, probs, msp,
           max_logit, entropy, mi, vr, M, B, C, 1.0f / M);
}

template <typename T>
void scores_backward(const T* g_probs, const T* g_msp, const T* g_max_logit, const T* g_entropy,
                     const T* g_mi, const T* x, T* gx, int M, index_t B, int C, Stream stream) {
  constexpr int V = kVec16<T>;
  const dim3 grid(static_cast<unsigned>(B));
  // Each thread keeps M partial sums in shared memory: bound the block by that budget.
  const int cap = static_cast<int>(kScoresBackwardSharedBytes / (sizeof(float) * M)) / kWarpSize * kWarpSize;
  const bool vec = C % V == 0 && aligned16(g_probs) && aligned16(x) && aligned16(gx);
  const int threads = threads_for(C, vec ? V : 1, cap < kMaxThreads ? cap : kMaxThreads);
  const std::size_t shared = sizeof(float) * M * threads;
  if (vec)
    launch(scores_backward_kernel<T, V>, grid, dim3(threads), shared, stream, g_probs, g_msp,
           g_max_logit, g_entropy, g_mi, x, gx, M, B, C, 1.0f / M);
  else
    launch(scores_backward_kernel<T, 1>, grid, dim3(threads), shared, stream, g_probs, g_msp,
           g_max_logit, g_entropy, g_mi, x, gx, M, B, C, 1.0f / M);
}

template <typename F>
void dispatch(ScalarType dtype, F&& f) {
  switch (dtype) {
    case ScalarType::kFloat32: return f(float{});
    case ScalarType::kFloat16: return f(half{});
    case ScalarType::kBFloat16: return f(bfloat16{});
  }
  throw std::invalid_argument("ensemble kernels support float32, float16 and bfloat16");
}

}  // namespace detail

// --- the torch-free entry points (ensemble.h); defined once per extension ---------------------

void mean_forward(ScalarType dtype, const void* logits, void* out, std::int64_t M, std::int64_t B,
                  std::int64_t C, std::int64_t S, Stream stream) {
  detail::check_sizes(M, B, C, S);
  detail::dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    detail::mean_forward(static_cast<const T*>(logits), static_cast<T*>(out), int(M), B, int(C), S, stream);
  });
}

void mean_backward(ScalarType dtype, const void* grad, const void* logits, void* grad_logits,
                   std::int64_t M, std::int64_t B, std::int64_t C, std::int64_t S, Stream stream) {
  detail::check_sizes(M, B, C, S);
  detail::dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    detail::mean_backward(static_cast<const T*>(grad), static_cast<const T*>(logits),
                          static_cast<T*>(grad_logits), int(M), B, int(C), S, stream);
  });
}

void scores_forward(ScalarType dtype, const void* logits, void* probs, void* msp, void* max_logit,
                    void* entropy, void* mutual_information, void* variation_ratio, std::int64_t M,
                    std::int64_t B, std::int64_t C, Stream stream) {
  detail::check_sizes(M, B, C, 1);
  detail::dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    detail::scores_forward(static_cast<const T*>(logits), static_cast<T*>(probs), static_cast<T*>(msp),
                           static_cast<T*>(max_logit), static_cast<T*>(entropy),
                           static_cast<T*>(mutual_information), static_cast<T*>(variation_ratio),
                           int(M), B, int(C), stream);
  });
}

void scores_backward(ScalarType dtype, const void* grad_probs, const void* grad_msp,
                     const void* grad_max_logit, const void* grad_entropy,
                     const void* grad_mutual_information, const void* logits, void* grad_logits,
                     std::int64_t M, std::int64_t B, std::int64_t C, Stream stream) {
  detail::check_sizes(M, B, C, 1);
  detail::dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    detail::scores_backward(static_cast<const T*>(grad_probs), static_cast<const T*>(grad_msp),
                            static_cast<const T*>(grad_max_logit), static_cast<const T*>(grad_entropy),
                            static_cast<const T*>(grad_mutual_information),
                            static_cast<const T*>(logits), static_cast<T*>(grad_logits), int(M), B,
                            int(C), stream);
  });
}

}  // namespace ensemble
}  // namespace pk
