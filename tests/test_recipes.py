# SPDX-License-Identifier: Apache-2.0
"""The recipes in python/: train -> evaluate, resume after a hard kill, bad input, the demos
(smoke budgets), the data readers and DistributedDataParallel through torchrun."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON_DIR = os.path.join(REPO, "python")
if PYTHON_DIR not in sys.path:
    sys.path.insert(0, PYTHON_DIR)

pytest.importorskip("sklearn")

from recipes import data as rdata  # noqa: E402
from recipes import models as rmodels  # noqa: E402
from recipes.errors import RecipeError, run_cli  # noqa: E402
from recipes.evaluation import OOD_CRITERIA, ood_metrics  # noqa: E402

# Tiny models run fastest on one thread, and the CI machine's cores are shared.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_script(script, *args, check=True, timeout=240):
    proc = subprocess.run([sys.executable, os.path.join(PYTHON_DIR, script), *map(str, args)],
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# train -> evaluate
# ---------------------------------------------------------------------------------------------

def test_train_then_evaluate_on_digits(tmp_path, capsys):
    out = tmp_path / "run"
    run_script("train.py", "--dataset", "digits", "--classes", "0-4", "--model", "small_cnn",
               "--method", "packed", "-M", 4, "--alpha", 2, "--gamma", 1, "--width", 8,
               "--epochs", 2, "--batch-size", 64, "--lr", 0.05, "--out", out)
    log = read_log(out / "metrics.jsonl")
    assert [r["event"] for r in log] == ["start", "epoch", "epoch", "end"]
    assert log[0]["config"]["momentum"] == 0.9 and log[0]["model"]["num_estimators"] == 4
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [1, 2]
    assert set(log[2]["test"]) == {"acc", "nll", "ece", "brier"}

    import evaluate  # in-process: one interpreter start less
    assert run_cli(evaluate.main, [str(out / "checkpoint.pt")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    assert report["epoch"] == 2
    assert set(report["test"]) == {"acc", "nll", "ece", "brier"}
    assert 0 <= report["test"]["acc"] <= 1 and report["test"]["nll"] > 0
    assert report["ood"]["samples"] > 0  # the held-out digits 5-9
    for criterion in OOD_CRITERIA:
        values = report["ood"][criterion]
        assert set(values) == {"auroc", "aupr", "fpr95"}
        assert all(0 <= v <= 1 for v in values.values())
    # The evaluation's test metrics are the training loop's last ones (same model, same data).
    assert report["test"]["acc"] == pytest.approx(log[2]["test"]["acc"], abs=1e-9)
    for png in ("reliability.png", "scores.png"):
        blob = (out / png).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000
    assert "mutual_information" in printed
    # Another dataset as the OOD set, shaped and normalised like the training data.
    assert run_cli(evaluate.main, [str(out / "checkpoint.pt"), "--ood-dataset", "synthetic",
                                   "--no-plots", "--out", str(tmp_path / "vs_synthetic")]) == 0
    other = json.loads((tmp_path / "vs_synthetic" / "metrics.json").read_text())
    assert other["ood"]["set"] == "synthetic" and other["ood"]["samples"] == 256
    assert other["test"] == report["test"]


@pytest.mark.parametrize("method", ["single", "packed", "deep", "mimo", "batch", "masksembles"])
def test_every_method_of_the_zoo_trains_and_evaluates(tmp_path, method):
    pytest.importorskip("packed_kernels.models")
    import evaluate
    import train
    out = tmp_path / method
    args = ["--dataset", "synthetic", "--synthetic-size", "24", "16", "--image-size", "8",
            "--model", "resnet20", "--method", method, "-M", "2", "--alpha", "2", "--gamma", "1",
            "--epochs", "1", "--batch-size", "12", "--no-progress", "--out", str(out)]
    assert run_cli(train.main, args) == 0
    assert run_cli(evaluate.main, [str(out / "checkpoint.pt"), "--ood-dataset", "synthetic",
                                   "--no-plots"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["model"]["method"] == method
    assert 0 <= report["test"]["acc"] <= 1 and report["ood"]["samples"] > 0


def test_progress_bar_and_epoch_lines(tmp_path, capsys):
    from recipes.training import TrainConfig, train
    ds = rdata.load_dataset("synthetic", image_size=8, synthetic_size=(40, 8), synthetic_channels=1)
    spec = rmodels.make_spec("small_cnn", "packed", in_channels=1, num_classes=ds.num_classes,
                             num_estimators=2, alpha=2, gamma=1, width=4)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.01, milestones=[1])
    record = train(rmodels.build_model(spec), ds, cfg, num_estimators=2, out_dir=str(tmp_path),
                   model_spec=spec, progress=True)
    captured = capsys.readouterr()
    assert "epoch 2/2" in captured.err and "5/5" in captured.err  # tqdm: 40 / 8 = 5 steps
    assert "epoch 2/2  loss" in captured.out and record["epoch"] == 2
    assert record["lr"] == pytest.approx(0.001)  # stepped down x0.1 after epoch 1


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_and_channels_last_train(tmp_path, amp):
    import train
    args = [*map(str, TRAIN_SYNTHETIC), "--epochs", "1", "--amp", amp, "--channels-last",
            "--out", str(tmp_path)]
    assert run_cli(train.main, args) == 0
    record = [r for r in read_log(tmp_path / "metrics.jsonl") if r["event"] == "epoch"][0]
    assert np.isfinite(record["train_loss"]) and 0 <= record["test"]["acc"] <= 1


# ---------------------------------------------------------------------------------------------
# interrupt -> resume
# ---------------------------------------------------------------------------------------------

TRAIN_SYNTHETIC = ["--dataset", "synthetic", "--synthetic-size", 96, 32, "--image-size", 8,
                   "--model", "small_cnn", "--method", "packed", "-M", 2, "--alpha", 2,
                   "--width", 4, "--batch-size", 16, "--lr", 0.02, "--milestones", 3, 6,
                   "--no-progress"]


def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    epochs = 40
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    args = [*TRAIN_SYNTHETIC, "--epochs", epochs]
    proc = subprocess.Popen([sys.executable, os.path.join(PYTHON_DIR, "train.py"), *map(str, args),
                             "--out", str(killed)], env=ENV, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["epoch"] >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished (or died) before it could be interrupted"
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    done = torch.load(ckpt, weights_only=False)["epoch"]
    assert 2 <= done < epochs
    logged_before = [r for r in read_log(killed / "metrics.jsonl") if r["event"] == "epoch"]
    assert [r["epoch"] for r in logged_before][:done] == list(range(1, done + 1))

    resumed = run_script("train.py", *args, "--out", killed)
    assert f"resuming from {ckpt} after epoch {done}/{epochs}" in resumed.stdout
    assert "epoch 1/" not in resumed.stdout  # finished epochs are not redone
    log = read_log(killed / "metrics.jsonl")
    epoch_records = [r for r in log if r["event"] == "epoch"]
    assert [r["epoch"] for r in epoch_records] == list(range(1, epochs + 1))
    assert [r["event"] for r in log].count("resume") == 1
    # Records of finished epochs are kept as the first run wrote them.
    assert epoch_records[:done] == logged_before[:done]

    # The resumed run computes exactly what an uninterrupted one does.
    run_script("train.py", *args, "--out", straight)
    a = torch.load(killed / "checkpoint.pt", weights_only=False)
    b = torch.load(straight / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == epochs
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["train_loss"] for r in read_log(straight / "metrics.jsonl") if r["event"] == "epoch"] \
        == [r["train_loss"] for r in epoch_records]


def test_resume_refuses_a_different_configuration(tmp_path, capsys):
    import train
    args = [*map(str, TRAIN_SYNTHETIC), "--epochs", "1", "--out", str(tmp_path)]
    assert run_cli(train.main, args) == 0
    assert run_cli(train.main, [*args[:-2], "--lr", "0.5", "--out", str(tmp_path)]) == 2
    assert "different run" in capsys.readouterr().err
    # --fresh starts over.
    assert run_cli(train.main, [*args, "--fresh", "--lr", "0.5"]) == 0
    assert read_log(tmp_path / "metrics.jsonl")[0]["config"]["lr"] == 0.5


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--dataset", "cifar10", "--data-root", "/nonexistent/cifar", "--model", "small_cnn"],
     "data folder '/nonexistent/cifar' does not exist"),
    (["--model", "resnet9000"], "unknown model 'resnet9000'"),
])
def test_bad_input_exits_cleanly_without_traceback(tmp_path, args, message):
    proc = run_script("train.py", *args, "--out", tmp_path, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--alpha", "0"], "alpha must be a positive number"),
    (["--alpha", "nan"], "alpha must be a positive number"),
    (["-M", "0"], "M must be an integer >= 1"),
    (["--gamma", "0"], "gamma must be an integer >= 1"),
    (["--method", "bagging"], "unknown method"),
    # 16 * alpha = 32 channels do not split into M * gamma = 3 groups: the zoo's own check.
    (["-M", "3", "--width", "16"], "invalid configuration for small_cnn"),
    (["--dataset", "digits", "--classes", "3-12"], "out of range"),
    (["--dataset", "imagefolder"], "pass --data-root"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--milestones", "5", "2"], "--milestones must be increasing"),
    (["--eval-every", "0"], "--eval-every must be >= 1"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--synthetic-size", "0", "0"], "--synthetic-size needs at least 1"),
    (["--image-size", "0"], "--image-size must be >= 1"),
])
def test_bad_arguments_give_a_clear_message(tmp_path, capsys, args, message):
    import train
    base = ["--dataset", "synthetic", "--synthetic-size", "16", "8", "--image-size", "8",
            "--model", "small_cnn", "--method", "packed", "--epochs", "1", "--no-progress"]
    assert run_cli(train.main, [*base, *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_evaluate_rejects_a_missing_or_foreign_checkpoint(tmp_path, capsys):
    import evaluate
    assert run_cli(evaluate.main, [str(tmp_path / "nope.pt")]) == 2
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    assert run_cli(evaluate.main, [str(tmp_path / "foreign.pt")]) == 2
    assert run_cli(evaluate.main, [str(tmp_path)]) == 2
    assert run_cli(evaluate.main, [str(tmp_path / "foreign.pt"), "--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "not a checkpoint written by train.py" in err
    assert "is a folder" in err and "--batch-size must be >= 1" in err


def test_train_refuses_an_out_that_is_a_file(tmp_path, capsys):
    import train
    (tmp_path / "taken").write_text("not a folder")
    args = ["--dataset", "synthetic", "--synthetic-size", "16", "8", "--image-size", "8",
            "--model", "small_cnn", "--epochs", "1", "--out", str(tmp_path / "taken")]
    assert run_cli(train.main, args) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "not a folder"


# ---------------------------------------------------------------------------------------------
# demos (smoke budgets; python/README.md's tables come from the full defaults)
# ---------------------------------------------------------------------------------------------

def test_digits_demo_smoke(tmp_path, capsys):
    import digits_demo
    assert run_cli(digits_demo.main, ["--epochs", "2", "--seeds", "0", "--width", "8",
                                      "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert list(results) == ["Single", "PE-(2,4,1)", "Deep Ensembles (M=4)"]
    params = {label: runs[0]["parameters"] for label, runs in results.items()}
    # Deep Ensembles = 4 full-width networks; PE-(2,4,1) = 4 half-width ones (about 1x).
    conv_single = params["Single"]
    assert params["Deep Ensembles (M=4)"] > 3.5 * conv_single
    assert params["PE-(2,4,1)"] < 1.5 * conv_single
    for runs in results.values():
        for key in ("acc", "nll", "ece", "aupr", "auroc"):
            assert np.isfinite(runs[0][key])
    table = (tmp_path / "results.md").read_text()
    assert "| PE-(2,4,1) |" in table and "AUROC (%)" in table
    # A demo run's checkpoint evaluates with python/evaluate.py to the same numbers.
    import evaluate
    assert run_cli(evaluate.main, [str(tmp_path / "packed-seed0" / "checkpoint.pt"),
                                   "--no-plots"]) == 0
    report = json.loads((tmp_path / "packed-seed0" / "metrics.json").read_text())
    pe = results["PE-(2,4,1)"][0]
    # rel 1e-5: on a GPU, evaluation batches other than the demo's pick other conv kernels,
    # whose summation order moves the NLL by ~1e-6 relative (seen on an H200)
    assert report["test"]["nll"] == pytest.approx(pe["nll"], rel=1e-5)
    assert report["ood"]["msp"]["auroc"] == pytest.approx(pe["auroc"], rel=1e-5)


def test_diabetes_demo_smoke(tmp_path):
    import diabetes_demo
    assert run_cli(diabetes_demo.main, ["--splits", "1", "--epochs", "3", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert list(results) == ["Single", "PE-(2,3,1)", "Deep Ensembles (M=3)"]
    for runs in results.values():
        # Predicting the training mean gives an RMSE of about the target's std (77); 3 epochs
        # of training already beat a random guess by a margin.
        assert 30 < runs[0]["rmse"] < 150 and np.isfinite(runs[0]["nll"])


def test_gaussian_mlp_is_m_independent_heads():
    """PE-(M, M, 1) MLP: estimator m's outputs depend only on its own block of weights."""
    model = rmodels.PackedGaussianMLP(5, num_estimators=3, alpha=3, gamma=1, hidden=6)
    x = torch.randn(7, 5)
    mean, variance = model(x)
    assert mean.shape == variance.shape == (21,) and (variance > 0).all()
    with torch.no_grad():
        model.head.weight[1].add_(1.0)  # the head's second group belongs to estimator 1
    mean2, _ = model(x)
    changed = (mean2 != mean).reshape(3, 7).any(dim=1)
    assert changed.tolist() == [False, True, False]


