"""The diffusion UNet of latent diffusion (CompVis ``openaimodel.py`` interface).

Constructor signature, module tree and state-dict keys match CompVis, so
``configs/stable-diffusion/v1-inference.yaml``, the other CompVis LDM configs and their
checkpoints load unchanged: the spatial-transformer (cross-attention) UNet of SD v1 and the
self-attention (``AttentionBlock``) UNet of the unconditional and class-conditional LDMs,
optionally class-conditional (``num_classes``), with scale-shift norm, resblock
up/down-sampling, codebook-id prediction (``n_embed``) or a float16 torso (``use_fp16``).
The blocks live in ``unet_blocks`` and ``attention_blocks`` and the half UNet classifier in
``encoder_unet``; all are re-exported here under their CompVis names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.attention_blocks import (  # noqa: F401  (CompVis names)
    AttentionBlock,
    AttentionPool2d,
    QKVAttention,
    QKVAttentionLegacy,
    convert_module_to_f16,
    convert_module_to_f32,
    count_flops_attn,
)
from ldm.modules.diffusionmodules.encoder_unet import EncoderUNetModel  # noqa: F401
from ldm.modules.diffusionmodules.unet_blocks import (  # noqa: F401
    Downsample,
    ResBlock,
    TimestepBlock,
    TimestepEmbedSequential,
    TransposedUpsample,
    Upsample,
    build_down_path,
    res_block_factory,
    timestep_mlp,
)
from ldm.modules.diffusionmodules.util import conv_nd, normalization, timestep_embedding, zero_module


class UNetModel(nn.Module):
    """The diffusion UNet: ``forward(x, timesteps, context, y)`` -> eps (or v) prediction.

    Attention layers are ``SpatialTransformer`` (cross-attention to ``context``) with
    ``use_spatial_transformer``, else ``AttentionBlock`` (self-attention; upsampling levels use
    ``num_heads_upsample`` heads, which defaults to ``num_heads``). Heads per level follow
    CompVis: ``num_head_channels`` fixes the head width, otherwise ``num_heads`` the head
    count; ``legacy`` keeps CompVis's original head-width rule. ``use_fp16`` casts the torso
    (input, middle and output blocks) to float16; the input is cast to the torso's dtype and
    the output back to the input's. ``use_checkpoint`` also controls the transformer blocks
    (CompVis v1 always checkpoints them). With ``n_embed`` forward returns codebook-id logits.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0,
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
        _check_supported(use_spatial_transformer=use_spatial_transformer, context_dim=context_dim, dims=dims,
                         num_heads=num_heads, num_head_channels=num_head_channels)
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
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.use_spatial_transformer = use_spatial_transformer
        self.use_new_attention_order = use_new_attention_order
        self.legacy = legacy
        self.context_dim = context_dim
        self.transformer_depth = transformer_depth
        self.predict_codebook_ids = n_embed is not None

        time_embed_dim = model_channels * 4
        self.time_embed = timestep_mlp(model_channels)
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        res_block = res_block_factory(time_embed_dim, dropout, dims, use_checkpoint, use_scale_shift_norm)

        down_path = build_down_path(in_channels, model_channels, self.channel_mult, num_res_blocks,
                                    self.attention_resolutions, conv_resample, resblock_updown, dims,
                                    res_block, self._attention)
        self.input_blocks, self.middle_block = down_path.input_blocks, down_path.middle_block
        self._feature_size = down_path.feature_size
        input_block_chans = down_path.skip_channels
        ch, ds = down_path.channels, down_path.downsampling

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, upsampling=True))
                if level and i == num_res_blocks:
                    up = res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims=dims)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1))
        )
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(normalization(ch), conv_nd(dims, model_channels, n_embed, 1))
        if use_fp16:
            self.convert_to_fp16()

    def _attention(self, channels: int, upsampling: bool = False) -> nn.Module:
        """The attention layer at a level with ``channels`` channels (CompVis's head rule)."""
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, channels // self.num_heads
        else:
            heads, dim_head = channels // self.num_head_channels, self.num_head_channels
        if self.legacy:
            dim_head = channels // heads if self.use_spatial_transformer else self.num_head_channels
        if self.use_spatial_transformer:
            return SpatialTransformer(channels, heads, dim_head, depth=self.transformer_depth,
                                      context_dim=self.context_dim, use_checkpoint=self.use_checkpoint)
        return AttentionBlock(
            channels,
            num_heads=self.num_heads_upsample if upsampling else heads,
            num_head_channels=dim_head,
            use_checkpoint=self.use_checkpoint,
            use_new_attention_order=self.use_new_attention_order,
        )

    def convert_to_fp16(self) -> None:
        """Cast the torso (input, middle and output blocks) to float16."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_f16)

    def convert_to_fp32(self) -> None:
        """Cast the torso back to float32."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_f32)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        """Predict from ``x`` [B, C, H, W] at ``timesteps`` [B] given ``context`` [B, L, context_dim].

        ``context`` is required exactly for the cross-attention UNet; ``y`` [B] holds class
        labels and is required exactly when ``num_classes`` is set. Extra keyword arguments
        are accepted and ignored, as in CompVis.
        """
        self._check_inputs(x, timesteps, context, y)
        torso = self.input_blocks[0][0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        emb = emb.to(torso)
        h = x.to(torso)
        if context is not None:
            context = context.to(torso)
        skips = []
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
        head = self.id_predictor if self.predict_codebook_ids else self.out
        return head(h.to(head[-1].weight.dtype)).to(x.dtype)

    def _check_inputs(
        self, x: torch.Tensor, timesteps: torch.Tensor | None, context: torch.Tensor | None, y: torch.Tensor | None
    ) -> None:
        if x.ndim < 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [B, {self.in_channels}, H, W], got {tuple(x.shape)}.")
        factor = 2 ** (len(self.channel_mult) - 1)
        if any(size % factor for size in x.shape[2:]):
            raise ValueError(
                f"x's spatial size {tuple(x.shape[2:])} must be multiples of {factor} "
                f"({len(self.channel_mult)} resolution levels)."
            )
        if timesteps is None or timesteps.shape != (x.shape[0],):
            got = None if timesteps is None else tuple(timesteps.shape)
            raise ValueError(f"timesteps must be a 1-D tensor with one entry per sample ({x.shape[0]}), got {got}.")
        if self.use_spatial_transformer:
            got = None if context is None else tuple(context.shape)
            if got is None or len(got) != 3 or got[0] != x.shape[0] or got[2] != self.context_dim:
                raise ValueError(f"context must be [B={x.shape[0]}, L, {self.context_dim}], got {got}.")
        if (y is None) != (self.num_classes is None):
            raise ValueError(
                "class labels y must be given if and only if the model is class-conditional "
                f"(num_classes={self.num_classes})."
            )


def _check_supported(
    *, use_spatial_transformer: bool, context_dim: object, dims: int, num_heads: int, num_head_channels: int
) -> None:
    """Reject inconsistent configurations, naming the option."""
    if num_heads == -1 and num_head_channels == -1:
        raise ValueError("Set num_heads or num_head_channels (num_head_channels wins when both are set).")
    if not use_spatial_transformer:
        if context_dim is not None:
            raise ValueError("context_dim is set but use_spatial_transformer is False; cross-attention needs "
                             "use_spatial_transformer: True.")
        return
    if not isinstance(context_dim, int) or isinstance(context_dim, bool):
        raise ValueError(f"context_dim must be an integer (the text embedding width), got {context_dim!r}.")
    if dims != 2:
        raise ValueError(f"dims={dims} with use_spatial_transformer: the spatial transformer is 2-D; use dims=2.")
