# SPDX-License-Identifier: Apache-2.0
"""Per-layer grouped-conv sweep: packed_kernels vs cuDNN grouped (F.conv2d with groups,
cudnn.benchmark on) vs the dense conv of equal FLOPs, forward and backward timed separately,
with TFLOP/s, GB/s and the fraction of the roofline bound measured on this card in this run.

Layer shapes are read off the models themselves: each model of the speed table runs one
forward on a tiny CPU batch under a dispatch mode that records every aten.convolution call,
so the sweep always covers exactly the convs the table runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import packed_kernels as pk
from packed_kernels import _backend
from packed_kernels.ops import conv as conv_ops
from packed_kernels.ops import conv_engines
from packed_kernels.ops.conv import IMPLEMENTED as CONV_BACKENDS
from packed_kernels.ops.conv_checks import conv_geometry

from . import models as zoo_rows
from . import records
from .env import device_label
from .timing import copy_bandwidth, matmul_peak, measure, rotation_count

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ConvCase:
    """One conv layer: input (C_in, H, W), weight (C_out, C_in/groups, kh, kw) and geometry."""
    model: str
    c_in: int
    c_out: int
    h: int
    w: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    count: int = 1  # how many layers of the model have this shape

    @property
    def name(self) -> str:
        return (f"{self.model} {self.c_in}->{self.c_out} {self.kernel[0]}x{self.kernel[1]}"
                f"/s{self.stride[0]} g{self.groups} @{self.h}x{self.w}")

    def out_hw(self) -> Tuple[int, int]:
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
                     zip((self.h, self.w), self.padding, self.dilation, self.kernel, self.stride))

    def flops(self, batch: int) -> int:
        ho, wo = self.out_hw()
        return 2 * batch * self.c_out * ho * wo * (self.c_in // self.groups) * self.kernel[0] * self.kernel[1]

    def dense_equivalent(self) -> "ConvCase":
        """groups=1 with channels scaled by 1/sqrt(groups) (rounded to a multiple of 8):
        the same FLOPs as this grouped conv, as a dense conv."""
        if self.groups == 1:
            return self
        scale = math.sqrt(self.groups)
        c_in = max(8, round(self.c_in / scale / 8) * 8) if self.c_in >= 8 else self.c_in
        c_out = max(8, round(self.c_out / scale / 8) * 8)
        return ConvCase(self.model, c_in, c_out, self.h, self.w, self.kernel, self.stride,
                        self.padding, self.dilation, 1, self.count)


class _ConvRecorder(TorchDispatchMode):
    """Records every 2-D convolution a forward runs: torch's (aten.convolution) and ours
    (packed_kernels::grouped_conv2d / fused_conv2d, whose insides the mode does not see)."""

    OURS = ("packed_kernels::grouped_conv2d", "packed_kernels::fused_conv2d")

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if func is torch.ops.aten.convolution.default or name in self.OURS:
            bound = {a.name: v for a, v in zip(func._schema.arguments, args)}
            bound.update(kwargs)
            x, w, padding = bound["input"], bound["weight"], list(bound["padding"])
            if len(padding) == 4:  # ours: (top, bottom, left, right)
                padding = [padding[0], padding[2]]
            if not bound.get("transposed", False) and x.dim() == 4:
                self.calls.append((tuple(x.shape[1:]), tuple(w.shape), tuple(bound["stride"]),
                                   tuple(padding), tuple(bound["dilation"]), bound["groups"]))
        return func(*args, **kwargs)


def model_conv_cases(row_keys: Sequence[str], *, arch: int = 50, image_size: int = 32,
                     num_classes: int = 100) -> List[ConvCase]:
    """The distinct conv layers of the given table rows' models, in forward order."""
    cases: Dict[tuple, ConvCase] = {}
    for key in row_keys:
        row = zoo_rows.parse_row(key)
        model, _, _ = zoo_rows.build_model(row, arch=arch, num_classes=num_classes)
        recorder = _ConvRecorder()
        with torch.no_grad(), recorder:
            model.eval()(torch.randn(1, 3, image_size, image_size))
        for (c_in, h, w), wshape, stride, padding, dilation, groups in recorder.calls:
            sig = (c_in, h, w, wshape, stride, padding, dilation, groups)
            if sig in cases:
                old = cases[sig]
                cases[sig] = ConvCase(**{**old.__dict__, "count": old.count + 1})
            else:
                cases[sig] = ConvCase(zoo_rows.MODELS[row.model].name, c_in, wshape[0], h, w,
                                      wshape[2:], stride, padding, dilation, groups)
    return list(cases.values())


