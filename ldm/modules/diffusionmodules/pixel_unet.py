"""CompVis's pixel-space DDPM UNet (``Model``), built from the autoencoder's blocks.

Module names and state-dict keys (``temb.dense``, ``down.{i}.block``, ``mid.block_1``,
``up.{i}.upsample`` ...) are CompVis's; ``ldm.modules.diffusionmodules.model`` re-exports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldm.modules.diffusionmodules.model import (
    MidBlock,
    Normalize,
    ResnetBlock,
    Upsample,
    build_down_levels,
    get_timestep_embedding,
    make_attn,
    nonlinearity,
)


class Model(nn.Module):
    """UNet with ``num_res_blocks`` residual blocks per level, attention at ``attn_resolutions``
    and skip connections from every down block: ``forward(x, t, context)`` -> ``out_ch`` channels.

    ``use_timestep`` adds the DDPM timestep embedding (``t`` required); a ``context`` of the
    same spatial size is concatenated to ``x`` along channels (``in_channels`` counts both).
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
        use_timestep: bool = True,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
    ) -> None:
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        self.ch = ch
        self.temb_ch = ch * 4
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.use_timestep = use_timestep
        temb_ch = self.temb_ch if use_timestep else 0
        if use_timestep:
            self.temb = nn.Module()
            self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])

        def block(channels_in: int, channels_out: int) -> ResnetBlock:
            return ResnetBlock(in_channels=channels_in, out_channels=channels_out, temb_channels=temb_ch,
                               dropout=dropout)

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1, *ch_mult)
        self.down, block_in, current = build_down_levels(
            ch, ch_mult, num_res_blocks, attn_resolutions, resolution, resamp_with_conv, attn_type, block
        )
        self.mid = MidBlock(block_in, dropout, attn_type, temb_channels=temb_ch)

        ups: list[nn.Module] = []
        for level in reversed(range(self.num_resolutions)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for index in range(num_res_blocks + 1):
                skip = ch * (in_ch_mult[level] if index == num_res_blocks else ch_mult[level])
                up.block.append(block(block_in + skip, ch * ch_mult[level]))
                block_in = ch * ch_mult[level]
                if current in attn_resolutions:
                    up.attn.append(make_attn(block_in, attn_type=attn_type))
            if level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                current *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None:
            x = torch.cat((x, context), dim=1)
        temb = None
        if self.use_timestep:
            if t is None:
                raise ValueError("Model: use_timestep is set, so forward needs the timesteps t.")
            temb = self.temb.dense[1](nonlinearity(self.temb.dense[0](get_timestep_embedding(t, self.ch))))
        skips = [self.conv_in(x)]
        for level, down in enumerate(self.down):
            for index, res_block in enumerate(down.block):
                h = res_block(skips[-1], temb)
                skips.append(down.attn[index](h) if len(down.attn) else h)
            if level != self.num_resolutions - 1:
                skips.append(down.downsample(skips[-1]))
        h = self.mid(skips[-1], temb)
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for index, res_block in enumerate(up.block):
                h = res_block(torch.cat([h, skips.pop()], dim=1), temb)
                if len(up.attn):
                    h = up.attn[index](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))

    def get_last_layer(self) -> torch.Tensor:
        return self.conv_out.weight
