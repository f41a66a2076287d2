"""The one image-generation path: prompts and seeds in, images out (tensors or PNG folders).

``generate`` returns images for (prompt, seed) pairs; every script, the trainers' training
images, the reports, the scenes and the benches sample through it. ``write_images`` puts the
images of a list of ``ImageJob``s into files, sharded over processes.

Many processes: ``start_workers`` starts N processes with Lightning Fabric (DDP; gloo on CPU,
NCCL on GPUs), or uses torchrun's processes. The work is split by job position (job i goes to
rank ``i % world_size``) and every image has its own seed, so N processes write exactly the
files one process writes. Ranks need no communication except one barrier before rank 0 reports.

Resuming: an image file that exists is kept, so a rerun fills in what is missing. A folder's
record (``generation.json`` for prompt files, ``seeds.json`` for one prompt's numbered images)
says how its images were made; a rerun with another model, other applied files or other sampler
settings is refused unless the caller clears the folder first (``remove_images``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from lightning_fabric import Fabric
from PIL import Image
from torch import nn
from tqdm import tqdm

from erasure.errors import GenerationError
from erasure.files import atomic_path, write_json
from erasure.loading import model_fingerprint, resolve_device
from erasure.prompts import PromptRow
from erasure.samplers import SAMPLERS, SamplingSettings, latent_shape, sampling_settings, seeded_noise
from erasure.trainers.runtime import FabricOptions, make_fabric

RECORD_FILE = "generation.json"
SEEDS_FILE = "seeds.json"
IMAGE_PATTERN = "{index:05d}.png"
#: ``{case_number}_{k}.png`` (prompt files) and ``{index:05d}.png`` (one prompt's numbered images).
IMAGE_NAME = re.compile(r"^\d+(_\d+)?\.png$")
TORCHRUN_VARIABLES = ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE")


def _check_prompts_and_seeds(prompts: Sequence[str], seeds: Sequence[int]) -> None:
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of strings, got the string {prompts!r}; wrap it in a list.")
    if len(prompts) != len(seeds):
        raise GenerationError(f"Got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt.")


@torch.no_grad()
def generate_latents(
    model: nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    settings: SamplingSettings | None = None,
    batch_size: int = 8,
) -> torch.Tensor:
    """Latents [N, C, H, W] for ``prompts[i]`` started from ``seeds[i]``, in input order."""
    _check_prompts_and_seeds(prompts, seeds)
    if batch_size < 1:
        raise GenerationError(f"batch_size must be >= 1, got {batch_size}.")
    settings = (settings or sampling_settings(model)).validated()
    sample = SAMPLERS[settings.sampler]
    shape = latent_shape(model)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = list(prompts[start : start + batch_size])
        noise, generators = seeded_noise(seeds[start : start + batch_size], shape)
        conditioning = model.get_learned_conditioning(batch_prompts)
        unconditional = None
        if settings.guidance_scale != 1.0:
            unconditional = model.get_learned_conditioning([""] * len(batch_prompts))
        chunks.append(sample(model, conditioning, unconditional, noise, generators, settings))
    if not chunks:
        return torch.empty(0, *shape, device=model.betas.device)
    return torch.cat(chunks)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    eta: float | None = None,
    batch_size: int = 8,
    settings: SamplingSettings | None = None,
) -> torch.Tensor:
    """Images [N, 3, H, W], float in [0, 1], on the model's device: ``prompts[i]`` from ``seeds[i]``.

    Sampler settings: ``settings`` if given, else the keyword arguments over the model config's
    ``sampling:`` section (``erasure.samplers.sampling_settings``). Non-finite pixels (a diverged
    edit) are an error, never a black image.
    """
    if settings is None:
        settings = sampling_settings(model, sampler, steps, guidance, eta)
    latents = generate_latents(model, prompts, seeds, settings=settings, batch_size=batch_size)
    decoded = [model.decode_first_stage(chunk) for chunk in latents.split(batch_size)]
    if not decoded:
        return latents.new_empty(0, 3, 0, 0)
    images = torch.cat(decoded).float()
    if not torch.isfinite(images).all():
        finite = torch.isfinite(images).flatten(1).all(dim=1).tolist()
        bad = sorted({prompt for prompt, ok in zip(prompts, finite) if not ok})
        raise GenerationError(
            f"The model produced non-finite pixels for prompts {bad[:3]}; an applied edit has NaN/inf weights or the "
            f"model diverged. Check the applied files."
        )
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write one [3, H, W] (or [1, H, W]) float image in [0, 1] as an 8-bit PNG, atomically."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise GenerationError(f"save_png expects one image [3, H, W] or [1, H, W], got shape {tuple(image.shape)}.")
    if not torch.isfinite(image).all():
        raise GenerationError(
            f"Refusing to write {path}: the image holds NaN/inf pixels (the model or an applied edit diverged)."
        )
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    array = pixels.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG")
    return Path(path)


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


def write_images(
    model: nn.Module,
    jobs: Sequence[ImageJob],
    settings: SamplingSettings,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 8,
    progress: bool = True,
) -> int:
    """Make this rank's missing images (jobs ``rank``, ``rank + world_size``, ...); returns how many it made.

    Jobs are assigned by position before looking at the folder, because ranks look at different times.
    """
    if batch_size < 1:
        raise GenerationError(f"batch_size (--batch_size) must be >= 1, got {batch_size}.")
    mine = [job for job in jobs[rank::world_size] if not job.path.is_file()]
    bar = tqdm(total=len(mine), desc=f"images (rank {rank})", disable=not progress or not mine)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        images = generate(
            model, [job.prompt for job in chunk], [job.seed for job in chunk], settings=settings, batch_size=batch_size
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


def _seeds_record(
    model: nn.Module, prompt: str, num_images: int, seed0: int, settings: SamplingSettings
) -> dict:
    return {
        "prompt": prompt,
        "seeds": list(range(seed0, seed0 + num_images)),
        "sampling": asdict(settings),
        "model_fingerprint": model_fingerprint(model),
        "image_pattern": IMAGE_PATTERN,
    }


def _check_existing_record(existing: dict, wanted: dict, seeds_path: Path) -> None:
    """A folder holds images of one prompt, model and sampler setting; refuse to mix."""
    for key in ("prompt", "sampling", "model_fingerprint"):
        if existing.get(key) != wanted[key]:
            raise GenerationError(
                f"{seeds_path} records {key}={existing.get(key)!r} but this run uses {wanted[key]!r}; "
                f"the folder holds images made differently. Use another output folder, or delete it "
                f"to regenerate."
            )
    known = existing.get("seeds", [])
    overlap = min(len(known), len(wanted["seeds"]))
    if known[:overlap] != wanted["seeds"][:overlap]:
        raise GenerationError(
            f"{seeds_path} records seeds starting at {known[:1]} but this run starts at "
            f"{wanted['seeds'][:1]}; use the same seed0, another folder, or delete the folder."
        )


def generate_concept_images(
    model: nn.Module,
    prompt: str,
    num_images: int,
    out_dir: str | Path,
    seed0: int = 0,
    settings: SamplingSettings | None = None,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> list[Path]:
    """Make ``{out_dir}/{i:05d}.png`` for i < num_images (image i from seed ``seed0 + i``).

    Resumable: images already present are kept and only the missing ones are sampled. The
    folder's ``seeds.json`` records prompt, seeds, sampler settings and the model fingerprint;
    a folder made with another prompt, model or setting is refused. With ``world_size > 1``
    rank r samples the missing images among r, r + world_size, ... (rank 0 writes ``seeds.json``);
    the caller waits for all ranks before reading the folder. Returns the image paths.
    """
    if num_images < 1:
        raise GenerationError(f"num_images must be >= 1, got {num_images}.")
    settings = (settings or sampling_settings(model)).validated()
    out_dir = Path(out_dir)
    seeds_path = out_dir / SEEDS_FILE
    record = _seeds_record(model, prompt, num_images, seed0, settings)
    if seeds_path.is_file():
        existing = json.loads(seeds_path.read_text(encoding="utf-8"))
        _check_existing_record(existing, record, seeds_path)
        if len(existing["seeds"]) > num_images:
            record["seeds"] = existing["seeds"]
    if rank == 0:
        write_json(record, seeds_path)
    paths = [out_dir / IMAGE_PATTERN.format(index=index) for index in range(num_images)]
    jobs = [ImageJob(path, prompt, seed0 + index) for index, path in enumerate(paths)]
    write_images(model, jobs, settings, rank=rank, world_size=world_size, batch_size=batch_size, progress=progress)
    return paths
