# SPDX-License-Identifier: Apache-2.0
"""The conv sweep's cases as pytest-benchmark benchmarks: each layer of the PE models, ours vs
the torch grouped conv (cuDNN on a GPU) vs the dense conv of equal FLOPs; plus the sweep's
layer extraction and FLOP/byte bookkeeping."""

import math

import pytest
import torch
import torch.nn.functional as F

import packed_kernels as pk
from bench import conv_sweep
from bench.conftest import ARCH, DEVICE

CFG = conv_sweep.SweepConfig.for_device(DEVICE)
CASES = conv_sweep.model_conv_cases(CFG.rows, arch=ARCH)[:CFG.limit or None]
DTYPE = conv_sweep.DTYPES[CFG.dtypes[0]]
IMPLS = ("packed_kernels", "cudnn_grouped", "dense_equal_flops")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.replace(" ", "_"))
def test_conv_forward(bench_run, case, impl):
    shape = case.dense_equivalent() if impl == "dense_equal_flops" else case
    x, w, _ = conv_sweep._tensors(shape, CFG.batch, DTYPE, CFG.layouts[0], DEVICE, 1)[0]
    if impl == "packed_kernels":
        fn = lambda: pk.grouped_conv2d(x, w, None, shape.stride, shape.padding, shape.dilation,  # noqa: E731
                                       shape.groups)
    else:
        fn = lambda: F.conv2d(x, w, None, shape.stride, shape.padding, shape.dilation, shape.groups)  # noqa: E731
    y = bench_run(fn, layer=case.name, impl=impl, dtype=CFG.dtypes[0], layout=CFG.layouts[0],
                  flops=shape.flops(CFG.batch))
    assert tuple(y.shape[2:]) == shape.out_hw()


def test_layer_extraction_sees_the_packed_structure():
    # ResNet-50: its layers are wide enough that PE-(2,4,2) keeps gamma=2 (8 groups)
    cases = conv_sweep.model_conv_cases(["pe241-stock", "pe242-stock"], arch=50)
    assert cases[0].groups == 1  # the dense stem: the input is shared by all estimators
    groups = {c.groups for c in cases[1:] if c.model == "PE-(2,4,1)"}
    assert 4 in groups and groups <= {1, 4}
    assert 8 in {c.groups for c in cases if c.model == "PE-(2,4,2)"}
    assert all(c.count >= 1 for c in cases)


def test_dense_equivalent_has_equal_flops():
    case = conv_sweep.ConvCase("x", 512, 512, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 4)
    dense = case.dense_equivalent()
    assert dense.groups == 1 and (dense.c_in, dense.c_out) == (256, 256)
    assert dense.flops(3) == case.flops(3)
    odd = conv_sweep.ConvCase("x", 256, 512, 8, 8, (1, 1), (1, 1), (0, 0), (1, 1), 8).dense_equivalent()
    assert abs(math.log(odd.flops(1) / conv_sweep.ConvCase(
        "x", 256, 512, 8, 8, (1, 1), (1, 1), (0, 0), (1, 1), 8).flops(1))) < 0.1


def test_sweep_rows_are_consistent():
    cfg = conv_sweep.SweepConfig(batch=2, rows=("pe241-stock",), dtypes=("fp32",), layouts=("nchw",),
                                 limit=2, warmup=0, reps=1, arch=ARCH)
    result = conv_sweep.run(cfg, torch.device("cpu"), progress=False)
    rows = [r for r in result["rows"] if "error" not in r]
    assert len(rows) == 2 * 3 * 4  # layers x (cuDNN, ours, dense) x (fwd, bwd, dgrad, wgrad)
    for r in rows:
        assert r["tflops"] == pytest.approx(r["flops"] / r["time"]["median"] / 1e12)
        assert r["device"].startswith("cpu")
    sp = conv_sweep.speedups(rows)
    assert {s["pass"] for s in sp} == {"forward", "backward", "input_grad", "weight_grad"}
