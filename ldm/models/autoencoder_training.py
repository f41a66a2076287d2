"""What the KL and VQ autoencoders share: checkpoint restoring, batch reading, and the
adversarial training loop of CompVis's first stages (an autoencoder optimiser and a
discriminator optimiser, the loss module deciding which term ``optimizer_idx`` selects).

The training loop follows CompVis's ``training_step(batch, batch_idx, optimizer_idx)``; under
PyTorch Lightning 2, which calls ``training_step(batch, batch_idx)``, has no automatic
optimisation of two optimisers and refuses a ``training_step`` that names ``optimizer_idx``,
both steps run in turn by manual optimisation, and ``optimizer_idx`` is taken from the extra
arguments of a direct call.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

_FIRST_STAGE_PREFIX = "first_stage_model."


def read_checkpoint_state_dict(path: Path, owner: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or of a torch pickle (``{"state_dict": ...}`` or flat)."""
    if not path.is_file():
        raise FileNotFoundError(f"{owner}: checkpoint {str(path)!r} does not exist; pass an existing ckpt_path.")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    # CompVis/Lightning checkpoints pickle Lightning objects next to the weights, which
    # torch.load(weights_only=True) refuses. Unpickling can run code stored in the file;
    # it is done only because the caller named this file. Prefer .safetensors.
    loaded = torch.load(path, map_location="cpu", weights_only=False)
    state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"{owner}: {str(path)!r} holds a {type(loaded).__name__}, not a state dict; "
            "pass a checkpoint saved as {'state_dict': {...}} or as a flat dict of tensors."
        )
    return state_dict


def restore_first_stage(module: nn.Module, path: str | Path, ignore_keys: Sequence[str]) -> None:
    """Load ``module``'s weights from an autoencoder checkpoint or a full latent-diffusion one.

    Keys under ``first_stage_model.`` are used when present. Keys starting with any of
    ``ignore_keys`` are dropped and may stay at their initial values; any other weight missing
    from the file is an error. Extra keys (e.g. the ``loss.*`` discriminator of training
    checkpoints) are reported in the log and skipped.
    """
    owner = type(module).__name__
    path = Path(path)
    state_dict = read_checkpoint_state_dict(path, owner)
    if any(key.startswith(_FIRST_STAGE_PREFIX) for key in state_dict):
        state_dict = {
            key[len(_FIRST_STAGE_PREFIX):]: value
            for key, value in state_dict.items()
            if key.startswith(_FIRST_STAGE_PREFIX)
        }
    ignore = tuple(ignore_keys)
    state_dict = {key: value for key, value in state_dict.items() if not key.startswith(ignore)}
    result = module.load_state_dict(state_dict, strict=False)
    missing = [key for key in result.missing_keys if not key.startswith(ignore + ("loss.", "model_ema."))]
    if missing:
        raise KeyError(
            f"{owner}: {len(missing)} weights are missing from {str(path)!r} (first: {missing[:5]}); check "
            "that the file is an autoencoder of this ddconfig, or name deliberately re-initialised prefixes "
            "in ignore_keys."
        )
    if result.unexpected_keys:
        logger.info("%s: skipped %d keys of %s not used at inference (first: %s)",
                    owner, len(result.unexpected_keys), path, result.unexpected_keys[:5])
    logger.info("%s: restored from %s", owner, path)


class AdversarialAutoencoderTraining:
    """Mixin for the autoencoders' LightningModules (see the module docstring).

    Subclasses provide ``autoencoder_loss(x, optimizer_idx, split)`` -> (loss, log dict),
    ``autoencoder_parameters()`` and ``learning_rates()`` -> (autoencoder lr, discriminator lr);
    ``self.loss`` is CompVis's loss module (with a ``discriminator`` for training).
    """

    image_key: str
    scheduler_config: Mapping[str, Any] | None = None

    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """``batch[k]`` as a float [B, C, H, W] tensor (datasets give channels-last images)."""
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's output weight (the adaptive GAN weight balances gradients there)."""
        return self.decoder.conv_out.weight

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Project a segmentation map's channels to 3 with a fixed random map, scaled to [-1, 1]."""
        if self.image_key != "segmentation":
            raise ValueError(f"to_rgb colourises segmentation maps; image_key is {self.image_key!r}.")
        if not hasattr(self, "colorize"):
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1).to(x))
        x = F.conv2d(x, weight=self.colorize)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0

    def training_step(self, batch: Mapping[str, Any], batch_idx: int, *args: Any, **kwargs: Any) -> Any:
        """With ``optimizer_idx`` (third argument or keyword): that optimiser's loss, as in CompVis.
        Without (Lightning 2): one manual step of each optimiser."""
        optimizer_idx = args[0] if args else kwargs.get("optimizer_idx")
        x = self.get_input(batch, self.image_key)
        if optimizer_idx is not None:
            loss, log_dict = self.autoencoder_loss(x, optimizer_idx, "train")
            self.log_dict(log_dict, prog_bar=False, logger=True, on_step=True, on_epoch=False)
            return loss
        for index, optimizer in enumerate(self.optimizers()):
            loss, log_dict = self.autoencoder_loss(x, index, "train")
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            self.log("aeloss" if index == 0 else "discloss", loss, prog_bar=True, logger=True, on_step=True)
            self.log_dict(log_dict, prog_bar=False, logger=True, on_step=True, on_epoch=False)
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()
        return None

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        x = self.get_input(batch, self.image_key)
        log_dict: dict[str, Any] = {}
        for index in (0, 1):
            _, logs = self.autoencoder_loss(x, index, "val")
            log_dict.update(logs)
        if "val/rec_loss" in log_dict:
            self.log("val/rec_loss", log_dict["val/rec_loss"], prog_bar=True, logger=True, sync_dist=True)
        self.log_dict({key: value for key, value in log_dict.items() if key != "val/rec_loss"}, sync_dist=True)
        return log_dict

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[dict[str, Any]]]:
        lr_ae, lr_disc = self.learning_rates()
        opt_ae = torch.optim.Adam(self.autoencoder_parameters(), lr=lr_ae, betas=(0.5, 0.9))
        opt_disc = torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr_disc, betas=(0.5, 0.9))
        if self.scheduler_config is None:
            return [opt_ae, opt_disc], []
        schedule = instantiate_from_config(self.scheduler_config).schedule
        return [opt_ae, opt_disc], [
            {"scheduler": LambdaLR(optimizer, lr_lambda=schedule), "interval": "step", "frequency": 1}
            for optimizer in (opt_ae, opt_disc)
        ]
