"""Before/after evidence of an erasure: a PNG grid of the same seeds and a per-class accuracy table.

For the toy world (the quick start): every class prompt ("" and the nine artists) is sampled
with the same seeds with the increments switched off (the original model) and on (the erased
model); a classifier (the toy oracle's artist head) labels every image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from erasure.bases import normalise_prompt
from erasure.files import write_json
from erasure.sampling import sample_images, save_png
from ldm.modules.incremental_linear import increments_disabled

GRID_PADDING = 2


def image_grid(rows: Sequence[torch.Tensor], padding: int = GRID_PADDING) -> torch.Tensor:
    """Tile rows of images ([N, 3, H, W] each, equal N) into one [3, H', W'] image on white."""
    count, channels, height, width = rows[0].shape
    grid = torch.ones(channels, len(rows) * (height + padding) + padding, count * (width + padding) + padding)
    for row_index, row in enumerate(rows):
        for column, image in enumerate(row):
            top = padding + row_index * (height + padding)
            left = padding + column * (width + padding)
            grid[:, top : top + height, left : left + width] = image.detach().float().cpu()
    return grid


def report_paths(stem: Path) -> tuple[Path, Path]:
    """The grid PNG and the accuracy JSON of a report named ``stem``."""
    return stem.with_name(f"{stem.name}-grid.png"), stem.with_name(f"{stem.name}-accuracy.json")


def accuracy(predicted: torch.Tensor, label: int) -> float:
    return float((predicted == label).float().mean())


def before_after_report(
    model: nn.Module,
    class_prompts: Sequence[str],
    class_names: Sequence[str],
    erased: Sequence[str],
    classify: Callable[[torch.Tensor], torch.Tensor],
    stem: Path,
    samples_per_class: int = 8,
    seed: int = 10_000,
) -> dict[str, Any]:
    """Sample every class before/after, write ``{stem}-grid.png`` and ``{stem}-accuracy.json``.

    ``classify`` maps images in [0, 1] to class indices (the index of ``class_prompts``).
    Grid rows are classes; each row holds the "before" samples, then the "after" samples of the
    same seeds. Returns the accuracy table: per class, before and after, and which were erased.
    """
    seeds = [seed + index for index in range(samples_per_class)]
    erased_names = {normalise_prompt(concept) for concept in erased}
    rows, table = [], {}
    unet = model.model.diffusion_model
    for label, (prompt, name) in enumerate(zip(class_prompts, class_names)):
        prompts = [prompt] * samples_per_class
        with increments_disabled(unet):
            before = sample_images(model, prompts, seeds)
        after = sample_images(model, prompts, seeds)
        rows.append(torch.cat([before, after]))
        table[name] = {
            "erased": normalise_prompt(name) in erased_names,
            "accuracy_before": accuracy(classify(before), label),
            "accuracy_after": accuracy(classify(after), label),
        }
    grid_path, table_path = report_paths(stem)
    save_png(image_grid(rows), grid_path)
    report = {"samples_per_class": samples_per_class, "seeds": seeds, "classes": table, "grid": str(grid_path)}
    write_json(report, table_path)
    return report


def markdown_table(report: dict[str, Any]) -> str:
    """The accuracy table as Markdown (class, erased, before, after)."""
    lines = ["| class | erased | accuracy before | accuracy after |", "|---|---|---|---|"]
    for name, row in report["classes"].items():
        label = name or '""'
        lines.append(
            f"| {label} | {'yes' if row['erased'] else ''} | {row['accuracy_before']:.2f} | {row['accuracy_after']:.2f} |"
        )
    return "\n".join(lines)
