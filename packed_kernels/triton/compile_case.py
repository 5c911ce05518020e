# SPDX-License-Identifier: Apache-2.0
"""What the compile-for-target check needs to know about one kernel configuration."""

import inspect
from typing import Any, Callable, Dict, NamedTuple


class CompileCase(NamedTuple):
    name: str  # readable id, e.g. "ensemble.mean_forward[fp16,BLOCK_M=4]"
    kernel: Any  # the @triton.jit function
    signature: Dict[str, str]  # argument name -> "*fp16", "i32", "fp32", "constexpr", ...
    constexprs: Dict[str, Any]  # values of the constexpr arguments
    num_warps: int = 4
    num_stages: int = 3
    expects_mma: bool = False  # fp16/bf16 GEMM-like kernels must use tensor cores


def kernel_signature(kernel, pointer_type: Callable[[str], str],
                     scalar_type: Callable[[str], str] = lambda name: "i32") -> Dict[str, str]:
    """A @triton.jit kernel's signature for triton.compile: "constexpr" for its constexpr
    arguments, pointer_type(name) for `*_ptr` arguments, scalar_type(name) for the others."""
    # from the Python function: under TRITON_INTERPRET=1 the kernel object has no .params
    params = inspect.signature(kernel.fn).parameters
    return {arg: "constexpr" if "constexpr" in str(param.annotation)
            else pointer_type(arg) if arg.endswith("_ptr") else scalar_type(arg)
            for arg, param in params.items()}
