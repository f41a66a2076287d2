"""Convolutional encoder / decoder of the CompVis autoencoders (the SD v1 VAE among them).

Module names and nesting follow CompVis exactly so that checkpoint keys such as
``encoder.down.0.block.0.norm1.weight``, ``encoder.mid.attn_1.q.weight`` and
``decoder.up.3.upsample.conv.weight`` load unchanged. CompVis's pixel-space DDPM UNet
(``Model``, in ``pixel_unet``) and its rescaling encoders / decoders (``rescalers``) are
re-exported at the end of this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import LinearAttention


def get_timestep_embedding(timesteps: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """Sinusoidal embeddings [B, embedding_dim] of timesteps [B] as in the DDPM paper's code:
    order [sin, cos], frequencies 10000^(-i / (half - 1)) (the UNet's ``timestep_embedding``
    divides by ``half`` and puts cos first)."""
    if timesteps.ndim != 1:
        raise ValueError(f"get_timestep_embedding: timesteps must be 1-D, got shape {tuple(timesteps.shape)}.")
    half = embedding_dim // 2
    frequencies = torch.exp(
        torch.arange(half, dtype=torch.float32, device=timesteps.device) * -(math.log(10000) / (half - 1))
    )
    args = timesteps.float()[:, None] * frequencies[None]
    embedding = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(embedding, (0, 1)) if embedding_dim % 2 else embedding


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU, the activation used throughout the autoencoder."""
    return F.silu(x)


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm as CompVis configures it (32 groups, eps 1e-6, affine)."""
    if in_channels % num_groups != 0:
        raise ValueError(
            f"Normalize: {in_channels} channels cannot be split into {num_groups} groups; "
            f"use channel counts (ch * ch_mult) that are multiples of {num_groups}."
        )
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 convolution."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """x2 downsampling: stride-2 3x3 convolution after an asymmetric (right/bottom) zero pad.

    The asymmetric pad is what the released weights were trained with; a symmetric
    ``padding=1`` would shift every feature map by half a pixel.
    """

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block with an optional timestep projection."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float,
        temb_channels: int = 512,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            # [B, C, H, W] -> [B, 1 head, H*W, C]
            return t.reshape(b, c, height * width).transpose(1, 2).unsqueeze(1)

        attended = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        attended = attended.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(attended)


class LinAttnBlock(LinearAttention):
    """Single-head linear attention over all channels, usable where ``AttnBlock`` is."""

    def __init__(self, in_channels: int) -> None:
        super().__init__(dim=in_channels, heads=1, dim_head=in_channels)


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    """Attention layer factory: ``"vanilla"`` (AttnBlock), ``"linear"`` (LinAttnBlock) or ``"none"``."""
    if attn_type == "vanilla":
        return AttnBlock(in_channels)
    if attn_type == "linear":
        return LinAttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(
        f"make_attn: attn_type {attn_type!r} is not supported; use 'vanilla' (the SD v1 "
        "autoencoder), 'linear' or 'none'."
    )


def _plain_block(in_channels: int, out_channels: int, dropout: float) -> ResnetBlock:
    """Residual block without timestep input (the autoencoder is not time-conditioned)."""
    return ResnetBlock(in_channels=in_channels, out_channels=out_channels, temb_channels=0, dropout=dropout)


class MidBlock(nn.Module):
    """ResnetBlock, attention, ResnetBlock at the lowest resolution (keys ``mid.block_1`` ...);
    the blocks take a timestep embedding of ``temb_channels`` (0: none, as in the autoencoder)."""

    def __init__(self, channels: int, dropout: float, attn_type: str, temb_channels: int = 0) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, temb_channels=temb_channels,
                                   dropout=dropout)
        self.attn_1 = make_attn(channels, attn_type=attn_type)
        self.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, temb_channels=temb_channels,
                                   dropout=dropout)

    def forward(self, h: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h, temb)), temb)


def build_down_levels(
    ch: int,
    ch_mult: Sequence[int],
    num_res_blocks: int,
    attn_resolutions: Sequence[int],
    resolution: int,
    resamp_with_conv: bool,
    attn_type: str,
    block: Callable[[int, int], ResnetBlock],
) -> tuple[nn.ModuleList, int, int]:
    """The down path of ``Encoder`` and the pixel-space ``Model`` (keys ``down.{i}.block.{j}``,
    ``down.{i}.attn.{j}``, ``down.{i}.downsample``), its residual blocks made by
    ``block(channels_in, channels_out)``; returns it with its output channels and resolution."""
    in_ch_mult = (1, *ch_mult)
    levels = nn.ModuleList()
    current = resolution
    block_in = ch
    for level in range(len(ch_mult)):
        down = nn.Module()
        down.block, down.attn = nn.ModuleList(), nn.ModuleList()
        block_in = ch * in_ch_mult[level]
        for _ in range(num_res_blocks):
            down.block.append(block(block_in, ch * ch_mult[level]))
            block_in = ch * ch_mult[level]
            if current in attn_resolutions:
                down.attn.append(make_attn(block_in, attn_type=attn_type))
        if level != len(ch_mult) - 1:
            down.downsample = Downsample(block_in, resamp_with_conv)
            current //= 2
        levels.append(down)
    return levels, block_in, current


def _check_ddconfig(ch_mult: Sequence[int], resolution: int) -> None:
    if len(ch_mult) == 0:
        raise ValueError("ddconfig.ch_mult must list at least one channel multiplier, e.g. [1, 2, 4, 4].")
    factor = 2 ** (len(ch_mult) - 1)
    if resolution % factor != 0:
        raise ValueError(
            f"ddconfig.resolution {resolution} is not divisible by the total downsampling factor "
            f"{factor} implied by ch_mult {list(ch_mult)}; pick a resolution that is."
        )


class Encoder(nn.Module):
    """Image -> latent moments (``2 * z_channels`` channels when ``double_z``).

    ``give_pre_end`` and ``tanh_out`` are decoder options, accepted (and unused) so one
    ``ddconfig`` dictionary can build both halves, as in CompVis configs; like CompVis, other
    unknown keys are ignored too. ``use_linear_attn`` means ``attn_type="linear"``.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        give_pre_end: bool = False,
        tanh_out: bool = False,
        **ignore_kwargs: Any,
    ) -> None:
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        _check_ddconfig(ch_mult, resolution)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        self.in_ch_mult = (1, *ch_mult)
        self.down, block_in, _ = build_down_levels(
            ch, ch_mult, num_res_blocks, attn_resolutions, resolution, resamp_with_conv, attn_type,
            lambda channels_in, channels_out: _plain_block(channels_in, channels_out, dropout),
        )

        self.mid = MidBlock(block_in, dropout, attn_type)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image. ``double_z`` is an encoder option, accepted (and unused) so one
    ``ddconfig`` dictionary can build both halves, as in CompVis configs; like CompVis, other
    unknown keys are ignored too. ``use_linear_attn`` means ``attn_type="linear"``."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        double_z: bool = True,
        **ignorekwargs: Any,
    ) -> None:
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        _check_ddconfig(ch_mult, resolution)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[self.num_resolutions - 1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = MidBlock(block_in, dropout, attn_type)

        # Built from the lowest resolution upwards, stored so that up[i] pairs with down[i].
        ups: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(_plain_block(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type=attn_type))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)

        if self.give_pre_end:
            return h
        h = self.conv_out(nonlinearity(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


#: CompVis's names defined in modules that build on the blocks above (see ``__getattr__``).
_REEXPORTED = (
    "Model",
    "FirstStagePostProcessor",
    "LatentRescaler",
    "MergedRescaleDecoder",
    "MergedRescaleEncoder",
    "Resize",
    "SimpleDecoder",
    "Upsampler",
    "UpsampleDecoder",
)


def __getattr__(name: str) -> Any:
    """Resolve ``_REEXPORTED`` on first use (PEP 562), so that importing either module first works."""
    if name not in _REEXPORTED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ldm.modules.diffusionmodules.pixel_unet import Model  # noqa: F401
    from ldm.modules.diffusionmodules.rescalers import (  # noqa: F401
        FirstStagePostProcessor,
        LatentRescaler,
        MergedRescaleDecoder,
        MergedRescaleEncoder,
        Resize,
        SimpleDecoder,
        Upsampler,
        UpsampleDecoder,
    )

    return locals()[name]
