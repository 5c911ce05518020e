# SPDX-License-Identifier: Apache-2.0
"""Builds packed_kernels with its compiled extensions.

  packed_kernels._C     csrc/cuda/*.cu through nvcc (no torch headers) + csrc/bindings.cpp through
                        the host compiler: the CUDA backend
  packed_kernels._simt  csrc/simt/*.cpp + the same csrc/bindings.cpp through the host C++ compiler
                        with -DPK_SIMT=1: the same kernels on the SIMT emulator (the "simt"
                        backend, for machines without a GPU)
  packed_kernels._host  csrc/host/*.cpp through the host C++ compiler: the ops' call signatures
                        (packed_kernels/_checks.py works without it, slower per call)

Switches (environment variables):
  PACKED_KERNELS_NO_CUDA=1      skip packed_kernels._C
  PACKED_KERNELS_NO_SIMT=1      skip packed_kernels._simt
  PACKED_KERNELS_NO_HOST=1      skip packed_kernels._host
  PACKED_KERNELS_CUDA_ARCHS     e.g. "80;86;89;90" (default); PTX is embedded for the newest
  MAX_JOBS                      parallel compile jobs (ninja)

The wheel requires the torch major.minor its extensions were compiled against (torch's C++ ABI
changes between minor versions); a build without extensions requires torch>=2.11.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import build_config  # noqa: E402  (the compiler settings, shared with tests/test_csrc_compile.py)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _sources(folder: str, patterns):
    found = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join("csrc", folder, pattern)))
    return found


def _nvcc_available() -> bool:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return True
    return shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")


def extensions():
    try:
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only invocations (e.g. sdist) need no extensions
        return [], {}
    include_dirs = build_config.include_dirs(ROOT)
    cxx_flags = build_config.CXX_FLAGS
    modules = []

    bindings = [os.path.join("csrc", "bindings.cpp")]
    cuda_sources = _sources("cuda", ["*.cu", "*.cpp"])
    if _flag("PACKED_KERNELS_NO_CUDA"):
        print("packed_kernels: PACKED_KERNELS_NO_CUDA=1, building without the CUDA backend")
    elif not cuda_sources:
        pass
    elif not _nvcc_available():
        print("packed_kernels: nvcc not found (set CUDA_HOME=/usr/local/cuda); building without "
              "the CUDA backend: the torch and Triton backends still work", file=sys.stderr)
    else:
        os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "")  # we pass -gencode ourselves
        modules.append(cpp_extension.CUDAExtension(
            "packed_kernels._C", cuda_sources + bindings, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": build_config.NVCC_FLAGS + build_config.cuda_arch_flags()}))

    simt_sources = _sources("simt", ["*.cpp"])
    if _flag("PACKED_KERNELS_NO_SIMT"):
        print("packed_kernels: PACKED_KERNELS_NO_SIMT=1, building without the simt backend")
    elif simt_sources:
        modules.append(cpp_extension.CppExtension(
            "packed_kernels._simt", simt_sources + bindings, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-DPK_SIMT=1"]}))

    if _flag("PACKED_KERNELS_NO_HOST"):
        print("packed_kernels: PACKED_KERNELS_NO_HOST=1, building without the compiled call signatures")
    else:
        modules.append(cpp_extension.CppExtension(
            "packed_kernels._host", _sources("host", ["*.cpp"]),
            extra_compile_args={"cxx": cxx_flags}))

    if not modules:
        return [], {}
    return modules, {"build_ext": _build_ext_class(cpp_extension)}


def _build_ext_class(cpp_extension):
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtension(base):
        """One object folder per extension: both compile csrc/bindings.cpp, with different flags."""

        def build_extension(self, ext):
            shared_temp = self.build_temp
            self.build_temp = os.path.join(shared_temp, ext.name.rsplit(".", 1)[-1])
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = shared_temp

    return BuildExtension


def dependencies(compiled: bool) -> list:
    """The wheel's requirements: with compiled extensions, the torch they were compiled against."""
    torch_requirement = "torch>=2.11"
    if compiled:
        import torch
        major, minor = torch.__version__.split("+")[0].split(".")[:2]
        torch_requirement = f"torch=={major}.{minor}.*"
    return [torch_requirement, "numpy", "einops>=0.8"]


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, install_requires=dependencies(bool(ext_modules)))
