# SPDX-License-Identifier: Apache-2.0
"""The batch-norm benchmark's cases (BN + ReLU, training) as pytest-benchmark benchmarks, and
the bookkeeping behind its GB/s."""

import pytest
import torch
import torch.nn.functional as F

import packed_kernels as pk
from bench import bn
from bench.conftest import DEVICE

CFG = bn.BNConfig.for_device(DEVICE)
DTYPE = bn.DTYPES[CFG.dtypes[0]]
SHAPES = bn.activation_shapes(CFG)


@pytest.mark.parametrize("backend", bn.usable_backends(DEVICE, DTYPE))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_relu_train_forward(bench_run, shape, backend):
    x = torch.randn(CFG.batch, *shape, device=DEVICE, dtype=DTYPE)
    rm, rv = torch.zeros(shape[0], device=DEVICE), torch.ones(shape[0], device=DEVICE)
    w, b = torch.rand(shape[0], device=DEVICE), torch.randn(shape[0], device=DEVICE)
    y = bench_run(lambda: pk.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True,
                                        activation="relu", backend=backend),
                  shape=[CFG.batch, *shape], backend=backend, dtype=CFG.dtypes[0])
    expected = F.relu(F.batch_norm(x.float(), None, None, w, b, True)).to(DTYPE)
    torch.testing.assert_close(y, expected, atol=1e-3 if DTYPE == torch.float32 else 1e-2, rtol=0)


def test_bn_command_rows_are_consistent():
    cfg = bn.BNConfig(batch=2, arch=20, dtypes=("fp32",), layouts=("nchw",), limit=1,
                          warmup=0, reps=2, backends=("torch",))
    result = bn.run(cfg, torch.device("cpu"), progress=False)
    rows = result["rows"]
    blocks = result["block_rows"]
    assert [(r["impl"], r["pass"]) for r in blocks] == [
        ("stock", "inference"), ("stock", "train_forward_backward"),
        ("packed_kernels", "inference"), ("packed_kernels", "train_forward_backward")]
    assert all("error" not in r for r in blocks), [r.get("error") for r in blocks]
    assert blocks[0]["input_shape"] == [2, 64, 16, 16]  # ResNet-20 layer2: 32 planes x alpha 2, 16x16
    # the stock block runs torch's modules, and so does ours on the default path (the fused
    # path's calls, with an explicit kernel backend, are counted in tests/test_fused_models.py)
    calls = {(r["impl"], r["pass"]): r["kernel_calls"] for r in blocks}
    assert all(c == {} for c in calls.values()), calls
    sp = bn.block_speedups(blocks)
    assert {s["pass"] for s in sp} == {"inference", "train_forward_backward"}
    assert [(r["impl"], r["pass"]) for r in rows] == [
        ("torch (torch-cpu)", "train_forward"), ("torch (torch-cpu)", "train_forward_backward"),
        ("packed_kernels (torch)", "train_forward"), ("packed_kernels (torch)", "train_forward_backward")]
    for r in rows:
        assert "error" not in r, r.get("error")
        numel = 1
        for d in r["shape"]:
            numel *= d
        assert r["bytes"] == numel * 4 * (2 if r["pass"] == "train_forward" else 5)
        assert r["fraction_of_copy"] == pytest.approx(r["gbps"] / result["copy_bandwidth"]["gbps"])
    assert "cpu" in bn.format_result(result).splitlines()[-1]
