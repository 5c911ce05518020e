# SPDX-License-Identifier: Apache-2.0
"""Ensemble reduction over estimator-major logits: the mean prediction and uncertainty scores.

Logits are (M*B, C) or (M*B, C, *): rows m*B .. m*B+B-1 belong to estimator m, as produced by
a Packed-Ensemble's last layer. All math is done in float32 (float64 for float64 input) and
outputs come back in the input dtype.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

import torch
from torch import Tensor

from .. import _alloc, _backend
from .._checks import check_float_tensor, check_positive_int
from ._autograd import library_op


class EnsembleScores(NamedTuple):
    """ensemble_scores' result, for B inputs of an M-estimator ensemble over C classes, every
    field in the logits' dtype: probs, the mean of the estimators' softmax (B, C); msp, its
    maximum (B,); max_logit, the maximum over classes of the estimator-mean logits (B,);
    entropy, of probs (B,); mutual_information, entropy minus the mean of the estimators'
    entropies (B,); variation_ratio, 1 - (votes for the modal class) / M (B,)."""

    probs: Tensor  # (B, C) mean of the estimators' softmax
    msp: Tensor  # (B,) max softmax probability of the mean prediction
    max_logit: Tensor  # (B,) max over classes of the estimator-mean logits
    entropy: Tensor  # (B,) entropy of the mean prediction
    mutual_information: Tensor  # (B,) entropy of the mean - mean of the estimators' entropies
    variation_ratio: Tensor  # (B,) 1 - votes for the modal class / M (not differentiable)


# ---------------------------------------------------------------------------------------------
# torch reference semantics
# ---------------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _p_log_p(p: Tensor, log_term: Tensor) -> Tensor:
    """p * log_term with 0 where p == 0: a masked class (logit -inf) has p = 0 and log p = -inf,
    and contributes nothing (0 log 0 = 0); NaN stays NaN."""
    return torch.where(p == 0, torch.zeros_like(p), p * log_term)


def reference_mean(logits: Tensor, num_estimators: int) -> Tensor:
    x = logits.to(_compute_dtype(logits.dtype))
    x = x.reshape(num_estimators, x.shape[0] // num_estimators, *x.shape[1:])
    return torch.softmax(x, dim=2).mean(dim=0).to(logits.dtype)


def reference_scores(logits: Tensor, num_estimators: int) -> EnsembleScores:
    m = num_estimators
    x = logits.to(_compute_dtype(logits.dtype))
    x = x.reshape(m, x.shape[0] // m, x.shape[1])  # (M, B, C)
    log_p = torch.log_softmax(x, dim=2)
    p = log_p.exp()
    probs = p.mean(dim=0)
    msp = probs.amax(dim=1)
    max_logit = x.mean(dim=0).amax(dim=1)
    entropy = -torch.special.xlogy(probs, probs).sum(dim=1)
    estimator_entropy = -_p_log_p(p, log_p).sum(dim=2)  # (M, B)
    mutual_information = entropy - estimator_entropy.mean(dim=0)
    votes = torch.nn.functional.one_hot(x.argmax(dim=2), x.shape[2]).sum(dim=0)  # (B, C)
    variation_ratio = 1.0 - votes.amax(dim=1).to(x.dtype) / m
    out = (probs, msp, max_logit, entropy, mutual_information, variation_ratio)
    return EnsembleScores(*(t.to(logits.dtype) for t in out))


def reference_mean_backward(grad: Tensor, logits: Tensor, num_estimators: int) -> Tensor:
    """d/dx_mj of <mean_m softmax(x_m), g>  =  p_mj (g_j - sum_c g_c p_mc) / M."""
    m = num_estimators
    ct = _compute_dtype(logits.dtype)
    x = logits.to(ct).reshape(m, logits.shape[0] // m, *logits.shape[1:])
    p = torch.softmax(x, dim=2)
    g = grad.to(ct).unsqueeze(0)
    dot = (p * g).sum(dim=2, keepdim=True)
    return (p * (g - dot) / m).reshape(logits.shape).to(logits.dtype)


def reference_scores_backward(grads, logits: Tensor, num_estimators: int) -> Tensor:
    """Closed-form gradient of the differentiable scores (variation_ratio has none).

    With p_m = softmax(x_m), q = mean_m p_m and
    G_c = g_probs_c - (g_entropy + g_mi) log q_c + g_msp [c = argmax q]:
      dx_mj = p_mj (G_j - sum_c G_c p_mc) / M
            + g_max_logit / M [j = argmax_c mean_m x_mc]
            + g_mi / M * p_mj (x_mj - lse_m + H_m)
    """
    m = num_estimators
    ct = _compute_dtype(logits.dtype)
    g_probs, g_msp, g_max_logit, g_entropy, g_mi = (g.to(ct) for g in grads)
    x = logits.to(ct).reshape(m, logits.shape[0] // m, logits.shape[1])
    log_p = torch.log_softmax(x, dim=2)
    p = log_p.exp()
    q = p.mean(dim=0)
    log_q = torch.where(q == 0, torch.zeros_like(q), q.log())  # 0 for a class all estimators mask
    big_g = g_probs - (g_entropy + g_mi)[:, None] * log_q
    big_g = big_g + g_msp[:, None] * torch.nn.functional.one_hot(q.argmax(dim=1), q.shape[1]).to(ct)
    grad = p * (big_g - (p * big_g).sum(dim=2, keepdim=True)) / m
    top_mean_logit = torch.nn.functional.one_hot(x.mean(dim=0).argmax(dim=1), q.shape[1]).to(ct)
    grad = grad + (g_max_logit[:, None] * top_mean_logit / m)
    estimator_entropy = -_p_log_p(p, log_p).sum(dim=2, keepdim=True)
    grad = grad + g_mi[:, None] / m * _p_log_p(p, log_p + estimator_entropy)
    return grad.reshape(logits.shape).to(logits.dtype)


class _Engine(NamedTuple):
    mean_forward: Callable
    mean_backward: Callable
    scores_forward: Callable
    scores_backward: Callable


def _torch_engine() -> _Engine:
    return _Engine(
        mean_forward=reference_mean,
        mean_backward=reference_mean_backward,
        scores_forward=lambda x, m: tuple(reference_scores(x, m)),
        scores_backward=reference_scores_backward,
    )


def _triton_engine() -> _Engine:
    from ..triton import ensemble as tk
    return _Engine(tk.mean_forward, tk.mean_backward, tk.scores_forward, tk.scores_backward)


def _extension_engine(name: str) -> Callable[[], _Engine]:
    """The csrc kernels in packed_kernels.<name>; outputs are allocated here (poisonable)."""
    def load() -> _Engine:
        ext = _backend.extension(name)

        def mean_forward(logits, m):
            out = _alloc.empty((logits.shape[0] // m, *logits.shape[1:]), logits)
            ext.ensemble_mean_forward(logits, m, out)
            return out

        def mean_backward(grad, logits, m):
            grad_logits = _alloc.empty(logits.shape, logits)
            ext.ensemble_mean_backward(grad, logits, m, grad_logits)
            return grad_logits

        def scores_forward(logits, m):
            batch = logits.shape[0] // m
            outs = [_alloc.empty((batch, logits.shape[1]), logits)] + \
                [_alloc.empty((batch,), logits) for _ in range(5)]
            ext.ensemble_scores_forward(logits, m, outs)
            return tuple(outs)

        def scores_backward(grads, logits, m):
            grad_logits = _alloc.empty(logits.shape, logits)
            ext.ensemble_scores_backward(list(grads), logits, m, grad_logits)
            return grad_logits

        return _Engine(mean_forward, mean_backward, scores_forward, scores_backward)
    return load


_ENGINES: Dict[str, Callable[[], _Engine]] = {
    "torch": _torch_engine,
    "triton": _triton_engine,
    "cuda": _extension_engine("_C"),
    "simt": _extension_engine("_simt"),
}


def _engine(backend: str) -> _Engine:
    return _ENGINES[backend]()


# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------

@library_op("packed_kernels::ensemble_mean")
@_backend.on_input_device
def _ensemble_mean_op(logits: Tensor, num_estimators: int, backend: str) -> Tensor:
    return _engine(backend).mean_forward(logits.contiguous(), num_estimators)


@_ensemble_mean_op.register_fake
def _(logits, num_estimators, backend):
    return logits.new_empty((logits.shape[0] // num_estimators, *logits.shape[1:]))


@library_op("packed_kernels::ensemble_mean_backward")
@_backend.on_input_device
def _ensemble_mean_backward_op(grad: Tensor, logits: Tensor, num_estimators: int, backend: str) -> Tensor:
    return _engine(backend).mean_backward(grad.contiguous(), logits.contiguous(), num_estimators)


@_ensemble_mean_backward_op.register_fake
def _(grad, logits, num_estimators, backend):
    return torch.empty_like(logits)


def _mean_setup_context(ctx, inputs, output):
    logits, num_estimators, backend = inputs
    ctx.save_for_backward(logits)
    ctx.num_estimators, ctx.backend = num_estimators, backend


def _mean_backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return _ensemble_mean_backward_op(grad, logits, ctx.num_estimators, ctx.backend), None, None


_ensemble_mean_op.register_autograd(_mean_backward, setup_context=_mean_setup_context)


@library_op("packed_kernels::ensemble_scores")
@_backend.on_input_device
def _ensemble_scores_op(logits: Tensor, num_estimators: int, backend: str
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(_engine(backend).scores_forward(logits.contiguous(), num_estimators))


@_ensemble_scores_op.register_fake
def _(logits, num_estimators, backend):
    batch = logits.shape[0] // num_estimators
    return (logits.new_empty((batch, logits.shape[1])),
            *(logits.new_empty((batch,)) for _ in range(5)))


@library_op("packed_kernels::ensemble_scores_backward")
@_backend.on_input_device
def _ensemble_scores_backward_op(grad_probs: Tensor, grad_msp: Tensor, grad_max_logit: Tensor,
                                 grad_entropy: Tensor, grad_mutual_information: Tensor,
                                 logits: Tensor, num_estimators: int, backend: str) -> Tensor:
    grads = (grad_probs, grad_msp, grad_max_logit, grad_entropy, grad_mutual_information)
    return _engine(backend).scores_backward(tuple(g.contiguous() for g in grads),
                                            logits.contiguous(), num_estimators)


@_ensemble_scores_backward_op.register_fake
def _(grad_probs, grad_msp, grad_max_logit, grad_entropy, grad_mutual_information, logits,
      num_estimators, backend):
    return torch.empty_like(logits)


def _scores_setup_context(ctx, inputs, output):
    logits, num_estimators, backend = inputs
    ctx.mark_non_differentiable(output[5])  # variation_ratio: a vote count, no gradient
    ctx.save_for_backward(logits)
    ctx.num_estimators, ctx.backend = num_estimators, backend


def _scores_backward(ctx, *grads):
    (logits,) = ctx.saved_tensors
    # Autograd passes None for outputs that got no gradient: they contribute zero.
    shapes = [(logits.shape[0] // ctx.num_estimators, logits.shape[1])] + \
             [(logits.shape[0] // ctx.num_estimators,)] * 4
    dense = [torch.zeros(s, dtype=logits.dtype, device=logits.device) if g is None else g
             for g, s in zip(grads[:5], shapes)]
    return _ensemble_scores_backward_op(*dense, logits, ctx.num_estimators, ctx.backend), None, None


_ensemble_scores_op.register_autograd(_scores_backward, setup_context=_scores_setup_context)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------

IMPLEMENTED = tuple(_ENGINES)
MAX_TRITON_ESTIMATORS = 64  # the kernels keep one row per estimator in registers


def _check(op: str, logits, num_estimators, min_dim: int, max_dim: Optional[int]) -> None:
    check_float_tensor(op, "logits", logits, min_dim=min_dim)
    if max_dim is not None and logits.dim() > max_dim:
        raise ValueError(f"{op}: logits must be (M*B, C), got shape {tuple(logits.shape)}")
    check_positive_int(op, "num_estimators", num_estimators)
    if logits.shape[0] % num_estimators != 0:
        raise ValueError(f"{op}: the batch dimension of logits ({logits.shape[0]}) is not "
                         f"divisible by num_estimators ({num_estimators}); logits must be "
                         "estimator-major (M*B, C, ...)")
    if logits.shape[1] < 2:
        raise ValueError(f"{op}: need at least 2 classes, got logits of shape {tuple(logits.shape)}")


def _choose(op: str, logits: Tensor, num_estimators: int, backend: Optional[str]) -> str:
    chosen = _backend.resolve(op, backend, logits.device, logits.dtype, IMPLEMENTED)
    if chosen != "torch" and num_estimators > MAX_TRITON_ESTIMATORS:
        if backend in (None, "auto"):
            return "torch"
        raise _backend.BackendUnavailableError(
            f"{op}: backend {chosen!r} supports num_estimators <= {MAX_TRITON_ESTIMATORS}, "
            f"got {num_estimators}")
    return chosen


def ensemble_mean(logits: Tensor, num_estimators: int, *, backend: Optional[str] = None) -> Tensor:
    """Mean over estimators of softmax(logits, dim=1): the ensemble's prediction.
    Differentiable in logits.

    Args:
        logits: (M*B, C) or (M*B, C, *), estimator-major (rows m*B .. m*B + B - 1 are
            estimator m's, as a Packed-Ensemble's last layer returns them), C >= 2; any float
            dtype ("torch") or float32, float16, bfloat16 (kernel backends); any strides.
            -inf masks a class; NaN propagates.
        num_estimators: M >= 1, dividing logits.shape[0].
        backend: the engine: None or "auto" (CUDA tensors: "triton" where usable, else
            "cuda"; other devices, or more than 64 estimators: "torch"), or one of
            packed_kernels.BACKENDS ("torch", "triton", "cuda", "simt"; see grouped_conv2d). A
            backend that cannot run the call raises BackendUnavailableError before any launch.

    Returns:
        (B, C[, *]) probabilities in logits' dtype (computed in float32, float64 for
        float64)."""
    _check("ensemble_mean", logits, num_estimators, min_dim=2, max_dim=None)
    chosen = _choose("ensemble_mean", logits, num_estimators, backend)
    return _ensemble_mean_op(logits, num_estimators, chosen)


def ensemble_scores(logits: Tensor, num_estimators: int, *, backend: Optional[str] = None) -> EnsembleScores:
    """The mean prediction and its uncertainty scores from one pass over the logits.
    Differentiable in logits (variation_ratio is not: a vote count).

    Args:
        logits: (M*B, C), estimator-major (rows m*B .. m*B + B - 1 are estimator m's), C >= 2;
            dtypes, strides, -inf and NaN as for ensemble_mean.
        num_estimators: M >= 1, dividing logits.shape[0].
        backend: the engine: None or "auto" (CUDA tensors: "triton" where usable, else
            "cuda"; other devices, or more than 64 estimators: "torch"), or one of
            packed_kernels.BACKENDS ("torch", "triton", "cuda", "simt"; see grouped_conv2d). A
            backend that cannot run the call raises BackendUnavailableError before any launch.

    Returns:
        EnsembleScores(probs (B, C), msp, max_logit, entropy, mutual_information,
        variation_ratio (each (B,))) in logits' dtype: the mean of the estimators' softmax, its
        maximum, the maximum of the estimator-mean logits, its entropy, the entropy minus the
        mean of the estimators' entropies, and 1 - (votes for the modal class) / M."""
    _check("ensemble_scores", logits, num_estimators, min_dim=2, max_dim=2)
    chosen = _choose("ensemble_scores", logits, num_estimators, backend)
    return EnsembleScores(*_ensemble_scores_op(logits, num_estimators, chosen))
