# SPDX-License-Identifier: Apache-2.0
"""`python -m bench <command>`: the one entry point of the benchmark suite.

  table     the paper's speed table (training s/epoch, inference images/s, peak memory)
  conv      per-layer grouped-conv sweep: ours vs cuDNN grouped vs dense conv of equal FLOPs
  ensemble  the ensemble-op benchmark (GB/s vs the card's copy bandwidth)
  bn        batch norm + ReLU training forward / forward+backward GB/s vs torch (cuDNN)
  profile   one training and one inference step of table rows, per kernel (torch.profiler)
  overhead  host time per call that packed_kernels adds over the torch calls it stands for
  dispatch  the engines backend="auto" measured and chose for a row's model, with their times
  report    records -> markdown table + PNG plots
  model     modelled (not measured) conv kernel times from their SASS, without a GPU

On a machine without a GPU every command runs a reduced real measurement on the CPU (unless
given explicit sizes) and says its numbers are CPU numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch

from . import records
from .env import default_device, device_label


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the JSON record (default: bench/results/<date>-<gpu>/ on a "
                        "GPU, the git-ignored bench/results/tmp/ on the CPU)")
    p.add_argument("--record", action="store_true",
                   help="write CPU results under bench/results/ too (kept in git)")
    p.add_argument("--no-save", action="store_true", help="print only, write no record")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--report", action="store_true",
                   help="also write report.md and PNG plots of the records in the record's folder")


def _device(args) -> torch.device:
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda asked for, but torch sees no CUDA GPU")
    return device


def _save(args, record) -> Optional[Path]:
    if args.no_save:
        return None
    directory = args.out or records.run_dir(_device(args), record=True if args.record else None)
    path = records.write_record(record, directory)
    print(f"record: {path}")
    if args.report:
        from . import report
        written = report.write_report(records.load_records([directory]), directory)
        print(f"report: {written[0]} (+ {len(written) - 1} plots)")
    return path


def _override(cfg, args, values=(), lists=None) -> None:
    """Sets cfg's fields from the options given: `values` by name, `lists` (option -> field) split
    from comma lists."""
    for name in values:
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    for name, field in (lists or {}).items():
        value = getattr(args, name)
        if value:
            setattr(cfg, field, tuple(value.split(",")))


def cmd_table(args) -> int:
    from . import models, table
    device = _device(args)
    cpu = device.type != "cuda"
    cfg = table.TableConfig()
    if cpu:  # reduced real run: tiny batch, few iterations, fp32, no compile rows
        cfg.batch, cfg.warmup, cfg.reps, cfg.max_seconds = 2, 1, 2, 5.0
        cfg.precisions = ("fp32",)
        cfg.loader_workers = 0
    _override(cfg, args, ("batch", "infer_batch", "warmup", "reps", "arch", "image_size",
                          "epoch_images", "loader_workers"))
    if args.max_seconds is not None:
        cfg.max_seconds = args.max_seconds or None
    if args.precision:
        cfg.precisions = tuple(args.precision.split(","))
        bad = set(cfg.precisions) - set(table.PRECISIONS)
        if bad:
            raise SystemExit(f"bench table: unknown precision {sorted(bad)}; use {table.PRECISIONS}")
    cfg.layout = args.layout
    cfg.dataloader = args.dataloader
    cfg.ours_backend = args.ours_backend
    rows = models.parse_rows(args.rows) if args.rows else [
        models.parse_row(k) for k in (models.CPU_ROWS if cpu else models.DEFAULT_ROWS)]
    source = models.model_source(cfg.arch)
    print(f"bench table on {device_label(device)}: {len(rows)} rows x {len(cfg.precisions)} "
          f"precisions, batch {cfg.batch}, models from {source}"
          + (" — CPU reduced run (tiny batch, few iterations; fp32 and no compile rows unless "
             "asked): CPU numbers" if cpu else ""), flush=True)
    results = table.run_table(rows, cfg, device, progress=not args.quiet)
    print(table.format_table(results, cfg.as_dict(), source))
    record = records.make_record("table", device, cfg.as_dict(), results,
                                 {"model_source": source, "targets": table.target_checks(results)})
    _save(args, record)
    return 1 if all("error" in r for r in results) else 0


def cmd_ensemble(args) -> int:
    from . import ensemble
    device = _device(args)
    cfg = ensemble.EnsembleConfig.for_device(device)
    _override(cfg, args, ("num_estimators", "batch", "classes", "dtype", "warmup", "reps"),
              {"backends": "backends"})
    result = ensemble.run(cfg, device, progress=not args.quiet)
    print(ensemble.format_result(result))
    _save(args, records.make_record("ensemble", device, cfg.as_dict(), result["rows"],
                                    {"copy_bandwidth": result["copy_bandwidth"]}))
    return 0


def cmd_conv(args) -> int:
    from . import conv_sweep
    device = _device(args)
    cfg = conv_sweep.SweepConfig.for_device(device)
    _override(cfg, args, ("batch", "arch", "warmup", "reps", "limit"),
              {"rows": "rows", "dtype": "dtypes", "layout": "layouts", "backends": "backends"})
    result = conv_sweep.run(cfg, device, progress=not args.quiet)
    print(conv_sweep.format_result(result, with_rows=not args.quiet))  # --quiet: printed as measured
    _save(args, records.make_record("conv", device, cfg.as_dict(), result["rows"],
                                    {"roofline": result["roofline"]}))
    return 0


def cmd_bn(args) -> int:
    from . import bn
    device = _device(args)
    cfg = bn.BNConfig.for_device(device)
    _override(cfg, args, ("batch", "arch", "warmup", "reps", "limit"),
              {"dtype": "dtypes", "layout": "layouts", "backends": "backends"})
    result = bn.run(cfg, device, progress=not args.quiet)
    print(bn.format_result(result))
    _save(args, records.make_record("bn", device, cfg.as_dict(), result["rows"],
                                    {"copy_bandwidth": result["copy_bandwidth"],
                                     "block_rows": result["block_rows"]}))
    return 0


def cmd_profile(args) -> int:
    from . import step_profile
    device = _device(args)
    cfg = step_profile.ProfileConfig()
    if device.type != "cuda":  # reduced real run
        cfg.batch, cfg.precision, cfg.layout, cfg.warmup = 2, "fp32", "nchw", 1
    _override(cfg, args, ("batch", "precision", "layout", "arch", "top", "python_top", "ours_backend"))
    profiles = [step_profile.profile_row(key.strip(), cfg, device)
                for key in args.rows.split(",") if key.strip()]
    print(step_profile.format_profiles(profiles, cfg))
    _save(args, records.make_record("profile", device, cfg.as_dict(), profiles))
    return 0


def cmd_overhead(args) -> int:
    from . import overhead
    device = _device(args)
    cfg = overhead.OverheadConfig()
    _override(cfg, args, ("calls", "rounds"))
    rows = overhead.run(cfg, device, args.cases.split(",") if args.cases else None)
    print(overhead.format_rows(rows, device_label(device), cfg))
    _save(args, records.make_record("overhead", device, cfg.as_dict(), rows))
    return 0


def cmd_model(args) -> int:
    import json
    from . import perf_model
    result = perf_model.run(args.gpu, args.dtype, perf_model.models_arg(args.models),
                            tuple(args.backends.split(",")), batch=args.batch,
                            progress=not args.quiet)
    print(perf_model.format_result(result, with_rows=False))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"modelled record: {args.json}")
    return 1 if any("error" in r for r in result["rows"]) else 0


def cmd_dispatch(args) -> int:
    from . import dispatch_report, step_profile
    device = _device(args)
    cfg = step_profile.ProfileConfig()
    if device.type != "cuda":  # reduced real run
        cfg.batch, cfg.precision, cfg.layout = 2, "fp32", "nchw"
    _override(cfg, args, ("batch", "precision", "layout", "arch"))
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    rows = dispatch_report.warm(keys, cfg, device)
    print(dispatch_report.format_report(rows, device_label(device)))
    _save(args, records.make_record("dispatch", device, cfg.as_dict(), rows))
    return 0


def cmd_report(args) -> int:
    from . import report
    paths = args.paths or [records.RESULTS_DIR]
    recs = records.load_records(paths)
    if not recs:
        raise SystemExit(f"bench report: no records under {', '.join(map(str, paths))}")
    out = args.out or Path(paths[0] if Path(paths[0]).is_dir() else Path(paths[0]).parent)
    written = report.write_report(recs, out)
    for path in written:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("table", help="the paper's speed table")
    _common(t)
    t.add_argument("--rows", help="comma list of <model>[-<impl>][-compile]; models: single, "
                   "pe241, pe242, de, mimo, be; impl: stock, packed_kernels")
    t.add_argument("--precision", help="comma list of fp32,fp16 (default both; fp32 on the CPU)")
    t.add_argument("--layout", choices=("nchw", "channels_last"), default="nchw")
    t.add_argument("--ours-backend", default="auto",
                   help="backend the packed_kernels rows' convs run on: auto (the library's own "
                        "choice, what users get) or a kernel backend (triton, cuda) forced for "
                        "every conv of those rows")
    t.add_argument("--batch", type=int)
    t.add_argument("--infer-batch", type=int)
    t.add_argument("--arch", type=int, help="ResNet depth (default 50)")
    t.add_argument("--image-size", type=int)
    t.add_argument("--epoch-images", type=int)
    t.add_argument("--warmup", type=int)
    t.add_argument("--reps", type=int)
    t.add_argument("--max-seconds", type=float, help="cap per timed phase (0: none)")
    t.add_argument("--dataloader", action="store_true",
                   help="feed training from a real DataLoader (host augmentation, pinned copies) "
                        "instead of batches made on the device")
    t.add_argument("--loader-workers", type=int)
    t.set_defaults(func=cmd_table)

    e = sub.add_parser("ensemble", help="ensemble_mean / ensemble_scores bandwidth")
    _common(e)
    e.add_argument("--num-estimators", type=int)
    e.add_argument("--batch", type=int)
    e.add_argument("--classes", type=int)
    e.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default fp16 (fp32 on the CPU)")
    e.add_argument("--backends", help="comma list (default: torch and every kernel backend usable here)")
    e.add_argument("--warmup", type=int)
    e.add_argument("--reps", type=int)
    e.set_defaults(func=cmd_ensemble)

    c = sub.add_parser("conv", help="per-layer grouped conv sweep vs cuDNN")
    _common(c)
    c.add_argument("--batch", type=int)
    c.add_argument("--arch", type=int, help="ResNet depth whose conv layers are swept (default 50)")
    c.add_argument("--rows", help="table rows whose models' layers are swept (default pe241-stock,pe242-stock)")
    c.add_argument("--dtype", help="comma list of fp32,fp16,bf16")
    c.add_argument("--layout", help="comma list of nchw,channels_last")
    c.add_argument("--backends", help="comma list of packed_kernels backends for 'ours' (default: "
                   "every kernel backend usable here; auto, torch, triton, cuda)")
    c.add_argument("--limit", type=int, help="only the first N layers")
    c.add_argument("--warmup", type=int)
    c.add_argument("--reps", type=int)
    c.set_defaults(func=cmd_conv)

    b = sub.add_parser("bn", help="batch norm + ReLU training GB/s vs torch (cuDNN)")
    _common(b)
    b.add_argument("--batch", type=int)
    b.add_argument("--arch", type=int, help="ResNet depth whose activation shapes are used (default 50)")
    b.add_argument("--dtype", help="comma list of fp32,fp16,bf16")
    b.add_argument("--layout", help="comma list of nchw,channels_last")
    b.add_argument("--backends", help="comma list of pk.batch_norm backends (default: torch + kernels usable here)")
    b.add_argument("--limit", type=int, help="only the first N shapes")
    b.add_argument("--warmup", type=int)
    b.add_argument("--reps", type=int)
    b.set_defaults(func=cmd_bn)

    f = sub.add_parser("profile", help="per-kernel GPU time of one training/inference step")
    _common(f)
    f.add_argument("--rows", default="single-stock,pe241-stock,pe241-packed_kernels",
                   help="comma list of table rows")
    f.add_argument("--ours-backend", help="conv backend of the packed_kernels rows (default auto)")
    f.add_argument("--batch", type=int)
    f.add_argument("--precision", choices=("fp32", "fp16"))
    f.add_argument("--layout", choices=("nchw", "channels_last"))
    f.add_argument("--arch", type=int)
    f.add_argument("--top", type=int, help="kernels listed per step (default 15)")
    f.add_argument("--python-top", type=int,
                   help="also list the step's N Python functions with the most own time (cProfile)")
    f.set_defaults(func=cmd_profile)

    o = sub.add_parser("overhead", help="host time per call added over torch (us)")
    _common(o)
    o.add_argument("--cases", help="comma list of case names (default all)")
    o.add_argument("--calls", type=int, help="calls per round")
    o.add_argument("--rounds", type=int, help="rounds (the best is kept)")
    o.set_defaults(func=cmd_overhead)

    md = sub.add_parser("model", help="modelled conv kernel times from SASS (no GPU)")
    from .perf_model import BACKENDS, DEFAULT_MODELS
    from .perf_model.gpus import GPUS
    md.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    md.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    md.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma list of table models")
    md.add_argument("--backends", default=",".join(BACKENDS), help="comma list: triton, cuda")
    md.add_argument("--batch", type=int, default=128)
    md.add_argument("--json", type=Path, help="write the modelled record here")
    md.add_argument("--quiet", action="store_true", help="no per-layer lines")
    md.set_defaults(func=cmd_model)

    d = sub.add_parser("dispatch", help="the engines backend=auto chose for a row's model, and why")
    _common(d)
    d.add_argument("--rows", default="pe241-packed_kernels", help="comma list of table rows")
    d.add_argument("--batch", type=int)
    d.add_argument("--precision", choices=("fp32", "fp16"))
    d.add_argument("--layout", choices=("nchw", "channels_last"))
    d.add_argument("--arch", type=int)
    d.set_defaults(func=cmd_dispatch)

    r = sub.add_parser("report", help="records -> report.md + PNG plots")
    r.add_argument("paths", nargs="*", type=Path, help="record files or folders (default bench/results)")
    r.add_argument("--out", type=Path, help="output folder (default: the first path's folder)")
    r.set_defaults(func=cmd_report)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
