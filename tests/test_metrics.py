# SPDX-License-Identifier: Apache-2.0
"""packed_kernels.metrics against scikit-learn on random cases and against hand-worked cases."""

import math

import numpy as np
import pytest
import torch

from packed_kernels import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _random_probs(rng, n, c):
    logits = rng.normal(scale=rng.uniform(0.5, 4.0), size=(n, c))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def _random_ood_case(rng):
    """Scores with a random amount of separation and, half of the time, many ties."""
    n = int(rng.integers(5, 400))
    labels = rng.integers(0, 2, size=n)
    labels[0], labels[1] = 0, 1  # both classes present
    scores = rng.normal(size=n) + rng.uniform(0, 3) * labels
    if rng.random() < 0.5:
        scores = np.round(scores * rng.integers(1, 4)) / 2  # a handful of distinct values
    return scores, labels


# ---------------------------------------------------------------------------------------------
# random cases vs scikit-learn
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(20))
def test_ood_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    scores, labels = _random_ood_case(rng)
    assert metrics.auroc(scores, labels) == pytest.approx(
        sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.aupr(scores, labels) == pytest.approx(
        sklearn_metrics.average_precision_score(labels, scores), abs=1e-12)
    # FPR95 from scikit-learn's ROC points (drop_intermediate keeps every threshold).
    fpr, tpr, _ = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=False)
    expected = fpr[np.argmax(tpr >= 0.95 - 1e-12)]
    assert metrics.fpr_at_tpr(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_ood_metrics_accept_torch_tensors_of_any_float_dtype():
    rng = np.random.default_rng(7)
    scores, labels = _random_ood_case(rng)
    expected = sklearn_metrics.roc_auc_score(labels, scores.astype(np.float32))
    got = metrics.auroc(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels))
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    n, c = int(rng.integers(1, 300)), int(rng.integers(2, 12))
    probs = _random_probs(rng, n, c)
    targets = rng.integers(0, c, size=n)
    assert metrics.accuracy(probs, targets) == pytest.approx(
        sklearn_metrics.accuracy_score(targets, probs.argmax(axis=1)), abs=1e-12)
    assert metrics.nll(probs, targets) == pytest.approx(
        sklearn_metrics.log_loss(targets, probs, labels=list(range(c))), rel=1e-9)


def test_brier_score_of_two_classes_is_twice_sklearns_binary_brier():
    # sklearn's binary Brier score is mean (p_1 - y)^2; summing over both classes doubles it.
    rng = np.random.default_rng(3)
    probs = _random_probs(rng, 97, 2)
    targets = rng.integers(0, 2, size=97)
    assert metrics.brier_score(probs, targets) == pytest.approx(
        2 * sklearn_metrics.brier_score_loss(targets, probs[:, 1]), rel=1e-12)


