"""CiE (METHOD.md §1) on its own: train every attn2 weight (to_q, to_k, to_v, to_out) for one
concept with the direction loss and an L1 penalty on the weight change.

A step needs four UNet evaluations: the frozen eps(c; W0), eps(""; W0) (original weights
swapped in, no grad) and the trained eps(c; W), eps(""; W) (with grad; unlike SepCE the blank
prompt's prediction does change here). The result is a weight difference file.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning_fabric import Fabric
from torch import nn

from erasure.losses import (
    concept_representation,
    direction_loss,
    l1_regulariser,
    representation_energy,
)
from erasure.trainers.loop import (
    StepLoss,
    predict_eps,
)
from erasure.settings import CiESettings
from erasure.trainers.weights import WeightTrainer, cross_attention_parameters


class CiETrainer(WeightTrainer):
    method = "cie"

    def __init__(
        self,
        model: nn.Module,
        fabric: Fabric,
        concept: str,
        latents: torch.Tensor,
        settings: CiESettings,
    ) -> None:
        super().__init__(model, fabric, concept, cross_attention_parameters(model), settings)
        self.latents = latents.to(fabric.device)
        self.lam = float(settings.lam)

    def run_settings(self) -> dict[str, Any]:
        return {
            **self.base_settings(),
            "images": int(self.latents.shape[0]),
            **self.settings.result_settings(),
        }

    def step_loss(self, generator: torch.Generator, concepts: list[str]) -> StepLoss:
        batch = self.draw_concept_batch(generator, self.latents)
        noisy = self.model.q_sample(batch.latents, batch.timesteps, batch.noise)
        rows = noisy.shape[0]
        inputs = torch.cat([noisy, noisy])
        timesteps = torch.cat([batch.timesteps, batch.timesteps])
        context = torch.cat([self.contexts(self.concept, rows), self.contexts("", rows)])
        with torch.no_grad(), self.original_weights():
            frozen = predict_eps(self.model, inputs, timesteps, context)
        trained = predict_eps(self.model, inputs, timesteps, context)
        r_frozen = concept_representation(*frozen.chunk(2))
        direction = direction_loss(concept_representation(*trained.chunk(2)), r_frozen)
        loss = direction + self.lam * l1_regulariser(self.weight_changes()) if self.lam else direction
        return StepLoss(loss, {self.concept: direction.detach()}, {self.concept: representation_energy(r_frozen)})
