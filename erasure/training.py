"""Training from Python: ``train_sepce``, ``train_cie`` and ``train_esd`` on a loaded model.

Each call takes the model, the concept(s) and a frozen settings object (``erasure.settings``)
and returns what the method makes: SepCE one ``Increment`` per concept (METHOD.md §2), CiE and
ESD one ``WeightDifference`` (METHOD.md §1, §5). The model is left as it was (SepCE detaches its
increments, CiE / ESD put the original weights back), so the result is applied explicitly with
``erasure.apply``. Training images are an argument (tensors in [0, 1] per concept, or a folder
``{dir}/{slug}/*.png``) or are generated once by the original model and reused.

``fabric`` (Lightning Fabric) decides processes and devices; without it training runs in this
process on the model's device. Under several processes every rank calls the function with the
same arguments and gets the same result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from lightning_fabric import Fabric
from torch import nn

from erasure.bases import BLANK_PROMPT, compute_bases, normalise_prompt
from erasure.increments import Increment, detach
from erasure.settings import CiESettings, ESDSettings, SepCESettings, TrainingSettings
from erasure.trainers.cie import CiETrainer
from erasure.trainers.data import concept_latents, default_data_dir, ensure_generated, folder_images
from erasure.trainers.esd import ESDTrainer
from erasure.trainers.runtime import TrainingSetupError
from erasure.trainers.sepce import SepCETrainer
from erasure.weight_differences import WeightDifference
from erasure.worlds import world_of

#: Training images: {concept: images [N, 3, H, W] (uint8, or float in [0, 1])}, or a folder of per-concept folders.
Images = Mapping[str, torch.Tensor] | str | Path


def default_fabric(device: torch.device | str) -> Fabric:
    """A one-process Fabric on ``device`` (what training uses when no ``fabric`` is given)."""
    device = torch.device(device)
    if device.type == "cuda":
        fabric = Fabric(accelerator="cuda", devices=[device.index or 0])
    else:
        fabric = Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    return fabric


def _fabric_for(model: nn.Module, fabric: Fabric | None) -> Fabric:
    device = model.betas.device
    fabric = fabric or default_fabric(device)
    if fabric.device != device:
        raise TrainingSetupError(
            f"The model is on {device} but the Fabric process uses {fabric.device}; move the model first "
            f"(model.to(fabric.device))."
        )
    return fabric


def _say(fabric: Fabric, message: str) -> None:
    if fabric.global_rank == 0:
        print(message, flush=True)


def training_latents(
    model: nn.Module, concepts: Sequence[str], settings: TrainingSettings, fabric: Fabric, images: Images | None
) -> dict[str, torch.Tensor]:
    """Latents of every concept's training images: given, read from a folder, or generated once."""
    if images is None:
        folder = default_data_dir(model)
        ensure_generated(
            model, concepts, folder, settings.num_images, fabric.global_rank, fabric.world_size, fabric.barrier,
            lambda message: _say(fabric, message),
        )
        images = folder_images(folder, concepts, limit=settings.num_images)
    elif isinstance(images, str | Path):
        images = folder_images(images, concepts)
    return concept_latents(model, images, concepts)


def protected_prompts(model: nn.Module, concepts: Sequence[str], protect: Sequence[str], settings: SepCESettings) -> list[str]:
    """``protect`` plus, when class protection is on, the model world's other class prompts.

    Class protection (``settings.protect_classes``; None = the world's default) protects the
    world's other evaluation classes, METHOD.md §2's "known concepts": on by default for the toy
    world, whose 256-wide text space holds all of them, off for SD, whose 768-wide space holds
    only about nine prompts (METHOD.md §2, capacity).
    """
    world = world_of(model)
    enabled = world.protect_classes if settings.protect_classes is None else settings.protect_classes
    if not enabled:
        return list(protect)
    taken = {normalise_prompt(prompt) for prompt in [*concepts, *protect, BLANK_PROMPT]}
    return [*protect, *(prompt for prompt in world.class_prompts if normalise_prompt(prompt) not in taken)]


def train_sepce(
    model: nn.Module,
    concepts: Sequence[str],
    *,
    protect: Sequence[str] = (),
    settings: SepCESettings = SepCESettings(),
    fabric: Fabric | None = None,
    images: Images | None = None,
) -> list[Increment]:
    """Train one separable increment per concept (METHOD.md §2); returns them in ``concepts`` order.

    Every increment leaves the keys and values of ``""``, of the other concepts (joint and
    sequential modes protect the same set), of ``protect`` and (see ``protected_prompts``) of the
    world's other classes unchanged.
    """
    if isinstance(concepts, str):
        raise TypeError(f"concepts must be a list of strings, got the string {concepts!r}; wrap it in a list.")
    settings.validate()
    fabric = _fabric_for(model, fabric)
    settings = settings.with_lr("sepce", world_of(model).name)
    protected = protected_prompts(model, concepts, protect, settings)
    bases = compute_bases(
        model, list(concepts), protected, rtol=settings.rtol, min_dims=settings.min_dims,
        sequential=settings.mode == "sequential",
    )
    for concept, basis in bases.items():
        _say(fabric, f"Basis of {concept!r}: {basis.dims} dimensions, protects {len(basis.protected_prompts)} prompts.")
    latents = training_latents(model, concepts, settings, fabric, images)
    trainer = SepCETrainer(model, fabric, bases, latents, settings)
    try:
        trainer.fit()
        increments = trainer.increments()
    finally:
        detach(model, list(bases))
    return [increments[concept] for concept in concepts]


def train_cie(
    model: nn.Module,
    concept: str,
    *,
    settings: CiESettings = CiESettings(),
    fabric: Fabric | None = None,
    images: Images | None = None,
) -> WeightDifference:
    """CiE on every attn2 weight for one concept (METHOD.md §1); returns the weight difference."""
    settings.validate()
    fabric = _fabric_for(model, fabric)
    settings = settings.with_lr("cie", world_of(model).name)
    latents = training_latents(model, [concept], settings, fabric, images)[concept]
    trainer = CiETrainer(model, fabric, concept, latents, settings)
    try:
        trainer.fit()
        return trainer.difference()
    finally:
        trainer.put_back_originals()


def train_esd(
    model: nn.Module,
    concept: str,
    *,
    settings: ESDSettings = ESDSettings(),
    fabric: Fabric | None = None,
) -> WeightDifference:
    """The ESD-x / ESD-u baseline for one concept (METHOD.md §5); returns the weight difference."""
    settings.validate()
    fabric = _fabric_for(model, fabric)
    settings = settings.with_lr("esd", world_of(model).name)
    trainer = ESDTrainer(model, fabric, concept, settings)
    try:
        trainer.fit()
        return trainer.difference()
    finally:
        trainer.put_back_originals()
