"""Training images of each concept, made by the ORIGINAL model, encoded to latents once.

Layout: ``{data_dir}/{slugify(concept)}/*.png`` (``.jpg`` too). Without a user ``--data_dir``
the images are generated with ``erasure.sampling`` into ``data/generated/<model fingerprint>/``
and reused by later runs (generation is resumable and sharded over the training processes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from erasure.increments import slugify
from erasure.loading import REPO_ROOT, model_fingerprint
from erasure.sampling import SamplingSettings, generate_concept_images
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GENERATED_ROOT = REPO_ROOT / "data" / "generated"
ENCODE_BATCH = 16


class TrainingDataError(ValueError):
    """Training images that are missing, unreadable or inconsistent; the message names the fix."""


def concept_folder(data_dir: str | Path, concept: str) -> Path:
    return Path(data_dir) / slugify(concept)


def default_data_dir(model: nn.Module) -> Path:
    """Where generated training images of this base model live (one folder per model)."""
    return GENERATED_ROOT / model_fingerprint(model)


def image_files(folder: Path) -> list[Path]:
    """The folder's images in name order; a missing or empty folder is an error."""
    if not folder.is_dir():
        raise TrainingDataError(
            f"No training images for this concept: {folder} does not exist. Put images made by the original "
            f"model there, or omit --data_dir to have them generated."
        )
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if not files:
        raise TrainingDataError(
            f"Training image folder {folder} is empty (no {'/'.join(IMAGE_SUFFIXES)} files); add images of the "
            f"concept made by the original model, or omit --data_dir to have them generated."
        )
    return files


def read_images(files: Sequence[Path]) -> torch.Tensor:
    """RGB images as float [N, 3, H, W] in [-1, 1]; unreadable files and mixed sizes are errors."""
    arrays = []
    for path in files:
        try:
            with Image.open(path) as picture:
                arrays.append(np.asarray(picture.convert("RGB"), dtype=np.uint8))
        except (UnidentifiedImageError, OSError) as error:
            raise TrainingDataError(
                f"Cannot read training image {path} ({error}); delete or replace the file."
            ) from error
    sizes = sorted({array.shape[:2] for array in arrays})
    if len(sizes) > 1:
        raise TrainingDataError(
            f"Training images in {files[0].parent} have mixed sizes {sizes}; use images of one size "
            f"(the size the model generates)."
        )
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return pixels / 127.5 - 1.0


@torch.no_grad()
def encode_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """First-stage latents (times ``scale_factor``) of images in [-1, 1], on the model's device.

    A VAE posterior is reduced to its mode, so the latents (and therefore training) do not
    depend on a random draw.
    """
    device = model.betas.device
    latents = []
    for chunk in images.split(ENCODE_BATCH):
        posterior = model.encode_first_stage(chunk.to(device))
        mode = posterior.mode() if isinstance(posterior, DiagonalGaussianDistribution) else posterior
        latents.append(model.get_first_stage_encoding(mode).float())
    return torch.cat(latents)


def ensure_generated(
    model: nn.Module,
    concepts: Sequence[str],
    data_dir: Path,
    num_images: int,
    settings: SamplingSettings | None,
    seed: int,
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
    announce: Callable[[str], None],
) -> None:
    """Generate the missing images of every concept (sharded over ranks), then wait for all ranks."""
    for concept in concepts:
        folder = concept_folder(data_dir, concept)
        present = len(list(folder.glob("[0-9]*.png"))) if folder.is_dir() else 0
        if present < num_images:
            announce(
                f"Generating {num_images - present} training images of {concept!r} with the original model into "
                f"{folder} (reused by later runs)."
            )
        generate_concept_images(
            model, concept, num_images, folder, seed0=seed, settings=settings, rank=rank, world_size=world_size,
            progress=rank == 0,
        )
    barrier()


def concept_latents(
    model: nn.Module, data_dir: Path, concepts: Sequence[str], limit: int | None = None
) -> dict[str, torch.Tensor]:
    """Encoded training latents of every concept {concept: [N_c, C, h, w]} (at most ``limit`` each)."""
    latents = {}
    for concept in concepts:
        files = image_files(concept_folder(data_dir, concept))
        latents[concept] = encode_images(model, read_images(files[:limit] if limit else files))
    shapes = {concept: tuple(value.shape[1:]) for concept, value in latents.items()}
    if len(set(shapes.values())) > 1:
        raise TrainingDataError(
            f"Training images of different concepts have different sizes (latent shapes {shapes}); use one size "
            f"for all concepts."
        )
    return latents
