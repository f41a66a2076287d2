"""Conditioning encoders built on OpenAI's ``clip`` package (PyPI: ``clip-anytorch``):
CompVis's ``FrozenCLIPTextEmbedder`` and ``FrozenClipImageEmbedder``. ``clip`` (and ``kornia``
for the image embedder) are imported when an encoder is built, so this module imports
without them; ``ldm.modules.encoders.modules`` re-exports both classes.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _import(module: str, package: str, user: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{user} needs the '{module}' package: pip install {package}") from None


class FrozenCLIPTextEmbedder(nn.Module):
    """OpenAI CLIP text encoder (``clip.load(version)``): prompts -> [B, D] features, unit-length
    when ``normalize``; ``encode`` gives [B, n_repeat, D]. Tokens go to ``device``."""

    def __init__(self, version: str = "ViT-L/14", device: str = "cuda", max_length: int = 77, n_repeat: int = 1,
                 normalize: bool = True) -> None:
        super().__init__()
        self._clip = _import("clip", "clip-anytorch", "FrozenCLIPTextEmbedder")
        self.model, _ = self._clip.load(version, jit=False, device="cpu")
        self.device = device
        self.max_length = max_length
        self.n_repeat = n_repeat
        self.normalize = normalize

    def freeze(self) -> None:
        self.model = self.model.eval()
        for param in self.parameters():
            param.requires_grad = False

    def forward(self, text: str | list[str]) -> torch.Tensor:
        z = self.model.encode_text(self._clip.tokenize(text).to(self.device))
        return z / torch.linalg.norm(z, dim=1, keepdim=True) if self.normalize else z

    def encode(self, text: str | list[str]) -> torch.Tensor:
        z = self(text)
        if z.ndim == 2:
            z = z[:, None, :]
        return z.expand(-1, self.n_repeat, -1)


class FrozenClipImageEmbedder(nn.Module):
    """OpenAI CLIP image encoder (``clip.load(model)``): images in [-1, 1] are resized to 224
    (bicubic), mapped to [0, 1] and normalised with CLIP's statistics before encoding."""

    def __init__(self, model: str, jit: bool = False, device: str = 'cuda' if torch.cuda.is_available() else 'cpu',
                 antialias: bool = False) -> None:
        super().__init__()
        clip = _import("clip", "clip-anytorch", "FrozenClipImageEmbedder")
        self._kornia = _import("kornia", "kornia", "FrozenClipImageEmbedder")
        self.model, _ = clip.load(name=model, device=device, jit=jit)
        self.antialias = antialias
        self.register_buffer("mean", torch.tensor(_CLIP_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(_CLIP_STD), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        x = self._kornia.geometry.resize(x, (224, 224), interpolation="bicubic", align_corners=True,
                                         antialias=self.antialias)
        return self._kornia.enhance.normalize((x + 1.0) / 2.0, self.mean, self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.preprocess(x))
