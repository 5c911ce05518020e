# SPDX-License-Identifier: Apache-2.0
"""Compiles exactly what the library launches for one conv layer and pass, for a GPU target,
without a GPU, and caches the cubins by the hash of everything that goes into them.

Triton: the launcher in packed_kernels.triton.conv runs for real on CPU tensors of the layer's
shape, with its @triton.jit kernel swapped for a recorder, so the tile config (the heuristic:
no autotuning off a GPU), grid, scalar arguments and constexprs are the launcher's own; the
arguments are specialised as the JIT does (pointers and ints divisible by 16, ints equal to 1
as constants) and compiled with triton.compile for the target.

CUDA C++: csrc/cuda/conv.cu compiled with nvcc -cubin for the target with the build's flags
(sm_90a for sm_90, as the build); the instantiation and grid are chosen by the rules of conv.cuh's
launch_gemm / weight_grad and, on sm_90, conv_sm90.cuh's forward_sm90 (mirrored below, their
constants read from the headers themselves).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import filelock  # torch's own dependency
import torch

from . import sass

ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("PACKED_KERNELS_MODEL_CACHE", ROOT / "build" / "perf_model"))
PASSES = ("forward", "input_grad", "weight_grad")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Launch:
    """One kernel launch of one pass: what runs, on which grid, and the numbers the model needs."""
    backend: str            # "triton" | "cuda"
    kernel: str             # kernel symbol in the cubin (prefix)
    cubin: Optional[Path]   # None: a torch glue pass, modelled by its bytes alone
    grid: Tuple[int, int, int]
    num_warps: int
    dynamic_shared: int     # bytes (Triton's shared memory is dynamic)
    trips: List[int]        # main-loop nest trip counts per block, innermost first
    active_blocks: int      # blocks that do work (the CUDA input grad's phases leave some idle)
    config: str             # readable tile config
    tile: Tuple[int, int, int]  # rows x cols x depth of a block's tile per K step
    itemsize: int           # bytes per operand element
    extra_dram_bytes: int = 0  # beyond the compulsory bytes: fp32 split partials written + read
    main_loop: Tuple[Tuple[str, ...], ...] = sass.CONV_MAIN_LOOP  # what marks the main loop

    @property
    def operand_bytes(self) -> int:
        """What the blocks' operand tiles read from L2 over the launch (A and B tiles per K step)."""
        bm, bn, bk = self.tile
        return self.active_blocks * math.prod(self.trips) * (bm + bn) * bk * self.itemsize


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def _files_digest(paths) -> str:
    return _digest(*[p.read_bytes() for p in sorted(paths)])


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------

