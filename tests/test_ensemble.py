# SPDX-License-Identifier: Apache-2.0
"""ensemble_mean / ensemble_scores: every backend against the float64 reference."""

import pytest
import torch

import packed_kernels as pk
from packed_kernels.ops.ensemble import reference_mean, reference_scores

from conftest import require_backend
from helpers import assert_all_finite, assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, B, C, trailing dims): tiny, odd, single estimator, single row, many classes, dense maps
SHAPES = [(4, 3, 10, ()), (3, 5, 7, ()), (1, 2, 3, ()), (4, 1, 2, ()), (2, 2, 1000, ()),
          (5, 2, 33, ()), (4, 2, 5, (3, 2))]
BACKENDS = ["torch", "triton", "cuda", "simt"]


def _logits(shape, dtype, device, scale=3.0):
    m, b, c, extra = shape
    return (torch.randn(m * b, c, *extra, dtype=torch.float64) * scale).to(dtype).to(device)


def _torch_at(dtype_logits, fn):
    """torch's own answer at the input precision (on the CPU, in that dtype)."""
    return fn(dtype_logits.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ensemble_mean_forward_backward(backend, dtype, shape):
    device = require_backend(backend, dtype)
    m = shape[0]
    x = _logits(shape, dtype, device).requires_grad_(True)
    out = pk.ensemble_mean(x, m, backend=backend)
    assert out.dtype == dtype and out.device == x.device
    assert_all_finite(out)
    x64 = x.detach().cpu().double().requires_grad_(True)
    ref = torch.softmax(x64.reshape(m, -1, *x64.shape[1:]), 2).mean(0)
    lowp = torch.softmax(x.detach().cpu().float().reshape(m, -1, *x.shape[1:]), 2).to(dtype).float().mean(0)
    assert_close(out, ref, lowp, dtype, "probs")

    grad = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    (g_ours,) = torch.autograd.grad(out, x, grad.to(device))
    (g_ref,) = torch.autograd.grad(ref, x64, grad.double())
    xl = x.detach().cpu().to(dtype).requires_grad_(True)
    lowp_out = torch.softmax(xl.reshape(m, -1, *xl.shape[1:]), 2).mean(0)
    (g_lowp,) = torch.autograd.grad(lowp_out, xl, grad)
    assert_all_finite(g_ours)
    assert_close(g_ours, g_ref, g_lowp, dtype, "grad")


def _scores64(x64, m):
    # Reference written independently of reference_scores (which the torch backend uses).
    b = x64.shape[0] // m
    p = torch.softmax(x64.view(m, b, -1), 2)
    q = p.mean(0)
    entropy = -(q * q.log()).nansum(1)
    est_entropy = -(p * p.log()).nansum(2).mean(0)
    votes = torch.stack([(x64.view(m, b, -1).argmax(2) == k).sum(0) for k in range(x64.shape[1])], 1)
    return (q, q.max(1).values, x64.view(m, b, -1).mean(0).max(1).values, entropy,
            entropy - est_entropy, 1 - votes.max(1).values.double() / m)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [s for s in SHAPES if not s[3]])
