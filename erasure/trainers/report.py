"""Before/after evidence of an erasure: a labelled PNG grid of the same seeds and a per-class table.

Every class prompt of the model's world ("" and the artists) is sampled with the same seeds by
the original model and by the model with the edits applied; ``erasure.evaluate`` gives each
class's accuracy before and after (the world's classifier: the toy oracle on the toy model) and
its pixel change. The grid's rows are the classes (named at the left), its columns the "before"
samples, then the "after" samples of the same seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from erasure.bases import normalise_prompt
from erasure.edits import Edit, apply
from erasure.evaluation import evaluate, make_evaluator
from erasure.files import write_json
from erasure.generation import generate, save_png
from erasure.grids import labelled_grid
from erasure.tables import markdown_table
from erasure.worlds import World

SAMPLES_PER_CLASS = 8
FIRST_SEED = 10_000
COLUMNS = ("class", "erased", "acc_before", "acc_after", "pixel_change_max")
HEADERS = ("class", "erased", "accuracy before", "accuracy after", "largest pixel change")


def report_paths(stem: Path) -> tuple[Path, Path]:
    """The grid PNG and the accuracy JSON of a report named ``stem``."""
    return stem.with_name(f"{stem.name}-grid.png"), stem.with_name(f"{stem.name}-accuracy.json")


def before_after_report(
    model: nn.Module,
    edits: Sequence[Edit],
    world: World,
    stem: Path,
    device: torch.device | str = "cpu",
    samples_per_class: int = SAMPLES_PER_CLASS,
    seed: int = FIRST_SEED,
) -> str:
    """Sample every class before and after ``edits``, write ``{stem}-grid.png`` and
    ``{stem}-accuracy.json``; returns the per-class table as Markdown. The model is left unedited."""
    seeds = [seed + index for index in range(samples_per_class)]
    erased = {normalise_prompt(edit.concept) for edit in edits}
    evaluator = make_evaluator(("acc", "pixel"), world=world, device=device)
    rows, table = [], []
    for prompt, name in zip(world.class_prompts, world.names):
        prompts = [prompt] * samples_per_class
        before = generate(model, prompts, seeds)
        with apply(model, edits):
            after = generate(model, prompts, seeds)
        rows.append(torch.cat([before, after]))
        metrics = evaluate(before, after, concept=name, metrics=("acc", "pixel"), evaluator=evaluator)
        table.append({
            "class": name,
            "erased": "yes" if normalise_prompt(prompt) in erased and prompt else "",
            "acc_before": metrics.acc_original,
            "acc_after": metrics.acc,
            "pixel_change_max": metrics.pixel_change_max,
        })
    grid_path, table_path = report_paths(stem)
    grid = labelled_grid(rows, list(world.names), block_labels=[("before", samples_per_class), ("after", samples_per_class)])
    save_png(grid, grid_path)
    record: dict[str, Any] = {"samples_per_class": samples_per_class, "seeds": seeds, "classes": table,
                              "grid": str(grid_path)}
    write_json(record, table_path)
    return markdown_table(HEADERS, [[row[column] for column in COLUMNS] for row in table])
