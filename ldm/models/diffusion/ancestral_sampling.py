"""Ancestral (DDPM) sampling of ``DDPM`` and ``LatentDiffusion``: CompVis's ``p_mean_variance``,
``p_sample``, ``p_sample_loop``, ``sample`` and, for latent models, ``progressive_denoising``
and ``sample_log`` (used by CompVis's ``scripts/sample_diffusion.py`` and image logging).

Each step draws x_{t-1} ~ N(mu, sigma^2) with mu and sigma from the posterior q(x_{t-1} | x_t, x0)
at the model's prediction of x0 (DDPM paper, eq. 6-7); no noise is added at t = 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm import tqdm

from ldm.models.diffusion.ddim import DDIMSampler


def _noise(shape: Sequence[int], device: torch.device, temperature: float, noise_dropout: float) -> torch.Tensor:
    noise = torch.randn(tuple(shape), device=device) * temperature
    return torch.nn.functional.dropout(noise, p=noise_dropout) if noise_dropout > 0 else noise


class _AncestralStep:
    """What DDPM and LatentDiffusion share: x0 from the model output, and one posterior draw."""

    def _x0_from_output(self, x: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if self.parameterization == "eps":
            return self.predict_start_from_noise(x, t=t, noise=output)
        if self.parameterization == "v":
            return self.predict_start_from_z_and_v(x, t, output)
        return output

    def _draw(self, mean: torch.Tensor, log_variance: torch.Tensor, t: torch.Tensor, temperature: float = 1.0,
              noise_dropout: float = 0.0, repeat_noise: bool = False) -> torch.Tensor:
        shape = (1, *mean.shape[1:]) if repeat_noise else mean.shape
        noise = _noise(shape, mean.device, temperature, noise_dropout).expand_as(mean)
        nonzero = (t != 0).float().reshape(mean.shape[0], *((1,) * (mean.ndim - 1)))
        return mean + nonzero * (0.5 * log_variance).exp() * noise


class DDPMSampling(_AncestralStep):
    """Mixin for ``DDPM`` (unconditional, pixel space; ``self.model(x, t)`` is the denoiser)."""

    def p_mean_variance(self, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool) -> tuple[torch.Tensor, ...]:
        x_recon = self._x0_from_output(x, t, self.model(x, t))
        if clip_denoised:
            x_recon = x_recon.clamp(-1.0, 1.0)
        return self.q_posterior(x_start=x_recon, x_t=x, t=t)

    @torch.no_grad()
    def p_sample(self, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                 repeat_noise: bool = False) -> torch.Tensor:
        mean, _, log_variance = self.p_mean_variance(x=x, t=t, clip_denoised=clip_denoised)
        return self._draw(mean, log_variance, t, repeat_noise=repeat_noise)

    @torch.no_grad()
    def p_sample_loop(self, shape: Sequence[int], return_intermediates: bool = False) -> Any:
        img = torch.randn(tuple(shape), device=self.betas.device)
        intermediates = [img]
        for step in tqdm(reversed(range(self.num_timesteps)), desc="Sampling t", total=self.num_timesteps):
            t = torch.full((shape[0],), step, device=img.device, dtype=torch.long)
            img = self.p_sample(img, t, clip_denoised=self.clip_denoised)
            if step % self.log_every_t == 0 or step == self.num_timesteps - 1:
                intermediates.append(img)
        return (img, intermediates) if return_intermediates else img

    @torch.no_grad()
    def sample(self, batch_size: int = 16, return_intermediates: bool = False) -> Any:
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        return self.p_sample_loop(shape, return_intermediates=return_intermediates)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, n_row: int = 2, sample: bool = True,
                   return_keys: Sequence[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        """``inputs``, ``diffusion_row`` (the input noised at ``n_row`` growing t) and ``samples``."""
        x = self.get_input(batch, self.first_stage_key)[:N]
        log: dict[str, Any] = {"inputs": x}
        rows = []
        for step in range(0, self.num_timesteps, max(1, self.num_timesteps // n_row)):
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            rows.append(self.q_sample(x_start=x, t=t, noise=torch.randn_like(x)))
        log["diffusion_row"] = torch.stack(rows, dim=1).flatten(0, 1)
        if sample:
            with self.ema_scope("Plotting"):
                log["samples"] = self.sample(batch_size=x.shape[0])
        return {key: value for key, value in log.items() if not return_keys or key in return_keys}


class LatentSampling(_AncestralStep):
    """Mixin for ``LatentDiffusion``: conditioned steps (``apply_model``) on latents."""

    def p_mean_variance(self, x: torch.Tensor, c: Any, t: torch.Tensor, clip_denoised: bool,
                        return_codebook_ids: bool = False, quantize_denoised: bool = False, return_x0: bool = False,
                        score_corrector: Any = None, corrector_kwargs: dict | None = None) -> tuple[torch.Tensor, ...]:
        """Posterior mean, variance and log-variance (and x0 with ``return_x0``) at step ``t``.

        ``score_corrector.modify_score(model, output, x, t, c, **corrector_kwargs)`` may adjust
        an eps prediction; ``quantize_denoised`` snaps x0 to the VQ first stage's codebook.
        """
        if return_codebook_ids:
            raise NotImplementedError("p_mean_variance: return_codebook_ids (codebook-id prediction) is not "
                                      "implemented; pass return_codebook_ids=False.")
        output = self.apply_model(x, t, c)
        if score_corrector is not None:
            if self.parameterization != "eps":
                raise ValueError("score_corrector needs an eps-parameterised model.")
            output = score_corrector.modify_score(self, output, x, t, c, **(corrector_kwargs or {}))
        x_recon = self._x0_from_output(x, t, output)
        if clip_denoised:
            x_recon = x_recon.clamp(-1.0, 1.0)
        if quantize_denoised:
            x_recon, _, _ = self.first_stage_model.quantize(x_recon)
        mean, variance, log_variance = self.q_posterior(x_start=x_recon, x_t=x, t=t)
        return (mean, variance, log_variance, x_recon) if return_x0 else (mean, variance, log_variance)

    @torch.no_grad()
    def p_sample(self, x: torch.Tensor, c: Any, t: torch.Tensor, clip_denoised: bool = False,
                 repeat_noise: bool = False, return_codebook_ids: bool = False, quantize_denoised: bool = False,
                 return_x0: bool = False, temperature: float = 1.0, noise_dropout: float = 0.0,
                 score_corrector: Any = None, corrector_kwargs: dict | None = None) -> Any:
        mean, _, log_variance, x0 = self.p_mean_variance(
            x=x, c=c, t=t, clip_denoised=clip_denoised, return_codebook_ids=return_codebook_ids,
            quantize_denoised=quantize_denoised, return_x0=True, score_corrector=score_corrector,
            corrector_kwargs=corrector_kwargs)
        sample = self._draw(mean, log_variance, t, temperature, noise_dropout, repeat_noise)
        return (sample, x0) if return_x0 else sample

    def _denoise(self, cond: Any, shape: Sequence[int], x_T: torch.Tensor | None, verbose: bool,
                 callback: Callable | None, img_callback: Callable | None, timesteps: int | None,
                 start_T: int | None, log_every_t: int | None, mask: torch.Tensor | None,
                 x0: torch.Tensor | None, keep: str, **step_options: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The reverse chain from ``x_T``; ``keep`` = "x" or "x0" selects what the intermediates hold.

        With ``mask`` (1 = keep ``x0``) the known region is re-noised from ``x0`` at every step.
        """
        device = self.betas.device
        img = torch.randn(tuple(shape), device=device) if x_T is None else x_T.to(device)
        steps = timesteps or self.num_timesteps
        if start_T is not None:
            steps = min(steps, start_T)
        if mask is not None and (x0 is None or x0.shape[2:] != mask.shape[2:]):
            raise ValueError("mask needs x0 with the same spatial size.")
        if isinstance(cond, dict):
            cond = {key: value[: shape[0]] if not isinstance(value, list) else [v[: shape[0]] for v in value]
                    for key, value in cond.items()}
        elif cond is not None:
            cond = [c[: shape[0]] for c in cond] if isinstance(cond, list) else cond[: shape[0]]
        intermediates = [img]
        every = log_every_t or self.log_every_t
        for step in tqdm(reversed(range(steps)), desc="Sampling t", total=steps, disable=not verbose):
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            img, x0_pred = self.p_sample(img, cond, t, clip_denoised=self.clip_denoised, return_x0=True,
                                         **step_options)
            if mask is not None:
                img = self.q_sample(x0, t) * mask + (1.0 - mask) * img
            if step % every == 0 or step == steps - 1:
                intermediates.append(x0_pred if keep == "x0" else img)
            if callback is not None:
                callback(step)
            if img_callback is not None:
                img_callback(img, step)
        return img, intermediates

    @torch.no_grad()
    def progressive_denoising(self, cond: Any, shape: Sequence[int], verbose: bool = True,
                              callback: Callable | None = None, quantize_denoised: bool = False,
                              img_callback: Callable | None = None, mask: torch.Tensor | None = None,
                              x0: torch.Tensor | None = None, temperature: float = 1.0, noise_dropout: float = 0.0,
                              score_corrector: Any = None, corrector_kwargs: dict | None = None,
                              batch_size: int | None = None, x_T: torch.Tensor | None = None,
                              start_T: int | None = None, log_every_t: int | None = None) -> Any:
        """Sample and return (x_0, the predicted x0 every ``log_every_t`` steps)."""
        shape = (batch_size, *shape) if batch_size is not None else tuple(shape)
        return self._denoise(cond, shape, x_T, verbose, callback, img_callback, None, start_T, log_every_t, mask,
                             x0, "x0", quantize_denoised=quantize_denoised, temperature=temperature,
                             noise_dropout=noise_dropout, score_corrector=score_corrector,
                             corrector_kwargs=corrector_kwargs)

    @torch.no_grad()
    def p_sample_loop(self, cond: Any, shape: Sequence[int], return_intermediates: bool = False,
                      x_T: torch.Tensor | None = None, verbose: bool = True, callback: Callable | None = None,
                      timesteps: int | None = None, quantize_denoised: bool = False, mask: torch.Tensor | None = None,
                      x0: torch.Tensor | None = None, img_callback: Callable | None = None,
                      start_T: int | None = None, log_every_t: int | None = None) -> Any:
        img, intermediates = self._denoise(cond, shape, x_T, verbose, callback, img_callback, timesteps, start_T,
                                           log_every_t, mask, x0, "x", quantize_denoised=quantize_denoised)
        return (img, intermediates) if return_intermediates else img

    @torch.no_grad()
    def sample(self, cond: Any, batch_size: int = 16, return_intermediates: bool = False,
               x_T: torch.Tensor | None = None, verbose: bool = True, timesteps: int | None = None,
               quantize_denoised: bool = False, mask: torch.Tensor | None = None, x0: torch.Tensor | None = None,
               shape: Sequence[int] | None = None, **kwargs: Any) -> Any:
        shape = tuple(shape) if shape is not None else (batch_size, self.channels, self.image_size, self.image_size)
        return self.p_sample_loop(cond, shape, return_intermediates=return_intermediates, x_T=x_T, verbose=verbose,
                                  timesteps=timesteps, quantize_denoised=quantize_denoised, mask=mask, x0=x0)

    @torch.no_grad()
    def sample_log(self, cond: Any, batch_size: int, ddim: bool, ddim_steps: int, **kwargs: Any) -> Any:
        """(samples, intermediates) by DDIM with ``ddim_steps`` steps, or by the ancestral chain."""
        if ddim:
            shape = (self.channels, self.image_size, self.image_size)
            return DDIMSampler(self).sample(ddim_steps, batch_size, shape, conditioning=cond, verbose=False,
                                            **kwargs)
        return self.sample(cond=cond, batch_size=batch_size, return_intermediates=True, **kwargs)
