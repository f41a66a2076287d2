"""Training images of each concept, made by the ORIGINAL model, encoded to latents once.

Images come from the caller (tensors in [0, 1], or a folder ``{data_dir}/{slugify(concept)}/*.png``)
or are generated once with ``erasure.generation`` into ``{cache_dir}/training-images/<model
fingerprint>/`` and reused by later runs (generation is resumable and sharded over the training
processes). The cache directory defaults to a per-user one (``$XDG_CACHE_HOME/separable-erasure``,
else ``~/.cache/separable-erasure``), never the installed package or the repository, which may be
read-only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import os

import torch
from torch import nn

from erasure.images import list_images, read_images, unit_float
from erasure.errors import TrainingDataError
from erasure.generation import generate_concept_images
from erasure.increments import check_distinct_names, slugify
from erasure.loading import model_fingerprint
from erasure.samplers import sampling_settings
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

CACHE_NAME = "separable-erasure"
TRAINING_IMAGES = "training-images"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/separable-erasure``, else ``~/.cache/separable-erasure`` (per user)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / CACHE_NAME


#: Generated training images when no cache directory is given: ``{default cache dir}/training-images``.
GENERATED_ROOT = default_cache_dir() / TRAINING_IMAGES
ENCODE_BATCH = 16
#: First seed of generated training images (image i from seed i).
IMAGE_SEED = 0


def concept_folder(data_dir: str | Path, concept: str) -> Path:
    return Path(data_dir) / slugify(concept)


def generated_root(cache_dir: str | Path | None = None) -> Path:
    """The folder of generated training images: ``{cache_dir}/training-images`` (default: the per-user cache)."""
    return GENERATED_ROOT if cache_dir is None else Path(cache_dir) / TRAINING_IMAGES


def default_data_dir(model: nn.Module, cache_dir: str | Path | None = None) -> Path:
    """Where generated training images of this base model live (one folder per model)."""
    return generated_root(cache_dir) / model_fingerprint(model)


@torch.no_grad()
def encode_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """First-stage latents (times ``scale_factor``) of images (uint8, or float in [0, 1]), on the model's device.

    A VAE posterior is reduced to its mode, so the latents (and therefore training) do not
    depend on a random draw.
    """
    device = model.betas.device
    latents = []
    for chunk in images.split(ENCODE_BATCH):
        posterior = model.encode_first_stage(unit_float(chunk).to(device) * 2.0 - 1.0)
        mode = posterior.mode() if isinstance(posterior, DiagonalGaussianDistribution) else posterior
        latents.append(model.get_first_stage_encoding(mode).float())
    return torch.cat(latents)


def ensure_generated(
    model: nn.Module,
    concepts: Sequence[str],
    data_dir: Path,
    num_images: int,
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
    announce: Callable[[str], None],
) -> None:
    """Generate the missing images of every concept (sharded over ranks), then wait for all ranks."""
    check_distinct_names(concepts)
    for concept in concepts:
        folder = concept_folder(data_dir, concept)
        present = len(list(folder.glob("[0-9]*.png"))) if folder.is_dir() else 0
        if present < num_images:
            announce(
                f"Generating {num_images - present} training images of {concept!r} with the original model into "
                f"{folder} (reused by later runs)."
            )
        generate_concept_images(
            model, concept, num_images, folder, seed0=IMAGE_SEED, settings=sampling_settings(model), rank=rank,
            world_size=world_size, progress=rank == 0,
        )
    barrier()


def folder_images(data_dir: str | Path, concepts: Sequence[str], limit: int | None = None) -> dict[str, torch.Tensor]:
    """uint8 images {concept: [N, 3, H, W]} from ``{data_dir}/{slug}/`` (at most ``limit`` per concept)."""
    check_distinct_names(concepts)
    images = {}
    for concept in concepts:
        files = list_images(concept_folder(data_dir, concept))
        images[concept] = read_images(files[:limit] if limit else files)
    return images


def concept_latents(model: nn.Module, images: Mapping[str, torch.Tensor], concepts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Encoded training latents of every concept {concept: [N_c, C, h, w]}; every concept needs images."""
    missing = [concept for concept in concepts if concept not in images or len(images[concept]) == 0]
    if missing:
        raise TrainingDataError(
            f"No training images for {missing}; give images of every concept (or none, to have them generated)."
        )
    latents = {concept: encode_images(model, images[concept]) for concept in concepts}
    shapes = {concept: tuple(value.shape[1:]) for concept, value in latents.items()}
    if len(set(shapes.values())) > 1:
        raise TrainingDataError(
            f"Training images of different concepts have different sizes (latent shapes {shapes}); use one size "
            f"for all concepts."
        )
    return latents
