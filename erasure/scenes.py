"""The paper's erase/restore scenes (METHOD.md §4): timelines, composing the model at every step,
and the per-step table.

A timeline is a list of time steps; each step erases some concepts and restores (brings back)
some earlier-erased ones. Concepts are indices into an ordered concept list (c0..c8). At each
step every concept has a role: ``erased`` (erased now), ``restored`` (erased at an earlier step,
back now) or ``regular`` (never erased so far; the blank class is always regular).

Composing follows the timeline on ONE model, in place:
- SepCE (``IncrementEdits``): erase = attach the concept's increment, restore = drop it. Every
  increment protects the other concepts, so a restore is exact: the restored concept's keys and
  values are the original ones, whatever else stays erased.
- Baselines (``WeightDifferenceEdits``, CiE / ESD): erase = add the concept's weight difference,
  restore = subtract it (as the paper merges baselines). The remaining differences still touch
  the restored concept, which is what the scenes show.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from erasure.bases import normalise_prompt
from erasure.edits import apply, remove
from erasure.errors import SceneError
from erasure.increments import Increment
from erasure.loading import model_fingerprint
from erasure.evaluation import evaluate
from erasure.metrics import ConceptEvaluator, ConceptMetrics
from erasure.grids import labelled_grid
from erasure.tables import LEFT, RIGHT, markdown_table
from erasure.weight_differences import (
    WeightDifference,
    apply_weight_difference,
    check_base_model,
    check_fits,
)

ERASED, RESTORED, REGULAR = "erased", "restored", "regular"
ROLES = (ERASED, RESTORED, REGULAR)
#: What a scene measures per class and step (METHOD.md §4, as the paper's Table 2).
SCENE_METRICS = ("acc", "fid", "lpips")
#: The paper's nine artists in METHOD.md §4's concept order c0..c8 (not the classifier's class order).
SD_SCENE_ARTISTS: tuple[str, ...] = (
    "Cezanne", "Van Gogh", "Picasso", "Jackson Pollock", "Caravaggio", "Keith Haring", "Kelly McKernan",
    "Tyler Edlin", "Kilian Eng",
)


@dataclass(frozen=True)
class TimeStep:
    """One step of a timeline: the concept indices erased and restored at it."""

    label: str
    erase: tuple[int, ...] = ()
    restore: tuple[int, ...] = ()

    def describe(self, concepts: Sequence[str] | None = None) -> str:
        """``erase c0, c1; restore c2`` (concept names instead of c<i> when ``concepts`` is given)."""

        def names(indices: tuple[int, ...]) -> str:
            return ", ".join(concepts[index] if concepts else f"c{index}" for index in indices)

        parts = [f"erase {names(self.erase)}"] if self.erase else []
        parts += [f"restore {names(self.restore)}"] if self.restore else []
        return "; ".join(parts)


@dataclass(frozen=True)
class Timeline:
    """Time steps in order; validated on creation (see ``SceneError`` messages)."""

    name: str
    steps: tuple[TimeStep, ...]

    def __post_init__(self) -> None:
        if not self.steps:
            raise SceneError(f"{self.name}: a timeline needs at least one time step.")
        labels = [step.label for step in self.steps]
        if len(set(labels)) != len(labels):
            raise SceneError(f"{self.name}: time-step labels must be unique, got {labels}.")
        erased: set[int] = set()
        for step in self.steps:
            indices = step.erase + step.restore
            if not indices:
                raise SceneError(f"{self.name} {step.label}: the step erases and restores nothing; drop it.")
            if any(isinstance(index, bool) or not isinstance(index, int) or index < 0 for index in indices):
                raise SceneError(f"{self.name} {step.label}: concept indices must be integers >= 0, got {indices}.")
            if len(set(indices)) != len(indices):
                raise SceneError(f"{self.name} {step.label}: a concept appears twice in one step ({indices}).")
            not_erased = [index for index in step.restore if index not in erased]
            if not_erased:
                raise SceneError(f"{self.name} {step.label}: cannot restore c{not_erased[0]}, it is not erased then.")
            again = [index for index in step.erase if index in erased]
            if again:
                raise SceneError(f"{self.name} {step.label}: c{again[0]} is erased already; restore it first.")
            erased = (erased - set(step.restore)) | set(step.erase)

    @property
    def concepts_needed(self) -> int:
        """How many concepts the timeline refers to (highest index + 1)."""
        return 1 + max(index for step in self.steps for index in step.erase + step.restore)

    @property
    def erased_concepts(self) -> tuple[int, ...]:
        """Every concept the timeline ever erases, in order of first erasure."""
        return tuple(dict.fromkeys(index for step in self.steps for index in step.erase))

    def erased_sets(self) -> list[frozenset[int]]:
        """The concepts erased after each step."""
        sets, erased = [], frozenset()
        for step in self.steps:
            erased = (erased - set(step.restore)) | set(step.erase)
            sets.append(erased)
        return sets

    def roles(self, num_concepts: int) -> list[dict[int, str]]:
        """Per step, the role of every concept index 0..num_concepts-1."""
        result, ever = [], set()
        for erased in self.erased_sets():
            ever |= erased
            result.append(
                {i: ERASED if i in erased else RESTORED if i in ever else REGULAR for i in range(num_concepts)}
            )
        return result


def _steps(*steps: tuple[str, Sequence[int], Sequence[int]]) -> tuple[TimeStep, ...]:
    return tuple(TimeStep(label, tuple(erase), tuple(restore)) for label, erase, restore in steps)


#: METHOD.md §4, verbatim (Scene1 and Scene2 have no t2 there; the labels are kept as written).
SCENES: dict[int, Timeline] = {
    1: Timeline("Scene1", _steps(("t0", range(6), ()), ("t1", (), (0, 1)), ("t3", (), (2,)))),
    2: Timeline("Scene2", _steps(("t0", range(6), ()), ("t1", (), (3, 4)), ("t3", (), (5,)))),
    3: Timeline(
        "Scene3",
        _steps(("t0", (0, 2, 4), ()), ("t1", (), (0, 2)), ("t2", (1, 3), ()), ("t3", (), (1,)), ("t4", (5,), ())),
    ),
    4: Timeline(
        "Scene4",
        _steps(
            ("t0", (0, 1, 2), ()), ("t1", (), (0,)), ("t2", (3, 4), ()), ("t3", (), (1,)), ("t4", (5,), ()),
            ("t5", (), (2,)),
        ),
    ),
}


# ------------------------------------------------------------------------------- composing
class Edits(Protocol):
    """Per-concept edits that a timeline switches on (``erase``) and off (``restore``) in a model."""

    @property
    def concepts(self) -> list[str]:
        """The concepts it holds an edit for."""
        ...

    def erase(self, concepts: Sequence[str]) -> None: ...

    def restore(self, concepts: Sequence[str]) -> None: ...


class IncrementEdits:
    """SepCE increments: erase attaches them, restore removes them (exact)."""

    def __init__(self, model: nn.Module, increments: Mapping[str, Increment]) -> None:
        self.model = model
        self.increments = dict(increments)

    @property
    def concepts(self) -> list[str]:
        return list(self.increments)

    def erase(self, concepts: Sequence[str]) -> None:
        apply(self.model, [self.increments[concept] for concept in concepts])

    def restore(self, concepts: Sequence[str]) -> None:
        remove(self.model, [self.increments[concept] for concept in concepts])


class WeightDifferenceEdits:
    """Baseline weight differences: erase adds them, restore subtracts them.

    All are checked against the base model up front: once one is added, the model's
    fingerprint is no longer the base model's.
    """

    def __init__(self, model: nn.Module, differences: Mapping[str, WeightDifference]) -> None:
        fingerprint = model_fingerprint(model)
        for difference in differences.values():
            check_base_model(difference, fingerprint)
            check_fits(model, difference)
        self.model = model
        self.differences = dict(differences)

    @property
    def concepts(self) -> list[str]:
        return list(self.differences)

    def _apply(self, concepts: Sequence[str], sign: float) -> None:
        for concept in concepts:
            apply_weight_difference(self.model, self.differences[concept], sign, check_fingerprint=False)

    def erase(self, concepts: Sequence[str]) -> None:
        self._apply(concepts, 1.0)

    def restore(self, concepts: Sequence[str]) -> None:
        self._apply(concepts, -1.0)


def make_edits(model: nn.Module, edits: Mapping[str, Increment | WeightDifference]) -> Edits:
    """``IncrementEdits`` or ``WeightDifferenceEdits`` for ``{concept: edit}`` (one kind only)."""
    kinds = {type(edit) for edit in edits.values()}
    if kinds == {Increment}:
        return IncrementEdits(model, edits)
    if kinds == {WeightDifference}:
        return WeightDifferenceEdits(model, edits)
    names = sorted(kind.__name__ for kind in kinds) or ["nothing"]
    raise SceneError(f"A scene composes increments or weight differences, one kind at a time; got {names}.")


@dataclass(frozen=True)
class SceneState:
    """The model's state after one time step: which concepts are erased and every concept's role."""

    step: TimeStep
    erased: tuple[str, ...]
    roles: dict[str, str]


def check_concepts(timeline: Timeline, concepts: Sequence[str]) -> None:
    """Enough concepts for the timeline, each given once."""
    if len(concepts) < timeline.concepts_needed:
        raise SceneError(
            f"{timeline.name} refers to c0..c{timeline.concepts_needed - 1} but only {len(concepts)} concepts were "
            f"given; pass at least {timeline.concepts_needed} (--concepts)."
        )
    keys = [normalise_prompt(concept) for concept in concepts]
    repeated = sorted({concept for concept, key in zip(concepts, keys) if keys.count(key) > 1})
    if repeated:
        raise SceneError(f"Concepts {repeated} are given more than once; list each concept once.")


def check_scene(timeline: Timeline, concepts: Sequence[str], edited: Sequence[str]) -> None:
    """``check_concepts``, and an edit for every concept the timeline erases."""
    check_concepts(timeline, concepts)
    missing = [concepts[index] for index in timeline.erased_concepts if concepts[index] not in edited]
    if missing:
        raise SceneError(f"{timeline.name} erases {missing} but no increment or weight difference was given for them.")


def play(timeline: Timeline, concepts: Sequence[str], edits: Edits) -> Iterator[SceneState]:
    """Apply the timeline step by step to the edited model, yielding its state after each step.

    Within a step restores come before erasures. When the generator ends or is closed, every
    concept still erased is restored, so the model is left as it was found.
    """
    check_scene(timeline, concepts, edits.concepts)
    erased: list[int] = []
    try:
        for step, roles in zip(timeline.steps, timeline.roles(len(concepts))):
            if step.restore:
                edits.restore([concepts[i] for i in step.restore])
                erased = [i for i in erased if i not in step.restore]
            if step.erase:
                edits.erase([concepts[i] for i in step.erase])
                erased += list(step.erase)
            named_roles = {concepts[i]: role for i, role in roles.items()}
            yield SceneState(step, tuple(concepts[i] for i in sorted(erased)), named_roles)
    finally:
        if erased:
            edits.restore([concepts[i] for i in erased])


# ------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class EvaluatedClass:
    """A row of the scene table: display name, prompt and classifier class (None: no ACC)."""

    name: str
    prompt: str
    class_index: int | None = None


@dataclass
class SceneRow:
    step: str
    role: str
    metrics: ConceptMetrics


@dataclass
class SceneResult:
    """Every (step, class) row, and the images of every step (uint8, for the grid)."""

    timeline: Timeline
    concepts: list[str]
    rows: list[SceneRow] = field(default_factory=list)
    images: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float images as 8-bit (CPU), rounded as PNG files store them."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def run_scene(
    timeline: Timeline,
    concepts: Sequence[str],
    edits: Edits,
    classes: Sequence[EvaluatedClass],
    originals: Mapping[str, torch.Tensor],
    sample: Callable[[str], torch.Tensor],
    evaluator: ConceptEvaluator,
    announce: Callable[[str], None] = lambda message: None,
) -> SceneResult:
    """Play the timeline and, after every step, sample every class and compare it with the original.

    ``sample(prompt)`` gives the edited model's images of a prompt ([0, 1] floats, always the same
    seeds); ``originals[name]`` are the original model's images of the same seeds (uint8, as read
    from PNG). Both sides are compared as 8-bit images, so a restored concept that samples the
    original's pixels scores FID and LPIPS 0. A class whose prompt is not a concept (the blank
    class) is ``regular``.
    """
    result = SceneResult(timeline, list(concepts))
    with closing(play(timeline, concepts, edits)) as states:
        for state in states:
            announce(f"{timeline.name} {state.step.label}: {state.step.describe(concepts)}; erased now: "
                     f"{list(state.erased) or 'none'}")
            result.images[state.step.label] = {}
            for evaluated in classes:
                images = to_uint8(sample(evaluated.prompt))
                result.images[state.step.label][evaluated.name] = images
                metrics = evaluate(originals[evaluated.name], images, concept=evaluated.name,
                                   class_index=evaluated.class_index, metrics=SCENE_METRICS, evaluator=evaluator)
                result.rows.append(SceneRow(state.step.label, state.roles.get(evaluated.prompt, REGULAR), metrics))
    return result


CSV_COLUMNS = ("step", "concept", "role", "class_index", "images", "fid", "lpips", "acc", "acc_original")


def _number(value: float | None, digits: str) -> str:
    if value is None:
        return ""
    return "nan" if not math.isfinite(value) else format(value, digits)


def scene_csv(result: SceneResult) -> str:
    """One line per (step, class): role, FID, LPIPS, ACC (fraction) and the original's ACC."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in result.rows:
        m = row.metrics
        writer.writerow(
            [row.step, m.concept, row.role, "" if m.class_index is None else m.class_index, m.images,
             _number(m.fid, ".6g"), _number(m.lpips, ".6g"), _number(m.acc, ".4f"), _number(m.acc_original, ".4f")]
        )
    return buffer.getvalue()


