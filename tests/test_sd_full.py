"""Full-size SD v1 (configs/stable-diffusion/v1-inference.yaml, random weights) through the whole path:
checkpoint -> erasure.load_model -> one SepCE step -> increment file -> compose -> diffusers export ->
the exported UNet computes what ours computes -> StableDiffusionPipeline loads the folder.

Nothing comes from the Hugging Face Hub: the text encoder's directory holds CLIP ViT-L/14's text
config (the architecture SD v1 uses) and a small character-level tokenizer (tests/tiny_clip.py),
which a model with random weights needs no more than. Run it alone (``-m slow -k sd_full``): it
holds about 10 GiB and asserts that the process never exceeds MAX_RSS_GIB.
"""

from __future__ import annotations

import gc
import resource
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import V1_INFERENCE_CONFIG, perturb_zero_init
from diffusers import StableDiffusionPipeline
from omegaconf import OmegaConf
from safetensors.torch import save_file
from tiny_clip import write_tiny_clip
from transformers import CLIPTextConfig

from erasure.convert import export_diffusers
from erasure.edits import load_edit
from erasure.increments import compose, cross_attention_kv
from erasure.loading import load_model
from erasure.settings import SepCESettings
from erasure.training import train_sepce
from ldm.util import instantiate_from_config

SD_V1_UNET_PARAMS = 859_520_964
MAX_RSS_GIB = 16
TOLERANCE = 1e-4
CONCEPT = "van gogh"
#: The text model of openai/clip-vit-large-patch14 (its config.json), SD v1's text encoder.
CLIP_L_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
#: One cross-attention key projection, to see the increment folded into the exported weights.
KEY_LAYER = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
DIFFUSERS_KEY_LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


def peak_rss_gib() -> float:
    """Peak resident memory of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def write_sd_text_encoder(folder: Path) -> Path:
    """A local text-encoder directory: CLIP ViT-L/14's text config and a tiny offline tokenizer (77 tokens)."""
    write_tiny_clip(folder, max_length=77, with_weights=False)
    tiny = CLIPTextConfig.from_pretrained(folder)
    ids = {key: getattr(tiny, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    CLIPTextConfig(**CLIP_L_TEXT, **ids).save_pretrained(folder)
    return folder


def write_random_sd_checkpoint(folder: Path) -> tuple[Path, Path]:
    """v1-inference.yaml (text encoder pointed at a local directory) and a random full-size checkpoint."""
    config = OmegaConf.load(V1_INFERENCE_CONFIG)
    config.model.params.cond_stage_config.params = {"version": str(write_sd_text_encoder(folder / "clip-l"))}
    config_path = folder / "v1-inference-local.yaml"
    OmegaConf.save(config, config_path)
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    assert sum(p.numel() for p in model.model.diffusion_model.parameters()) == SD_V1_UNET_PARAMS
    perturb_zero_init(model, seed=0)  # zero-initialised output layers would make every UNet output 0
    ckpt_path = folder / "sd-v1-random.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, ckpt_path)
    return config_path, ckpt_path


@pytest.mark.slow
def test_sd_full_size_erasure_export_and_pipeline(tmp_path: Path) -> None:
    started = time.perf_counter()
    config_path, ckpt_path = write_random_sd_checkpoint(tmp_path)
    gc.collect()  # the checkpoint's model is gone before the loader builds its own
    model = load_model(config_path, ckpt_path, verbose=False)
    assert sum(p.numel() for p in model.model.diffusion_model.parameters()) == SD_V1_UNET_PARAMS

    image = torch.randint(0, 256, (1, 3, 512, 512), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    settings = SepCESettings(iterations=1, num_images=1, save_every=0, progress=False)
    [increment] = train_sepce(model, [CONCEPT], settings=settings, images={CONCEPT: image})
    assert increment.concept == CONCEPT and increment.basis.dims >= settings.min_dims
    assert all(coeffs.abs().sum() > 0 for coeffs in increment.coeffs.values())
    increment_file = increment.save(tmp_path / "van-gogh.safetensors")

    base_key = cross_attention_kv(model)[KEY_LAYER].weight.detach().clone()
    compose(model, [load_edit(increment_file)])
    layer = cross_attention_kv(model)[KEY_LAYER]
    erased_key = (layer.weight + layer.delta_weight(layer.active_names)).detach()
    assert not torch.equal(erased_key, base_key)
    folder = export_diffusers(model, tmp_path / "sd-v1-van-gogh-erased")

    pipeline = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    unet = pipeline.unet.eval()
    torch.testing.assert_close(unet.state_dict()[DIFFUSERS_KEY_LAYER], erased_key, rtol=0, atol=0)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn((1, 4, 64, 64), generator=generator)
    context = torch.randn((1, 77, 768), generator=generator)
    timesteps = torch.tensor([500])
    with torch.no_grad():
        theirs = unet(latents, timesteps, encoder_hidden_states=context).sample
        ours = model.apply_model(latents, timesteps, context)
    gap = (theirs - ours).abs().max().item()
    assert ours.abs().max() > 1e-2, "the random UNet should not output zeros"
    assert gap <= TOLERANCE, f"exported UNet differs from ours by {gap:.2e}"
    seconds = time.perf_counter() - started
    peak = peak_rss_gib()
    print(f"sd_full: {seconds:.0f} s, peak RSS {peak:.2f} GiB, UNet gap {gap:.2e}, basis {increment.basis.dims} dims")
    assert peak <= MAX_RSS_GIB, f"peak memory {peak:.2f} GiB exceeds {MAX_RSS_GIB} GiB"
