# SPDX-License-Identifier: Apache-2.0
"""Train a model of the zoo (single, Packed-Ensembles, Deep Ensembles, ...) with the paper's recipe.

  python python/train.py --dataset digits --model small_cnn --method packed -M 4 --alpha 2 \
      --gamma 1 --epochs 30 --out runs/digits-pe
  python python/train.py --dataset cifar10 --data-root ~/data --model resnet18 --method packed
  torchrun --nproc_per_node 4 python/train.py ...   # DistributedDataParallel, one GPU each

Defaults follow the paper's Table 4 for the architecture (SGD, momentum 0.9, Nesterov, batch
128; see PAPER_RECIPES); --schedule cosine replaces the step schedule. The output folder gets
checkpoint.pt (after every epoch) and metrics.jsonl; rerunning the same command resumes after
the last finished epoch (--fresh starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The checkout's package when it is not installed (an installed one comes first).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipes.errors import RecipeError, run_cli  # noqa: E402

# The paper's Table 4 (as in torch-uncertainty's CIFAR configs): epochs, lr, weight decay and
# the MultiStepLR milestones / decay factor. Other architectures use the ResNet-18 recipe.
PAPER_RECIPES = {
    "resnet18": dict(epochs=75, lr=0.05, weight_decay=5e-4, milestones=[25, 50], lr_gamma=0.1),
    "resnet50": dict(epochs=200, lr=0.1, weight_decay=5e-4, milestones=[60, 120, 160], lr_gamma=0.2),
    "wideresnet28x10": dict(epochs=200, lr=0.1, weight_decay=5e-4, milestones=[60, 120, 160],
                            lr_gamma=0.2),
}
DEFAULT_RECIPE = "resnet18"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="synthetic",
                   help="cifar10, cifar100, svhn, imagefolder, digits or synthetic")
    d.add_argument("--data-root", help="folder holding the dataset (cifar*, svhn, imagefolder)")
    d.add_argument("--classes", help="train on these classes only, e.g. 0-4 (the others are OOD)")
    d.add_argument("--image-size", type=int, default=32, help="imagefolder / synthetic image size")
    d.add_argument("--synthetic-size", type=int, nargs=2, default=[512, 256], metavar=("TRAIN", "TEST"))
    m = p.add_argument_group("model")
    m.add_argument("--model", default="resnet18", help="architecture of the zoo (see --list-models)")
    m.add_argument("--method", default="packed", help="single, packed, deep, mimo, batch or masksembles "
                   "(scale 2)")
    m.add_argument("-M", "--num-estimators", type=int, default=4)
    m.add_argument("--alpha", type=float, default=2)
    m.add_argument("--gamma", type=int, default=1)
    m.add_argument("--style", default="cifar", help="ResNet stem: cifar or imagenet")
    m.add_argument("--width", type=int, help="base width (small models only)")
    m.add_argument("--list-models", action="store_true", help="print the model names and exit")
    o = p.add_argument_group("optimisation (unset values come from the paper's recipe)")
    o.add_argument("--epochs", type=int)
    o.add_argument("--batch-size", type=int, default=128, help="per process")
    o.add_argument("--lr", type=float)
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--no-nesterov", action="store_true")
    o.add_argument("--schedule", choices=("step", "cosine"), default="step")
    o.add_argument("--milestones", type=int, nargs="*")
    o.add_argument("--lr-gamma", type=float, help="step schedule's decay factor")
    r = p.add_argument_group("run")
    r.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype")
    r.add_argument("--channels-last", action="store_true")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", help="output folder (default runs/<dataset>-<model>-<method>)")
    r.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    r.add_argument("--eval-every", type=int, default=1)
    r.add_argument("--no-progress", action="store_true")
    return p


def resolve_device(name: str, local_rank: int = 0):
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RecipeError(f"--device {name}: no CUDA GPU is available here")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    elif name != "cpu":
        raise RecipeError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return torch.device(name)


def train_config(args):
    from recipes.training import TrainConfig
    recipe = PAPER_RECIPES.get(args.model, PAPER_RECIPES[DEFAULT_RECIPE])
    pick = lambda value, key: recipe[key] if value is None else value  # noqa: E731
    return TrainConfig(
        epochs=pick(args.epochs, "epochs"), batch_size=args.batch_size, lr=pick(args.lr, "lr"),
        momentum=args.momentum, weight_decay=pick(args.weight_decay, "weight_decay"),
        nesterov=not args.no_nesterov, schedule=args.schedule,
        milestones=list(pick(args.milestones, "milestones")), lr_gamma=pick(args.lr_gamma, "lr_gamma"),
        amp=args.amp, channels_last=args.channels_last, seed=args.seed, eval_every=args.eval_every)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from recipes import models
    if args.list_models:
        print("\n".join(models.model_names()))
        return 0
    cfg = train_config(args)
    cfg.validate()
    if args.image_size < 1:
        raise RecipeError(f"--image-size must be >= 1, got {args.image_size}")
    if min(args.synthetic_size) < 1:
        raise RecipeError(f"--synthetic-size needs at least 1 train and 1 test image, got "
                          f"{args.synthetic_size}")
    out = args.out or os.path.join("runs", f"{args.dataset}-{args.model}-{args.method}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise RecipeError(f"--out {out!r} is a file, not a folder")
    # Validate the model arguments before loading any data.
    models.make_spec(args.model, args.method, in_channels=1, num_classes=2,
                     num_estimators=args.num_estimators, alpha=args.alpha, gamma=args.gamma)

    import torch
    from recipes.data import dataset_source, dataset_summary, load_dataset, parse_classes
    from recipes.training import init_distributed, train

    distributed = init_distributed()
    try:
        device = resolve_device(args.device, distributed.local_rank)
        dataset = load_dataset(args.dataset, args.data_root, classes=parse_classes(args.classes),
                               image_size=args.image_size, seed=args.seed,
                               synthetic_size=tuple(args.synthetic_size))
        spec = models.make_spec(args.model, args.method, in_channels=dataset.in_channels,
                                num_classes=dataset.num_classes, num_estimators=args.num_estimators,
                                alpha=args.alpha, gamma=args.gamma, style=args.style, width=args.width)
        spec["dataset"] = dataset_source(args.dataset, classes=args.classes,
                                         image_size=args.image_size, seed=args.seed,
                                         synthetic_size=args.synthetic_size)
        torch.manual_seed(args.seed)
        model = models.build_model(spec)
        if distributed.is_main:
            print(json.dumps({**dataset_summary(dataset), "model": spec["model"],
                              "method": spec["method"], "device": str(device),
                              "world_size": distributed.world_size,
                              "parameters": sum(p.numel() for p in model.parameters())}))
        record = train(model, dataset, cfg, num_estimators=models.effective_estimators(spec),
                       out_dir=out, model_spec=spec, device=device, distributed=distributed,
                       resume=not args.fresh, progress=not args.no_progress and sys.stderr.isatty(),
                       extra={"data_root": args.data_root},
                       batch_transform=models.training_batch(spec))
        if distributed.is_main:
            print(f"done: {out}/checkpoint.pt, {out}/metrics.jsonl")
            if record.get("test"):
                print(json.dumps({"final_test": record["test"]}))
    finally:
        if distributed.world_size > 1:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