def test_mimo_trains_on_independently_shuffled_copies():
    spec = rmodels.make_spec("resnet18", "mimo", in_channels=1, num_classes=10, num_estimators=3)
    transform = rmodels.training_batch(spec)
    labels = torch.arange(6)
    images = labels.float()[:, None, None, None].expand(6, 1, 2, 2).clone()
    inputs, targets = transform(images, labels, torch.Generator().manual_seed(0))
    assert inputs.shape == (18, 1, 2, 2) and targets.shape == (18,)
    assert torch.equal(inputs[:, 0, 0, 0].long(), targets)  # each input keeps its own label
    copies = targets.reshape(3, 6)
    assert all(sorted(c.tolist()) == list(range(6)) for c in copies)
    assert not torch.equal(copies[1], copies[2])
    assert rmodels.training_batch({**spec, "method": "packed"}) is None


# ---------------------------------------------------------------------------------------------
# evaluation criteria
# ---------------------------------------------------------------------------------------------

def test_ood_metrics_rank_uncertain_inputs_as_ood():
    torch.manual_seed(1)
    m, n, k = 4, 40, 5
    labels = torch.randint(0, k, (n,))
    confident = torch.randn(m, n, k) + 8 * torch.nn.functional.one_hot(labels, k)  # agree
    disagreeing = torch.randn(m, n, k) * 0.1
    disagreeing[torch.arange(m)[:, None], torch.arange(n)[None, :], torch.randint(0, k, (m, n))] += 8
    report = ood_metrics(confident, disagreeing)
    for criterion in ("msp", "entropy", "mutual_information"):
        assert report[criterion]["auroc"] > 0.95, criterion
    # The sign convention: in-distribution samples are not flagged (FPR95 near 0) by MSP.
    assert report["msp"]["fpr95"] < 0.1


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def _write_cifar10(folder, rng):
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, 6).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar_reader_reads_torchvision_batches(tmp_path):
    rng = np.random.default_rng(0)
    _write_cifar10(tmp_path / "cifar-10-batches-py", rng)
    ds = rdata.load_dataset("cifar10", str(tmp_path))
    assert ds.train.images.shape == (30, 3, 32, 32) and ds.test.images.shape == (6, 3, 32, 32)
    assert ds.num_classes == 10 and ds.augment
    # Row-major 3x32x32 per image, channel first: pixel (c, y, x) of image 0 is data[c*1024+y*32+x].
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f)[b"data"][0].astype(np.float32) / 255
    img = ds.test.images[0] * ds.std[:, None, None] + ds.mean[:, None, None]
    assert np.allclose(img.numpy().reshape(-1), raw, atol=1e-5)
    # The batches folder itself works too; a folder without them is a clear error.
    assert len(rdata.load_dataset("cifar10", str(tmp_path / "cifar-10-batches-py")).train) == 30
    with pytest.raises(RecipeError, match="expected train, test .*nothing is downloaded"):
        rdata.load_dataset("cifar100", str(tmp_path))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(RecipeError, match="data_batch_1, data_batch_2, data_batch_3"):
        rdata.load_dataset("cifar10", str(tmp_path))


