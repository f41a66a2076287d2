"""Vector-quantised autoencoders, the first stages of CompVis's VQ latent-diffusion models
(``VQModel``, and ``VQModelInterface`` which latent diffusion runs on the pre-quantisation
latents). Constructor parameters, methods and state-dict keys are CompVis's, with this
project's own ``VectorQuantizer``; ``ldm.models.autoencoder`` re-exports both classes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ldm.models.autoencoder_training import AdversarialAutoencoderTraining, restore_first_stage
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.ema import LitEma, ema_weights
from ldm.modules.vector_quantizer import VectorQuantizer
from ldm.util import instantiate_from_config


class VQModel(AdversarialAutoencoderTraining, pl.LightningModule):
    """Encoder -> 1x1 conv -> vector quantiser (``n_embed`` codes of ``embed_dim``) -> 1x1 conv -> decoder.

    ``batch_resize_range`` = (low, high) resizes each training batch to a random multiple of 16
    in that range (the first batches at ``high``). ``use_ema`` keeps an EMA of all weights
    (``model_ema.*``), used in ``ema_scope``. ``remap`` and ``sane_index_shape`` go to the
    quantiser. ``ckpt_path`` loads weights at construction, as in CompVis.
    """

    def __init__(
        self,
        ddconfig: dict[str, Any],
        lossconfig: dict[str, Any],
        n_embed: int,
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = [],
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        batch_resize_range: tuple[int, int] | None = None,
        scheduler_config: Mapping[str, Any] | None = None,
        lr_g_factor: float = 1.0,
        remap: str | None = None,
        sane_index_shape: bool = False,
        use_ema: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape)
        self.quant_conv = torch.nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        self.batch_resize_range = batch_resize_range
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)
        self.scheduler_config = scheduler_config
        self.lr_g_factor = lr_g_factor

    def ema_scope(self, context: str | None = None) -> contextlib.AbstractContextManager[None]:
        """Run the body with the EMA weights (when ``use_ema``), restoring the trained ones after."""
        return ema_weights(self.model_ema if self.use_ema else None, self, context)

    def init_from_ckpt(self, path: str | Path, ignore_keys: Sequence[str] = list()) -> None:
        restore_first_stage(self, path, ignore_keys)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.use_ema:
            self.model_ema(self)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[Any, Any, torch.Tensor]]:
        return self.quantize(self.quant_conv(self.encoder(x)))

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor) -> torch.Tensor:
        """Decode [B, H, W] codebook indices."""
        return self.decode(self.quantize.embed_code(code_b))

    def forward(self, input: torch.Tensor, return_pred_indices: bool = False) -> tuple[torch.Tensor, ...]:
        quant, diff, (_, _, indices) = self.encode(input)
        decoded = self.decode(quant)
        return (decoded, diff, indices) if return_pred_indices else (decoded, diff)

    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        x = super().get_input(batch, k)
        if self.batch_resize_range is None:
            return x
        low, high = self.batch_resize_range
        size = high if self.global_step <= 4 else int(np.random.choice(np.arange(low, high + 16, 16)))
        if size != x.shape[2]:
            x = F.interpolate(x, size=size, mode="bicubic")
        return x.detach()

    def autoencoder_loss(self, x: torch.Tensor, optimizer_idx: int, split: str) -> tuple[torch.Tensor, dict]:
        reconstruction, quantizer_loss, indices = self(x, return_pred_indices=True)
        return self.loss(quantizer_loss, x, reconstruction, optimizer_idx, self.global_step,
                         last_layer=self.get_last_layer(), split=split, predicted_indices=indices)

    def autoencoder_parameters(self) -> list[torch.nn.Parameter]:
        parts = (self.encoder, self.decoder, self.quantize, self.quant_conv, self.post_quant_conv)
        return [param for part in parts for param in part.parameters()]

    def learning_rates(self) -> tuple[float, float]:
        return self.lr_g_factor * self.learning_rate, self.learning_rate

    @torch.no_grad()
    def log_images(
        self, batch: Mapping[str, Any], only_inputs: bool = False, plot_ema: bool = False, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        x = self.get_input(batch, self.image_key).to(self.device)
        if only_inputs:
            return {"inputs": x}
        reconstruction, _ = self(x)
        log: dict[str, torch.Tensor] = {}
        if plot_ema:
            with self.ema_scope():
                ema_reconstruction, _ = self(x)
            log["reconstructions_ema"] = self.to_rgb(ema_reconstruction) if x.shape[1] > 3 else ema_reconstruction
        if x.shape[1] > 3:
            x, reconstruction = self.to_rgb(x), self.to_rgb(reconstruction)
        log["inputs"] = x
        log["reconstructions"] = reconstruction
        return log


class VQModelInterface(VQModel):
    """``VQModel`` as a latent-diffusion first stage: ``encode`` stops before the quantiser and
    ``decode`` quantises (unless ``force_not_quantize``) before decoding."""

    def __init__(self, embed_dim: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, embed_dim=embed_dim, **kwargs)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))
