"""Scenes: METHOD.md §4's timelines and roles, exact SepCE restore on the wide tiny model, baseline
add/subtract, tables, and eval-scripts/run-scenes.py end to end on the tiny model."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from erasure.bases import compute_bases
from erasure.classifier import predict
from erasure.increments import (
    Increment,
    attach_increment,
    attached_names,
    cross_attention_kv,
    detach,
    extract_increment,
)
from erasure.loading import model_fingerprint
from erasure.metrics import ConceptMetrics, FidFeatures
from erasure.generation import generate
from erasure.grids import grid_layout
from erasure.scene_tables import (
    HELD_OUT,
    SceneResult,
    SceneRow,
    metric_labels,
    paper_layout_markdown,
    role_summary,
    scene_csv,
    scene_grid,
    scene_markdown,
    scene_record,
)
from erasure.scenes import (
    ERASED,
    PAPER,
    PROTECT_ALL,
    REGULAR,
    RESTORED,
    SCENES,
    EvaluatedClass,
    SceneError,
    TimeStep,
    Timeline,
    TrainingGroup,
    make_edits,
    play,
    training_plan,
)
from erasure.toy.oracle import load_oracle
from erasure.toy.world import ARTISTS
from erasure.weight_differences import WeightDifference, WeightDifferenceError
from erasure.worlds import world_from_config_file
from test_classifier import last_json, load_script
from test_metrics import PooledColour
from test_trainers import write_images
from wide_tiny_model import build_wide_tiny_model, write_wide_tiny_config

CONCEPTS = list(ARTISTS[:3])  # the wide tiny model's 8 tokens keep their first 6 letters apart
TWO_STEPS = Timeline("test", (TimeStep("t0", erase=(0, 1)), TimeStep("t1", restore=(0,))))
SEEDS = [11, 12]


@pytest.fixture(scope="module")
def wide_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wide_tiny_config(tmp_path_factory.mktemp("wide"))


@pytest.fixture
def model(wide_config: Path) -> nn.Module:
    return build_wide_tiny_model(wide_config)


def images_of(model: nn.Module, prompt: str) -> torch.Tensor:
    return generate(model, [prompt] * len(SEEDS), SEEDS, steps=4, guidance=2.0)


def random_increments(model: nn.Module, concepts: list[str], scale: float = 3e4) -> dict[str, Increment]:
    """Jointly separable increments (each protects "" and the others) with large random coefficients."""
    bases = compute_bases(model, concepts, min_dims=1)
    generator = torch.Generator().manual_seed(0)
    increments = {}
    for concept, basis in bases.items():
        coeffs = {
            name: torch.randn(layer.out_features, basis.dims, generator=generator) * scale
            for name, layer in cross_attention_kv(model).items()
        }
        attach_increment(model, basis, coeffs=coeffs, trainable=False)
        increments[concept] = extract_increment(model, concept, basis)
    detach(model, concepts)
    return increments


# ----------------------------------------------------------------------------- timelines
def test_scenes_are_method_md_timelines() -> None:
    expected = {
        1: [("t0", (0, 1, 2, 3, 4, 5), ()), ("t1", (), (0, 1)), ("t3", (), (2,))],
        2: [("t0", (0, 1, 2, 3, 4, 5), ()), ("t1", (), (3, 4)), ("t3", (), (5,))],
        3: [("t0", (0, 2, 4), ()), ("t1", (), (0, 2)), ("t2", (1, 3), ()), ("t3", (), (1,)), ("t4", (5,), ())],
        4: [("t0", (0, 1, 2), ()), ("t1", (), (0,)), ("t2", (3, 4), ()), ("t3", (), (1,)), ("t4", (5,), ()),
            ("t5", (), (2,))],
    }
    assert sorted(SCENES) == [1, 2, 3, 4]
    for number, steps in expected.items():
        assert [(s.label, s.erase, s.restore) for s in SCENES[number].steps] == steps
        assert SCENES[number].concepts_needed == 6
    assert SCENES[3].erased_concepts == (0, 2, 4, 1, 3, 5)


def test_roles_follow_the_timeline() -> None:
    roles = SCENES[3].roles(9)
    e, r, g = ERASED, RESTORED, REGULAR
    assert [roles[step][i] for step in range(5) for i in (0, 1, 5)] == [
        e, g, g,  # t0: erase c0, c2, c4
        r, g, g,  # t1: restore c0, c2
        r, e, g,  # t2: erase c1, c3
        r, r, g,  # t3: restore c1
        r, r, e,  # t4: erase c5
    ]
    final = SCENES[1].roles(9)[-1]
    assert [final[i] for i in range(9)] == [r, r, r, e, e, e, g, g, g]
    assert SCENES[4].erased_sets()[-1] == {3, 4, 5}


@pytest.mark.parametrize(
    "steps, message",
    [
        ((TimeStep("t0", restore=(0,)),), "cannot restore c0, it was never erased"),
        ((TimeStep("t0", erase=(0,)), TimeStep("t1", restore=(0,)), TimeStep("t2", restore=(0,))),
         "restored already"),
        ((TimeStep("t0", erase=(0,)), TimeStep("t1", erase=(0,))), r"erased already \(twice without a restore\)"),
        ((TimeStep("t0"),), "erases and restores nothing"),
        ((TimeStep("t0", erase=(0,)), TimeStep("t0", restore=(0,))), "labels must be unique"),
        ((TimeStep("t0", erase=(-1,)),), "integers >= 0"),
        ((), "at least one time step"),
    ],
)
def test_bad_timelines_are_refused(steps: tuple[TimeStep, ...], message: str) -> None:
    with pytest.raises(SceneError, match=message):
        Timeline("bad", steps)


def test_training_plans_of_the_two_protocols() -> None:
    # Scene3: t0 erase c0, c2, c4; t1 restore c0, c2; t2 erase c1, c3; t3 restore c1; t4 erase c5
    assert training_plan(SCENES[3], PAPER, 9) == [
        TrainingGroup("t0", (0, 2, 4), ()),
        TrainingGroup("t2", (1, 3), (0, 2, 4)),  # restored c0, c2 are still protected
        TrainingGroup("t4", (5,), (0, 2, 4, 1, 3)),
    ]
    # Scene4 re-erases nothing, but c1 (erased at t0) is protected by later increments only
    plan = training_plan(SCENES[4], PAPER, 9)
    assert [(group.step, group.concepts) for group in plan] == [("t0", (0, 1, 2)), ("t2", (3, 4)), ("t4", (5,))]
    assert plan[1].protected_prompts(3, [f"c{i}" for i in range(9)]) == ["c4", "c0", "c1", "c2"]
    re_erase = Timeline("re", (TimeStep("t0", erase=(0,)), TimeStep("t1", restore=(0,)), TimeStep("t2", erase=(0, 1))))
    assert training_plan(re_erase, PAPER, 3) == [TrainingGroup("t0", (0,), ()), TrainingGroup("t2", (1,), (0,))]
    assert training_plan(SCENES[3], PROTECT_ALL, 9) == [TrainingGroup("t0", (0, 2, 4, 1, 3, 5), (6, 7, 8))]
    with pytest.raises(SceneError, match="Unknown protocol"):
        training_plan(SCENES[1], "all", 9)


# ----------------------------------------------------------------------------- composing
def test_sepce_restore_gives_the_original_images(model: nn.Module) -> None:
    increments = random_increments(model, CONCEPTS)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    original = {prompt: images_of(model, prompt) for prompt in ["", *CONCEPTS]}
    seen = []
    for scene_state in play(TWO_STEPS, CONCEPTS, make_edits(model, increments)):
        for prompt in ["", *CONCEPTS]:
            difference = float((images_of(model, prompt) - original[prompt]).abs().max())
            role = scene_state.roles.get(prompt, REGULAR)
            seen.append((scene_state.step.label, role))
            if role == ERASED:
                assert difference > 1e-2, (scene_state.step.label, prompt, difference)
            else:
                assert difference <= 1e-5, (scene_state.step.label, prompt, role, difference)
        assert attached_names(model) == [increments[c].name for c in scene_state.erased]
    assert ("t1", RESTORED) in seen and ("t1", ERASED) in seen and ("t0", REGULAR) in seen
    assert attached_names(model) == []  # the model is left as it was found
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_weight_difference_timeline_merges_and_restores_bit_for_bit(model: nn.Module) -> None:
    keys = [key for key in model.state_dict() if key.endswith(("attn2.to_k.weight", "attn2.to_q.weight"))]
    state = model.state_dict()
    original = {key: state[key].clone() for key in keys}
    generator = torch.Generator().manual_seed(1)
    fingerprint = model_fingerprint(model)
    differences = {
        concept: WeightDifference(
            "esd_x", concept, {key: torch.randn(original[key].shape, generator=generator) for key in keys},
            {"base_model_fingerprint": fingerprint},
        )
        for concept in CONCEPTS
    }
    timeline = Timeline("test", (TimeStep("t0", erase=(0, 1)), TimeStep("t1", restore=(0,), erase=(2,))))
    expected_sets = [{"vela quorin", "tamsin brack"}, {"tamsin brack", "odile fenwar"}]
    for scene_state, expected in zip(play(timeline, CONCEPTS, make_edits(model, differences)), expected_sets):
        assert set(scene_state.erased) == expected
        for key in keys:
            wanted = original[key] + sum(differences[c].deltas[key] for c in expected)
            torch.testing.assert_close(model.state_dict()[key], wanted, atol=1e-5, rtol=0)
    # restored from the kept originals, not by subtraction: bit for bit, so the base model's edits still load
    assert all(torch.equal(model.state_dict()[key], original[key]) for key in keys)
    assert model_fingerprint(model) == fingerprint
    make_edits(model, differences)
    differences["vela quorin"].metadata["base_model_fingerprint"] = "0" * 16
    with pytest.raises(WeightDifferenceError, match="was trained on base model 0000"):
        make_edits(model, differences)


def test_scene_input_errors(model: nn.Module) -> None:
    increments = random_increments(model, CONCEPTS[:2])
    with pytest.raises(SceneError, match="no increment or weight difference was given for them"):
        next(play(TWO_STEPS, CONCEPTS, make_edits(model, {CONCEPTS[0]: increments[CONCEPTS[0]]})))
    with pytest.raises(SceneError, match="only 1 concepts were given"):
        next(play(TWO_STEPS, CONCEPTS[:1], make_edits(model, increments)))
    with pytest.raises(SceneError, match="more than once"):
        next(play(TWO_STEPS, [CONCEPTS[0], CONCEPTS[0].upper(), CONCEPTS[1]], make_edits(model, increments)))
    mixed = {CONCEPTS[0]: increments[CONCEPTS[0]], CONCEPTS[1]: WeightDifference("cie", CONCEPTS[1], {})}
    with pytest.raises(SceneError, match="one kind at a time"):
        make_edits(model, mixed)
    assert attached_names(model) == []


# ----------------------------------------------------------------------------- tables
def test_tables_record_and_grid() -> None:
    def row(step: str, name: str, role: str, acc: float, fid: float, wording: str = "exact") -> SceneRow:
        metrics = ConceptMetrics(name, 4, 1, fid=fid, lpips=fid / 100, acc=acc, acc_original=0.75)
        return SceneRow(step, role, metrics, wording, "" if name == "blank" else name)

    result = SceneResult(TWO_STEPS, CONCEPTS, "sepce")
    result.rows = [row("t0", "blank", REGULAR, 0.75, 0.0), row("t0", "vela quorin", ERASED, 0.0, 120.0),
                   row("t0", "odile fenwar", ERASED, 0.5, 60.0),
                   row("t1", "vela quorin", RESTORED, 0.75, 0.0), row("t1", "tamsin brack", ERASED, 0.25, 90.0),
                   row("t1", "vela quorin", RESTORED, 0.5, 4.0, HELD_OUT)]
    lines = list(csv.reader(io.StringIO(scene_csv([result]))))
    assert lines[0] == ["method", "wording", "step", "concept", "role", "class_index", "images", "fid", "lpips", "acc",
                        "acc_original"]
    assert lines[2] == ["sepce", "exact", "t0", "vela quorin", "erased", "1", "4", "120", "1.2", "0.0000", "0.7500"]
    labels = metric_labels({"fid": "toy-oracle (features)", "lpips": "alex (lpips AlexNet, 64 px)"})
    assert labels["fid"] == "oracle-feature FID" and labels["lpips"] == "LPIPS"
    layout = paper_layout_markdown([result], "exact", labels)
    # t0: two forgotten concepts (mean FID 90, ACC 25 %), no recovered one; the blank class is not a concept
    assert "| t0 | sepce | 90.00 | 25.0 | 0.900 | - | - | - | - | - | - |" in layout
    assert "| t1 | sepce | 90.00 | 25.0 | 0.900 | 0.00 | 75.0 | 0.000 | - | - | - |" in layout
    assert "| 4.00 | 50.0 | 0.040 |" in paper_layout_markdown([result], HELD_OUT, labels)
    markdown = scene_markdown(result, labels)
    assert "#### t1: restore vela quorin" in markdown and "oracle-feature FID" in markdown
    assert "| vela quorin | erased | 120.000 | 0.0 | 75.0 | 1.200 |" in markdown
    record = scene_record(result)
    restored = {"role": "restored", "acc": 0.75, "acc_original": 0.75, "fid": 0.0, "lpips": 0.0}
    assert record["exact"]["t1"]["vela quorin"] == restored
    assert role_summary(result) == {
        "erased_acc_max": 0.5, "restored_acc_gap_max": 0.0, "restored_fid_max": 0.0, "restored_lpips_max": 0.0,
        "regular_acc_gap_max": 0.0,
    }
    assert role_summary(result, HELD_OUT)["restored_fid_max"] == 4.0


def test_scene_grid_places_every_image_where_the_layout_says() -> None:
    classes = [EvaluatedClass("blank", "", ("",), (0,), 0), EvaluatedClass("a", "a", ("a",), (0,), 1)]
    names = ["original", "t0", "t1"]
    # image k of class row r in block b has its own grey level 10 * (6b + 3r + k) + 5
    columns = [
        {
            evaluated.name: torch.stack(
                [torch.full((3, 8, 8), 10 * (6 * block + 3 * row + k) + 5, dtype=torch.uint8) for k in range(3)]
            )
            for row, evaluated in enumerate(classes)
        }
        for block in range(3)
    ]
    grid = scene_grid(classes, columns, per_cell=2, column_names=names)
    rows = [torch.zeros(6, 3, 8, 8) for _ in classes]
    layout = grid_layout(rows, ["blank", "a"], block_labels=[(name, 2) for name in names])
    assert grid.shape == (3, layout.height, layout.width)
    assert layout.scale >= 2 and layout.cell_height == layout.cell_width == 8 * layout.scale  # upscaled by an integer
    assert layout.headers == [[("original", 0, 2), ("t0", 2, 2), ("t1", 4, 2)]] and layout.top > 0 and layout.left > 0
    side = layout.cell_height
    for row in range(2):
        for block in range(3):
            for k in range(2):  # per_cell=2: the third image of each block is not shown
                top, left = layout.image_top(row), layout.image_left(2 * block + k)
                cell = grid[:, top : top + side, left : left + side]
                expected = (10 * (6 * block + 3 * row + k) + 5) / 255
                assert torch.allclose(cell, torch.full_like(cell, expected)), (row, block, k)
    # the padding between two images stays white
    top, gap_left = layout.image_top(0), layout.image_left(0) + side
    assert float(grid[:, top : top + side, gap_left : layout.image_left(1)].min()) == 1.0
    # the labels are drawn: dark text left of the rows and above the blocks
    assert float(grid[:, layout.image_top(0) : layout.image_top(0) + side, : layout.left].min()) < 0.5
    assert float(grid[:, : layout.top, layout.image_left(0) : layout.image_left(2)].min()) < 0.5
    with pytest.raises(SceneError, match="2 column names for 3 columns"):
        scene_grid(classes, columns, per_cell=2, column_names=names[:2])


# ----------------------------------------------------------------------------- the script
@pytest.fixture(scope="module")
def scene_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The wide tiny model as files: a toy-world config with fast sampling, a checkpoint, training images."""
    folder = tmp_path_factory.mktemp("scene-model")
    config_path = write_wide_tiny_config(folder)
    config = OmegaConf.load(config_path)
    config.world = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "toy" / "toy-ldm.yaml").world
    config.sampling = {"steps": 2, "guidance_scale": 2.0}
    OmegaConf.save(config, config_path)
    state = build_wide_tiny_model(config_path).state_dict()
    save_file({key: value.contiguous() for key, value in state.items()}, str(folder / "wide.safetensors"))
    for concept in ARTISTS[:6]:
        write_images(folder / "data" / concept.replace(" ", "_"), 2)
    return config_path, folder / "wide.safetensors", folder / "data"


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """run-scenes.py with an 8-d FID feature extractor: FID on the oracle's 1024-d features takes a
    second per call here (metrics are tested in test_metrics.py)."""
    module = load_script("eval-scripts", "run-scenes")
    monkeypatch.setattr("erasure.evaluation.resolve_fid_features", lambda *args: FidFeatures(PooledColour.name, PooledColour()))
    return module


