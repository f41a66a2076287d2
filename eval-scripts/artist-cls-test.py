"""Per-class accuracy of an ACC classifier (from train-scripts/artist-cls-train.py).

    # on a generate-data folder: every class of {data}/eval/{0..9}
    python eval-scripts/artist-cls-test.py --classifier models/toy-artist-classifier.safetensors --data data/toy-classes
    # on a generate-images output folder whose images all show one class
    python eval-scripts/artist-cls-test.py --classifier F --images outputs/images/sepce-van_gogh --class "Van Gogh"

Prints a table (class, images, accuracy %) and, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from erasure.classifier import (
    SPLITS,
    accuracy_table,
    evaluate_classifier,
    load_classifier,
    scan_split,
    single_class_images,
)
from erasure.cli import run_script
from erasure.loading import resolve_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", required=True, type=Path, help="classifier .safetensors file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="generate-data folder holding {split}/{0..N-1}/")
    source.add_argument("--images", type=Path, help="a flat folder of images of one class (needs --class)")
    parser.add_argument("--split", choices=SPLITS, default="eval", help="split of --data (default: eval)")
    parser.add_argument("--class", dest="class_name", default=None, help="class name or index of --images")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    args = parser.parse_args(argv)
    if args.images is not None and args.class_name is None:
        parser.error("--images needs --class (the class every image should show)")
    if args.data is not None and args.class_name is not None:
        parser.error("--class goes with --images; --data folders carry their classes")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.data is not None:
        images = scan_split(args.data, args.split)
        classifier = load_classifier(args.classifier, device, num_classes=images.num_classes)
    else:
        classifier = load_classifier(args.classifier, device)
        images = single_class_images(args.images, classifier.class_index(args.class_name), classifier.num_classes)
    result = evaluate_classifier(classifier, images, args.batch_size)
    print(f"{args.classifier} on {images.source}")
    print(accuracy_table(result))
    summary = {"classifier": str(args.classifier), "source": images.source, **result}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    run_script(main)
