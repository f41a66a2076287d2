"""The ldm UNet against diffusers' UNet2DConditionModel (an independent oracle), plus its helpers.

Tiny models with random weights (every zero-initialised layer perturbed) are converted with
diffusers' own converter for original checkpoints and must compute the same function.
The full SD v1 UNet is only built on the meta device (shapes, keys, parameter count).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
from omegaconf import OmegaConf
from torch import nn

from ldm.modules.attention import LinearAttention
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import (
    checkpoint,
    make_beta_schedule,
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
    timestep_embedding,
)
from ldm.modules.ema import LitEma
from ldm.modules.incremental_linear import IncrementalLinear, incremental_linears, increments_disabled
from ldm.util import instantiate_from_config

UNET_KEY = "model.diffusion_model."

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SD_V1_CONFIG = CONFIGS / "stable-diffusion" / "v1-inference.yaml"
SD_V1_PARAMS = 859_520_964
# The UNet of diffusers' CompVis/stable-diffusion-v1-4 (unet/config.json; other fields default).
SD14_DIFFUSERS_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
# Same pattern as SD v1 (attention on all but the coarsest level), 32/64/64 channels.
TINY_UNET = dict(
    image_size=16, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
    num_res_blocks=2, channel_mult=[1, 2, 2], num_heads=2, use_spatial_transformer=True,
    transformer_depth=1, context_dim=32, use_checkpoint=True, legacy=False,
)
# Class labels, scale-shift norm, two transformer layers, heads from num_head_channels.
TINY_VARIANT = {
    **TINY_UNET, "num_classes": 5, "use_scale_shift_norm": True, "transformer_depth": 2,
    "num_heads": -1, "num_head_channels": 16,
}


def perturbed_unet(params: dict[str, Any], seed: int = 0) -> UNetModel:
    """A UNet whose every parameter carries noise, so zero-initialised layers cannot hide wiring."""
    torch.manual_seed(seed)
    model = UNetModel(**params).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def diffusers_twin(model: UNetModel, params: dict[str, Any]) -> UNet2DConditionModel:
    """The same weights in diffusers, via diffusers' converter and config derivation."""
    checkpoint_dict = {UNET_KEY + k: v for k, v in model.state_dict().items()}
    original_config = {"model": {"params": {
        "unet_config": {"params": params},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
    }}}
    config = create_unet_diffusers_config_from_ldm(original_config, checkpoint_dict)
    if params.get("num_head_channels", -1) != -1:  # diffusers' "attention_head_dim" counts heads here
        config["attention_head_dim"] = [params["model_channels"] * m // params["num_head_channels"]
                                        for m in params["channel_mult"]]
    if params.get("use_scale_shift_norm"):
        config["resnet_time_scale_shift"] = "scale_shift"
    converted = convert_ldm_unet_checkpoint(checkpoint_dict, config)
    twin = UNet2DConditionModel(**config).eval()
    missing, unexpected = twin.load_state_dict(converted, strict=False)
    assert missing == [] and unexpected == []
    return twin


def random_inputs(params: dict[str, Any], batch: int = 2, size: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "x": torch.randn(batch, params["in_channels"], size, size, generator=generator),
        "timesteps": torch.tensor([3, 777, 500][:batch]),
        "context": torch.randn(batch, 7, params["context_dim"], generator=generator),
    }
    if params.get("num_classes"):
        inputs["y"] = torch.tensor([4, 0, 2][:batch])
    return inputs


@pytest.mark.parametrize("params", [TINY_UNET, TINY_VARIANT], ids=["sd-v1-pattern", "variant"])
def test_tiny_unet_matches_diffusers(params: dict[str, Any]) -> None:
    model = perturbed_unet(params)
    twin = diffusers_twin(model, params)
    inputs = random_inputs(params)
    with torch.no_grad():
        ours = model(**inputs)
        theirs = twin(
            inputs["x"], inputs["timesteps"], encoder_hidden_states=inputs["context"], class_labels=inputs.get("y")
        ).sample
    max_abs_diff = (ours - theirs).abs().max().item()
    print(f"max abs diff vs diffusers ({'variant' if params is TINY_VARIANT else 'sd-v1-pattern'}): {max_abs_diff:.3g}")
    assert ours.shape == inputs["x"].shape
    assert ours.abs().mean() > 1e-2
    assert max_abs_diff <= 1e-4


