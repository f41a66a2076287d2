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

import numpy as np
import torch
from tqdm import tqdm

from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps

Conditioning = torch.Tensor | list | dict


def _concat_conditioning(unconditional: Conditioning, conditional: Conditioning) -> Conditioning:
    """Stack [uncond, cond] along the batch for tensors, lists of tensors and CompVis dicts."""
    if isinstance(conditional, dict):
        return {key: _concat_conditioning(unconditional[key], value) for key, value in conditional.items()}
    if isinstance(conditional, list):
        return [_concat_conditioning(u, c) for u, c in zip(unconditional, conditional, strict=True)]
    return torch.cat([unconditional, conditional])


def _conditioning_batch_size(conditioning: Conditioning) -> int:
    if isinstance(conditioning, dict):
        return _conditioning_batch_size(next(iter(conditioning.values())))
    if isinstance(conditioning, list):
        return _conditioning_batch_size(conditioning[0])
    return conditioning.shape[0]


def _randn(shape: Sequence[int], like_device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise on ``like_device``; drawn on the generator's device when one is given."""
    if generator is None:
        return torch.randn(tuple(shape), device=like_device)
    return torch.randn(tuple(shape), generator=generator, device=generator.device).to(like_device)


class DDIMSampler:
    """Deterministic (eta = 0) or stochastic DDIM sampling of a ``LatentDiffusion`` model."""

    def __init__(self, model: Any, schedule: str = "linear", **kwargs: Any) -> None:
        """``kwargs`` are accepted and ignored, as in CompVis."""
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.ddim_timesteps: np.ndarray | None = None

    def _require_schedule(self) -> None:
        if self.ddim_timesteps is None:
            raise RuntimeError("No DDIM schedule yet: call make_schedule(ddim_num_steps=S) (or sample) first.")

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = False) -> None:
        """DDIM timesteps, alphas, previous alphas and sigmas (eq. 16 of the DDIM paper), on the
        device of the model's schedule buffers."""
        alphas_cumprod = self.model.alphas_cumprod
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError("model.alphas_cumprod must have one entry per DDPM timestep.")
        timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps, verbose=verbose)
        if timesteps.max() >= self.ddpm_num_timesteps:
            raise ValueError(
                f"S={ddim_num_steps} DDIM steps reach DDPM step {timesteps.max()} of a {self.ddpm_num_timesteps}-step "
                f"model (CompVis adds 1 to every step); use S <= {self.ddpm_num_timesteps // 2}."
            )
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(
            alphas_cumprod.detach().float(), timesteps, eta=ddim_eta, verbose=verbose
        )
        self.ddim_timesteps = timesteps
        self.ddim_eta = ddim_eta
        self.ddim_sigmas = sigmas
        self.ddim_alphas = alphas
        self.ddim_alphas_prev = alphas_prev
        self.ddim_sqrt_one_minus_alphas = torch.sqrt(1.0 - alphas)

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
        if conditioning is not None and _conditioning_batch_size(conditioning) != batch_size:
            raise ValueError(
                f"conditioning has batch size {_conditioning_batch_size(conditioning)} but batch_size={batch_size}; "
                "encode one prompt per sample (repeat it for several samples of one prompt)."
            )
        if (unconditional_conditioning is not None
                and _conditioning_batch_size(unconditional_conditioning) != batch_size):
            raise ValueError(
                f"unconditional_conditioning has batch size {_conditioning_batch_size(unconditional_conditioning)} "
                f"but batch_size={batch_size}; repeat the blank-prompt embedding batch_size times."
            )
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
        if x_T is None:
            img = _randn(shape, device, generator)
        elif tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but the sampler needs {tuple(shape)}.")
        else:
            img = x_T.to(device)

        intermediates: dict[str, Any] = {"x_inter": [img], "pred_x0": [img]}
        indices = list(range(start - 1, start - 1 - steps_to_run, -1))
        for i, index in enumerate(tqdm(indices, desc="DDIM Sampler", disable=not verbose)):
            t = torch.full((shape[0],), int(self.ddim_timesteps[index]), device=device, dtype=torch.long)
            img, pred_x0 = self.p_sample_ddim(
                img, cond, t, index=index, unconditional_guidance_scale=unconditional_guidance_scale,
                unconditional_conditioning=unconditional_conditioning, generator=generator,
            )
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        last_index = start - steps_to_run
        intermediates["stopped_at"] = int(self.ddim_timesteps[last_index - 1]) if last_index > 0 else 0
        return img, intermediates

    def model_eps(
        self,
        x: torch.Tensor,
        c: Conditioning | None,
        t: torch.Tensor,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Conditioning | None = None,
    ) -> torch.Tensor:
        """Noise prediction with classifier-free guidance eps_u + s (eps_c - eps_u), whatever the
        model's parameterization."""
        if unconditional_conditioning is None or unconditional_guidance_scale == 1.0:
            output = self.model.apply_model(x, t, c)
            x_in, t_in = x, t
        else:
            x_in, t_in = torch.cat([x, x]), torch.cat([t, t])
            output = self.model.apply_model(x_in, t_in, _concat_conditioning(unconditional_conditioning, c))
        parameterization = getattr(self.model, "parameterization", "eps")
        if parameterization == "v":
            output = self.model.predict_eps_from_z_and_v(x_in, t_in, output)
        elif parameterization == "x0":
            # eps = (x_t / sqrt(abar) - x0) / sqrt(1/abar - 1)
            output = ((self.model.sqrt_recip_alphas_cumprod[t_in].view(-1, *[1] * (x.ndim - 1)) * x_in - output)
                      / self.model.sqrt_recipm1_alphas_cumprod[t_in].view(-1, *[1] * (x.ndim - 1)))
        if x_in is x:
            return output
        eps_uncond, eps_cond = output.chunk(2)
        return eps_uncond + unconditional_guidance_scale * (eps_cond - eps_uncond)

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
            x_prev = x_prev + sigma_t * _randn(x.shape, x.device, generator).to(x.dtype)
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
