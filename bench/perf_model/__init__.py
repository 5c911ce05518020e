# SPDX-License-Identifier: Apache-2.0
"""A CPU-only performance model of the grouped-conv, batch-norm and ensemble kernels, read off
their SASS: per layer of the Packed-Ensembles ResNets and per pass, what the library launches
(Triton and CUDA C++), compiled for a GPU target, its main loop's instruction mix, and a modelled
time against the card's roofline; per model, a whole training step. Every figure it prints is modelled, not measured. docs/performance_model.md
describes it."""

from __future__ import annotations

import math
import threading
from typing import Dict, List, Optional, Sequence

from .gpus import GPUS
from . import streams
from .kernels import PASSES, ROOT, cuda_cubin, cuda_launches, triton_launches
from .model import compulsory_bytes, model_launch, roofline_seconds
from .streams import STREAM_PASSES, stream_layers

BACKENDS = ("triton", "cuda")
DEFAULT_MODELS = ("pe241", "pe242")


def models_arg(text: str):
    return tuple(m.strip() for m in text.split(",") if m.strip())


def layers(models: Sequence[str] = DEFAULT_MODELS):
    """The distinct conv layers of the models' CIFAR-100 ResNet-50s, traced (not listed), and how
    many times each model runs each: [(layer, {model name: count})]."""
    from ..conv_sweep import model_conv_cases
    found: Dict[tuple, list] = {}
    for model in models:
        for case in model_conv_cases([f"{model}-stock"]):
            shape = (case.c_in, case.c_out, case.h, case.w, case.kernel, case.stride, case.padding,
                     case.dilation, case.groups)
            entry = found.setdefault(shape, [case, {}])
            entry[1][case.model] = case.count
    return [tuple(v) for v in found.values()]


def run(gpu_key: str = "h100", dtype: str = "fp16", models: Sequence[str] = DEFAULT_MODELS,
        backends: Sequence[str] = BACKENDS, passes: Sequence[str] = PASSES, batch: int = 128,
        progress: bool = False, streams: bool = True) -> Dict[str, object]:
    """Every conv layer x pass, then (streams) every batch norm and ensemble op x forward/backward,
    per backend."""
    gpu = GPUS[gpu_key]
    cases = layers(models)
    stream_cases = stream_layers(models) if streams else []
    model_names = sorted({m for _, counts in cases + stream_cases for m in counts})
    if "cuda" in backends:  # nvcc runs beside the Triton compiles (both CPU-bound, one core each)
        sources = ["conv", "batch_norm", "ensemble"] if streams else ["conv"]
        prebuild = threading.Thread(target=lambda: [cuda_cubin(gpu.arch, ROOT / "csrc" / "cuda" / f"{n}.cu")
                                                    for n in sources], daemon=True)
        prebuild.start()
    rows: List[Dict[str, object]] = []
    for backend in backends:
        jobs = [(layer, counts, p, "conv") for layer, counts in cases for p in passes]
        jobs += [(layer, counts, p, layer.op) for layer, counts in stream_cases for p in STREAM_PASSES]
        for layer, counts, pass_name, op in jobs:
            row = _model_row(backend, layer, counts, pass_name, op, batch, dtype, gpu)
            rows.append(row)
            if progress:
                print(format_row(row), flush=True)
    return {"gpu": gpu_key, "gpu_name": gpu.name, "arch": gpu.arch, "dtype": dtype, "batch": batch,
            "models": list(models), "label": "modelled (SASS-level model, no GPU run)",
            "rows": rows, "summary": summary(rows, model_names),
            "whole_model": whole_model(rows, model_names)}


