# SPDX-License-Identifier: Apache-2.0
"""The ensemble head: training targets for estimator-major logits, and inference through the
fused ensemble ops (mean prediction and uncertainty scores from one pass)."""

from __future__ import annotations

from typing import Optional

import torch
from einops import repeat
from torch import Tensor, nn

from .._checks import check_positive_int
from ..ops.ensemble import EnsembleScores, ensemble_mean, ensemble_scores


def repeat_targets(targets: Tensor, num_estimators: int) -> Tensor:
    """Targets for (M*B, ...) estimator-major logits: row m*B + b gets targets[b].

    Args:
        targets: (B, ...) any dtype (class indices, soft labels, ...).
        num_estimators: M >= 1.

    Returns:
        (M*B, ...) of targets' dtype."""
    check_positive_int("repeat_targets", "num_estimators", num_estimators)
    if not isinstance(targets, Tensor) or targets.dim() < 1:
        raise ValueError("repeat_targets: targets must be a tensor with a batch dimension")
    return repeat(targets, "b ... -> (m b) ...", m=num_estimators)


class EnsembleMean(nn.Module):
    """(M*B, C[, *]) estimator-major logits -> (B, C[, *]) mean of the estimators' softmax
    (pk.ensemble_mean; `scores` gives pk.ensemble_scores).

    Args:
        num_estimators: M >= 1; the logits' batch must be a multiple of it.
        backend: the ensemble ops' `backend`: None or "auto" (CUDA tensors: Triton where
            usable, else CUDA C++; the CPU or more than 64 estimators: torch), or one of
            packed_kernels.BACKENDS ("torch", "triton", "cuda", "simt")."""

    def __init__(self, num_estimators: int, backend: Optional[str] = None) -> None:
        super().__init__()
        self.num_estimators = check_positive_int("EnsembleMean", "num_estimators", num_estimators)
        self.backend = backend

    def forward(self, logits: Tensor) -> Tensor:
        return ensemble_mean(logits, self.num_estimators, backend=self.backend)

    def scores(self, logits: Tensor) -> EnsembleScores:
        """probs, msp, max_logit, entropy, mutual_information, variation_ratio."""
        return ensemble_scores(logits, self.num_estimators, backend=self.backend)

    def repeat_targets(self, targets: Tensor) -> Tensor:
        return repeat_targets(targets, self.num_estimators)

    def extra_repr(self) -> str:
        return f"num_estimators={self.num_estimators}"


def _num_estimators_of(model: nn.Module) -> int:
    found = getattr(model, "num_estimators", None)
    if found is None:
        raise ValueError("predict: the model has no `num_estimators` attribute; pass num_estimators=")
    return found


@torch.no_grad()
def predict(model: nn.Module, inputs: Tensor, num_estimators: Optional[int] = None, *,
            backend: Optional[str] = None) -> EnsembleScores:
    """Run `model` in eval mode on `inputs` and reduce its (M*B, C) logits to the mean
    prediction and uncertainty scores. The model's train/eval mode is restored afterwards.

    Args:
        model: returns estimator-major logits (M*B, C) for `inputs`.
        inputs: the model's input (e.g. (B, C_in, H, W) images), any dtype it takes.
        num_estimators: M; None: model.num_estimators (every packed_kernels model has it).
        backend: pk.ensemble_scores' `backend` (None: the op picks).

    Returns:
        EnsembleScores (see pk.ensemble_scores), each (B,) but probs (B, C), in the logits'
        dtype; computed without gradients."""
    m = _num_estimators_of(model) if num_estimators is None else num_estimators
    was_training = model.training
    model.eval()
    try:
        logits = model(inputs)
    finally:
        model.train(was_training)
    return ensemble_scores(logits, m, backend=backend)
