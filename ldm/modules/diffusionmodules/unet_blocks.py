"""Building blocks of the diffusion UNets: timestep-conditioned residual blocks, resampling
layers and the sequence that routes timestep embeddings and context to its children.

Module names, constructor parameters and state-dict keys are CompVis's; ``openaimodel``
re-exports every class here.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import avg_pool_nd, checkpoint, conv_nd, linear, normalization, zero_module


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the module to ``x`` given the timestep embeddings ``emb``."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequence that hands the timestep embedding and the context to the children needing them."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class _Resample(nn.Module):
    """What ``Upsample`` and ``Downsample`` share: their attributes and the channel checks."""

    def __init__(self, channels: int, use_conv: bool, dims: int, out_channels: int | None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if not use_conv and self.out_channels != channels:
            raise ValueError(
                f"{type(self).__name__} without a conv cannot change the number of channels; set use_conv=True."
            )


class Upsample(_Resample):
    """Nearest-neighbour 2x upsampling (3-D: inner two dims only), optionally followed by a 3x3 conv."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1
    ) -> None:
        super().__init__(channels, use_conv, dims, out_channels)
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_channels(x, self.channels, "Upsample")
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class TransposedUpsample(nn.Module):
    """Learned 2x upsampling: a stride-2 transposed convolution without padding."""

    def __init__(self, channels: int, out_channels: int | None = None, ks: int = 5) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.up = nn.ConvTranspose2d(self.channels, self.out_channels, kernel_size=ks, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class Downsample(_Resample):
    """2x downsampling (3-D: inner two dims only) by a strided 3x3 conv or by average pooling."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1
    ) -> None:
        super().__init__(channels, use_conv, dims, out_channels)
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_channels(x, self.channels, "Downsample")
        return self.op(x)


def _check_channels(x: torch.Tensor, channels: int, layer: str) -> None:
    if x.shape[1] != channels:
        raise ValueError(f"{layer} expects {channels} input channels, got {x.shape[1]}.")


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (added, or as scale and shift)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *((1,) * (h.ndim - emb_out.ndim)))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def timestep_mlp(model_channels: int) -> nn.Sequential:
    """The UNets' ``time_embed``: sinusoidal features of width ``model_channels`` -> 4x wider embedding."""
    time_embed_dim = model_channels * 4
    return nn.Sequential(linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim))


def res_block_factory(emb_channels: int, dropout: float, dims: int, use_checkpoint: bool,
                      use_scale_shift_norm: bool) -> Callable[..., ResBlock]:
    """``res_block(channels, out=None, up=False, down=False)``: a UNet's ``ResBlock`` with its shared settings."""

    def res_block(channels: int, out: int | None = None, **updown: bool) -> ResBlock:
        return ResBlock(channels, emb_channels, dropout, out_channels=out, dims=dims, use_checkpoint=use_checkpoint,
                        use_scale_shift_norm=use_scale_shift_norm, **updown)

    return res_block


@dataclass
class DownPath:
    """The down path and middle block of a UNet, with what the layers after them need to know."""

    input_blocks: nn.ModuleList
    middle_block: TimestepEmbedSequential
    skip_channels: list[int]  # output channels of every input block, for the up path's skips
    channels: int  # at the middle block
    downsampling: int  # total downsampling factor at the middle block
    feature_size: int  # summed channels of all blocks (the "spatial" pooling heads' input width)


def build_down_path(
    in_channels: int,
    model_channels: int,
    channel_mult: Sequence[int],
    num_res_blocks: int,
    attention_resolutions: Sequence[int],
    conv_resample: bool,
    resblock_updown: bool,
    dims: int,
    res_block: Callable[..., ResBlock],
    attention: Callable[[int], nn.Module],
) -> DownPath:
    """CompVis's UNet down path (``input_blocks``) and ``middle_block``, shared by ``UNetModel`` and
    ``EncoderUNetModel``. ``res_block(channels, out=None, down=False)`` and ``attention(channels)``
    build the layers, so each model keeps its own settings for them."""
    input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))])
    feature_size = model_channels
    skip_channels = [model_channels]
    ch = model_channels
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
            ch = mult * model_channels
            if ds in attention_resolutions:
                layers.append(attention(ch))
            input_blocks.append(TimestepEmbedSequential(*layers))
            feature_size += ch
            skip_channels.append(ch)
        if level != len(channel_mult) - 1:
            down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims=dims)
            input_blocks.append(TimestepEmbedSequential(down))
            skip_channels.append(ch)
            ds *= 2
            feature_size += ch
    middle_block = TimestepEmbedSequential(res_block(ch), attention(ch), res_block(ch))
    return DownPath(input_blocks, middle_block, skip_channels, ch, ds, feature_size + ch)