def _model_row(backend, layer, counts, pass_name, op, batch, dtype, gpu) -> Dict[str, object]:
    conv = op == "conv"
    compulsory = (compulsory_bytes if conv else streams.compulsory_bytes)(layer, pass_name, batch, dtype)
    row = {"layer": layer.name, "op": op, "counts": counts, "backend": backend, "gpu": gpu.key,
           "dtype": dtype, "pass": pass_name, "flops": layer.flops(batch), "compulsory_bytes": compulsory}
    if conv:
        launcher = triton_launches if backend == "triton" else cuda_launches
    else:
        launcher = streams.triton_stream_launches if backend == "triton" else streams.cuda_stream_launches
    try:
        launches = launcher(layer, pass_name, batch, dtype, gpu)
        # a conv's first launch carries the compulsory bytes; a stream launch its own moved bytes
        modelled = [model_launch(launch, gpu, compulsory if conv and i == 0 else 0)
                    for i, launch in enumerate(launches)]
    except Exception as error:  # one layer's failure is reported, not fatal
        row["error"] = f"{type(error).__name__}: {error}"
        return row
    seconds = sum(m.seconds for m in modelled)
    roof = (roofline_seconds if conv else streams.roofline_seconds)(layer, pass_name, batch, dtype, gpu)
    kernels = [i for i, launch in enumerate(launches) if launch.cubin is not None]
    # the main launch: a conv's first; a stream op's longest kernel
    main = 0 if conv else max(kernels, key=lambda i: modelled[i].seconds)
    first, m = launches[main], modelled[main]
    moved = sum(launch.extra_dram_bytes for launch in launches) + (compulsory if conv else 0)
    row.update({
        "kernel": first.kernel, "config": first.config, "grid": list(first.grid),
        "launches": len(launches), "registers": m.registers, "shared_bytes": m.shared_bytes,
        # as the code is written: re-reads, split partials' round trips, glue passes
        "moved_bytes": moved,
        "spill_instructions": sum(x.spill_instructions for x in modelled),
        "blocks_per_sm": m.blocks_per_sm, "waves": m.waves, "trips": first.trips,
        "main_loop": {"instructions": m.main_loop_instructions, "tensor": m.main_loop_tensor,
                      "mix": m.per_iteration},
        "generic_shared_suspects": m.generic_shared_suspects,
        "terms_us": {k: v * 1e6 for k, v in m.times.items()},  # issue, tensor, dram, l2
        "modelled_us": seconds * 1e6, "bound": m.bound,
        "roofline_us": roof * 1e6, "fraction": roof / seconds,
    })
    if conv:
        row["geometry"] = conv_geometry(layer, batch)
    else:
        row["per_launch"] = [{"kernel": launch.kernel[:60], "modelled_us": x.seconds * 1e6, "bound": x.bound,
                              "moved_bytes": launch.extra_dram_bytes}
                             for launch, x in zip(launches, modelled)]
    return row


