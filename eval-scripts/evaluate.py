"""FID / ACC / LPIPS (and NudeNet) of an erased model's images against the original's same-seed images.

    # one concept: two folders with the same file names (same prompts and seeds)
    python eval-scripts/evaluate.py --original outputs/images/original --erased outputs/images/sepce-van_gogh \
        --concept "Van Gogh" --classifier models/sd-artist-classifier.safetensors
    # several concepts: a JSON list of {"concept", "original", "erased"[, "class"]} (paths relative to the file)
    python eval-scripts/evaluate.py --mapping concepts.json --classifier models/toy-artist-classifier.safetensors
    # nudity: NudeNet counts of exposed body parts
    python eval-scripts/evaluate.py --original A --erased B --concept nudity --metrics fid lpips nudenet

Writes {out_dir}/{name}.csv and {name}.md (rows concepts, columns FID / ACC / LPIPS as in the paper)
and prints the table; the last line is one JSON object. FID and LPIPS name their feature
extractors: Inception / AlexNet when their weights are on disk (nothing is downloaded), else the
toy oracle for 32 px toy images; see erasure/metrics.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from erasure.classifier import common_size, load_classifier
from erasure.files import atomic_path, check_writable
from erasure.loading import resolve_device
from erasure.metrics import (
    FID_FEATURES,
    LPIPS_NETS,
    ConceptEvaluator,
    MetricsError,
    NudeNetCounter,
    paired_image_paths,
    resolve_fid_features,
    resolve_lpips,
    results_csv,
    results_markdown,
    results_record,
)

METRICS = ("fid", "lpips", "acc", "nudenet")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", type=Path, help="the original model's images")
    parser.add_argument("--erased", type=Path, help="the erased model's images (same file names)")
    parser.add_argument("--concept", help="the concept's name (row label; its class for ACC unless --class)")
    parser.add_argument("--class", dest="class_name", default=None, help="class name or index for ACC")
    parser.add_argument("--mapping", type=Path, help='JSON list of {"concept", "original", "erased"[, "class"]}')
    parser.add_argument("--classifier", type=Path, default=None, help="ACC classifier (artist-cls-train.py)")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=None,
                        help="default: fid lpips, and acc when --classifier is given")
    parser.add_argument("--fid_features", choices=FID_FEATURES, default="auto", help="default: auto")
    parser.add_argument("--inception_weights", type=Path, default=None, help="torch-fidelity Inception weights file")
    parser.add_argument("--lpips", dest="lpips_net", choices=LPIPS_NETS, default="auto", help="default: auto")
    parser.add_argument("--alexnet_weights", type=Path, default=None, help="torchvision AlexNet ImageNet weights file")
    parser.add_argument("--oracle_dir", type=Path, default=None, help="toy oracle folder (default: models/toy)")
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
        base = args.mapping.parent
        concepts.append({**entry, "original": base / entry["original"], "erased": base / entry["erased"],
                         "class": entry.get("class")})
    return concepts


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
    metrics = set(args.metrics or (["fid", "lpips"] + (["acc"] if args.classifier else [])))
    if "acc" in metrics and args.classifier is None:
        raise MetricsError("ACC needs --classifier (train one with train-scripts/artist-cls-train.py).")
    outputs = [check_writable(args.out_dir / f"{args.name}.{suffix}", args.overwrite) for suffix in ("csv", "md")]
    concepts = read_concepts(args)
    pairs = [paired_image_paths(entry["original"], entry["erased"]) for entry in concepts]
    size = common_size([paths[0][0] for paths in pairs])  # one image size across concepts
    device = resolve_device(args.device)
    classifier = load_classifier(args.classifier, device) if args.classifier else None
    fid, lpips = None, None
    if "fid" in metrics:
        fid = resolve_fid_features(args.fid_features, size[0], classifier, args.inception_weights, args.oracle_dir)
    if "lpips" in metrics:
        lpips = resolve_lpips(args.lpips_net, size[0], args.alexnet_weights, args.oracle_dir)
    evaluator = ConceptEvaluator(
        fid=fid,
        lpips=lpips,
        classifier=classifier if "acc" in metrics else None,
        nudenet=NudeNetCounter(args.nudenet_threshold) if "nudenet" in metrics else None,
        batch_size=args.batch_size,
        device=device,
    )
    class_indices = [concept_class(evaluator, entry) for entry in concepts]
    results = [
        evaluator.evaluate_folders(entry["concept"], entry["original"], entry["erased"], class_index)
        for entry, class_index in zip(concepts, class_indices)
    ]
    extractors = evaluator.extractors()
    if evaluator.classifier is not None:
        extractors["acc"] += f" from {args.classifier}"
    table = results_markdown(results, extractors)
    for path, text in zip(outputs, (results_csv(results), table)):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            temporary.write_text(text, encoding="utf-8")
    print(table)
    summary = {**results_record(results, extractors), "csv": str(outputs[0]), "markdown": str(outputs[1])}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
