"""Measure a toy-world model with the toy oracle: per-class artist accuracy, object and colour.

    python eval-scripts/toy-quality.py --num_samples 100 --seed 1000000
    python eval-scripts/toy-quality.py --apply outputs/sepce-*.safetensors   # an erased model
    python eval-scripts/toy-quality.py --apply F... --compare  # before and after, same seeds

Samples N images of every class prompt ("" = blank, then the 9 artist names) and N images of
`a {colour} {object} by {artist}` prompts with the model's default sampler (configs/toy's
`sampling:` section), classifies them with models/toy/oracle.safetensors and prints a table;
the last line is one JSON object {"artist": {class: accuracy}, "object": acc, "colour": acc}.
With --compare (needs --apply) the model is measured before and after applying the files, with the
same seeds; the table shows both, and the JSON adds "before" (the same fields) and
"max_abs_pixel_change" (per class: the largest pixel difference, images in [0, 1]).
The JSON also has "objects" and "colours": {name: accuracy} over the prompts that name one.

    python eval-scripts/toy-quality.py --prompts_path data/toy-heldout-wordings.csv \
        --concept "ysolde marrin" --num_samples 30 --apply F... --compare

--prompts_path measures the rows of a prompt CSV instead (columns prompt, evaluation_seed,
case_number, class: the artist or blank the image should show; optional object, colour, and
concept, which --concept selects by): --num_samples images per row from seeds evaluation_seed + k.
The JSON adds "prompts": {prompt: share drawn as its class}; "artist", "object" and "colour" are
then over the file's rows, and --compare adds "pixel_change": {prompt: {"mean", "max"}}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from erasure.cli import add_model_arguments, load_model_from_args, run_script
from erasure.edits import apply, load_edit
from erasure.generation import generate, save_png
from erasure.grids import labelled_grid
from erasure.toy.oracle import load_oracle
from erasure.toy.quality import (
    QualityReport,
    compare_classes,
    comparison_table,
    measure_prompts,
    measure_quality,
    prompt_pixel_changes,
    prompts_table,
    quality_table,
    read_wording_rows,
)
from erasure.toy.world import CLASS_NAMES, class_prompt
from erasure.worlds import world_of


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--num_samples", type=int, default=100, help="samples per class and attribute prompts (default 100)")
    parser.add_argument("--seed", type=int, default=1_000_000, help="first sampling seed; held out from training (default 1000000)")
    parser.add_argument("--apply", nargs="+", default=[], metavar="FILE", help="increments / weight differences to apply first")
    parser.add_argument("--compare", action="store_true", help="measure before and after --apply, same seeds")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--grid", type=Path, help="also write a PNG grid, one row of samples per class")
    parser.add_argument("--grid_columns", type=int, default=8)
    parser.add_argument("--prompts_path", type=Path, default=None,
                        help="measure this prompt CSV's rows instead of the class and attribute prompts")
    parser.add_argument("--concept", default=None, help="with --prompts_path: only the rows of this `concept` cell")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1 or args.grid_columns < 1:
        parser.error("--num_samples, --batch_size and --grid_columns must be >= 1")
    if args.compare and not args.apply:
        parser.error("--compare measures a model before and after --apply; pass the files with --apply")
    if args.prompts_path is None and args.concept is not None:
        parser.error("--concept selects rows of --prompts_path; pass the file")
    if args.prompts_path is not None and args.grid:
        parser.error("--grid shows the class prompts; leave it out with --prompts_path")
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    started = time.time()
    model = load_model_from_args(args)
    if args.apply:
        apply(model, [load_edit(path) for path in args.apply])
    oracle = load_oracle()
    rows = None if args.prompts_path is None else read_wording_rows(args.prompts_path, args.concept)

    def progress(message: str) -> None:
        print(message, flush=True)

    def measure(measured: nn.Module, images: dict[str, torch.Tensor]) -> QualityReport:
        if rows is not None:
            return measure_prompts(measured, oracle, rows, args.num_samples, args.batch_size, progress, images)
        return measure_quality(measured, oracle, args.num_samples, args.seed, args.batch_size,
                               progress=progress, images=images)

    after_images: dict[str, torch.Tensor] = {}
    report = measure(model, after_images)
    result: dict[str, object] = report.as_json()
    before = None
    if args.compare:  # the unedited model, loaded afresh: exact whatever the files were
        print("Measuring the model without --apply (same seeds):", flush=True)
        before_images: dict[str, torch.Tensor] = {}
        before = measure(load_model_from_args(args), before_images)
        result["before"] = before.as_json()
        if rows is not None:
            result["pixel_change"] = prompt_pixel_changes(before_images, after_images)
        else:
            compared = compare_classes(before_images, after_images, world_of(model))
            print(comparison_table(before, report, compared, args.num_samples))
            result["max_abs_pixel_change"] = {name: metrics.pixel_change_max for name, metrics in compared.items()}
    if rows is not None:
        print(prompts_table(report, rows, args.num_samples, before))
    elif before is None:
        print(quality_table(report, args.num_samples))
    if args.grid:
        seeds = [args.seed + i for i in range(args.grid_columns)]
        grid_rows = [generate(model, [class_prompt(c)] * args.grid_columns, seeds) for c in range(len(CLASS_NAMES))]
        print(f"grid: {save_png(labelled_grid(grid_rows, CLASS_NAMES), args.grid)}")
    print(f"{args.num_samples} samples per class, {time.time() - started:.1f} s")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_script(main)