def scene_argv(files: tuple[Path, Path, Path], out: Path, *extra: str) -> list[str]:
    config_path, ckpt_path, data_dir = files
    bare = out / "bare-name.txt"  # the paper's training on the bare prompt: two steps move every concept
    bare.write_text("{name}\n", encoding="utf-8")
    return [
        "--scene", "1", "--concepts", *ARTISTS[:6], "--config_path", str(config_path), "--ckpt_path", str(ckpt_path),
        "--data_dir", str(data_dir), "--increments_dir", str(out / "increments"),
        "--original_dir", str(out / "original"), "--output_dir", str(out / "scene"), "--num_samples", "2",
        "--iterations", "2", "--lr", "1e4", "--lpips", "world", "--no_progress", "--concept_templates", str(bare),
        *extra,
    ]


def write_held_out(path: Path, concepts: list[str]) -> Path:
    lines = ["prompt,evaluation_seed,case_number,class"]
    lines += [f"{wording.format(c)},{500 + 10 * i + k},{2 * i + k},{c}"
              for i, c in enumerate(concepts) for k, wording in enumerate(("a {}", "{} red"))]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_run_scenes_end_to_end_and_reuse(
    script: ModuleType, scene_model: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    held_out = write_held_out(tmp_path / "held-out.csv", list(ARTISTS[:6]))
    script.main(scene_argv(scene_model, tmp_path, "--heldout_wordings", str(held_out)))
    out = capsys.readouterr().out
    assert f"Training the sepce edits of {list(ARTISTS[:6])}." in out  # jointly, in one group
    record = json.loads(out.strip().splitlines()[-1])
    assert record["protocol"] == "paper" and record["methods"] == ["sepce"]
    steps = record["steps"]["sepce"]["exact"]
    assert list(steps) == ["t0", "t1", "t3"]
    names = ["blank", *ARTISTS[:6]]
    for step, rows in steps.items():
        assert list(rows) == names
        for row in rows.values():
            assert set(row) == {"role", "acc", "acc_original", "fid", "lpips"}
    t3 = steps["t3"]
    assert [t3[name]["role"] for name in names] == ["regular"] + ["restored"] * 3 + ["erased"] * 3
    for name in names[:4]:  # blank and the restored concepts: the original's pixels (a rounding flip at most)
        assert t3[name]["lpips"] < 1e-5 and t3[name]["fid"] < 1e-6 and t3[name]["acc"] == t3[name]["acc_original"]
    assert all(t3[name]["lpips"] > 1e-3 for name in names[4:])  # erased: --lr 1e4 moves them in two steps
    assert all(value["fid"] >= 0 for rows in steps.values() for value in rows.values())  # clamped at 0
    held = record["steps"]["sepce"][HELD_OUT]["t3"]
    assert list(held) == [f"{name} ({HELD_OUT})" for name in ARTISTS[:6]]
    assert record["role_means"]["sepce"]["exact"]["t3"]["recovered"]["concepts"] == 3
    assert record["role_means"]["sepce"]["exact"]["t0"]["recovered"] is None
    assert record["separability"]["max_restore_abs_diff"] == 0.0
    assert record["separability"]["max_relative_kv_change"] < 1e-5
    scene_dir = tmp_path / "scene"
    blocks = [(label, 2) for label in ["original", "t0", "t1", "t3"]]  # --num_samples 2 images per block
    layout = grid_layout([torch.zeros(8, 3, 16, 16)] * len(names), names, block_labels=blocks)
    grid = torch.from_numpy(np.asarray(Image.open(scene_dir / "grid.png"), dtype=np.float32)).permute(2, 0, 1)
    assert tuple(grid.shape) == (3, layout.height, layout.width)
    # the original blank image from seed 0 sits upscaled at the top left cell
    [blank_path] = (tmp_path / "original").glob("*/blank/00000.png")
    blank = torch.from_numpy(np.asarray(Image.open(blank_path), dtype=np.float32)).permute(2, 0, 1)
    upscaled = blank.repeat_interleave(layout.scale, 1).repeat_interleave(layout.scale, 2)
    top, left, side = layout.image_top(0), layout.image_left(0), layout.cell_height
    assert torch.equal(grid[:, top : top + side, left : left + side], upscaled)
    assert (scene_dir / "table.csv").read_text().count("\n") == 1 + 3 * 7 + 3 * 6
    table = (scene_dir / "table.md").read_text()
    assert "#### t1: restore vela quorin, tamsin brack" in table and "## held-out prompts" in table
    assert "oracle-feature LPIPS" in table and "| t3 | sepce |" in table
    increments = sorted(path.name for path in (tmp_path / "increments").rglob("*.safetensors"))
    assert increments[0].startswith("sepce-baptiste_keel-lr_1e4-beta_1e-4-lam_1e-6-taurel_3e-4")
    assert len(increments) == 6

    with pytest.raises(ValueError, match="already exists"):
        script.main(scene_argv(scene_model, tmp_path))
    script.main(scene_argv(scene_model, tmp_path, "--overwrite", "--no_heldout"))  # reuses increments and originals
    out = capsys.readouterr().out
    again = json.loads(out.strip().splitlines()[-1])["steps"]["sepce"]
    assert "Training the" not in out and list(again) == ["exact"]
    for step, rows in steps.items():
        for name, row in rows.items():
            assert again["exact"][step][name] == {**row, "fid": pytest.approx(row["fid"], abs=1e-5)}  # eigvals wobble
    script.main(scene_argv(scene_model, tmp_path, "--overwrite", "--no_heldout", "--iterations", "3"))
    assert "Training the sepce edits" in capsys.readouterr().out  # other settings: other files, trained anew
    with pytest.raises(SceneError, match="only 5 concepts were given"):
        script.main(scene_argv(scene_model, tmp_path, "--overwrite", "--concepts", *ARTISTS[:5]))
    # protect_all with 9 concepts: "" + watermark + 8 concepts need 8 + 9 * 7 = 71 > 64 dimensions
    with pytest.raises(SceneError, match=r"protect_all protocol\): each increment would protect \"\", 1 watermark "
                                         r"prompt\(s\) and 8 concepts, more than the null space holds"):
        script.main(scene_argv(scene_model, tmp_path, "--overwrite", "--protocol", "protect_all",
                               "--concepts", *ARTISTS[:9]))


def test_run_scenes_paper_protocol_trains_at_first_erasure(
    script: ModuleType, scene_model: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = script.main(scene_argv(scene_model, tmp_path, "--scene", "3", "--no_heldout", "--watermark_prompt", ""))
    out = capsys.readouterr().out
    assert f"Training the sepce edits of {[ARTISTS[1], ARTISTS[3]]}, protecting {[ARTISTS[0], ARTISTS[2], ARTISTS[4]]}." in out
    assert f"Training the sepce edits of {[ARTISTS[5]]}, protecting" in out
    steps = record["steps"]["sepce"]["exact"]
    # t1 restores c0 and c2: only the t0 increments (which protect each other) are attached -> exact
    assert steps["t1"][ARTISTS[0]]["lpips"] < 1e-5 and steps["t1"][ARTISTS[2]]["lpips"] < 1e-5
    # t3 restores c1, but c4's increment (t0) never protected c1: its restore is not exact
    assert steps["t3"][ARTISTS[1]]["role"] == "restored" and steps["t3"][ARTISTS[1]]["lpips"] > 1e-4
    # regular c5 at t0 is touched by increments that do not protect it
    assert steps["t0"][ARTISTS[5]]["role"] == "regular" and steps["t0"][ARTISTS[5]]["lpips"] > 1e-4


def test_run_scenes_baseline_names_match_the_driver(
    script: ModuleType, scene_model: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = script.main(scene_argv(scene_model, tmp_path, "--method", "esd", "--iterations", "1", "--lr", "1e-5",
                                    "--no_heldout"))
    written = sorted((tmp_path / "increments").glob("*.safetensors"))
    assert sorted(record["increments"]["esd"].values()) == [str(path) for path in written] and len(written) == 6
    assert written[0].name.startswith("esd_x-baptiste_keel-lr_1e-5-iter_1-sg_3-ng_1")
    assert "separability" not in record and last_json(capsys)["methods"] == ["esd"]


def test_toy_world_classifier_predicts_like_the_toy_oracle() -> None:
    """run-scenes.py's default ACC classifier on the toy model: its world's classifier, the oracle."""
    world = world_from_config_file(Path(__file__).resolve().parents[1] / "configs" / "toy" / "toy-ldm.yaml")
    classifier = world.load_classifier()
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(predict(classifier, images), load_oracle().predict(images * 2 - 1)["artist"])
    assert classifier.class_index("blank") == 0 and classifier.class_index(ARTISTS[8]) == 9
