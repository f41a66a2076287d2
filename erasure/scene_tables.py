"""Scene results and their tables (METHOD.md §4): per concept (CSV, Markdown, JSON) and in the
paper's Table 2 layout — per time step the mean FID / ACC / LPIPS of the forgotten (erased),
recovered (restored) and regular concepts — for each wording set and method.

The means are over concepts only: the blank class (row concept "") is left out of them, as the
paper's table has only the nine artists, but it stays in the per-concept rows. FID and LPIPS are
labelled by what computed them (``metric_labels``): on the toy model they are the toy oracle's
features, not Inception / AlexNet, and their scale is not the paper's.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from erasure.errors import SceneError
from erasure.grids import labelled_grid
from erasure.metrics import ConceptMetrics
from erasure.tables import LEFT, RIGHT, markdown_table

if TYPE_CHECKING:
    from erasure.scenes import EvaluatedClass, Timeline

ERASED, RESTORED, REGULAR = "erased", "restored", "regular"
ROLES = (ERASED, RESTORED, REGULAR)
#: The paper's names of the roles (Table 2's column groups).
PAPER_ROLE_NAMES = {ERASED: "forgotten", RESTORED: "recovered", REGULAR: "regular"}
EXACT, HELD_OUT = "exact", "held-out"


@dataclass
class SceneRow:
    step: str
    role: str
    metrics: ConceptMetrics
    wording: str = EXACT
    concept: str = ""


@dataclass
class SceneResult:
    """Every (step, class) row of one method, and the images of every step (uint8, for the grid)."""

    timeline: Timeline
    concepts: list[str]
    method: str = ""
    rows: list[SceneRow] = field(default_factory=list)
    images: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def metric_labels(extractors: Mapping[str, str]) -> dict[str, str]:
    """Column names that say what FID and LPIPS were computed with: "FID" / "LPIPS" only for
    Inception / AlexNet, otherwise e.g. "oracle-feature FID" (the toy oracle's features)."""
    labels = {"acc": "ACC (%)"}
    for metric, reference, name in (("fid", "inception", "FID"), ("lpips", "alex", "LPIPS")):
        extractor = extractors.get(metric, "")
        if extractor.startswith(reference):
            labels[metric] = name
        elif extractor.startswith("classifier"):
            labels[metric] = f"classifier-feature {name}"
        else:
            labels[metric] = f"oracle-feature {name}"
    return labels


CSV_COLUMNS = ("method", "wording", "step", "concept", "role", "class_index", "images", "fid", "lpips", "acc",
               "acc_original")


def _number(value: float | None, digits: str) -> str:
    if value is None:
        return ""
    return "nan" if not math.isfinite(value) else format(value, digits)


def scene_csv(results: Sequence[SceneResult]) -> str:
    """One line per (method, wording, step, class): role, FID, LPIPS, ACC (fraction), original ACC."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for result in results:
        for row in result.rows:
            m = row.metrics
            writer.writerow(
                [result.method, row.wording, row.step, m.concept, row.role,
                 "" if m.class_index is None else m.class_index, m.images, _number(m.fid, ".6g"),
                 _number(m.lpips, ".6g"), _number(m.acc, ".4f"), _number(m.acc_original, ".4f")]
            )
    return buffer.getvalue()


def role_means(result: SceneResult, step: str, wording: str, role: str) -> dict[str, float] | None:
    """Mean FID, ACC (fraction) and LPIPS of the concepts (not the blank class) with ``role`` at
    ``step`` in ``wording``; None when no concept has the role then."""
    rows = [r.metrics for r in result.rows
            if r.step == step and r.wording == wording and r.role == role and r.concept]
    if not rows:
        return None

    def mean(values: list[float | None]) -> float:
        present = [value for value in values if value is not None]
        return sum(present) / len(present) if present else math.nan

    return {"fid": mean([m.fid for m in rows]), "acc": mean([m.acc for m in rows]),
            "lpips": mean([m.lpips for m in rows]), "concepts": len(rows)}


def paper_layout_markdown(results: Sequence[SceneResult], wording: str, labels: Mapping[str, str]) -> str:
    """The paper's Table 2 layout for one wording set: a row per (time step, method), per role the
    mean FID, ACC (%) and LPIPS ("-" where no concept has the role)."""
    headers = ["step", "method"]
    for role in ROLES:
        headers += [f"{PAPER_ROLE_NAMES[role]} {labels['fid']}", f"{PAPER_ROLE_NAMES[role]} ACC (%)",
                    f"{PAPER_ROLE_NAMES[role]} {labels['lpips']}"]
    rows = []
    for step in results[0].timeline.steps:
        for result in results:
            row = [step.label, result.method]
            for role in ROLES:
                means = role_means(result, step.label, wording, role)
                row += (["-"] * 3 if means is None else
                        [f"{means['fid']:.2f}", f"{100 * means['acc']:.1f}", f"{means['lpips']:.3f}"])
            rows.append(row)
    return markdown_table(headers, rows, [LEFT, LEFT, *[RIGHT] * 9])


def scene_markdown(result: SceneResult, labels: Mapping[str, str], wording: str = EXACT) -> str:
    """Per step a heading (what it changes) and a table: class, role, FID, ACC (%), original ACC, LPIPS."""
    lines = [f"### {result.timeline.name}, {result.method}, {wording} prompts, per concept", ""]
    for step in result.timeline.steps:
        lines += [f"#### {step.label}: {step.describe(result.concepts)}", ""]
        rows = []
        for row in (row for row in result.rows if row.step == step.label and row.wording == wording):
            m = row.metrics
            acc = "-" if m.acc is None else f"{100 * m.acc:.1f}"
            original = "-" if m.acc_original is None else f"{100 * m.acc_original:.1f}"
            rows.append([m.concept, row.role, _number(m.fid, ".3f") or "-", acc, original, _number(m.lpips, ".3f") or "-"])
        headers = ["concept", "role", labels["fid"], "ACC (%)", "ACC original (%)", labels["lpips"]]
        lines += [markdown_table(headers, rows, [LEFT, LEFT, RIGHT, RIGHT, RIGHT, RIGHT]), ""]
    return "\n".join(lines) + "\n"


def _json_value(value: float | None) -> float | str | None:
    return value if value is None or math.isfinite(value) else str(value)


def scene_record(result: SceneResult) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """{wording: {step: {class name: {role, acc, acc_original, fid, lpips}}}} (JSON-ready)."""
    record: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for row in result.rows:
        m = row.metrics
        record.setdefault(row.wording, {}).setdefault(row.step, {})[m.concept] = {
            "role": row.role, "acc": _json_value(m.acc), "acc_original": _json_value(m.acc_original),
            "fid": _json_value(m.fid), "lpips": _json_value(m.lpips),
        }
    return record


def role_means_record(result: SceneResult) -> dict[str, dict[str, dict[str, Any]]]:
    """{wording: {step: {forgotten / recovered / regular: means or None}}} (the paper-layout numbers)."""
    wordings = list(dict.fromkeys(row.wording for row in result.rows))
    return {
        wording: {
            step.label: {
                PAPER_ROLE_NAMES[role]: (None if (means := role_means(result, step.label, wording, role)) is None
                                         else {key: _json_value(value) for key, value in means.items()})
                for role in ROLES
            }
            for step in result.timeline.steps
        }
        for wording in wordings
    }


def role_summary(result: SceneResult, wording: str = EXACT) -> dict[str, float | str | None]:
    """The numbers the paper's claim is about, over all steps: how low erased ACC goes, how far
    restored and regular concepts stray from the original (None where no row has the role)."""

    def largest(role: str, value: Callable[[ConceptMetrics], float | None]) -> float | str | None:
        values = [value(row.metrics) for row in result.rows if row.role == role and row.wording == wording]
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