class _Recorder:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **kwargs) is recorded, not run."""

    def __init__(self, jit):
        self.jit = jit
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((tuple(grid), args, kwargs))


@contextlib.contextmanager
def _recording(module, names, sms: int):
    from packed_kernels import _backend
    saved = {n: getattr(module, n) for n in names}
    saved_sms = _backend.multiprocessors
    recorders = {n: _Recorder(saved[n]) for n in names}
    try:
        for n in names:
            setattr(module, n, recorders[n])
        _backend.multiprocessors = lambda device: sms  # weight-grad splits fill the modelled GPU
        yield recorders
    finally:
        for n in names:
            setattr(module, n, saved[n])
        _backend.multiprocessors = saved_sms


def _specialise(value):
    """(type, attribute) of one argument as the JIT specialises it: "D" for divisible by 16,
    ("constexpr", 1) for the int 1."""
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl
        return native_specialize_impl(BaseBackend, value, False, True, True)
    except (ImportError, TypeError):  # older Triton: the same rules written out
        if isinstance(value, torch.Tensor):
            names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
            return f"*{names[value.dtype]}", "D" if value.data_ptr() % 16 == 0 else ""
        if value == 1:
            return "constexpr", 1
        kind = "i32" if -2**31 <= value < 2**31 else "i64"
        return kind, "D" if value % 16 == 0 else ""


def _layer_tensors(layer, batch: int, dtype):
    n = batch
    cl = torch.channels_last
    oh, ow = layer.out_hw()
    x = torch.empty((n, layer.c_in, layer.h, layer.w), dtype=dtype, memory_format=cl)
    w = torch.empty((layer.c_out, layer.c_in // layer.groups, *layer.kernel), dtype=dtype)
    g = torch.empty((n, layer.c_out, oh, ow), dtype=dtype, memory_format=cl)
    return x, w, g


def triton_launches(layer, pass_name: str, batch: int, dtype_name: str, gpu) -> List[Launch]:
    from packed_kernels.triton import conv
    dtype = DTYPES[dtype_name]
    x, w, g = _layer_tensors(layer, batch, dtype)
    pad = (layer.padding[0], layer.padding[0], layer.padding[1], layer.padding[1])
    names = {"forward": "_conv_forward_kernel", "input_grad": "_conv_input_grad_kernel",
             "weight_grad": "_conv_weight_grad_kernel"}
    with _recording(conv, [names[pass_name]], gpu.sms) as recorders:
        if pass_name == "forward":
            conv.conv_forward(x, w, None, layer.stride, pad, layer.dilation, layer.groups,
                              memory_format=torch.channels_last)
        elif pass_name == "input_grad":
            conv.conv_input_grad(g, w, tuple(x.shape), layer.stride, pad, layer.dilation,
                                 layer.groups, memory_format=torch.channels_last)
        else:
            conv.conv_weight_grad(g, x, tuple(w.shape), layer.stride, pad, layer.dilation,
                                  layer.groups)
    recorder = recorders[names[pass_name]]
    launches = []
    for grid, args, kwargs in recorder.calls:
        launches.append(_compile_triton(recorder.jit, grid, args, kwargs, gpu, pass_name, layer))
    return launches


def compile_triton(jit, args, kwargs, gpu):
    """One recorded launch compiled for the GPU as the JIT would specialise it (cached by hash):
    (cubin path, {"name", "shared"}, constexprs, options, argument values by name)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    arg_names = list(jit.arg_names)
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    if "UPCAST" in arg_names:
        kwargs["UPCAST"] = False  # only Triton's CPU interpreter upcasts; a GPU launch never does
    signature, constexprs, attrs = {}, dict(kwargs), {}
    values = dict(zip([n for n in arg_names if n not in kwargs], args))
    for i, name in enumerate(arg_names):
        if name in kwargs:
            signature[name] = "constexpr"
            continue
        kind, attribute = _specialise(values[name])
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = attribute
        elif attribute == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    # jit.cache_key hashes the imported kernel and the jit functions and globals it uses: the code
    # compiled here, even if the file changes during a run
    key = _digest(triton.__version__, gpu.arch, jit.fn.__name__, jit.cache_key, signature,
                  constexprs, sorted((k[0], v) for k, v in attrs.items()), options)
    folder = CACHE_DIR / "triton"
    cubin, meta = folder / f"{key}.cubin", folder / f"{key}.json"
    if not (cubin.exists() and meta.exists()):
        compiled = triton.compile(ASTSource(jit, signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", gpu.arch, 32), options=options)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = cubin.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(compiled.asm["cubin"])
        os.replace(tmp, cubin)
        meta.write_text(json.dumps({"name": compiled.metadata.name, "shared": compiled.metadata.shared}))
    return cubin, json.loads(meta.read_text()), constexprs, options, values


def _compile_triton(jit, grid, args, kwargs, gpu, pass_name, layer) -> Launch:
    cubin, info, constexprs, options, values = compile_triton(jit, args, kwargs, gpu)
    arg_names = list(jit.arg_names)
    c = constexprs
    config = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{options['num_warps']} s{options['num_stages']} vec{c['VEC']}"
    if c.get("VEC_OUT", c["VEC"]) != c["VEC"]:  # the gradients' output-channel vectors
        config += f"/{c['VEC_OUT']}"
    cin_g, cout_g = layer.c_in // layer.groups, layer.c_out // layer.groups
    if pass_name == "weight_grad":
        # a program's K loop: its run of images, IMAGES per step (one run of positions each)
        trips = [math.ceil(values["SPLIT_N"] / values["IMAGES"])]
        splits = grid[1] // (layer.kernel[0] * layer.kernel[1])
        # fp32 slabs, one per split: written by the kernel, read back by the sum
        extra = 0 if splits == 1 else 2 * splits * layer.c_out * cin_g * layer.kernel[0] * layer.kernel[1] * 4
    elif pass_name == "input_grad":
        # one flat K loop over the taps of the program's stride phase (grid axis 2: groups x
        # phases); blocks beyond a smaller phase's rows exit at once
        k_blocks = math.ceil(cout_g / c["BLOCK_K"])
        work, active = 0, 0
        for ph in range(min(layer.stride[0], layer.h)):
            for pw in range(min(layer.stride[1], layer.w)):
                rows_h, taps_h = _phase_1d(ph, layer.h, layer.padding[0], layer.kernel[0], layer.dilation[0], layer.stride[0])
                rows_w, taps_w = _phase_1d(pw, layer.w, layer.padding[1], layer.kernel[1], layer.dilation[1], layer.stride[1])
                blocks = math.ceil(values["N"] * rows_h * rows_w / c["BLOCK_M"]) * grid[1] * layer.groups
                active += blocks
                work += blocks * taps_h * taps_w * k_blocks
        trips = [max(1, round(work / max(active, 1)))]
        extra = 0
        return Launch("triton", info["name"], cubin, tuple(grid), options["num_warps"], info["shared"],
                      trips, active, config, (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]),
                      values[arg_names[0]].element_size(), extra)
    else:
        depth_channels = cin_g
        trips = [math.ceil(depth_channels / c["BLOCK_K"])]
        trips += [t for t in (layer.kernel[1], layer.kernel[0]) if t != 1]  # 1: a constant, no loop
        extra = 0
    return Launch("triton", info["name"], cubin, tuple(grid), options["num_warps"], info["shared"],
                  trips, math.prod(grid), config, (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]),
                  values[arg_names[0]].element_size(), extra)


