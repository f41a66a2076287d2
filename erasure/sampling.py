"""Seeded text-to-image sampling: every image comes from its own seed.

Each image's start noise (and, with ``eta > 0``, its per-step noise) is drawn from a CPU
``torch.Generator`` seeded with that image's seed, so an image does not depend on which other
images share its batch, on the batch size, on the order of the prompts or on how many
processes share the work. Classifier-free guidance uses the blank prompt "".

Defaults come from the model's config: an optional top-level ``sampling:`` section of the ldm
YAML (keys ``sampler``, ``steps``, ``guidance_scale``, ``eta``; the loader keeps the config as
``model.ldm_config``), else Stable Diffusion v1's DDIM 50 steps at guidance 7.5.
Samplers are looked up by name in ``SAMPLERS``: "ddim" and "lms" (the paper's evaluation
sampler, diffusers' ``LMSDiscreteScheduler`` driven by the model's own output).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import LMSDiscreteScheduler
from PIL import Image
from torch import nn
from tqdm import tqdm

from erasure.files import atomic_path, write_json
from erasure.loading import model_fingerprint
from ldm.models.diffusion.ddim import DDIMSampler

SEEDS_FILE = "seeds.json"
IMAGE_PATTERN = "{index:05d}.png"


@dataclass(frozen=True)
class SamplingSettings:
    """How images are sampled; recorded next to generated images."""

    sampler: str = "ddim"
    steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0

    def validated(self) -> SamplingSettings:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"Unknown sampler {self.sampler!r}; choose one of {sorted(SAMPLERS)}.")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}.")
        if not np.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}.")
        if not np.isfinite(self.eta) or self.eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta!r}.")
        return self


def sampling_settings(
    model: nn.Module,
    sampler: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    eta: float | None = None,
) -> SamplingSettings:
    """Explicit arguments, else the config's ``sampling:`` section, else SD v1 defaults."""
    settings = SamplingSettings()
    config = getattr(model, "ldm_config", None)
    section = config.get("sampling") if config is not None else None
    if section is not None:
        unknown = set(section.keys()) - set(asdict(settings))
        if unknown:
            raise ValueError(
                f"The model config's `sampling:` section has unknown keys {sorted(unknown)}; "
                f"allowed: {sorted(asdict(settings))}."
            )
        settings = replace(settings, **{key: section[key] for key in section.keys()})
    explicit = {"sampler": sampler, "steps": steps, "guidance_scale": guidance_scale, "eta": eta}
    settings = replace(settings, **{key: value for key, value in explicit.items() if value is not None})
    return replace(settings, guidance_scale=float(settings.guidance_scale), eta=float(settings.eta)).validated()


