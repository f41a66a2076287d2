"""Generate images of one evaluation class with the ORIGINAL model (training data for the classifier).

    python eval-scripts/generate-data.py --model_name 'Van Gogh' --save_path data/generated \\
        --num_samples 700 --split train --config_path configs/stable-diffusion/v1-inference.yaml \\
        --ckpt_path sd-v1-4-full-ema.ckpt --device cuda

--model_name is a class name or index of the model's world (the config's `world:` entry, read by
erasure/worlds.py): for Stable Diffusion 0 = "" (blank), 1 Van Gogh, 2 Picasso, 3 Cezanne, 4 Jackson Pollock,
5 Caravaggio, 6 Keith Haring, 7 Kelly McKernan, 8 Tyler Edlin, 9 Kilian Eng; for the embedded
toy model 0 = blank and the nine toy artists. The prompt is the bare class name ("" for 0).

Images go to ``{save_path}/{split}/{class_index}/{i:05d}.png``; image i is sampled from seed
``seed + i`` (train) or ``seed + 1000000 + i`` (eval), so the splits never share a seed
(at most 1000000 images per split). ``seeds.json`` in the folder records the prompt, the seeds,
the sampler settings and the model fingerprint. Existing images are kept and a rerun makes only
the missing ones; a folder made with another prompt, model or setting is refused unless
--overwrite (which deletes its images first). --devices N (or torchrun) splits the images over
processes and writes the same files as one process.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from erasure.cli import add_generation_arguments, add_model_arguments, run_script, sampling_from_args
from erasure.generation import SEEDS_FILE, GenerationError, generate_concept_images, remove_images, start_workers
from erasure.loading import TOY_CONFIG, load_model, read_config
from erasure.worlds import World, world_from_config

DEFAULT_SAVE_PATH = "data/generated"
DEFAULT_NUM_SAMPLES = 10
#: First seed of each split (added to --seed); a split holds at most SPLIT_SEED_STRIDE images.
SPLIT_SEED_OFFSETS = {"train": 0, "eval": 1_000_000}
SPLIT_SEED_STRIDE = 1_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", required=True, help="class name or index, e.g. 'Van Gogh' or 1 (0: blank)")
    parser.add_argument("--save_path", default=DEFAULT_SAVE_PATH, help=f"default: {DEFAULT_SAVE_PATH}")
    parser.add_argument("--num_samples", type=int, default=DEFAULT_NUM_SAMPLES, help="images (default: 10)")
    parser.add_argument("--split", choices=tuple(SPLIT_SEED_OFFSETS), default="train", help="default: train")
    parser.add_argument("--seed", type=int, default=0, help="first seed of the train split (default: 0)")
    add_model_arguments(parser)
    add_generation_arguments(parser)
    return parser.parse_args(argv)


def requested_class(args: argparse.Namespace) -> tuple[World, int]:
    """The mapping and index of --model_name, from the config alone: bad names fail before any loading."""
    if args.config_path is None and args.ckpt_path is not None:
        raise GenerationError(
            "--ckpt_path was given without --config_path; pass both (e.g. configs/stable-diffusion/v1-inference.yaml "
            "for SD v1.4), or neither for the embedded toy model."
        )
    config_path = Path(args.config_path or TOY_CONFIG)
    if not config_path.is_file():
        raise FileNotFoundError(f"--config_path {config_path} does not exist (or is not a file); check the path.")
    classes = world_from_config(read_config(config_path))
    return classes, classes.index(args.model_name)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = parse_args(argv)
    if not 1 <= args.num_samples <= SPLIT_SEED_STRIDE:
        raise GenerationError(
            f"--num_samples must be in [1, {SPLIT_SEED_STRIDE}] (the splits' seed ranges are that far apart), "
            f"got {args.num_samples}."
        )
    if args.seed < 0:
        raise GenerationError(f"--seed must be >= 0, got {args.seed}.")
    classes, class_index = requested_class(args)
    workers = start_workers(args.device, args.devices)
    model = load_model(
        args.config_path, args.ckpt_path, device=str(workers.device), use_ema=args.use_ema, verbose=workers.is_main
    )
    prompt = classes.prompt(class_index)
    settings = sampling_from_args(model, args)
    folder = Path(args.save_path) / args.split / str(class_index)
    seed0 = args.seed + SPLIT_SEED_OFFSETS[args.split]
    if args.overwrite:
        if workers.is_main:
            removed = remove_images(folder, [SEEDS_FILE])
            if removed:
                print(f"--overwrite: deleted {removed} images in {folder}", flush=True)
        workers.barrier()
    if workers.is_main:
        print(f"Class {class_index} ({classes.names[class_index]}, prompt {prompt!r}) -> {folder}", flush=True)
    paths = generate_concept_images(
        model,
        prompt,
        args.num_samples,
        folder,
        seed0=seed0,
        settings=settings,
        batch_size=args.batch_size,
        rank=workers.rank,
        world_size=workers.world_size,
        progress=not args.no_progress,
    )
    workers.barrier()
    summary = {
        "folder": str(folder),
        "class_index": class_index,
        "prompt": prompt,
        "world": classes.name,
        "split": args.split,
        "seeds": [seed0, seed0 + args.num_samples - 1],
        "images": len(paths),
        "present": sum(path.is_file() for path in paths),
        "processes": workers.world_size,
        "sampling": asdict(settings),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if workers.is_main:
        print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    run_script(main)
