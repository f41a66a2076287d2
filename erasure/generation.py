"""What the image-generation scripts share: processes, sampling flags, image size, output records.

Many processes: ``--devices N`` starts N processes with Lightning Fabric (DDP; gloo on CPU,
NCCL on GPUs), and a script started by ``torchrun`` uses torchrun's processes. The work is split
by image index (image i goes to rank ``i % world_size``) and every image has its own seed, so N
processes write exactly the files one process writes. Ranks need no communication except one
barrier before rank 0 reports.

Resuming: an image file that exists is kept, so a rerun fills in what is missing. A folder's
record (``generation.json`` / ``seeds.json``) says how its images were made; a rerun with another
model, other applied files or other sampler settings is refused unless ``--overwrite`` is given,
which deletes the folder's images first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning_fabric import Fabric
from torch import nn
from tqdm import tqdm

from erasure.files import write_json
from erasure.loading import resolve_device
from erasure.prompts import PromptRow
from erasure.sampling import (
    SAMPLERS,
    SamplingSettings,
    sample_images,
    sampling_settings,
    save_png,
)
from erasure.trainers.runtime import FabricOptions, make_fabric

RECORD_FILE = "generation.json"
#: ``{case_number}_{k}.png`` (generate-images) and ``{index:05d}.png`` (generate-data).
IMAGE_NAME = re.compile(r"^\d+(_\d+)?\.png$")
TORCHRUN_VARIABLES = ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE")


class GenerationError(ValueError):
    """Options or an output folder that would give wrong or mixed images; the message names the fix."""


@dataclass(frozen=True)
class Workers:
    """This process's share of the work: rank r of world_size processes, on ``device``."""

    rank: int
    world_size: int
    device: torch.device
    fabric: Fabric | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.fabric is not None:
            self.fabric.barrier()


