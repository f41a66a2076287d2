"""eval-scripts/toy-quality.py on the shipped toy model: the table and the JSON last line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from erasure.grids import grid_layout
from erasure.prompts import PromptFileError
from erasure.toy.quality import (
    SEED_STRIDE,
    WordingRow,
    attribute_prompts,
    measure_prompts,
    measure_quality,
    read_wording_rows,
)
from erasure.toy.world import ARTISTS, CLASS_NAMES, COLOURS, OBJECTS

ROOT = Path(__file__).resolve().parents[1]


def test_attribute_prompts_cover_every_artist_colour_and_object() -> None:
    prompts, artists, objects, colours = attribute_prompts(len(ARTISTS) * len(COLOURS) * len(OBJECTS))
    assert len(set(prompts)) == len(prompts) == 144
    assert set(artists) == set(range(1, 10)) and set(objects) == {0, 1, 2, 3} and set(colours) == {0, 1, 2, 3}
    first = prompts[0].split(" by ")
    assert first[1] == ARTISTS[artists[0] - 1] and first[0] == f"a {COLOURS[colours[0]]} {OBJECTS[objects[0]]}"


def test_toy_quality_script_prints_the_table_and_a_json_last_line(tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, "eval-scripts/toy-quality.py", "--num_samples", "2", "--grid", str(grid), "--grid_columns", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("Using the embedded toy model")
    report = json.loads(lines[-1])
    assert list(report["artist"]) == list(CLASS_NAMES)
    # --num_samples 2 per class and 2 attribute prompts: every accuracy is 0, 1 or 2 hits out of 2
    assert all(value in (0.0, 0.5, 1.0) for value in [*report["artist"].values(), report["object"], report["colour"]])
    # the 2 attribute prompts name 2 objects and 2 colours: per-name accuracies average to the overall one
    assert set(report["objects"]) <= set(OBJECTS) and set(report["colours"]) <= set(COLOURS) and report["objects"]
    table = [line for line in lines if line.startswith("| ")]
    assert table[0] == "| class | prompt | artist accuracy (N=2) |"
    assert len(table) == 1 + len(CLASS_NAMES) + 1  # a row per class, then the attribute prompts' row
    for class_id, (row, name) in enumerate(zip(table[1:], CLASS_NAMES)):
        assert row.startswith(f"| {class_id} {name} | ") and row.endswith(f" | {report['artist'][name]:.2f} |"), row
    assert table[-1].startswith("| - | ") and f"object {report['object']:.2f}, colour {report['colour']:.2f}" in table[-1]
    # one row of --grid_columns 32 px samples per class, labelled: the layout's size
    layout = grid_layout([torch.zeros(2, 3, 32, 32)] * len(CLASS_NAMES), list(CLASS_NAMES))
    assert Image.open(grid).size == (layout.width, layout.height)


def test_toy_quality_refuses_bad_numbers() -> None:
    result = subprocess.run([sys.executable, "eval-scripts/toy-quality.py", "--num_samples", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--num_samples" in result.stderr


def test_compare_measures_before_and_after_with_the_same_seeds(tmp_path: Path) -> None:
    from erasure.loading import load_model, model_fingerprint
    from erasure.weight_differences import WeightDifference

    model = load_model(verbose=False)
    state = model.state_dict()
    generator = torch.Generator().manual_seed(0)
    shifts = {k: 0.1 * torch.randn(v.shape, generator=generator) for k, v in state.items() if k.endswith("attn2.to_v.weight")}
    difference = WeightDifference("test", "vela quorin", shifts, {"base_model_fingerprint": model_fingerprint(model)})
    path = difference.save(tmp_path / "shift.safetensors")
    result = subprocess.run(
        [sys.executable, "eval-scripts/toy-quality.py", "--num_samples", "1", "--apply", str(path), "--compare"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(report["before"]["artist"]) == list(CLASS_NAMES)
    changes = report["max_abs_pixel_change"]
    assert set(changes) == {*CLASS_NAMES, "attributes"} and max(changes.values()) > 0.01
    assert "accuracy before (N=1)" in result.stdout


def test_compare_needs_apply() -> None:
    result = subprocess.run([sys.executable, "eval-scripts/toy-quality.py", "--compare"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--apply" in result.stderr


def write_rows(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "wordings.csv"
    path.write_text("prompt,evaluation_seed,case_number,concept,class,object,colour\n" + "\n".join(lines) + "\n")
    return path


def test_measure_prompts_matches_the_class_measurement_on_the_same_seeds(tmp_path: Path) -> None:
    from erasure.loading import load_model
    from erasure.toy.oracle import load_oracle

    model, oracle = load_model(verbose=False), load_oracle()
    seed = 5_000_000
    classes = measure_quality(model, oracle, 3, seed)
    first_artist = seed + 1 * SEED_STRIDE  # measure_quality's seeds of class 1 (the first artist)
    path = write_rows(tmp_path, [f"{ARTISTS[0]},{first_artist},0,{ARTISTS[0]},{ARTISTS[0]},,",
                                 f"a red circle,{seed},1,circle,,circle,red"])
    rows = read_wording_rows(path)
    assert rows[1] == WordingRow("a red circle", seed, 0, OBJECTS.index("circle"), COLOURS.index("red"))
    images: dict[str, torch.Tensor] = {}
    report = measure_prompts(model, oracle, rows, 3, images=images)
    assert report.prompts[ARTISTS[0]] == report.artist[ARTISTS[0]] == classes.artist[ARTISTS[0]]
    assert set(report.objects) == {"circle"} and set(report.colours) == {"red"}
    assert set(images) == {r.prompt for r in rows}
    assert [row.prompt for row in read_wording_rows(path, concept="circle")] == ["a red circle"]


@pytest.mark.parametrize(("lines", "message"), [
    (["vela quorin,1,0,x,nobody,,"], "line 2: unknown class"),
    (["a red circle,1,0,x,,hexagon,red"], "line 2: unknown object"),
    (["vela quorin,1,0,x,vela quorin,,", "vela quorin,2,1,x,vela quorin,,"], "more than once"),
])
def test_bad_wording_rows_are_refused(tmp_path: Path, lines: list[str], message: str) -> None:
    with pytest.raises(PromptFileError, match=message):
        read_wording_rows(write_rows(tmp_path, lines))
    with pytest.raises(PromptFileError, match="no row whose concept"):
        read_wording_rows(write_rows(tmp_path, ["vela quorin,1,0,x,vela quorin,,"]), concept="triangle")


def test_prompts_path_script_adds_prompts_objects_and_colours(tmp_path: Path) -> None:
    path = write_rows(tmp_path, ["a blue square by tamsin brack,7,0,tamsin brack,tamsin brack,square,blue"])
    result = subprocess.run(
        [sys.executable, "eval-scripts/toy-quality.py", "--num_samples", "2", "--prompts_path", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(report["prompts"]) == ["a blue square by tamsin brack"] and list(report["artist"]) == ["tamsin brack"]
    assert list(report["objects"]) == ["square"] and list(report["colours"]) == ["blue"]
    assert report["prompts"]["a blue square by tamsin brack"] == report["artist"]["tamsin brack"]
