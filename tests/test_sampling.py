"""Seeded sampling: per-image seeds, settings from the config, PNG and folder generation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from erasure.generation import (
    SEEDS_FILE,
    GenerationError,
    generate,
    generate_concept_images,
    generate_latents,
    save_png,
)
from erasure.samplers import SamplingError, SamplingSettings, sampling_settings

STEPS = 2
PROMPTS = ["a red", "b blue", "a red", "the cat"]
SEEDS = [11, 12, 13, 14]


def sample_latents(
    model: nn.Module,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    batch_size: int = 8,
) -> torch.Tensor:
    """DDIM latents through the public API: explicit settings, then ``generate_latents``."""
    settings = sampling_settings(model, steps=steps, guidance_scale=guidance_scale, eta=eta)
    return generate_latents(model, prompts, seeds, settings=settings, batch_size=batch_size)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_an_image_depends_only_on_its_prompt_and_seed(tiny_model: nn.Module, eta: float) -> None:
    together = sample_latents(tiny_model, PROMPTS, SEEDS, steps=STEPS, guidance_scale=3.0, eta=eta, batch_size=4)
    one_by_one = sample_latents(tiny_model, PROMPTS, SEEDS, steps=STEPS, guidance_scale=3.0, eta=eta, batch_size=1)
    reversed_order = sample_latents(
        tiny_model, PROMPTS[::-1], SEEDS[::-1], steps=STEPS, guidance_scale=3.0, eta=eta, batch_size=3
    )
    torch.testing.assert_close(together, one_by_one, rtol=0, atol=1e-4)
    torch.testing.assert_close(together, reversed_order.flip(0), rtol=0, atol=1e-4)
    # prompts 0 and 2 are equal: only the seed tells them apart
    assert (together[0] - together[2]).abs().max() > 0.1


def test_eta_adds_seeded_noise(tiny_model: nn.Module) -> None:
    deterministic = sample_latents(tiny_model, PROMPTS[:1], SEEDS[:1], steps=STEPS, guidance_scale=1.0)
    stochastic = sample_latents(tiny_model, PROMPTS[:1], SEEDS[:1], steps=STEPS, guidance_scale=1.0, eta=1.0)
    again = sample_latents(tiny_model, PROMPTS[:1], SEEDS[:1], steps=STEPS, guidance_scale=1.0, eta=1.0)
    assert torch.equal(stochastic, again)
    assert (stochastic - deterministic).abs().max() > 1e-3


def test_images_are_floats_in_unit_range(tiny_model: nn.Module) -> None:
    images = generate(tiny_model, PROMPTS[:2], SEEDS[:2], steps=STEPS, guidance=1.0)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    settings = SamplingSettings("ddim", STEPS, 1.0, 0.0)
    torch.testing.assert_close(generate(tiny_model, PROMPTS[:2], SEEDS[:2], settings=settings), images)


def test_settings_come_from_arguments_then_config_then_sd_defaults(tiny_model: nn.Module) -> None:
    assert sampling_settings(tiny_model) == SamplingSettings("ddim", 50, 7.5, 0.0)
    tiny_model.ldm_config = OmegaConf.create({"sampling": {"steps": 20, "guidance_scale": 4}})
    assert sampling_settings(tiny_model) == SamplingSettings("ddim", 20, 4.0, 0.0)
    assert sampling_settings(tiny_model, steps=5, eta=1.0) == SamplingSettings("ddim", 5, 4.0, 1.0)
    with pytest.raises(SamplingError, match="Unknown sampler 'plms'"):
        sampling_settings(tiny_model, sampler="plms")
    tiny_model.ldm_config = OmegaConf.create({"sampling": {"step": 20}})
    with pytest.raises(SamplingError, match=r"unknown keys \['step'\]"):
        sampling_settings(tiny_model)


def test_bad_prompts_and_seeds(tiny_model: nn.Module) -> None:
    with pytest.raises(GenerationError, match="2 prompts but 1 seeds"):
        sample_latents(tiny_model, PROMPTS[:2], SEEDS[:1], steps=STEPS)
    with pytest.raises(TypeError, match="wrap it in a list"):
        sample_latents(tiny_model, "a red", SEEDS[:1], steps=STEPS)


def test_save_png_round_trips_8_bit_values(tmp_path: Path) -> None:
    levels = torch.arange(48, dtype=torch.float32).reshape(3, 4, 4) / 255.0
    path = save_png(levels, tmp_path / "sub" / "image.png")
    read = np.array(Image.open(path))
    assert read.shape == (4, 4, 3) and torch.equal(torch.from_numpy(read).permute(2, 0, 1).float(), levels * 255)
    assert [p.name for p in path.parent.iterdir()] == ["image.png"]  # no temporary file left
    with pytest.raises(GenerationError, match="one image"):
        save_png(levels[None], tmp_path / "batch.png")


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_generate_concept_images_is_resumable_and_sharded(tiny_model: nn.Module, tmp_path: Path) -> None:
    settings = SamplingSettings(steps=STEPS, guidance_scale=2.0)
    paths = generate_concept_images(tiny_model, "a red", 3, tmp_path / "full", seed0=5, settings=settings, progress=False)
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png"]
    record = json.loads((tmp_path / "full" / SEEDS_FILE).read_text())
    assert record["prompt"] == "a red" and record["seeds"] == [5, 6, 7] and record["sampling"]["steps"] == STEPS
    assert len(record["model_fingerprint"]) == 16
    originals = {p.name: pixels(p) for p in paths}

    paths[1].unlink()
    kept = paths[0].stat().st_mtime_ns
    generate_concept_images(tiny_model, "a red", 3, tmp_path / "full", seed0=5, settings=settings, progress=False)
    assert paths[0].stat().st_mtime_ns == kept
    assert np.abs(pixels(paths[1]) - originals["00001.png"]).max() <= 1  # batch of 1 vs 3: rounding only

    for rank in (0, 1):
        generate_concept_images(
            tiny_model, "a red", 3, tmp_path / "shards", seed0=5, settings=settings, rank=rank, world_size=2,
            progress=False,
        )
    shards = {p.name: pixels(p) for p in sorted((tmp_path / "shards").glob("*.png"))}
    assert shards.keys() == originals.keys()
    assert all(np.abs(shards[name] - originals[name]).max() <= 1 for name in originals)

    with pytest.raises(GenerationError, match="records prompt='a red'"):
        generate_concept_images(tiny_model, "b blue", 3, tmp_path / "full", settings=settings, progress=False)
    with pytest.raises(GenerationError, match="same seed0"):
        generate_concept_images(tiny_model, "a red", 3, tmp_path / "full", seed0=0, settings=settings, progress=False)
