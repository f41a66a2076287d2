"""First stages of latent diffusion: the KL autoencoder (SD v1 VAE), the VQ autoencoders
(``vq_autoencoder``, re-exported here) and parameter-free ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.autoencoder_training import AdversarialAutoencoderTraining, restore_first_stage
from ldm.models.vq_autoencoder import VQModel, VQModelInterface  # noqa: F401  (CompVis names)
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config


class AutoencoderKL(AdversarialAutoencoderTraining, pl.LightningModule):
    """KL-regularised autoencoder: ``encode`` gives a diagonal Gaussian posterior over latents,
    ``decode`` maps latents back to images. ``lossconfig`` is CompVis's adversarial loss for
    training (``ldm.modules.losses.LPIPSWithDiscriminator``); inference configs such as SD v1
    use ``torch.nn.Identity``. ``ckpt_path`` loads weights at construction, as in CompVis."""

    def __init__(
        self,
        ddconfig: dict[str, Any],
        lossconfig: dict[str, Any],
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = [],
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        if not ddconfig.get("double_z", True):
            raise ValueError(
                "AutoencoderKL: ddconfig.double_z must be true (the encoder predicts mean and logvar)."
            )
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        if colorize_nlabels is not None:
            # Present in segmentation-autoencoder checkpoints; registered so their keys load.
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def init_from_ckpt(self, path: str | Path, ignore_keys: Sequence[str] = list()) -> None:
        restore_first_stage(self, path, ignore_keys)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, input: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def autoencoder_loss(self, x: torch.Tensor, optimizer_idx: int, split: str) -> tuple[torch.Tensor, dict]:
        reconstruction, posterior = self(x)
        return self.loss(x, reconstruction, posterior, optimizer_idx, self.global_step,
                         last_layer=self.get_last_layer(), split=split)

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        parts = (self.encoder, self.decoder, self.quant_conv, self.post_quant_conv)
        return [param for part in parts for param in part.parameters()]

    def learning_rates(self) -> tuple[float, float]:
        return self.learning_rate, self.learning_rate

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], only_inputs: bool = False, **kwargs: Any) -> dict[str, torch.Tensor]:
        x = self.get_input(batch, self.image_key).to(self.device)
        log: dict[str, torch.Tensor] = {}
        if not only_inputs:
            reconstruction, posterior = self(x)
            if x.shape[1] > 3:
                x, reconstruction = self.to_rgb(x), self.to_rgb(reconstruction)
            log["samples"] = self.decode(torch.randn_like(posterior.sample()))
            log["reconstructions"] = reconstruction
        log["inputs"] = x
        return log


class IdentityFirstStage(nn.Module):
    """A first stage that leaves its input unchanged (diffusion directly on the input)."""

    def __init__(self, *args: Any, vq_interface: bool = False, **kwargs: Any) -> None:
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def quantize(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, None, list[None]]:
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x


class PixelUnshuffleFirstStage(nn.Module):
    """Lossless, parameter-free first stage: space-to-depth by ``factor``.

    ``encode`` turns [B, C, H, W] images into [B, C*factor^2, H/factor, W/factor] latents
    (e.g. 32x32x3 -> 16x16x12 for the toy world) and ``decode`` inverts it exactly.
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"PixelUnshuffleFirstStage: factor must be a positive int, got {factor!r}.")
        self.factor = factor

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-2] % self.factor or x.shape[-1] % self.factor:
            raise ValueError(
                f"PixelUnshuffleFirstStage.encode: expected [B, C, H, W] with H and W divisible by "
                f"{self.factor}, got shape {tuple(x.shape)}; resize the images or change factor."
            )
        return F.pixel_unshuffle(x, self.factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] % (self.factor**2):
            raise ValueError(
                f"PixelUnshuffleFirstStage.decode: expected [B, C*{self.factor ** 2}, h, w], got shape "
                f"{tuple(z.shape)}; pass latents produced by encode with the same factor."
            )
        return F.pixel_shuffle(z, self.factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