def scene_markdown(result: SceneResult, extractors: Mapping[str, str]) -> str:
    """Per step a heading (what it changes) and a table: class, role, FID, ACC (%), original ACC, LPIPS."""
    lines = [f"## {result.timeline.name}", ""]
    for step in result.timeline.steps:
        lines += [f"### {step.label}: {step.describe(result.concepts)}", ""]
        rows = []
        for row in (row for row in result.rows if row.step == step.label):
            m = row.metrics
            acc = "-" if m.acc is None else f"{100 * m.acc:.1f}"
            original = "-" if m.acc_original is None else f"{100 * m.acc_original:.1f}"
            rows.append([m.concept, row.role, _number(m.fid, ".3f") or "-", acc, original, _number(m.lpips, ".3f") or "-"])
        headers = ["concept", "role", "FID", "ACC (%)", "ACC original (%)", "LPIPS"]
        lines += [markdown_table(headers, rows, [LEFT, LEFT, RIGHT, RIGHT, RIGHT, RIGHT]), ""]
    lines += [f"- {metric.upper()}: {name}" for metric, name in extractors.items()]
    return "\n".join(lines) + "\n"


def _json_value(value: float | None) -> float | str | None:
    return value if value is None or math.isfinite(value) else str(value)


def scene_record(result: SceneResult) -> dict[str, dict[str, dict[str, Any]]]:
    """{step: {class name: {role, acc, acc_original, fid, lpips}}} (JSON-ready)."""
    record: dict[str, dict[str, dict[str, Any]]] = {step.label: {} for step in result.timeline.steps}
    for row in result.rows:
        m = row.metrics
        record[row.step][m.concept] = {
            "role": row.role, "acc": _json_value(m.acc), "acc_original": _json_value(m.acc_original),
            "fid": _json_value(m.fid), "lpips": _json_value(m.lpips),
        }
    return record


