// Batch-norm kernels (+ residual + ReLU), one block per channel. Written once for nvcc and the
// SIMT emulator (pk/simt.h). Semantics: packed_kernels/ops/batch_norm.py; layout: batch_norm.h.
//
// Training statistics: each thread runs Welford over its share of the channel's values minus the
// channel's first value (stable for |mean| >> std, all fp32), and the threads' (count, mean, M2)
// are merged with a symmetric form of Chan's update. The block then normalises the channel it
// just reduced, so the training forward is one launch; the backward is one launch too (a
// reduction of sum g and sum g x_hat, then the elementwise gradients).
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "batch_norm.h"
#include "pk/reduce.h"
#include "pk/simt.h"
#include "pk/types.h"

namespace pk {
namespace batch_norm {
namespace detail {

using index_t = long long;
constexpr int kMaxThreads = 256;

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

// Offset of the channel's i-th value (i < rows * S) from the channel's first one.
PK_DEVICE index_t offset_of(index_t i, index_t S, index_t stride_row) { return (i / S) * stride_row + i % S; }

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    forward_kernel(const T* __restrict__ x, const T* __restrict__ residual, const float* __restrict__ running_mean,
                   const float* __restrict__ running_var, const float* __restrict__ weight,
                   const float* __restrict__ bias, T* __restrict__ out, float* __restrict__ batch_mean,
                   float* __restrict__ batch_var, float* __restrict__ batch_invstd, index_t rows, index_t S,
                   index_t stride_row, index_t stride_c, float eps, bool training, bool relu) {
  PK_SHARED(Welford, scratch, kMaxWarps);
  const int c = blockIdx.x;
  const index_t base = c * stride_c;
  const index_t count = rows * S;
  float mean, invstd;
  if (training) {
    const float shift = to_float(x[base]);
    Welford w{0.0f, 0.0f, 0.0f};
    for (index_t i = threadIdx.x; i < count; i += blockDim.x) {
      const float v = to_float(x[base + offset_of(i, S, stride_row)]) - shift;
      w.count += 1.0f;
      const float d = v - w.mean;
      w.mean += d / w.count;
      w.m2 += d * (v - w.mean);
    }
    w = block_allreduce(w, MergeWelford(), scratch);
    const float biased = w.m2 / float(count);
    mean = shift + w.mean;
    invstd = rsqrtf(biased + eps);
    if (threadIdx.x == 0) {
      batch_mean[c] = mean;
      batch_var[c] = w.m2 / float(count - 1);
      batch_invstd[c] = invstd;
    }
  } else {
    mean = running_mean[c];
    invstd = rsqrtf(running_var[c] + eps);
  }
  const float scale = invstd * (weight ? weight[c] : 1.0f);
  const float beta = bias ? bias[c] : 0.0f;
  for (index_t i = threadIdx.x; i < count; i += blockDim.x) {
    const index_t o = base + offset_of(i, S, stride_row);
    float y = (to_float(x[o]) - mean) * scale + beta;
    if (residual) y += to_float(residual[o]);
    if (relu) y = y > 0.0f ? y : 0.0f;
    out[o] = from_float<T>(y);
  }
}

template <typename T>
PK_DEVICE float masked_grad(const T* grad, const T* output, index_t o, bool relu) {
  return relu && !(to_float(output[o]) > 0.0f) ? 0.0f : to_float(grad[o]);
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    backward_kernel(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ output,
                    const float* __restrict__ mean_in, const float* __restrict__ invstd_in,
                    const float* __restrict__ weight, T* __restrict__ grad_input, float* __restrict__ grad_weight,
                    float* __restrict__ grad_bias, T* __restrict__ grad_residual, index_t rows, index_t S,
                    index_t stride_row, index_t stride_c, bool training, bool relu) {
  PK_SHARED(GradSums, scratch, kMaxWarps);
  const int c = blockIdx.x;
  const index_t base = c * stride_c;
  const index_t count = rows * S;
  const float mean = mean_in[c];
  const float invstd = invstd_in[c];
  GradSums sums{0.0f, 0.0f};
  for (index_t i = threadIdx.x; i < count; i += blockDim.x) {
    const index_t o = base + offset_of(i, S, stride_row);
    const float g = masked_grad(grad, output, o, relu);
    sums.g += g;
    sums.g_xhat += g * (to_float(x[o]) - mean) * invstd;
  }
  sums = block_allreduce(sums, MergeGradSums(), scratch);
  if (threadIdx.x == 0) {
    grad_weight[c] = sums.g_xhat;
    grad_bias[c] = sums.g;
  }
  const float scale = invstd * (weight ? weight[c] : 1.0f);
  const float mean_g = training ? sums.g / float(count) : 0.0f;
  const float mean_g_xhat = training ? sums.g_xhat / float(count) : 0.0f;
  for (index_t i = threadIdx.x; i < count; i += blockDim.x) {
    const index_t o = base + offset_of(i, S, stride_row);
    const float g = masked_grad(grad, output, o, relu);
    const float x_hat = (to_float(x[o]) - mean) * invstd;
    grad_input[o] = from_float<T>((g - mean_g - x_hat * mean_g_xhat) * scale);
    if (grad_residual) grad_residual[o] = from_float<T>(g);
  }
}

// --- launchers -------------------------------------------------------------------------------

inline int threads_for(index_t count) {
  index_t threads = (count + kWarpSize - 1) / kWarpSize * kWarpSize;
  return static_cast<int>(threads > kMaxThreads ? kMaxThreads : threads);
}

inline void check_layout(const Layout& l) {
  if (l.rows < 1 || l.channels < 1 || l.spatial < 1 || l.channels > 0x7fffffff)
    throw std::invalid_argument("batch_norm kernels: unsupported sizes");
}

template <typename F>
void dispatch(ScalarType dtype, F&& f) {
  switch (dtype) {
    case ScalarType::kFloat32: return f(float{});
    case ScalarType::kFloat16: return f(half{});
    case ScalarType::kBFloat16: return f(bfloat16{});
  }
  throw std::invalid_argument("batch_norm kernels support float32, float16 and bfloat16");
}

}  // namespace detail

// --- the torch-free entry points (batch_norm.h); defined once per extension -------------------

void forward(ScalarType dtype, const Layout& l, const void* x, const void* residual,
             const float* running_mean, const float* running_var, const float* weight,
             const float* bias, bool training, float eps, bool relu, void* out, float* batch_mean,
             float* batch_var, float* batch_invstd, Stream stream) {
  detail::check_layout(l);
  if (training && l.rows * l.spatial < 2)
    throw std::invalid_argument("batch_norm: expected more than 1 value per channel when training");
  if (training ? !(batch_mean && batch_var && batch_invstd) : !(running_mean && running_var))
    throw std::invalid_argument("batch_norm: missing statistics buffers");
  detail::dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch(detail::forward_kernel<T>, dim3(static_cast<unsigned>(l.channels)),
           dim3(detail::threads_for(l.rows * l.spatial)), 0, stream, static_cast<const T*>(x),
           static_cast<const T*>(residual), running_mean, running_var, weight, bias, static_cast<T*>(out),
           batch_mean, batch_var, batch_invstd, l.rows, l.spatial, l.stride_row, l.stride_c, eps,
           training, relu);
  });
}

void backward(ScalarType dtype, const Layout& l, const void* grad, const void* x,
              const void* output, const float* mean, const float* invstd, const float* weight,
              bool training, bool relu, void* grad_input, float* grad_weight, float* grad_bias,
              void* grad_residual, Stream stream) {
  detail::check_layout(l);
  if (relu && !output) throw std::invalid_argument("batch_norm backward: relu needs the forward output");
  detail::dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch(detail::backward_kernel<T>, dim3(static_cast<unsigned>(l.channels)),
           dim3(detail::threads_for(l.rows * l.spatial)), 0, stream, static_cast<const T*>(grad),
           static_cast<const T*>(x), static_cast<const T*>(output), mean, invstd, weight,
           static_cast<T*>(grad_input), grad_weight, grad_bias, static_cast<T*>(grad_residual), l.rows,
           l.spatial, l.stride_row, l.stride_c, training, relu);
  });
}

}  // namespace batch_norm
}  // namespace pk
