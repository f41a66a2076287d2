"""DDIM sampler (CompVis ``ldm.models.diffusion.ddim`` interface).

Differences from CompVis, all deliberate:
- the schedule lives on the model's device (no hard-coded CUDA);
- classifier-free guidance evaluates [uncond, cond] in one batched call and "v"/"x0"
  model outputs are converted to eps (as the SD 2.x sampler does for "v");
- ``till_T`` stops after that many steps and returns the partially denoised latent
  (ESD's "sample from noise down to step t"), ``t_start`` starts part-way down the schedule;
- ``generator`` makes the start noise and the eta > 0 noise reproducible;
- ``enable_grad=True`` lets gradients flow through the loop (default: no grad);
- progress bars only with ``verbose=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm

from ldm.models.diffusion.sampler_base import (
    Conditioning,
    ScheduledSampler,
    check_conditioning_batch,
    randn,
    report_step,
    start_latent,
)


class DDIMSampler(ScheduledSampler):
    """Deterministic (eta = 0) or stochastic DDIM sampling of a ``LatentDiffusion`` model."""

    def sample(
        self,
        S: int,
        batch_size: int,
        shape: Sequence[int],
        conditioning: Conditioning | None = None,
        callback: Callable[[int], None] | None = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        eta: float = 0.0,
        x_T: torch.Tensor | None = None,
        verbose: bool = False,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Conditioning | None = None,
        t_start: int | None = None,
        till_T: int | None = None,
        generator: torch.Generator | None = None,
        enable_grad: bool = False,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Sample ``batch_size`` latents of ``shape`` = (C, H, W) with ``S`` DDIM steps.

        ``t_start``: use only the first ``t_start`` (lowest-noise) steps of the schedule, i.e. start
        at DDPM step ``ddim_timesteps[t_start - 1]`` from ``x_T`` (img2img-style). ``till_T``: stop after
        that many steps. ``intermediates["stopped_at"]`` is the DDPM timestep whose noise level the
        returned latent has (0 after a full run).
        """
        check_conditioning_batch(batch_size, conditioning, unconditional_conditioning)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        with torch.set_grad_enabled(enable_grad):
            return self.ddim_sampling(
                conditioning, size, x_T=x_T, callback=callback, img_callback=img_callback,
                log_every_t=log_every_t, unconditional_guidance_scale=unconditional_guidance_scale,
                unconditional_conditioning=unconditional_conditioning, t_start=t_start, till_T=till_T,
                generator=generator, verbose=verbose,
            )

    def ddim_sampling(
        self,
        cond: Conditioning | None,
        shape: Sequence[int],
        x_T: torch.Tensor | None = None,
        callback: Callable[[int], None] | None = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Conditioning | None = None,
        t_start: int | None = None,
        till_T: int | None = None,
        generator: torch.Generator | None = None,
        verbose: bool = False,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The DDIM loop over the schedule made by ``make_schedule`` (see ``sample``)."""
        self._require_schedule()
        device = self.model.betas.device
        total = len(self.ddim_timesteps)
        start = total if t_start is None else t_start
        if not 1 <= start <= total:
            raise ValueError(f"t_start must be in [1, {total}] for {total} DDIM steps, got {t_start}.")
        steps_to_run = start if till_T is None else till_T
        if not 0 <= steps_to_run <= start:
            raise ValueError(f"till_T must be in [0, {start}] (the steps available from the start), got {till_T}.")
        img = start_latent(x_T, shape, device, generator)
        intermediates: dict[str, Any] = {"x_inter": [img], "pred_x0": [img]}
        indices = list(range(start - 1, start - 1 - steps_to_run, -1))
        for i, index in enumerate(tqdm(indices, desc="DDIM Sampler", disable=not verbose)):
            t = torch.full((shape[0],), int(self.ddim_timesteps[index]), device=device, dtype=torch.long)
            img, pred_x0 = self.p_sample_ddim(
                img, cond, t, index=index, unconditional_guidance_scale=unconditional_guidance_scale,
                unconditional_conditioning=unconditional_conditioning, generator=generator,
            )
            report_step(i, index, total, img, pred_x0, intermediates, callback, img_callback, log_every_t)
        last_index = start - steps_to_run
        intermediates["stopped_at"] = int(self.ddim_timesteps[last_index - 1]) if last_index > 0 else 0
        return img, intermediates

    def p_sample_ddim(
        self,
        x: torch.Tensor,
        c: Conditioning | None,
        t: torch.Tensor,
        index: int,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Conditioning | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step from DDIM index ``index``; returns (x_prev, predicted x_0)."""
        e_t = self.model_eps(x, c, t, unconditional_guidance_scale, unconditional_conditioning)
        a_t = self.ddim_alphas[index].to(x.dtype)
        a_prev = self.ddim_alphas_prev[index].to(x.dtype)
        sigma_t = self.ddim_sigmas[index].to(x.dtype)
        sqrt_one_minus_at = self.ddim_sqrt_one_minus_alphas[index].to(x.dtype)
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * e_t
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt
        if self.ddim_eta > 0:
            x_prev = x_prev + sigma_t * randn(x.shape, x.device, generator).to(x.dtype)
        return x_prev, pred_x0

    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor, use_original_steps: bool = False,
                          noise: torch.Tensor | None = None) -> torch.Tensor:
        """Noise ``x0`` to the level of DDIM index ``t`` (one index per sample) of the current
        schedule, or of DDPM step ``t`` with ``use_original_steps``."""
        noise = torch.randn_like(x0) if noise is None else noise
        view = (-1, *[1] * (x0.ndim - 1))
        if use_original_steps:
            alphas_cumprod = self.model.alphas_cumprod.to(x0.device)
            sqrt_alpha, sqrt_one_minus = alphas_cumprod.sqrt()[t], (1.0 - alphas_cumprod).sqrt()[t]
        else:
            self._require_schedule()
            sqrt_alpha, sqrt_one_minus = self.ddim_alphas.sqrt()[t], self.ddim_sqrt_one_minus_alphas[t]
        return sqrt_alpha.view(view).to(x0.dtype) * x0 + sqrt_one_minus.view(view).to(x0.dtype) * noise

    def decode(
        self,
        x_latent: torch.Tensor,
        cond: Conditioning | None,
        t_start: int,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Conditioning | None = None,
        use_original_steps: bool = False,
        verbose: bool = False,
    ) -> torch.Tensor:
        """Denoise ``x_latent`` (noised by ``stochastic_encode`` to DDIM index ``t_start - 1``) to x_0.

        ``use_original_steps`` (CompVis: every DDPM step as a DDIM step) is not implemented.
        """
        if use_original_steps:
            raise NotImplementedError("DDIMSampler.decode: use_original_steps=True is not implemented; "
                                      "decode along the DDIM schedule (use_original_steps=False).")
        latent, _ = self.ddim_sampling(
            cond, tuple(x_latent.shape), x_T=x_latent, t_start=t_start,
            unconditional_guidance_scale=unconditional_guidance_scale,
            unconditional_conditioning=unconditional_conditioning, verbose=verbose,
        )
        return latent
