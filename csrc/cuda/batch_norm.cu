// SPDX-License-Identifier: Apache-2.0
// The CUDA build of the batch-norm kernels (no torch headers).
#include "batch_norm.cuh"
