"""CompVis's layout-to-image latent diffusion: conditioned on tokenized bounding boxes
(``cond_stage_key: coordinates_bbox``); ``ldm.models.diffusion.ddpm`` re-exports the class."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ldm.models.diffusion.ddpm import LatentDiffusion

LAYOUT_KEY = "coordinates_bbox"


class Layout2ImgDiffusion(LatentDiffusion):
    """``LatentDiffusion`` whose conditioning is ``batch["coordinates_bbox"]``; its logged images
    add the boxes drawn by the dataset's conditional builder (``bbox_image``)."""

    def __init__(self, cond_stage_key: str, *args: Any, **kwargs: Any) -> None:
        if cond_stage_key != LAYOUT_KEY:
            raise ValueError(f"Layout2ImgDiffusion needs cond_stage_key: {LAYOUT_KEY}, got {cond_stage_key!r}.")
        super().__init__(*args, cond_stage_key=cond_stage_key, **kwargs)

    def log_images(self, batch: Mapping[str, Any], N: int = 8, *args: Any, **kwargs: Any) -> dict[str, Any]:
        logs = super().log_images(batch, N, *args, **kwargs)
        dataset = self.trainer.datamodule.datasets["train" if self.training else "validation"]
        builder = dataset.conditional_builders[self.cond_stage_key]

        def label(category_number: int) -> str:
            return dataset.get_textual_label(dataset.get_category_id(category_number))

        boxes = [builder.plot(tokens.detach().cpu(), label, (256, 256)) for tokens in batch[self.cond_stage_key][:N]]
        logs["bbox_image"] = torch.stack(boxes, dim=0)
        return logs
