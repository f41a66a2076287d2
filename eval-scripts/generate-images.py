"""Generate images for every row of a prompt CSV, from a base model plus any erasures.

    python eval-scripts/generate-images.py --prompts_path data/artist-classes.csv \\
        --apply outputs/sepce-van_gogh-....safetensors --model_name sepce-van_gogh --num_samples 5

The CSV needs the columns prompt, evaluation_seed and case_number (data/README.md). For each
row and k < --num_samples the image ``{save_path}/{model_name}/{case_number}_{k}.png`` is
sampled from seed ``evaluation_seed + k``, so the original and an erased model given the same
CSV make same-seed image pairs. The model is exactly --config_path/--ckpt_path (default: the
embedded toy model) plus the --apply files (increments and weight differences); a file that
does not exist is an error, never a reason to use the base model instead. --model_name only
names the output folder (default: the checkpoint's name, then the applied files' names).

Existing images are kept and a rerun makes only the missing ones; ``generation.json`` in the
folder records the model, the applied files, the sampler settings, the image size, each case's
prompt and seed, and library versions. A rerun that would mix differently made images is
refused; --overwrite deletes the folder's images first. --devices N (or torchrun) splits the
images over processes and writes the same files as one process.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import diffusers

from erasure.cli import add_generation_arguments, add_model_arguments, run_script, sampling_from_args
from erasure.edits import apply, load_edit
from erasure.files import file_sha256, versions
from erasure.generation import (
    GenerationError,
    prepare_folder,
    prompt_jobs,
    sampling_image_size,
    start_workers,
    write_images,
)
from erasure.loading import CHECKPOINT_SUFFIXES, TOY_CKPT, TOY_CONFIG, load_model, model_fingerprint
from erasure.prompts import read_prompts, select_cases

DEFAULT_SAVE_PATH = "outputs/images"
DEFAULT_NUM_SAMPLES = 10
SEED_RULE = "seed = evaluation_seed + k for image {case_number}_{k}.png"
#: Output-folder names of the seed's ESD models, which its script loaded from models/<name>/.
SEED_MODEL_PREFIXES = ("compvis-", "diffusers-")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts_path", required=True, help="CSV with prompt, evaluation_seed, case_number")
    parser.add_argument("--model_name", default=None, help="output folder name (default: from the model's files)")
    parser.add_argument("--save_path", default=DEFAULT_SAVE_PATH, help=f"default: {DEFAULT_SAVE_PATH}")
    parser.add_argument("--num_samples", type=int, default=DEFAULT_NUM_SAMPLES, help="images per row (default: 10)")
    parser.add_argument("--image_size", type=int, default=None, help="pixels a side (default: the model's own)")
    parser.add_argument("--from_case", type=int, default=None, help="first case_number to generate")
    parser.add_argument("--till_case", type=int, default=None, help="last case_number to generate (inclusive)")
    parser.add_argument("--apply", nargs="+", default=[], metavar="FILE", help="increment / weight-difference files")
    add_model_arguments(parser)
    add_generation_arguments(parser)
    return parser.parse_args(argv)


def output_name(args: argparse.Namespace) -> str:
    """--model_name, checked to be a plain folder name; else ``{checkpoint or toy}[+{applied file}...]``."""
    if args.model_name is None:
        base = Path(args.ckpt_path).stem if args.ckpt_path else "toy"
        return "+".join([base, *(Path(path).stem for path in args.apply)])
    name = args.model_name
    if name in ("", ".", "..") or Path(name).name != name:
        raise GenerationError(f"--model_name {name!r} must be a plain folder name (no '/', not '..').")
    names_weights = name.endswith(CHECKPOINT_SUFFIXES) or name.startswith(SEED_MODEL_PREFIXES)
    if names_weights and not args.apply and not args.ckpt_path:
        raise GenerationError(
            f"--model_name {name!r} looks like a trained model, but --model_name only names the output folder and "
            f"no weights were given; pass the erasure with --apply FILE (or a full checkpoint with --ckpt_path and "
            f"--config_path). Without them the base model would be used."
        )
    return name


def applied_record(paths: list[str], items: list[Any]) -> list[dict[str, str]]:
    return [
        {"path": str(Path(path).resolve()), "sha256": file_sha256(path), "what": item.describe()}
        for path, item in zip(paths, items)
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = parse_args(argv)
    rows = select_cases(read_prompts(args.prompts_path), args.from_case, args.till_case)
    folder = Path(args.save_path) / output_name(args)
    jobs = prompt_jobs(rows, args.num_samples, folder)
    items = [load_edit(path) for path in args.apply]
    workers = start_workers(args.device, args.devices)
    model = load_model(
        args.config_path, args.ckpt_path, device=str(workers.device), use_ema=args.use_ema, verbose=workers.is_main
    )
    base_fingerprint = model_fingerprint(model)
    handle = apply(model, items) if items else None
    applied = {"increments": handle.increments if handle else [],
               "weight_differences": handle.weight_differences if handle else []}
    settings = sampling_from_args(model, args)
    config_path, ckpt_path = (TOY_CONFIG, TOY_CKPT) if args.ckpt_path is None else (args.config_path, args.ckpt_path)
    config_path, ckpt_path = Path(config_path), Path(ckpt_path)
    if workers.is_main:
        print(f"Generating into {folder}: {ckpt_path} + applied {applied} ({len(rows)} prompts)", flush=True)
    applied_files = applied_record(args.apply, items)
    with sampling_image_size(model, args.image_size) as image_size:
        record = {
            "identity": {
                "checkpoint": {"name": ckpt_path.name, "bytes": ckpt_path.stat().st_size},
                "base_model_fingerprint": base_fingerprint,
                "use_ema": args.use_ema,
                "applied_sha256": sorted(entry["sha256"] for entry in applied_files),
                "sampling": asdict(settings),
                "image_size": image_size,
            },
            "cases": {
                str(row.case_number): {"prompt": row.prompt, "evaluation_seed": row.evaluation_seed} for row in rows
            },
            "num_samples": args.num_samples,
            "seed_rule": SEED_RULE,
            "model": {"config": str(config_path.resolve()), "checkpoint": str(ckpt_path.resolve()), **applied},
            "applied_files": applied_files,
            "prompts_path": str(Path(args.prompts_path).resolve()),
            "processes": workers.world_size,
            "versions": {**versions(), "diffusers": diffusers.__version__},
        }
        prepare_folder(folder, record, workers, args.overwrite)
        made = write_images(
            model, jobs, settings, rank=workers.rank, world_size=workers.world_size, batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    workers.barrier()
    summary = {
        "folder": str(folder),
        "images": len(jobs),
        "present": sum(job.path.is_file() for job in jobs),
        "made_by_rank_0": made,
        "processes": workers.world_size,
        "sampling": asdict(settings),
        "image_size": image_size,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if workers.is_main:
        print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    run_script(main)
