"""Before/after evidence of an erasure: a labelled PNG grid of the same seeds and a per-class table.

Every class prompt of the model's world ("" and the artists) is sampled with the same seeds by
the original model and by the model with the edits applied; ``erasure.evaluate`` gives each
class's accuracy before and after (the world's classifier: the toy oracle on the toy model) and
its pixel change. The grid's rows are the classes (named at the left), its columns the "before"
samples, then the "after" samples of the same seeds.

Protection and training see only the exact class prompts, so the table also has, per class, a
row of held-out wordings (the world's ``held_out_wordings`` file, on the toy model
data/toy-heldout-wordings.csv: the first ``samples_per_class`` wordings whose image should show
each class, with their own seeds; METHOD.md §2).
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
from erasure.prompts import REQUIRED_COLUMNS, PromptRow, read_prompts
from erasure.tables import markdown_table
from erasure.worlds import World

SAMPLES_PER_CLASS = 8
FIRST_SEED = 10_000
COLUMNS = ("class", "prompts", "erased", "acc_before", "acc_after", "pixel_change_max")
HEADERS = ("class", "prompts", "erased", "accuracy before", "accuracy after", "largest pixel change")


def held_out_wordings(world: World) -> list[PromptRow]:
    """The world's held-out wordings (none for a world without a file)."""
    path = world.held_out_wordings_path()
    return [] if path is None else read_prompts(path, (*REQUIRED_COLUMNS, "class"))


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
    wordings = held_out_wordings(world)
    for prompt, name in zip(world.class_prompts, world.names):
        held_out = [row for row in wordings if normalise_prompt(row.extra["class"] or "") == normalise_prompt(name)]
        held_out = held_out[:samples_per_class] if prompt else []
        for kind, prompts, row_seeds in (("exact", [prompt] * samples_per_class, seeds),
                                         ("held-out", [row.prompt for row in held_out],
                                          [row.evaluation_seed for row in held_out])):
            if not prompts:
                continue
            before = generate(model, prompts, row_seeds)
            with apply(model, edits):
                after = generate(model, prompts, row_seeds)
            if kind == "exact":
                rows.append(torch.cat([before, after]))
            metrics = evaluate(before, after, concept=name, metrics=("acc", "pixel"), evaluator=evaluator)
            table.append({
                "class": name,
                "prompts": kind,
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
