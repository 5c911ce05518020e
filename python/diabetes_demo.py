# SPDX-License-Identifier: Apache-2.0
"""Regression as in the paper's appendix N: a PackedLinear MLP with a heteroscedastic Gaussian head,
PE-(2,3,1), against the single MLP and Deep Ensembles (M=3), on scikit-learn's diabetes data.

Each estimator predicts a mean and a variance (softplus); it is trained by the Gaussian
negative log-likelihood; the ensemble predicts the mixture's mean and variance
(packed_kernels.metrics.gaussian_mixture_moments). RMSE and NLL are reported in the target's
original units over random 80/20 splits (mean +- std).

  python python/diabetes_demo.py                      # the table in python/README.md (about a minute)
  python python/diabetes_demo.py --splits 1 --epochs 5   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipes.errors import RecipeError, run_cli  # noqa: E402

# (label, alpha, M, gamma); Deep Ensembles = PE-(M, M, 1): M independent full-width MLPs.
CONFIGS = [
    ("Single", 1, 1, 1),
    ("PE-(2,3,1)", 2, 3, 1),
    ("Deep Ensembles (M=3)", 3, 3, 1),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--splits", type=int, default=5, help="random 80/20 train/test splits")
    p.add_argument("--epochs", type=int, default=20,
                   help="a fixed budget; longer runs overfit (the NLL rises), see python/README.md")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--hidden", type=int, default=48, help="hidden width of the single MLP")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/diabetes_demo")
    return p


def train_gaussian(model, x, y, *, num_estimators: int, epochs: int, batch_size: int, lr: float,
                   weight_decay: float, seed: int):
    """Adam on the mean Gaussian NLL of every estimator's prediction (targets repeated M times)."""
    import torch
    from packed_kernels.nn import repeat_targets
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start:start + batch_size]
            mean, variance = model(x[idx])
            target = repeat_targets(y[idx], num_estimators)
            loss = torch.nn.functional.gaussian_nll_loss(mean, target, variance)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model


def predict_gaussian(model, x, num_estimators: int):
    """The ensemble's predictive mean and variance, (N,) each."""
    import torch
    from einops import rearrange
    from packed_kernels.metrics import gaussian_mixture_moments
    model.eval()
    with torch.no_grad():
        mean, variance = (rearrange(t, "(m n) -> m n", m=num_estimators) for t in model(x))
    return gaussian_mixture_moments(mean, variance)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.splits < 1 or args.epochs < 1:
        raise RecipeError("--splits and --epochs must be >= 1")
    import numpy as np
    import torch
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split
    from packed_kernels import metrics
    from recipes.models import PackedGaussianMLP

    torch.set_num_threads(args.threads)
    x_all, y_all = load_diabetes(return_X_y=True)
    results: Dict[str, List[dict]] = {}
    for split in range(args.splits):
        x_tr, x_te, y_tr, y_te = train_test_split(x_all, y_all, test_size=0.2, random_state=split)
        x_mu, x_sd = x_tr.mean(0), x_tr.std(0)
        y_mu, y_sd = y_tr.mean(), y_tr.std()
        as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        xt, xv = as_t((x_tr - x_mu) / x_sd), as_t((x_te - x_mu) / x_sd)
        yt = as_t((y_tr - y_mu) / y_sd)
        for label, alpha, m, gamma in CONFIGS:
            torch.manual_seed(split)
            model = PackedGaussianMLP(x_all.shape[1], m, alpha, gamma, hidden=args.hidden)
            train_gaussian(model, xt, yt, num_estimators=m, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr,
                           weight_decay=args.weight_decay, seed=split)
            mean, variance = predict_gaussian(model, xv, m)
            # Back to the target's units: mean * sd + mu, variance * sd^2.
            mean_units = mean.double() * y_sd + y_mu
            var_units = variance.double() * y_sd ** 2
            run = {"method": label, "split": split,
                   "parameters": sum(p.numel() for p in model.parameters()),
                   "rmse": metrics.rmse(mean_units, y_te),
                   "nll": metrics.gaussian_nll(mean_units, var_units, y_te)}
            results.setdefault(label, []).append(run)
            print(f"{label:>22} split {split}: rmse {run['rmse']:.2f}  nll {run['nll']:.3f}",
                  flush=True)
    lines = ["| Method | Params | RMSE | NLL |", "|---|---|---|---|"]
    for label, runs in results.items():
        rm, nl = np.array([r["rmse"] for r in runs]), np.array([r["nll"] for r in runs])
        sd = lambda a: a.std(ddof=1) if len(a) > 1 else 0.0  # noqa: E731
        lines.append(f"| {label} | {runs[0]['parameters']:,} | {rm.mean():.2f} ± {sd(rm):.2f} | "
                     f"{nl.mean():.3f} ± {sd(nl):.3f} |")
    summary = (f"diabetes (442 samples, 10 features): {args.splits} random 80/20 splits, "
               f"{args.epochs} epochs of AdamW (lr {args.lr}, batch {args.batch_size}); RMSE and "
               f"Gaussian NLL in the target's units (target std {y_all.std():.1f}).")
    text = summary + "\n\n" + "\n".join(lines) + "\n"
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "runs": results}, f, indent=2)
    if not all(math.isfinite(r["nll"]) for runs in results.values() for r in runs):
        raise RecipeError("a run produced a non-finite NLL")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
