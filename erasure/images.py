"""Image files as tensors: list a folder's images, check they share one size, read them as uint8.

The one image reader of the project: training images, classifier data, evaluation folders and
scene caches are all read here. Images travel as uint8 [N, 3, H, W] (what PNG stores) or float in
[0, 1]; ``unit_float`` turns either into the latter.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from erasure.errors import ImageDataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def list_images(folder: str | Path) -> list[Path]:
    """Image files (sorted by name) directly inside ``folder``; a missing or image-less folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageDataError(f"Image folder {folder} does not exist; check the path (or generate the images first).")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ImageDataError(
            f"Image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); generate them first "
            f"(eval-scripts/generate-data.py or generate-images.py)."
        )
    return paths


def common_size(paths: Sequence[Path]) -> tuple[int, int]:
    """(width, height) shared by all images (read from headers only); mixed sizes are an error."""
    first_size: tuple[int, int] | None = None
    for path in paths:
        with Image.open(path) as picture:
            size = picture.size
        if first_size is None:
            first_size = size
        elif size != first_size:
            raise ImageDataError(
                f"Images of different sizes: {paths[0]} is {first_size[0]}x{first_size[1]} but {path} is "
                f"{size[0]}x{size[1]}; one folder (or data set) must hold images from one model and image size."
            )
    if first_size is None:
        raise ImageDataError("No images given.")
    return first_size


def read_image(path: str | Path) -> torch.Tensor:
    """One image as uint8 [3, H, W] (RGB)."""
    with Image.open(path) as picture:
        array = np.asarray(picture.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def read_images(paths: Sequence[Path]) -> torch.Tensor:
    """Images of one size as uint8 [N, 3, H, W] (sizes checked first)."""
    common_size(paths)
    return torch.stack([read_image(path) for path in paths])


def unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images -> float [0, 1]."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float images [B, C, H, W] -> [B, C, size, size] (antialiased bilinear; unchanged when already that size)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
