"""Outputs of ``ldm`` modules on fixed inputs, to compare CompVis's implementation with ours.

``python compvis_reference_outputs.py OUT.pt`` (cwd = a pristine CompVis clone, on the path)
builds each case with CompVis's code, gives every parameter seeded noise (so zero-initialised
layers cannot hide wiring), runs it on a seeded input and saves {case: (state dict, output)}.
``compare(path)`` (imported by the tests, with our ``ldm``) builds the same cases with our
code, loads those state dicts strictly and returns the largest output difference per case.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TINY_DDCONFIG = dict(double_z=False, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                     num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
IDENTITY = {"target": "torch.nn.Identity"}


def _images(batch: int = 2, channels: int = 3, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(7))


def _steps() -> torch.Tensor:
    return torch.tensor([3, 600])


#: case -> (dotted class path, constructor kwargs, forward of (module, ldm) -> output tensor)
CASES: dict[str, tuple[str, dict[str, Any], Callable[[torch.nn.Module], torch.Tensor]]] = {
    "unet_self_attention_legacy": (
        "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        dict(image_size=16, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
             attention_resolutions=[1, 2], channel_mult=[1, 2], num_head_channels=16, num_classes=5,
             use_scale_shift_norm=True, resblock_updown=True),
        lambda m: m(_images(), _steps(), y=torch.tensor([1, 4])),
    ),
    "unet_new_attention_order": (
        "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        dict(image_size=16, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=2,
             attention_resolutions=[2], channel_mult=[1, 2], num_heads=4, use_new_attention_order=True,
             legacy=False),
        lambda m: m(_images(), _steps()),
    ),
    "encoder_unet_attention_pool": (
        "ldm.modules.diffusionmodules.openaimodel.EncoderUNetModel",
        dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
             attention_resolutions=[2], channel_mult=[1, 2], num_head_channels=16, pool="attention"),
        lambda m: m(_images(), _steps()),
    ),
    "encoder_unet_spatial": (
        "ldm.modules.diffusionmodules.openaimodel.EncoderUNetModel",
        dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
             attention_resolutions=[2], channel_mult=[1, 2], num_heads=2, pool="spatial_v2", resblock_updown=True),
        lambda m: m(_images(), _steps()),
    ),
    "pixel_unet": (
        "ldm.modules.diffusionmodules.model.Model",
        dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=[8], in_channels=3, resolution=16),
        lambda m: m(_images(), _steps()),
    ),
    "linear_attention_encoder": (
        "ldm.modules.diffusionmodules.model.Encoder",
        {**TINY_DDCONFIG, "use_linear_attn": True},
        lambda m: m(_images()),
    ),
    "vq_interface_decode": (
        "ldm.models.autoencoder.VQModelInterface",
        dict(embed_dim=3, n_embed=16, ddconfig=TINY_DDCONFIG, lossconfig=IDENTITY),
        lambda m: m.decode(m.encode(_images())),
    ),
    "merged_rescale_encoder": (
        "ldm.modules.diffusionmodules.model.MergedRescaleEncoder",
        dict(in_channels=3, ch=32, resolution=16, out_ch=8, num_res_blocks=1, attn_resolutions=[], ch_mult=(1, 2),
             rescale_factor=0.5),
        lambda m: m(_images()),
    ),
    "upsampler": (
        "ldm.modules.diffusionmodules.model.Upsampler",
        dict(in_size=8, out_size=16, in_channels=32, out_channels=3),
        lambda m: m(_images(channels=32, size=8)),
    ),
    "spatial_self_attention": (
        "ldm.modules.attention.SpatialSelfAttention",
        dict(in_channels=32),
        lambda m: m(_images(channels=32, size=4)),
    ),
}


def _build(target: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    from ldm.util import instantiate_from_config

    torch.manual_seed(0)
    return instantiate_from_config({"target": target, "params": kwargs}).eval()


def reference(path: Path) -> None:
    results = {}
    for name, (target, kwargs, run) in CASES.items():
        module = _build(target, kwargs)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in module.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
            results[name] = ({k: v.clone() for k, v in module.state_dict().items()}, run(module))
    torch.save(results, path)


def compare(path: Path) -> dict[str, float]:
    """Largest |CompVis - ours| output difference per case (ours built here, CompVis's weights loaded)."""
    results = torch.load(path, weights_only=True)
    differences = {}
    for name, (target, kwargs, run) in CASES.items():
        state_dict, expected = results[name]
        module = _build(target, kwargs)
        module.load_state_dict(state_dict, strict=True)
        with torch.no_grad():
            differences[name] = float((run(module) - expected).abs().max())
    return differences


if __name__ == "__main__":
    sys.path.insert(0, str(Path.cwd()))
    reference(Path(sys.argv[1]))
