"""What the CompVis-interface samplers (DDIM, PLMS, DPM-Solver) share.

- conditioning helpers for tensors, lists of tensors and CompVis ``{"c_concat": ..., "c_crossattn": ...}``
  dicts (batching [uncond, cond] for classifier-free guidance, reading the batch size);
- the checks of ``sample``'s inputs (conditioning batch sizes, ``x_T`` shape) and the start latent;
- ``ScheduledSampler``: the DDIM schedule on the model's device and the guided noise prediction
  (eps, "v" and "x0" models), which DDIM and PLMS both walk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps

Conditioning = torch.Tensor | list | dict


def concat_conditioning(unconditional: Conditioning, conditional: Conditioning) -> Conditioning:
    """Stack [uncond, cond] along the batch for tensors, lists of tensors and CompVis dicts."""
    if isinstance(conditional, dict):
        return {key: concat_conditioning(unconditional[key], value) for key, value in conditional.items()}
    if isinstance(conditional, list):
        return [concat_conditioning(u, c) for u, c in zip(unconditional, conditional, strict=True)]
    return torch.cat([unconditional, conditional])


def conditioning_batch_size(conditioning: Conditioning) -> int:
    """The batch size of a tensor, of the first of a list, or of the first entry of a CompVis dict."""
    if isinstance(conditioning, dict):
        return conditioning_batch_size(next(iter(conditioning.values())))
    if isinstance(conditioning, list):
        return conditioning_batch_size(conditioning[0])
    return conditioning.shape[0]


def randn(shape: Sequence[int], like_device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise on ``like_device``; drawn on the generator's device when one is given."""
    if generator is None:
        return torch.randn(tuple(shape), device=like_device)
    return torch.randn(tuple(shape), generator=generator, device=generator.device).to(like_device)


def check_conditioning_batch(batch_size: int, conditioning: Conditioning | None,
                             unconditional_conditioning: Conditioning | None) -> None:
    """Raise ``ValueError`` unless both conditionings (where given) hold ``batch_size`` entries."""
    if conditioning is not None and conditioning_batch_size(conditioning) != batch_size:
        raise ValueError(
            f"conditioning has batch size {conditioning_batch_size(conditioning)} but batch_size={batch_size}; "
            "encode one prompt per sample (repeat it for several samples of one prompt)."
        )
    if unconditional_conditioning is not None and conditioning_batch_size(unconditional_conditioning) != batch_size:
        raise ValueError(
            f"unconditional_conditioning has batch size {conditioning_batch_size(unconditional_conditioning)} "
            f"but batch_size={batch_size}; repeat the blank-prompt embedding batch_size times."
        )


def start_latent(x_T: torch.Tensor | None, shape: Sequence[int], device: torch.device,
                 generator: torch.Generator | None) -> torch.Tensor:
    """``x_T`` on ``device`` (checked against ``shape``), or standard normal noise of ``shape``."""
    if x_T is None:
        return randn(shape, device, generator)
    if tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)} but the sampler needs {tuple(shape)}.")
    return x_T.to(device)


def report_step(
    i: int,
    index: int,
    total: int,
    img: torch.Tensor,
    pred_x0: torch.Tensor,
    intermediates: dict[str, Any],
    callback: Callable[[int], None] | None,
    img_callback: Callable[[torch.Tensor, int], None] | None,
    log_every_t: int,
) -> None:
    """CompVis's per-step hooks after loop step ``i`` (at DDIM index ``index`` of ``total``):
    ``callback(i)``, ``img_callback(pred_x0, i)``, and the latent and predicted x_0 kept in
    ``intermediates`` at every ``log_every_t``-th index and at the top of the schedule."""
    if callback is not None:
        callback(i)
    if img_callback is not None:
        img_callback(pred_x0, i)
    if index % log_every_t == 0 or index == total - 1:
        intermediates["x_inter"].append(img)
        intermediates["pred_x0"].append(pred_x0)


class ScheduledSampler:
    """A sampler that walks a DDIM schedule of a ``LatentDiffusion`` model (base of DDIM and PLMS)."""

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
            output = self.model.apply_model(x_in, t_in, concat_conditioning(unconditional_conditioning, c))
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
