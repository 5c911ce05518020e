// SPDX-License-Identifier: Apache-2.0
// The CUDA build of the grouped convolution kernels (no torch headers).
#include "conv.cuh"
