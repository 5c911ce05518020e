"""A CPU-only performance model of the grouped-conv kernels, read off their SASS: per conv layer
of the Packed-Ensembles ResNets and per pass, what the library launches (Triton and CUDA C++),
compiled for a GPU target, its main loop's instruction mix, and a modelled time against the
card's roofline. Every figure it prints is modelled, not measured. docs/performance_model.md
describes it."""

from __future__ import annotations

import math
import threading
from typing import Dict, List, Optional, Sequence

from .gpus import GPUS
from .kernels import PASSES, cuda_cubin, cuda_launches, triton_launches
from .model import compulsory_bytes, model_launch, roofline_seconds

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
        progress: bool = False) -> Dict[str, object]:
    gpu = GPUS[gpu_key]
    cases = layers(models)
    model_names = sorted({m for _, counts in cases for m in counts})
    if "cuda" in backends:  # nvcc runs beside the Triton compiles (both CPU-bound, one core each)
        prebuild = threading.Thread(target=cuda_cubin, args=(gpu.arch,), daemon=True)
        prebuild.start()
    rows: List[Dict[str, object]] = []
    for backend in backends:
        launcher = triton_launches if backend == "triton" else cuda_launches
        for layer, counts in cases:
            for pass_name in passes:
                compulsory = compulsory_bytes(layer, pass_name, batch, dtype)
                row = {"layer": layer.name, "counts": counts, "backend": backend, "gpu": gpu_key,
                       "dtype": dtype, "pass": pass_name, "flops": layer.flops(batch),
                       "compulsory_bytes": compulsory}
                try:
                    launches = launcher(layer, pass_name, batch, dtype, gpu)
                    modelled = [model_launch(launch, gpu, compulsory if i == 0 else 0)
                                for i, launch in enumerate(launches)]
                except Exception as error:  # one layer's failure is reported, not fatal
                    row["error"] = f"{type(error).__name__}: {error}"
                    rows.append(row)
                    continue
                seconds = sum(m.seconds for m in modelled)
                roof = roofline_seconds(layer, pass_name, batch, dtype, gpu)
                first, m = launches[0], modelled[0]
                row.update({
                    "kernel": first.kernel, "config": first.config, "grid": list(first.grid),
                    "launches": len(launches), "registers": m.registers, "shared_bytes": m.shared_bytes,
                    # as the code is written: the compulsory bytes plus split partials' round trips
                    "moved_bytes": compulsory + sum(launch.extra_dram_bytes for launch in launches),
                    "spill_instructions": sum(x.spill_instructions for x in modelled),
                    "blocks_per_sm": m.blocks_per_sm, "waves": m.waves, "trips": first.trips,
                    "main_loop": {"instructions": m.main_loop_instructions, "tensor": m.main_loop_tensor,
                                  "mix": m.per_iteration},
                    "generic_shared_suspects": m.generic_shared_suspects,
                    "terms_us": {k: v * 1e6 for k, v in m.times.items()},  # issue, tensor, dram, l2
                    "modelled_us": seconds * 1e6, "bound": m.bound,
                    "roofline_us": roof * 1e6, "fraction": roof / seconds,
                })
                rows.append(row)
                if progress:
                    print(format_row(row), flush=True)
    return {"gpu": gpu_key, "gpu_name": gpu.name, "arch": gpu.arch, "dtype": dtype, "batch": batch,
            "models": list(models), "label": "modelled (SASS-level model, no GPU run)",
            "rows": rows, "summary": summary(rows, model_names)}


def geomean(values) -> Optional[float]:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summary(rows, model_names) -> Dict[str, Dict[str, object]]:
    """Per backend and pass: the geometric mean of the distinct layers' modelled fractions and,
    per model, the modelled time of that pass over all its convs (each layer times its count)."""
    result: Dict[str, Dict[str, object]] = {}
    for backend in sorted({r["backend"] for r in rows}):
        for pass_name in PASSES:
            mine = [r for r in rows if r["backend"] == backend and r["pass"] == pass_name and "error" not in r]
            if not mine:
                continue
            result[f"{backend}/{pass_name}"] = {
                "geomean_fraction": geomean(r["fraction"] for r in mine),
                "layers": len(mine),
                "errors": sum(1 for r in rows if r["backend"] == backend and r["pass"] == pass_name and "error" in r),
                "modelled_step_us": {model: sum(r["modelled_us"] * r["counts"].get(model, 0)
                                                for r in mine) for model in model_names},
            }
    return result


def format_row(r: Dict[str, object]) -> str:
    head = f"{r['backend']:6} {r['pass']:11} {r['layer']:44}"
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
    lines.append("| backend | pass | geomean modelled fraction | layers | modelled conv time per step (us) |")
    lines.append("|---|---|---|---|---|")
    for key, s in result["summary"].items():
        backend, pass_name = key.split("/")
        steps = ", ".join(f"{m}: {t:.0f}" for m, t in s["modelled_step_us"].items())
        g = s["geomean_fraction"]
        lines.append(f"| {backend} | {pass_name} | {g:.3f} | {s['layers']}"
                     f"{' (' + str(s['errors']) + ' failed)' if s['errors'] else ''} | {steps} |")
    return "\n".join(lines)
