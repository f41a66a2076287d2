"""How well a toy-world model draws what it is asked: the oracle's accuracy on its samples.

Two measurements (the toy model's quality bar, and the yardstick of every erasure on the toy model):
- per class (blank + 9 artists), N samples of the bare class prompt ("" or the artist's name):
  the fraction the artist oracle assigns to that class;
- N samples of `a {colour} {object} by {artist}` prompts, cycling through all combinations in a
  fixed order: the fractions whose object and colour the oracles recognise.
Seeds are `seed + offset + i` with disjoint offsets per class, so the same call on two models
compares the same noise.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from erasure.evaluation import evaluate, make_evaluator
from erasure.generation import generate
from erasure.metrics import ConceptMetrics
from erasure.tables import markdown_table
from erasure.toy.oracle import ToyOracle
from erasure.toy.world import ARTISTS, CLASS_NAMES, COLOURS, OBJECTS, class_prompt
from erasure.worlds import World

#: Seeds of class c start at seed + c * SEED_STRIDE; the attribute prompts use the next block.
SEED_STRIDE = 100_000
#: The key of the `a {colour} {object} by {artist}` samples among measure_quality's images.
ATTRIBUTES = "attributes"


@dataclass(frozen=True)
class QualityReport:
    artist: dict[str, float]
    object: float
    colour: float
    attribute_artist: float

    def as_json(self) -> dict[str, object]:
        return {"artist": self.artist, "object": self.object, "colour": self.colour}


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
    return QualityReport(
        artist=artist_accuracy,
        object=float((predicted["object"] == torch.tensor(objects)).float().mean()),
        colour=float((predicted["colour"] == torch.tensor(colours)).float().mean()),
        attribute_artist=float((predicted["artist"] == torch.tensor(artists)).float().mean()),
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
