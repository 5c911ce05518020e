# SPDX-License-Identifier: Apache-2.0
"""The speed table's cases as pytest-benchmark benchmarks, plus the table's own behaviour.

On a GPU: batch 128 and ResNet-50 shapes, fp32 and fp16. On the CPU: batch 2, fp32, a few
rounds - a real smoke run of the same code paths (numbers are CPU numbers)."""

import pytest
import torch
import torch.nn.functional as F

from bench import cli, models, table
from bench.conftest import ARCH, DEVICE, ON_GPU

BATCH = 128 if ON_GPU else 2
ROWS = models.CPU_ROWS if ON_GPU else ("single-stock", "pe241-stock", "pe241-packed_kernels")
PRECISIONS = ("fp32", "fp16") if ON_GPU else ("fp32",)


def _model(key):
    row = models.parse_row(key)
    model, m, _ = models.build_model(row, arch=ARCH)
    return model.to(DEVICE), m


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("key", ROWS)
def test_train_step(bench_run, key, precision):
    model, m = _model(key)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = table.device_batches(table.TableConfig(), BATCH, DEVICE, 2)
    amp = torch.autocast(DEVICE.type, dtype=torch.float16, enabled=precision == "fp16")
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=precision == "fp16" and ON_GPU)
    losses = []

    def step(i=[0]):
        x, y = batches[i[0] % 2]
        i[0] += 1
        with amp:
            loss = F.cross_entropy(model(x), y.repeat(m))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())

    bench_run(step, row=key, precision=precision, batch=BATCH)
    assert losses and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("key", ROWS)
def test_inference(bench_run, key):
    model, m = _model(key)
    model.eval()
    x = table.device_batches(table.TableConfig(), BATCH, DEVICE, 1)[0][0]
    backend = "torch" if models.parse_row(key).impl == "stock" else None

    def infer():
        with torch.inference_mode():
            return pk_mean(model(x), m, backend)

    probs = bench_run(infer, row=key, batch=BATCH)
    assert probs.shape == (BATCH, 100)
    torch.testing.assert_close(probs.float().sum(1), torch.ones(BATCH, device=DEVICE))


def pk_mean(logits, m, backend):
    import packed_kernels as pk
    return pk.ensemble_mean(logits, m, backend=backend)


def test_row_parsing():
    assert models.parse_row("pe241").key == "pe241-stock"
    row = models.parse_row("pe242-packed_kernels-compile")
    assert (row.model, row.impl, row.compiled) == ("pe242", "packed_kernels", True)
    for bad in ("resnet", "pe241-fast", "single-stock-compile-x"):
        with pytest.raises(ValueError, match="unknown row"):
            models.parse_row(bad)


def test_paper_ratios_follow_the_paper():
    train, infer = table.paper_ratios("pe241", "fp16")
    assert train == pytest.approx(22.42 / 51.20) and infer == pytest.approx(3406 / 5718)
    assert table.paper_ratios("single", "fp32") == (1.0, 1.0)


def test_table_command_cpu_smoke(capsys, tmp_path):
    """The main command's code path end to end: real timings, a record, the CPU label."""
    argv = ["table", "--rows", "single,pe241-packed_kernels", "--arch", str(ARCH), "--batch", "2", "--warmup", "0",
            "--reps", "1", "--epoch-images", "10", "--quiet", "--out", str(tmp_path)]
    if not ON_GPU:
        argv += ["--device", "cpu"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith(("Single", "PE-(2,4,1)"))]
    assert len(lines) == 2 and all(DEVICE.type in l for l in lines)
    if not ON_GPU:
        assert "CPU NUMBERS" in out
    rec = list(tmp_path.rglob("table-*.json"))
    assert len(rec) == 1
    import json
    data = json.loads(rec[0].read_text())
    assert [r["row"] for r in data["rows"]] == ["single-stock", "pe241-packed_kernels"]
    for r in data["rows"]:
        assert "error" not in r, r.get("error")
        assert r["steps_per_epoch"] == 5 and r["train_epoch"]["median"] == pytest.approx(
            5 * r["train_step"]["median"])


def test_rows_route_their_layers():
    """Stock rows run torch's own conv and BatchNorm2d; packed_kernels rows run our ops on the
    engine asked for."""
    routed = lambda model: {m.backend for m in model.modules()  # noqa: E731
                            if getattr(type(m), "routes_through_packed_ops", False)}
    stock, _, _ = models.build_model(models.parse_row("pe241-stock"), arch=ARCH)
    assert routed(stock) == {"stock"}
    assert all(type(m) is torch.nn.BatchNorm2d for m in stock.modules() if "BatchNorm" in type(m).__name__)
    ours, _, _ = models.build_model(models.parse_row("pe241-packed_kernels"), arch=ARCH, ours_backend="torch")
    assert routed(ours) == {"torch"}
    auto, _, _ = models.build_model(models.parse_row("pe241-packed_kernels"), arch=ARCH)
    assert routed(auto) == {None}


def test_masksembles_rows_run_the_same_network_stock_and_on_our_ops():
    stock, m, _ = models.build_model(models.parse_row("masksembles-stock"), arch=ARCH)
    ours, _, _ = models.build_model(models.parse_row("masksembles-packed_kernels"), arch=ARCH,
                                    ours_backend="torch")
    assert m == 4 and "masksembles-stock" in models.CPU_ROWS
    masks = lambda model: [p for n, p in model.named_parameters() if n.endswith("mask.masks")]  # noqa: E731
    assert len(masks(ours)) > 0 and all(torch.equal(a, b) for a, b in zip(masks(stock), masks(ours)))
    ours.load_state_dict(stock.state_dict(), strict=True)  # the same weights (initialised apart)
    routed = {mod.backend for mod in ours.modules() if getattr(type(mod), "routes_through_packed_ops", False)}
    assert routed == {"torch"}
    x = torch.randn(2, 3, 8, 8)
    stock.eval(), ours.eval()
    torch.testing.assert_close(ours(x), stock(x), rtol=1e-5, atol=1e-5)
    ours.train()  # trains on the batch repeated M times, as the table's targets expect
    assert ours(x).shape == (4 * 2, 100)


def test_mimo_trains_on_shuffled_copies():
    row = models.parse_row("mimo")
    x, y = torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 2])
    xin, targets = models.training_batch(row, x, y, 4)
    assert xin.shape == (12, 2) and targets.shape == (12,)
    for k in range(4):  # each estimator's slice is a permutation of the batch, targets aligned
        assert sorted(targets[3 * k:3 * k + 3].tolist()) == [0, 1, 2]
        torch.testing.assert_close(xin[3 * k:3 * k + 3], x[targets[3 * k:3 * k + 3]])
    xin, targets = models.training_batch(models.parse_row("pe241"), x, y, 4)
    assert xin is x and targets.tolist() == [0, 1, 2] * 4
