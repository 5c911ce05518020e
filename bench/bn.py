# SPDX-License-Identifier: Apache-2.0
"""Batch-norm benchmark: training forward and forward+backward of BN + ReLU on the PE model's
activation shapes, pk.batch_norm per backend vs torch (cuDNN BN then ReLU on a GPU), as GB/s
of compulsory traffic against the card's copy bandwidth measured in the same run
(target: fwd+bwd >= 85% of copy bandwidth on an H100)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import packed_kernels as pk
from packed_kernels import _backend
from packed_kernels.ops.batch_norm import IMPLEMENTED as BN_BACKENDS

from .conv_sweep import DTYPES, model_conv_cases
from . import records
from .env import device_label
from .timing import copy_bandwidth, measure, rotation_count

LAYOUTS = ("channels_last", "nchw")


@dataclass
class BNConfig:
    batch: int = 128
    rows: Tuple[str, ...] = ("pe241-stock",)
    arch: int = 50
    dtypes: Tuple[str, ...] = ("fp16",)
    layouts: Tuple[str, ...] = LAYOUTS
    backends: Tuple[str, ...] = ()  # () = torch reference + every kernel backend usable here
    limit: int = 0
    warmup: int = 5
    reps: int = 30
    block: str = "layer2.1"  # the bottleneck block timed whole, stock vs fused (PE-(2,4,1))

    @classmethod
    def for_device(cls, device) -> "BNConfig":
        cfg = cls()
        if torch.device(device).type != "cuda":  # reduced real run on the CPU
            cfg.batch, cfg.arch, cfg.dtypes, cfg.layouts, cfg.limit = 2, 20, ("fp32",), ("nchw",), 3
            cfg.block = "layer2.1"
            cfg.warmup, cfg.reps = 1, 3
        return cfg

    def as_dict(self) -> Dict[str, object]:
        return records.config_dict(self)


def activation_shapes(cfg: BNConfig) -> List[Tuple[int, int, int]]:
    """Distinct (C, H, W) of the conv outputs (each feeds a BatchNorm in a ResNet)."""
    shapes = []
    for case in model_conv_cases(cfg.rows, arch=cfg.arch):
        shape = (case.c_out, *case.out_hw())
        if shape not in shapes:
            shapes.append(shape)
    return shapes[:cfg.limit or None]


def usable_backends(device: torch.device, dtype: torch.dtype) -> List[str]:
    kernels = [b for b in BN_BACKENDS if b in ("triton", "cuda") and device.type == "cuda"
               and _backend.unavailable_reason(b, device, dtype) is None]
    return ["torch"] + kernels


def _traffic(numel: int, itemsize: int, pass_name: str) -> int:
    # forward: read x, write y; forward+backward adds: read dy and x (or y), write dx
    return numel * itemsize * (2 if pass_name == "train_forward" else 5)


def run(cfg: BNConfig, device, progress: bool = True) -> Dict[str, object]:
    from tqdm import tqdm
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    copy = copy_bandwidth(device)
    shapes = activation_shapes(cfg)
    rows = []
    jobs = [(s, d, l) for d in cfg.dtypes for l in cfg.layouts for s in shapes]
    torch_engine = "cudnn" if device.type == "cuda" else "torch-cpu"
    for (c, h, w), dname, layout in tqdm(jobs, desc=f"batch norm [{device_label(device)}]",
                                         disable=not progress, leave=False):
        dtype = DTYPES[dname]
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        numel = cfg.batch * c * h * w
        n = rotation_count(numel * dtype.itemsize * 2, device)
        xs = [torch.randn(cfg.batch, c, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)
              .requires_grad_() for _ in range(n)]
        gs = [torch.randn_like(x) for x in xs]
        weight = torch.rand(c, device=device, requires_grad=True)
        bias = torch.randn(c, device=device, requires_grad=True)
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)

        def stock(i):
            return F.relu(F.batch_norm(xs[i % n], rm, rv, weight, bias, True, 0.1, 1e-5))

        def ours(backend):
            return lambda i: pk.batch_norm(xs[i % n], rm, rv, weight, bias, training=True,
                                           activation="relu", backend=backend)

        impls = {f"torch ({torch_engine})": stock}
        for b in cfg.backends or usable_backends(device, dtype):
            impls[f"packed_kernels ({b})"] = ours(b)
        for impl, forward in impls.items():
            for pass_name in ("train_forward", "train_forward_backward"):
                def step(i, forward=forward, pass_name=pass_name):
                    y = forward(i)
                    if pass_name == "train_forward_backward":
                        torch.autograd.grad(y, (xs[i % n], weight, bias), gs[i % n])
                row = {"shape": [cfg.batch, c, h, w], "impl": impl, "pass": pass_name,
                       "dtype": dname, "layout": layout, "batch": cfg.batch,
                       "device": device_label(device)}
                try:
                    stats = measure(step, device, warmup=cfg.warmup, reps=cfg.reps)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    rows.append(row)
                    continue
                nbytes = _traffic(numel, dtype.itemsize, pass_name)
                gbps = nbytes / stats.median / 1e9
                row.update({"time": stats.as_dict(), "bytes": nbytes, "gbps": gbps,
                            "fraction_of_copy": gbps / copy["gbps"]})
                rows.append(row)
        del xs, gs
    return {"rows": rows, "copy_bandwidth": copy, "block_rows": block_rows(cfg, device)}


class _CountPackedOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("packed_kernels::"):
            key = name.split("::")[1]
            self.calls[key] = self.calls.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def packed_kernel_calls(fn, *args) -> Dict[str, int]:
    """packed_kernels op name -> calls made by one fn(*args): shows which path a row timed."""
    with _CountPackedOps() as counter:
        fn(*args)
    return counter.calls


def block_rows(cfg: BNConfig, device) -> List[Dict[str, object]]:
    """One PE-(2,4,1) ResNet block of packed_kernels.models (cfg.block, e.g. "layer2.1", a
    ResNet-50 bottleneck) on its real input shape, timed whole: inference forward and training
    forward+backward, the model built with torch.nn.BatchNorm2d and run on torch's modules
    (Conv2d, BatchNorm2d, ReLU, add on cuDNN) vs the model's own block on the default path
    (torch's ops too, in place, with BN folded into the conv at inference; the fused kernel path
    needs an explicit kernel backend). fp16 autocast on a GPU, fp32 on the CPU. Each row records
    the packed_kernels op calls of one step ("kernel_calls")."""
    from . import models as zoo_rows
    device = torch.device(device)
    rows = []
    for layout in cfg.layouts:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        for key in ("pe241-stock", "pe241-packed_kernels"):
            row = zoo_rows.parse_row(key)
            model, _, _ = zoo_rows.build_model(row, arch=cfg.arch)
            block = model.get_submodule(cfg.block)
            seen = {}

            def record_input(module, args, output):  # returns None: the output is left alone
                seen.setdefault("shape", tuple(args[0].shape[1:]))
            hook = block.register_forward_hook(record_input)
            with torch.no_grad():
                model.eval()(torch.randn(1, 3, 32, 32))
            hook.remove()
            block = block.to(device, memory_format=fmt)
            n = 4
            xs = [torch.randn(cfg.batch, *seen["shape"], device=device).contiguous(memory_format=fmt)
                  .requires_grad_() for _ in range(n)]
            amp = torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")
            grads = {}

            def infer(i):
                with torch.inference_mode(), amp:
                    return block(xs[i % n])

            def train(i):
                with amp:
                    y = block(xs[i % n])
                g = grads.setdefault("g", torch.randn_like(y))
                torch.autograd.grad(y, [xs[i % n], *block.parameters()], g)

            for pass_name, fn, mode in (("inference", infer, False), ("train_forward_backward", train, True)):
                block.train(mode)
                out = {"block": cfg.block, "model": "PE-(2,4,1)", "impl": row.impl, "pass": pass_name,
                       "input_shape": [cfg.batch, *seen["shape"]], "layout": layout,
                       "precision": "fp16 autocast" if device.type == "cuda" else "fp32",
                       "device": device_label(device)}
                try:
                    out["kernel_calls"] = packed_kernel_calls(fn, 0)
                    out["time"] = measure(fn, device, warmup=cfg.warmup, reps=cfg.reps).as_dict()
                except Exception as exc:
                    out["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                rows.append(out)
            del model, block, xs
    return rows


def block_speedups(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """packed_kernels block vs stock block, per layout and pass: stock time / ours time."""
    ok = {(r["layout"], r["pass"], r["impl"]): r for r in rows if "error" not in r}
    return [{"layout": layout, "pass": p, "speedup": ok[(layout, p, "stock")]["time"]["median"] / r["time"]["median"],
             "device": r["device"]}
            for (layout, p, impl), r in ok.items() if impl == "packed_kernels" and (layout, p, "stock") in ok]


def format_result(result: Dict[str, object]) -> str:
    rows = result["rows"]
    if not rows:
        return "batch norm: no shapes"
    device = rows[0]["device"]
    lines = [f"== batch norm + ReLU (training), batch {rows[0]['batch']}; copy bandwidth "
             f"{result['copy_bandwidth']['gbps']:.1f} GB/s — {device}"
             + ("  [CPU NUMBERS]" if device.startswith("cpu") else ""),
             f"{'shape':22} {'dtype':5} {'layout':13} {'pass':23} {'impl':26} {'median us':>11} "
             f"{'GB/s':>8} {'of copy':>8}  device"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        if "error" in r:
            lines.append(f"{shape:22} {r['dtype']:5} {r['layout']:13} {r['pass']:23} {r['impl']:26} "
                         f"failed: {r['error']}  {r['device']}")
            continue
        lines.append(f"{shape:22} {r['dtype']:5} {r['layout']:13} {r['pass']:23} {r['impl']:26} "
                     f"{r['time']['median'] * 1e6:11.1f} {r['gbps']:8.1f} {r['fraction_of_copy']:7.0%}  "
                     f"{r['device']}")
    blocks = result.get("block_rows") or []
    if blocks:
        b0 = blocks[0]
        lines += ["", f"== {b0['model']} ResNet block {b0['block']}, input {'x'.join(map(str, b0['input_shape']))}, "
                  f"{b0['precision']} — {b0['device']}"]
        for r in blocks:
            if "error" in r:
                lines.append(f"  {r['layout']:13} {r['pass']:23} {r['impl']:15} failed: {r['error']}  {r['device']}")
                continue
            t = r["time"]
            calls = ", ".join(f"{k} x{v}" for k, v in r.get("kernel_calls", {}).items()
                              if not k.endswith("_backward"))
            lines.append(f"  {r['layout']:13} {r['pass']:23} {r['impl']:15} {t['median'] * 1e6:11.1f} us "
                         f"[{t['q1'] * 1e6:.1f}-{t['q3'] * 1e6:.1f}]  {calls or 'torch modules'}  {r['device']}")
        for sp in block_speedups(blocks):
            lines.append(f"  packed_kernels block vs stock, {sp['layout']}, {sp['pass']}: {sp['speedup']:.2f}×  {sp['device']}")
    return "\n".join(lines)
