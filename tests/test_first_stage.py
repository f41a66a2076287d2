"""KL autoencoder against diffusers' AutoencoderKL (an independent oracle), its checkpoint
loading, the Gaussian posterior, and the parameter-free first stages."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    create_vae_diffusers_config_from_ldm,
)
from safetensors.torch import save_file

from ldm.models.autoencoder import AutoencoderKL, IdentityFirstStage, PixelUnshuffleFirstStage
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution, normal_kl

TOLERANCE = 1e-4
DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 32,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}
LOSSCONFIG = {"target": "torch.nn.Identity"}


def _tiny_autoencoder(**kwargs: object) -> AutoencoderKL:
    return AutoencoderKL(ddconfig=dict(DDCONFIG), lossconfig=LOSSCONFIG, embed_dim=4, **kwargs)


@pytest.fixture(scope="module")
def autoencoder() -> AutoencoderKL:
    """Random weights; every tensor (norm scales of 1, zero biases included) is perturbed so
    that a transposed or misplaced weight cannot go unnoticed."""
    torch.manual_seed(0)
    model = _tiny_autoencoder().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def diffusers_vae(autoencoder: AutoencoderKL) -> DiffusersAutoencoderKL:
    checkpoint = {f"first_stage_model.{key}": value for key, value in autoencoder.state_dict().items()}
    original_config = {
        "model": {
            "params": {
                "scale_factor": 0.18215,
                "first_stage_config": {"params": {"ddconfig": DDCONFIG, "embed_dim": 4}},
            }
        }
    }
    config = create_vae_diffusers_config_from_ldm(original_config, checkpoint)
    vae = DiffusersAutoencoderKL(**config).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    return vae


def test_encoder_moments_match_diffusers(
    autoencoder: AutoencoderKL, diffusers_vae: DiffusersAutoencoderKL
) -> None:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = autoencoder.encode(images)
        theirs = diffusers_vae.encode(images).latent_dist
    assert ours.mean.shape == (2, 4, 16, 16)
    assert (ours.mean - theirs.mean).abs().max().item() <= TOLERANCE
    assert (ours.logvar - theirs.logvar).abs().max().item() <= TOLERANCE


def test_decoder_matches_diffusers(autoencoder: AutoencoderKL, diffusers_vae: DiffusersAutoencoderKL) -> None:
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = autoencoder.decode(latents)
        theirs = diffusers_vae.decode(latents).sample
    assert ours.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().max().item() <= TOLERANCE


def test_compvis_key_names(autoencoder: AutoencoderKL) -> None:
    keys = set(autoencoder.state_dict())
    for key in (
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.mid.attn_1.q.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.up.0.block.1.conv2.bias",
        "decoder.conv_out.weight",
        "quant_conv.weight",
        "post_quant_conv.bias",
    ):
        assert key in keys, key
    assert not any(key.startswith("loss.") for key in keys)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_ckpt_path_loads_first_stage_weights(autoencoder: AutoencoderKL, tmp_path: Path, suffix: str) -> None:
    state = {f"first_stage_model.{k}": v.contiguous() for k, v in autoencoder.state_dict().items()}
    state["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 0}, path)
    loaded = _tiny_autoencoder(ckpt_path=str(path))
    for key, value in autoencoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_ckpt_path_ignore_keys_and_missing_weights(autoencoder: AutoencoderKL, tmp_path: Path) -> None:
    state = {key: value.contiguous() for key, value in autoencoder.state_dict().items()}
    state["loss.logvar"] = torch.zeros(())
    path = tmp_path / "vae.safetensors"
    save_file(state, str(path))
    partial = _tiny_autoencoder(ckpt_path=str(path), ignore_keys=["decoder.conv_out"])
    assert not torch.equal(partial.decoder.conv_out.weight, autoencoder.decoder.conv_out.weight)
    assert torch.equal(partial.decoder.conv_in.weight, autoencoder.decoder.conv_in.weight)

    del state["quant_conv.weight"]
    save_file(state, str(path))
    with pytest.raises(KeyError, match="quant_conv.weight"):
        _tiny_autoencoder(ckpt_path=str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _tiny_autoencoder(ckpt_path=str(tmp_path / "absent.ckpt"))


def test_bad_ddconfig_raises() -> None:
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(ddconfig={**DDCONFIG, "double_z": False}, lossconfig=LOSSCONFIG, embed_dim=4)
    with pytest.raises(ValueError, match="not divisible"):
        AutoencoderKL(ddconfig={**DDCONFIG, "resolution": 33}, lossconfig=LOSSCONFIG, embed_dim=4)
    with pytest.raises(ValueError, match="attn_type"):
        AutoencoderKL(ddconfig={**DDCONFIG, "attn_type": "quadratic"}, lossconfig=LOSSCONFIG, embed_dim=4)


def test_diagonal_gaussian_matches_torch_distributions() -> None:
    generator = torch.Generator().manual_seed(3)
    parameters = torch.randn(2, 8, 3, 3, generator=generator)
    posterior = DiagonalGaussianDistribution(parameters)
    reference = torch.distributions.Normal(posterior.mean, posterior.std)
    standard = torch.distributions.Normal(torch.zeros_like(posterior.mean), torch.ones_like(posterior.mean))
    expected_kl = torch.distributions.kl_divergence(reference, standard).sum(dim=(1, 2, 3))
    assert torch.allclose(posterior.kl(), expected_kl, atol=1e-5)

    other = DiagonalGaussianDistribution(torch.randn(2, 8, 3, 3, generator=generator))
    expected_pair = torch.distributions.kl_divergence(
        reference, torch.distributions.Normal(other.mean, other.std)
    ).sum(dim=(1, 2, 3))
    assert torch.allclose(posterior.kl(other), expected_pair, atol=1e-4)
    elementwise = normal_kl(posterior.mean, posterior.logvar, other.mean, other.logvar)
    assert torch.allclose(posterior.kl(other), elementwise.sum(dim=(1, 2, 3)))

    x = torch.randn(2, 4, 3, 3, generator=generator)
    assert torch.allclose(posterior.nll(x), -reference.log_prob(x).sum(dim=(1, 2, 3)), atol=1e-4)

    first = posterior.sample(torch.Generator().manual_seed(7))
    second = posterior.sample(torch.Generator().manual_seed(7))
    assert torch.equal(first, second) and not torch.equal(first, posterior.mode())


def test_deterministic_posterior_collapses_to_mean() -> None:
    posterior = DiagonalGaussianDistribution(torch.randn(3, 8, 2, 2), deterministic=True)
    assert torch.equal(posterior.sample(), posterior.mode())
    assert torch.equal(posterior.kl(), torch.zeros(3))
    assert torch.equal(posterior.nll(posterior.mean), torch.zeros(3))
    with pytest.raises(ValueError, match="even"):
        DiagonalGaussianDistribution(torch.randn(1, 5, 2, 2))
    assert math.isfinite(DiagonalGaussianDistribution(torch.full((1, 2, 1, 1), -1e4)).var.sum().item())


def test_pixel_unshuffle_first_stage_round_trip_is_exact() -> None:
    stage = PixelUnshuffleFirstStage(factor=2)
    images = torch.rand(5, 3, 32, 32)
    latents = stage.encode(images)
    assert isinstance(latents, torch.Tensor) and latents.shape == (5, 12, 16, 16)
    assert torch.equal(stage.decode(latents), images)
    assert torch.equal(stage(images), images)
    assert len(list(stage.parameters())) == 0 and not stage.state_dict()
    with pytest.raises(ValueError, match="divisible by 2"):
        stage.encode(torch.rand(1, 3, 31, 32))
    with pytest.raises(ValueError, match="positive int"):
        PixelUnshuffleFirstStage(factor=0)


def test_identity_first_stage() -> None:
    x = torch.randn(2, 4, 8, 8)
    stage = IdentityFirstStage()
    assert stage.encode(x) is x and stage.decode(x) is x and stage(x) is x
    assert IdentityFirstStage(vq_interface=True).quantize(x)[0] is x


@pytest.mark.slow
def test_sd_v1_autoencoder_config_matches_diffusers() -> None:
    """The real v1-inference.yaml first stage (83 M parameters) on 64x64 inputs."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    original_config = OmegaConf.to_container(
        OmegaConf.load(Path(__file__).parents[1] / "configs/stable-diffusion/v1-inference.yaml")
    )
    torch.manual_seed(0)
    model = instantiate_from_config(original_config["model"]["params"]["first_stage_config"]).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    checkpoint = {f"first_stage_model.{key}": value for key, value in model.state_dict().items()}
    config = create_vae_diffusers_config_from_ldm(original_config, checkpoint)
    vae = DiffusersAutoencoderKL(**config).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(1, 3, 64, 64, generator=generator)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    with torch.no_grad():
        expected_mean = vae.encode(images).latent_dist.mean
        assert (model.encode(images).mean - expected_mean).abs().max().item() <= TOLERANCE
        assert (model.decode(latents) - vae.decode(latents).sample).abs().max().item() <= TOLERANCE
