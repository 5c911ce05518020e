// SPDX-License-Identifier: Apache-2.0
// Launchers of the batch-norm kernels: raw pointers, sizes and a stream; no torch.
// Defined by batch_norm.cuh, compiled by csrc/cuda/batch_norm.cu (nvcc) and
// csrc/simt/batch_norm.cpp (the emulator). Semantics: packed_kernels/ops/batch_norm.py.
//
// Every activation is seen as (rows, C, S) with offsets r*stride_row + c*stride_c + s:
//   NCHW (contiguous)      rows = N,     S = H*W, stride_row = C*S, stride_c = S
//   channels_last / NHWC   rows = N*H*W, S = 1,   stride_row = C,   stride_c = 1
// x, residual, out, grad, output and the input/residual gradients share that layout. Per-channel
// vectors (weight, bias, running and batch statistics, weight/bias gradients) are fp32; any
// optional one may be null.
#pragma once

#include <cstdint>

#include "scalar_type.h"

namespace pk {
namespace batch_norm {

struct Layout {
  std::int64_t rows, channels, spatial, stride_row, stride_c;
};

// fp32 elements of the scratch buffer that forward (training) and backward need for their
// per-split partial statistics, on the current device (it depends on the number of SMs).
std::int64_t workspace_floats(ScalarType dtype, const Layout& layout);

// out = relu?((x - mean) * invstd * weight + bias + residual). Training: mean/invstd from the
// batch, and batch_mean, batch_var (unbiased) and batch_invstd are written; eval: from
// running_mean/running_var. `workspace` holds workspace_floats() fp32 (training only).
void forward(ScalarType dtype, const Layout& layout, const void* x, const void* residual,
             const float* running_mean, const float* running_var, const float* weight,
             const float* bias, bool training, float eps, bool relu, void* out, float* batch_mean,
             float* batch_var, float* batch_invstd, float* workspace, Stream stream);

// With g = grad masked by output > 0 (relu) and x_hat = (x - mean) * invstd:
//   grad_weight = sum g x_hat, grad_bias = sum g, grad_residual = g (when non-null),
//   grad_input = weight invstd (g - [training] (sum g + x_hat sum g x_hat) / count).
// grad_weight and grad_bias are required (the elementwise pass reads the sums from them);
// `workspace` holds workspace_floats() fp32.
void backward(ScalarType dtype, const Layout& layout, const void* grad, const void* x,
              const void* output, const float* mean, const float* invstd, const float* weight,
              bool training, bool relu, void* grad_input, float* grad_weight, float* grad_bias,
              void* grad_residual, float* workspace, Stream stream);

}  // namespace batch_norm
}  // namespace pk