def test_ensemble_scores_forward_backward(backend, dtype, shape):
    device = require_backend(backend, dtype)
    m = shape[0]
    x = _logits(shape, dtype, device).requires_grad_(True)
    scores = pk.ensemble_scores(x, m, backend=backend)
    assert isinstance(scores, pk.EnsembleScores)
    x64 = x.detach().cpu().double().requires_grad_(True)
    refs = _scores64(x64, m)
    lowp = reference_scores(x.detach().cpu(), m)  # torch at the input precision
    for name, ours, ref, theirs in zip(pk.EnsembleScores._fields, scores, refs, lowp):
        assert ours.dtype == dtype
        assert_all_finite(ours)
        if name == "variation_ratio":
            # Votes are exact (argmax of the same rounded logits); only 1 - votes/M is rounded.
            assert (ours.cpu().double() - ref).abs().max() <= torch.finfo(dtype).eps, name
        elif name == "mutual_information" and m == 1:
            # Exactly zero for one estimator: judge the absolute error, a few roundings of entropy.
            assert ours.abs().max() <= 10 * torch.finfo(dtype).eps * max(1.0, float(refs[3].detach().max())), name
        else:
            assert_close(ours, ref, theirs, dtype, name)

    grads = [torch.randn(s.shape, dtype=torch.float64) for s in scores[:5]]
    (g_ours,) = torch.autograd.grad(scores[:5], x, [g.to(dtype).to(device) for g in grads])
    (g_ref,) = torch.autograd.grad(refs[:5], x64, grads)
    xl = x.detach().cpu().requires_grad_(True)
    (g_lowp,) = torch.autograd.grad(reference_scores(xl, m)[:5], xl, [g.to(dtype) for g in grads])
    assert_all_finite(g_ours)
    assert_close(g_ours, g_ref, g_lowp, dtype, "grad")


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda", "simt"])
def test_extreme_logits_are_stable(backend):
    device = require_backend(backend)
    x = torch.randn(8, 50, dtype=torch.float64) * 1e4
    out = pk.ensemble_mean(x.float().to(device), 4, backend=backend)
    ref = reference_mean(x, 4)
    assert torch.isfinite(out).all()
    assert (out.cpu().double() - ref).abs().max() < 1e-6
    scores = pk.ensemble_scores(x.float().to(device), 4, backend=backend)
    for ours, ref in zip(scores, reference_scores(x, 4)):
        assert torch.isfinite(ours).all()
        assert (ours.cpu().double() - ref).abs().max() <= 1e-6 * max(1.0, float(ref.abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "cuda", "simt"])
def test_fifty_thousand_classes(backend):
    device = require_backend(backend)
    x = torch.randn(4 * 2, 50_000, dtype=torch.float64)
    out = pk.ensemble_mean(x.float().to(device), 4, backend=backend)
    assert (out.cpu().double() - reference_mean(x, 4)).abs().max() < 1e-8
    probs = pk.ensemble_scores(x.float().to(device), 4, backend=backend).probs
    assert (probs.cpu().double() - reference_mean(x, 4)).abs().max() < 1e-8


@pytest.mark.parametrize("make_bad, error, match", [
    (lambda d: (torch.randn(7, 5, device=d), 4), ValueError, "not divisible by num_estimators"),
    (lambda d: (torch.randn(8, 5, device=d), 0), ValueError, "num_estimators must be >= 1"),
    (lambda d: (torch.randn(8, 5, device=d), 2.0), TypeError, "num_estimators must be an int"),
    (lambda d: (torch.randint(0, 5, (8, 5), device=d), 4), TypeError, "floating-point"),
    (lambda d: (torch.randn(0, 5, device=d), 4), ValueError, "empty"),
    (lambda d: (torch.randn(8, 0, device=d), 4), ValueError, "empty"),
    (lambda d: (torch.randn(8, device=d), 4), ValueError, "at least 2 dimensions"),
    (lambda d: (torch.randn(8, 1, device=d), 4), ValueError, "at least 2 classes"),
    (lambda d: ([[1.0, 2.0]], 1), TypeError, "torch.Tensor"),
])
@pytest.mark.parametrize("fn", [pk.ensemble_mean, pk.ensemble_scores])
@pytest.mark.parametrize("backend", [None, "torch", "triton", "simt"])
def test_bad_input_raises_before_launch(fn, backend, make_bad, error, match, device):
    args = make_bad(device)
    with pytest.raises(error, match=match):
        fn(*args, backend=backend)


def test_scores_reject_dense_logits():
    with pytest.raises(ValueError, match=r"\(M\*B, C\)"):
        pk.ensemble_scores(torch.randn(8, 5, 2), 4)


