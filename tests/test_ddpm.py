"""DDPM / LatentDiffusion: schedule, parameterization algebra, the SD v1 config, the tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import V1_INFERENCE_CONFIG, tiny_model_config
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import count_params, instantiate_from_config
from tiny_clip import write_tiny_clip

SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
}
SD_V1_UNET_PARAMS = 859_520_964


def _image_batch(batch_size: int = 2, pixels: int = 16) -> dict:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(batch_size, pixels, pixels, 3, generator=generator) * 2 - 1
    return {"jpg": images, "txt": ["a red square", "the blue circle"][:batch_size]}


# --------------------------------------------------------------------------- ldm.util
def test_instantiate_from_config_errors_name_the_problem() -> None:
    with pytest.raises(KeyError, match="`target`"):
        instantiate_from_config({"params": {"in_features": 2}})
    with pytest.raises(ImportError, match="torch.nn.NoSuchLayer"):
        instantiate_from_config({"target": "torch.nn.NoSuchLayer"})
    with pytest.raises(ImportError, match="no_such_package.Model"):
        instantiate_from_config({"target": "no_such_package.Model"})
    assert instantiate_from_config("__is_unconditional__") is None
    layer = instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 2, "out_features": 3}})
    assert isinstance(layer, torch.nn.Linear) and layer.out_features == 3


# --------------------------------------------------------------------------- schedule
def test_schedule_is_scaled_linear_and_matches_sd_v1(tiny_model: LatentDiffusion) -> None:
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    assert tiny_model.num_timesteps == 1000
    np.testing.assert_allclose(tiny_model.betas.numpy(), betas, rtol=1e-6)
    np.testing.assert_allclose(tiny_model.alphas_cumprod.numpy(), alphas_cumprod, rtol=1e-6)
    np.testing.assert_allclose(tiny_model.alphas_cumprod_prev.numpy()[1:], alphas_cumprod[:-1], rtol=1e-6)
    assert tiny_model.alphas_cumprod_prev[0].item() == 1.0
    # The SD v1 numbers, and diffusers' scaled_linear scheduler as an independent oracle.
    assert tiny_model.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-7)
    assert tiny_model.alphas_cumprod[-1].item() == pytest.approx(0.0046601, abs=1e-6)
    from diffusers import DDIMScheduler

    oracle = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(tiny_model.alphas_cumprod, oracle.alphas_cumprod, rtol=2e-5, atol=0)
    posterior_variance = betas[1:] * (1 - alphas_cumprod[:-1]) / (1 - alphas_cumprod[1:])
    np.testing.assert_allclose(tiny_model.posterior_variance.numpy()[1:], posterior_variance, rtol=1e-5)
    assert torch.isfinite(tiny_model.lvlb_weights).all()


def test_state_dict_holds_exactly_the_compvis_schedule_buffers(tiny_model: LatentDiffusion) -> None:
    top_level = {key for key in tiny_model.state_dict() if "." not in key}
    assert top_level == SCHEDULE_BUFFERS
    prefixes = {key.split(".")[0] for key in tiny_model.state_dict() if "." in key}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}


def test_parameterization_conversions_are_consistent_inverses(tiny_model: LatentDiffusion) -> None:
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=generator)
    noise = torch.randn(6, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    x_t = tiny_model.q_sample(x0, t, noise)
    abar = tiny_model.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    v = tiny_model.get_v(x0, noise, t)
    torch.testing.assert_close(tiny_model.predict_eps_from_z_and_v(x_t, t, v), noise, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny_model.predict_start_from_z_and_v(x_t, t, v), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny_model.predict_start_from_noise(x_t, t, noise), x0, atol=2e-4, rtol=1e-4)
    # The posterior mean interpolates x0 and x_t; at t=0 it is x0 itself.
    mean, variance, _ = tiny_model.q_posterior(x0, x_t, t)
    torch.testing.assert_close(mean[0], x0[0], atol=1e-6, rtol=0)
    assert variance.shape == (6, 1, 1, 1) and variance[0].item() == 0.0


# --------------------------------------------------------------------------- the SD v1 config
def test_v1_inference_config_builds_the_sd_v1_layout_on_meta(tmp_path: Path) -> None:
    config = OmegaConf.load(V1_INFERENCE_CONFIG).model
    assert config.target == "ldm.models.diffusion.ddpm.LatentDiffusion"
    assert config.params.scale_factor == pytest.approx(0.18215) and config.params.use_ema is False
    # The hub CLIP is replaced by a config-only local CLIP of the same width (no download).
    clip_dir = write_tiny_clip(tmp_path / "clip768", hidden=768, layers=1, heads=12, max_length=77,
                               with_weights=False)
    config.params.cond_stage_config.params = {"version": str(clip_dir), "device": "meta"}
    with torch.device("meta"):
        model = instantiate_from_config(config)
    assert count_params(model.model.diffusion_model) == SD_V1_UNET_PARAMS
    assert model.num_timesteps == 1000 and model.parameterization == "eps"
    assert model.model.conditioning_key == "crossattn" and model.scale_factor == pytest.approx(0.18215)
    state = model.state_dict()
    assert {key for key in state if "." not in key} == SCHEDULE_BUFFERS
    assert state["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].shape == (640, 768)
    assert all(key.startswith("cond_stage_model.transformer.") for key in state if key.startswith("cond_stage"))
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())
    assert not any(p.requires_grad for p in model.cond_stage_model.parameters())


# --------------------------------------------------------------------------- the tiny model
def test_tiny_model_conditioning_and_first_stage_shapes(tiny_model: LatentDiffusion) -> None:
    context = tiny_model.get_learned_conditioning(["a red square", ""])
    assert context.shape == (2, 16, 32)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = tiny_model.encode_first_stage(images)
    z = tiny_model.get_first_stage_encoding(posterior)
    assert z.shape == (2, 4, 8, 8)
    latent = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(tiny_model.get_first_stage_encoding(latent), latent * 0.18215)
    decoded = tiny_model.decode_first_stage(z)
    assert decoded.shape == (2, 3, 16, 16) and not decoded.requires_grad
    z.requires_grad_(True)
    tiny_model.differentiable_decode_first_stage(z).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="DiagonalGaussianDistribution"):
        tiny_model.get_first_stage_encoding([latent])


def test_apply_model_accepts_tensor_list_and_dict_conditioning(tiny_model: LatentDiffusion) -> None:
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    context = tiny_model.get_learned_conditioning(["a cat", "a dog"])
    with torch.no_grad():
        from_tensor = tiny_model.apply_model(x, t, context)
        from_list = tiny_model.apply_model(x, t, [context])
        from_dict = tiny_model.apply_model(x, t, {"c_crossattn": [context]})
        other_prompt = tiny_model.apply_model(x, t, tiny_model.get_learned_conditioning(["a cat", "a fish"]))
    assert from_tensor.shape == x.shape
    torch.testing.assert_close(from_list, from_tensor)
    torch.testing.assert_close(from_dict, from_tensor)
    torch.testing.assert_close(other_prompt[0], from_tensor[0])
    assert not torch.allclose(other_prompt[1], from_tensor[1])


def test_training_step_gives_finite_loss_and_unet_gradients(tiny_model: LatentDiffusion) -> None:
    tiny_model.train()
    assert not tiny_model.first_stage_model.training and not tiny_model.cond_stage_model.training
    torch.manual_seed(0)
    loss = tiny_model.training_step(_image_batch(), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    unet_grads = [p.grad for p in tiny_model.model.diffusion_model.parameters() if p.grad is not None]
    assert unet_grads and sum(g.abs().sum() for g in unet_grads) > 0
    assert all(p.grad is None for p in tiny_model.first_stage_model.parameters())
    assert all(p.grad is None for p in tiny_model.cond_stage_model.parameters())


def test_v_parameterization_trains_on_the_velocity(tiny_model: LatentDiffusion) -> None:
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 700])
    context = tiny_model.get_learned_conditioning(["a", "b"])
    with torch.no_grad():
        output = tiny_model.apply_model(tiny_model.q_sample(x0, t, noise), t, context)
        tiny_model.parameterization = "v"
        loss, logs = tiny_model.p_losses(x0, context, t, noise=noise)
    expected = (output - tiny_model.get_v(x0, noise, t)).pow(2).mean()
    torch.testing.assert_close(loss, expected)
    assert set(logs) == {"val/loss_simple", "val/loss_vlb", "val/loss"}


def test_configure_optimizers_uses_only_trainable_unet_parameters(tiny_model: LatentDiffusion) -> None:
    with pytest.raises(AttributeError, match="learning_rate"):
        tiny_model.configure_optimizers()
    tiny_model.learning_rate = 1e-4
    frozen = tiny_model.model.diffusion_model.out[2].weight
    frozen.requires_grad_(False)
    optimizer = tiny_model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["lr"] == 1e-4
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    unet = {id(p) for p in tiny_model.model.diffusion_model.parameters() if p.requires_grad}
    assert optimized == unet and id(frozen) not in optimized


@pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning")
@pytest.mark.filterwarnings("ignore:.*(no logger configured|eval mode|val_dataloader|LeafSpec).*")
def test_lightning_trainer_runs_one_training_step(tiny_model: LatentDiffusion) -> None:
    tiny_model.learning_rate = 1e-3
    before = tiny_model.model.diffusion_model.out[2].weight.detach().clone()
    loader = torch.utils.data.DataLoader([{k: v[0] for k, v in _image_batch(1).items()}] * 2, batch_size=2)
    trainer = pl.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(tiny_model.train(), train_dataloaders=loader)
    assert set(trainer.logged_metrics) >= {"train/loss_simple_step", "train/loss_step"}
    assert not torch.equal(before, tiny_model.model.diffusion_model.out[2].weight)


def test_ema_scope_swaps_weights_in_and_out(tiny_clip_dir: Path) -> None:
    config = tiny_model_config(tiny_clip_dir)
    config.params.use_ema = True
    model = instantiate_from_config(config)
    weight = model.model.diffusion_model.out[2].weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    with model.ema_scope():
        torch.testing.assert_close(weight, original)
    torch.testing.assert_close(weight, original + 1.0)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_init_from_ckpt_restores_weights(tiny_model: LatentDiffusion, tiny_clip_dir: Path, tmp_path: Path,
                                         suffix: str) -> None:
    state = {key: value.contiguous() for key, value in tiny_model.state_dict().items()}
    state["logvar"] = torch.full((1000,), 0.5)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 7}, path)
    torch.manual_seed(123)
    fresh = instantiate_from_config(tiny_model_config(tiny_clip_dir))
    missing, unexpected = fresh.init_from_ckpt(path, ignore_keys=("first_stage_model.",))
    assert unexpected == []
    assert missing and all(key.startswith("first_stage_model.") for key in missing)
    torch.testing.assert_close(fresh.logvar, torch.full((1000,), 0.5))
    for key, value in fresh.model.state_dict().items():
        torch.testing.assert_close(value, tiny_model.model.state_dict()[key])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fresh.init_from_ckpt(tmp_path / "missing.ckpt")


def test_scale_by_std_sets_unit_latent_std_on_the_first_batch(tiny_clip_dir: Path) -> None:
    config = tiny_model_config(tiny_clip_dir)
    config.params.scale_by_std = True
    config.params.scale_factor = 1.0
    model = instantiate_from_config(config)
    batch = _image_batch()
    model.on_train_batch_start(batch, 1)
    assert model.scale_factor.item() == 1.0
    model.on_train_batch_start(batch, 0)
    assert model.scale_factor.item() != 1.0 and "scale_factor" in model.state_dict()
    z, _ = model.get_input(batch, "jpg")
    assert z.std().item() == pytest.approx(1.0, rel=0.2)
