"""PLMS sampler (CompVis ``ldm.models.diffusion.plms`` interface).

Pseudo linear multistep sampling (Liu et al., "Pseudo Numerical Methods for Diffusion Models
on Manifolds", ICLR 2022): each step is a DDIM step taken with an Adams-Bashforth combination
of the current and up to three previous noise predictions; the very first step, which has no
history, uses the pseudo improved Euler (Heun) combination of the predictions at both ends.

It walks the same schedule as ``DDIMSampler`` with eta = 0 and shares its schedule, guidance and
parameterization handling (eps, "v" and "x0" models) through ``ScheduledSampler``, so the two
samplers differ only in how the noise estimate of a step is formed. Unlike CompVis, the schedule
lives on the model's device (no hard-coded CUDA), so PLMS runs on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from ldm.models.diffusion.sampler_base import (
    Conditioning,
    ScheduledSampler,
    check_conditioning_batch,
    report_step,
    start_latent,
)

#: Adams-Bashforth weights of [eps_t, eps_{t-1}, eps_{t-2}, eps_{t-3}], by the number of stored predictions.
ADAMS_BASHFORTH = {
    1: ((3.0, -1.0), 2.0),
    2: ((23.0, -16.0, 5.0), 12.0),
    3: ((55.0, -59.0, 37.0, -9.0), 24.0),
}


class PLMSSampler(ScheduledSampler):
    """Deterministic PLMS sampling of a ``LatentDiffusion`` model (eta must be 0)."""

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """The DDIM schedule (timesteps, alphas, previous alphas) on the model's device."""
        if ddim_eta != 0:
            raise ValueError(f"ddim_eta must be 0 for PLMS (got {ddim_eta}); use DDIMSampler for eta > 0.")
        super().make_schedule(ddim_num_steps, ddim_discretize=ddim_discretize, ddim_eta=0.0, verbose=verbose)

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: Sequence[int],
        conditioning: Conditioning | None = None,
        callback: Callable[[int], None] | None = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        eta: float = 0.0,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Conditioning | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample ``batch_size`` latents of ``shape`` = (C, H, W) with ``S`` PLMS steps.

        ``mask`` and ``x0`` keep the known region (``mask == 1``) of ``x0`` as in CompVis: after every
        step it is replaced by ``x0`` noised to that step's level.
        """
        check_conditioning_batch(batch_size, conditioning, unconditional_conditioning)
        if (mask is None) != (x0 is None):
            raise ValueError("mask and x0 go together: pass both (inpainting) or neither.")
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        return self.plms_sampling(
            conditioning, (batch_size, *shape), x_T=x_T, callback=callback, img_callback=img_callback,
            mask=mask, x0=x0, log_every_t=log_every_t, unconditional_guidance_scale=unconditional_guidance_scale,
            unconditional_conditioning=unconditional_conditioning, generator=generator, verbose=verbose,
        )

    @torch.no_grad()
    def plms_sampling(
        self,
        cond: Conditioning | None,
        shape: Sequence[int],
        x_T: torch.Tensor | None = None,
        callback: Callable[[int], None] | None = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Conditioning | None = None,
        generator: torch.Generator | None = None,
        verbose: bool = True,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """The PLMS loop over the schedule made by ``make_schedule``."""
        self._require_schedule()
        device = self.model.betas.device
        img = start_latent(x_T, shape, device, generator)
        timesteps = [int(t) for t in self.ddim_timesteps]
        total = len(timesteps)
        intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [img], "pred_x0": [img]}
        old_eps: list[torch.Tensor] = []
        for i, index in enumerate(tqdm(range(total - 1, -1, -1), desc="PLMS Sampler", total=total, disable=not verbose)):
            t = torch.full((shape[0],), timesteps[index], device=device, dtype=torch.long)
            t_next = torch.full((shape[0],), timesteps[max(index - 1, 0)], device=device, dtype=torch.long)
            if mask is not None:
                img_orig = self.model.q_sample(x0, t)
                img = img_orig * mask + (1.0 - mask) * img
            img, pred_x0, e_t = self.p_sample_plms(
                img, cond, t, index=index, unconditional_guidance_scale=unconditional_guidance_scale,
                unconditional_conditioning=unconditional_conditioning, old_eps=old_eps, t_next=t_next,
            )
            old_eps = (old_eps + [e_t])[-3:]
            report_step(i, index, total, img, pred_x0, intermediates, callback, img_callback, log_every_t)
        return img, intermediates

    def _step(self, x: torch.Tensor, e_t: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The eta = 0 DDIM update from DDIM index ``index`` with noise estimate ``e_t``: (x_prev, pred_x0)."""
        a_t = self.ddim_alphas[index].to(x.dtype)
        a_prev = self.ddim_alphas_prev[index].to(x.dtype)
        pred_x0 = (x - self.ddim_sqrt_one_minus_alphas[index].to(x.dtype) * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t, pred_x0

    @torch.no_grad()
    def p_sample_plms(
        self,
        x: torch.Tensor,
        c: Conditioning | None,
        t: torch.Tensor,
        index: int,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Conditioning | None = None,
        old_eps: Sequence[torch.Tensor] | None = None,
        t_next: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One PLMS step from DDIM index ``index``; returns (x_prev, predicted x_0, this step's eps).

        ``old_eps`` holds the previous steps' noise predictions, oldest first (only the last three
        are used); without any, the step is pseudo improved Euler and evaluates the model a second
        time at ``t_next``.
        """
        def eps(x_in: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
            return self.model_eps(x_in, c, t_in, unconditional_guidance_scale, unconditional_conditioning)

        history = list(old_eps or [])[-3:]
        e_t = eps(x, t)
        if not history:
            if t_next is None:
                raise ValueError("The first PLMS step needs t_next (the next step's DDPM timestep).")
            x_prev, _ = self._step(x, e_t, index)
            e_t_prime = (e_t + eps(x_prev, t_next)) / 2
        else:
            weights, scale = ADAMS_BASHFORTH[len(history)]
            e_t_prime = sum(w * e for w, e in zip(weights, [e_t, *reversed(history)], strict=True)) / scale
        x_prev, pred_x0 = self._step(x, e_t_prime, index)
        return x_prev, pred_x0, e_t
