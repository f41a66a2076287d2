"""Self-attention of the pixel-space and class-conditional LDM UNets (no text context).

``AttentionBlock`` lets the positions of an N-d feature map attend to each other; it is the
attention layer of UNets built with ``use_spatial_transformer: False`` and of
``EncoderUNetModel``. Module names and state-dict keys are CompVis's (``norm``, ``qkv``,
``proj_out``; ``positional_embedding``, ``qkv_proj``, ``c_proj`` for ``AttentionPool2d``), so
their checkpoints load; ``openaimodel`` re-exports every name here.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint, conv_nd, normalization, zero_module


def convert_module_to_f16(x: nn.Module) -> None:
    """Cast the parameters module ``x`` holds itself (not its children's) to float16.

    Meant for ``model.apply``; float32 group norms compute in float32 whatever their weights.
    """
    for param in x.parameters(recurse=False):
        param.data = param.data.half()


def convert_module_to_f32(x: nn.Module) -> None:
    """Undo ``convert_module_to_f16``: cast module ``x``'s own parameters to float32."""
    for param in x.parameters(recurse=False):
        param.data = param.data.float()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention on [N, C, T] queries, keys and values (channels first) -> [N, C, T].

    Scores are computed in float32 for half-precision inputs, as the float16 softmax overflows.
    """
    dtype = q.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2).to(compute) for t in (q, k, v)))
    return out.transpose(1, 2).to(dtype)


class _FusedQKVAttention(nn.Module):
    """Attention over a fused [B, 3*H*C, T] tensor; subclasses say how q, k and v are laid out."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads

    @abstractmethod
    def _split(self, qkv: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of shape [B*H, C, T] from ``qkv`` with ``channels`` = C per head."""

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        batch, width, length = qkv.shape
        if width % (3 * self.n_heads):
            raise ValueError(
                f"{type(self).__name__}: width {width} is not divisible by 3 * {self.n_heads} heads."
            )
        q, k, v = self._split(qkv, width // (3 * self.n_heads))
        return _attend(q, k, v).reshape(batch, -1, length)

    @staticmethod
    def count_flops(model: nn.Module, _x: Any, y: Any) -> None:
        count_flops_attn(model, _x, y)


class QKVAttentionLegacy(_FusedQKVAttention):
    """Attention over a fused [B, H*3*C, T] tensor laid out head first (q, k, v per head)."""

    def _split(self, qkv: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, _, length = qkv.shape
        return qkv.reshape(batch * self.n_heads, 3 * channels, length).split(channels, dim=1)


class QKVAttention(_FusedQKVAttention):
    """Attention over a fused [B, 3*H*C, T] tensor laid out q, k, v first, then heads."""

    def _split(self, qkv: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, _, length = qkv.shape
        q, k, v = (t.reshape(batch * self.n_heads, channels, length) for t in qkv.chunk(3, dim=1))
        return q, k, v


def count_flops_attn(model: nn.Module, _x: Any, y: Any) -> None:
    """``thop`` custom-op counter for the two attention matmuls (scores and weighted values).

    Adds 2 * B * T^2 * C to ``model.total_ops``, with [B, C, *spatial] the first input's shape.
    """
    batch, channels, *spatial = y[0].shape
    positions = math.prod(spatial)
    model.total_ops += torch.tensor([2.0 * batch * positions**2 * channels], dtype=torch.float64)


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over the positions of an N-d feature map.

    Heads: ``channels // num_head_channels`` when ``num_head_channels`` is set, else
    ``num_heads``. ``use_new_attention_order`` splits q, k, v before the heads
    (``QKVAttention``) instead of after (``QKVAttentionLegacy``). Like CompVis, the block
    always uses gradient checkpointing while training; ``use_checkpoint`` is recorded only.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        elif channels % num_head_channels:
            raise ValueError(f"AttentionBlock: {channels} channels are not divisible by num_head_channels "
                             f"{num_head_channels}.")
        else:
            self.num_heads = channels // num_head_channels
        if self.num_heads < 1:
            raise ValueError(f"AttentionBlock: set num_heads >= 1 or num_head_channels, got {num_heads} heads.")
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads) if use_new_attention_order else QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x,), self.parameters(), True)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        flat = x.reshape(batch, channels, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(flat))))
        return (flat + h).reshape(batch, channels, *spatial)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean position, prepended to the H*W positions, attends
    to all of them; its output (``output_dim`` channels) is the pooled feature [B, output_dim]."""

    def __init__(
        self, spacial_dim: int, embed_dim: int, num_heads_channels: int, output_dim: int | None = None
    ) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        tokens = torch.cat([flat.mean(dim=-1, keepdim=True), flat], dim=-1)
        tokens = tokens + self.positional_embedding[None].to(tokens.dtype)
        return self.c_proj(self.attention(self.qkv_proj(tokens)))[:, :, 0]
