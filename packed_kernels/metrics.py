# SPDX-License-Identifier: Apache-2.0
"""Evaluation metrics of the Packed-Ensembles paper as plain functions.

Classification (inputs: predicted probabilities (N, C) and integer targets (N,)):
accuracy, nll, ece (equal-width confidence bins, 15 by default), brier_score, and
calibration_bins (the per-bin data behind ECE and a reliability diagram).

Out-of-distribution detection (inputs: a score (N,) that is HIGHER for inputs believed to be
out-of-distribution, and labels (N,) with 1 = OOD, the positive class): auroc, aupr (average
precision, as scikit-learn's average_precision_score) and fpr_at_tpr (FPR95 by default). Ties
in the score are handled as scikit-learn does: all samples with one score value form a single
threshold, so neither ordering of tied samples is favoured. For confidence-like criteria
(max softmax probability, max logit) pass the negated value.

Regression: rmse and gaussian_nll, plus gaussian_mixture_moments (the mean and variance of an
equal-weight mixture of Gaussians, i.e. a Deep/Packed-Ensemble's predictive distribution).

Every function accepts torch tensors, numpy arrays or lists, computes in float64 on the CPU and
returns a Python float (calibration_bins and gaussian_mixture_moments return tensors).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CalibrationBins",
    "accuracy",
    "aupr",
    "auroc",
    "brier_score",
    "calibration_bins",
    "ece",
    "fpr_at_tpr",
    "gaussian_mixture_moments",
    "gaussian_nll",
    "nll",
    "rmse",
]


# ---------------------------------------------------------------------------------------------
# input handling
# ---------------------------------------------------------------------------------------------

def _as_tensor(value) -> Tensor:
    # Through numpy for lists, so Python floats stay float64 (torch would make them float32).
    return value.detach() if isinstance(value, Tensor) else torch.from_numpy(np.asarray(value))


def _as_float64(name: str, value, dim: int) -> Tensor:
    t = _as_tensor(value)
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in _INT_DTYPES):
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    t = t.to(device="cpu", dtype=torch.float64)
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _as_labels(name: str, value, length: int) -> Tensor:
    t = _as_tensor(value).to("cpu")
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise TypeError(f"{name} must hold integer class indices, got non-integer values")
        t = t.long()
    elif t.dtype not in _INT_DTYPES and t.dtype != torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    t = t.long()
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    return t


def _probs_targets(probs, targets) -> Tuple[Tensor, Tensor]:
    p = _as_float64("probs", probs, 2)
    y = _as_labels("targets", targets, p.shape[0])
    if (y < 0).any() or (y >= p.shape[1]).any():
        raise ValueError(f"targets must lie in [0, {p.shape[1] - 1}] (probs has {p.shape[1]} classes)")
    # The slack admits rounding in low-precision probabilities (a float16 softmax can exceed 1
    # by an ulp); anything further out is a caller passing logits.
    if (p < -1e-3).any() or (p > 1 + 1e-3).any():
        raise ValueError("probs must lie in [0, 1]; pass probabilities, not logits")
    return p.clamp(0, 1), y


def _scores_labels(scores, labels) -> Tuple[Tensor, Tensor]:
    s = _as_float64("scores", scores, 1)
    y = _as_labels("labels", labels, s.shape[0])
    if ((y != 0) & (y != 1)).any():
        raise ValueError("labels must be 0 (in-distribution) or 1 (out-of-distribution)")
    positives = int(y.sum())
    if positives == 0 or positives == y.shape[0]:
        raise ValueError("labels need both classes (in- and out-of-distribution samples); "
                         "the metric is undefined otherwise")
    return s, y


# ---------------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------------

def accuracy(probs, targets) -> float:
    """Fraction of samples whose arg-max class is the target (ties go to the lowest index)."""
    p, y = _probs_targets(probs, targets)
    return (p.argmax(dim=1) == y).double().mean().item()


def nll(probs, targets, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood -log p(target); probabilities are clamped at `eps` so that a
    confidently wrong prediction costs -log(eps) rather than infinity."""
    p, y = _probs_targets(probs, targets)
    return -p.gather(1, y[:, None]).clamp_min(eps).log().mean().item()


def brier_score(probs, targets) -> float:
    """Mean over samples of sum over classes of (p_c - [c == target])^2 (0 is perfect, 2 is worst)."""
    p, y = _probs_targets(probs, targets)
    one_hot = torch.nn.functional.one_hot(y, p.shape[1]).double()
    return (p - one_hot).pow(2).sum(dim=1).mean().item()


class CalibrationBins(NamedTuple):
    edges: Tensor  # (num_bins + 1,) bin b holds confidences in (edges[b], edges[b+1]]; bin 0 also 0
    confidence: Tensor  # (num_bins,) mean confidence in the bin (0 where empty)
    accuracy: Tensor  # (num_bins,) accuracy in the bin (0 where empty)
    count: Tensor  # (num_bins,) number of samples in the bin