def test_train_on_cifar_folder_with_augmentation(tmp_path):
    pytest.importorskip("packed_kernels.models")
    import train
    _write_cifar10(tmp_path / "data" / "cifar-10-batches-py", np.random.default_rng(3))
    args = ["--dataset", "cifar10", "--data-root", str(tmp_path / "data"), "--model", "resnet20",
            "--method", "packed", "-M", "2", "--epochs", "1", "--batch-size", "10",
            "--no-progress", "--out", str(tmp_path / "run")]
    assert run_cli(train.main, args) == 0
    log = read_log(tmp_path / "run" / "metrics.jsonl")
    # The paper's ResNet recipe fills what the command leaves unset.
    assert log[0]["config"]["lr"] == 0.05 and log[0]["config"]["milestones"] == [25, 50]
    assert log[1]["epoch"] == 1 and np.isfinite(log[1]["train_loss"])
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["data_root"] == str(tmp_path / "data")


def test_svhn_reader(tmp_path):
    from scipy.io import savemat
    rng = np.random.default_rng(2)
    for name, n in (("train_32x32.mat", 5), ("test_32x32.mat", 4)):
        savemat(tmp_path / name, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                  "y": np.array([[10], [1], [2], [10], [9]][:n], dtype=np.uint8)})
    ds = rdata.load_dataset("svhn", str(tmp_path))
    assert ds.train.images.shape == (5, 3, 32, 32) and ds.test.images.shape == (4, 3, 32, 32)
    assert ds.train.labels.tolist() == [0, 1, 2, 0, 9]  # SVHN's label 10 is the digit 0