# ---------------------------------------------------------------------------------------------
# CUDA C++
# ---------------------------------------------------------------------------------------------

CONV_HEADER = ROOT / "csrc" / "kernels" / "conv.cuh"
SM90_HEADER = ROOT / "csrc" / "kernels" / "conv_sm90.cuh"


def _header_constants(header: Path, names) -> Dict[str, int]:
    text = header.read_text()
    found = {}
    for name in names:
        match = re.search(rf"\b{name}\s*=\s*(\d+)", text)
        if match is None:
            raise RuntimeError(f"{header.name}: no constant {name}; update bench/perf_model/kernels.py")
        found[name] = int(match.group(1))
    return found


def cuda_constants() -> Dict[str, int]:
    """The tile and dispatch constants of conv.cuh, read from the header (not copied)."""
    return _header_constants(CONV_HEADER, ("kThreads", "kBlockM", "kBlockN", "kNarrowBlockM", "kNarrowBlockN", "kBlockK",
                                           "kAsyncStages", "kTargetBlocks", "kMaxSplits"))


def nvcc() -> str:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    found = str(candidate) if candidate.exists() else shutil.which("nvcc")
    if found is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME): the CUDA C++ kernels cannot be modelled")
    return found


def cuda_cubin(arch: int, source: Path = ROOT / "csrc" / "cuda" / "conv.cu",
               header_root: Path = ROOT / "csrc", built: Optional[Path] = None) -> Path:
    """conv.cu compiled for sm_<arch> with the build's flags (cached by the sources' hash).
    `built`: that cubin as another nvcc run with these flags already made it (a multi-architecture
    build's -keep output), stored in the cache instead of compiling it again."""
    sys.path.insert(0, str(ROOT / "tools"))
    import build_config
    compiler = nvcc()
    flags = [*build_config.NVCC_FLAGS, *build_config.TORCH_NVCC_DEFINES,
             *(f"-I{d}" for d in build_config.include_dirs(str(header_root.parent)))]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    sources = [source, *header_root.glob("include/**/*.h"), *header_root.glob("kernels/*.h"),
               *header_root.glob("kernels/*.cuh")]
    key = _digest(arch, flags, version, _files_digest(sources))
    cubin = CACHE_DIR / "cuda" / f"{source.stem}-sm{arch}-{key}.cubin"
    if cubin.exists():
        return cubin
    cubin.parent.mkdir(parents=True, exist_ok=True)
    # processes asking for one cubin at once (test workers, the model's prebuild) compile it once
    with filelock.FileLock(str(cubin.with_suffix(".lock"))):
        if not cubin.exists():
            tmp = cubin.with_suffix(f".{os.getpid()}.tmp")
            if built is not None:
                shutil.copyfile(built, tmp)
            else:
                target = build_config.sass_target(arch)  # sm_90a: the sm_90 forward's wgmma
                subprocess.run([compiler, *flags, f"-arch=sm_{target}", "-cubin", str(source), "-o", str(tmp)],
                               check=True, capture_output=True, text=True)
            os.replace(tmp, cubin)
    return cubin


