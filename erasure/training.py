"""Training from Python: ``train_sepce``, ``train_cie`` and ``train_esd`` on a loaded model.

Each call takes the model, the concept(s) and a frozen settings object (``erasure.settings``)
and returns what the method makes: SepCE one ``Increment`` per concept (METHOD.md §2), CiE and
ESD one ``WeightDifference`` (METHOD.md §1, §5). The model is left as it was (SepCE detaches its
increments, CiE / ESD put the original weights back), so the result is applied explicitly with
``erasure.apply``. Training images are an argument (tensors in [0, 1] per concept, or a folder
``{dir}/{slug}/*.png``) or are generated once by the original model into ``cache_dir`` (default:
the per-user cache, ``erasure.trainers.data.default_cache_dir``) and reused.

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
from erasure.closed_form import concept_templates, solve_sepce
from erasure.increments import Increment, cross_attention_kv, detach
from erasure.protection import attach_protection_reports
from erasure.settings import CiESettings, ESDSettings, SepCESettings, TrainingSettings
from erasure.trainers.cie import CiETrainer
from erasure.trainers.data import concept_latents, default_data_dir, ensure_generated, folder_images
from erasure.trainers.esd import ESDTrainer
from erasure.trainers.runtime import TrainingSetupError
from erasure.trainers.sepce import SepCETrainer
from erasure.weight_differences import WeightDifference
from erasure.wordings import fill, read_protect_file
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
    model: nn.Module,
    concepts: Sequence[str],
    settings: TrainingSettings,
    fabric: Fabric,
    images: Images | None,
    cache_dir: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """Latents of every concept's training images: given, read from a folder, or generated once."""
    if images is None:
        folder = default_data_dir(model, cache_dir)
        ensure_generated(
            model, concepts, folder, settings.num_images, fabric.global_rank, fabric.world_size, fabric.barrier,
            lambda message: _say(fabric, message),
        )
        images = folder_images(folder, concepts, limit=settings.num_images)
    elif isinstance(images, str | Path):
        images = folder_images(images, concepts)
    return concept_latents(model, images, concepts)


def protected_prompts(model: nn.Module, concepts: Sequence[str], protect: Sequence[str], settings: SepCESettings) -> list[str]:
    """The watermark prompt (METHOD.md §2; none when ``settings.watermark_prompt`` is ""), ``protect``
    and, when class protection is on, the model world's other class prompts.

    Class protection (``settings.protect_classes``; None = the world's default) protects the
    world's other evaluation classes, METHOD.md §2's "known concepts": on by default for the toy
    world, whose 256-wide text space holds all of them, off for SD, whose 768-wide space holds
    only about nine prompts (METHOD.md §2, capacity).
    """
    world = world_of(model)
    protect = [settings.watermark_prompt, *protect] if settings.watermark_prompt else list(protect)
    enabled = world.protect_classes if settings.protect_classes is None else settings.protect_classes
    if not enabled:
        return protect
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
    cache_dir: str | Path | None = None,
) -> list[Increment]:
    """Train one separable increment per concept (METHOD.md §2); returns them in ``concepts`` order.

    Every increment leaves the keys and values of ``""``, of the other concepts (joint and
    sequential modes use the same bases, METHOD.md §2), of the watermark prompt, of ``protect``
    and (see ``protected_prompts``) of the world's other classes unchanged. ``settings.solver``:
    "cie" trains the CiE loss from zero over the concept's wordings, "closed_form" solves over them (METHOD.md
    §6; no images, no UNet call), "closed_form+cie" trains from the closed form. The prompts of
    ``settings.protect_file`` are protected at ``settings.protect_energy`` (METHOD.md §6); every
    increment records each protected prompt's relative K/V change (``erasure.protection``).
    """
    if isinstance(concepts, str):
        raise TypeError(f"concepts must be a list of strings, got the string {concepts!r}; wrap it in a list.")
    settings.validate()
    fabric = _fabric_for(model, fabric)
    settings = settings.with_lr("sepce", world_of(model).name)
    protected = protected_prompts(model, concepts, protect, settings)
    approximate = read_protect_file(settings.protect_file) if settings.protect_file else []
    bases = compute_bases(
        model, list(concepts), protected, rtol=settings.rtol, min_dims=settings.min_dims,
        approximate=approximate, energy=settings.protect_energy,
    )
    for concept, basis in bases.items():
        _say(fabric, f"Basis of {concept!r}: {basis.dims} dimensions, protects {len(basis.protected_prompts)} prompts.")
    start = solve_sepce(model, bases, settings) if settings.solver != "cie" else {}
    if settings.solver == "closed_form":
        increments = start
    else:
        latents = training_latents(model, concepts, settings, fabric, images, cache_dir)
        templates = concept_templates(world_of(model).name, settings)
        wordings = {concept: [fill(template, concept) for template in templates] for concept in concepts}
        trainer = SepCETrainer(model, fabric, bases, latents, settings, wordings)
        try:
            _start_from(model, start)
            trainer.fit()
            increments = trainer.increments()
        finally:
            detach(model, list(bases))
        for concept, increment in start.items():
            increments[concept].metadata["closed_form"] = increment.metadata["closed_form"]
    result = [increments[concept] for concept in concepts]
    attach_protection_reports(model, result)
    return result


def _start_from(model: nn.Module, start: Mapping[str, Increment]) -> None:
    """Set the attached (zero) coefficients of every concept of ``start`` to its closed-form ones
    (``--solver closed_form+cie``: the CiE optimisation starts from the closed form)."""
    with torch.no_grad():
        for name, layer in cross_attention_kv(model).items():
            for increment in start.values():
                coefficient = layer.increments[increment.name].coeff
                coefficient.copy_(increment.coeffs[name].to(coefficient))


def train_cie(
    model: nn.Module,
    concept: str,
    *,
    settings: CiESettings = CiESettings(),
    fabric: Fabric | None = None,
    images: Images | None = None,
    cache_dir: str | Path | None = None,
) -> WeightDifference:
    """CiE on every attn2 weight for one concept (METHOD.md §1); returns the weight difference."""
    settings.validate()
    fabric = _fabric_for(model, fabric)
    settings = settings.with_lr("cie", world_of(model).name)
    latents = training_latents(model, [concept], settings, fabric, images, cache_dir)[concept]
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
