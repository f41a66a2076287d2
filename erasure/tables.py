"""Markdown tables: the one way every report, script and benchmark prints a table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def cell(value: Any) -> str:
    """A table cell: floats to 4 significant digits, None as "-", anything else as text."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]], headers: Sequence[str] | None = None) -> str:
    """A Markdown table of ``rows`` (dicts keyed by ``columns``; missing cells "-"), one line per row."""
    headers = list(headers or columns)
    if len(headers) != len(columns):
        raise ValueError(f"markdown_table: {len(headers)} headers for {len(columns)} columns; give one per column.")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)
