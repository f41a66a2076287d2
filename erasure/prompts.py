"""Prompt CSVs for image generation: read, validate, filter.

A prompt file has the columns ``prompt``, ``evaluation_seed`` and ``case_number`` (the seed
README's format; other columns are kept as strings in ``PromptRow.extra``). Rules, each
refused with one error that names the file, the row and the fix:
- every required column is present and the file has at least one row;
- ``evaluation_seed`` and ``case_number`` are integers (``42`` or ``42.0``, as pandas writes
  them) in [0, 2**63); images are named ``{case_number}_{k}.png``, so case numbers are unique;
- a missing prompt cell is the blank prompt "" (class 0 of the classification prompts).

``read_i2p_prompts`` reads the I2P nudity benchmark CSV a user downloads (not shipped here):
the same three columns plus ``nudity_percentage`` and ``categories``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from erasure.errors import PromptFileError

REQUIRED_COLUMNS: tuple[str, ...] = ("prompt", "evaluation_seed", "case_number")
I2P_COLUMNS: tuple[str, ...] = (*REQUIRED_COLUMNS, "nudity_percentage", "categories")
#: Seeds go to torch.Generator.manual_seed (64-bit); case numbers share the bound.
MAX_INTEGER = 2**63 - 1


@dataclass(frozen=True)
class PromptRow:
    """One row of a prompt file."""

    prompt: str
    evaluation_seed: int
    case_number: int
    extra: dict[str, str] = field(default_factory=dict)
    line: int = 0  # line in the file (for error messages); 0 when not read from a file


def _integer(path: Path, line: int, column: str, text: str | None) -> int:
    """A non-negative integer cell; "42.0" counts as 42 because pandas writes integer columns that way."""
    cleaned = (text or "").strip()
    value = None
    if cleaned.isdigit():
        value = int(cleaned)
    else:
        try:
            number = float(cleaned)
        except ValueError:
            number = math.nan
        if number.is_integer():
            value = int(number)
    if value is None or not 0 <= value <= MAX_INTEGER:
        raise PromptFileError(
            f"{path}, line {line}: {column}={cleaned!r} is not an integer in [0, 2**63); write a whole number "
            f"such as 42 in every row."
        )
    return value


def _open_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str | None]]]]:
    """Header columns and (line number, cells) of every data row."""
    if not path.is_file():
        raise PromptFileError(f"Prompt file {path} does not exist (or is not a file); check --prompts_path.")
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        try:
            columns = [name.strip() for name in reader.fieldnames or []]
            for raw in reader:
                cells = {key if key is None else key.strip(): value for key, value in raw.items()}
                rows.append((reader.line_num, cells))
        except (csv.Error, UnicodeDecodeError) as error:
            raise PromptFileError(f"{path} is not a readable UTF-8 CSV file ({error}); save it as CSV.") from error
    if not columns:
        raise PromptFileError(
            f"{path} is empty; it needs a header line with the columns {', '.join(REQUIRED_COLUMNS)} and one row "
            f"per prompt."
        )
    return columns, rows


def read_prompts(path: str | Path, required: Sequence[str] = REQUIRED_COLUMNS) -> list[PromptRow]:
    """All rows of a prompt CSV, validated (see the module docstring)."""
    path = Path(path)
    columns, raw_rows = _open_rows(path)
    missing = [name for name in required if name not in columns]
    if missing:
        raise PromptFileError(
            f"{path} lacks the column(s) {', '.join(missing)} (it has: {', '.join(columns)}); a prompt file needs "
            f"{', '.join(required)}. Add them to the header line."
        )
    if not raw_rows:
        raise PromptFileError(f"{path} has a header but no rows; add one row per prompt.")
    rows: list[PromptRow] = []
    first_line_of_case: dict[int, int] = {}
    for line, raw in raw_rows:
        if None in raw:
            raise PromptFileError(
                f"{path}, line {line}: more cells than header columns; quote prompts that contain commas "
                f'("a, b").'
            )
        case_number = _integer(path, line, "case_number", raw["case_number"])
        if case_number in first_line_of_case:
            raise PromptFileError(
                f"{path}, line {line}: case_number {case_number} already used on line "
                f"{first_line_of_case[case_number]}; images are named {{case_number}}_{{k}}.png, so make case "
                f"numbers unique."
            )
        first_line_of_case[case_number] = line
        rows.append(
            PromptRow(
                prompt=(raw["prompt"] or "").strip(),
                evaluation_seed=_integer(path, line, "evaluation_seed", raw["evaluation_seed"]),
                case_number=case_number,
                extra={key: value or "" for key, value in raw.items() if key not in REQUIRED_COLUMNS},
                line=line,
            )
        )
    return rows


def select_cases(
    rows: Iterable[PromptRow], from_case: int | None = None, till_case: int | None = None
) -> list[PromptRow]:
    """Rows with ``from_case <= case_number <= till_case`` (either bound optional); refuses an empty selection."""
    rows = list(rows)
    selected = [
        row
        for row in rows
        if (from_case is None or row.case_number >= from_case) and (till_case is None or row.case_number <= till_case)
    ]
    if not selected:
        cases = sorted(row.case_number for row in rows)
        raise PromptFileError(
            f"No case_number lies in [{from_case}, {till_case}] (the file has {cases[0]}..{cases[-1]}); "
            f"change --from_case / --till_case."
        )
    return selected


def read_i2p_prompts(
    path: str | Path, min_nudity_percentage: float = 0.0, category: str | None = None
) -> list[PromptRow]:
    """The rows of an I2P CSV with ``nudity_percentage >= min_nudity_percentage`` and, when given,
    ``category`` among their comma-separated ``categories`` (e.g. "sexual").

    ``extra["nudity_percentage"]`` keeps the file's text; it is checked to be a number in [0, 100].
    """
    path = Path(path)
    columns, _ = _open_rows(path)
    if "evaluation_seed" not in columns and "sd_seed" in columns:
        raise PromptFileError(
            f"{path} looks like the raw I2P release (sd_seed, no evaluation_seed/case_number); use the I2P CSV "
            f"with evaluation seeds and case numbers (columns {', '.join(I2P_COLUMNS)}), or add those columns."
        )
    rows = read_prompts(path, I2P_COLUMNS)
    selected = []
    for row in rows:
        text = row.extra["nudity_percentage"].strip()
        try:
            nudity = float(text)
        except ValueError:
            nudity = math.nan
        if not 0.0 <= nudity <= 100.0:
            raise PromptFileError(
                f"{path}, line {row.line}: nudity_percentage={text!r} is not a number in [0, 100]; "
                f"fix the cell."
            )
        categories = {name.strip().lower() for name in row.extra["categories"].split(",")}
        if nudity >= min_nudity_percentage and (category is None or category.lower() in categories):
            selected.append(row)
    if not selected:
        raise PromptFileError(
            f"{path}: no row has nudity_percentage >= {min_nudity_percentage}"
            + (f" and category {category!r}" if category else "")
            + "; lower the threshold or check the file."
        )
    return selected
