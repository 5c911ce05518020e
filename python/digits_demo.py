# SPDX-License-Identifier: Apache-2.0
"""Packed-Ensembles on real data, CPU-sized: scikit-learn's 8x8 digits, trained on classes 0-4,
with the test images of classes 5-9 as out-of-distribution inputs.

Compares a small packed CNN (recipes.models.PackedSmallCNN) as the single model, PE-(2,4,1)
and Deep Ensembles (M=4) over a few seeds, and prints a table of accuracy, NLL, ECE, AUPR and
AUROC (mean +- std; OOD scored by the maximum softmax probability), plus AUROC for every OOD
criterion. Everything is trained by recipes.training.train (the loop of python/train.py).

  python python/digits_demo.py                 # the table in python/README.md (about 5 minutes on 1 core)
  python python/digits_demo.py --epochs 2 --seeds 0   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipes.errors import RecipeError, run_cli  # noqa: E402

# (label, method, alpha, M, gamma)
CONFIGS = [
    ("Single", "single", 1, 1, 1),
    ("PE-(2,4,1)", "packed", 2, 4, 1),
    ("Deep Ensembles (M=4)", "deep", 4, 4, 1),
]
TABLE_METRICS = [("acc", "Acc (%)", 100), ("nll", "NLL", 1), ("ece", "ECE (%)", 100),
                 ("aupr", "AUPR (%)", 100), ("auroc", "AUROC (%)", 100)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--width", type=int, default=16, help="channels of the single model's first layer")
    p.add_argument("--in-classes", default="0-4", help="training classes; the others are OOD")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (tiny models run fastest on one)")
    p.add_argument("--out", default="runs/digits_demo")
    p.add_argument("--fresh", action="store_true",
                   help="retrain every run (by default finished runs in --out are reused and "
                        "interrupted ones resumed)")
    return p


def mean_std(values: List[float]):
    import numpy as np
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def format_table(results: Dict[str, List[dict]]) -> str:
    header = "| Method | Params | " + " | ".join(title for _, title, _ in TABLE_METRICS) + " |"
    lines = [header, "|" + "---|" * (len(TABLE_METRICS) + 2)]
    for label, runs in results.items():
        cells = []
        for key, _, scale in TABLE_METRICS:
            mu, sd = mean_std([r[key] * scale for r in runs])
            cells.append(f"{mu:.2f} ± {sd:.2f}" if scale == 100 else f"{mu:.3f} ± {sd:.3f}")
        lines.append(f"| {label} | {runs[0]['parameters']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_criteria_table(results: Dict[str, List[dict]]) -> str:
    from recipes.evaluation import OOD_CRITERIA
    lines = ["| Method | " + " | ".join(OOD_CRITERIA) + " |", "|" + "---|" * (len(OOD_CRITERIA) + 1)]
    for label, runs in results.items():
        cells = []
        for criterion in OOD_CRITERIA:
            mu, sd = mean_std([r["ood"][criterion]["auroc"] * 100 for r in runs])
            cells.append(f"{mu:.2f} ± {sd:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs < 1 or not args.seeds:
        raise RecipeError("--epochs must be >= 1 and --seeds must list at least one seed")
    import torch
    from recipes import models
    from recipes.data import dataset_source, load_dataset, parse_classes
    from recipes.evaluation import classification_metrics, ood_metrics, predict_logits
    from recipes.training import TrainConfig, train

    torch.set_num_threads(args.threads)
    # The split is fixed (seed 0); the seeds vary initialisation and batch order.
    dataset = load_dataset("digits", classes=parse_classes(args.in_classes), seed=0)
    if dataset.ood is None:
        raise RecipeError("--in-classes leaves no class out: there is no OOD set")
    milestones = [max(1, args.epochs // 2), max(2, args.epochs * 3 // 4)]
    results: Dict[str, List[dict]] = {}
    for label, method, alpha, m, gamma in CONFIGS:
        for seed in args.seeds:
            spec = models.make_spec("small_cnn", method, in_channels=dataset.in_channels,
                                    num_classes=dataset.num_classes, num_estimators=m,
                                    alpha=alpha, gamma=gamma, width=args.width)
            # Recorded so that python/evaluate.py can evaluate the run's checkpoint.
            spec["dataset"] = dataset_source("digits", classes=args.in_classes, seed=0)
            torch.manual_seed(seed)
            model = models.build_model(spec)
            cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              milestones=sorted(set(milestones)) if args.epochs > 2 else [],
                              lr_gamma=0.1, seed=seed, eval_every=args.epochs)
            out = os.path.join(args.out, f"{method}-seed{seed}")
            train(model, dataset, cfg, num_estimators=m, out_dir=out, model_spec=spec,
                  resume=not args.fresh, progress=False, log=lambda s: None)
            logits_in = predict_logits(model, dataset.test, m)
            logits_ood = predict_logits(model, dataset.ood, m)
            ood = ood_metrics(logits_in, logits_ood)
            run = {"method": label, "seed": seed,
                   "parameters": sum(p.numel() for p in model.parameters()),
                   **classification_metrics(logits_in, dataset.test.labels),
                   "aupr": ood["msp"]["aupr"], "auroc": ood["msp"]["auroc"], "ood": ood}
            results.setdefault(label, []).append(run)
            print(f"{label:>22} seed {seed}: acc {run['acc']:.4f}  nll {run['nll']:.4f}  "
                  f"ece {run['ece']:.4f}  aupr {run['aupr']:.4f}  auroc {run['auroc']:.4f}",
                  flush=True)
    table = format_table(results)
    criteria = format_criteria_table(results)
    summary = (f"digits: train on classes {args.in_classes} ({len(dataset.train)} images), test on "
               f"{len(dataset.test)}, OOD = the other classes' test images ({len(dataset.ood)}); "
               f"{args.epochs} epochs, seeds {args.seeds}; AUPR/AUROC use the MSP criterion "
               f"(OOD = positive class).")
    text = (f"{summary}\n\n{table}\n\nAUROC (%) by OOD criterion:\n\n{criteria}\n")
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "runs": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
