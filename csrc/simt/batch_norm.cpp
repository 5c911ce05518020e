// SPDX-License-Identifier: Apache-2.0
// The emulator build of the batch-norm kernels (-DPK_SIMT=1; no torch headers).
#include "batch_norm.cuh"
