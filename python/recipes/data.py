# SPDX-License-Identifier: Apache-2.0
"""Datasets for the recipes, held in memory as tensors (torchvision is not needed).

Sources:
- "cifar10" / "cifar100": the python-pickle batches of torchvision's format, read from a local
  folder (either the folder holding `cifar-10-batches-py/` or `cifar-100-python/`, or that
  folder itself). Nothing is downloaded.
- "svhn": torchvision's SVHN files (`train_32x32.mat`, `test_32x32.mat`), typically as OOD.
- "imagefolder": ROOT/train/<class>/<image> and ROOT/test/<class>/<image> (or val/), decoded
  with Pillow and resized to --image-size.
- "digits": scikit-learn's 8x8 digits (ships with scikit-learn), optionally restricted to some
  classes; the other classes are then available as an out-of-distribution set.
- "synthetic": class-conditional Gaussian images, for smoke tests and benchmarks.

Images are float32 (N, C, H, W) normalised per channel with the training set's statistics.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .errors import RecipeError

DATASETS = ("cifar10", "cifar100", "svhn", "imagefolder", "digits", "synthetic")


@dataclass
class Split:
    images: Tensor  # (N, C, H, W) float32, normalised
    labels: Tensor  # (N,) int64

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    # Per-channel statistics used for normalisation, so that an OOD set can be normalised alike.
    mean: Tensor = field(repr=False)
    std: Tensor = field(repr=False)
    ood: Optional[Split] = None  # out-of-distribution samples (labels are meaningless), if any
    augment: bool = False  # random crop (padding 4) + horizontal flip while training

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[2]


# ---------------------------------------------------------------------------------------------
# readers, each returning uint8/float arrays (N, H, W, C) and int labels
# ---------------------------------------------------------------------------------------------

def _find_dir(root: str, name: str, expected: Sequence[str]) -> str:
    """`root` itself or root/name, whichever holds the expected files."""
    for candidate in (root, os.path.join(root, name)):
        if all(os.path.isfile(os.path.join(candidate, f)) for f in expected):
            return candidate
    raise RecipeError(
        f"dataset files not found: expected {', '.join(expected)} in {root!r} or "
        f"{os.path.join(root, name)!r}. Download the dataset in torchvision's format and pass "
        f"its folder with --data-root (nothing is downloaded automatically).")


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise RecipeError(f"cannot read {path!r} as a CIFAR python batch: {exc}") from None


def _cifar_batches(paths: List[str], label_key: bytes) -> Tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path)
        if b"data" not in batch or label_key not in batch:
            raise RecipeError(f"{path!r} is not a CIFAR python batch (no data/{label_key.decode()})")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.concatenate(images).transpose(0, 2, 3, 1), np.concatenate(labels)


def read_cifar(root: str, num_classes: int):
    if num_classes == 10:
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        folder = _find_dir(root, "cifar-10-batches-py", train_files + ["test_batch"])
        train = _cifar_batches([os.path.join(folder, f) for f in train_files], b"labels")
        test = _cifar_batches([os.path.join(folder, "test_batch")], b"labels")
    else:
        folder = _find_dir(root, "cifar-100-python", ["train", "test"])
        train = _cifar_batches([os.path.join(folder, "train")], b"fine_labels")
        test = _cifar_batches([os.path.join(folder, "test")], b"fine_labels")
    return train, test


def read_svhn(root: str):
    folder = _find_dir(root, "svhn", ["train_32x32.mat", "test_32x32.mat"])
    from scipy.io import loadmat  # scipy comes with scikit-learn

    def load(name):
        mat = loadmat(os.path.join(folder, name))
        labels = mat["y"].astype(np.int64).reshape(-1) % 10  # SVHN stores digit 0 as 10
        return mat["X"].transpose(3, 0, 1, 2), labels

    return load("train_32x32.mat"), load("test_32x32.mat")


_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")


def read_imagefolder(root: str, image_size: int):
    try:
        from PIL import Image
    except ImportError:
        raise RecipeError("the imagefolder dataset needs Pillow (pip install pillow)") from None
    if not os.path.isdir(root):
        raise RecipeError(f"image folder {root!r} does not exist")
    train_dir = os.path.join(root, "train")
    test_dir = next((os.path.join(root, d) for d in ("test", "val")
                     if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(train_dir) or test_dir is None:
        raise RecipeError(f"{root!r} must contain train/ and test/ (or val/) folders, each with "
                          f"one sub-folder of images per class")
    classes = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    if not classes:
        raise RecipeError(f"{train_dir!r} has no class sub-folders")
    index = {c: i for i, c in enumerate(classes)}

    def load(split_dir):
        images, labels = [], []
        for cls in sorted(os.listdir(split_dir)):
            if not os.path.isdir(os.path.join(split_dir, cls)):
                continue
            if cls not in index:
                raise RecipeError(f"class folder {cls!r} in {split_dir!r} is not in train/")
            for name in sorted(os.listdir(os.path.join(split_dir, cls))):
                if not name.lower().endswith(_IMAGE_EXTENSIONS):
                    continue
                path = os.path.join(split_dir, cls, name)
                try:
                    with Image.open(path) as img:
                        img = img.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                        images.append(np.asarray(img, dtype=np.uint8))
                except OSError as exc:
                    raise RecipeError(f"cannot decode image {path!r}: {exc}") from None
                labels.append(index[cls])
        if not images:
            raise RecipeError(f"no images found under {split_dir!r}")
        return np.stack(images), np.asarray(labels, dtype=np.int64)

    return load(train_dir), load(test_dir), len(classes)


def read_digits(seed: int, test_fraction: float = 0.3):
    """scikit-learn's digits as (N, 8, 8, 1) in [0, 16], split with a fixed stratified shuffle."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = digits.images.astype(np.float32)[..., None]
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == cls)[0])
        cut = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:cut])
        train_idx.append(idx[cut:])
    train_idx, test_idx = np.concatenate(train_idx), np.concatenate(test_idx)
    return (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx])


