# SPDX-License-Identifier: Apache-2.0
"""Compiler settings of the csrc build, in one place for setup.py and the compile-for-target test."""

import os

DEFAULT_ARCHS = "80;86;89;90"
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
CXX_FLAGS = ["-O3", "-std=c++20"]  # torch >= 2.14 headers need C++20 (only bindings.cpp sees them)
# torch's CUDAExtension adds these to every nvcc command; the compile test adds them too so that
# it compiles exactly what the build compiles.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def include_dirs(root: str) -> list:
    return [os.path.join(root, "csrc", "include"), os.path.join(root, "csrc", "kernels"),
            os.path.join(root, "csrc")]


def target_archs() -> list:
    """PACKED_KERNELS_CUDA_ARCHS ("80;86;89;90" by default) as a list of ints."""
    value = os.environ.get("PACKED_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
    return [int(a) for a in value.replace(",", ";").split(";") if a.strip()]


# Architectures whose SASS is built for the architecture-specific target ("90" -> sm_90a): the
# sm_90 kernels' wgmma exists only there. PTX for forward compatibility stays generic.
ARCH_SPECIFIC = {90}


def sass_target(arch: int) -> str:
    return f"{arch}a" if arch in ARCH_SPECIFIC else str(arch)


def cuda_arch_flags(archs=None) -> list:
    """SASS for each architecture, plus PTX of the newest for forward compatibility."""
    archs = target_archs() if archs is None else list(archs)
    flags = [f"-gencode=arch=compute_{sass_target(a)},code=sm_{sass_target(a)}" for a in archs]
    newest = max(archs)
    return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]
