"""First stages of latent diffusion: the KL autoencoder (SD v1 VAE) and parameter-free ones.

VQ autoencoders of the original repository are deliberately not provided; a config that
targets one fails in ``instantiate_from_config`` with the missing name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

_FIRST_STAGE_PREFIX = "first_stage_model."


def _read_checkpoint_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or of a torch pickle (``{"state_dict": ...}`` or flat)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"AutoencoderKL: checkpoint {str(path)!r} does not exist; pass an existing ckpt_path."
        )
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    # CompVis/Lightning checkpoints pickle Lightning objects next to the weights, which
    # torch.load(weights_only=True) refuses. Unpickling can run code stored in the file;
    # it is done only because the caller named this file. Prefer .safetensors.
    loaded = torch.load(path, map_location="cpu", weights_only=False)
    state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"AutoencoderKL: {str(path)!r} holds a {type(loaded).__name__}, not a state dict; "
            "pass a checkpoint saved as {'state_dict': {...}} or as a flat dict of tensors."
        )
    return state_dict


class AutoencoderKL(pl.LightningModule):
    """KL-regularised autoencoder: ``encode`` gives a diagonal Gaussian posterior over latents,
    ``decode`` maps latents back to images. Inference only: the adversarial training loop of
    the original is not part of this package (``lossconfig`` is kept for config compatibility;
    SD v1 configs use ``torch.nn.Identity``)."""

    def __init__(
        self,
        ddconfig: dict[str, Any],
        lossconfig: dict[str, Any],
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
    ) -> None:
        super().__init__()
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

    def init_from_ckpt(self, path: str | Path, ignore_keys: Sequence[str] = ()) -> None:
        """Load autoencoder weights from a VAE checkpoint or a full latent-diffusion checkpoint.

        Keys under ``first_stage_model.`` are used when present. Keys starting with any of
        ``ignore_keys`` are dropped and may stay at their initial values; any other weight
        missing from the file is an error. Extra keys (e.g. the ``loss.*`` discriminator of
        VAE training checkpoints) are reported in the log and skipped.
        """
        path = Path(path)
        state_dict = _read_checkpoint_state_dict(path)
        if any(key.startswith(_FIRST_STAGE_PREFIX) for key in state_dict):
            state_dict = {
                key[len(_FIRST_STAGE_PREFIX):]: value
                for key, value in state_dict.items()
                if key.startswith(_FIRST_STAGE_PREFIX)
            }
        ignore = tuple(ignore_keys)
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith(ignore)}
        result = self.load_state_dict(state_dict, strict=False)
        missing = [key for key in result.missing_keys if not key.startswith(ignore)]
        if missing:
            raise KeyError(
                f"AutoencoderKL: {len(missing)} weights are missing from {str(path)!r} "
                f"(first: {missing[:5]}); check that the file is a KL autoencoder of this ddconfig, "
                "or name deliberately re-initialised prefixes in ignore_keys."
            )
        if result.unexpected_keys:
            logger.info(
                "AutoencoderKL: skipped %d keys of %s not used at inference (first: %s)",
                len(result.unexpected_keys), path, result.unexpected_keys[:5],
            )
        logger.info("AutoencoderKL: restored from %s", path)

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


class IdentityFirstStage(nn.Module):
    """A first stage that leaves its input unchanged (diffusion directly on the input)."""

    def __init__(self, vq_interface: bool = False) -> None:
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def quantize(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, None, list[None]]:
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
