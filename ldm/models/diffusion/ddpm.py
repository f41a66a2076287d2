"""DDPM and LatentDiffusion (CompVis ``ldm.models.diffusion.ddpm`` interface).

Scope: what Stable Diffusion v1 inference and (lean) training need. Constructor parameters,
buffer names and state-dict keys follow CompVis so that ``sd-v1-4*.ckpt`` with
``configs/stable-diffusion/v1-inference.yaml`` loads unchanged; the "v" parameterization
follows the Stable Diffusion 2.x ``ldm`` package.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ldm.models.diffusion.ancestral_sampling import DDPMSampling, LatentSampling
from ldm.models.diffusion.image_logging import LatentImageLogging
from ldm.models.diffusion.noise_schedule import NoiseSchedule
from ldm.models.vq_autoencoder import VQModelInterface
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma, ema_weights
from ldm.models.diffusion.wrapper import DiffusionWrapper, disabled_train, freeze_in_eval
from ldm.util import count_params, default, instantiate_from_config, load_state_dict_file

__all__ = ["DDPM", "LatentDiffusion", "DiffusionWrapper", "Layout2ImgDiffusion", "disabled_train", "uniform_on_device"]

logger = logging.getLogger(__name__)

PARAMETERIZATIONS = ("eps", "x0", "v")
Conditioning = torch.Tensor | list | dict | None


def uniform_on_device(r1: float, r2: float, shape: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """Uniform samples in [r2, r1) of ``shape`` on ``device``."""
    return (r1 - r2) * torch.rand(*shape, device=device) + r2


class DDPM(DDPMSampling, NoiseSchedule, pl.LightningModule):
    """Gaussian diffusion in pixel space with a noise schedule and a denoiser ``self.model``."""

    cond_stage_trainable = False

    def __init__(
        self,
        unet_config: Mapping[str, Any],
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        loss_type: str = "l2",
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        load_only_unet: bool = False,
        monitor: str | None = "val/loss",
        use_ema: bool = True,
        first_stage_key: str = "image",
        image_size: int = 256,
        channels: int = 3,
        log_every_t: int = 100,
        clip_denoised: bool = True,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: Sequence[float] | None = None,
        original_elbo_weight: float = 0.0,
        v_posterior: float = 0.0,
        l_simple_weight: float = 1.0,
        conditioning_key: str | None = None,
        parameterization: str = "eps",
        scheduler_config: Mapping[str, Any] | None = None,
        use_positional_encodings: bool = False,
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
    ) -> None:
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}.")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}.")
        self.parameterization = parameterization
        self.cond_stage_model = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = use_positional_encodings
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        logger.info("%s has %.2f M params.", type(self.model.diffusion_model).__name__,
                    count_params(self.model) * 1e-6)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model)
        self.use_scheduler = scheduler_config is not None
        if self.use_scheduler:
            self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        if monitor is not None:
            self.monitor = monitor
        self.loss_type = loss_type
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), float(logvar_init))
        if learn_logvar:
            self.logvar = nn.Parameter(logvar, requires_grad=True)
        else:
            self.register_buffer("logvar", logvar, persistent=False)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)

    # ----------------------------------------------------------------------------- weights
    def init_from_ckpt(
        self, path: str | Path, ignore_keys: Sequence[str] = (), only_model: bool = False
    ) -> tuple[list[str], list[str]]:
        """Load weights non-strictly (as CompVis) and return (missing, unexpected) keys.

        Keys starting with any of ``ignore_keys`` are dropped first. A ``logvar`` entry is
        copied into the fixed ``logvar`` buffer, which is not part of the state dict.
        """
        state_dict = load_state_dict_file(path)
        for key in [k for k in state_dict if any(k.startswith(prefix) for prefix in ignore_keys)]:
            del state_dict[key]
        if not only_model and not self.learn_logvar and "logvar" in state_dict:
            self.logvar.copy_(state_dict.pop("logvar"))
        target = self.model if only_model else self
        missing, unexpected = target.load_state_dict(state_dict, strict=False)
        logger.info("Restored from %s: %d missing and %d unexpected keys.", path, len(missing), len(unexpected))
        if missing:
            logger.info("Missing keys: %s", missing)
        if unexpected:
            logger.info("Unexpected keys: %s", unexpected)
        return list(missing), list(unexpected)

    def ema_scope(self, context: str | None = None) -> AbstractContextManager[None]:
        """Swap the EMA weights into ``self.model`` for the duration of the block."""
        return ema_weights(self.model_ema if self.use_ema else None, self.model, context)

    # ----------------------------------------------------------------------------- training
    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """Images stored channels-last ([B, H, W, C] or [B, H, W]) -> [B, C, H, W] float."""
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(device=self.device, memory_format=torch.contiguous_format).float()

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        if self.loss_type == "l1":
            loss = (target - pred).abs()
            return loss.mean() if mean else loss
        return F.mse_loss(target, pred, reduction="mean" if mean else "none")

    def _training_target(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.parameterization == "eps":
            return noise
        if self.parameterization == "x0":
            return x_start
        return self.get_v(x_start, noise, t)

    def _diffusion_loss(
        self, model_output: torch.Tensor, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CompVis objective: simple loss weighted by the (optionally learned) logvar + ELBO term."""
        prefix = "train" if self.training else "val"
        target = self._training_target(x_start, noise, t)
        per_sample = self.get_loss(model_output, target, mean=False).mean(dim=list(range(1, target.ndim)))
        loss_dict = {f"{prefix}/loss_simple": per_sample.mean()}
        logvar_t = self.logvar[t]
        loss = per_sample / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
            loss_dict["logvar"] = self.logvar.detach().mean()
        loss = self.l_simple_weight * loss.mean()
        loss_vlb = (self.lvlb_weights[t] * per_sample).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def _random_timesteps(self, batch_size: int) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch_size,), device=self.device).long()

    def p_losses(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        noise = default(noise, lambda: torch.randn_like(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        return self._diffusion_loss(self.model(x_noisy, t), x_start, noise, t)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.p_losses(x, self._random_timesteps(x.shape[0]), *args, **kwargs)

    def shared_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self(self.get_input(batch, self.first_stage_key))

    def _is_attached(self) -> bool:
        """Whether a Trainer or Fabric is attached, i.e. whether ``self.log`` has a sink."""
        return self._trainer is not None or self._fabric is not None

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, loss_dict = self.shared_step(batch)
        if self._is_attached():
            self.log_dict(loss_dict, prog_bar=True, logger=True, on_step=True, on_epoch=True,
                          batch_size=len(batch[self.first_stage_key]))
            if self.use_scheduler:
                self.log("lr_abs", self.optimizers().param_groups[0]["lr"], prog_bar=True, on_step=True)
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        _, loss_dict = self.shared_step(batch)
        with self.ema_scope():
            _, loss_dict_ema = self.shared_step(batch)
        loss_dict.update({f"{key}_ema": value for key, value in loss_dict_ema.items()})
        if self._is_attached():
            self.log_dict(loss_dict, prog_bar=False, logger=True, on_step=False, on_epoch=True,
                          batch_size=len(batch[self.first_stage_key]))

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.use_ema:
            self.model_ema(self.model)

    def configure_optimizers(self) -> Any:
        """AdamW over the trainable denoiser (+ cond stage when trainable, + learned logvar)."""
        lr = getattr(self, "learning_rate", None)
        if lr is None:
            raise AttributeError(
                f"{type(self).__name__}.learning_rate is not set; assign model.learning_rate = <float> "
                "before training (CompVis main.py derives it from base_learning_rate)."
            )
        params = list(self.model.parameters())
        if self.cond_stage_trainable:
            params += list(self.cond_stage_model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("No trainable parameters: every parameter of the denoiser has requires_grad=False.")
        optimizer = torch.optim.AdamW(params, lr=lr)
        if not self.use_scheduler:
            return optimizer
        schedule = instantiate_from_config(self.scheduler_config)
        scheduler = {"scheduler": LambdaLR(optimizer, lr_lambda=schedule.schedule), "interval": "step", "frequency": 1}
        return [optimizer], [scheduler]


class LatentDiffusion(LatentSampling, LatentImageLogging, DDPM):
    """Diffusion in the latent space of a frozen first stage, conditioned by a cond stage."""

    def __init__(
        self,
        first_stage_config: Mapping[str, Any],
        cond_stage_config: Mapping[str, Any] | str,
        num_timesteps_cond: int | None = None,
        cond_stage_key: str = "image",
        cond_stage_trainable: bool = False,
        concat_mode: bool = True,
        cond_stage_forward: str | None = None,
        conditioning_key: str | None = None,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        if self.num_timesteps_cond != 1:
            raise ValueError(
                f"num_timesteps_cond={self.num_timesteps_cond} (a shortened conditioning schedule) is not "
                "supported; use 1 as every Stable Diffusion config does."
            )
        self.scale_by_std = scale_by_std
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        else:
            self.scale_factor = scale_factor
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False
        self.restarted_from_ckpt = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)
            self.restarted_from_ckpt = True

    def instantiate_first_stage(self, config: Mapping[str, Any]) -> None:
        self.first_stage_model = freeze_in_eval(instantiate_from_config(config))

    def instantiate_cond_stage(self, config: Mapping[str, Any] | str) -> None:
        if config == "__is_first_stage__":
            if self.cond_stage_trainable:
                raise ValueError("cond_stage_config '__is_first_stage__' cannot be trainable.")
            self.cond_stage_model = self.first_stage_model
        elif config == "__is_unconditional__":
            if self.cond_stage_trainable:
                raise ValueError("cond_stage_config '__is_unconditional__' cannot be trainable.")
            self.cond_stage_model = None
        elif self.cond_stage_trainable:
            self.cond_stage_model = instantiate_from_config(config)
        else:
            self.cond_stage_model = freeze_in_eval(instantiate_from_config(config))

    # ----------------------------------------------------------------------------- stages
    def get_learned_conditioning(self, c: Any) -> Any:
        """Encode raw conditioning (e.g. a list of prompts) with the cond stage: [B, L, d] for CLIP."""
        if self.cond_stage_model is None:
            raise RuntimeError("This model is unconditional (cond_stage_config '__is_unconditional__').")
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        encode = getattr(self.cond_stage_model, "encode", None)
        if callable(encode):
            c = encode(c)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return self.cond_stage_model(c)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> Any:
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior: DiagonalGaussianDistribution | torch.Tensor) -> torch.Tensor:
        """Latent of an encoder output (a posterior is sampled), times ``scale_factor``."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(
                f"encoder_posterior must be a DiagonalGaussianDistribution or a tensor, got "
                f"{type(encoder_posterior).__name__}."
            )
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False,
                           force_not_quantize: bool = False) -> torch.Tensor:
        return self.differentiable_decode_first_stage(z, predict_cids, force_not_quantize)

    def differentiable_decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False,
                                          force_not_quantize: bool = False) -> torch.Tensor:
        """Images of latents ``z`` (divided by ``scale_factor`` first). With ``predict_cids``, ``z``
        holds codebook-id logits [B, n_embed, h, w] of a VQ first stage, decoded through their
        argmax codes; a VQ first stage quantises ``z`` unless ``force_not_quantize`` (or
        ``predict_cids``) is set."""
        if predict_cids:
            if z.ndim == 4:
                z = z.argmax(dim=1)
            batch, height, width = z.shape
            z = self.first_stage_model.quantize.get_codebook_entry(
                z.reshape(batch, -1), (batch, height, width, self.first_stage_model.embed_dim))
        z = z / self.scale_factor
        if isinstance(self.first_stage_model, VQModelInterface):
            return self.first_stage_model.decode(z, force_not_quantize=predict_cids or force_not_quantize)
        return self.first_stage_model.decode(z)

    # ----------------------------------------------------------------------------- denoiser
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                    return_ids: bool = False) -> Any:
        """Run the denoiser. ``cond`` is a tensor, a list of tensors, or a CompVis dict
        ``{"c_crossattn": [...], "c_concat": [...]}``."""
        if not isinstance(cond, dict):
            cond = cond if isinstance(cond, list) else [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        output = self.model(x_noisy, t, **cond)
        if isinstance(output, tuple) and not return_ids:
            return output[0]
        return output

    # ----------------------------------------------------------------------------- training
    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: str, return_first_stage_outputs: bool = False,
                  force_c_encode: bool = False, cond_key: str | None = None, return_original_cond: bool = False,
                  bs: int | None = None) -> list[Any]:
        """[z, c]: the scaled latent of ``batch[k]`` and the conditioning of ``batch[cond_key]``
        (default ``cond_stage_key``), encoded unless the cond stage is trained (then ``forward``
        encodes it) and ``force_c_encode`` is off. ``return_first_stage_outputs`` appends the
        images and their reconstructions, ``return_original_cond`` the raw conditioning."""
        x = super().get_input(batch, k)
        if bs is not None:
            x = x[:bs]
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        c = xc = None
        if self.model.conditioning_key is not None:
            key = cond_key or self.cond_stage_key
            if key == self.first_stage_key:
                xc = x
            elif key in ("caption", "txt", "coordinates_bbox", "class_label"):
                xc = batch if key == "class_label" else batch[key]
            else:
                xc = super().get_input(batch, key)
            if isinstance(xc, tuple):
                xc = list(xc)
            if bs is not None and not isinstance(xc, dict):
                xc = xc[:bs]
            c = self.get_learned_conditioning(xc) if force_c_encode or not self.cond_stage_trainable else xc
        out = [z, c]
        if return_first_stage_outputs:
            out += [x, self.decode_first_stage(z)]
        if return_original_cond:
            out.append(xc)
        return out

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Project a many-channel map to 3 channels with a fixed random map, scaled to [-1, 1]."""
        x = x.float()
        if not hasattr(self, "colorize"):
            self.colorize = torch.randn(3, x.shape[1], 1, 1).to(x)
        x = F.conv2d(x, weight=self.colorize)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0

    def forward(self, x: torch.Tensor, c: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = self._random_timesteps(x.shape[0])
        if self.model.conditioning_key is not None:
            if c is None:
                raise ValueError("This model is conditional: pass a conditioning for every latent.")
            if self.cond_stage_trainable:
                c = self.get_learned_conditioning(c)
        return self.p_losses(x, c, t, *args, **kwargs)

    def p_losses(
        self, x_start: torch.Tensor, cond: Conditioning, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        noise = default(noise, lambda: torch.randn_like(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        return self._diffusion_loss(self.apply_model(x_noisy, t, cond), x_start, noise, t)

    def shared_step(self, batch: Mapping[str, Any], **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, c = self.get_input(batch, self.first_stage_key)
        return self(x, c)

    @torch.no_grad()
    def on_train_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """With ``scale_by_std``, set ``scale_factor`` = 1 / std of the first batch's latents."""
        if not (self.scale_by_std and self.current_epoch == 0 and self.global_step == 0
                and batch_idx == 0 and not self.restarted_from_ckpt):
            return
        x = DDPM.get_input(self, batch, self.first_stage_key)
        self.scale_factor.fill_(1.0)
        z = self.get_first_stage_encoding(self.encode_first_stage(x))
        self.scale_factor.fill_(1.0 / z.flatten().std().item())
        logger.info("scale_factor set to %.5f from the first batch", self.scale_factor.item())


def __getattr__(name: str) -> Any:
    """``Layout2ImgDiffusion`` (CompVis's name here) lives in its own module, which subclasses
    ``LatentDiffusion``; resolved on first use (PEP 562), so importing either module first works."""
    if name != "Layout2ImgDiffusion":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ldm.models.diffusion.layout2img import Layout2ImgDiffusion

    return Layout2ImgDiffusion
