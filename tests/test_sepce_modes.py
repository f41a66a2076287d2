"""SepCE's modes and objectives (METHOD.md §2): sequential training uses the joint bases, so
joint and sequential increments are interchangeable and any one restores exactly; the paper's
joint objective; the watermark prompt is protected."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning_fabric import Fabric
from safetensors.torch import save_file
from torch import nn
from wide_tiny_model import build_wide_tiny_model, write_wide_tiny_config

from erasure.bases import compute_bases
from erasure.edits import apply
from erasure.increments import Increment, cross_attention_kv, slugify
from erasure.loading import load_model
from erasure.settings import DEFAULT_WATERMARK_PROMPT, SepCESettings, SettingsError
from erasure.trainers.sepce import SepCETrainer
from erasure.training import train_sepce

CONCEPTS = ["a red", "b blue", "c green"]


@pytest.fixture(scope="module")
def wide_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wide_tiny_config(tmp_path_factory.mktemp("wide"))


@pytest.fixture(scope="module")
def fabric() -> Fabric:
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    return fabric


def training_images(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {concept: torch.rand((3, 3, 16, 16), generator=generator) for concept in CONCEPTS}


def settings(**overrides: object) -> SepCESettings:
    values = {"lr": 300.0, "iterations": 3, "batch_size": 2, "tau": -1e9, "progress": False, "save_every": 0,
              "min_dims": 1}
    values.update(overrides)
    return SepCESettings(**values)


def keys_and_values(model: nn.Module, prompt: str) -> list[torch.Tensor]:
    """K and V of ``prompt`` in every cross-attention layer under the increments now active."""
    context = model.get_learned_conditioning([prompt])
    with torch.no_grad():
        return [layer(context).double() for layer in cross_attention_kv(model).values()]


def relative_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    return max(float((a - b).norm() / b.norm()) for a, b in zip(after, before))


def test_sequential_uses_the_joint_bases_and_restores_exactly(wide_config: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "wide.safetensors"
    save_file({key: value.contiguous() for key, value in build_wide_tiny_model(wide_config).state_dict().items()},
              str(checkpoint))
    model = load_model(wide_config, checkpoint)
    joint = train_sepce(model, CONCEPTS, settings=settings(mode="joint"), images=training_images())
    sequential = train_sepce(model, CONCEPTS, settings=settings(mode="sequential"), images=training_images())
    protected = ["", DEFAULT_WATERMARK_PROMPT, *CONCEPTS]
    for own, other in zip(joint, sequential):
        assert own.basis.protected_prompts == other.basis.protected_prompts
        assert sorted(own.basis.protected_prompts) == sorted(p for p in protected if p != own.concept)
        assert torch.equal(own.basis.basis, other.basis.basis)
        assert all(torch.count_nonzero(coefficient) > 0 for coefficient in own.coeffs.values())

    # A mixed set (joint for "a red", sequential for the others) composes, and dropping any ONE
    # increment leaves the keys/values of every prompt it protects where the others put them.
    mixed: list[Increment] = [joint[0], *sequential[1:]]
    with apply(model, mixed):
        everything = {prompt: keys_and_values(model, prompt) for prompt in protected}
        for dropped in mixed:
            kept = [slugify(increment.concept) for increment in mixed if increment is not dropped]
            for layer in cross_attention_kv(model).values():
                layer.set_active(kept)
            for prompt in protected:
                if prompt == dropped.concept:
                    assert relative_change(everything[prompt], keys_and_values(model, prompt)) > 1e-4
                else:
                    assert relative_change(everything[prompt], keys_and_values(model, prompt)) <= 1e-6, (dropped, prompt)
            for layer in cross_attention_kv(model).values():
                layer.set_active(None)


def set_coefficients(trainer: SepCETrainer) -> None:
    """Concept i's coefficients all (-1)**i: nonzero increments that do not cancel exactly."""
    with torch.no_grad():
        for index, coefficients in enumerate(trainer.coefficients.values()):
            for coefficient in coefficients:
                coefficient.copy_((-1.0) ** index * torch.ones_like(coefficient))


def test_paper_objective_sums_the_increments_and_stops_together(wide_config: Path, fabric: Fabric) -> None:
    models = {objective: build_wide_tiny_model(wide_config) for objective in ("paper", "per_concept")}
    shape = (3, models["paper"].channels, models["paper"].image_size, models["paper"].image_size)
    latents = {concept: torch.randn(shape) for concept in CONCEPTS[:2]}
    trainers = {
        objective: SepCETrainer(model, fabric, compute_bases(model, CONCEPTS[:2], min_dims=1), latents,
                                settings(joint_objective=objective, tau=1e9, warmup=2, lam=1.0))
        for objective, model in models.items()
    }
    names = [slugify(concept) for concept in CONCEPTS[:2]]
    layers = list(cross_attention_kv(models["paper"]).values())
    set_coefficients(trainers["paper"])
    set_coefficients(trainers["per_concept"])
    with torch.no_grad():
        summed = sum(float(sum(layer.increments[n].delta_weight() for n in names).abs().sum()) for layer in layers)
        separate = sum(float(layer.increments[n].delta_weight().abs().sum()) for layer in layers for n in names)
        paper = float(trainers["paper"].regulariser(CONCEPTS[:2]))
        per_concept = float(trainers["per_concept"].regulariser(CONCEPTS[:2]))
    assert paper == pytest.approx(summed / len(layers), rel=1e-5)
    assert per_concept == pytest.approx(separate / len(layers), rel=1e-5)
    assert paper < 0.99 * per_concept  # the two objectives differ on these increments
    summary = trainers["paper"].fit()
    assert {record["steps"] for record in summary["concepts"].values()} == {3}
    assert len({record["momentum"] for record in summary["concepts"].values()}) == 1  # one weighted momentum
    separately = trainers["per_concept"].fit()
    assert len({record["momentum"] for record in separately["concepts"].values()}) == 2


def test_paper_objective_needs_joint_mode() -> None:
    with pytest.raises(SettingsError, match="needs mode='joint'"):
        SepCESettings(mode="sequential", joint_objective="paper").validate()
    with pytest.raises(SettingsError, match="joint_objective"):
        SepCESettings(joint_objective="sum").validate()
