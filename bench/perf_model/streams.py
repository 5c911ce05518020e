# SPDX-License-Identifier: Apache-2.0
"""The batch-norm and ensemble kernels in the performance model: what the library launches for
one layer and pass (Triton and CUDA C++), compiled for the target like the convs, with the
bytes each launch moves as its code is written (passes over the tensor, split partials).

These are bandwidth kernels: the roofline is their compulsory bytes (each operand of the op
read once, each result written once) at HBM bandwidth; their main loop is the loop that loads
(sass.STREAM_MAIN_LOOP). Moved bytes count every pass the code makes over a tensor as DRAM
traffic: an upper bound where the tensor would still sit in L2 for the next pass.

Batch-norm layers are the BatchNorm2d modules of the models' ResNets, traced with their output
shapes; which variant each runs follows the bottleneck block (bn3: + shortcut, ReLU; the
projection shortcut's norm: plain; the others: ReLU). Training mode: forward = statistics +
normalisation, backward = grad input, weight and bias (+ the residual's gradient).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

from . import sass
from .kernels import DTYPES, ROOT, Launch, _recording, compile_triton, cuda_cubin

STREAM_PASSES = ("forward", "backward")
ENSEMBLE_CLASSES = 100  # CIFAR-100 logits


@dataclass(frozen=True)
class StreamLayer:
    op: str           # "batch_norm", "ensemble_mean", "ensemble_scores"
    model: str
    channels: int     # batch norm: C of the activation; ensemble: the classes
    h: int = 1
    w: int = 1
    variant: str = ""  # batch norm: "relu", "residual_relu", "plain"
    estimators: int = 1

    @property
    def name(self) -> str:
        if self.op == "batch_norm":
            return f"{self.model} batch_norm {self.variant} {self.channels} @{self.h}x{self.w}"
        return f"{self.model} {self.op} M={self.estimators} {self.channels} classes"

    @property
    def relu(self) -> bool:
        return self.variant in ("relu", "residual_relu")

    @property
    def residual(self) -> bool:
        return self.variant == "residual_relu"

    def flops(self, batch: int) -> int:
        return 0  # not counted: the roofline of these kernels is their memory traffic

    def numel(self, batch: int) -> int:
        if self.op == "batch_norm":
            return batch * self.channels * self.h * self.w
        return self.estimators * batch * self.channels  # the logits


def _bn_variant(module_name: str) -> str:
    last = module_name.split(".")[-1]
    if "shortcut" in module_name or "downsample" in module_name:
        return "plain"
    return "residual_relu" if last == "bn3" else "relu"


def stream_layers(models: Sequence[str]) -> List[tuple]:
    """[(layer, {model name: count})]: the distinct batch norms of the models and their ensemble
    ops (mean and scores over M x batch x 100 logits)."""
    from .. import models as zoo
    found: Dict[tuple, list] = {}
    for key in models:
        row = zoo.parse_row(f"{key}-stock")
        model, _, _ = zoo.build_model(row, arch=50, num_classes=ENSEMBLE_CLASSES)
        spec = zoo.MODELS[row.model]
        seen = []
        hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.append((n, out.shape[1:])))
                 for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, 32, 32))
        for hook in hooks:
            hook.remove()
        layers = [StreamLayer("batch_norm", spec.name, c, h, w, _bn_variant(n)) for n, (c, h, w) in seen]
        layers += [StreamLayer(op, spec.name, ENSEMBLE_CLASSES, estimators=spec.num_estimators)
                   for op in ("ensemble_mean", "ensemble_scores")]
        for layer in layers:
            sig = (layer.op, layer.channels, layer.h, layer.w, layer.variant, layer.estimators)
            entry = found.setdefault(sig, [layer, {}])
            entry[1][spec.name] = entry[1].get(spec.name, 0) + 1
    return [tuple(v) for v in found.values()]


def compulsory_bytes(layer: StreamLayer, pass_name: str, batch: int, dtype_name: str) -> int:
    """Each operand of the op read once, each result written once (per-channel vectors and the
    per-row scalar scores included)."""
    s = DTYPES[dtype_name].itemsize
    e = layer.numel(batch)
    if layer.op == "batch_norm":
        c = layer.channels
        if pass_name == "forward":  # x (+ residual) -> out; gamma, beta -> mean, var, invstd
            return e * s * (2 + layer.residual) + 5 * c * 4
        # grad, x (+ out for the ReLU mask), mean, invstd, gamma -> grad x (+ grad residual), grad gamma, beta
        return e * s * (2 + layer.relu + 1 + layer.residual) + 5 * c * 4
    probs = e // layer.estimators * s
    scalars = 5 * batch * s  # msp, max logit, entropy, mutual information, variation ratio
    if layer.op == "ensemble_mean":
        return e * s + probs if pass_name == "forward" else 2 * e * s + probs
    return e * s + probs + scalars if pass_name == "forward" else 2 * e * s + probs + scalars - batch * s


def roofline_seconds(layer, pass_name, batch, dtype_name, gpu) -> float:
    return compulsory_bytes(layer, pass_name, batch, dtype_name) / (gpu.hbm_gbps * 1e9)


def _glue(name: str, nbytes: int) -> Launch:
    return Launch("torch", name, None, (1, 1, 1), 1, 0, [], 1, "torch", (0, 0, 0), 4, nbytes)


# ---------------------------------------------------------------------------------------------
# moved bytes per kernel, as written (shared by both backends; fp32 partials per split)
# ---------------------------------------------------------------------------------------------

def _bn_moved(kernel: str, layer: StreamLayer, e: int, s: int, splits: int, partials: int) -> int:
    c = layer.channels
    part = splits * c * 4
    if kernel == "stats":        # x; partials out
        return e * s + partials * part
    if kernel == "finalize":     # partials in; mean, var, invstd out
        return partials * part + 3 * c * 4
    if kernel == "normalize":    # x (+ residual) in, out; four per-channel vectors
        return e * s * (2 + layer.residual) + 4 * c * 4
    if kernel == "reduce":       # grad, x (+ out); two partials out
        return e * s * (2 + layer.relu) + 2 * part + 2 * c * 4
    if kernel == "sum":          # the partials summed per channel
        return 2 * part + 2 * c * 4
    if kernel == "elementwise":  # grad, x (+ out) in; grad x (+ grad residual) out
        return e * s * (2 + layer.relu + 1 + layer.residual) + 5 * c * 4
    raise ValueError(kernel)


def _ensemble_moved(layer: StreamLayer, pass_name: str, batch: int, s: int, grad_reads: int) -> int:
    """Logits read by the statistics pass and again by each later pass (as written: one pass for
    the statistics, one for the outputs; the backward adds the dot product's pass)."""
    logits = layer.numel(batch) * s
    probs = logits // layer.estimators
    scalars = 5 * batch * s
    if pass_name == "forward":
        return 2 * logits + probs + (scalars if layer.op == "ensemble_scores" else 0)
    if layer.op == "ensemble_mean":
        return 3 * logits + grad_reads * probs
    return 4 * logits + grad_reads * probs + scalars - batch * s


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _splits_as_on_gpu(module):
    """The batch-norm launcher sizes its splits for a GPU only when the tensor is on one."""
    saved = module._Layout.splits
    module._Layout.splits = lambda self, device: saved(self, torch.device("cuda"))
    try:
        yield
    finally:
        module._Layout.splits = saved


_TRITON_BN = {"forward": {"_stats_kernel": "stats", "_finalize_kernel": "finalize", "_normalize_kernel": "normalize"},
              "backward": {"_backward_reduce_kernel": "reduce", "_backward_elementwise_kernel": "elementwise"}}


def triton_stream_launches(layer: StreamLayer, pass_name: str, batch: int, dtype_name: str, gpu) -> List[Launch]:
    dtype, s = DTYPES[dtype_name], DTYPES[dtype_name].itemsize
    if layer.op == "batch_norm":
        from packed_kernels.triton import batch_norm as module
        names = _TRITON_BN[pass_name]
        x = torch.empty((batch, layer.channels, layer.h, layer.w), dtype=dtype, memory_format=torch.channels_last)
        vector = torch.zeros(layer.channels, dtype=torch.float32)
        with _recording(module, list(names), gpu.sms) as recorders, _splits_as_on_gpu(module):
            if pass_name == "forward":
                module.forward(x, None, None, vector, vector, torch.empty_like(x) if layer.residual else None,
                               True, 1e-5, layer.relu)
            else:
                module.backward(torch.empty_like(x), x, torch.empty_like(x) if layer.relu else None, vector,
                                vector, vector, layer.residual, True, layer.relu)
        calls = [(name, recorders[name].jit, call) for name in names for call in recorders[name].calls]
    else:
        from packed_kernels.triton import ensemble as module
        m = layer.estimators
        logits = torch.empty((m * batch, layer.channels), dtype=dtype)
        kernel = {("ensemble_mean", "forward"): "_mean_forward_kernel",
                  ("ensemble_mean", "backward"): "_mean_backward_kernel",
                  ("ensemble_scores", "forward"): "_scores_forward_kernel",
                  ("ensemble_scores", "backward"): "_scores_backward_kernel"}[(layer.op, pass_name)]
        with _recording(module, [kernel], gpu.sms) as recorders:
            if kernel == "_mean_forward_kernel":
                module.mean_forward(logits, m)
            elif kernel == "_mean_backward_kernel":
                module.mean_backward(torch.empty((batch, layer.channels), dtype=dtype), logits, m)
            elif kernel == "_scores_forward_kernel":
                module.scores_forward(logits, m)
            else:
                grads = [torch.empty((batch, layer.channels), dtype=dtype)] + [torch.empty(batch, dtype=dtype)] * 4
                module.scores_backward(grads, logits, m)
        calls = [(kernel, recorders[kernel].jit, call) for call in recorders[kernel].calls]
    launches = []
    e = layer.numel(batch)
    for name, jit, (grid, args, kwargs) in calls:
        cubin, info, c, options, values = compile_triton(jit, args, kwargs, gpu)
        if layer.op == "batch_norm":
            role = names[name]
            splits = values.get("num_splits") or grid[0]  # finalize's argument, else the grid's splits
            trips = {"stats": [values.get("tiles_per_split", 1)], "reduce": [values.get("tiles_per_split", 1)],
                     "finalize": [math.ceil(values["num_splits"] / c["BLOCK_SPLIT"])] if "num_splits" in values else []
                     }.get(role, [])
            moved = _bn_moved(role, layer, e, s, splits, 3)
            config = " ".join(f"{k.split('_')[1]}{v}" for k, v in c.items() if k.startswith("BLOCK_"))
        else:
            trips = [math.ceil(layer.channels / c["BLOCK_C"])]
            moved = _ensemble_moved(layer, pass_name, batch, s, grad_reads=2)
            config = f"{c['BLOCK_M']}x{c['BLOCK_C']}"
        launches.append(Launch("triton", info["name"], cubin, tuple(grid), options["num_warps"], info["shared"],
                               trips, math.prod(grid), f"{config} w{options['num_warps']}", (0, 0, 0), s, moved,
                               sass.STREAM_MAIN_LOOP))
        if layer.op == "batch_norm" and names[name] == "reduce":  # torch sums the split partials
            launches.append(_glue("sum of split partials", _bn_moved("sum", layer, e, s, grid[0], 2)))
    return launches


# ---------------------------------------------------------------------------------------------
# CUDA C++ (batch_norm.cuh's make_plan and ensemble.cuh's launchers, mirrored)
# ---------------------------------------------------------------------------------------------

_MANGLED = {"fp32": "f", "fp16": "6__half", "bf16": "13__nv_bfloat16"}


def _symbol(namespace: str, kernel: str, args: str = "") -> str:
    space = {"batch_norm": "10batch_norm", "ensemble": "8ensemble"}[namespace]
    return f"_ZN2pk{space}6detail{len(kernel)}{kernel}{args}"


def _cuda_launch(cubin, kernel, grid, threads, trips, config, s, moved, shared=0) -> Launch:
    return Launch("cuda", kernel, cubin, grid, threads // 32, shared, trips, math.prod(grid), config,
                  (0, 0, 0), s, moved, sass.STREAM_MAIN_LOOP)


def _resident(launch: Launch, gpu, cap: int) -> int:
    from .model import kernel_code, occupancy
    usage = kernel_code(launch)[1]
    return max(1, min(cap, occupancy(gpu, usage["registers"], usage["static_shared"], launch.num_warps)))


def cuda_stream_launches(layer: StreamLayer, pass_name: str, batch: int, dtype_name: str, gpu) -> List[Launch]:
    s = DTYPES[dtype_name].itemsize
    t = _MANGLED[dtype_name]
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    e = layer.numel(batch)
    if layer.op == "batch_norm":
        cubin = cuda_cubin(gpu.arch, ROOT / "csrc" / "cuda" / "batch_norm.cu")
        threads, row_bytes, min_passes, finalize_channels = 256, 128, 2, 32
        c = layer.channels
        wide = 16 // s
        vec = wide if c % wide == 0 else (wide // 2 if c % (wide // 2) == 0 else 1)  # channels_last runs
        chunks = 2 if vec * s >= 16 else 4  # kUnroll, channels_last
        block_c = row_bytes // s
        rows_per_cta = threads // (block_c // vec)
        blocks, units = cdiv(c, block_c), batch * layer.h * layer.w
        config = f"{block_c}ch x {rows_per_cta} rows vec{vec} unroll{chunks}"

        def plan(kernel):  # make_plan: one full wave of CTAs over the channel blocks
            probe = _cuda_launch(cubin, kernel, (blocks, 1, 1), threads, [], config, s, 0)
            splits = cdiv(_resident(probe, gpu, 2048 // threads) * gpu.sms, blocks)
            splits = max(1, min(splits, cdiv(units, min_passes * rows_per_cta)))
            per_split = cdiv(units, splits)
            return (blocks, cdiv(units, per_split), 1), [cdiv(per_split, chunks * rows_per_cta)]

        def templated(name):
            return _symbol("batch_norm", name, f"I{t}Li{vec}ELb1E")
        finalize_grid = (cdiv(c, finalize_channels), 1, 1)
        lanes = threads // finalize_channels
        out = []
        if pass_name == "forward":
            grid, trips = plan(templated("stats_kernel"))
            out.append(_cuda_launch(cubin, templated("stats_kernel"), grid, threads, trips, config, s,
                                    _bn_moved("stats", layer, e, s, grid[1], 2)))
            out.append(_cuda_launch(cubin, _symbol("batch_norm", "finalize_kernel", f"I{t}E"), finalize_grid,
                                    threads, [cdiv(grid[1], lanes)], config, s,
                                    _bn_moved("finalize", layer, e, s, grid[1], 2)))
            grid, trips = plan(templated("normalize_kernel"))
            out.append(_cuda_launch(cubin, templated("normalize_kernel"), grid, threads, trips, config, s,
                                    _bn_moved("normalize", layer, e, s, grid[1], 2)))
            return out
        grid, trips = plan(templated("backward_reduce_kernel"))
        out.append(_cuda_launch(cubin, templated("backward_reduce_kernel"), grid, threads, trips, config, s,
                                _bn_moved("reduce", layer, e, s, grid[1], 2)))
        out.append(_cuda_launch(cubin, _symbol("batch_norm", "backward_finalize_kernel", "E"), finalize_grid,
                                threads, [cdiv(grid[1], lanes)], config, s,
                                _bn_moved("sum", layer, e, s, grid[1], 2)))
        grid, trips = plan(templated("backward_elementwise_kernel"))
        out.append(_cuda_launch(cubin, templated("backward_elementwise_kernel"), grid, threads, trips, config, s,
                                _bn_moved("elementwise", layer, e, s, grid[1], 2)))
        return out
    cubin = cuda_cubin(gpu.arch, ROOT / "csrc" / "cuda" / "ensemble.cu")
    classes, m = layer.channels, layer.estimators
    wide = 16 // s
    vec = wide if classes % wide == 0 else 1  # and 16-byte aligned rows
    kind = {"ensemble_mean": "mean", "ensemble_scores": "scores"}[layer.op]
    name = f"{kind}_{pass_name}_kernel"
    cap = 512
    if name == "scores_backward_kernel":
        cap = min(cap, 44 * 1024 // (4 * m) // 32 * 32)
    threads = min(cap, max(32, cdiv(cdiv(classes, vec), 32) * 32))
    shared = 4 * m * threads if name == "scores_backward_kernel" else 0
    grad_reads = m + 1 if name == "mean_backward_kernel" else 2  # the mean's statistics pass reads g per estimator
    # main loop: a thread's chunks of one estimator's row, inside the loop over estimators
    return [_cuda_launch(cubin, _symbol("ensemble", name, f"I{t}Li{vec}E"), (batch, 1, 1), threads,
                         [cdiv(cdiv(classes, vec), threads), m], f"{threads} threads vec{vec}", s,
                         _ensemble_moved(layer, pass_name, batch, s, grad_reads), shared)]
