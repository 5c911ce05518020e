// SPDX-License-Identifier: Apache-2.0
// The emulator build of the ensemble kernels (-DPK_SIMT=1; no torch headers).
#include "ensemble.cuh"
