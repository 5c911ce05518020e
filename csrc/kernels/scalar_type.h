// SPDX-License-Identifier: Apache-2.0
// What every launcher header shares: the element types the kernels are built for and the stream
// type (torch-free, so the nvcc and emulator translation units include no torch headers).
#pragma once

namespace pk {

enum class ScalarType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
using Stream = void*;  // cudaStream_t under nvcc, ignored by the emulator

}  // namespace pk
