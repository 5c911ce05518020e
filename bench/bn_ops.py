"""Batch-norm benchmark: training forward and forward+backward of BN + ReLU on the PE model's
activation shapes, pk.batch_norm per backend vs torch (cuDNN BN then ReLU on a GPU), as GB/s
of compulsory traffic against the card's copy bandwidth measured in the same run
(target: fwd+bwd >= 85% of copy bandwidth on an H100)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

import packed_kernels as pk
from packed_kernels import _backend
from packed_kernels.ops.batch_norm import IMPLEMENTED as BN_BACKENDS

from .conv_sweep import DTYPES, model_conv_cases
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

    @classmethod
    def for_device(cls, device) -> "BNConfig":
        cfg = cls()
        if torch.device(device).type != "cuda":  # reduced real run on the CPU
            cfg.batch, cfg.arch, cfg.dtypes, cfg.layouts, cfg.limit = 2, 20, ("fp32",), ("nchw",), 3
            cfg.warmup, cfg.reps = 1, 3
        return cfg

    def as_dict(self) -> Dict[str, object]:
        d = dict(self.__dict__)
        for k in ("rows", "dtypes", "layouts", "backends"):
            d[k] = list(d[k])
        return d


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
    return {"rows": rows, "copy_bandwidth": copy}


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
    return "\n".join(lines)
