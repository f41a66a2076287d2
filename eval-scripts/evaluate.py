"""FID / ACC / LPIPS (and NudeNet) of an erased model's images against the original's same-seed images.

    # one concept: two folders with the same file names (same prompts and seeds)
    python eval-scripts/evaluate.py --original outputs/images/original --erased outputs/images/sepce-van_gogh \
        --concept "Van Gogh" --classifier models/sd-artist-classifier.safetensors
    # several concepts: a JSON list of {"concept", "original", "erased"[, "class"]} (paths relative to the file);
    # toy images: the toy oracle is the default ACC classifier
    python eval-scripts/evaluate.py --mapping concepts.json
    # nudity: NudeNet counts of exposed body parts
    python eval-scripts/evaluate.py --original A --erased B --concept nudity --metrics fid lpips nudenet

Writes {out_dir}/{name}.csv and {name}.md (rows concepts, columns FID / ACC / LPIPS as in the paper)
and prints the table; the last line is one JSON object.

The images' world (erasure/worlds.py: classes, default ACC classifier, feature network) comes
from the model config recorded in the folders' ``generation.json`` (eval-scripts/
generate-images.py writes it); --config_path overrides it; folders without a record mean Stable
Diffusion's world. ACC uses --classifier, else the world's default classifier (the toy oracle
on toy images; SD has none). FID and LPIPS name their feature extractors: Inception / AlexNet
when their weights are on disk (nothing is downloaded), else the world's feature network; see
erasure/metrics.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from erasure.classifier import ImageClassifier, load_classifier
from erasure.images import read_images
from erasure.cli import run_script
from erasure.evaluation import METRICS, evaluate, make_evaluator
from erasure.files import check_writable, write_text
from erasure.generation import RECORD_FILE
from erasure.loading import resolve_device
from erasure.metrics import (
    FID_FEATURES,
    LPIPS_NETS,
    ConceptEvaluator,
    MetricsError,
    paired_image_paths,
    results_csv,
    results_markdown,
    results_record,
)
from erasure.worlds import SD_WORLD, World, world_from_config_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", type=Path, help="the original model's images")
    parser.add_argument("--erased", type=Path, help="the erased model's images (same file names)")
    parser.add_argument("--concept", help="the concept's name (row label; its class for ACC unless --class)")
    parser.add_argument("--class", dest="class_name", default=None, help="class name or index for ACC")
    parser.add_argument("--mapping", type=Path, help='JSON list of {"concept", "original", "erased"[, "class"]}')
    parser.add_argument("--classifier", type=Path, default=None,
                        help="ACC classifier (artist-cls-train.py; default: the world's, e.g. the toy oracle)")
    parser.add_argument("--config_path", type=Path, default=None,
                        help="the model config whose `world:` the images belong to (default: the one recorded in "
                             f"the folders' {RECORD_FILE}; none recorded: Stable Diffusion's world)")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=None,
                        help="default: fid lpips, and acc when there is a classifier (--classifier or the world's); pixel: mean and "
                             "largest absolute pixel change of same-seed pairs")
    parser.add_argument("--fid_features", choices=FID_FEATURES, default="auto", help="default: auto")
    parser.add_argument("--inception_weights", type=Path, default=None, help="torch-fidelity Inception weights file")
    parser.add_argument("--lpips", dest="lpips_net", choices=LPIPS_NETS, default="auto", help="default: auto")
    parser.add_argument("--alexnet_weights", type=Path, default=None, help="torchvision AlexNet ImageNet weights file")
    parser.add_argument("--nudenet_threshold", type=float, default=0.6, help="detection score threshold (default: 0.6)")
    parser.add_argument("--out_dir", type=Path, default=Path("outputs") / "metrics", help="default: outputs/metrics")
    parser.add_argument("--name", default="metrics", help="output file stem (default: metrics)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing tables")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    args = parser.parse_args(argv)
    single = (args.original, args.erased, args.concept)
    if args.mapping is not None and any(value is not None for value in (*single, args.class_name)):
        parser.error("pass either --mapping or --original/--erased/--concept[/--class], not both")
    if args.mapping is None and any(value is None for value in single):
        parser.error("pass --original, --erased and --concept (or --mapping for several concepts)")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if not 0 <= args.nudenet_threshold <= 1:
        parser.error(f"--nudenet_threshold must be a score in [0, 1], got {args.nudenet_threshold}")
    return args


def read_concepts(args: argparse.Namespace) -> list[dict]:
    """[{"concept", "original", "erased", "class"}] from the flags or the --mapping file."""
    if args.mapping is None:
        return [{"concept": args.concept, "original": args.original, "erased": args.erased, "class": args.class_name}]
    try:
        entries = json.loads(args.mapping.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise MetricsError(f"Cannot read --mapping {args.mapping} as JSON ({error}).") from error
    if not isinstance(entries, list) or not entries:
        raise MetricsError(f"--mapping {args.mapping} must hold a non-empty JSON list of concept entries.")
    concepts = []
    for number, entry in enumerate(entries):
        missing = [key for key in ("concept", "original", "erased") if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise MetricsError(f"--mapping {args.mapping} entry {number} lacks {missing} (concept, original, erased).")
        unknown = set(entry) - {"concept", "original", "erased", "class"}
        if unknown:
            raise MetricsError(f"--mapping {args.mapping} entry {number} has unknown keys {sorted(unknown)}.")
        not_text = [key for key in ("concept", "original", "erased") if not isinstance(entry[key], str)]
        if not_text:
            raise MetricsError(
                f"--mapping {args.mapping} entry {number}: {not_text} must be strings (a name and two folder paths)."
            )
        base = args.mapping.parent
        concepts.append({**entry, "original": base / entry["original"], "erased": base / entry["erased"],
                         "class": entry.get("class")})
    return concepts


def images_world(args: argparse.Namespace, folders: list[Path]) -> World:
    """The world of the images: --config_path's, else the config recorded with the folders, else SD's."""
    if args.config_path is not None:
        return world_from_config_file(args.config_path)
    worlds: dict[str, tuple[World, Path]] = {}
    for folder in folders:
        record_path = folder / RECORD_FILE
        if not record_path.is_file():
            continue
        try:
            config = Path(json.loads(record_path.read_text(encoding="utf-8"))["model"]["config"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise MetricsError(
                f"{record_path} does not name the model config (model.config: {error}); pass --config_path."
            ) from error
        if not config.is_file():
            raise MetricsError(
                f"{record_path} names the model config {config}, which does not exist here; pass --config_path "
                f"(the config the images were made with)."
            )
        world = world_from_config_file(config)
        worlds.setdefault(world.name, (world, record_path))
    if len(worlds) > 1:
        found = ", ".join(f"{name} ({path})" for name, (_, path) in worlds.items())
        raise MetricsError(f"The folders were made by models of different worlds: {found}; evaluate them separately.")
    return next(iter(worlds.values()))[0] if worlds else SD_WORLD


def acc_classifier(
    args: argparse.Namespace, world: World, metrics: set[str], device: torch.device
) -> tuple[ImageClassifier | None, str]:
    """The ACC classifier (--classifier, else the world's default) and where it came from."""
    if args.classifier is not None:
        return load_classifier(args.classifier, device), str(args.classifier)
    if world.classifier is not None and ("acc" in metrics or args.fid_features == "classifier"):
        return world.load_classifier(device), f"the {world.name} world's default ({world.classifier})"
    if "acc" in metrics:
        raise MetricsError(
            f"ACC needs --classifier: the images' world ({world.name}) has no default classifier (train one with "
            f"train-scripts/artist-cls-train.py; --config_path names the images' model config if the world is wrong)."
        )
    return None, ""


def concept_class(evaluator: ConceptEvaluator, entry: dict) -> int | None:
    """The ACC class of a concept: its "class" entry, else its name, looked up in the classifier."""
    if evaluator.classifier is None:
        return None
    key = entry["class"] if entry["class"] is not None else entry["concept"]
    try:
        return evaluator.classifier.class_index(key)
    except ValueError as error:
        raise MetricsError(f"ACC of {entry['concept']!r}: {error} Pass --class (or \"class\" in --mapping), "
                           f"or leave acc out of --metrics.") from error


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    outputs = [check_writable(args.out_dir / f"{args.name}.{suffix}", args.overwrite) for suffix in ("csv", "md")]
    concepts = read_concepts(args)
    for entry in concepts:  # bad folders fail before any network is loaded
        paired_image_paths(entry["original"], entry["erased"])
    world = images_world(args, [Path(entry[side]) for entry in concepts for side in ("original", "erased")])
    has_classifier = args.classifier is not None or world.classifier is not None
    metrics = set(args.metrics or (["fid", "lpips"] + (["acc"] if has_classifier else [])))
    device = resolve_device(args.device)
    classifier, classifier_source = acc_classifier(args, world, metrics, device)
    evaluator = make_evaluator(
        list(metrics), world=world, classifier=classifier, fid_features=args.fid_features, lpips_net=args.lpips_net,
        inception_weights=args.inception_weights, alexnet_weights=args.alexnet_weights,
        nudenet_threshold=args.nudenet_threshold, batch_size=args.batch_size, device=device,
    )
    results = []
    for entry in concepts:
        original_paths, erased_paths = paired_image_paths(entry["original"], entry["erased"])
        results.append(evaluate(
            read_images(original_paths), read_images(erased_paths), concept=entry["concept"],
            class_index=concept_class(evaluator, entry), metrics=list(metrics), evaluator=evaluator,
        ))
    extractors = evaluator.extractors()
    if evaluator.classifier is not None:
        extractors["acc"] += f" from {classifier_source}"
    table = results_markdown(results, extractors)
    for path, text in zip(outputs, (results_csv(results), table)):
        write_text(text, path)
    print(table)
    summary = {
        **results_record(results, extractors),
        "world": world.name,
        "csv": str(outputs[0]),
        "markdown": str(outputs[1]),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    run_script(main)