def calibration_bins(probs, targets, num_bins: int = 15) -> CalibrationBins:
    """Samples binned by confidence (max probability) into `num_bins` equal-width bins of [0, 1]."""
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    p, y = _probs_targets(probs, targets)
    confidence, prediction = p.max(dim=1)
    correct = (prediction == y).double()
    # Right-closed bins (lo, hi], the usual ECE convention: a confidence of exactly 1 is in the
    # last bin, and 1/num_bins is in the first. Compared against the edges themselves (not
    # ceil(conf * num_bins)), so a confidence equal to an edge is never rounded across it.
    edges = torch.arange(num_bins + 1, dtype=torch.float64) / num_bins
    index = (torch.searchsorted(edges, confidence) - 1).clamp(0, num_bins - 1)
    count = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, confidence)
    correct_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, correct)
    safe = count.clamp_min(1)
    return CalibrationBins(edges, conf_sum / safe, correct_sum / safe, count.long())


def ece(probs, targets, num_bins: int = 15) -> float:
    """Expected calibration error: sum over bins of (bin size / N) * |accuracy - confidence|."""
    bins = calibration_bins(probs, targets, num_bins)
    weight = bins.count.double() / bins.count.sum()
    return (weight * (bins.accuracy - bins.confidence).abs()).sum().item()


# ---------------------------------------------------------------------------------------------
# out-of-distribution detection
# ---------------------------------------------------------------------------------------------

def _threshold_counts(scores: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
    """Cumulative true / false positives when predicting "OOD" for score >= t, for each distinct
    score t from the highest down (one point per distinct value, so ties move together)."""
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], labels[order].double()
    last_of_value = torch.ones_like(s, dtype=torch.bool)
    last_of_value[:-1] = s[1:] != s[:-1]
    tp = torch.cumsum(y, 0)[last_of_value]
    fp = torch.cumsum(1 - y, 0)[last_of_value]
    return tp, fp


def auroc(scores, labels) -> float:
    """Area under the ROC curve (trapezoidal, ties as one threshold, as roc_auc_score)."""
    s, y = _scores_labels(scores, labels)
    tp, fp = _threshold_counts(s, y)
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, tp / tp[-1]])
    fpr = torch.cat([zero, fp / fp[-1]])
    return torch.trapezoid(tpr, fpr).item()


def aupr(scores, labels) -> float:
    """Area under the precision-recall curve with OOD as the positive class, computed as average
    precision sum_k (R_k - R_{k-1}) P_k (as average_precision_score, no interpolation)."""
    s, y = _scores_labels(scores, labels)
    tp, fp = _threshold_counts(s, y)
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    recall_step = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    return (recall_step * precision).sum().item()


def fpr_at_tpr(scores, labels, tpr: float = 0.95) -> float:
    """False-positive rate at the highest threshold whose true-positive rate reaches `tpr`
    (FPR95 for tpr=0.95): the fraction of in-distribution samples flagged as OOD when 95% of the
    OOD samples are caught."""
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must lie in (0, 1], got {tpr}")
    s, y = _scores_labels(scores, labels)
    tp, fp = _threshold_counts(s, y)
    true_positive_rate = tp / tp[-1]
    # A tiny slack so that e.g. 19/20 counts as reaching 0.95 despite rounding.
    first = int(torch.nonzero(true_positive_rate >= tpr - 1e-12)[0])
    return (fp[first] / fp[-1]).item()


# ---------------------------------------------------------------------------------------------
# regression
# ---------------------------------------------------------------------------------------------

def rmse(mean, target) -> float:
    """Root mean squared error."""
    mu = _as_float64("mean", mean, 1)
    t = _as_float64("target", target, 1)
    if t.shape != mu.shape:
        raise ValueError(f"target shape {tuple(t.shape)} does not match mean shape {tuple(mu.shape)}")
    return (mu - t).pow(2).mean().sqrt().item()


def gaussian_nll(mean, variance, target) -> float:
    """Mean negative log-likelihood of `target` under N(mean, variance), constant included."""
    mu = _as_float64("mean", mean, 1)
    var = _as_float64("variance", variance, 1)
    t = _as_float64("target", target, 1)
    if not (mu.shape == var.shape == t.shape):
        raise ValueError(f"mean, variance and target must have one shape, got {tuple(mu.shape)}, "
                         f"{tuple(var.shape)}, {tuple(t.shape)}")
    if (var <= 0).any():
        raise ValueError("variance must be positive")
    return (0.5 * (torch.log(2 * math.pi * var) + (t - mu).pow(2) / var)).mean().item()


def gaussian_mixture_moments(means: Tensor, variances: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean and variance of the equal-weight mixture of N(means[m], variances[m]) over dim 0:
    mu = mean_m mu_m,  var = mean_m (var_m + mu_m^2) - mu^2 (the ensemble's predictive moments).
    Differentiable; keeps the input dtype and device."""
    if means.shape != variances.shape or means.dim() < 1:
        raise ValueError(f"means and variances must share a shape (M, ...), got "
                         f"{tuple(means.shape)} and {tuple(variances.shape)}")
    mu = means.mean(dim=0)
    # The centred form mean_m (var_m + (mu_m - mu)^2) avoids cancellation in the formula above.
    var = (variances + (means - mu).pow(2)).mean(dim=0)
    return mu, var
