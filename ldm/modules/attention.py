"""Transformer blocks of the Stable Diffusion v1 UNet (CompVis ``attention.py`` interface).

Module names, constructor parameters and state-dict keys are CompVis's. Cross-attention
(a ``CrossAttention`` built with a ``context_dim``, i.e. every ``attn2``) projects the text
context with ``IncrementalLinear`` ``to_k`` / ``to_v`` layers, the only layers concept
increments touch. Self-attention (``attn1``) keeps plain ``nn.Linear`` projections: its keys
and values come from image features, which no text-space basis could describe.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, KeysView

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint, zero_module  # noqa: F401  (CompVis imports zero_module from here)
from ldm.modules.incremental_linear import IncrementalLinear
from ldm.util import default


def exists(val: object) -> bool:
    """``val is not None`` (CompVis's attention-module spelling of ``ldm.util.exists``)."""
    return val is not None


def uniq(arr: Iterable[Hashable]) -> KeysView[Hashable]:
    """The distinct elements of ``arr`` in first-seen order."""
    return dict.fromkeys(arr).keys()


def max_neg_value(t: torch.Tensor) -> float:
    """The most negative finite value of ``t``'s dtype (a mask fill that survives softmax)."""
    return -torch.finfo(t.dtype).max


def init_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill ``tensor`` in place uniformly in +-1/sqrt(last dim) and return it."""
    bound = 1 / math.sqrt(tensor.shape[-1])
    return tensor.uniform_(-bound, bound)


class GEGLU(nn.Module):
    """Gated GELU: ``a * gelu(b)`` with ``a, b`` the two halves of one projection."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(
        self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, default(dim_out, dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` [B, N, query_dim] over ``context`` [B, L, context_dim].

    Without ``context_dim`` the layer is self-attention (``context`` defaults to ``x``) and
    its key/value projections are plain ``nn.Linear``; with it they are ``IncrementalLinear``.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        kv_linear = nn.Linear if context_dim is None else IncrementalLinear
        context_dim = default(context_dim, query_dim)
        self.scale = dim_head**-0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = kv_linear(context_dim, inner_dim, bias=False)
        self.to_v = kv_linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``mask`` (bool, [B, L] or [B, *]) marks the context positions that may be attended to."""
        context = default(context, x)
        if context.shape[-1] != self.to_k.in_features:
            raise ValueError(
                f"context has width {context.shape[-1]} but this attention expects {self.to_k.in_features}."
            )
        q, k, v = (self._split_heads(t) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        attn_mask = None
        if mask is not None:
            attn_mask = mask.reshape(mask.shape[0], 1, 1, -1).to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        batch, _, tokens, dim_head = out.shape
        return self.to_out(out.transpose(1, 2).reshape(batch, tokens, self.heads * dim_head))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, N, heads * d] -> [B, heads, N, d]."""
        batch, tokens, _ = t.shape
        return t.reshape(batch, tokens, self.heads, -1).transpose(1, 2)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and a GEGLU feed-forward, each pre-normed and residual."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
    ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(
            query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


def Normalize(in_channels: int) -> nn.GroupNorm:
    """The transformer's input norm: 32 groups, eps 1e-6 (not the UNet's float32 GroupNorm)."""
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with a residual connection.

    1x1 convolutions ``q``, ``k``, ``v`` and ``proj_out`` after the transformer's input norm.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(in_channels, in_channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (layer(h).flatten(2).transpose(1, 2) for layer in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(1, 2).reshape(batch, channels, height, width))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map [B, C, H, W], conditioned on ``context``.

    norm -> 1x1 conv -> transformer blocks on H*W tokens -> zero-initialised 1x1 conv -> +x.
    ``use_checkpoint`` (not in CompVis v1, which always checkpoints) is passed on to the blocks.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_checkpoint: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = Normalize(in_channels)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim, checkpoint=use_checkpoint
            )
            for _ in range(depth)
        )
        self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        batch, _, height, width = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context=context)
        h = h.transpose(1, 2).reshape(batch, -1, height, width)
        return self.proj_out(h) + x


class LinearAttention(nn.Module):
    """Linear (softmax-over-positions) attention on a feature map; CompVis's VAE can use it."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32) -> None:
        super().__init__()
        self.heads = heads
        hidden_dim = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        q, k, v = self.to_qkv(x).reshape(batch, 3, self.heads, -1, height * width).unbind(dim=1)
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(batch, -1, height, width))
