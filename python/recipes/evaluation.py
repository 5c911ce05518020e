# SPDX-License-Identifier: Apache-2.0
"""Predictions, metrics and plots for a trained ensemble.

A model maps images (B, C, H, W) to estimator-major logits (M*B, K); packed_kernels.ensemble_scores
turns those into the mean prediction and the uncertainty scores, packed_kernels.metrics into
numbers.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch
from einops import rearrange
from torch import Tensor

import packed_kernels as pk
from packed_kernels import metrics

from .data import Split

# OOD criteria: the score field of ensemble_scores and its sign (metrics want "higher = more
# likely OOD"; a confident prediction has a high MSP / max logit, hence the minus).
OOD_CRITERIA = {
    "msp": ("msp", -1.0),
    "max_logit": ("max_logit", -1.0),
    "entropy": ("entropy", 1.0),
    "mutual_information": ("mutual_information", 1.0),
    "variation_ratio": ("variation_ratio", 1.0),
}


def autocast_context(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, split: Split, num_estimators: int, *,
                   batch_size: int = 256, device: torch.device = torch.device("cpu"),
                   amp: str = "none", channels_last: bool = False) -> Tensor:
    """Logits of every estimator on every sample, float32 on the CPU, shape (M, N, K)."""
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with pk.nn.reuse_inference_operands():  # the eval-mode BN folding, once for all batches
            for start in range(0, len(split), batch_size):
                x = split.images[start:start + batch_size].to(device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast_context(device, amp):
                    logits = model(x)
                b = x.shape[0]
                if logits.shape[0] != num_estimators * b:
                    raise RuntimeError(f"model returned {logits.shape[0]} rows for a batch of {b} "
                                       f"with {num_estimators} estimators (expected M*B rows)")
                chunks.append(rearrange(logits.float(), "(m b) k -> m b k", m=num_estimators).cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks, dim=1)


def ensemble_scores(logits: Tensor) -> pk.EnsembleScores:
    """ensemble_scores of (M, N, K) logits (reshaped to the estimator-major (M*N, K))."""
    return pk.ensemble_scores(rearrange(logits, "m n k -> (m n) k"), logits.shape[0])


def classification_metrics(logits: Tensor, labels: Tensor, num_bins: int = 15) -> Dict[str, float]:
    probs = ensemble_scores(logits).probs
    return {
        "acc": metrics.accuracy(probs, labels),
        "nll": metrics.nll(probs, labels),
        "ece": metrics.ece(probs, labels, num_bins),
        "brier": metrics.brier_score(probs, labels),
    }


def ood_metrics(logits_in: Tensor, logits_ood: Tensor) -> Dict[str, Dict[str, float]]:
    """AUROC, AUPR and FPR95 (OOD = positive class) for every criterion of OOD_CRITERIA."""
    scores_in, scores_ood = ensemble_scores(logits_in), ensemble_scores(logits_ood)
    labels = torch.cat([torch.zeros(logits_in.shape[1]), torch.ones(logits_ood.shape[1])]).long()
    out: Dict[str, Dict[str, float]] = {}
    for criterion, (field, sign) in OOD_CRITERIA.items():
        s = sign * torch.cat([getattr(scores_in, field), getattr(scores_ood, field)]).double()
        # A constant score (the variation ratio of a single model) is one big tie: chance level.
        out[criterion] = {"auroc": metrics.auroc(s, labels), "aupr": metrics.aupr(s, labels),
                          "fpr95": metrics.fpr_at_tpr(s, labels, 0.95)}
    return out


def save_reliability_diagram(logits: Tensor, labels: Tensor, path: str, *, num_bins: int = 15,
                             title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = ensemble_scores(logits).probs
    bins = metrics.calibration_bins(probs, labels, num_bins)
    ece = metrics.ece(probs, labels, num_bins)
    edges = bins.edges.numpy()
    width = edges[1] - edges[0]
    centres = edges[:-1] + width / 2
    filled = bins.count.numpy() > 0
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True,
                                       gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centres[filled], bins.accuracy.numpy()[filled], width=width, edgecolor="black",
           color="tab:blue", label="accuracy")
    gap_bottom = torch.minimum(bins.accuracy, bins.confidence).numpy()[filled]
    gap = (bins.accuracy - bins.confidence).abs().numpy()[filled]
    ax.bar(centres[filled], gap, bottom=gap_bottom, width=width, color="tab:red", alpha=0.35,
           label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title} ECE = {ece:.3f} ({num_bins} bins)".strip())
    ax.legend(loc="upper left", fontsize=8)
    ax_count.bar(centres, bins.count.numpy(), width=width, color="gray", edgecolor="black")
    ax_count.set_yscale("symlog")
    ax_count.set_xlabel("confidence (max probability)")
    ax_count.set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_score_histogram(logits_in: Tensor, logits_ood: Optional[Tensor], path: str, *,
                         title: str = "") -> None:
    """One panel per criterion: the score's histogram on in-distribution (and OOD) samples."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores_in = ensemble_scores(logits_in)
    scores_ood = None if logits_ood is None else ensemble_scores(logits_ood)
    fig, axes = plt.subplots(1, len(OOD_CRITERIA), figsize=(3.2 * len(OOD_CRITERIA), 3))
    for ax, (criterion, (field, _)) in zip(axes, OOD_CRITERIA.items()):
        a = getattr(scores_in, field).float().numpy()
        values = [a] if scores_ood is None else [a, getattr(scores_ood, field).float().numpy()]
        lo = min(v.min() for v in values)
        hi = max(v.max() for v in values)
        edges = torch.linspace(lo, hi if hi > lo else lo + 1, 31).numpy()
        ax.hist(a, bins=edges, alpha=0.6, density=True, label="in-distribution")
        if scores_ood is not None:
            ax.hist(values[1], bins=edges, alpha=0.6, density=True, label="OOD")
        ax.set_title(criterion.replace("_", " "))
        ax.set_yticks([])
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