def test_sd_v1_unet_size_and_keys_convert_exactly() -> None:
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load(SD_V1_CONFIG).model.params.unet_config)
        reference = UNet2DConditionModel(**SD14_DIFFUSERS_UNET)
    assert sum(p.numel() for p in model.parameters()) == SD_V1_PARAMS
    state = model.state_dict()
    assert state["input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].shape == (640, 768)
    assert len(incremental_linears(model)) == 32
    assert all(".attn2.to_" in name for name in incremental_linears(model))

    converted = convert_ldm_unet_checkpoint({UNET_KEY + k: v for k, v in state.items()}, SD14_DIFFUSERS_UNET)
    expected = reference.state_dict()
    assert sorted(set(expected) - set(converted)) == []
    assert sorted(set(converted) - set(expected)) == []
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}


UNET_CONFIGS = {
    str(path.relative_to(CONFIGS)): unet_config
    for path in sorted(CONFIGS.rglob("*.yaml"))
    if (unet_config := OmegaConf.select(OmegaConf.load(path), "model.params.unet_config")) is not None
}


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_project_unet_configs_build(name: str) -> None:
    with torch.device("meta"):
        model = instantiate_from_config(UNET_CONFIGS[name])
    assert isinstance(model, UNetModel) and len(incremental_linears(model)) > 0


def test_attn2_increments_change_the_output_and_switch_off() -> None:
    model = perturbed_unet(TINY_UNET)
    inputs = random_inputs(TINY_UNET)
    with torch.no_grad():
        base = model(**inputs)
        for layer in incremental_linears(model).values():
            layer.add_increment("c", torch.randn(4, 32), beta=1.0, coeff=torch.randn(layer.out_features, 4))
        erased = model(**inputs)
        with increments_disabled(model):
            disabled = model(**inputs)
    assert (erased - base).abs().max() > 1e-3
    assert torch.equal(disabled, base)


def test_checkpointing_works_with_partly_frozen_blocks_and_keeps_gradients() -> None:
    grads = {}
    for use_checkpoint in (True, False):
        model = perturbed_unet({**TINY_UNET, "use_checkpoint": use_checkpoint}).train()
        model.requires_grad_(False)
        to_k = model.input_blocks[1][1].transformer_blocks[0].attn2.to_k
        assert isinstance(to_k, IncrementalLinear)
        torch.manual_seed(3)
        coeff = to_k.add_increment("c", torch.randn(4, 32), beta=1.0)
        model(**random_inputs(TINY_UNET)).square().mean().backward()
        grads[use_checkpoint] = coeff.grad
    assert grads[True].abs().sum() > 0
    torch.testing.assert_close(grads[True], grads[False])


