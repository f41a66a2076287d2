"""The half UNet (down path and middle block) with a pooling head: CompVis's
``EncoderUNetModel``, used as a noisy-image classifier (``ldm/models/diffusion/classifier.py``).

Module names and state-dict keys are CompVis's; ``openaimodel`` re-exports the class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ldm.modules.diffusionmodules.attention_blocks import (
    AttentionBlock,
    AttentionPool2d,
    convert_module_to_f16,
    convert_module_to_f32,
)
from ldm.modules.diffusionmodules.unet_blocks import build_down_path, res_block_factory, timestep_mlp
from ldm.modules.diffusionmodules.util import conv_nd, normalization, timestep_embedding, zero_module

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


class EncoderUNetModel(nn.Module):
    """``forward(x, timesteps)`` -> [B, out_channels] from the UNet's down path and middle block.

    ``pool``: ``"adaptive"`` (norm, SiLU, global average, zero-initialised 1x1 conv),
    ``"attention"`` (``AttentionPool2d``; needs ``num_head_channels``), ``"spatial"`` /
    ``"spatial_v2"`` (an MLP on the spatial means of every block's output, concatenated).
    ``use_fp16`` casts the torso to float16. Extra positional and keyword arguments are
    accepted and ignored, as in CompVis.
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
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"EncoderUNetModel: pool must be one of {POOLS}, got {pool!r}.")
        if pool == "attention" and num_head_channels == -1:
            raise ValueError("EncoderUNetModel: pool='attention' needs num_head_channels.")
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = list(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = list(channel_mult)
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.pool = pool

        time_embed_dim = model_channels * 4
        self.time_embed = timestep_mlp(model_channels)

        res_block = res_block_factory(time_embed_dim, dropout, dims, use_checkpoint, use_scale_shift_norm)

        def attention(channels: int) -> AttentionBlock:
            return AttentionBlock(channels, num_heads=num_heads, num_head_channels=num_head_channels,
                                  use_checkpoint=use_checkpoint, use_new_attention_order=use_new_attention_order)

        down_path = build_down_path(in_channels, model_channels, self.channel_mult, num_res_blocks,
                                    self.attention_resolutions, conv_resample, resblock_updown, dims,
                                    res_block, attention)
        self.input_blocks, self.middle_block = down_path.input_blocks, down_path.middle_block
        self._feature_size = down_path.feature_size
        ch, ds = down_path.channels, down_path.downsampling

        if pool == "adaptive":
            self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                                     zero_module(conv_nd(dims, ch, out_channels, 1)), nn.Flatten())
        elif pool == "attention":
            self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                     AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels))
        elif pool == "spatial":
            self.out = nn.Sequential(nn.Linear(self._feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
        else:
            self.out = nn.Sequential(nn.Linear(self._feature_size, 2048), normalization(2048), nn.SiLU(),
                                     nn.Linear(2048, out_channels))
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self) -> None:
        """Cast the torso (input and middle blocks) to float16."""
        self.input_blocks.apply(convert_module_to_f16)
        self.middle_block.apply(convert_module_to_f16)

    def convert_to_fp32(self) -> None:
        """Cast the torso back to float32."""
        self.input_blocks.apply(convert_module_to_f32)
        self.middle_block.apply(convert_module_to_f32)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        torso = self.input_blocks[0][0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
        emb = emb.to(torso)
        spatial = self.pool.startswith("spatial")
        means = []
        h = x.to(torso)
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                means.append(h.to(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.to(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        return self.out(h.to(x.dtype))