@dataclass
class SweepConfig:
    batch: int = 128
    rows: Tuple[str, ...] = ("pe241-stock", "pe242-stock")
    dtypes: Tuple[str, ...] = ("fp16", "bf16", "fp32")
    layouts: Tuple[str, ...] = ("channels_last", "nchw")
    backends: Tuple[str, ...] = ()  # packed_kernels backends for "ours"; () = every kernel
                                    # backend usable here (the torch path where there is none)
    arch: int = 50
    limit: Optional[int] = None
    warmup: int = 5
    reps: int = 30

    @classmethod
    def for_device(cls, device) -> "SweepConfig":
        cfg = cls()
        if torch.device(device).type != "cuda":  # reduced real run on the CPU
            cfg.batch, cfg.dtypes, cfg.layouts, cfg.limit = 2, ("fp32",), ("nchw",), 6
            cfg.warmup, cfg.reps = 2, 3  # a shared CPU's first calls per shape are erratic
        return cfg

    def as_dict(self) -> Dict[str, object]:
        return records.config_dict(self)


def _traffic(case: ConvCase, batch: int, itemsize: int) -> Dict[str, int]:
    ho, wo = case.out_hw()
    x = batch * case.c_in * case.h * case.w * itemsize
    y = batch * case.c_out * ho * wo * itemsize
    w = case.c_out * (case.c_in // case.groups) * case.kernel[0] * case.kernel[1] * itemsize
    return {"forward": x + w + y, "input_grad": y + w + x, "weight_grad": x + y + w,
            "backward": (x + y + w) + (x + w)}  # read x, dy, w; write dx, dw


def _tensors(case: ConvCase, batch: int, dtype, layout: str, device, count: int):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    ho, wo = case.out_hw()
    sets = []
    for _ in range(count):
        x = torch.randn(batch, case.c_in, case.h, case.w, device=device, dtype=dtype).contiguous(memory_format=fmt)
        w = (torch.randn(case.c_out, case.c_in // case.groups, *case.kernel, device=device, dtype=dtype)
             * (case.c_in // case.groups * case.kernel[0] * case.kernel[1]) ** -0.5).contiguous(memory_format=fmt)
        g = torch.randn(batch, case.c_out, ho, wo, device=device, dtype=dtype).contiguous(memory_format=fmt)
        sets.append((x, w, g))
    return sets


def _cudnn_passes(case: ConvCase, sets) -> Dict[str, callable]:
    n = len(sets)
    args = (list(case.stride), list(case.padding), list(case.dilation), False, [0, 0], case.groups)

    def conv(i):
        x, w, _ = sets[i % n]
        return F.conv2d(x, w, None, case.stride, case.padding, case.dilation, case.groups)

    def backward(mask):
        def run(i):
            x, w, g = sets[i % n]
            return torch.ops.aten.convolution_backward(g, x, w, None, *args, mask)
        return run
    return {"forward": conv, "input_grad": backward([True, False, False]),
            "weight_grad": backward([False, True, False]), "backward": backward([True, True, False])}


def ours_backends(device: torch.device, dtype: torch.dtype) -> List[str]:
    """The conv kernel backends that can run here (the interpreter and emulator are not for
    timing); the torch path through the custom op where none can."""
    found = [b for b in CONV_BACKENDS if b in ("triton", "cuda")
             and _backend.unavailable_reason(b, device, dtype) is None and device.type == "cuda"]
    return found or ["torch"]


def _ours_passes(case: ConvCase, sets, backend: Optional[str]) -> Tuple[Dict[str, callable], str]:
    """packed_kernels' forward, backward (both grads, as autograd runs it), and the input-grad
    and weight-grad primitives alone (on the engines "auto" measured for them, where auto)."""
    n = len(sets)
    x0, w0, g0 = sets[0]
    stride, padding4, dilation = conv_geometry("grouped_conv2d", x0, w0, None, case.stride,
                                               case.padding, case.dilation, case.groups)
    chosen = conv_ops.choose_backend("grouped_conv2d", backend, x0, w0, stride, case.groups)
    geometry = (list(stride), list(padding4), list(dilation), case.groups)
    if chosen == conv_engines.AUTO:
        grad_engines = conv_engines.auto_grad_engines(g0, x0, w0, *geometry,
                                                      conv_engines.NO_PROLOGUE, True, True)
    else:
        grad_engines = (chosen, chosen)

    def forward(i):
        x, w, _ = sets[i % n]
        return pk.grouped_conv2d(x, w, None, case.stride, case.padding, case.dilation, case.groups,
                                 backend=chosen)

    def backward(i):
        x, w, g = sets[i % n]
        return torch.ops.packed_kernels.grouped_conv2d_backward(g, x, w, False, *geometry, chosen, True, True)

    def one_grad(engines):
        def run(i):
            x, w, g = sets[i % n]
            return conv_engines.conv_grads(engines, g, x, w, *geometry)
        return run
    return {"forward": forward, "backward": backward,
            "input_grad": one_grad((grad_engines[0], None)),
            "weight_grad": one_grad((None, grad_engines[1]))}, chosen


def run(cfg: SweepConfig, device, progress: bool = True) -> Dict[str, object]:
    """Every (layer, dtype, layout) of `cfg` timed; without `progress` each row is printed as
    it is measured. Interrupted (SIGINT, a time limit), it returns what it has measured."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cases = model_conv_cases(cfg.rows, arch=cfg.arch)
    if cfg.limit:
        cases = cases[:cfg.limit]
    roofline = {"copy": copy_bandwidth(device), "matmul": {}}
    for name in cfg.dtypes:
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32  # as cuDNN convs run
        try:
            roofline["matmul"][name] = matmul_peak(device, DTYPES[name])
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    rows = []
    jobs = [(c, d, l) for d in cfg.dtypes for l in cfg.layouts for c in cases]
    try:
        _sweep(cfg, jobs, device, roofline, rows, progress)
    except KeyboardInterrupt:  # a time limit (SIGINT): keep what was measured
        rows.append({"layer": "(sweep interrupted)", "dtype": "", "layout": "", "batch": cfg.batch,
                     "device": device_label(device), "error": "interrupted before the last layer"})
    return {"rows": rows, "roofline": roofline}


def _sweep(cfg: SweepConfig, jobs, device, roofline, rows: List[Dict[str, object]], progress: bool):
    from tqdm import tqdm
    copy_gbps = roofline["copy"]["gbps"]
    torch_engine = "cudnn" if device.type == "cuda" else "torch-cpu"
    for case, dname, layout in tqdm(jobs, desc=f"conv sweep [{device_label(device)}]",
                                    disable=not progress, leave=False):
        dtype = DTYPES[dname]
        peak_tflops = roofline["matmul"][dname]["tflops"]
        impls = {}
        grouped_sets = None
        try:
            n = rotation_count(sum(t.numel() * t.element_size() for t in
                                   _tensors(case, 1, dtype, layout, "cpu", 1)[0]) * cfg.batch, device)
            grouped_sets = _tensors(case, cfg.batch, dtype, layout, device, n)
            impls["cudnn_grouped"] = (case, _cudnn_passes(case, grouped_sets), torch_engine)
            for backend in cfg.backends or ours_backends(device, dtype):
                try:
                    ours, chosen = _ours_passes(case, grouped_sets, backend)
                except Exception as exc:  # this backend cannot run the layer; the others still do
                    rows.append({"layer": case.name, "impl": "packed_kernels", "engine": backend,
                                 "dtype": dname, "layout": layout, "batch": cfg.batch,
                                 "device": device_label(device),
                                 "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]})
                    continue
                impls[f"packed_kernels:{chosen}"] = (case, ours, chosen)
            dense = case.dense_equivalent()
            dense_sets = _tensors(dense, cfg.batch, dtype, layout, device, n)
            impls["dense_equal_flops"] = (dense, _cudnn_passes(dense, dense_sets), torch_engine)
        except Exception as exc:
            rows.append({"layer": case.name, "dtype": dname, "layout": layout, "batch": cfg.batch,
                         "device": device_label(device),
                         "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]})
            continue
        for impl_key, (shape, passes, engine) in impls.items():
            impl = impl_key.split(":")[0]
            for pass_name, fn in passes.items():
                row = {"layer": case.name, "count": case.count, "impl": impl, "engine": engine,
                       "pass": pass_name, "dtype": dname, "layout": layout, "batch": cfg.batch,
                       "shape": {k: v for k, v in shape.__dict__.items() if k != "count"},
                       "device": device_label(device)}
                try:
                    stats = measure(fn, device, warmup=cfg.warmup, reps=cfg.reps)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    rows.append(row)
                    continue
                flops = shape.flops(cfg.batch) * (2 if pass_name == "backward" else 1)
                nbytes = _traffic(shape, cfg.batch, dtype.itemsize)[pass_name]
                bound = max(flops / (peak_tflops * 1e12), nbytes / (copy_gbps * 1e9))
                row.update({"time": stats.as_dict(), "flops": flops, "bytes": nbytes,
                            "tflops": flops / stats.median / 1e12, "gbps": nbytes / stats.median / 1e9,
                            "intensity": flops / nbytes, "roofline_fraction": bound / stats.median})
                rows.append(row)
                if not progress:  # no progress bar: each measurement as it lands
                    print(format_row(row), flush=True)
        del grouped_sets, impls


def speedups(rows: List[Dict[str, object]], baseline: str = "cudnn_grouped"
             ) -> List[Dict[str, object]]:
    """Per (layer, dtype, layout, pass, our backend): baseline time / our time, and the dense
    equal-FLOPs conv's time / our time."""
    def key(r):
        return (r["layer"], r["dtype"], r["layout"], r["pass"])
    ok = [r for r in rows if "error" not in r and "impl" in r]
    base = {key(r): r for r in ok if r["impl"] == baseline}
    dense = {key(r): r for r in ok if r["impl"] == "dense_equal_flops"}
    out = []
    for r in ok:
        if r["impl"] != "packed_kernels" or key(r) not in base:
            continue
        d = dense.get(key(r))
        ours_kernels, base_kernels = r.get("kernel_time"), base[key(r)].get("kernel_time")
        out.append({"layer": r["layer"], "dtype": r["dtype"], "layout": r["layout"],
                    "pass": r["pass"], "backend": r["engine"],
                    "speedup": base[key(r)]["time"]["median"] / r["time"]["median"],
                    "kernel_speedup": base_kernels / ours_kernels if ours_kernels and base_kernels else None,
                    "vs_dense": d["time"]["median"] / r["time"]["median"] if d else None,
                    "ours": r, "baseline": base[key(r)], "dense": d, "device": r["device"]})
    return out


def geomean_speedups(sp: List[Dict[str, object]], field: str = "speedup"):
    """[((backend, dtype, layout, pass), geometric-mean speed-up, layers)] of `field`
    ("speedup": per call as measured; "kernel_speedup": GPU kernel time alone)."""
    groups: Dict[tuple, List[float]] = {}
    for s in sp:
        if s.get(field):
            groups.setdefault((s["backend"], s["dtype"], s["layout"], s["pass"]), []).append(s[field])
    return [(k, math.exp(sum(math.log(v) for v in vals) / len(vals)), len(vals))
            for k, vals in groups.items()]


def format_row(r: Dict[str, object]) -> str:
    if "error" in r:
        return (f"{r['layer']:46} {r['dtype']:5} {r['layout']:13} {r.get('pass', ''):11} "
                f"{r.get('impl', ''):31} failed: {r['error']}  {r['device']}")
    impl = f"{r['impl']} ({r['engine']})"
    return (f"{r['layer']:46} {r['dtype']:5} {r['layout']:13} {r['pass']:11} {impl:31} "
            f"{r['time']['median'] * 1e6:11.1f} {r['tflops']:8.3f} {r['gbps']:8.1f} "
            f"{r['roofline_fraction']:5.0%}  {r['device']}")


def format_result(result: Dict[str, object], with_rows: bool = True) -> str:
    """The sweep as text: the roofs, each row (unless already printed as measured), the
    geometric-mean speed-ups and the shape classes where a kernel beat cuDNN."""
    rows = result["rows"]
    if not rows:
        return "conv sweep: no layers"
    device = rows[0]["device"]
    roof = result["roofline"]
    lines = [f"== conv sweep: batch {rows[0]['batch']}; roofs measured now: copy {roof['copy']['gbps']:.1f} GB/s, matmul "
             + ", ".join(f"{k} {v['tflops']:.2f} TFLOP/s" for k, v in roof["matmul"].items())
             + f" — {device}" + ("  [CPU NUMBERS]" if device.startswith("cpu") else ""),
             f"{'layer':46} {'dtype':5} {'layout':13} {'pass':11} {'impl (engine)':31} {'median us':>11} "
             f"{'kernel us':>10} {'TFLOP/s':>8} {'GB/s':>8} {'roof':>5}  device"]
    if with_rows:
        lines.extend(format_row(r) for r in rows)
    sp = speedups(rows)
    if sp:
        lines.append("")
        lines.append("packed_kernels speed-up over cuDNN grouped (geometric mean per dtype/layout/pass; "
                     "per call, host included, and GPU kernels alone):")
        kernel_gm = {k: gm for k, gm, _ in geomean_speedups(sp, "kernel_speedup")}
        for k, gm, n in geomean_speedups(sp):
            backend, dtype, layout, pass_name = k
            kernels = f"{kernel_gm[k]:.2f}×" if k in kernel_gm else "—"
            lines.append(f"  {backend:7} {dtype:5} {layout:13} {pass_name:11} {gm:.2f}× per call, "
                         f"{kernels} kernels, over {n} layers  {device}")
    return "\n".join(lines)
