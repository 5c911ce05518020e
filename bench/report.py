# SPDX-License-Identifier: Apache-2.0
"""Records -> report.md and PNG plots (one set per record, so no figure mixes devices).

  table    -> markdown speed table beside the paper's ratios; <stem>-throughput.png
              (images/s per model and precision, stock vs packed_kernels, training and inference)
  conv     -> per-layer speed-up table; <stem>-conv-speedup.png (packed_kernels vs cuDNN grouped
              per layer and pass); <stem>-roofline.png (achieved TFLOP/s vs arithmetic intensity
              under the roofs measured in that run)
  ensemble -> GB/s table against the copy bandwidth of the same run
  bn       -> the same for batch norm + ReLU
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from . import conv_sweep, table


def _env_line(rec: Dict[str, object]) -> str:
    env = rec["env"]
    parts = [f"device **{env['device']}**"]
    if env.get("gpu"):
        parts.append(f"driver {env.get('driver')}, CC {env.get('gpu_capability')}")
    parts.append(f"torch {env['torch']} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
                 f"cuDNN {env.get('cudnn')}")
    commit = env.get("commit") or "unknown"
    parts.append(f"commit {commit[:10]}{' (dirty)' if env.get('dirty') else ''}")
    parts.append(f"recorded {rec['created']}")
    note = "" if env["device_type"] == "cuda" else " — **CPU numbers** (a reduced smoke run, not a speed claim)"
    return "; ".join(parts) + note


def _stem(rec: Dict[str, object]) -> str:
    return Path(rec.get("_path", f"{rec['kind']}-{rec['created']}")).stem


def _fmt_x(v) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _q(stats: Dict[str, float], scale: float = 1.0, digits: int = 2) -> str:
    return (f"{stats['median'] * scale:.{digits}f} [{stats['q1'] * scale:.{digits}f}–"
            f"{stats['q3'] * scale:.{digits}f}]")


def table_markdown(rec: Dict[str, object]) -> List[str]:
    cfg, results = rec["config"], rec["rows"]
    lines = [f"Batch {cfg['batch']} (inference {cfg.get('infer_batch')}), {cfg['layout']}, "
             f"{cfg['image_size']}×{cfg['image_size']}, {cfg['num_classes']} classes, "
             f"{cfg['epoch_images']} images/epoch, models from {rec.get('model_source', '?')}"
             f"{', real DataLoader' if cfg.get('dataloader') else ', data generated on the device'}.",
             "Ratios are speed relative to the single model on stock PyTorch at the same precision "
             "(memory: relative peak); paper× is the same ratio from the paper's RTX 3090 table.", "",
             "| model | precision | train s/epoch [q1–q3] | ×single | paper× | inference im/s [q1–q3] "
             "| ×single | paper× | peak train MiB | ×single | device |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        label = table.row_label(r)
        if "error" in r:
            lines.append(f"| {label} | {r['precision']} | failed: {r['error']} | | | | | | | | {r['device']} |")
            continue
        q = table.ratios(r, table._reference(results, r["precision"]))
        p_train, p_infer = table.paper_ratios(r["model"], r["precision"])
        mem = r.get("peak_train_bytes")
        lines.append(
            f"| {label} | {r['precision']} | {_q(r['train_epoch'])} | {_fmt_x(q['train'])} | "
            f"{_fmt_x(p_train)} | {_q(r['infer_images_per_s'], digits=1)} | {_fmt_x(q['infer'])} | "
            f"{_fmt_x(p_infer)} | {'—' if mem is None else f'{mem / 2**20:.0f}'} | "
            f"{_fmt_x(q['memory'])} | {r['device']} |")
    checks = rec.get("targets") or table.target_checks(results)
    if checks:
        lines += ["", "Project targets (docs/benchmarks.md#targets, measured here):", ""]
        for c in checks:
            lines.append(f"- {c['target']}: **{c['value']:.2f}×** (goal {c['op']} {c['goal']}×) — "
                         f"{'met' if c['met'] else 'not met'} on {c['device']}")
    return lines


def conv_markdown(rec: Dict[str, object]) -> List[str]:
    rows = rec["rows"]
    roof = rec.get("roofline", {})
    lines = []
    if roof:
        lines.append("Roofs measured in this run: copy "
                     f"{roof['copy']['gbps']:.1f} GB/s; matmul "
                     + ", ".join(f"{k} {v['tflops']:.2f} TFLOP/s" for k, v in roof.get("matmul", {}).items())
                     + ".")
        lines.append("")
    sp = conv_sweep.speedups(rows)
    lines += ["| layer | dtype | layout | pass | ours (backend) µs | cuDNN grouped µs | dense equal-FLOPs µs "
              "| speed-up vs cuDNN | vs dense | ours % roofline | device |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in sp:
        ours, cud, dense = s["ours"], s["baseline"], s["dense"]
        dense_us = "—" if dense is None else f"{dense['time']['median'] * 1e6:.1f}"
        lines.append(f"| {s['layer']} | {s['dtype']} | {s['layout']} | {s['pass']} | "
                     f"{ours['time']['median'] * 1e6:.1f} ({s['backend']}) | "
                     f"{cud['time']['median'] * 1e6:.1f} | {dense_us} | "
                     f"{s['speedup']:.2f}× | {_fmt_x(s['vs_dense'])} | {ours['roofline_fraction']:.0%} | "
                     f"{s['device']} |")
    geo = conv_sweep.geomean_speedups(sp)
    if geo:
        lines += ["", "Geometric-mean speed-up over cuDNN grouped:", ""]
        for (backend, dtype, layout, pass_name), gm, n in geo:
            lines.append(f"- {backend}, {dtype}, {layout}, {pass_name}: **{gm:.2f}×** over {n} layers")
    failed = [r for r in rows if "error" in r]
    for r in failed:
        lines.append(f"- failed: {r['layer']} {r['dtype']} {r['layout']} {r.get('impl', '')} "
                     f"{r.get('pass', '')}: {r['error']}")
    return lines


def ensemble_markdown(rec: Dict[str, object]) -> List[str]:
    copy = rec.get("copy_bandwidth", {}).get("gbps")
    lines = [f"Copy bandwidth measured in this run: {copy:.1f} GB/s." if copy else "", "",
             "| op | backend | M | B | C | dtype | median µs [q1–q3] | GB/s | of copy | device |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['backend']} | | | | {r['dtype']} | failed: {r['error']} | | | {r['device']} |")
            continue
        lines.append(f"| {r['op']} | {r['backend']} | {r['num_estimators']} | {r['batch']} | "
                     f"{r['classes']} | {r['dtype']} | {_q(r['time'], 1e6, 1)} | {r['gbps']:.1f} | "
                     f"{r['fraction_of_copy']:.0%} | {r['device']} |")
    return lines


def bn_markdown(rec: Dict[str, object]) -> List[str]:
    copy = rec.get("copy_bandwidth", {}).get("gbps")
    lines = [f"Copy bandwidth measured in this run: {copy:.1f} GB/s." if copy else "", "",
             "| shape | dtype | layout | pass | impl | median µs [q1–q3] | GB/s | of copy | device |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        shape = "×".join(map(str, r["shape"]))
        if "error" in r:
            lines.append(f"| {shape} | {r['dtype']} | {r['layout']} | {r['pass']} | {r['impl']} | "
                         f"failed: {r['error']} | | | {r['device']} |")
            continue
        lines.append(f"| {shape} | {r['dtype']} | {r['layout']} | {r['pass']} | {r['impl']} | "
                     f"{_q(r['time'], 1e6, 1)} | {r['gbps']:.1f} | {r['fraction_of_copy']:.0%} | "
                     f"{r['device']} |")
    blocks = rec.get("block_rows") or []
    if blocks:
        from .bn import block_speedups
        b0 = blocks[0]
        lines += ["", f"{b0['model']} ResNet block `{b0['block']}`, input {'×'.join(map(str, b0['input_shape']))}, "
                  f"{b0['precision']}:", "", "| layout | pass | impl | median µs [q1–q3] | device |",
                  "|---|---|---|---|---|"]
        for r in blocks:
            time = f"failed: {r['error']}" if "error" in r else _q(r["time"], 1e6, 1)
            lines.append(f"| {r['layout']} | {r['pass']} | {r['impl']} | {time} | {r['device']} |")
        for sp in block_speedups(blocks):
            lines.append(f"\n- packed_kernels block vs stock, {sp['layout']}, {sp['pass']}: **{sp['speedup']:.2f}×**")
    return lines


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_throughput(rec: Dict[str, object], path: Path) -> Path:
    plt = _plt()
    ok = [r for r in rec["rows"] if "error" not in r]
    models = list(dict.fromkeys(r["name"] for r in ok))
    series = list(dict.fromkeys((r["impl"], r["compiled"], r["precision"]) for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(models) + 4), 4.5))
    width = 0.8 / max(1, len(series))
    for ax, (title, metric) in zip(axes, (("training", "train_images_per_s"),
                                          ("inference", "infer_images_per_s"))):
        for k, (impl, compiled, precision) in enumerate(series):
            values = []
            for name in models:
                match = [r for r in ok if r["name"] == name and r["impl"] == impl
                         and r["compiled"] == compiled and r["precision"] == precision]
                values.append(match[0][metric]["median"] if match else 0.0)
            label = f"{'ours' if impl == 'packed_kernels' else 'stock'}{' compiled' if compiled else ''} {precision}"
            ax.bar([i + k * width for i in range(len(models))], values, width, label=label)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(models))])
        ax.set_xticklabels(models, rotation=20, ha="right")
        ax.set_ylabel("images / s (median)")
        ax.set_title(f"{title} throughput")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"speed table, batch {rec['config']['batch']} — {rec['env']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_conv_speedup(rec: Dict[str, object], path: Path) -> Path:
    plt = _plt()
    sp = conv_sweep.speedups(rec["rows"])
    configs = list(dict.fromkeys((s["dtype"], s["layout"]) for s in sp))
    layers = list(dict.fromkeys(s["layer"] for s in sp))
    passes = list(dict.fromkeys((s["backend"], s["pass"]) for s in sp))
    fig, axes = plt.subplots(len(configs) or 1, 1, figsize=(max(8, 0.5 * len(layers) + 4),
                                                             3.5 * max(1, len(configs))), squeeze=False)
    width = 0.8 / max(1, len(passes))
    for ax, (dtype, layout) in zip(axes[:, 0], configs):
        for k, (backend, p) in enumerate(passes):
            vals = [next((s["speedup"] for s in sp if s["layer"] == l and s["pass"] == p
                          and s["backend"] == backend and s["dtype"] == dtype
                          and s["layout"] == layout), float("nan")) for l in layers]
            ax.bar([i + k * width for i in range(len(layers))], vals, width, label=f"{backend} {p}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")  # speed-ups are ratios: 2x faster and 2x slower sit equally far from 1
        ax.set_xticks([i + width * (len(passes) - 1) / 2 for i in range(len(layers))])
        ax.set_xticklabels(layers, rotation=35, ha="right", fontsize=6)
        ax.set_ylabel("speed-up vs cuDNN grouped")
        ax.set_title(f"{dtype}, {layout}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"packed_kernels vs cuDNN grouped conv, batch {rec['config']['batch']} — "
                 f"{rec['env']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_roofline(rec: Dict[str, object], path: Path) -> Path:
    plt = _plt()
    roof = rec["roofline"]
    bw = roof["copy"]["gbps"] * 1e9
    ok = [r for r in rec["rows"] if "error" not in r and "intensity" in r]
    fig, ax = plt.subplots(figsize=(7, 5))
    if ok:
        lo = min(r["intensity"] for r in ok) / 2
        hi = max(r["intensity"] for r in ok) * 2
    else:
        lo, hi = 0.1, 1000.0
    xs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
    for dtype, mm in roof.get("matmul", {}).items():
        peak = mm["tflops"] * 1e12
        ax.plot(xs, [min(peak, x * bw) / 1e12 for x in xs], label=f"roof {dtype}")
    markers = {"packed_kernels": "o", "cudnn_grouped": "s", "dense_equal_flops": "^"}
    for impl, marker in markers.items():
        pts = [r for r in ok if r["impl"] == impl]
        if pts:
            ax.scatter([r["intensity"] for r in pts], [r["tflops"] for r in pts], marker=marker,
                       s=14, alpha=0.7, label=impl)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte of compulsory traffic)")
    ax.set_ylabel("achieved TFLOP/s (median)")
    ax.set_title(f"conv layers on the roofline — {rec['env']['device']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(records: List[Dict[str, object]], out_dir: Path) -> List[Path]:
    """report.md plus each record's plots in out_dir; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = ["# packed_kernels benchmark report", "",
          "Generated by `python -m bench report` from the JSON records listed below. Every number "
          "names its device; CPU records are smoke runs, not speed claims.", ""]
    written: List[Path] = []
    titles = {"table": "Speed table (CIFAR-100 ResNet-50 shapes)", "conv": "Grouped conv sweep",
              "ensemble": "Ensemble ops", "bn": "Batch norm"}
    for rec in records:
        stem = _stem(rec)
        md += [f"## {titles.get(rec['kind'], rec['kind'])} — `{stem}`", "", _env_line(rec), ""]
        if rec["kind"] == "table":
            md += table_markdown(rec)
            written.append(plot_throughput(rec, out_dir / f"{stem}-throughput.png"))
            md += ["", f"![throughput]({stem}-throughput.png)"]
        elif rec["kind"] == "conv":
            md += conv_markdown(rec)
            written.append(plot_conv_speedup(rec, out_dir / f"{stem}-conv-speedup.png"))
            written.append(plot_roofline(rec, out_dir / f"{stem}-roofline.png"))
            md += ["", f"![speed-up]({stem}-conv-speedup.png)", "", f"![roofline]({stem}-roofline.png)"]
        elif rec["kind"] == "ensemble":
            md += ensemble_markdown(rec)
        elif rec["kind"] == "bn":
            md += bn_markdown(rec)
        md.append("")
    report = out_dir / "report.md"
    report.write_text("\n".join(md) + "\n")
    return [report] + written
