"""Shared fixtures: a tiny offline CLIP directory and a tiny LatentDiffusion built from
configs/test/tiny-sd.yaml (random weights, CPU, eval mode)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.util import instantiate_from_config
from tiny_clip import write_tiny_clip

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_SD_CONFIG = REPO_ROOT / "configs" / "test" / "tiny-sd.yaml"
V1_INFERENCE_CONFIG = REPO_ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"

# The test models are tiny: intra-op threads cost more than they give, and on a shared
# machine they oversubscribe the cores (measured: a tiny UNet call 0.5 s with 2 threads,
# 0.08 s with 1).
torch.set_num_threads(1)


def perturb_zero_init(model: nn.Module, seed: int, scale: float = 0.02) -> int:
    """Give every all-zero conv / linear weight (and its all-zero bias) small Gaussian values.

    Zero-initialised output layers (UNet ``out``, ResBlock ``out_layers``, SpatialTransformer
    ``proj_out``) make a random model ignore its inputs, so tests could not see any effect.
    Returns the number of layers changed.
    """
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
                continue
            if torch.count_nonzero(module.weight) != 0:
                continue
            noise = torch.randn(module.weight.shape, generator=generator) * scale
            module.weight.copy_(noise.to(module.weight))
            if module.bias is not None and torch.count_nonzero(module.bias) == 0:
                module.bias.copy_((torch.randn(module.bias.shape, generator=generator) * scale).to(module.bias))
            changed += 1
    return changed


def tiny_model_config(clip_dir: str | Path):
    """The ``model`` node of tiny-sd.yaml with the cond stage pointed at ``clip_dir``."""
    config = OmegaConf.load(TINY_SD_CONFIG).model
    config.params.cond_stage_config.params.version = str(clip_dir)
    return config


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local CLIP text-encoder directory (hidden 32, max_length 16, with weights)."""
    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), hidden=32, max_length=16)


@pytest.fixture
def tiny_model(tiny_clip_dir: Path):
    """A fresh tiny LatentDiffusion (seeded random weights, zero-inits perturbed, eval, CPU)."""
    torch.manual_seed(0)
    model = instantiate_from_config(tiny_model_config(tiny_clip_dir))
    perturb_zero_init(model, seed=0)
    return model.eval().to("cpu")
