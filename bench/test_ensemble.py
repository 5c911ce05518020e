# SPDX-License-Identifier: Apache-2.0
"""The ensemble-op benchmark's cases (M=4, B=1024, C=1000; fp16 on a GPU, fp32 on the CPU)
as pytest-benchmark benchmarks, and the bandwidth bookkeeping behind its GB/s."""

import pytest
import torch

import packed_kernels as pk
from bench import ensemble
from bench.conftest import DEVICE

CFG = ensemble.EnsembleConfig.for_device(DEVICE)
DTYPE = ensemble.DTYPES[CFG.dtype]
BACKENDS = ensemble.usable_backends(DEVICE, DTYPE)


@pytest.fixture(scope="module")
def logits():
    return torch.randn(CFG.num_estimators * CFG.batch, CFG.classes, device=DEVICE, dtype=DTYPE) * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_ensemble_mean(bench_run, logits, backend):
    m = CFG.num_estimators
    probs = bench_run(lambda: pk.ensemble_mean(logits, m, backend=backend), op="ensemble_mean",
                      backend=backend, dtype=CFG.dtype, bytes=ensemble.op_bytes(
                          "mean_forward", m, CFG.batch, CFG.classes, DTYPE.itemsize))
    expected = torch.softmax(logits.float().reshape(m, CFG.batch, -1), -1).mean(0)
    torch.testing.assert_close(probs.float(), expected, atol=2e-3, rtol=0)  # fp16 output rounding


@pytest.mark.parametrize("backend", BACKENDS)
def test_ensemble_scores(bench_run, logits, backend):
    m = CFG.num_estimators
    scores = bench_run(lambda: pk.ensemble_scores(logits, m, backend=backend), op="ensemble_scores",
                       backend=backend, dtype=CFG.dtype)
    assert scores.probs.shape == (CFG.batch, CFG.classes)
    assert bool(((scores.variation_ratio >= 0) & (scores.variation_ratio <= 1 - 1 / m)).all())


def test_op_bytes_counts_compulsory_traffic():
    m, b, c, s = 4, 1024, 1000, 2
    assert ensemble.op_bytes("mean_forward", m, b, c, s) == (m + 1) * b * c * s
    assert ensemble.op_bytes("mean_backward", m, b, c, s) == (2 * m + 1) * b * c * s
    with pytest.raises(ValueError):
        ensemble.op_bytes("nope", m, b, c, s)


def test_ensemble_command_reports_fraction_of_copy(capsys):
    cfg = ensemble.EnsembleConfig(batch=64, classes=37, dtype="fp32", warmup=1, reps=3,
                                      backends=("torch",))
    result = ensemble.run(cfg, DEVICE, progress=False)
    assert result["copy_bandwidth"]["gbps"] > 0
    for row in result["rows"]:
        assert "error" not in row
        assert row["gbps"] == pytest.approx(row["bytes"] / row["time"]["median"] / 1e9)
        assert row["fraction_of_copy"] == pytest.approx(row["gbps"] / result["copy_bandwidth"]["gbps"])
    text = ensemble.format_result(result)
    assert all(DEVICE.type in line for line in text.splitlines()[2:])
