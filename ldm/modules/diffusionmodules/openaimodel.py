"""The text-conditioned diffusion UNet of Stable Diffusion v1 (CompVis ``openaimodel.py`` interface).

Constructor signature, module tree and state-dict keys match CompVis, so
``configs/stable-diffusion/v1-inference.yaml`` and the released checkpoints load unchanged.
Supported: the spatial-transformer (cross-attention) UNet of SD v1 and smaller variants of
it, optionally class-conditional (``num_classes``), with scale-shift norm or resblock
up/down-sampling. Options only other LDMs use raise ``NotImplementedError``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


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


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (3-D: inner two dims only), optionally followed by a 3x3 conv."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)
        elif self.out_channels != channels:
            raise ValueError("Upsample without a conv cannot change the number of channels; set use_conv=True.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_channels(x, self.channels, "Upsample")
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling (3-D: inner two dims only) by a strided 3x3 conv or by average pooling."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        elif self.out_channels != channels:
            raise ValueError("Downsample without a conv cannot change the number of channels; set use_conv=True.")
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


class UNetModel(nn.Module):
    """The diffusion UNet: ``forward(x, timesteps, context)`` -> eps (or v) prediction.

    ``num_heads_upsample`` and ``use_new_attention_order`` only concern the self-attention
    ``AttentionBlock`` of non-text LDMs, which is not implemented; ``use_fp16`` is replaced by
    casting the module (``.half()`` / ``.to(dtype)``): forward follows the module's dtype.
    ``use_checkpoint`` also controls the transformer blocks (CompVis v1 always checkpoints them).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
    ) -> None:
        super().__init__()
        _check_supported(
            use_fp16=use_fp16,
            use_new_attention_order=use_new_attention_order,
            n_embed=n_embed,
            use_spatial_transformer=use_spatial_transformer,
            context_dim=context_dim,
            dims=dims,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            num_heads_upsample=num_heads_upsample,
        )
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = list(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = list(channel_mult)
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.legacy = legacy
        self.context_dim = context_dim
        self.transformer_depth = transformer_depth

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res_block(channels: int, out: int | None = None, **updown: bool) -> ResBlock:
            return ResBlock(
                channels,
                time_embed_dim,
                dropout,
                out_channels=out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                **updown,
            )

        def transformer(channels: int) -> SpatialTransformer:
            heads, dim_head = self._heads_and_dim_head(channels)
            return SpatialTransformer(
                channels, heads, dim_head, depth=transformer_depth, context_dim=context_dim,
                use_checkpoint=use_checkpoint,
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims=dims)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch), transformer(ch), res_block(ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    up = res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims=dims)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1))
        )

    def _heads_and_dim_head(self, channels: int) -> tuple[int, int]:
        """Attention heads and head width at a level with ``channels`` channels (CompVis rule)."""
        if self.num_head_channels == -1:
            heads = self.num_heads
        else:
            heads = channels // self.num_head_channels
        # CompVis's legacy and non-legacy branches agree for spatial transformers.
        return heads, channels // heads

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        """Predict from ``x`` [B, C, H, W] at ``timesteps`` [B] given ``context`` [B, L, context_dim].

        ``y`` [B] holds class labels and is required exactly when ``num_classes`` is set.
        Extra keyword arguments are accepted and ignored, as in CompVis.
        """
        self._check_inputs(x, timesteps, context, y)
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        h = x.to(dtype)
        context = context.to(dtype)
        skips = []
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).to(x.dtype)

    def _check_inputs(
        self, x: torch.Tensor, timesteps: torch.Tensor | None, context: torch.Tensor | None, y: torch.Tensor | None
    ) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [B, {self.in_channels}, H, W], got {tuple(x.shape)}.")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"x's height and width {tuple(x.shape[2:])} must be multiples of {factor} "
                f"({len(self.channel_mult)} resolution levels)."
            )
        if timesteps is None or timesteps.shape != (x.shape[0],):
            got = None if timesteps is None else tuple(timesteps.shape)
            raise ValueError(f"timesteps must be a 1-D tensor with one entry per sample ({x.shape[0]}), got {got}.")
        got = None if context is None else tuple(context.shape)
        if got is None or len(got) != 3 or got[0] != x.shape[0] or got[2] != self.context_dim:
            raise ValueError(f"context must be [B={x.shape[0]}, L, {self.context_dim}], got {got}.")
        if (y is None) != (self.num_classes is None):
            raise ValueError(
                "class labels y must be given if and only if the model is class-conditional "
                f"(num_classes={self.num_classes})."
            )


def _check_supported(
    *,
    use_fp16: bool,
    use_new_attention_order: bool,
    n_embed: int | None,
    use_spatial_transformer: bool,
    context_dim: object,
    dims: int,
    num_heads: int,
    num_head_channels: int,
    num_heads_upsample: int,
) -> None:
    """Reject configurations this UNet does not implement, naming the option."""
    if use_fp16:
        raise NotImplementedError("use_fp16 is not supported; cast the model instead (model.half() or .to(dtype)).")
    if use_new_attention_order:
        raise NotImplementedError("use_new_attention_order (AttentionBlock variant) is not supported; set it False.")
    if n_embed is not None:
        raise NotImplementedError("n_embed (codebook-id prediction) is not supported; leave it unset.")
    if not use_spatial_transformer:
        raise NotImplementedError(
            "use_spatial_transformer=False (self-attention-only AttentionBlock UNet) is not supported; "
            "set use_spatial_transformer: True and context_dim."
        )
    if not isinstance(context_dim, int) or isinstance(context_dim, bool):
        raise ValueError(f"context_dim must be an integer (the text embedding width), got {context_dim!r}.")
    if dims != 2:
        raise NotImplementedError(f"dims={dims} is not supported: the spatial transformer is 2-D; use dims=2.")
    if num_heads == -1 and num_head_channels == -1:
        raise ValueError("Set num_heads or num_head_channels (num_head_channels wins when both are set).")
    if num_heads_upsample not in (-1, num_heads):
        raise NotImplementedError(
            "num_heads_upsample only affects the AttentionBlock path, which is not supported; leave it at -1."
        )