def test_imagefolder_reader(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(1)
    for split, count in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png")
    ds = rdata.load_dataset("imagefolder", str(tmp_path), image_size=16)
    assert ds.train.images.shape == (6, 3, 16, 16) and ds.test.images.shape == (4, 3, 16, 16)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.num_classes == 2


def test_digits_split_and_held_out_classes():
    ds = rdata.load_dataset("digits", classes=[0, 1, 2, 3, 4], seed=0)
    assert ds.num_classes == 5 and set(ds.train.labels.tolist()) == set(range(5))
    assert set(ds.ood.labels.tolist()) == set(range(5, 10))
    assert len(ds.train) + len(ds.test) + len(ds.ood) < 1797  # the OOD set is test images only
    again = rdata.load_dataset("digits", classes=[0, 1, 2, 3, 4], seed=0)
    assert torch.equal(ds.test.images, again.test.images)


def test_epoch_batches_are_reproducible_and_shard_across_ranks():
    split = rdata.Split(torch.randn(23, 1, 4, 4), torch.arange(23))
    order = lambda **kw: torch.cat([y for _, y in rdata.epoch_batches(  # noqa: E731
        split, 5, epoch=3, seed=7, shuffle=True, **kw)])
    assert torch.equal(order(), order()) and sorted(order().tolist()) == list(range(23))
    shards = [order(rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 11  # equal shares keep DDP in step
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


def test_augmentation_crops_and_flips_within_the_padded_image():
    gen = torch.Generator().manual_seed(0)
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6) + 1
    out = rdata.augment_batch(images, gen, padding=2)
    assert out.shape == images.shape
    for i in range(2):
        padded = torch.nn.functional.pad(images[i], (2,) * 4)
        candidates = [padded[:, y:y + 6, x:x + 6] for y in range(5) for x in range(5)]
        candidates += [c.flip(2) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates)


# ---------------------------------------------------------------------------------------------
# DistributedDataParallel through torchrun (two CPU processes, gloo)
# ---------------------------------------------------------------------------------------------

def test_torchrun_ddp_two_processes(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(PYTHON_DIR, "train.py"), *map(str, TRAIN_SYNTHETIC), "--epochs", "2",
         "--out", str(tmp_path)], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = read_log(tmp_path / "metrics.jsonl")
    assert log[0]["world_size"] == 2
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [1, 2]  # rank 0 logs once


def test_damaged_runs_give_one_error_line_or_recover(tmp_path, capsys):
    """A log line cut short by a kill is dropped on resume; a checkpoint whose weights do not
    fit, or that is not ours, is refused by train and evaluate with one error line."""
    import evaluate
    import train
    args = ["--dataset", "synthetic", "--synthetic-size", "16", "8", "--image-size", "8",
            "--model", "small_cnn", "--method", "single", "--epochs", "1", "--no-progress",
            "--out", str(tmp_path)]
    assert run_cli(train.main, args) == 0
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"event": "epo')
    assert run_cli(train.main, args) == 0
    assert read_log(tmp_path / "metrics.jsonl")[-1]["event"] == "resume"
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    first = next(iter(state["model"]))
    state["model"][first] = torch.zeros(1)
    torch.save(state, tmp_path / "checkpoint.pt")
    assert run_cli(train.main, args) == 2
    assert run_cli(evaluate.main, [str(tmp_path / "checkpoint.pt"), "--no-plots"]) == 2
    torch.save({"model": {}}, tmp_path / "checkpoint.pt")
    assert run_cli(train.main, args) == 2
    err = capsys.readouterr().err
    assert err.count("holds weights that do not fit") == 2 and "not a checkpoint written by train.py" in err
    assert "Traceback" not in err
    assert run_cli(train.main, [*args[:-2], "--dataset", "digits", "--classes", "3-3",
                                "--out", str(tmp_path / "one")]) == 2
    assert "at least 2 classes" in capsys.readouterr().err
