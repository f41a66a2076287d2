"""Conditioning encoders of CompVis's latent-diffusion configs other than SD v1's CLIP:
class labels (``ClassEmbedder``), BERT tokens through transformer layers (``BERTEmbedder``,
the LDM text-to-image model of ``txt2img-1p4B-eval.yaml``) and image rescaling
(``SpatialRescaler``). Parameters and state-dict keys are CompVis's;
``ldm.modules.encoders.modules`` re-exports every class here.

The transformer of ``TransformerEmbedder`` / ``BERTEmbedder`` is CompVis's own
``ldm/modules/x_transformer.py``, a file of the CompVis clone this project is copied over
(its keys are what the released checkpoints hold); it is imported when such an encoder is
built. The BERT tokenizer is created when first used, so building the model needs no Hub.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_INTERPOLATIONS = ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area")
_BERT_TOKENIZER = "bert-base-uncased"


class AbstractEncoder(nn.Module):
    """Base class of conditioning encoders: ``encode`` maps a condition to its embedding."""

    def __init__(self) -> None:
        super().__init__()

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement encode().")


def _transformer(vocab_size: int, max_seq_len: int, n_embed: int, n_layer: int, emb_dropout: float = 0.0) -> nn.Module:
    """CompVis's ``TransformerWrapper`` over an ``Encoder`` of ``n_layer`` layers of width ``n_embed``."""
    try:
        from ldm.modules.x_transformer import Encoder, TransformerWrapper
    except ImportError as error:
        raise ImportError(
            "TransformerEmbedder / BERTEmbedder use CompVis's ldm/modules/x_transformer.py, which is part of a "
            "CompVis/stable-diffusion clone: copy this project's files over a clone (README, 'Overlay') and run "
            f"there ({error})."
        ) from None
    return TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                              attn_layers=Encoder(dim=n_embed, depth=n_layer), emb_dropout=emb_dropout)


class ClassEmbedder(nn.Module):
    """``batch[key]`` class labels [B] -> one learned embedding per sample, [B, 1, embed_dim]
    (a one-token context for cross-attention)."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class") -> None:
        super().__init__()
        self.key = key
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch: dict[str, torch.Tensor], key: str | None = None) -> torch.Tensor:
        return self.embedding(batch[self.key if key is None else key][:, None])


class TransformerEmbedder(AbstractEncoder):
    """Token ids [B, L] -> [B, L, n_embed] through ``n_layer`` transformer encoder layers.

    Token ids are moved to the transformer's device (CompVis moved them to ``device``, which is
    kept as an attribute for drop-in configs).
    """

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int, max_seq_len: int = 77,
                 device: str = "cuda") -> None:
        super().__init__()
        self.device = device
        self.transformer = _transformer(vocab_size, max_seq_len, n_embed, n_layer)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.transformer(tokens.to(next(self.transformer.parameters()).device), return_embeddings=True)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


class BERTTokenizer(AbstractEncoder):
    """Text -> [B, max_length] ``bert-base-uncased`` token ids (padded), on ``device``.

    The Hugging Face tokenizer is loaded when first used (from the Hub or its cache).
    ``encode`` returns the ids in CompVis's VQ-interface tuple unless ``vq_interface`` is off.
    """

    def __init__(self, device: str = "cuda", vq_interface: bool = True, max_length: int = 77) -> None:
        super().__init__()
        self.device = device
        self.vq_interface = vq_interface
        self.max_length = max_length
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import BertTokenizerFast

            try:
                self._tokenizer = BertTokenizerFast.from_pretrained(_BERT_TOKENIZER)
            except (OSError, TypeError) as error:
                raise OSError(
                    f"BERTTokenizer: the {_BERT_TOKENIZER!r} tokenizer is neither in the Hugging Face cache nor "
                    f"reachable on the Hub ({type(error).__name__}); fetch it once where the Hub is reachable "
                    f"(huggingface-cli download {_BERT_TOKENIZER})."
                ) from None
        return self._tokenizer

    def forward(self, text: str | list[str]) -> torch.Tensor:
        encoding = self.tokenizer(text, truncation=True, max_length=self.max_length, return_length=True,
                                  return_overflowing_tokens=False, padding="max_length", return_tensors="pt")
        return encoding["input_ids"].to(self.device)

    @torch.no_grad()
    def encode(self, text: str | list[str]) -> Any:
        tokens = self(text)
        return (None, None, [None, None, tokens]) if self.vq_interface else tokens

    def decode(self, text: Any) -> Any:
        return text


class BERTEmbedder(AbstractEncoder):
    """Text (BERT-tokenized when ``use_tokenizer``, else token ids) -> [B, max_seq_len, n_embed]
    through ``n_layer`` transformer encoder layers trained with the diffusion model. Tokens go
    to the transformer's device; ``device`` is kept as an attribute for drop-in configs."""

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int = 30522, max_seq_len: int = 77,
                 device: str = "cuda", use_tokenizer: bool = True, embedding_dropout: float = 0.0) -> None:
        super().__init__()
        self.use_tknz_fn = use_tokenizer
        if use_tokenizer:
            # Tokens stay on the CPU here; forward moves them to the transformer's device.
            self.tknz_fn = BERTTokenizer(device="cpu", vq_interface=False, max_length=max_seq_len)
        self.device = device
        self.transformer = _transformer(vocab_size, max_seq_len, n_embed, n_layer, emb_dropout=embedding_dropout)

    def forward(self, text: Any) -> torch.Tensor:
        tokens = self.tknz_fn(text) if self.use_tknz_fn else text
        return self.transformer(tokens.to(next(self.transformer.parameters()).device), return_embeddings=True)

    def encode(self, text: Any) -> torch.Tensor:
        return self(text)


class SpatialRescaler(nn.Module):
    """Resize an image ``n_stages`` times by ``multiplier`` (``method`` interpolation), then
    optionally map its channels to ``out_channels`` with a 1x1 conv (``channel_mapper``)."""

    def __init__(self, n_stages: int = 1, method: str = "bilinear", multiplier: float = 0.5, in_channels: int = 3,
                 out_channels: int | None = None, bias: bool = False) -> None:
        super().__init__()
        if n_stages < 0:
            raise ValueError(f"SpatialRescaler: n_stages must be >= 0, got {n_stages}.")
        if method not in _INTERPOLATIONS:
            raise ValueError(f"SpatialRescaler: method must be one of {_INTERPOLATIONS}, got {method!r}.")
        self.n_stages = n_stages
        self.method = method
        self.multiplier = multiplier
        self.remap_output = out_channels is not None
        if self.remap_output:
            self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        return self.channel_mapper(x) if self.remap_output else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)