def add_generation_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Sampler, process and output flags of both generation scripts."""
    sampling = parser.add_argument_group("sampling (defaults: the config's `sampling:` section, else DDIM 50, 7.5)")
    sampling.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="ddim or lms (the paper's)")
    sampling.add_argument("--ddim_steps", type=int, default=None, help="sampler steps (DDIM or LMS)")
    sampling.add_argument("--guidance_scale", type=float, default=None, help="classifier-free guidance scale")
    sampling.add_argument("--batch_size", type=int, default=8, help="images per model call (default: 8)")
    processes = parser.add_argument_group("processes")
    processes.add_argument(
        "--devices",
        type=int,
        default=1,
        help="processes on this machine (Lightning Fabric DDP); with --device cuda one GPU each. Under torchrun "
        "leave it at 1: torchrun's processes are used",
    )
    parser.add_argument("--overwrite", action="store_true", help="delete the output folder's images and start over")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def settings_from_args(model: nn.Module, args: argparse.Namespace) -> SamplingSettings:
    return sampling_settings(model, args.sampler, args.ddim_steps, args.guidance_scale)


def _under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def start_workers(device: str, devices: int) -> Workers:
    """One process on ``device``, or ``devices`` Fabric processes, or torchrun's processes.

    With several processes ``device`` only picks the kind: "cpu" or "cuda" (Fabric gives rank r
    GPU r; restrict GPUs with CUDA_VISIBLE_DEVICES).
    """
    if devices < 1:
        raise GenerationError(f"--devices must be >= 1, got {devices}.")
    torchrun = _under_torchrun()
    resolved = resolve_device(device)
    if devices == 1 and not torchrun:
        return Workers(rank=0, world_size=1, device=resolved)
    if torchrun and devices != 1:
        raise GenerationError(
            f"--devices {devices} was given under torchrun; torchrun already started the processes, so leave "
            f"--devices at 1 (use torchrun --nproc_per_node instead)."
        )
    if resolved.type not in ("cpu", "cuda") or resolved.index is not None:
        raise GenerationError(
            f"--device {device} names a single device; with several processes pass --device cpu or --device cuda "
            f"(rank r uses GPU r; choose GPUs with CUDA_VISIBLE_DEVICES)."
        )
    if torchrun:
        local = int(os.environ["LOCAL_WORLD_SIZE"])
        options = FabricOptions(resolved.type, local, int(os.environ["WORLD_SIZE"]) // local, "ddp")
    else:
        options = FabricOptions(resolved.type, devices, 1, "ddp")
    fabric = make_fabric(options)
    fabric.launch()
    return Workers(rank=fabric.global_rank, world_size=fabric.world_size, device=fabric.device, fabric=fabric)


def first_stage_factor(model: nn.Module) -> int:
    """How many pixels one latent cell decodes to, along each side (SD's VAE: 8), measured on a 2x2 latent."""
    latent = torch.zeros(1, int(model.channels), 2, 2, device=model.betas.device)
    with torch.no_grad():
        side = model.decode_first_stage(latent).shape[-1]
    return side // 2


@contextmanager
def sampling_image_size(model: nn.Module, image_size: int | None) -> Iterator[int]:
    """Sample images of ``image_size`` pixels a side inside the block (None: the model's own size).

    Yields the image size used. The model's latent size is changed only inside the block.
    """
    factor = first_stage_factor(model)
    native = int(model.image_size) * factor
    if image_size is None or image_size == native:
        yield native
        return
    if image_size < factor or image_size % factor:
        raise GenerationError(
            f"--image_size {image_size} is not a positive multiple of {factor} (the first stage maps {factor} "
            f"pixels to one latent cell); the model's own size is {native}."
        )
    original = model.image_size
    model.image_size = image_size // factor
    try:
        yield image_size
    finally:
        model.image_size = original


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_images(folder: Path, record_names: Sequence[str]) -> int:
    """Delete the generated images (``IMAGE_NAME``) and the named record files in ``folder``; returns the count."""
    if not folder.is_dir():
        return 0
    doomed = [path for path in folder.iterdir() if path.is_file() and IMAGE_NAME.match(path.name)]
    for path in doomed:
        path.unlink()
    for name in record_names:
        (folder / name).unlink(missing_ok=True)
    return len(doomed)


@dataclass(frozen=True)
class ImageJob:
    """One image to make: ``prompt`` sampled from ``seed``, saved at ``path``."""

    path: Path
    prompt: str
    seed: int


def prompt_jobs(rows: Sequence[PromptRow], num_samples: int, folder: Path) -> list[ImageJob]:
    """``{folder}/{case_number}_{k}.png`` from seed ``evaluation_seed + k``, for k < num_samples."""
    if num_samples < 1:
        raise GenerationError(f"--num_samples must be >= 1, got {num_samples}.")
    return [
        ImageJob(folder / f"{row.case_number}_{k}.png", row.prompt, row.evaluation_seed + k)
        for row in rows
        for k in range(num_samples)
    ]


def run_jobs(
    model: nn.Module,
    jobs: Sequence[ImageJob],
    settings: SamplingSettings,
    workers: Workers,
    batch_size: int,
    progress: bool = True,
) -> int:
    """Make this rank's missing images (jobs ``rank``, ``rank + world_size``, ...); returns how many it made.

    Jobs are assigned by position before looking at the folder, because ranks look at different times.
    """
    if batch_size < 1:
        raise GenerationError(f"--batch_size must be >= 1, got {batch_size}.")
    mine = [job for job in jobs[workers.rank :: workers.world_size] if not job.path.is_file()]
    bar = tqdm(total=len(mine), desc=f"images (rank {workers.rank})", disable=not progress or not mine)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        images = sample_images(
            model,
            [job.prompt for job in chunk],
            [job.seed for job in chunk],
            settings.steps,
            settings.guidance_scale,
            settings.eta,
            batch_size,
            settings.sampler,
        )
        for job, image in zip(chunk, images):
            save_png(image, job.path)
        bar.update(len(chunk))
    bar.close()
    return len(mine)


def check_record(existing: dict[str, Any], wanted: dict[str, Any], path: Path) -> None:
    """Refuse to add images to a folder whose record says they were made differently.

    ``wanted["identity"]`` must equal the stored one; cases present in both must have the same
    prompt and seed. New cases and more samples per case are fine (that is resuming).
    """
    fix = "use another --save_path / --model_name, or --overwrite to delete the old images"
    for key, value in wanted["identity"].items():
        if existing.get("identity", {}).get(key) != value:
            raise GenerationError(
                f"{path} records {key}={existing.get('identity', {}).get(key)!r} but this run uses {value!r}; "
                f"the folder holds images made differently: {fix}."
            )
    for case, entry in wanted["cases"].items():
        known = existing.get("cases", {}).get(case)
        if known is not None and known != entry:
            raise GenerationError(
                f"{path} records case {case} as {known!r} but the prompt file now gives {entry!r}; {fix}."
            )


def merge_record(existing: dict[str, Any] | None, wanted: dict[str, Any]) -> dict[str, Any]:
    """``wanted`` with the cases and the largest ``num_samples`` of earlier runs kept."""
    if existing is None:
        return wanted
    merged = dict(wanted)
    merged["cases"] = {**existing.get("cases", {}), **wanted["cases"]}
    merged["num_samples"] = max(int(existing.get("num_samples", 0)), int(wanted["num_samples"]))
    return merged


def prepare_folder(folder: Path, record: dict[str, Any], workers: Workers, overwrite: bool) -> None:
    """Check (or, with ``overwrite``, clear) ``folder`` and write its record; all ranks call this together."""
    path = folder / RECORD_FILE
    if overwrite:
        if workers.is_main:
            removed = remove_images(folder, [RECORD_FILE])
            if removed:
                print(f"--overwrite: deleted {removed} images in {folder}", flush=True)
        workers.barrier()
        existing = None
    else:
        existing = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if existing is not None:
            check_record(existing, record, path)
    if workers.is_main:
        write_json(merge_record(existing, record), path)
