// SPDX-License-Identifier: Apache-2.0
// Launchers of the ensemble-reduction kernels: raw pointers, sizes and a stream; no torch.
// Defined by ensemble.cuh, compiled by csrc/cuda/ensemble.cu (nvcc) and csrc/simt/ensemble.cpp
// (the emulator). Semantics: packed_kernels/ops/ensemble.py (reference_* functions).
//
// Logits are estimator-major (M*B, C, S) contiguous; every output is contiguous. Math in float.
#pragma once

#include <cstdint>

#include "scalar_type.h"

namespace pk {
namespace ensemble {

constexpr int kMaxEstimators = 64;

// out (B, C, S) = mean over m of softmax over C of logits[m].
void mean_forward(ScalarType dtype, const void* logits, void* out, std::int64_t M, std::int64_t B,
                  std::int64_t C, std::int64_t S, Stream stream);
// grad_logits (M*B, C, S) from grad (B, C, S).
void mean_backward(ScalarType dtype, const void* grad, const void* logits, void* grad_logits,
                   std::int64_t M, std::int64_t B, std::int64_t C, std::int64_t S, Stream stream);
// probs (B, C); msp, max_logit, entropy, mutual_information, variation_ratio (B,).
void scores_forward(ScalarType dtype, const void* logits, void* probs, void* msp, void* max_logit,
                    void* entropy, void* mutual_information, void* variation_ratio, std::int64_t M,
                    std::int64_t B, std::int64_t C, Stream stream);
// grad_logits (M*B, C) from the gradients of probs, msp, max_logit, entropy, mutual_information.
void scores_backward(ScalarType dtype, const void* grad_probs, const void* grad_msp,
                     const void* grad_max_logit, const void* grad_entropy,
                     const void* grad_mutual_information, const void* logits, void* grad_logits,
                     std::int64_t M, std::int64_t B, std::int64_t C, Stream stream);

}  // namespace ensemble
}  // namespace pk
