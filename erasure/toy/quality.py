"""How well a toy-world model draws what it is asked: the oracle's accuracy on its samples.

Two measurements (the toy model's quality bar, and the yardstick of every erasure on the toy model):
- per class (blank + 9 artists), N samples of the bare class prompt ("" or the artist's name):
  the fraction the artist oracle assigns to that class;
- N samples of `a {colour} {object} by {artist}` prompts, cycling through all combinations in a
  fixed order: the fractions whose object and colour the oracles recognise (overall and per
  object / colour).
Seeds are `seed + offset + i` with disjoint offsets per class, so the same call on two models
compares the same noise. A prompt file (``read_wording_rows``; e.g. data/toy-heldout-wordings.csv,
wordings never used to erase) is measured instead by ``measure_prompts``: N samples per row from
its own seeds, judged against the row's ``class`` and optional ``object`` / ``colour``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from erasure.evaluation import evaluate, make_evaluator
from erasure.generation import generate
from erasure.metrics import ConceptMetrics
from erasure.tables import markdown_table
from erasure.toy.oracle import ToyOracle
from erasure.errors import PromptFileError
from erasure.prompts import REQUIRED_COLUMNS, read_prompts
from erasure.toy.world import (
    ARTISTS,
    CLASS_NAMES,
    COLOURS,
    NUM_CLASSES,
    OBJECTS,
    class_index,
    class_prompt,
    colour_index,
    object_index,
)
from erasure.worlds import World

#: Seeds of class c start at seed + c * SEED_STRIDE; the attribute prompts use the next block.
SEED_STRIDE = 100_000
#: The key of the `a {colour} {object} by {artist}` samples among measure_quality's images.
ATTRIBUTES = "attributes"
#: Prompt-file rows sampled per ``generate`` call (one progress line each).
ROWS_PER_CALL = 20


@dataclass(frozen=True)
class QualityReport:
    """Oracle accuracies: per class (``artist``), overall and per object / colour, and, for a
    prompt file, per prompt (the share drawn as the row's ``class``)."""

    artist: dict[str, float]
    object: float
    colour: float
    attribute_artist: float
    objects: dict[str, float]
    colours: dict[str, float]
    prompts: dict[str, float] | None = None

    def as_json(self) -> dict[str, object]:
        result = {"artist": self.artist, "object": self.object, "colour": self.colour,
                  "objects": self.objects, "colours": self.colours}
        return result if self.prompts is None else {**result, "prompts": self.prompts}


@dataclass(frozen=True)
class WordingRow:
    """One row of a ``--prompts_path`` file: the prompt, its first seed, and what the image should
    show (class 0 blank or an artist; object and colour indices, None when the row names none)."""

    prompt: str
    seed: int
    class_id: int
    obj: int | None
    colour: int | None


def read_wording_rows(path: str | Path, concept: str | None = None) -> list[WordingRow]:
    """A prompt CSV (``prompt``, ``evaluation_seed``, ``case_number``, ``class``; optional ``object``,
    ``colour``, ``concept``); with ``concept`` only the rows whose ``concept`` cell names it."""
    rows = read_prompts(path, (*REQUIRED_COLUMNS, "class"))
    if concept is not None:
        if "concept" not in rows[0].extra:
            raise PromptFileError(f"{path} has no `concept` column to select {concept!r} by; drop --concept.")
        rows = [row for row in rows if " ".join(row.extra["concept"].lower().split()) == concept.lower().strip()]
        if not rows:
            raise PromptFileError(f"{path} has no row whose concept is {concept!r}; check the spelling.")
    result = []
    for row in rows:
        cells = {key: row.extra.get(key, "").strip() for key in ("class", "object", "colour")}
        try:
            result.append(WordingRow(
                row.prompt, row.evaluation_seed, class_index(cells["class"]),
                object_index(cells["object"]) if cells["object"] else None,
                colour_index(cells["colour"]) if cells["colour"] else None,
            ))
        except ValueError as error:
            raise PromptFileError(f"{path}, line {row.line}: {error}; fix the cell.") from error
    repeated = sorted({row.prompt for row in result if sum(other.prompt == row.prompt for other in result) > 1})
    if repeated:
        raise PromptFileError(f"{path} lists the prompt(s) {repeated[:3]} more than once; keep one row per prompt.")
    return result


def _share(hits: list[bool]) -> float:
    return sum(hits) / len(hits)


def measure_prompts(
    model: nn.Module,
    oracle: ToyOracle,
    rows: list[WordingRow],
    num_samples: int,
    batch_size: int = 50,
    progress: Callable[[str], None] = lambda message: None,
    images: dict[str, torch.Tensor] | None = None,
) -> QualityReport:
    """``num_samples`` images per row (seeds ``seed + k``), judged by the oracle: per prompt the share
    drawn as its class, per class / object / colour the share over the rows that name one."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    device = next(oracle.parameters()).device
    judged: dict[str, dict[str, torch.Tensor]] = {}
    for start in range(0, len(rows), ROWS_PER_CALL):
        chunk = rows[start : start + ROWS_PER_CALL]
        began = time.perf_counter()
        prompts = [row.prompt for row in chunk for _ in range(num_samples)]
        seeds = [row.seed + k for row in chunk for k in range(num_samples)]
        samples = generate(model, prompts, seeds, batch_size=batch_size)
        labels = oracle.predict(samples.to(device) * 2 - 1)
        for index, row in enumerate(chunk):
            part = slice(index * num_samples, (index + 1) * num_samples)
            judged[row.prompt] = {task: predicted[part].cpu() for task, predicted in labels.items()}
            if images is not None:
                images[row.prompt] = samples[part].cpu()
        progress(f"rows {start + 1}..{start + len(chunk)} of {len(rows)} in {time.perf_counter() - began:.1f} s")
    hits = {row.prompt: (judged[row.prompt]["artist"] == row.class_id).tolist() for row in rows}
    objects = {OBJECTS[o]: [h for r in rows if r.obj == o for h in (judged[r.prompt]["object"] == o).tolist()]
               for o in range(len(OBJECTS))}
    colours = {COLOURS[c]: [h for r in rows if r.colour == c for h in (judged[r.prompt]["colour"] == c).tolist()]
               for c in range(len(COLOURS))}
    classes = {CLASS_NAMES[c]: [h for r in rows if r.class_id == c for h in hits[r.prompt]] for c in range(NUM_CLASSES)}
    every_object = [h for values in objects.values() for h in values]
    every_colour = [h for values in colours.values() for h in values]
    return QualityReport(
        artist={name: _share(values) for name, values in classes.items() if values},
        object=_share(every_object) if every_object else float("nan"),
        colour=_share(every_colour) if every_colour else float("nan"),
        attribute_artist=_share([h for values in hits.values() for h in values]),
        objects={name: _share(values) for name, values in objects.items() if values},
        colours={name: _share(values) for name, values in colours.items() if values},
        prompts={prompt: _share(values) for prompt, values in hits.items()},
    )


def prompt_pixel_changes(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]
) -> dict[str, dict[str, float]]:
    """Per prompt, the mean and the largest absolute pixel change between same-seed samples ([0, 1])."""
    changes = {}
    for prompt, original in before.items():
        metrics = evaluate(original, after[prompt], concept=prompt, metrics=("pixel",))
        changes[prompt] = {"mean": metrics.pixel_change_mean, "max": metrics.pixel_change_max}
    return changes


def prompts_table(report: QualityReport, rows: list[WordingRow], num_samples: int,
                  before: QualityReport | None = None) -> str:
    """One line per prompt: what it should show and the share drawn as its class (before -> after)."""
    lines = []
    for row in rows:
        shows = " ".join(name for name in (
            CLASS_NAMES[row.class_id], None if row.colour is None else COLOURS[row.colour],
            None if row.obj is None else OBJECTS[row.obj]) if name)
        now = f"{report.prompts[row.prompt]:.2f}"
        shown = now if before is None else f"{before.prompts[row.prompt]:.2f} -> {now}"
        lines.append([f"`{row.prompt}`", shows, shown])
    lines.append(["objects", "", ", ".join(f"{name} {value:.2f}" for name, value in report.objects.items())])
    lines.append(["colours", "", ", ".join(f"{name} {value:.2f}" for name, value in report.colours.items())])
    return markdown_table(["prompt", "should show", f"class accuracy (N={num_samples})"], lines)


def attribute_prompts(count: int) -> tuple[list[str], list[int], list[int], list[int]]:
    """`count` prompts `a {colour} {object} by {artist}` and their artist class, object, colour."""
    combos = list(itertools.product(range(len(ARTISTS)), range(len(COLOURS)), range(len(OBJECTS))))
    prompts, artists, objects, colours = [], [], [], []
    for index in range(count):
        artist, colour, obj = combos[(index * 7) % len(combos)]
        prompts.append(f"a {COLOURS[colour]} {OBJECTS[obj]} by {ARTISTS[artist]}")
        artists.append(artist + 1)
        objects.append(obj)
        colours.append(colour)
    return prompts, artists, objects, colours


def measure_quality(
    model: nn.Module,
    oracle: ToyOracle,
    num_samples: int,
    seed: int,
    batch_size: int = 50,
    progress: Callable[[str], None] = lambda message: None,
    images: dict[str, torch.Tensor] | None = None,
) -> QualityReport:
    """Sample with the model's default sampling settings and score the samples with the oracle.
    When ``images`` is given it receives the samples, per class name and under "attributes"."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")

    def predict(prompts: list[str], first_seed: int, name: str) -> dict[str, torch.Tensor]:
        seeds = [first_seed + i for i in range(len(prompts))]
        samples = generate(model, prompts, seeds, batch_size=batch_size)
        if images is not None:
            images[name] = samples.cpu()
        labels = oracle.predict(samples.to(next(oracle.parameters()).device) * 2 - 1)
        return {task: predicted.cpu() for task, predicted in labels.items()}

    artist_accuracy = {}
    for class_id, name in enumerate(CLASS_NAMES):
        started = time.perf_counter()
        predicted = predict([class_prompt(class_id)] * num_samples, seed + class_id * SEED_STRIDE, name)["artist"]
        artist_accuracy[name] = float((predicted == class_id).float().mean())
        progress(f"{name}: accuracy {artist_accuracy[name]:.2f} "
                 f"({num_samples} samples in {time.perf_counter() - started:.1f} s)")
    prompts, artists, objects, colours = attribute_prompts(num_samples)
    predicted = predict(prompts, seed + len(CLASS_NAMES) * SEED_STRIDE, ATTRIBUTES)
    objects, colours = torch.tensor(objects), torch.tensor(colours)
    object_hits, colour_hits = predicted["object"] == objects, predicted["colour"] == colours
    return QualityReport(
        artist=artist_accuracy,
        object=float(object_hits.float().mean()),
        colour=float(colour_hits.float().mean()),
        attribute_artist=float((predicted["artist"] == torch.tensor(artists)).float().mean()),
        objects={name: float(object_hits[objects == o].float().mean()) for o, name in enumerate(OBJECTS)
                 if (objects == o).any()},
        colours={name: float(colour_hits[colours == c].float().mean()) for c, name in enumerate(COLOURS)
                 if (colours == c).any()},
    )


