"""Grids: plain and labelled tiles keep the images' exact pixels where the layout says, and the labels are drawn."""

from __future__ import annotations

import pytest
import torch

from erasure.grids import GridError, grid_layout, image_grid, labelled_grid

SIDE = 32  # the toy world's image size
RED = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
DARK = 0.5


def gray_rows(rows: int, columns: int, side: int = SIDE, value: float = 0.6) -> list[torch.Tensor]:
    return [torch.full((columns, 3, side, side), value) for _ in range(rows)]


def has_dark_pixels(area: torch.Tensor) -> bool:
    return bool((area.min(dim=0).values < DARK).any())


def test_image_grid_size_and_positions() -> None:
    rows = gray_rows(2, 3, side=5)
    rows[1][2] = RED.expand(3, 5, 5)
    grid = image_grid(rows, padding=2)
    assert grid.shape == (3, 2 * (5 + 2) + 2, 3 * (5 + 2) + 2)
    top, left = 2 + 1 * (5 + 2), 2 + 2 * (5 + 2)
    assert torch.equal(grid[:, top : top + 5, left : left + 5], RED.expand(3, 5, 5))
    assert torch.equal(grid[:, :2, :], torch.ones(3, 2, grid.shape[2]))  # white padding
    assert torch.equal(grid[:, 2:7, 2:7], torch.full((3, 5, 5), 0.6))


def test_labelled_grid_size_formula() -> None:
    rows = gray_rows(3, 4)
    labels = ["", "vela quorin", "a much longer class name"]
    headers = {"column_labels": ["t0", "t1", "t2", "t3"], "block_labels": [("before", 2), ("after", 2)]}
    layout = grid_layout(rows, labels, **headers)
    assert layout.scale == 2 and (layout.cell_height, layout.cell_width) == (64, 64)  # 32 px upscaled to >= 64
    grid = labelled_grid(rows, labels, **headers)
    padding = 2
    assert grid.shape == (
        3,
        2 * layout.line_height + 3 * (64 + padding) + padding,
        layout.left + 4 * (64 + padding) + padding,
    )
    assert grid.dtype == torch.float32 and grid.min() >= 0 and grid.max() <= 1
    short = grid_layout(rows, ["", "a", "b"], scale=1)
    assert short.top == 0 and short.left < layout.left  # no header lines; shorter labels, narrower label column
    expected = (3, 3 * (32 + padding) + padding, short.left + 4 * (32 + padding) + padding)
    assert labelled_grid(rows, ["", "a", "b"], scale=1).shape == expected


def test_labels_are_drawn_in_their_boxes() -> None:
    rows = gray_rows(3, 4)
    labels = ["vela quorin", "", "tamsin brack"]
    blocks = [("before", 2), ("after", 2)]
    layout = grid_layout(rows, labels, column_labels=["t0", "t1", "t2", "t3"], block_labels=blocks)
    grid = labelled_grid(rows, labels, column_labels=["t0", "t1", "t2", "t3"], block_labels=blocks)
    for row, text in enumerate(labels):
        top = layout.image_top(row)
        box = grid[:, top : top + layout.cell_height, : layout.left]
        assert has_dark_pixels(box) == bool(text), (row, text)
    for line, spans in enumerate(layout.headers):
        for _, first, span in spans:
            left = layout.image_left(first)
            top = line * layout.line_height
            box = grid[:, top : top + layout.line_height, left : left + layout.span_width(span)]
            assert has_dark_pixels(box), (line, first)
    assert not has_dark_pixels(grid[:, : layout.top, : layout.left])  # the corner stays blank


def test_images_land_at_the_computed_position_upscaled_exactly() -> None:
    rows = gray_rows(2, 3, side=4)
    checker = torch.zeros(3, 4, 4)
    checker[0] = 1.0
    checker[:, ::2, ::2] = 1.0  # white / red checker, so nearest-neighbour upscaling is visible
    rows[1][2] = checker
    grid = labelled_grid(rows, ["first", "second"], block_labels=[("before", 1), ("after", 2)], scale=16)
    layout = grid_layout(rows, ["first", "second"], block_labels=[("before", 1), ("after", 2)], scale=16)
    top, left = layout.image_top(1), layout.image_left(2)
    placed = grid[:, top : top + 64, left : left + 64]
    assert torch.equal(placed, checker.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2))
    neighbour = layout.image_left(1)
    assert torch.equal(grid[:, top : top + 64, neighbour : neighbour + 64], torch.full((3, 64, 64), 0.6))
    red = (grid[0] == 1) & (grid[1] == 0) & (grid[2] == 0)
    assert int(red.sum()) == 12 * 16 * 16  # the checker's 12 red pixels, upscaled: no red elsewhere


def test_inputs_are_left_unchanged() -> None:
    rows = gray_rows(1, 2)
    before = rows[0].clone()
    labelled_grid(rows, ["x"])
    assert torch.equal(rows[0], before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"row_labels": ["only one"]}, "1 row label\\(s\\) for 2 rows"),
        ({"row_labels": "ab"}, "one label per row"),
        ({"column_labels": ["t0"]}, "1 column label\\(s\\) for 3 columns"),
        ({"block_labels": [("before", 1), ("after", 1)]}, "add up to 3"),
        ({"block_labels": [("before", 3), ("after", 0)]}, "counts >= 1"),
        ({"column_labels": ["a label too long for 32 px", "b", "c"], "scale": 1}, "'a label too long for 32 px'"),
        ({"column_labels": ["a header far too long for any single column", "b", "c"]}, "shorten it"),
        ({"scale": 0}, "whole number >= 1"),
    ],
)
def test_bad_labels_raise_one_clear_error(kwargs: dict, match: str) -> None:
    arguments = {"rows": gray_rows(2, 3), "row_labels": ["a", "b"], **kwargs}
    with pytest.raises(GridError, match=match):
        labelled_grid(**arguments)


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([], "at least one"),
        ([torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8)], "Row 1 is \\(3, 3, 8, 8\\) but row 0"),
        ([torch.rand(3, 8, 8)], "\\[N >= 1, 3, H, W\\]"),
        ([torch.full((1, 3, 8, 8), 255.0)], "divide uint8 images by 255"),
        ([torch.full((1, 3, 8, 8), float("nan"))], "scaled to \\[0, 1\\]"),
    ],
)
def test_bad_images_raise_one_clear_error(rows: list, match: str) -> None:
    with pytest.raises(GridError, match=match):
        image_grid(rows)
    assert issubclass(GridError, ValueError)


def test_a_long_header_makes_the_automatic_scale_larger() -> None:
    rows = gray_rows(1, 2)
    plain = grid_layout(rows, ["a"], column_labels=["t0", "t1"])
    wide = grid_layout(rows, ["a"], column_labels=["a longer header", "t1"])
    assert wide.scale > plain.scale