def role_summary(result: SceneResult) -> dict[str, float | str | None]:
    """The numbers the paper's claim is about, over all steps: how low erased ACC goes, how far
    restored and regular classes stray from the original (None where no row has the role)."""

    def largest(role: str, value: Callable[[ConceptMetrics], float | None]) -> float | str | None:
        values = [value(row.metrics) for row in result.rows if row.role == role]
        values = [v for v in values if v is not None]
        return _json_value(max(values)) if values else None

    def acc_gap(m: ConceptMetrics) -> float | None:
        return None if m.acc is None else abs(m.acc - m.acc_original)

    return {
        "erased_acc_max": largest(ERASED, lambda m: m.acc),
        "restored_acc_gap_max": largest(RESTORED, acc_gap),
        "restored_fid_max": largest(RESTORED, lambda m: m.fid),
        "restored_lpips_max": largest(RESTORED, lambda m: m.lpips),
        "regular_acc_gap_max": largest(REGULAR, acc_gap),
    }


def scene_grid(
    classes: Sequence[EvaluatedClass],
    columns: Sequence[Mapping[str, torch.Tensor]],
    per_cell: int,
    column_names: Sequence[str],
) -> torch.Tensor:
    """One row per class (named at the left); per column block (the original, then each time step,
    named on top) its first ``per_cell`` images. Same seeds in every block."""
    if len(column_names) != len(columns):
        raise SceneError(f"scene_grid: {len(column_names)} column names for {len(columns)} columns; give one each.")
    rows = [torch.cat([column[evaluated.name][:per_cell] for column in columns]).float() / 255 for evaluated in classes]
    blocks = [(name, min(per_cell, len(column[classes[0].name]))) for name, column in zip(column_names, columns)]
    return labelled_grid(rows, [evaluated.name for evaluated in classes], block_labels=blocks)
