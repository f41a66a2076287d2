"""The denoiser wrapper and frozen-stage helpers used by ``ldm.models.diffusion.ddpm``."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ldm.util import instantiate_from_config

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm")


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for ``nn.Module.train`` that keeps a frozen sub-model in eval mode."""
    return self


def freeze_in_eval(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode for good and stop gradients into its parameters."""
    model.eval()
    model.train = types.MethodType(disabled_train, model)
    for param in model.parameters():
        param.requires_grad = False
    return model


class DiffusionWrapper(nn.Module):
    """Holds the denoiser as ``diffusion_model`` and routes the conditioning into it."""

    def __init__(self, diff_model_config: Mapping[str, Any], conditioning_key: str | None) -> None:
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning_key must be one of {CONDITIONING_KEYS}, got {conditioning_key!r}.")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        c_concat: list[torch.Tensor] | None = None,
        c_crossattn: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t)
        if key in ("concat", "hybrid"):
            x = torch.cat([x, *c_concat], dim=1)
        if key == "concat":
            return self.diffusion_model(x, t)
        if key == "adm":
            return self.diffusion_model(x, t, y=c_crossattn[0])
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, dim=1))
