"""Vector quantisation of the VQ autoencoders (``VQModel``): the nearest codebook entry per position.

Interface and state-dict keys (``embedding.weight``, and ``used`` with ``remap``) are those of
taming-transformers' ``VectorQuantizer2``, which CompVis's VQ first stages use, so their
checkpoints load; the code is this project's own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

_UNKNOWN_INDEX = ("random", "extra")


class VectorQuantizer(nn.Module):
    """Replace each ``e_dim``-vector of a [B, e_dim, H, W] map by its nearest of ``n_e`` codes.

    forward returns ``(z_q, loss, (perplexity, min_encodings, indices))`` with ``z_q`` carrying
    straight-through gradients to the input and ``loss`` the codebook plus ``beta``-weighted
    commitment loss (``legacy`` puts ``beta`` on the codebook term, as the released models
    were trained). ``perplexity`` and ``min_encodings`` are None, as in taming's version.
    ``remap`` names a ``.npy`` file of the codebook indices in use; indices are then
    renumbered to positions in that list, unknown ones to a random used index or to an
    ``"extra"`` one. ``sane_index_shape`` returns indices as [B, H, W] instead of flat.
    """

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float,
        remap: str | None = None,
        unknown_index: str | int = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
    ) -> None:
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        self.remap = remap
        self.re_embed = n_e
        if remap is not None:
            if not Path(remap).is_file():
                raise FileNotFoundError(f"VectorQuantizer: remap file {remap!r} does not exist; pass a .npy "
                                        "file of the codebook indices in use, or remap=None.")
            self.register_buffer("used", torch.from_numpy(np.load(remap)).long())
            if not (isinstance(unknown_index, int) or unknown_index in _UNKNOWN_INDEX):
                raise ValueError(f"VectorQuantizer: unknown_index must be an int or one of {_UNKNOWN_INDEX}.")
            self.unknown_index = unknown_index
            if unknown_index == "extra":
                self.unknown_index = self.used.shape[0]
            self.re_embed = self.used.shape[0] + (1 if unknown_index == "extra" else 0)
        self.sane_index_shape = sane_index_shape

    def remap_to_used(self, inds: torch.Tensor) -> torch.Tensor:
        """Codebook indices -> positions in ``used`` (unknown ones per ``unknown_index``)."""
        shape = inds.shape
        flat = inds.reshape(shape[0], -1)
        match = flat[:, :, None] == self.used.to(flat)[None, None]
        new = match.int().argmax(-1)
        unknown = ~match.any(-1)
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=(int(unknown.sum()),), device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(shape)

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        """Positions in ``used`` -> codebook indices (the extra index maps to code 0)."""
        shape = inds.shape
        flat = inds.reshape(shape[0], -1)
        used = self.used.to(flat)
        flat = torch.where(flat >= used.shape[0], torch.zeros_like(flat), flat)
        return used[flat].reshape(shape)

    def forward(
        self, z: torch.Tensor, temp: float | None = None, rescale_logits: bool = False, return_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[None, None, torch.Tensor]]:
        if temp not in (None, 1.0) or rescale_logits or return_logits:
            raise ValueError("VectorQuantizer: temp, rescale_logits and return_logits are Gumbel options; "
                             "leave them at their defaults.")
        channels_last = z.permute(0, 2, 3, 1).contiguous()
        flat = channels_last.reshape(-1, self.e_dim)
        codebook = self.embedding.weight
        distances = (flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None]
                     - 2 * flat @ codebook.t())
        indices = distances.argmin(dim=1)
        z_q = self.embedding(indices).view(channels_last.shape)
        codebook_loss = torch.mean((z_q - channels_last.detach()) ** 2)
        commitment_loss = torch.mean((z_q.detach() - channels_last) ** 2)
        if self.legacy:
            loss = commitment_loss + self.beta * codebook_loss
        else:
            loss = self.beta * commitment_loss + codebook_loss
        z_q = channels_last + (z_q - channels_last).detach()
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
        if self.remap is not None:
            indices = self.remap_to_used(indices.reshape(z.shape[0], -1)).flatten()
        if self.sane_index_shape:
            indices = indices.reshape(z.shape[0], z.shape[2], z.shape[3])
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, int, int, int] | None) -> torch.Tensor:
        """Codes of ``indices``; with ``shape`` = (B, H, W, C) as a [B, C, H, W] map, else [N, C]."""
        if self.remap is not None:
            indices = self.unmap_to_all(indices.reshape(shape[0] if shape else 1, -1)).flatten()
        z_q = self.embedding(indices.flatten())
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q

    def embed_code(self, code_b: torch.Tensor) -> torch.Tensor:
        """[B, H, W] codebook indices -> [B, e_dim, H, W] codes (``VQModel.decode_code``)."""
        batch, height, width = code_b.shape
        return self.get_codebook_entry(code_b.reshape(batch, -1), (batch, height, width, self.e_dim))