def quality_table(report: QualityReport, num_samples: int) -> str:
    """Per-class table of a QualityReport, as in the README."""
    rows = [[f"{class_id} {name}", f"`{class_prompt(class_id)!r}`", f"{report.artist[name]:.2f}"]
            for class_id, name in enumerate(CLASS_NAMES)]
    rows.append(["-", "`a {colour} {object} by {artist}`", f"object {report.object:.2f}, colour {report.colour:.2f}, "
                 f"artist {report.attribute_artist:.2f}"])
    return markdown_table(["class", "prompt", f"artist accuracy (N={num_samples})"], rows)


def compare_classes(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], world: World
) -> dict[str, ConceptMetrics]:
    """``erasure.evaluate`` of every class's same-seed samples (the oracle's ACC before and after, and
    the pixel change), plus the pixel change of the ATTRIBUTES samples."""
    evaluator = make_evaluator(("acc", "pixel"), world=world)
    compared = {
        name: evaluate(before[name], after[name], concept=name, metrics=("acc", "pixel"), evaluator=evaluator)
        for name in CLASS_NAMES
    }
    compared[ATTRIBUTES] = evaluate(before[ATTRIBUTES], after[ATTRIBUTES], concept=ATTRIBUTES, metrics=("pixel",))
    return compared


def comparison_table(
    before: QualityReport, after: QualityReport, compared: dict[str, ConceptMetrics], num_samples: int
) -> str:
    """Per-class accuracy of a model before and after an edit, the change, and the largest pixel change."""
    rows = []
    for class_id, name in enumerate(CLASS_NAMES):
        old, new, change = compared[name].acc_original, compared[name].acc, compared[name].pixel_change_max
        rows.append([f"{class_id} {name}", f"{old:.2f}", f"{new:.2f}", f"{new - old:+.2f}", f"{change:.2g}"])
    rows.append(["`a {colour} {object} by {artist}`", f"object {before.object:.2f}, colour {before.colour:.2f}",
                 f"object {after.object:.2f}, colour {after.colour:.2f}", "",
                 f"{compared[ATTRIBUTES].pixel_change_max:.2g}"])
    headers = ["class", f"accuracy before (N={num_samples})", "after", "change", "max abs pixel change"]
    return markdown_table(headers, rows)
