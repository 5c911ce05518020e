# SPDX-License-Identifier: Apache-2.0
"""`python -m bench` options reach the benchmark's configuration (the run itself is replaced)."""

import pytest

from bench import bn, cli, conv_sweep, ensemble, table


class _Captured(Exception):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg


def _capture(*args, **kwargs):
    raise _Captured(next(a for a in args if hasattr(a, "warmup")))


@pytest.mark.parametrize("module, argv, expected", [
    (ensemble, ["ensemble", "--num-estimators", "3", "--batch", "7", "--classes", "11",
                "--dtype", "bf16", "--backends", "torch,triton", "--warmup", "1", "--reps", "2"],
     dict(num_estimators=3, batch=7, classes=11, dtype="bf16", backends=("torch", "triton"),
          warmup=1, reps=2)),
    (conv_sweep, ["conv", "--batch", "5", "--arch", "18", "--rows", "pe242-stock", "--dtype", "fp16",
                  "--layout", "channels_last", "--backends", "cuda", "--limit", "3"],
     dict(batch=5, arch=18, rows=("pe242-stock",), dtypes=("fp16",), layouts=("channels_last",),
          backends=("cuda",), limit=3)),
    (bn, ["bn", "--batch", "4", "--dtype", "bf16,fp32", "--layout", "channels_last",
          "--backends", "simt", "--limit", "2", "--reps", "9"],
     dict(batch=4, dtypes=("bf16", "fp32"), layouts=("channels_last",), backends=("simt",), limit=2, reps=9)),
    (table, ["table", "--batch", "6", "--infer-batch", "12", "--image-size", "16", "--epoch-images",
             "100", "--loader-workers", "0", "--precision", "fp32"],
     dict(batch=6, infer_batch=12, image_size=16, epoch_images=100, loader_workers=0,
          precisions=("fp32",))),
])
def test_options_reach_the_config(monkeypatch, module, argv, expected):
    monkeypatch.setattr(module, "run_table" if module is table else "run", _capture)
    with pytest.raises(_Captured) as captured:
        cli.main(argv + ["--device", "cpu", "--no-save", "--quiet"])
    assert {name: getattr(captured.value.cfg, name) for name in expected} == expected


def test_omitted_options_keep_the_device_defaults(monkeypatch):
    monkeypatch.setattr(ensemble, "run", _capture)
    with pytest.raises(_Captured) as captured:
        cli.main(["ensemble", "--device", "cpu", "--no-save"])
    assert captured.value.cfg == ensemble.EnsembleConfig.for_device("cpu")