def make_synthetic(num_classes: int, image_size: int, channels: int, train_size: int,
                   test_size: int, seed: int):
    """Each class is a fixed random pattern plus Gaussian noise: learnable, but not trivially."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(num_classes, image_size, image_size, channels, generator=gen)

    def draw(n):
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        noise = torch.randn(n, image_size, image_size, channels, generator=gen) * 1.5
        return (patterns[labels] + noise).numpy(), labels.numpy()

    return draw(train_size), draw(test_size)


# ---------------------------------------------------------------------------------------------
# assembly
# ---------------------------------------------------------------------------------------------

def _to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    x = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2).contiguous()
    return Split(x, torch.from_numpy(np.asarray(labels, dtype=np.int64)))


def _normalise(split: Split, mean: Tensor, std: Tensor) -> Split:
    return Split((split.images - mean[:, None, None]) / std[:, None, None], split.labels)


def parse_classes(spec: Optional[str]) -> Optional[List[int]]:
    """"0-4" or "0,1,2" -> [0, 1, 2, ...]; None -> None (all classes)."""
    if spec is None or spec == "":
        return None
    out: List[int] = []
    try:
        for part in spec.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise RecipeError(f"--classes must look like '0-4' or '0,2,5', got {spec!r}") from None
    if len(set(out)) != len(out) or not out:
        raise RecipeError(f"--classes lists a class twice or none: {spec!r}")
    return out


def _restrict(split: Split, classes: List[int]) -> Tuple[Split, Split]:
    """(samples of `classes` relabelled 0..k-1, samples of every other class)."""
    remap = torch.full((int(split.labels.max()) + 1,), -1, dtype=torch.int64)
    for new, old in enumerate(classes):
        if old < remap.shape[0]:
            remap[old] = new
    keep = remap[split.labels] >= 0
    return (Split(split.images[keep], remap[split.labels[keep]]),
            Split(split.images[~keep], split.labels[~keep]))


def load_dataset(name: str, root: Optional[str] = None, *, classes: Optional[List[int]] = None,
                 image_size: int = 32, seed: int = 0, synthetic_size: Tuple[int, int] = (512, 256),
                 synthetic_classes: int = 10, synthetic_channels: int = 3) -> Dataset:
    """Load `name` (one of DATASETS). With `classes`, only those classes are kept (relabelled
    0..k-1) and the test samples of the other classes become the OOD set."""
    if name not in DATASETS:
        raise RecipeError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    needs_root = name in ("cifar10", "cifar100", "svhn", "imagefolder")
    if needs_root:
        if not root:
            raise RecipeError(f"dataset {name!r} is read from a local folder: pass --data-root")
        if not os.path.isdir(root):
            raise RecipeError(f"data folder {root!r} does not exist (dataset {name!r}; nothing is "
                              f"downloaded automatically)")
    augment = False
    if name in ("cifar10", "cifar100"):
        num_classes = 10 if name == "cifar10" else 100
        train, test = read_cifar(root, num_classes)
        scale, augment = 255.0, True
    elif name == "svhn":
        (train, test), num_classes, scale = read_svhn(root), 10, 255.0
    elif name == "imagefolder":
        train, test, num_classes = read_imagefolder(root, image_size)
        scale, augment = 255.0, True
    elif name == "digits":
        (train, test), num_classes, scale = read_digits(seed), 10, 16.0
    else:
        train, test = make_synthetic(synthetic_classes, image_size, synthetic_channels,
                                     synthetic_size[0], synthetic_size[1], seed)
        num_classes, scale = synthetic_classes, 1.0
    train_split = _to_split(train[0] / scale, train[1])
    test_split = _to_split(test[0] / scale, test[1])
    ood = None
    if classes is not None:
        if max(classes) >= num_classes or min(classes) < 0:
            raise RecipeError(f"--classes {classes} out of range for {name} ({num_classes} classes)")
        if len(set(classes)) < 2:
            raise RecipeError(f"--classes needs at least 2 classes to classify, got {classes}")
        train_split, _ = _restrict(train_split, classes)
        test_split, ood = _restrict(test_split, classes)
        num_classes = len(classes)
        if len(ood) == 0:
            ood = None
    mean = train_split.images.mean(dim=(0, 2, 3))
    std = train_split.images.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return Dataset(name, _normalise(train_split, mean, std), _normalise(test_split, mean, std),
                   num_classes, mean, std,
                   ood=None if ood is None else _normalise(ood, mean, std), augment=augment)


def load_ood(name: str, root: Optional[str], reference: Dataset, seed: int = 0) -> Split:
    """The test split of another dataset as an OOD set, shaped and normalised like `reference`."""
    other = load_dataset(name, root, image_size=reference.image_size, seed=seed + 1,
                         synthetic_channels=reference.in_channels)
    # Undo the other set's normalisation, apply the reference's.
    raw = other.test.images * other.std[:, None, None] + other.mean[:, None, None]
    if raw.shape[1:] != reference.test.images.shape[1:]:
        raise RecipeError(f"OOD set {name!r} has images of shape {tuple(raw.shape[1:])}, but the "
                          f"model expects {tuple(reference.test.images.shape[1:])}")
    return _normalise(Split(raw, other.test.labels), reference.mean, reference.std)


# ---------------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------------

def augment_batch(images: Tensor, gen: torch.Generator, padding: int = 4) -> Tensor:
    """Random crop with zero padding and random horizontal flip (the CIFAR recipe), per sample."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, c, h, w)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, c, h, w)
    cropped = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                     rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    cropped[flip] = cropped[flip].flip(3)
    return cropped


