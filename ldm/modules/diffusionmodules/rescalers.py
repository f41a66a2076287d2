"""CompVis's latent rescaling encoders / decoders and small decoders, built from the
autoencoder's blocks. Module names and state-dict keys are CompVis's;
``ldm.modules.diffusionmodules.model`` re-exports every class here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.model import (
    AttnBlock,
    Decoder,
    Downsample,
    Encoder,
    Normalize,
    ResnetBlock,
    Upsample,
    nonlinearity,
)
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config


def _block(channels_in: int, channels_out: int, dropout: float = 0.0) -> ResnetBlock:
    return ResnetBlock(in_channels=channels_in, out_channels=channels_out, temb_channels=0, dropout=dropout)


class SimpleDecoder(nn.Module):
    """1x1 conv, three residual blocks (x2, x4, x2 channels), 1x1 conv, 2x upsampling, output conv."""

    def __init__(self, in_channels: int, out_channels: int, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        c = in_channels
        self.model = nn.ModuleList([nn.Conv2d(c, c, 1), _block(c, 2 * c), _block(2 * c, 4 * c), _block(4 * c, 2 * c),
                                    nn.Conv2d(2 * c, c, 1), Upsample(c, with_conv=True)])
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.model:
            x = layer(x, None) if isinstance(layer, ResnetBlock) else layer(x)
        return self.conv_out(nonlinearity(self.norm_out(x)))


class UpsampleDecoder(nn.Module):
    """Per level ``num_res_blocks + 1`` residual blocks to ``ch * ch_mult[level]`` channels, then
    2x upsampling (except after the last level), then the output conv."""

    def __init__(self, in_channels: int, out_channels: int, ch: int, num_res_blocks: int, resolution: int,
                 ch_mult: Sequence[int] = (2, 2), dropout: float = 0.0) -> None:
        super().__init__()
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = in_channels
        self.res_blocks = nn.ModuleList()
        self.upsample_blocks = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(_block(block_in, ch * mult, dropout))
                block_in = ch * mult
            self.res_blocks.append(nn.ModuleList(blocks))
            if level != self.num_resolutions - 1:
                self.upsample_blocks.append(Upsample(block_in, True))
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for level, blocks in enumerate(self.res_blocks):
            for res_block in blocks:
                h = res_block(h, None)
            if level != self.num_resolutions - 1:
                h = self.upsample_blocks[level](h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class LatentRescaler(nn.Module):
    """conv, ``depth`` residual blocks, resize by ``factor``, attention, ``depth`` blocks, 1x1 conv."""

    def __init__(self, factor: float, in_channels: int, mid_channels: int, out_channels: int, depth: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.conv_in = nn.Conv2d(in_channels, mid_channels, kernel_size=3, stride=1, padding=1)
        self.res_block1 = nn.ModuleList(_block(mid_channels, mid_channels) for _ in range(depth))
        self.attn = AttnBlock(mid_channels)
        self.res_block2 = nn.ModuleList(_block(mid_channels, mid_channels) for _ in range(depth))
        self.conv_out = nn.Conv2d(mid_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for res_block in self.res_block1:
            x = res_block(x, None)
        size = (int(round(x.shape[2] * self.factor)), int(round(x.shape[3] * self.factor)))
        x = self.attn(F.interpolate(x, size=size))
        for res_block in self.res_block2:
            x = res_block(x, None)
        return self.conv_out(x)


class MergedRescaleEncoder(nn.Module):
    """``Encoder`` to ``ch * ch_mult[-1]`` channels followed by a ``LatentRescaler`` to ``out_ch``."""

    def __init__(self, in_channels: int, ch: int, resolution: int, out_ch: int, num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 ch_mult: Sequence[int] = (1, 2, 4, 8), rescale_factor: float = 1.0,
                 rescale_module_depth: int = 1) -> None:
        super().__init__()
        intermediate = ch * ch_mult[-1]
        self.encoder = Encoder(in_channels=in_channels, num_res_blocks=num_res_blocks, ch=ch, ch_mult=ch_mult,
                               z_channels=intermediate, double_z=False, resolution=resolution,
                               attn_resolutions=attn_resolutions, dropout=dropout, resamp_with_conv=resamp_with_conv,
                               out_ch=None)
        self.rescaler = LatentRescaler(factor=rescale_factor, in_channels=intermediate, mid_channels=intermediate,
                                       out_channels=out_ch, depth=rescale_module_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rescaler(self.encoder(x))


class MergedRescaleDecoder(nn.Module):
    """A ``LatentRescaler`` to ``z_channels * ch_mult[-1]`` channels followed by a ``Decoder``."""

    def __init__(self, z_channels: int, out_ch: int, resolution: int, num_res_blocks: int,
                 attn_resolutions: Sequence[int], ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8),
                 dropout: float = 0.0, resamp_with_conv: bool = True, rescale_factor: float = 1.0,
                 rescale_module_depth: int = 1) -> None:
        super().__init__()
        intermediate = z_channels * ch_mult[-1]
        self.decoder = Decoder(out_ch=out_ch, z_channels=intermediate, attn_resolutions=attn_resolutions,
                               dropout=dropout, resamp_with_conv=resamp_with_conv, in_channels=None,
                               num_res_blocks=num_res_blocks, ch_mult=ch_mult, resolution=resolution, ch=ch)
        self.rescaler = LatentRescaler(factor=rescale_factor, in_channels=z_channels, mid_channels=intermediate,
                                       out_channels=intermediate, depth=rescale_module_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.rescaler(x))


class Upsampler(nn.Module):
    """From ``in_size`` to ``out_size`` pixels: a ``LatentRescaler`` then a ``Decoder`` with
    log2(out_size / in_size) + 1 levels of ``ch_mult`` each."""

    def __init__(self, in_size: int, out_size: int, in_channels: int, out_channels: int, ch_mult: int = 2) -> None:
        super().__init__()
        if out_size < in_size:
            raise ValueError(f"Upsampler: out_size {out_size} is smaller than in_size {in_size}.")
        levels = int(math.log2(out_size // in_size)) + 1
        factor = 1.0 + (out_size % in_size)
        self.rescaler = LatentRescaler(factor=factor, in_channels=in_channels, mid_channels=2 * in_channels,
                                       out_channels=in_channels)
        self.decoder = Decoder(out_ch=out_channels, resolution=out_size, z_channels=in_channels, num_res_blocks=2,
                               attn_resolutions=[], in_channels=None, ch=in_channels,
                               ch_mult=[ch_mult] * levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.rescaler(x))


class Resize(nn.Module):
    """Fixed interpolation by ``scale_factor`` (``mode``); learned resizing is not available."""

    def __init__(self, in_channels: int | None = None, learned: bool = False, mode: str = "bilinear") -> None:
        super().__init__()
        if learned:
            raise NotImplementedError("Resize: learned=True is not implemented (nor in CompVis); use learned=False.")
        self.with_conv = learned
        self.mode = mode

    def forward(self, x: torch.Tensor, scale_factor: float = 1.0) -> torch.Tensor:
        if scale_factor == 1.0:
            return x
        return F.interpolate(x, mode=self.mode, align_corners=False, scale_factor=scale_factor)


class FirstStagePostProcessor(nn.Module):
    """Frozen first-stage encoding, then norm, conv and per ``ch_mult`` a residual block and 2x
    average pooling; with ``reshape`` the result is [B, H*W, C] tokens."""

    def __init__(self, ch_mult: list, in_channels: int, pretrained_model: nn.Module = None, reshape: bool = False,
                 n_channels: int | None = None, dropout: float = 0.0, pretrained_config: Any = None) -> None:
        super().__init__()
        if pretrained_config is not None:
            self.instantiate_pretrained(pretrained_config)
        elif pretrained_model is not None:
            self.pretrained_model = pretrained_model
        else:
            raise ValueError("FirstStagePostProcessor: pass pretrained_model or pretrained_config.")
        self.do_reshape = reshape
        if n_channels is None:
            n_channels = self.pretrained_model.encoder.ch
        self.proj_norm = Normalize(in_channels, num_groups=in_channels // 2)
        self.proj = nn.Conv2d(in_channels, n_channels, kernel_size=3, stride=1, padding=1)
        blocks, downs = [], []
        channels = n_channels
        for mult in ch_mult:
            blocks.append(ResnetBlock(in_channels=channels, out_channels=mult * n_channels, dropout=dropout))
            channels = mult * n_channels
            downs.append(Downsample(channels, with_conv=False))
        self.model = nn.ModuleList(blocks)
        self.downsampler = nn.ModuleList(downs)

    def instantiate_pretrained(self, config: Any) -> None:
        self.pretrained_model = instantiate_from_config(config).eval()
        for param in self.pretrained_model.parameters():
            param.requires_grad = False

    @torch.no_grad()
    def encode_with_pretrained(self, x: torch.Tensor) -> torch.Tensor:
        encoded = self.pretrained_model.encode(x)
        return encoded.mode() if isinstance(encoded, DiagonalGaussianDistribution) else encoded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = nonlinearity(self.proj(self.proj_norm(self.encode_with_pretrained(x))))
        for res_block, down in zip(self.model, self.downsampler):
            z = down(res_block(z, temb=None))
        return z.flatten(2).transpose(1, 2) if self.do_reshape else z
