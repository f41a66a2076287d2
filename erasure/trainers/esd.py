"""ESD baselines (METHOD.md §5): ESD-x trains attn2 (``xattn``), ESD-u (``noxattn``) every UNet
weight except attn2, ``time_embed*`` and ``out.*`` (``erasure.trainers.weights.is_esd_u_parameter``).

    loss = MSE( eps(z_t, c; W),  eps(z_t, ""; W0) - eta * (eps(z_t, c; W0) - eps(z_t, ""; W0)) )

z_t comes from sampling the model being trained (no grad) with DDIM (S = 50 steps, guidance 3)
from seeded noise down to a random DDIM step t_enc in [0, S) (the steps S-1 .. t_enc run). The
UNet's timestep follows ``ESDSettings.timestep``:
- ``reference`` (default, ESD's code): a DDPM index drawn from [t_enc * T / S, (t_enc + 1) * T / S),
  T = 1000, about two DDIM steps (up to 39 DDPM steps) noisier than z_t really is;
- ``noise_level``: the DDPM step whose noise level z_t has (``stopped_at`` of the sampler).
The frozen predictions come from the original weights swapped into the same UNet. ESD has no
stopping rule: it runs ``iterations`` steps (the tracked value is the loss).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning_fabric import Fabric
from torch import nn

from erasure.losses import MomentumStopper
from erasure.samplers import latent_shape
from erasure.trainers.loop import (
    StepLoss,
    predict_eps,
)
from erasure.settings import ESDSettings
from erasure.trainers.weights import (
    WeightTrainer,
    cross_attention_parameters,
    esd_u_parameters,
)
from ldm.models.diffusion.ddim import DDIMSampler

TRAINED_SETS = {"xattn": cross_attention_parameters, "noxattn": esd_u_parameters}


class ESDTrainer(WeightTrainer):
    def __init__(
        self,
        model: nn.Module,
        fabric: Fabric,
        concept: str,
        settings: ESDSettings,
    ) -> None:
        settings.validate()
        self.method = settings.method
        super().__init__(model, fabric, concept, TRAINED_SETS[settings.train_method](model), settings)
        self.ddim_steps = settings.ddim_steps
        self.start_guidance = float(settings.start_guidance)
        self.negative_guidance = float(settings.negative_guidance)
        self.sampler = DDIMSampler(model)
        self.sampler.make_schedule(self.ddim_steps)  # refuses a step count the schedule cannot make, before training

    def make_stopper(self) -> MomentumStopper:
        """No early stop (warm-up = limit): ESD runs all its iterations; the momentum is only reported."""
        return MomentumStopper(self.settings.alpha, 0.0, self.settings.iterations, self.settings.iterations)

    def run_settings(self) -> dict[str, Any]:
        return {
            **self.base_settings(),
            **self.settings.result_settings(),
        }

    def unet_timestep(self, t_enc: int, noise_level: int, generator: torch.Generator) -> int:
        """The DDPM step the UNet is asked about for a partial sample at DDIM step ``t_enc``
        (module docstring: the two conventions)."""
        if self.settings.timestep == "noise_level":
            return noise_level
        steps = self.model.num_timesteps
        low, high = round(t_enc * steps / self.ddim_steps), round((t_enc + 1) * steps / self.ddim_steps)
        return int(torch.randint(low, max(high, low + 1), (1,), generator=generator))

    def step_loss(self, generator: torch.Generator, concepts: list[str]) -> StepLoss:
        shape = latent_shape(self.model)
        start = torch.randn((self.settings.batch_size, *shape), generator=generator)[self.rows]
        t_enc = int(torch.randint(0, self.ddim_steps, (1,), generator=generator))
        rows = start.shape[0]
        device = self.model.betas.device
        concept_context, blank_context = self.contexts(self.concept, rows), self.contexts("", rows)
        noisy, record = self.sampler.sample(
            S=self.ddim_steps,
            batch_size=rows,
            shape=shape,
            conditioning=concept_context,
            unconditional_guidance_scale=self.start_guidance,
            unconditional_conditioning=blank_context,
            x_T=start.to(device),
            till_T=self.ddim_steps - t_enc,
        )
        timesteps = torch.full((rows,), self.unet_timestep(t_enc, record["stopped_at"], generator), device=device,
                               dtype=torch.long)
        with torch.no_grad(), self.original_weights():
            frozen_concept, frozen_blank = predict_eps(
                self.model,
                torch.cat([noisy, noisy]),
                torch.cat([timesteps, timesteps]),
                torch.cat([concept_context, blank_context]),
            ).chunk(2)
        target = frozen_blank - self.negative_guidance * (frozen_concept - frozen_blank)
        trained = predict_eps(self.model, noisy, timesteps, concept_context)
        loss = F.mse_loss(trained, target)
        return StepLoss(loss, {self.concept: loss.detach()})
