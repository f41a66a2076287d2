"""The samplers: seeded DDIM and LMS as small functions of (model, conditioning, start noise, settings).

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

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from diffusers import LMSDiscreteScheduler
from torch import nn

from ldm.models.diffusion.ddim import DDIMSampler

from erasure.errors import SamplingError


@dataclass(frozen=True)
class SamplingSettings:
    """How images are sampled; recorded next to generated images."""

    sampler: str = "ddim"
    steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0

    def validated(self) -> SamplingSettings:
        if self.sampler not in SAMPLERS:
            raise SamplingError(f"Unknown sampler {self.sampler!r}; choose one of {sorted(SAMPLERS)}.")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise SamplingError(f"steps must be a positive integer, got {self.steps!r}.")
        if not np.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise SamplingError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}.")
        if not np.isfinite(self.eta) or self.eta < 0:
            raise SamplingError(f"eta must be a finite number >= 0, got {self.eta!r}.")
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
            raise SamplingError(
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
        raise SamplingError(f"eta={settings.eta} applies to DDIM only; LMS is deterministic, use eta 0 with it.")
    parameterization = getattr(model, "parameterization", "eps")
    if parameterization not in LMS_PREDICTION_TYPES:
        raise SamplingError(
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