_MANGLED_TYPE = {"fp32": "f", "fp16": "6__half", "bf16": "13__nv_bfloat16"}
_PROBLEM = {"forward": "14ForwardProblem", "input_grad": "16InputGradProblem",
            "weight_grad": "17WeightGradProblem"}


def cuda_kernel_name(dtype_name: str, vec: int, stages: int, block_m: int, block_n: int, pass_name: str,
                     tf32: bool = False) -> str:
    t = _MANGLED_TYPE[dtype_name]
    problem = f"6OnTf32INS1_{_PROBLEM[pass_name]}" if tf32 else _PROBLEM[pass_name]  # OnTf32<Problem>
    return (f"_ZN2pk4conv6detail11gemm_kernelI{t}Li{vec}ELi{stages}ELi{block_m}ELi{block_n}"
            f"ENS1_{problem}I")


def sm90_forward_launch(layer, batch: int, dtype_name: str, cubin: Path) -> Launch:
    """conv_sm90.cuh's forward: one warpgroup per BM x BN tile (64 x 128 where a group has more
    than 64 output channels, else 128 x 64), slices of kSm90BlockK, kSm90Stages stages of A and B
    tiles in dynamic shared memory (the fp32 accumulator tile reuses them)."""
    c = _header_constants(SM90_HEADER, ("kSm90Threads", "kSm90BlockK", "kSm90Stages"))
    bk = c["kSm90BlockK"]
    itemsize = DTYPES[dtype_name].itemsize
    cin_g, cout_g = layer.c_in // layer.groups, layer.c_out // layer.groups
    bm, bn = (64, 128) if cout_g > 64 else (128, 64)
    oh, ow = layer.out_hw()
    rows, depth = batch * oh * ow, layer.kernel[0] * layer.kernel[1] * cin_g
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    grid = (cdiv(rows, bm), cdiv(cout_g, bn), layer.groups)
    shared = 1024 + max(c["kSm90Stages"] * (bm + bn) * bk * itemsize, 4 * bm * (bn + 4))
    prefix = f"_ZN2pk4conv6detail19forward_sm90_kernelI{_MANGLED_TYPE[dtype_name]}Li{bm}ELi{bn}E"
    config = f"{bm}x{bn}x{bk} wgmma s{c['kSm90Stages']} tma"
    return Launch("cuda", prefix, cubin, grid, c["kSm90Threads"] // 32, shared, [cdiv(depth, bk)],
                  math.prod(grid), config, (bm, bn, bk), itemsize)


def _phase_1d(first, size, pad, kernel, dilation, stride):
    """(rows, taps) of one stride phase (conv.cuh's phase_1d)."""
    count = (size - first + stride - 1) // stride
    phase = (first + pad) % stride
    step = stride // math.gcd(stride, dilation)
    tap = next((k for k in range(min(step, kernel)) if k * dilation % stride == phase), -1)
    taps = 0 if tap < 0 else (kernel - tap + step - 1) // step
    return count, taps


