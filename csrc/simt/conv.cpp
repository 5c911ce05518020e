// SPDX-License-Identifier: Apache-2.0
// The emulator build of the grouped convolution kernels (-DPK_SIMT=1; no torch headers).
#include "conv.cuh"
