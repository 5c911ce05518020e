// SPDX-License-Identifier: Apache-2.0
// The CUDA build of the ensemble kernels (no torch headers).
#include "ensemble.cuh"