def test_unknown_and_unavailable_backends_say_why():
    x = torch.randn(8, 5)
    with pytest.raises(ValueError, match="backend must be"):
        pk.ensemble_mean(x, 4, backend="cudnn")
    with pytest.raises(pk.BackendUnavailableError, match="needs CUDA tensors"):
        pk.ensemble_mean(x, 4, backend="cuda")
    with pytest.raises(pk.BackendUnavailableError, match="supports float32/float16/bfloat16"):
        pk.ensemble_mean(x.double(), 4, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda", "simt"])
def test_variation_ratio_is_not_differentiable(backend):
    """A vote count has no gradient: autograd says so instead of returning zeros."""
    device = require_backend(backend)
    x = torch.randn(8, 5, device=device, requires_grad=True)
    scores = pk.ensemble_scores(x, 4, backend=backend)
    assert not scores.variation_ratio.requires_grad and scores.entropy.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        scores.variation_ratio.sum().backward()


def test_available_backends_answers_for_an_absent_gpu():
    """Asking about CUDA on a machine without one lists what can run, never raises."""
    found = pk.available_backends("cuda")
    assert "torch" in found
    if not torch.cuda.is_available():
        assert found == ["torch"]


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda", "simt"])
def test_a_masked_class_changes_nothing(backend):
    """A class every estimator masks (logit -inf) has probability 0 and contributes 0 log 0 = 0:
    every score and gradient equals that of the logits without it (MI finite, not NaN)."""
    device = require_backend(backend)
    m, b, c = 4, 3, 6
    kept = torch.randn(m * b, c)
    masked = torch.cat((torch.full((m * b, 1), float("-inf")), kept), dim=1).to(device).requires_grad_()
    kept.requires_grad_()
    ours = pk.ensemble_scores(masked, m, backend=backend)
    ref = pk.ensemble_scores(kept, m, backend="torch")
    torch.testing.assert_close(ours.probs.detach().cpu()[:, 1:], ref.probs.detach(), rtol=1e-5, atol=1e-6)
    assert (ours.probs[:, 0] == 0).all()
    for name in ("msp", "max_logit", "entropy", "mutual_information", "variation_ratio"):
        torch.testing.assert_close(getattr(ours, name).detach().cpu(), getattr(ref, name).detach(),
                                   rtol=1e-5, atol=1e-6, msg=name)
    grads = [torch.randn(t.shape) for t in ref[:5]]
    # any upstream gradient on the masked class's probability moves nothing (p = 0 there)
    ours_grads = [torch.cat((torch.randn(b, 1), grads[0]), dim=1)] + grads[1:]
    (g_ours,) = torch.autograd.grad(list(ours[:5]), masked, [g.to(device) for g in ours_grads])
    (g_ref,) = torch.autograd.grad(list(ref[:5]), kept, grads)
    assert torch.isfinite(g_ours).all()
    torch.testing.assert_close(g_ours.cpu()[:, 1:], g_ref, rtol=1e-4, atol=1e-5)
    assert (g_ours[:, 0] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda", "simt"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_inf_logit_makes_its_sample_nan(backend, bad):
    """torch's log-softmax of a row with NaN or +inf is NaN: that sample's probabilities, MSP,
    entropy and MI are NaN on every backend (never a finite, confident-looking score), its max
    logit is torch's (NaN, or +inf), and the other samples are untouched."""
    device = require_backend(backend)
    m, b, c = 4, 3, 5
    x = torch.randn(m * b, c)
    x[2 * b + 1, 3] = bad  # estimator 2, sample 1
    ours = pk.ensemble_scores(x.to(device), m, backend=backend)
    ref = pk.ensemble_scores(x, m, backend="torch")
    for name in ("probs", "msp", "entropy", "mutual_information"):
        assert torch.isnan(getattr(ref, name)[1]).all(), name  # the case is what it claims
    for name in ("probs", "msp", "max_logit", "entropy", "mutual_information"):
        got, want = getattr(ours, name).cpu(), getattr(ref, name)
        assert torch.equal(torch.isnan(got), torch.isnan(want)), name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)


@pytest.mark.parametrize("backend", ["cuda", "simt"])
@pytest.mark.parametrize("m, c", [(32, 2000), (64, 1000), (64, 4000)])
def test_scores_backward_fits_the_shared_memory_of_a_launch(backend, m, c):
    """Its per-thread partial sums (dynamic shared memory) plus its static shared memory stay
    within the 48 KiB a launch gets without an opt-in, for many estimators and classes (the
    emulator faults like the GPU's launch would)."""
    device = require_backend(backend)
    x = torch.randn(m * 2, c, device=device, requires_grad=True)
    scores = pk.ensemble_scores(x, m, backend=backend)
    (grad,) = torch.autograd.grad(scores.entropy.sum() + scores.msp.sum(), x)
    ref_x = x.detach().cpu().double().requires_grad_()
    ref = pk.ensemble_scores(ref_x, m, backend="torch")
    (ref_grad,) = torch.autograd.grad(ref.entropy.sum() + ref.msp.sum(), ref_x)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-4, atol=1e-6)