def conv_geometry(layer, batch: int) -> Dict[str, object]:
    """What the engine decisions key a conv on (packed_kernels.ops.conv_engines), so that measured
    decisions join with modelled layers (bench/model_vs_measured.py)."""
    oh, ow = layer.out_hw()
    return {"weight": [layer.c_out, layer.c_in // layer.groups, *layer.kernel], "groups": layer.groups,
            "stride": list(layer.stride), "padding": [layer.padding[0]] * 2 + [layer.padding[1]] * 2,
            "dilation": list(layer.dilation), "pixels": 1 << max(batch * oh * ow - 1, 0).bit_length()}


def geomean(values) -> Optional[float]:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summary(rows, model_names) -> Dict[str, Dict[str, object]]:
    """Per backend, op and pass: the geometric mean of the distinct layers' modelled fractions and,
    per model, the modelled time of that pass over all its layers (each layer times its count)."""
    result: Dict[str, Dict[str, object]] = {}
    for backend in sorted({r["backend"] for r in rows}):
        for op in dict.fromkeys(r["op"] for r in rows):
            for pass_name in (*PASSES, *STREAM_PASSES):
                group = [r for r in rows if (r["backend"], r["op"], r["pass"]) == (backend, op, pass_name)]
                mine = [r for r in group if "error" not in r]
                if not group:
                    continue
                result[f"{backend}/{op}/{pass_name}"] = {
                    "geomean_fraction": geomean(r["fraction"] for r in mine),
                    "layers": len(mine), "errors": len(group) - len(mine),
                    "modelled_step_us": {model: sum(r["modelled_us"] * r["counts"].get(model, 0)
                                                    for r in mine) for model in model_names},
                }
    return result


def whole_model(rows, model_names) -> Dict[str, Dict[str, object]]:
    """Per backend and model, one training step on the library's ops, unfused: every conv's three
    passes, every batch norm's forward and backward (their split-partial sums included), the
    ensemble mean's forward and backward; each layer times its count. Modelled and roofline time,
    their ratio, and the layers that could not be modelled (left out of the sums)."""
    parts = {"conv": PASSES, "batch_norm": STREAM_PASSES, "ensemble_mean": STREAM_PASSES}
    result: Dict[str, Dict[str, object]] = {}
    for backend in sorted({r["backend"] for r in rows}):
        for model in model_names:
            used = [r for r in rows if r["backend"] == backend and r["pass"] in parts.get(r["op"], ())
                    and r["counts"].get(model)]
            ok = [r for r in used if "error" not in r]
            modelled = {op: sum(r["modelled_us"] * r["counts"][model] for r in ok if r["op"] == op) for op in parts}
            roof = sum(r["roofline_us"] * r["counts"][model] for r in ok)
            total = sum(modelled.values())
            result[f"{backend}/{model}"] = {"modelled_us": total, "roofline_us": roof,
                                            "fraction": roof / total if total else None,
                                            "modelled_us_by_op": modelled, "missing": len(used) - len(ok)}
    return result


def format_row(r: Dict[str, object]) -> str:
    head = f"{r['backend']:6} {r['pass']:11} {r['layer']:48}"
    if "error" in r:
        return f"{head} ERROR {r['error'][:120]}"
    mix = r["main_loop"]
    return (f"{head} {r['config']:22} {r['modelled_us']:8.1f} us modelled ({r['bound']:6}) "
            f"roof {r['roofline_us']:7.1f} us  fraction {r['fraction']:.3f}  "
            f"loop {mix['instructions']:4} instr / {mix['tensor']:2} mma  occ {r['blocks_per_sm']}")


def format_result(result: Dict[str, object], with_rows: bool = True) -> str:
    lines = [f"modelled on {result['gpu_name']} (sm_{result['arch']}), {result['dtype']}, batch "
             f"{result['batch']}: SASS-level model, no GPU run - every figure is modelled"]
    if with_rows:
        lines += [format_row(r) for r in result["rows"]]
    lines.append("")
    lines.append("| backend | op | pass | geomean modelled fraction | layers | modelled time per step (us) |")
    lines.append("|---|---|---|---|---|---|")
    for key, s in result["summary"].items():
        backend, op, pass_name = key.split("/")
        steps = ", ".join(f"{m}: {t:.0f}" for m, t in s["modelled_step_us"].items())
        g = "-" if s["geomean_fraction"] is None else f"{s['geomean_fraction']:.3f}"
        lines.append(f"| {backend} | {op} | {pass_name} | {g} | {s['layers']}"
                     f"{' (' + str(s['errors']) + ' failed)' if s['errors'] else ''} | {steps} |")
    lines.append("")
    lines.append("Whole model, one training step on the library's ops, unfused (convs x 3 passes, batch "
                 "norms and the ensemble mean forward + backward, each layer times its count):")
    lines.append("| backend | model | modelled (us) | roofline (us) | fraction | conv / batch norm / ensemble (us) |")
    lines.append("|---|---|---|---|---|---|")
    for key, w in result["whole_model"].items():
        backend, model = key.split("/", 1)
        ops = " / ".join(f"{t:.0f}" for t in w["modelled_us_by_op"].values())
        fraction = "-" if w["fraction"] is None else f"{w['fraction']:.3f}"
        missing = f" ({w['missing']} layers not modelled)" if w["missing"] else ""
        lines.append(f"| {backend} | {model} | {w['modelled_us']:.0f}{missing} | {w['roofline_us']:.0f} | "
                     f"{fraction} | {ops} |")
    return "\n".join(lines)
