# SPDX-License-Identifier: Apache-2.0
"""Evaluate a checkpoint of python/train.py: accuracy, NLL, ECE (15 bins), Brier score, and OOD
detection (AUROC, AUPR, FPR95) for the criteria MSP, max logit, entropy, mutual information and
variation ratio, all computed from packed_kernels.ensemble_scores; writes metrics.json, a
reliability diagram and a score histogram (PNG).

  python python/evaluate.py runs/digits-pe/checkpoint.pt            # OOD: the held-out classes
  python python/evaluate.py runs/c10/checkpoint.pt --data-root ~/data \
      --ood-dataset svhn --ood-root ~/data/svhn
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The checkout's package when it is not installed (an installed one comes first).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipes.errors import RecipeError, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint.pt written by train.py")
    p.add_argument("--data-root", help="dataset folder (default: the one it was trained from)")
    p.add_argument("--ood-dataset", help="OOD set: another dataset's test split (default: the "
                   "classes held out in training, if any)")
    p.add_argument("--ood-root", help="folder of the OOD dataset")
    p.add_argument("--out", help="folder for metrics.json and the PNGs (default: beside the checkpoint)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--bins", type=int, default=15, help="ECE / reliability diagram bins")
    p.add_argument("--no-plots", action="store_true")
    return p


def load_checkpoint(path: str):
    import torch
    if os.path.isdir(path):
        raise RecipeError(f"checkpoint {path!r} is a folder: give its checkpoint.pt")
    if not os.path.isfile(path):
        raise RecipeError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any failure to unpickle means "not a usable checkpoint"
        raise RecipeError(f"cannot read checkpoint {path!r}: {exc}") from None
    if not isinstance(state, dict) or "model_spec" not in state or "model" not in state:
        raise RecipeError(f"{path!r} is not a checkpoint written by train.py")
    return state


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.bins < 1:
        raise RecipeError(f"--bins must be >= 1, got {args.bins}")
    if args.batch_size < 1:
        raise RecipeError(f"--batch-size must be >= 1, got {args.batch_size}")
    state = load_checkpoint(args.checkpoint)
    from train import resolve_device
    from recipes import models
    from recipes.data import load_from_source, load_ood
    from recipes.evaluation import (classification_metrics, ood_metrics, predict_logits,
                                    save_reliability_diagram, save_score_histogram)
    import torch

    spec = state["model_spec"]
    if "dataset" not in spec:
        raise RecipeError(f"{args.checkpoint!r} does not record its dataset; evaluate it with the "
                          f"script that trained it")
    data = spec["dataset"]
    device = resolve_device(args.device)
    dataset = load_from_source(data, args.data_root or state.get("data_root"))
    model = models.build_model(spec)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise RecipeError(f"{args.checkpoint!r} holds weights that do not fit its recorded model "
                          f"({' '.join(str(exc).split())[:240]})") from None
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    m = models.effective_estimators(spec)
    predict = lambda split: predict_logits(model, split, m, batch_size=args.batch_size,  # noqa: E731
                                           device=device, amp=args.amp,
                                           channels_last=args.channels_last)
    logits = predict(dataset.test)
    report = {"checkpoint": args.checkpoint, "epoch": state["epoch"], "model": spec,
              "test": classification_metrics(logits, dataset.test.labels, args.bins)}
    ood_split, ood_name = None, None
    if args.ood_dataset:
        ood_split, ood_name = load_ood(args.ood_dataset, args.ood_root, dataset), args.ood_dataset
    elif dataset.ood is not None:
        ood_split, ood_name = dataset.ood, f"held-out classes of {data['name']}"
    logits_ood = None
    if ood_split is not None:
        logits_ood = predict(ood_split)
        report["ood"] = {"set": ood_name, "samples": len(ood_split),
                         **ood_metrics(logits, logits_ood)}
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(report, f, indent=2)
    if not args.no_plots:
        title = f"{spec['model']} {spec['method']}"
        save_reliability_diagram(logits, dataset.test.labels, os.path.join(out, "reliability.png"),
                                 num_bins=args.bins, title=title)
        save_score_histogram(logits, logits_ood, os.path.join(out, "scores.png"), title=title)
    print(json.dumps(report["test"]))
    if "ood" in report:
        for criterion, values in report["ood"].items():
            if isinstance(values, dict):
                print(f"{criterion:>20}: " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
    print(f"wrote {out}/metrics.json" + ("" if args.no_plots else ", reliability.png, scores.png"))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