def test_forward_follows_the_module_dtype_and_resblock_updown_runs() -> None:
    model = perturbed_unet(TINY_UNET)
    inputs = random_inputs(TINY_UNET)
    with torch.no_grad():
        reference = model(**inputs)
        low = model.to(torch.bfloat16)(**inputs)
    assert low.dtype == torch.float32
    assert (low - reference).abs().max() < 0.1 * reference.abs().max()

    updown = perturbed_unet({**TINY_UNET, "resblock_updown": True})
    assert updown.input_blocks[3][0].__class__.__name__ == "ResBlock" and updown.input_blocks[3][0].updown
    with torch.no_grad():
        assert updown(**inputs).shape == inputs["x"].shape


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"dims": 3}, "dims"),
        ({"context_dim": None}, "context_dim"),
        ({"use_spatial_transformer": False}, "use_spatial_transformer"),
        ({"num_heads": -1}, "num_heads"),
    ],
)
def test_inconsistent_options_are_named(override: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNetModel(**{**TINY_UNET, **override})


def test_bad_inputs_raise_clear_errors() -> None:
    model = UNetModel(**TINY_UNET)
    good = random_inputs(TINY_UNET)
    cases = [
        ({"context": None}, "context"),
        ({"context": torch.randn(2, 7, 16)}, "context"),
        ({"x": torch.randn(2, 4, 10, 10)}, "multiples of 4"),
        ({"timesteps": torch.tensor(5)}, "timesteps"),
        ({"y": torch.tensor([1, 2])}, "class labels"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            model(**{**good, **change})


def test_schedules_match_diffusers_and_ddim_steps() -> None:
    scaled = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).betas
    ours = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    assert ours.dtype == np.float64 and ours[0] == pytest.approx(0.00085) and ours[-1] == pytest.approx(0.012)
    np.testing.assert_allclose(ours, scaled.numpy(), rtol=1e-6)
    cosine = DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas
    np.testing.assert_allclose(make_beta_schedule("cosine", 1000), cosine.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(make_beta_schedule("sqrt_linear", 4, 0.1, 0.4), [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="Unknown beta schedule"):
        make_beta_schedule("scaled_linear", 10)

    steps = make_ddim_timesteps("uniform", 50, 1000, verbose=False)
    np.testing.assert_array_equal(steps, np.arange(0, 1000, 20) + 1)
    alphas_cumprod = torch.cumprod(1 - torch.as_tensor(ours, dtype=torch.float32), dim=0)
    sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(alphas_cumprod, steps, eta=0.0, verbose=False)
    assert torch.equal(sigmas, torch.zeros(50)) and alphas[0] == alphas_cumprod[1] and alphas[1] == alphas_cumprod[21]
    assert alphas_prev[0] == alphas_cumprod[0] and alphas_prev[1] == alphas_cumprod[1]
    sigmas, *_ = make_ddim_sampling_parameters(alphas_cumprod.numpy(), steps, eta=1.0, verbose=False)
    assert isinstance(sigmas, np.ndarray) and (sigmas > 0).all()


def test_timestep_embedding_is_cos_then_sin() -> None:
    emb = timestep_embedding(torch.tensor([0, 10]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(10 * freqs), torch.sin(10 * freqs)]))
    assert timestep_embedding(torch.tensor([1, 2]), 7).shape == (2, 7)


def test_checkpoint_helper_only_recomputes_under_grad() -> None:
    calls = []

    def square(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x * x

    x = torch.full((3,), 3.0, requires_grad=True)
    checkpoint(square, (x,), [], True).sum().backward()
    assert len(calls) == 2 and torch.equal(x.grad, torch.full((3,), 6.0))
    checkpoint(square, (x,), [], False).sum().backward()
    with torch.no_grad():
        checkpoint(square, (x,), [], True)
    assert len(calls) == 4


def test_lit_ema_names_update_and_swap() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 1)))
    model[0].bias.requires_grad_(False)
    ema = LitEma(model, decay=0.9)
    assert set(dict(ema.named_buffers())) == {"decay", "num_updates", "0weight", "10weight", "10bias"}
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema(model)
    decay = min(0.9, 2 / 11)
    torch.testing.assert_close(ema.get_buffer("0weight"), start + (1 - decay) * 1.0)
    assert int(ema.num_updates) == 1

    trained = [p.detach().clone() for p in model.parameters()]
    ema.store(model.parameters())
    ema.copy_to(model)
    assert torch.equal(model[0].weight, ema.get_buffer("0weight"))
    ema.restore(model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(trained, model.parameters()))

    model[0].bias.requires_grad_(True)
    with pytest.raises(KeyError, match="no EMA shadow"):
        ema(model)


def test_linear_attention_is_equivariant_to_pixel_order() -> None:
    torch.manual_seed(0)
    attention = LinearAttention(dim=8, heads=2, dim_head=4)
    assert set(attention.state_dict()) == {"to_qkv.weight", "to_out.weight", "to_out.bias"}
    x = torch.randn(2, 8, 3, 5)
    permutation = torch.randperm(15)
    shuffled = x.flatten(2)[..., permutation].reshape_as(x)
    expected = attention(x).flatten(2)[..., permutation].reshape_as(x)
    torch.testing.assert_close(attention(shuffled), expected)