def cuda_launches(layer, pass_name: str, batch: int, dtype_name: str, gpu) -> List[Launch]:
    k = cuda_constants()
    bm, bn, bk = k["kBlockM"], k["kBlockN"], k["kBlockK"]
    itemsize = DTYPES[dtype_name].itemsize
    vec16 = 16 // itemsize
    cin_g, cout_g = layer.c_in // layer.groups, layer.c_out // layer.groups
    kh, kw = layer.kernel
    oh, ow = layer.out_hw()
    # launch_gemm's narrow tile: the 16-bit forward (B along depth) with 16-byte runs of input
    # channels and few output channels, its result element by element
    narrow = (pass_name == "forward" and dtype_name != "fp32" and cin_g % vec16 == 0
              and cout_g <= k["kNarrowBlockN"])
    if narrow:
        bm, bn = k["kNarrowBlockM"], k["kNarrowBlockN"]
    # else 16-byte runs (and 16-bit: the cp.async pipeline) where both channel counts per group
    # are multiples of them (and the tensors 16-byte aligned)
    vectorized = narrow or (cin_g % vec16 == 0 and cout_g % vec16 == 0)
    vec = vec16 if vectorized else 1
    stages = k["kAsyncStages"] if vectorized and dtype_name != "fp32" else 1
    # conv.cuh's use_tf32: fp32 on TF32 tensor cores where torch allows it (ops/conv_engines.py)
    tf32 = dtype_name == "fp32" and torch.backends.cudnn.allow_tf32 and gpu.arch >= 80
    cubin = cuda_cubin(gpu.arch)
    prefix = cuda_kernel_name(dtype_name, vec, stages, bm, bn, pass_name, tf32)
    config = f"{bm}x{bn}x{bk} w{k['kThreads'] // 32} s{stages} vec{vec}" + (" tf32" if tf32 else "")
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    # the FMA loop (fp32 without TF32) runs inside each K slice, unrolled 4 deep: kBlockK / 4 trips
    fma_trips = [bk // 4] if dtype_name == "fp32" and "tf32" not in config else []
    launch = lambda grid, trips, active, extra=0: Launch(  # noqa: E731
        "cuda", prefix, cubin, grid, k["kThreads"] // 32, 0, [*fma_trips, *trips], active, config, (bm, bn, bk),
        itemsize, extra)
    if pass_name == "forward" and gpu.arch == 90 and dtype_name != "fp32" and cin_g % vec16 == 0:
        return [sm90_forward_launch(layer, batch, dtype_name, cubin)]  # conv_sm90.cuh's conditions
    reach = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel)]
    if (pass_name == "input_grad" and dtype_name != "fp32" and cout_g % 8 == 0
            and (gpu.arch == 90 or cin_g % 8 != 0)
            and layer.stride == (1, 1) and all(p <= r for p, r in zip(layer.padding, reach))):
        # conv.cuh's input_grad_as_forward: the forward of grad with the reversed, channel-swapped
        # weight (rewritten first: a pass over the weight, modelled by its bytes)
        swapped = dataclasses.replace(layer, c_in=layer.c_out, c_out=layer.c_in, h=oh, w=ow,
                                      padding=tuple(r - p for p, r in zip(layer.padding, reach)))
        weight_bytes = layer.c_out * cin_g * kh * kw * itemsize
        rewrite = Launch("cuda", "reversed_swapped_weight", None, (1, 1, 1), 1, 0, [1], 1,
                         "weight rewrite", (0, 0, 0), itemsize, 2 * weight_bytes)
        return [*cuda_launches(swapped, "forward", batch, dtype_name, gpu), rewrite]
    if pass_name == "forward":
        rows, depth = batch * oh * ow, kh * kw * cin_g
        grid = (cdiv(rows, bm), cdiv(cout_g, bn), layer.groups)
        return [launch(grid, [cdiv(depth, bk)], math.prod(grid))]
    if pass_name == "input_grad":
        # one launch; blocks of the phases with fewer rows than the largest exit at once
        phases_h, phases_w = min(layer.stride[0], layer.h), min(layer.stride[1], layer.w)
        tiles_m = cdiv(batch * cdiv(layer.h, layer.stride[0]) * cdiv(layer.w, layer.stride[1]), bm)
        grid = (tiles_m, cdiv(cin_g, bn), phases_h * phases_w * layer.groups)
        work, active = 0, 0
        for ph in range(phases_h):
            for pw in range(phases_w):
                rows_h, taps_h = _phase_1d(ph, layer.h, layer.padding[0], kh, layer.dilation[0], layer.stride[0])
                rows_w, taps_w = _phase_1d(pw, layer.w, layer.padding[1], kw, layer.dilation[1], layer.stride[1])
                blocks = cdiv(batch * rows_h * rows_w, bm) * grid[1] * layer.groups
                active += blocks
                work += blocks * cdiv(taps_h * taps_w * cout_g, bk)
        return [launch(grid, [max(1, round(work / max(active, 1)))], active)]
    # weight grad: conv.cuh's weight_grad_splits, then slabs of split_length
    depth = batch * oh * ow
    blocks = cdiv(cout_g, bm) * cdiv(kh * kw * cin_g, bn) * layer.groups
    splits = cdiv(k["kTargetBlocks"], blocks)
    splits = max(1, min(splits, depth // (8 * bk), k["kMaxSplits"]))
    split_len = cdiv(cdiv(depth, splits), bk) * bk
    grid = (cdiv(cout_g, bm), cdiv(kh * kw * cin_g, bn) * splits, layer.groups)
    partials = 2 * splits * layer.c_out * cin_g * kh * kw * 4  # fp32 slabs written, summed by the caller
    return [launch(grid, [cdiv(split_len, bk)], math.prod(grid), partials)]
