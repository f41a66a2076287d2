"""Train the ACC classifier on the ORIGINAL model's images (METHOD.md §4).

    # SD: the paper's recipe (ResNet-18, ImageNet weights, last layer trained, 224 px)
    python train-scripts/artist-cls-train.py --world sd --data data/sd-classes
    # toy world: the toy oracle's SmallCNN from scratch on 32 px images
    python train-scripts/artist-cls-train.py --world toy --data data/toy-classes

--data holds train/{0..9} and eval/{0..9} as eval-scripts/generate-data.py writes them. ResNet-18's
ImageNet weights are never downloaded: they come from --pretrained_path or torchvision's cache;
without them the script stops unless --from_scratch (all layers from random weights) is given.
Writes the weights (.safetensors) and the same metadata as .json; prints the per-class accuracy
table on the eval split; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, fields
from pathlib import Path

from erasure.classes import mapping_for_world
from erasure.classifier import (
    ARCHITECTURES,
    ClassifierTrainingConfig,
    accuracy_table,
    build_classifier,
    evaluate_classifier,
    save_classifier,
    scan_split,
    train_classifier,
)
from erasure.files import check_writable
from erasure.loading import resolve_device

DEFAULT_ARCH = {"sd": "resnet18", "toy": "toy-cnn"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="folder with train/{0..9} and eval/{0..9}")
    parser.add_argument("--world", choices=("sd", "toy"), default="toy", help="class mapping (default: toy)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), help="default: resnet18 (sd), toy-cnn (toy)")
    parser.add_argument("--save_path", type=Path, help="default: models/{world}-artist-classifier.safetensors")
    parser.add_argument("--pretrained_path", type=Path, default=None, help="ResNet-18 ImageNet weights (.pth)")
    parser.add_argument("--from_scratch", action="store_true", help="resnet18 without ImageNet weights (all layers)")
    parser.add_argument("--input_size", type=int, default=None, help="resnet18 input size (default: 224)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing classifier file")
    defaults = ClassifierTrainingConfig()
    group = parser.add_argument_group("recipe (defaults: the paper's)")
    for spec in fields(ClassifierTrainingConfig):
        value = getattr(defaults, spec.name)
        group.add_argument(f"--{spec.name}", type=type(value), default=value, help=f"default: {value}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.time()
    mapping = mapping_for_world(args.world)
    arch = args.arch or DEFAULT_ARCH[args.world]
    save_path = args.save_path or Path("models") / f"{args.world}-artist-classifier.safetensors"
    check_writable(save_path, args.overwrite)
    recipe = {spec.name: getattr(args, spec.name) for spec in fields(ClassifierTrainingConfig)}
    config = ClassifierTrainingConfig(**recipe)
    train = scan_split(args.data, "train", len(mapping))
    held_out = scan_split(args.data, "eval", len(mapping))
    classifier, pretrained = build_classifier(
        arch, mapping.names, args.pretrained_path, args.from_scratch, args.input_size, config.seed
    )
    classifier.to(resolve_device(args.device))
    print(f"{arch} ({classifier.trained_layers} layers trained; starting weights: {pretrained}); "
          f"{len(train)} train / {len(held_out)} eval images of {train.size[0]}x{train.size[1]} px")
    fit = train_classifier(classifier, train, config)
    accuracy = {
        "train": evaluate_classifier(classifier, train, config.eval_batch_size)["accuracy"],
        "eval": evaluate_classifier(classifier, held_out, config.eval_batch_size),
    }
    record = {
        "world": args.world,
        "data": str(args.data),
        "recipe": asdict(config),
        "pretrained": pretrained,
        "training": fit,
        "accuracy": accuracy,
    }
    weights, sidecar = save_classifier(classifier, save_path, record, overwrite=args.overwrite)
    print(accuracy_table(accuracy["eval"]))
    summary = {
        "classifier": str(weights),
        "metadata": str(sidecar),
        "arch": arch,
        "trained_layers": classifier.trained_layers,
        "pretrained": pretrained,
        "train_accuracy": accuracy["train"],
        "eval_accuracy": accuracy["eval"]["accuracy"],
        "eval_per_class": {name: row["accuracy"] for name, row in accuracy["eval"]["per_class"].items()},
        "seconds": round(time.time() - started, 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
