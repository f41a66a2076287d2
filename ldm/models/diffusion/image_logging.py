"""Images that CompVis's ``main.py`` (its ``ImageLogger`` callback) logs for a latent diffusion
model during training: ``LatentDiffusion.log_images`` and the layout-to-image variant.

Panels: ``inputs``, ``reconstruction`` (through the first stage), ``conditioning`` (captions
and class labels rendered as text), ``diffusion_row`` (the input noised at growing t) and
``samples`` (DDIM with ``ddim_steps`` steps and ``ddim_eta``). CompVis's further panels
(quantised or inpainted samples, progressive and denoising rows) are not drawn; asking for
``plot_denoise_rows=True`` raises ``NotImplementedError``; ``quantize_denoised``, ``inpaint`` and
``plot_progressive_rows`` (True by default in CompVis, which its ``ImageLogger`` relies on) are
accepted and their panels left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.util import log_txt_as_img

class LatentImageLogging:
    """Mixin for ``LatentDiffusion`` (uses its first stage, conditioning and schedule)."""

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, n_row: int = 4, sample: bool = True,
                   ddim_steps: int = 200, ddim_eta: float = 1.0, return_keys: Sequence[str] | None = None,
                   quantize_denoised: bool = True, inpaint: bool = True, plot_denoise_rows: bool = False,
                   plot_progressive_rows: bool = True, plot_diffusion_rows: bool = True,
                   **kwargs: Any) -> dict[str, Any]:
        """The panels of the module docstring for the first ``N`` samples of ``batch``."""
        if plot_denoise_rows:
            raise NotImplementedError("log_images: denoising rows are not drawn by this package; "
                                      "pass plot_denoise_rows=False.")
        x = super().get_input(batch, self.first_stage_key)[:N]  # DDPM's: the images themselves
        z, c = self.get_input(batch, self.first_stage_key, bs=x.shape[0])
        log: dict[str, Any] = {"inputs": x, "reconstruction": self.decode_first_stage(z)}
        raw = batch.get(self.cond_stage_key) if self.model.conditioning_key is not None else None
        if isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], str):
            log["conditioning"] = log_txt_as_img((x.shape[2], x.shape[3]), list(raw[: x.shape[0]])).to(x)
        elif self.cond_stage_key == "class_label" and "human_label" in batch:
            log["conditioning"] = log_txt_as_img((x.shape[2], x.shape[3]),
                                                 list(batch["human_label"][: x.shape[0]])).to(x)
        if plot_diffusion_rows:
            steps = range(0, self.num_timesteps, max(1, self.num_timesteps // n_row))
            rows = []
            for step in steps:
                t = torch.full((z.shape[0],), step, device=z.device, dtype=torch.long)
                rows.append(self.decode_first_stage(self.q_sample(z, t, noise=torch.randn_like(z))))
            log["diffusion_row"] = torch.stack(rows, dim=1).flatten(0, 1)
        if sample:
            with self.ema_scope("Plotting"):
                samples, _ = DDIMSampler(self).sample(ddim_steps, z.shape[0], tuple(z.shape[1:]), conditioning=c,
                                                      eta=ddim_eta)
            log["samples"] = self.decode_first_stage(samples)
        if return_keys:
            return {key: value for key, value in log.items() if key in return_keys}
        return log
