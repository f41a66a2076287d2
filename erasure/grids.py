"""Image grids for reports: plain tiles (``image_grid``) and tiles that carry their labels (``labelled_grid``).

A grid that shows evidence of an erasure (before/after per class, or the scenes of METHOD.md §4
with one column block per time step) is only evidence if a reader can tell which row is which
class and which columns are which model without the script at hand. ``labelled_grid`` therefore
draws the class name left of each row and headers over column blocks ("before" / "after",
"t0", "t1", ...) into the image itself, with Pillow's built-in font (no font files, no network).

Both functions are pure: they take rows of images [N, 3, H, W] in [0, 1] and return one
[3, H', W'] float image in [0, 1] on white; images keep their exact values (text is drawn only
outside them), so a grid can be compared pixel for pixel with the images it shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from erasure.errors import GridError

GRID_PADDING = 2
#: Small images are upscaled (nearest neighbour, integer factor) to at least this height, so
#: that a label line is small beside them and toy images (32 px) stay readable.
MIN_CELL_SIDE = 64
#: Font size is a fraction of the cell height, but never below what stays legible on screen.
MIN_FONT_SIZE = 11
FONT_FRACTION = 8
LABEL_MARGIN = 4
#: Images may stray this far outside [0, 1] (float rounding of decoders) before they are refused.
RANGE_TOLERANCE = 1e-4


def _check_rows(rows: Sequence[torch.Tensor]) -> tuple[int, int, int]:
    """Count, height and width shared by every row; refuse rows that are not [N, 3, H, W] in [0, 1]."""
    if len(rows) == 0:
        raise GridError("No rows to tile; pass at least one [N, 3, H, W] tensor.")
    first = rows[0]
    for index, row in enumerate(rows):
        if not isinstance(row, torch.Tensor) or row.ndim != 4 or row.shape[1] != 3 or row.shape[0] < 1:
            shape = tuple(row.shape) if isinstance(row, torch.Tensor) else type(row).__name__
            raise GridError(f"Row {index} is {shape}; every row must be a tensor [N >= 1, 3, H, W].")
        if row.shape != first.shape:
            raise GridError(
                f"Row {index} is {tuple(row.shape)} but row 0 is {tuple(first.shape)}; every row needs the same "
                f"number of images of the same size."
            )
        low, high = float(row.min()), float(row.max())
        if not (low >= -RANGE_TOLERANCE and high <= 1 + RANGE_TOLERANCE):  # also refuses NaN
            raise GridError(
                f"Row {index} holds values in [{low:g}, {high:g}]; pass images scaled to [0, 1] "
                f"(divide uint8 images by 255, map [-1, 1] decoder output with (x + 1) / 2)."
            )
    count, _, height, width = first.shape
    return count, height, width


def _place(grid: torch.Tensor, rows: Sequence[torch.Tensor], top: int, left: int, padding: int, scale: int) -> None:
    """Write every image (upscaled by ``scale``) into ``grid`` below ``top`` and right of ``left``."""
    for row_index, row in enumerate(rows):
        images = row.detach().to("cpu", torch.float32).clamp(0, 1)
        if scale > 1:
            images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        height, width = images.shape[2:]
        y = top + padding + row_index * (height + padding)
        for column, image in enumerate(images):
            x = left + padding + column * (width + padding)
            grid[:, y : y + height, x : x + width] = image


def image_grid(rows: Sequence[torch.Tensor], padding: int = GRID_PADDING) -> torch.Tensor:
    """Tile rows of images ([N, 3, H, W] each, equal shapes, values in [0, 1]) into one [3, H', W'] image on white.

    ``H' = R * (H + padding) + padding`` and ``W' = N * (W + padding) + padding`` for R rows.
    """
    if padding < 0:
        raise GridError(f"padding must be >= 0 pixels, got {padding}.")
    count, height, width = _check_rows(rows)
    grid = torch.ones(3, len(rows) * (height + padding) + padding, count * (width + padding) + padding)
    _place(grid, rows, 0, 0, padding, 1)
    return grid


def _text_width(font: ImageFont.FreeTypeFont, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return right - left if text else 0


def _font(cell_height: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(MIN_FONT_SIZE, cell_height // FONT_FRACTION))


#: One header: (text, first column, column count).
Span = tuple[str, int, int]


@dataclass(frozen=True)
class GridLayout:
    """Where everything of a ``labelled_grid`` lands, in pixels: used to draw it and to check it.

    ``headers`` holds one list of spans per header line (blocks above single columns);
    ``top`` is their total height and ``left`` the width of the row-label column.
    """

    rows: int
    columns: int
    scale: int
    padding: int
    cell_height: int
    cell_width: int
    font: ImageFont.FreeTypeFont
    headers: list[list[Span]]
    line_height: int
    left: int

    @property
    def top(self) -> int:
        return len(self.headers) * self.line_height

    @property
    def height(self) -> int:
        return self.top + self.rows * (self.cell_height + self.padding) + self.padding

    @property
    def width(self) -> int:
        return self.left + self.columns * (self.cell_width + self.padding) + self.padding

    def image_top(self, row: int) -> int:
        return self.top + self.padding + row * (self.cell_height + self.padding)

    def image_left(self, column: int) -> int:
        return self.left + self.padding + column * (self.cell_width + self.padding)

    def span_width(self, span: int) -> int:
        return span * (self.cell_width + self.padding) - self.padding


def _header_lines(
    column_labels: Sequence[str] | None, block_labels: Sequence[tuple[str, int]] | None
) -> list[list[Span]]:
    lines = []
    if block_labels is not None:
        starts = [sum(count for _, count in block_labels[:index]) for index in range(len(block_labels))]
        lines.append([(str(text), start, count) for (text, count), start in zip(block_labels, starts)])
    if column_labels is not None:
        lines.append([(str(text), column, 1) for column, text in enumerate(column_labels)])
    return lines


def _check_labels(
    rows: Sequence[torch.Tensor],
    count: int,
    row_labels: Sequence[str],
    column_labels: Sequence[str] | None,
    block_labels: Sequence[tuple[str, int]] | None,
) -> None:
    def length(labels: Sequence[str]) -> int:
        return 1 if isinstance(labels, str) else len(labels)

    if length(row_labels) != len(rows) or isinstance(row_labels, str):
        raise GridError(
            f"Got {length(row_labels)} row label(s) for {len(rows)} rows; pass one label per row (a list of strings)."
        )
    if column_labels is not None and (length(column_labels) != count or isinstance(column_labels, str)):
        raise GridError(
            f"Got {length(column_labels)} column label(s) for {count} columns; pass one per column (a list) or None."
        )
    if block_labels is not None:
        counts = [block[1] if isinstance(block, tuple | list) and len(block) == 2 else None for block in block_labels]
        if any(not isinstance(n, int) or n < 1 for n in counts) or sum(counts) != count:
            raise GridError(
                f"Block labels span {counts} columns but the rows have {count}; pass (label, column count) "
                f"pairs with counts >= 1 that add up to {count}."
            )


def _too_wide(cell_width: int, padding: int, headers: list[list[Span]], font: ImageFont.FreeTypeFont) -> str | None:
    """The first header wider than the columns it spans, or None when all fit."""
    for line in headers:
        for text, _, span in line:
            if _text_width(font, text) > span * (cell_width + padding) - padding:
                return text
    return None


def _automatic_scale(height: int, width: int, padding: int, headers: list[list[Span]]) -> int:
    """Smallest scale with cells at least ``MIN_CELL_SIDE`` tall and every header fitting.

    Once the font grows with the cell (``FONT_FRACTION``) text and cells grow together, so
    scales beyond that point are not tried: a header that does not fit there never will.
    """
    smallest = max(1, math.ceil(MIN_CELL_SIDE / height))
    largest = max(smallest, math.ceil((MIN_FONT_SIZE + 1) * FONT_FRACTION / height))
    for scale in range(smallest, largest + 1):
        if _too_wide(width * scale, padding, headers, _font(height * scale)) is None:
            return scale
    return largest


def grid_layout(
    rows: Sequence[torch.Tensor],
    row_labels: Sequence[str],
    column_labels: Sequence[str] | None = None,
    block_labels: Sequence[tuple[str, int]] | None = None,
    scale: int | None = None,
    padding: int = GRID_PADDING,
) -> GridLayout:
    """The layout ``labelled_grid`` draws with these arguments, after checking all of them."""
    if padding < 0:
        raise GridError(f"padding must be >= 0 pixels, got {padding}.")
    count, height, width = _check_rows(rows)
    _check_labels(rows, count, row_labels, column_labels, block_labels)
    headers = _header_lines(column_labels, block_labels)
    if scale is None:
        scale = _automatic_scale(height, width, padding, headers)
    elif isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise GridError(f"scale must be a whole number >= 1 (or None to choose one), got {scale!r}.")
    font = _font(height * scale)
    too_wide = _too_wide(width * scale, padding, headers, font)
    if too_wide is not None:
        raise GridError(
            f"Header {too_wide!r} is wider than the columns it spans at scale {scale}; shorten it, let it span "
            f"more columns, or pass a larger scale (scale=None picks the smallest that fits, if any)."
        )
    ascent, descent = font.getmetrics()
    label_width = max(_text_width(font, str(text)) for text in row_labels)
    return GridLayout(
        rows=len(rows),
        columns=count,
        scale=scale,
        padding=padding,
        cell_height=height * scale,
        cell_width=width * scale,
        font=font,
        headers=headers,
        line_height=ascent + descent + 2 * LABEL_MARGIN,
        left=label_width + 2 * LABEL_MARGIN,
    )


def labelled_grid(
    rows: Sequence[torch.Tensor],
    row_labels: Sequence[str],
    column_labels: Sequence[str] | None = None,
    block_labels: Sequence[tuple[str, int]] | None = None,
    scale: int | None = None,
    padding: int = GRID_PADDING,
) -> torch.Tensor:
    """``image_grid`` with a label left of every row and headers over the columns, as [3, H', W'] in [0, 1].

    ``block_labels`` are (text, column count) pairs whose counts add up to the row length,
    e.g. ``[("before", 8), ("after", 8)]``; ``column_labels`` name single columns (one per
    column, e.g. time steps "t0", "t1", ...). Both header lines may be given; blocks go on top.
    Images are upscaled by the integer ``scale`` (nearest neighbour: exact pixel copies);
    None picks the smallest scale that makes them at least ``MIN_CELL_SIDE`` px tall and lets
    every header fit over its columns.

    Size, with ``h = H * scale``, ``w = W * scale``, ``n`` header lines of ``t`` px each (``t``
    grows with ``h``) and ``L`` the widest row label plus margins:
    ``[3, n * t + R * (h + padding) + padding, L + N * (w + padding) + padding]``; image
    ``(r, c)`` starts at row ``n * t + padding + r * (h + padding)``, column
    ``L + padding + c * (w + padding)``. ``grid_layout`` returns these numbers.
    """
    layout = grid_layout(rows, row_labels, column_labels, block_labels, scale, padding)
    canvas = Image.new("L", (layout.width, layout.height), color=255)
    draw = ImageDraw.Draw(canvas)
    for line, spans in enumerate(layout.headers):
        for text, first, span in spans:
            x = layout.image_left(first) + (layout.span_width(span) - _text_width(layout.font, text)) // 2
            y = line * layout.line_height + layout.line_height // 2
            draw.text((x, y), text, fill=0, font=layout.font, anchor="lm")
    for row, text in enumerate(row_labels):
        y = layout.image_top(row) + layout.cell_height // 2
        draw.text((LABEL_MARGIN, y), str(text), fill=0, font=layout.font, anchor="lm")
    grid = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).expand(3, -1, -1).clone()
    _place(grid, rows, layout.top, layout.left, padding, layout.scale)
    return grid
