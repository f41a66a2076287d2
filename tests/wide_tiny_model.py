"""A tiny LatentDiffusion with a wider, shorter text encoder, for null-space tests.

The shared tiny model (text width 32, 16 tokens) has room for the blank prompt and about one
more prompt, as 16 token rows already take half of 32 dimensions. Here the width is 64 and the
length 8: ``""`` has rank 8 and every further prompt adds 7 (its first token's output is
shared), so three concepts can protect each other and keep a 42-dimensional null space.

The text encoder's final LayerNorm gets a random affine part, as a trained CLIP has: with the
freshly initialised (weight 1, bias 0) one every output row has zero mean, so the all-ones
direction would lie in every null space and no null space could ever be empty.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import perturb_zero_init, tiny_model_config
from ldm.util import instantiate_from_config
from tiny_clip import write_tiny_clip

WIDE_TEXT_WIDTH = 64
WIDE_TEXT_LENGTH = 8


def write_wide_tiny_config(directory: Path) -> Path:
    """A tiny CLIP directory and an ldm YAML (``model:`` node) using it, in ``directory``."""
    clip_dir = write_tiny_clip(directory / "clip", hidden=WIDE_TEXT_WIDTH, max_length=WIDE_TEXT_LENGTH)
    config = tiny_model_config(clip_dir)
    config.params.unet_config.params.context_dim = WIDE_TEXT_WIDTH
    config.params.cond_stage_config.params.max_length = WIDE_TEXT_LENGTH
    config_path = directory / "wide-tiny-sd.yaml"
    OmegaConf.save(OmegaConf.create({"model": config}), config_path)
    return config_path


def build_wide_tiny_model(config_path: Path, seed: int = 0) -> nn.Module:
    """The model of ``config_path`` with seeded random weights (zero-inits perturbed), eval, CPU."""
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.load(config_path).model)
    perturb_zero_init(model, seed=seed)
    final_norm = model.cond_stage_model.transformer.text_model.final_layer_norm
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        final_norm.weight.add_(0.1 * torch.randn(final_norm.weight.shape, generator=generator))
        final_norm.bias.add_(0.1 * torch.randn(final_norm.bias.shape, generator=generator))
    return model.eval().requires_grad_(False)