def epoch_batches(split: Split, batch_size: int, *, epoch: int, seed: int, shuffle: bool,
                  augment: bool = False, rank: int = 0, world_size: int = 1,
                  drop_last: bool = False) -> Iterator[Tuple[Tensor, Tensor]]:
    """Mini-batches of one epoch. The order and augmentation depend only on (seed, epoch), so a
    resumed run sees exactly the batches the interrupted one would have; with world_size > 1
    each rank takes every world_size-th sample of the same permutation (as DistributedSampler)."""
    gen = torch.Generator().manual_seed(seed * 100003 + epoch)
    n = len(split)
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    if world_size > 1:
        per_rank = n // world_size  # equal shares keep DDP's collective calls in step
        order = order[rank: per_rank * world_size: world_size]
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        images = split.images[idx]
        if augment:
            images = augment_batch(images, gen)
        yield images, split.labels[idx]


def num_batches(n: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    per_rank = n // world_size if world_size > 1 else n
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def dataset_source(name: str, *, classes: Optional[str] = None, image_size: int = 32, seed: int = 0,
                   synthetic_size: Sequence[int] = (512, 256)) -> Dict[str, object]:
    """What load_dataset needs to rebuild a dataset (stored in checkpoints for evaluate.py);
    the data folder is kept apart, since it may move between runs."""
    return {"name": name, "classes": classes, "image_size": image_size, "seed": seed,
            "synthetic_size": list(synthetic_size)}


def load_from_source(source: Dict[str, object], root: Optional[str] = None) -> Dataset:
    return load_dataset(source["name"], root, classes=parse_classes(source["classes"]),
                        image_size=source["image_size"], seed=source["seed"],
                        synthetic_size=tuple(source["synthetic_size"]))


def dataset_summary(ds: Dataset) -> Dict[str, object]:
    return {"dataset": ds.name, "train": len(ds.train), "test": len(ds.test),
            "ood": 0 if ds.ood is None else len(ds.ood), "num_classes": ds.num_classes,
            "shape": list(ds.train.images.shape[1:])}
