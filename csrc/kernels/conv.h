// SPDX-License-Identifier: Apache-2.0
// Launchers of the block-diagonal grouped 2-D convolution kernels: raw pointers, sizes and a
// stream; no torch. Defined by conv.cuh, compiled by csrc/cuda/conv.cu (nvcc) and
// csrc/simt/conv.cpp (the emulator). Semantics: packed_kernels/ops/conv.py (reference_*).
//
// Layouts (the kernels see channels_last only; ops/conv.py transforms NCHW at the boundary):
//   activations  x, y, residual, grad, grad_input: NHWC contiguous (torch's channels_last)
//   weight       (C_out, KH, KW, C_in/groups) contiguous ("OHWI")
//   per-channel  bias, in_scale, in_shift, out_scale, out_shift: (C,) contiguous float32 whatever
//                `dtype` is (folded BatchNorm parameters keep their precision), nullptr = absent
// Activations and the weight have the element type `dtype`; statistics and weight-grad partials
// are float32. `tf32`: float32 multiplies on TF32 tensor cores (operands rounded to 10 mantissa
// bits, float32 accumulation) on sm_80+, as cuDNN does under torch.backends.cudnn.allow_tf32;
// false, or an older GPU: float32 FMAs. Other dtypes ignore it.
#pragma once

#include <cstdint>

#include "scalar_type.h"

namespace pk {
namespace conv {

enum class Activation : int { kNone = 0, kRelu = 1 };

struct Shape {
  std::int64_t batch, in_channels, height, width;  // input (N, C_in, H, W)
  std::int64_t out_channels, kernel_h, kernel_w;   // weight (C_out, C_in/groups, KH, KW)
  std::int64_t out_height, out_width;              // output (N, C_out, OH, OW)
  int stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w, groups;
};

// Per input channel x_hat = act(x * scale + shift), applied while loading x; padding stays zero.
struct Prologue {
  const float* scale;
  const float* shift;
  Activation activation;
};

// Per output channel out = act(y * scale + shift + residual), y = conv + bias.
struct Epilogue {
  const float* bias;
  const float* scale;
  const float* shift;
  const void* residual;
  Activation activation;
};

// Row tiles of the forward GEMM: the first dimension of its channel-statistics partials.
std::int64_t forward_row_tiles(const Shape& s);
// Rows (output pixels) per forward row tile: tile t holds min(this, rows - t * this) of them.
std::int64_t forward_rows_per_tile();

// y = epilogue(conv(prologue(x), w)). With stats != nullptr, stats is a (forward_row_tiles, 2,
// C_out) fp32 buffer that receives, per row tile t, the sum of y over the tile's valid rows c_t
// (kBlockM, fewer in the last tile) and M2_t, the sum of squared deviations from the tile's own
// mean sum/c_t (y before the epilogue's scale/shift/residual/activation, after the bias). The
// caller merges tiles with Chan's formula: mean = sum/n, M2 = sum M2_t + sum c_t (mean_t - mean)^2.
void forward(ScalarType dtype, const Shape& s, const void* x, const void* w, const Prologue& pro,
             const Epilogue& epi, void* y, float* stats, Stream stream, bool tf32 = false);

// Bytes of device scratch input_grad uses for this shape (0: none). At stride 1 with 16-bit types
// and channels per group of grad a multiple of 8, on sm_90 (the wgmma kernel) or where the input
// channels per group are not a multiple of 8 (a stem's 3), the input gradient runs as the forward
// convolution of grad with the weight's taps reversed and its channels swapped within each group,
// stored there.
std::int64_t input_grad_workspace_bytes(ScalarType dtype, const Shape& s);

// grad_input = d loss / d x_hat (the conv's own input) from grad = d loss / d y. workspace:
// input_grad_workspace_bytes of 16-byte aligned scratch, or nullptr (then the mma.sync input
// gradient kernel).
void input_grad(ScalarType dtype, const Shape& s, const void* grad, const void* w, void* grad_input,
                Stream stream, void* workspace = nullptr, bool tf32 = false);

// How many slabs the weight gradient's pixel range is split into (partials summed by the caller).
int weight_grad_splits(const Shape& s);

// partials (splits, C_out, KH, KW, C_in/groups) fp32: slab i holds split i's share of
// d loss / d w, reading x through the prologue (x_hat is never stored).
void weight_grad(ScalarType dtype, const Shape& s, const void* grad, const void* x,
                 const Prologue& pro, float* partials, int splits, Stream stream, bool tf32 = false);

}  // namespace conv
}  // namespace pk
