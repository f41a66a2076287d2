"""Train the ACC classifier on the ORIGINAL model's images (METHOD.md §4).

    # SD: the paper's recipe (ResNet-18, ImageNet weights, last layer trained, 224 px)
    python train-scripts/artist-cls-train.py --config_path configs/stable-diffusion/v1-inference.yaml \
        --data data/sd-classes
    # the embedded toy model's world: SmallCNN (the toy oracle's architecture) from scratch on 32 px images
    python train-scripts/artist-cls-train.py --data data/toy-classes

The classes and the default architecture are those of the world (erasure/worlds.py) that the
model config names (--config_path, the config of the model that made --data; default: the
embedded toy model's; a config without a `world:` entry means Stable Diffusion's).

--data holds train/{0..9} and eval/{0..9} as eval-scripts/generate-data.py writes them.
ResNet-18's ImageNet weights are never downloaded: they come from --pretrained_path or
torchvision's cache; without them the script stops unless --from_scratch (all layers from random
weights) is given.
Writes the weights (.safetensors) and the same metadata as .json; prints the per-class accuracy
table on the eval split; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, fields
from pathlib import Path

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
from erasure.cli import run_script
from erasure.files import check_writable
from erasure.loading import TOY_CONFIG, resolve_device
from erasure.worlds import world_from_config_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="folder with train/{0..9} and eval/{0..9}")
    parser.add_argument("--config_path", type=Path, default=TOY_CONFIG,
                        help="config of the model whose world's classes are trained (default: the embedded toy model)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES),
                        help="default: the world's classifier_arch (resnet18 for SD, toy-cnn for the toy world)")
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
    world = world_from_config_file(args.config_path)
    arch = args.arch or world.classifier_arch
    save_path = args.save_path or Path("models") / f"{world.name}-artist-classifier.safetensors"
    check_writable(save_path, args.overwrite)
    recipe = {spec.name: getattr(args, spec.name) for spec in fields(ClassifierTrainingConfig)}
    config = ClassifierTrainingConfig(**recipe)
    train = scan_split(args.data, "train", len(world))
    held_out = scan_split(args.data, "eval", len(world))
    classifier, pretrained = build_classifier(
        arch, world.names, args.pretrained_path, args.from_scratch, args.input_size, config.seed
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
        "world": world.name,
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
    run_script(main)
