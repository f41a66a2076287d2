"""The ESD baseline as ESD's code defines it (METHOD.md §5): which weights ESD-u trains, counted
on SD v1's own UNet config, and the UNet timestep of the partial sample."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning_fabric import Fabric
from omegaconf import OmegaConf
from wide_tiny_model import build_wide_tiny_model, write_wide_tiny_config

from erasure.settings import ESDSettings, SettingsError
from erasure.trainers.esd import ESDTrainer
from erasure.trainers.weights import is_cross_attention, is_esd_u_parameter
from ldm.modules.diffusionmodules.openaimodel import UNetModel

SD_V1_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "stable-diffusion" / "v1-inference.yaml"


def test_esd_u_trains_the_parameters_of_esds_noxattn_on_sd_v1() -> None:
    params = OmegaConf.to_container(OmegaConf.load(SD_V1_CONFIG).model.params.unet_config.params)
    with torch.device("meta"):  # shapes only: no memory, no weights
        unet = UNetModel(**params)
    counts = {"esd_u": 0, "attn2": 0, "left_frozen": 0}
    for name, parameter in unet.named_parameters():
        if is_esd_u_parameter(name):
            counts["esd_u"] += parameter.numel()
        elif is_cross_attention(name):
            counts["attn2"] += parameter.numel()
        else:
            assert name.startswith(("time_embed.", "out.")), name
            counts["left_frozen"] += parameter.numel()
    assert counts == {"esd_u": 813_495_680, "attn2": 43_962_560, "left_frozen": 2_062_724}
    assert sum(counts.values()) == 859_520_964  # SD v1.4's UNet
    trained = ("output_blocks.11.0.out_layers.3.weight", "middle_block.0.emb_layers.1.weight",
               "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight", "input_blocks.1.1.proj_out.bias")
    frozen = ("out.2.weight", "time_embed.0.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    assert all(map(is_esd_u_parameter, trained)) and not any(map(is_esd_u_parameter, frozen))


@pytest.fixture(scope="module")
def trainer_of(tmp_path_factory: pytest.TempPathFactory):
    config = write_wide_tiny_config(tmp_path_factory.mktemp("wide"))
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.launch()

    def make(timestep: str) -> ESDTrainer:
        settings = ESDSettings(lr=1e-3, iterations=1, ddim_steps=50, timestep=timestep, progress=False, save_every=0)
        return ESDTrainer(build_wide_tiny_model(config), fabric, "a red", settings)

    return make


def test_reference_timestep_is_drawn_from_the_ddim_steps_bin(trainer_of) -> None:
    trainer = trainer_of("reference")
    steps = trainer.model.num_timesteps
    generator = torch.Generator().manual_seed(0)
    for t_enc in (0, 1, 17, 49):
        drawn = {trainer.unet_timestep(t_enc, noise_level=-1, generator=generator) for _ in range(200)}
        low, high = round(t_enc * steps / 50), round((t_enc + 1) * steps / 50)
        assert drawn <= set(range(low, high)) and len(drawn) > 1, (t_enc, sorted(drawn))
    assert trainer_of("noise_level").unet_timestep(17, noise_level=321, generator=generator) == 321


def test_esd_timestep_setting_is_checked() -> None:
    assert ESDSettings().timestep == "reference"
    with pytest.raises(SettingsError, match="timestep"):
        ESDSettings(timestep="ddim").validate()