def _ece_by_loop(probs, targets, num_bins):
    """ECE written independently: explicit masks (lo, hi] per bin, confidence 0 in bin 0."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    total = 0.0
    for b in range(num_bins):
        lo, hi = b / num_bins, (b + 1) / num_bins
        mask = (confidence > lo) & (confidence <= hi)
        if b == 0:
            mask |= confidence == 0
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return total


@pytest.mark.parametrize("seed", range(8))
def test_ece_matches_an_independent_loop(seed):
    rng = np.random.default_rng(200 + seed)
    n, c = int(rng.integers(1, 500)), int(rng.integers(2, 20))
    probs = _random_probs(rng, n, c)
    targets = rng.integers(0, c, size=n)
    num_bins = int(rng.integers(1, 20))
    assert metrics.ece(probs, targets, num_bins) == pytest.approx(
        _ece_by_loop(probs, targets, num_bins), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# hand-worked cases
# ---------------------------------------------------------------------------------------------

def test_ood_perfect_separation_and_its_reverse():
    labels = [0, 0, 0, 1, 1]
    assert metrics.auroc([0.1, 0.2, 0.3, 0.8, 0.9], labels) == 1.0
    assert metrics.aupr([0.1, 0.2, 0.3, 0.8, 0.9], labels) == 1.0
    assert metrics.fpr_at_tpr([0.1, 0.2, 0.3, 0.8, 0.9], labels) == 0.0
    assert metrics.auroc([0.9, 0.8, 0.7, 0.2, 0.1], labels) == 0.0
    # Reversed: OOD found only after all 3 ID samples; precision 1/4 then 2/5 at recall 1/2, 1.
    assert metrics.aupr([0.9, 0.8, 0.7, 0.2, 0.1], labels) == pytest.approx(0.5 * 0.25 + 0.5 * 0.4)
    assert metrics.fpr_at_tpr([0.9, 0.8, 0.7, 0.2, 0.1], labels) == 1.0


def test_ood_all_scores_tied():
    # One threshold: the ROC is the diagonal, precision is the OOD fraction.
    labels = [0, 1, 0, 1, 1]
    assert metrics.auroc([3.0] * 5, labels) == pytest.approx(0.5)
    assert metrics.aupr([3.0] * 5, labels) == pytest.approx(3 / 5)
    assert metrics.fpr_at_tpr([3.0] * 5, labels) == 1.0


def test_ood_partial_tie_counts_as_one_threshold():
    # scores [2, 1, 1, 0], labels [1, 1, 0, 0]: thresholds give (fpr, tpr) = (0, .5), (.5, 1),
    # (1, 1). AUROC = .5*.5 (rise) ... = area 0.25*... computed: 0.5*(0.5+1)/2 + 0.5*1 = 0.875.
    # AP: at threshold 2 P=1, R=.5; at 1 P=2/3, R=1 -> 0.5*1 + 0.5*2/3.
    scores, labels = [2.0, 1.0, 1.0, 0.0], [1, 1, 0, 0]
    assert metrics.auroc(scores, labels) == pytest.approx(0.875)
    assert metrics.aupr(scores, labels) == pytest.approx(0.5 + 1 / 3)
    assert metrics.fpr_at_tpr(scores, labels) == pytest.approx(0.5)
    # The sample order of tied scores does not matter.
    assert metrics.aupr([2.0, 1.0, 1.0, 0.0], [1, 0, 1, 0]) == pytest.approx(0.5 + 1 / 3)


def test_fpr95_picks_the_first_threshold_reaching_95_percent():
    # 20 OOD samples with scores 10..29 and 10 ID samples with scores 0, 2, ..., 18. Catching 19
    # of 20 OOD (TPR 0.95) needs threshold 11; the ID samples >= 11 are 12, 14, 16, 18: FPR 0.4.
    ood = np.arange(10, 30, dtype=float)
    ind = np.arange(0, 20, 2, dtype=float)
    scores = np.concatenate([ood, ind])
    labels = np.concatenate([np.ones(20, int), np.zeros(10, int)])
    assert metrics.fpr_at_tpr(scores, labels) == pytest.approx(0.4)
    assert metrics.fpr_at_tpr(scores, labels, tpr=1.0) == pytest.approx(0.5)  # threshold 10


def test_ece_hand_worked_and_bin_edges():
    probs = [[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]]
    # conf .9: accuracy 1/2 -> gap .4; conf .6: accuracy 1 -> gap .4; each half the samples.
    assert metrics.ece(probs, [0, 1, 0, 0]) == pytest.approx(0.4)
    assert metrics.ece(probs, [0, 0, 0, 0]) == pytest.approx(0.5 * 0.1 + 0.5 * 0.4)
    # Right-closed bins: confidence exactly 1 lands in the last bin, 1/15 in the first,
    # just above 1/15 in the second.
    bins = metrics.calibration_bins([[1.0, 0.0], [0.5, 0.5]], [0, 0], num_bins=2)
    assert bins.count.tolist() == [1, 1]
    assert bins.accuracy.tolist() == [1.0, 1.0]
    first = 1 / 15
    probs = [[first] * 15, [first + 1e-9, *[(1 - first - 1e-9) / 14] * 14]]
    assert metrics.calibration_bins(probs, [0, 0]).count[:2].tolist() == [1, 1]


def test_nll_and_brier_hand_worked():
    probs = [[0.7, 0.2, 0.1], [0.25, 0.5, 0.25]]
    assert metrics.nll(probs, [0, 2]) == pytest.approx(-(math.log(0.7) + math.log(0.25)) / 2)
    # (0.3^2 + 0.2^2 + 0.1^2 + 0.25^2 + 0.5^2 + 0.75^2) / 2
    assert metrics.brier_score(probs, [0, 2]) == pytest.approx((0.14 + 0.875) / 2)
    assert metrics.accuracy(probs, [0, 2]) == 0.5
    # A zero probability on the target is finite (clamped), not inf.
    assert math.isfinite(metrics.nll([[1.0, 0.0]], [1]))


def test_regression_metrics():
    rng = np.random.default_rng(5)
    mean, target = rng.normal(size=50), rng.normal(size=50)
    variance = rng.uniform(0.1, 2.0, size=50)
    assert metrics.rmse(mean, target) == pytest.approx(
        math.sqrt(sklearn_metrics.mean_squared_error(target, mean)), rel=1e-12)
    expected = torch.nn.functional.gaussian_nll_loss(
        torch.tensor(mean), torch.tensor(target), torch.tensor(variance), full=True).item()
    assert metrics.gaussian_nll(mean, variance, target) == pytest.approx(expected, rel=1e-12)


def test_gaussian_mixture_moments_match_sampling_free_formula():
    means = torch.randn(3, 17, dtype=torch.float64)
    variances = torch.rand(3, 17, dtype=torch.float64) + 0.1
    mu, var = metrics.gaussian_mixture_moments(means, variances)
    assert torch.allclose(mu, means.mean(0))
    assert torch.allclose(var, (variances + means ** 2).mean(0) - means.mean(0) ** 2)
    # One component: the mixture is that Gaussian.
    mu1, var1 = metrics.gaussian_mixture_moments(means[:1], variances[:1])
    assert torch.equal(mu1, means[0]) and torch.allclose(var1, variances[0])


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda: metrics.auroc([0.1, 0.2], [1, 1]), "both classes"),
    (lambda: metrics.auroc([0.1, float("nan")], [0, 1]), "NaN"),
    (lambda: metrics.aupr([0.1, 0.2, 0.3], [0, 1]), "shape"),
    (lambda: metrics.aupr([0.1, 0.2], [0, 2]), "0 \\(in-distribution\\) or 1"),
    (lambda: metrics.fpr_at_tpr([0.1, 0.2], [0, 1], tpr=0.0), "tpr"),
    (lambda: metrics.ece([[0.5, 0.5]], [0], num_bins=0), "num_bins"),
    (lambda: metrics.nll([[3.0, -2.0]], [0]), "logits"),
    (lambda: metrics.accuracy([[0.5, 0.5]], [2]), "targets must lie"),
    (lambda: metrics.accuracy([0.5, 0.5], [0]), "2-D"),
    (lambda: metrics.brier_score([[0.5, 0.5]], [0.5]), "integer"),
    (lambda: metrics.nll(np.zeros((0, 3)), []), "empty"),
    (lambda: metrics.gaussian_nll([0.0], [0.0], [1.0]), "positive"),
])
def test_bad_input_raises_clear_errors(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
