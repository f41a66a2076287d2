"""``DPMSolverSampler``: the DDIM/PLMS-style ``sample`` interface over DPM-Solver++ (CompVis interface).

As in CompVis: second-order multistep DPM-Solver++ on time-uniform steps of the model's discrete
schedule, with lower orders on the final steps, classifier-free guidance from
``unconditional_conditioning``. Unlike CompVis, the schedule stays on the model's device (no
hard-coded CUDA) and "v"/"x0" models are sampled as what they predict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ldm.models.diffusion.sampler_base import Conditioning, check_conditioning_batch, start_latent
from ldm.models.diffusion.dpm_solver.dpm_solver import DPM_Solver, NoiseScheduleVP, model_wrapper

#: LatentDiffusion.parameterization -> model_wrapper's model_type
MODEL_TYPES = {"eps": "noise", "x0": "x_start", "v": "v"}


class DPMSolverSampler:
    """Sample a ``LatentDiffusion`` with DPM-Solver++ (multistep, order 2)."""

    def __init__(self, model: Any, **kwargs: Any) -> None:
        self.model = model
        self.alphas_cumprod = model.alphas_cumprod.detach().to(torch.float32)

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: Sequence[int],
        conditioning: Conditioning | None = None,
        x_T: torch.Tensor | None = None,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Conditioning | None = None,
        verbose: bool = True,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """``S`` model calls (one per step) from noise ``x_T`` (default: drawn) to a latent of
        [batch_size, *shape]. ``eta``, ``verbose`` and the DDIM-only keywords CompVis passes to every
        sampler (``callback``, ``log_every_t``, ...) do not apply to this deterministic solver."""
        check_conditioning_batch(batch_size, conditioning, unconditional_conditioning)
        device = self.model.betas.device
        x = start_latent(x_T, (batch_size, *shape), device, generator)
        parameterization = getattr(self.model, "parameterization", "eps")
        if parameterization not in MODEL_TYPES:
            raise ValueError(f"DPM-Solver cannot sample a model with parameterization {parameterization!r}.")
        schedule = NoiseScheduleVP("discrete", alphas_cumprod=self.alphas_cumprod.to(device))
        model_fn = model_wrapper(
            lambda x_in, t_in, c_in=None: self.model.apply_model(x_in, t_in, c_in),
            schedule,
            model_type=MODEL_TYPES[parameterization],
            guidance_type="classifier-free",
            condition=conditioning,
            unconditional_condition=unconditional_conditioning,
            guidance_scale=unconditional_guidance_scale,
        )
        solver = DPM_Solver(model_fn, schedule, predict_x0=True, thresholding=False)
        samples = solver.sample(x, steps=S, skip_type="time_uniform", method="multistep", order=2, lower_order_final=True)
        return samples.to(device), None