def latent_shape(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the model's latents."""
    return (int(model.channels), int(model.image_size), int(model.image_size))


def seeded_noise(seeds: Sequence[int], shape: Sequence[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Start noise [len(seeds), *shape] (CPU, float32), one generator per seed, and the generators
    (their state has advanced past the start noise)."""
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    noise = torch.stack([torch.randn(tuple(shape), generator=generator) for generator in generators])
    return noise, generators


def _ddim_latents(
    model: nn.Module,
    conditioning: torch.Tensor,
    unconditional: torch.Tensor | None,
    start_noise: torch.Tensor,
    generators: list[torch.Generator],
    settings: SamplingSettings,
) -> torch.Tensor:
    """DDIM from ``start_noise``; with ``eta > 0`` one call per image so each uses its own generator."""
    sampler = DDIMSampler(model)
    device = model.betas.device
    shape = tuple(start_noise.shape[1:])

    def run(rows: slice, generator: torch.Generator | None) -> torch.Tensor:
        latents, _ = sampler.sample(
            S=settings.steps,
            batch_size=start_noise[rows].shape[0],
            shape=shape,
            conditioning=conditioning[rows],
            unconditional_guidance_scale=settings.guidance_scale,
            unconditional_conditioning=None if unconditional is None else unconditional[rows],
            eta=settings.eta,
            x_T=start_noise[rows].to(device),
            generator=generator,
        )
        return latents

    if settings.eta == 0:
        return run(slice(None), None)
    return torch.cat([run(slice(index, index + 1), generator) for index, generator in enumerate(generators)])


#: The LMS scheduler's name for each ldm parameterization (what the model's output means).
LMS_PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _lms_latents(
    model: nn.Module,
    conditioning: torch.Tensor,
    unconditional: torch.Tensor | None,
    start_noise: torch.Tensor,
    generators: list[torch.Generator],
    settings: SamplingSettings,
) -> torch.Tensor:
    """Linear multistep sampling (order 4) as in the ESD / SepCE evaluation pipelines.

    The scheduler is built from the model's own ``betas`` (any schedule), with diffusers'
    default "linspace" timesteps, so the UNet sees fractional timesteps as the diffusers UNet
    did in the paper's evaluation. The scheduler reads "v" and "x0" outputs itself, at the
    exact (interpolated) noise level of each step, so no conversion at integer steps is needed.
    LMS is deterministic: an image depends only on its start noise (``generators`` are unused).
    """
    if settings.eta != 0:
        raise ValueError(f"eta={settings.eta} applies to DDIM only; LMS is deterministic, use eta 0 with it.")
    parameterization = getattr(model, "parameterization", "eps")
    if parameterization not in LMS_PREDICTION_TYPES:
        raise ValueError(
            f"LMS cannot read a {parameterization!r} model output; supported: {sorted(LMS_PREDICTION_TYPES)}."
        )
    scheduler = LMSDiscreteScheduler(
        num_train_timesteps=int(model.num_timesteps),
        trained_betas=model.betas.detach().double().cpu().numpy(),
        prediction_type=LMS_PREDICTION_TYPES[parameterization],
    )
    device = model.betas.device
    scheduler.set_timesteps(settings.steps, device=device)
    latents = start_noise.to(device) * scheduler.init_noise_sigma.to(device)
    guided = unconditional is not None and settings.guidance_scale != 1.0
    context = torch.cat([unconditional, conditioning]) if guided else conditioning
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, timestep)
        if guided:
            model_input = torch.cat([model_input, model_input])
        output = model.apply_model(model_input, timestep.expand(model_input.shape[0]), context)
        if guided:
            output_unconditional, output_conditional = output.chunk(2)
            output = output_unconditional + settings.guidance_scale * (output_conditional - output_unconditional)
        latents = scheduler.step(output, timestep, latents).prev_sample
    return latents


#: name -> function(model, conditioning, unconditional, start_noise, generators, settings) -> latents
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddim": _ddim_latents, "lms": _lms_latents}


def _check_prompts_and_seeds(prompts: Sequence[str], seeds: Sequence[int]) -> None:
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of strings, got the string {prompts!r}; wrap it in a list.")
    if len(prompts) != len(seeds):
        raise ValueError(f"Got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt.")


@torch.no_grad()
def sample_latents(
    model: nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int | None = None,
    guidance_scale: float | None = None,
    eta: float | None = None,
    batch_size: int = 8,
    sampler: str | None = None,
) -> torch.Tensor:
    """Latents [N, C, H, W] for ``prompts[i]`` started from ``seeds[i]``, in input order."""
    _check_prompts_and_seeds(prompts, seeds)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    settings = sampling_settings(model, sampler, steps, guidance_scale, eta)
    sample = SAMPLERS[settings.sampler]
    shape = latent_shape(model)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = list(prompts[start : start + batch_size])
        noise, generators = seeded_noise(seeds[start : start + batch_size], shape)
        conditioning = model.get_learned_conditioning(batch_prompts)
        unconditional = None
        if settings.guidance_scale != 1.0:
            unconditional = model.get_learned_conditioning([""] * len(batch_prompts))
        chunks.append(sample(model, conditioning, unconditional, noise, generators, settings))
    if not chunks:
        return torch.empty(0, *shape, device=model.betas.device)
    return torch.cat(chunks)


@torch.no_grad()
def sample_images(
    model: nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int | None = None,
    guidance_scale: float | None = None,
    eta: float | None = None,
    batch_size: int = 8,
    sampler: str | None = None,
) -> torch.Tensor:
    """Images [N, 3, H, W], float in [0, 1], on the model's device (see ``sample_latents``)."""
    latents = sample_latents(model, prompts, seeds, steps, guidance_scale, eta, batch_size, sampler)
    decoded = [model.decode_first_stage(chunk) for chunk in latents.split(batch_size)]
    if not decoded:
        return latents.new_empty(0, 3, 0, 0)
    return ((torch.cat(decoded).float() + 1.0) / 2.0).clamp(0.0, 1.0)


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write one [3, H, W] (or [1, H, W]) float image in [0, 1] as an 8-bit PNG, atomically."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"save_png expects one image [3, H, W] or [1, H, W], got shape {tuple(image.shape)}.")
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    array = pixels.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG")
    return Path(path)


def _seeds_record(
    model: nn.Module, prompt: str, num_images: int, seed0: int, settings: SamplingSettings
) -> dict:
    return {
        "prompt": prompt,
        "seeds": list(range(seed0, seed0 + num_images)),
        "sampling": asdict(settings),
        "model_fingerprint": model_fingerprint(model),
        "image_pattern": IMAGE_PATTERN,
    }


def _check_existing_record(existing: dict, wanted: dict, seeds_path: Path) -> None:
    """A folder holds images of one prompt, model and sampler setting; refuse to mix."""
    for key in ("prompt", "sampling", "model_fingerprint"):
        if existing.get(key) != wanted[key]:
            raise ValueError(
                f"{seeds_path} records {key}={existing.get(key)!r} but this run uses {wanted[key]!r}; "
                f"the folder holds images made differently. Use another output folder, or delete it "
                f"to regenerate."
            )
    known = existing.get("seeds", [])
    overlap = min(len(known), len(wanted["seeds"]))
    if known[:overlap] != wanted["seeds"][:overlap]:
        raise ValueError(
            f"{seeds_path} records seeds starting at {known[:1]} but this run starts at "
            f"{wanted['seeds'][:1]}; use the same seed0, another folder, or delete the folder."
        )


def generate_concept_images(
    model: nn.Module,
    prompt: str,
    num_images: int,
    out_dir: str | Path,
    seed0: int = 0,
    settings: SamplingSettings | None = None,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> list[Path]:
    """Make ``{out_dir}/{i:05d}.png`` for i < num_images (image i from seed ``seed0 + i``).

    Resumable: images already present are kept and only the missing ones are sampled. The
    folder's ``seeds.json`` records prompt, seeds, sampler settings and the model fingerprint;
    a folder made with another prompt, model or setting is refused. With ``world_size > 1``
    rank r samples the missing images among r, r + world_size, ... (rank 0 writes ``seeds.json``);
    the caller waits for all ranks before reading the folder. Returns the image paths.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}.")
    settings = (settings or sampling_settings(model)).validated()
    out_dir = Path(out_dir)
    seeds_path = out_dir / SEEDS_FILE
    record = _seeds_record(model, prompt, num_images, seed0, settings)
    if seeds_path.is_file():
        existing = json.loads(seeds_path.read_text(encoding="utf-8"))
        _check_existing_record(existing, record, seeds_path)
        if len(existing["seeds"]) > num_images:
            record["seeds"] = existing["seeds"]
    if rank == 0:
        write_json(record, seeds_path)
    paths = [out_dir / IMAGE_PATTERN.format(index=index) for index in range(num_images)]
    # Shard by image index, not by what is missing: ranks look at the folder at different times.
    mine = [index for index in range(rank, num_images, world_size) if not paths[index].is_file()]
    bar = tqdm(total=len(mine), desc=f"images of {prompt!r}", disable=not progress or not mine)
    for start in range(0, len(mine), batch_size):
        indices = mine[start : start + batch_size]
        images = sample_images(
            model,
            [prompt] * len(indices),
            [seed0 + index for index in indices],
            settings.steps,
            settings.guidance_scale,
            settings.eta,
            batch_size,
            settings.sampler,
        )
        for index, image in zip(indices, images):
            save_png(image, paths[index])
        bar.update(len(indices))
    bar.close()
    return paths
