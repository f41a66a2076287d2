"""Markdown tables: the one way every report, script and benchmark prints a table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LEFT, RIGHT, PLAIN = ":---", "---:", "---"


def cell(value: Any) -> str:
    """A table cell: floats to 4 significant digits, None as "-", text as it is."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A Markdown table: one line of ``headers``, the alignment line (``align`` per column: LEFT,
    RIGHT or PLAIN, default PLAIN), then one line per row (cells through ``cell``)."""
    align = list(align or [PLAIN] * len(headers))
    widths = {len(headers), len(align), *(len(row) for row in rows)}
    if len(widths) != 1:
        raise ValueError(f"markdown_table: rows, headers and alignments differ in length ({sorted(widths)}); give one "
                         f"cell per column.")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)
