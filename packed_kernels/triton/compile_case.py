"""What the compile-for-target check needs to know about one kernel configuration."""

from typing import Any, Dict, NamedTuple


class CompileCase(NamedTuple):
    name: str  # readable id, e.g. "ensemble.mean_forward[fp16,BLOCK_M=4]"
    kernel: Any  # the @triton.jit function
    signature: Dict[str, str]  # argument name -> "*fp16", "i32", "fp32", "constexpr", ...
    constexprs: Dict[str, Any]  # values of the constexpr arguments
    num_warps: int = 4
    num_stages: int = 3
    expects_mma: bool = False  # fp16/bf16 GEMM-like kernels must use tensor cores
