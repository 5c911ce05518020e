# SPDX-License-Identifier: Apache-2.0
"""Triton kernels for the ensemble reduction: one program per output row (b, s).

Each program holds a [BLOCK_M, BLOCK_C] tile (all estimators, a slice of the classes) and
walks the classes in chunks, so C up to tens of thousands needs no more registers; when C fits
in one chunk the row is read from DRAM once and the later passes hit the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc

FORWARD_TILE = 4096  # elements of the [BLOCK_M, BLOCK_C] tile in the forward kernels
BACKWARD_TILE = 2048  # the backward kernels keep more tiles alive at once
NUM_WARPS = 8  # 4096-element tiles with 4 warps spill at BLOCK_M=64 (compile-for-target check)


@triton.jit
def _load_tile(x_ptr, row_base, c0, stride_m, stride_c, M, C,
               BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask = (offs_m[:, None] < M) & (offs_c[None, :] < C)
    offsets = row_base + offs_m[:, None].to(tl.int64) * stride_m + offs_c[None, :].to(tl.int64) * stride_c
    x = tl.load(x_ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32)
    return x, mask, offsets


@triton.jit
def _row_statistics(x_ptr, row_base, stride_m, stride_c, M, C,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per estimator: log-sum-exp and entropy of its softmax, by an online pass over classes."""
    # Finite start so exp(run_max - new_max) is 1, not NaN, for padded estimator rows.
    run_max = tl.full([BLOCK_M], -1e30, tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    run_dot = tl.zeros([BLOCK_M], tl.float32)  # sum_c exp(x_c - run_max) * x_c
    for c0 in range(0, C, BLOCK_C):
        x, mask, _ = _load_tile(x_ptr, row_base, c0, stride_m, stride_c, M, C, BLOCK_M, BLOCK_C)
        new_max = tl.maximum(run_max, tl.max(x, 1))
        scale = tl.exp(run_max - new_max)
        e = tl.exp(x - new_max[:, None])
        run_sum = run_sum * scale + tl.sum(e, 1)
        # e == 0 for a masked class (x = -inf): 0 log 0 = 0, not 0 * -inf
        run_dot = run_dot * scale + tl.sum(tl.where(mask & (e != 0.0), e * x, 0.0), 1)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    entropy = lse - run_dot / run_sum  # H = lse - E_p[x]
    return lse, entropy


@triton.jit
def _mean_forward_kernel(x_ptr, out_ptr, M, C, S, stride_m, inv_m,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    row_base = (row // S).to(tl.int64) * C * S + row % S
    lse, _entropy = _row_statistics(x_ptr, row_base, stride_m, S, M, C, BLOCK_M, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        x, mask, _ = _load_tile(x_ptr, row_base, c0, stride_m, S, M, C, BLOCK_M, BLOCK_C)
        p = tl.where(mask, tl.exp(x - lse[:, None]), 0.0)
        offs_c = c0 + tl.arange(0, BLOCK_C)
        tl.store(out_ptr + row_base + offs_c.to(tl.int64) * S,
                 (tl.sum(p, 0) * inv_m).to(out_ptr.dtype.element_ty), mask=offs_c < C)


@triton.jit
def _mean_backward_kernel(g_ptr, x_ptr, gx_ptr, M, C, S, stride_m, inv_m,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # d/dx_mj of mean_m softmax(x_m) . g  =  p_mj (g_j - sum_c g_c p_mc) / M
    row = tl.program_id(0)
    row_base = (row // S).to(tl.int64) * C * S + row % S
    lse, _entropy = _row_statistics(x_ptr, row_base, stride_m, S, M, C, BLOCK_M, BLOCK_C)
    dot = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        x, mask, _ = _load_tile(x_ptr, row_base, c0, stride_m, S, M, C, BLOCK_M, BLOCK_C)
        offs_c = c0 + tl.arange(0, BLOCK_C)
        g = tl.load(g_ptr + row_base + offs_c.to(tl.int64) * S, mask=offs_c < C, other=0.0).to(tl.float32)
        p = tl.where(mask, tl.exp(x - lse[:, None]), 0.0)
        dot += tl.sum(p * g[None, :], 1)
    for c0 in range(0, C, BLOCK_C):
        x, mask, offsets = _load_tile(x_ptr, row_base, c0, stride_m, S, M, C, BLOCK_M, BLOCK_C)
        offs_c = c0 + tl.arange(0, BLOCK_C)
        g = tl.load(g_ptr + row_base + offs_c.to(tl.int64) * S, mask=offs_c < C, other=0.0).to(tl.float32)
        p = tl.where(mask, tl.exp(x - lse[:, None]), 0.0)
        gx = p * (g[None, :] - dot[:, None]) * inv_m
        tl.store(gx_ptr + offsets, gx.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scores_forward_kernel(x_ptr, probs_ptr, msp_ptr, max_logit_ptr, entropy_ptr, mi_ptr, vr_ptr,
                           M, C, stride_m, inv_m, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    row_base = row.to(tl.int64) * C
    offs_m = tl.arange(0, BLOCK_M)
    valid_m = offs_m < M
    lse, estimator_entropy = _row_statistics(x_ptr, row_base, stride_m, 1, M, C, BLOCK_M, BLOCK_C)

    best_logit = tl.full([BLOCK_M], float("-inf"), tl.float32)  # each estimator's vote
    best_class = tl.zeros([BLOCK_M], tl.int32)
    msp = 0.0
    max_logit = float("-inf")
    entropy = 0.0
    nan_p = False
    nan_x = False
    for c0 in range(0, C, BLOCK_C):
        x, mask, _ = _load_tile(x_ptr, row_base, c0, stride_m, 1, M, C, BLOCK_M, BLOCK_C)
        offs_c = c0 + tl.arange(0, BLOCK_C)
        valid_c = offs_c < C
        p = tl.where(mask, tl.exp(x - lse[:, None]), 0.0)
        mean_p = tl.sum(p, 0) * inv_m
        tl.store(probs_ptr + row_base + offs_c, mean_p.to(probs_ptr.dtype.element_ty), mask=valid_c)
        msp = tl.maximum(msp, tl.max(mean_p, 0))
        entropy -= tl.sum(tl.where(mean_p == 0, 0.0, mean_p * tl.log(mean_p)), 0)  # NaN stays
        mean_x = tl.where(valid_c, tl.sum(tl.where(mask, x, 0.0), 0) * inv_m, float("-inf"))
        max_logit = tl.maximum(max_logit, tl.max(mean_x, 0))
        # the GPU's max drops NaN; torch's amax keeps it
        nan_p |= tl.sum((mean_p != mean_p).to(tl.int32), 0) > 0
        nan_x |= tl.sum((mean_x != mean_x).to(tl.int32), 0) > 0
        chunk_best = tl.max(x, 1)
        chunk_class = c0 + tl.argmax(x, 1, tie_break_left=True)
        better = chunk_best > best_logit  # strict: the first maximal class wins, as torch.argmax
        best_class = tl.where(better, chunk_class, best_class)
        best_logit = tl.where(better, chunk_best, best_logit)

    mutual_information = entropy - tl.sum(tl.where(valid_m, estimator_entropy, 0.0), 0) * inv_m
    same_vote = (best_class[:, None] == best_class[None, :]) & valid_m[:, None] & valid_m[None, :]
    modal_votes = tl.max(tl.sum(same_vote.to(tl.int32), 1), 0)
    variation_ratio = 1.0 - modal_votes.to(tl.float32) * inv_m
    out_ty = msp_ptr.dtype.element_ty
    msp = tl.where(nan_p, float("nan"), msp)
    max_logit = tl.where(nan_x, float("nan"), max_logit)
    tl.store(msp_ptr + row, msp.to(out_ty))
    tl.store(max_logit_ptr + row, max_logit.to(out_ty))
    tl.store(entropy_ptr + row, entropy.to(out_ty))
    tl.store(mi_ptr + row, mutual_information.to(out_ty))
    tl.store(vr_ptr + row, variation_ratio.to(out_ty))


@triton.jit
def _scores_backward_kernel(g_probs_ptr, g_msp_ptr, g_max_logit_ptr, g_entropy_ptr, g_mi_ptr,
                            x_ptr, gx_ptr, M, C, stride_m, inv_m,
                            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # With p_m = softmax(x_m), q = mean_m p_m, G_c = g_probs_c - (g_H + g_MI) log q_c + g_msp [c = argmax q]:
    #   dx_mj = p_mj (G_j - sum_c G_c p_mc) / M                    (probs, msp, entropy of q)
    #         + g_max_logit / M [j = argmax_c mean_m x_mc]          (max logit)
    #         + g_MI / M * p_mj (x_mj - lse_m + H_m)                (minus the estimators' entropies)
    row = tl.program_id(0)
    row_base = row.to(tl.int64) * C
    offs_m = tl.arange(0, BLOCK_M)
    valid_m = offs_m < M
    g_msp = tl.load(g_msp_ptr + row).to(tl.float32)
    g_max_logit = tl.load(g_max_logit_ptr + row).to(tl.float32)
    g_mi = tl.load(g_mi_ptr + row).to(tl.float32)
    g_log_q = tl.load(g_entropy_ptr + row).to(tl.float32) + g_mi  # coefficient of -log q
    lse, estimator_entropy = _row_statistics(x_ptr, row_base, stride_m, 1, M, C, BLOCK_M, BLOCK_C)

    dot = tl.zeros([BLOCK_M], tl.float32)  # sum_c G_c p_mc without the msp term
    best_q = float("-inf")
    best_q_class = 0
    best_mean_x = float("-inf")
    best_mean_x_class = 0
    for c0 in range(0, C, BLOCK_C):
        x, mask, _ = _load_tile(x_ptr, row_base, c0, stride_m, 1, M, C, BLOCK_M, BLOCK_C)
        offs_c = c0 + tl.arange(0, BLOCK_C)
        valid_c = offs_c < C
        p = tl.where(mask, tl.exp(x - lse[:, None]), 0.0)
        q = tl.sum(p, 0) * inv_m
        log_q = tl.where(q == 0, 0.0, tl.log(q))
        g = tl.load(g_probs_ptr + row_base + offs_c, mask=valid_c, other=0.0).to(tl.float32)
        dot += tl.sum(p * (g - g_log_q * log_q)[None, :], 1)
        q_masked = tl.where(valid_c, q, float("-inf"))
        chunk_q = tl.max(q_masked, 0)
        best_q_class = tl.where(chunk_q > best_q, c0 + tl.argmax(q_masked, 0, tie_break_left=True),
                                best_q_class)
        best_q = tl.maximum(best_q, chunk_q)
        mean_x = tl.where(valid_c, tl.sum(tl.where(mask, x, 0.0), 0) * inv_m, float("-inf"))
        chunk_mean_x = tl.max(mean_x, 0)
        best_mean_x_class = tl.where(chunk_mean_x > best_mean_x,
                                     c0 + tl.argmax(mean_x, 0, tie_break_left=True), best_mean_x_class)
        best_mean_x = tl.maximum(best_mean_x, chunk_mean_x)
    x_at_best_q = tl.load(x_ptr + row_base + offs_m.to(tl.int64) * stride_m + best_q_class,
                          mask=valid_m, other=float("-inf")).to(tl.float32)
    dot += g_msp * tl.exp(x_at_best_q - lse)

    for c0 in range(0, C, BLOCK_C):
        x, mask, offsets = _load_tile(x_ptr, row_base, c0, stride_m, 1, M, C, BLOCK_M, BLOCK_C)
        offs_c = c0 + tl.arange(0, BLOCK_C)
        valid_c = offs_c < C
        p = tl.where(mask, tl.exp(x - lse[:, None]), 0.0)
        q = tl.sum(p, 0) * inv_m
        log_q = tl.where(q == 0, 0.0, tl.log(q))
        g = tl.load(g_probs_ptr + row_base + offs_c, mask=valid_c, other=0.0).to(tl.float32)
        big_g = g - g_log_q * log_q + tl.where(offs_c == best_q_class, g_msp, 0.0)
        gx = p * (big_g[None, :] - dot[:, None]) * inv_m
        gx += tl.where(offs_c == best_mean_x_class, g_max_logit * inv_m, 0.0)[None, :]
        gx += tl.where(mask & (p != 0.0), p * (x - lse[:, None] + estimator_entropy[:, None]), 0.0) * (g_mi * inv_m)
        tl.store(gx_ptr + offsets, gx.to(gx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

ESTIMATOR_BLOCKS = (4, 16, 64)  # few tile shapes: padded estimator rows cost no memory traffic


def _blocks(num_estimators: int, num_classes: int, tile: int):
    block_m = next(b for b in ESTIMATOR_BLOCKS if b >= num_estimators)
    block_c = min(triton.next_power_of_2(num_classes), max(16, tile // block_m))
    return block_m, block_c


def _layout(logits: torch.Tensor, num_estimators: int):
    batch = logits.shape[0] // num_estimators
    classes = logits.shape[1]
    spatial = logits[0, 0].numel()  # product of the trailing dims, 1 for (M*B, C)
    return batch, classes, spatial


def mean_forward(logits: torch.Tensor, num_estimators: int) -> torch.Tensor:
    batch, classes, spatial = _layout(logits, num_estimators)
    out = _alloc.empty((batch, *logits.shape[1:]), logits)
    block_m, block_c = _blocks(num_estimators, classes, FORWARD_TILE)
    _mean_forward_kernel[(batch * spatial,)](
        logits, out, num_estimators, classes, spatial, batch * classes * spatial,
        1.0 / num_estimators, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return out


def mean_backward(grad: torch.Tensor, logits: torch.Tensor, num_estimators: int) -> torch.Tensor:
    batch, classes, spatial = _layout(logits, num_estimators)
    grad_logits = _alloc.empty_like(logits, torch.contiguous_format)
    block_m, block_c = _blocks(num_estimators, classes, BACKWARD_TILE)
    _mean_backward_kernel[(batch * spatial,)](
        grad, logits, grad_logits, num_estimators, classes, spatial, batch * classes * spatial,
        1.0 / num_estimators, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return grad_logits


def scores_forward(logits: torch.Tensor, num_estimators: int):
    batch, classes, _ = _layout(logits, num_estimators)
    probs = _alloc.empty((batch, classes), logits)
    scalars = [_alloc.empty((batch,), logits) for _ in range(5)]
    block_m, block_c = _blocks(num_estimators, classes, FORWARD_TILE)
    _scores_forward_kernel[(batch,)](
        logits, probs, *scalars, num_estimators, classes, batch * classes, 1.0 / num_estimators,
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return (probs, *scalars)


def scores_backward(grads, logits: torch.Tensor, num_estimators: int) -> torch.Tensor:
    batch, classes, _ = _layout(logits, num_estimators)
    grad_logits = _alloc.empty_like(logits, torch.contiguous_format)
    block_m, block_c = _blocks(num_estimators, classes, BACKWARD_TILE)
    _scores_backward_kernel[(batch,)](
        *grads, logits, grad_logits, num_estimators, classes, batch * classes,
        1.0 / num_estimators, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return grad_logits


_KERNELS = {
    "mean_forward": (_mean_forward_kernel, FORWARD_TILE),
    "mean_backward": (_mean_backward_kernel, BACKWARD_TILE),
    "scores_forward": (_scores_forward_kernel, FORWARD_TILE),
    "scores_backward": (_scores_backward_kernel, BACKWARD_TILE),
}
_SCALAR_TYPES = {"inv_m": "fp32", "stride_m": "i64"}  # the other scalars are i32 sizes


def compile_cases():
    """Every configuration the launchers can pick (the largest BLOCK_C for each BLOCK_M: the
    register-heaviest), for each supported dtype, for the compile-for-target check."""
    from .compile_case import CompileCase, kernel_signature

    cases = []
    for dtype in ("fp32", "fp16", "bf16"):
        for name, (kernel, tile) in _KERNELS.items():
            signature = kernel_signature(kernel, lambda arg: f"*{dtype}",
                                         lambda arg: _SCALAR_TYPES.get(arg, "i32"))
            for block_m in ESTIMATOR_BLOCKS:
                constexprs = {"BLOCK_M": block_m, "BLOCK_C": max(16, tile // block_m)}
                cases.append(CompileCase(f"ensemble.{name}[{dtype},BLOCK_M={block_m}]", kernel,
                                         signature, constexprs, num_warps=NUM_WARPS))
    return cases
