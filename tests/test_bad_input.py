"""Bad input: every case gives one `error: ...` line and exit status 2 (scripts) or one ErasureError (API),
before any model is loaded where the files tell, and leaves every input and output file as it was."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import erasure
from erasure import cli, files, runs
from erasure.bases import CapacityError, compute_basis, compute_bases, load_basis, save_basis
from erasure.errors import (
    ErasureError,
    ErasureFileError,
    IncrementError,
    MetricsError,
    ModelLoadError,
    NonFiniteLossError,
    TrainingSetupError,
    VerificationError,
)
from erasure.increments import Increment, cross_attention_kv, slugify
from erasure.loading import load_model, model_fingerprint
from erasure.settings import CiESettings, ESDSettings, SepCESettings
from erasure.trainers import data
from erasure.trainers.checkpoint import CHECKPOINT_KIND, TrainingState, save_checkpoint
from erasure.trainers.runtime import FabricOptions, make_fabric
from erasure.weight_differences import WEIGHT_DIFFERENCE_KIND
from wide_tiny_model import build_wide_tiny_model, write_wide_tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]
FILLERS = ["red circle", "blue square", "green dog", "old tree", "the moon", "snow hill", "a clock"]


# ----------------------------------------------------------------------------- helpers
def tree_hashes(*folders: Path) -> dict[str, str]:
    """sha256 of every file under ``folders`` (what "no file changed" is checked against)."""
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def script(relative: str) -> ModuleType:
    path = REPO_ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exit_line(main: Callable[[], object], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``main`` through ``cli.run_script``; assert status 2 and ONE stderr line; return it."""
    with pytest.raises(SystemExit) as stop:
        cli.run_script(main)
    assert stop.value.code == cli.EXIT_BAD_INPUT == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def train(parser_and_settings: tuple, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """A training script (``cli.train_main``, which runs under ``run_script``) with ``argv``."""
    monkeypatch.setattr(sys, "argv", ["train", *argv])
    return lambda: cli.train_main(*parser_and_settings)


def forbid_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading a model fail loudly: the refusal must come before it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(runs, "load_model", refuse)


@pytest.fixture(scope="module")
def wide_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wide_tiny_config(tmp_path_factory.mktemp("wide"))


@pytest.fixture(scope="module")
def base_model(wide_config: Path) -> nn.Module:
    return build_wide_tiny_model(wide_config)


@pytest.fixture(scope="module")
def model_files(wide_config: Path, base_model: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    ckpt = tmp_path_factory.mktemp("ckpt") / "wide.safetensors"
    save_file({key: value.contiguous() for key, value in base_model.state_dict().items()}, str(ckpt))
    return ["--config_path", str(wide_config), "--ckpt_path", str(ckpt)]


def training_argv(model_files: list[str], output_dir: Path, *extra: str) -> list[str]:
    return [*model_files, "--accelerator", "cpu", "--no_progress", "--iterations", "2", "--save_every", "1",
            "--output_dir", str(output_dir), *extra]


def sepce_argv(model_files: list[str], tmp_path: Path, *extra: str) -> list[str]:
    images = tmp_path / "images" / "a_red"
    if not images.is_dir():
        from PIL import Image

        images.mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (32, 32), (200, 10 * index, 0)).save(images / f"{index:05d}.png")
    return training_argv(model_files, tmp_path / "out", "--concepts", "a red", "--min_dims", "1",
                         "--data_dir", str(tmp_path / "images"), *extra)


def increment_file(model: nn.Module, folder: Path, concept: str = "van gogh", poison: float | None = None,
                   tamper: bool = False) -> Path:
    """An increment file of ``concept`` on ``model`` (random coefficients; ``poison`` one of them,
    ``tamper``: a random basis that protects nothing)."""
    basis = compute_bases(model, ["van gogh", "picasso"], extra_protected=["red circle"])[concept]
    generator = torch.Generator().manual_seed(0)
    if tamper:
        basis.basis = torch.linalg.qr(torch.randn(basis.width, basis.dims, generator=generator))[0].T.contiguous()
    coeffs = {name: 300 * torch.randn(layer.out_features, basis.dims, generator=generator)
              for name, layer in cross_attention_kv(model).items()}
    if poison is not None:
        next(iter(coeffs.values()))[0, 0] = poison
    metadata = {"method": "test", "base_model_fingerprint": model_fingerprint(model)}
    increment = Increment(basis.concept, slugify(concept), basis, 1e-4, coeffs, metadata)
    return increment.save(folder / f"{slugify(concept)}{'-nan' if poison is not None else ''}.safetensors")


# ----------------------------------------------------------------------------- 1. non-finite values
def test_an_increment_file_with_nan_is_refused_by_compose(
    base_model: nn.Module, model_files: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = increment_file(base_model, tmp_path, poison=float("nan"))
    before = tree_hashes(tmp_path)
    compose = script("train-scripts/compose.py")
    line = exit_line(lambda: compose.main([*model_files, "--increments", str(path), "--verify"]), capsys)
    assert str(path) in line and "NaN/inf" in line and "coeff." in line
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize("kind", ["weight_difference", "basis", "checkpoint"])
def test_every_file_we_write_is_checked_finite_on_reading(base_model: nn.Module, tmp_path: Path, kind: str) -> None:
    bad = torch.tensor([1.0, float("inf")])
    path = tmp_path / f"{kind}.safetensors"
    if kind == "weight_difference":
        files.write_tensors(path, {"delta.w": bad}, WEIGHT_DIFFERENCE_KIND,
                            {"method": "cie", "concept": "a", "keys": ["w"], "metadata": {}})
        read: Callable[[], object] = lambda: erasure.load_edit(path)  # noqa: E731
    elif kind == "basis":
        basis = compute_basis(base_model, "van gogh", ["picasso"])
        basis.basis[0, 0] = float("nan")
        save_basis(basis, path)
        read = lambda: load_basis(path)  # noqa: E731
    else:
        files.write_tensors(path, {"param.w": bad}, CHECKPOINT_KIND, {"step": 1})
        read = lambda: files.read_tensors(path, CHECKPOINT_KIND)  # noqa: E731
    before = tree_hashes(tmp_path)
    with pytest.raises(ErasureFileError, match=r"NaN/inf values .*corrupted or was written from a diverged run"):
        read()
    assert tree_hashes(tmp_path) == before


def test_a_model_checkpoint_with_nan_weights_is_refused(wide_config: Path, base_model: nn.Module, tmp_path: Path) -> None:
    state = {key: value.clone().contiguous() for key, value in base_model.state_dict().items()}
    key = next(key for key in state if key.endswith("attn2.to_k.weight"))
    state[key][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelLoadError, match=rf"{path}: 1 tensors hold NaN/inf values, e.g. \['{key}'\]"):
        load_model(wide_config, path, verbose=False)


def test_a_checkpoint_is_never_replaced_by_non_finite_weights(tmp_path: Path) -> None:
    parameter = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([parameter], lr=0.1)
    path = tmp_path / "run.checkpoint.safetensors"
    state = TrainingState(step=2, run={}, stoppers={}, extra={})
    save_checkpoint(path, {"w": parameter}, optimizer, state)
    before = tree_hashes(tmp_path)
    with torch.no_grad():
        parameter[1] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"w holds NaN/inf after step 3; the previous checkpoint .* kept"):
        save_checkpoint(path, {"w": parameter}, optimizer, TrainingState(step=3, run={}, stoppers={}, extra={}))
    assert tree_hashes(tmp_path) == before


def test_evaluation_refuses_non_finite_images() -> None:
    images = torch.rand(2, 3, 8, 8)
    broken = torch.where(torch.arange(8) == 3, float("nan"), images)
    with pytest.raises(MetricsError, match="The edited images of 'a' hold NaN/inf pixels; regenerate them."):
        erasure.evaluate(images, broken, concept="a", metrics=["pixel"])


# ----------------------------------------------------------------------------- 2. verify fails
def test_verify_fails_on_a_tampered_basis(
    base_model: nn.Module, model_files: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = increment_file(base_model, tmp_path, "picasso")
    tampered = increment_file(base_model, tmp_path, "van gogh", tamper=True)
    before = tree_hashes(tmp_path)
    compose = script("train-scripts/compose.py")
    line = exit_line(lambda: compose.main([*model_files, "--increments", str(good), str(tampered), "--verify"]), capsys)
    assert line.startswith("error: Verification failed: the protected prompt") and "above rtol=0.0001" in line
    assert tree_hashes(tmp_path) == before
    model = load_model(*model_files[1::2], verbose=False)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(VerificationError) as failure:
        erasure.verify(model, [Increment.load(good), Increment.load(tampered)])
    assert failure.value.report["max_relative_kv_change"] > 1e-2 and failure.value.report["rtol"] == 1e-4
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())  # restored
    report = erasure.verify(model, [Increment.load(good)])  # the untampered one passes
    assert report["max_relative_kv_change"] <= 1e-4 and report["max_restore_abs_diff"] == 0.0
    line = exit_line(lambda: compose.main([*model_files, "--increments", str(good), "--verify", "--rtol", "nan"]), capsys)
    assert line == "error: --rtol must be a positive finite number, got nan."


def test_verify_counts_nan_as_failure(base_model: nn.Module, tmp_path: Path) -> None:
    increment = Increment.load(increment_file(base_model, tmp_path, "picasso"))
    next(iter(increment.coeffs.values()))[0, 0] = float("nan")  # in memory: no file check stands in the way
    with pytest.raises(VerificationError, match="changes its keys/values by nan"):
        erasure.verify(base_model, [increment])


# ----------------------------------------------------------------------------- 3. outputs checked first
@pytest.mark.parametrize("case", ["output_dir_is_a_file", "parent_is_a_file", "read_only", "cache_is_a_file"])
def test_unwritable_outputs_are_refused_before_loading(
    model_files: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    argv = training_argv(model_files, tmp_path / "out", "--prompt", "a red")
    if case == "output_dir_is_a_file":
        argv = training_argv(model_files, blocker, "--prompt", "a red")
        expected = f"Output folder {blocker} cannot be created: {blocker} is a file, not a folder"
    elif case == "parent_is_a_file":
        argv = training_argv(model_files, blocker / "deeper", "--prompt", "a red")
        expected = f"Output folder {blocker / 'deeper'} cannot be created: {blocker} is a file"
    elif case == "read_only":
        (tmp_path / "out").mkdir()
        real_access = os.access
        monkeypatch.setattr(files.os, "access", lambda path, mode, **kw: Path(path) != tmp_path / "out"
                            and real_access(path, mode, **kw))
        expected = f"Output folder {tmp_path / 'out'} is not writable"
    else:
        argv += ["--cache_dir", str(blocker)]
        expected = f"Image cache folder (--cache_dir) {blocker / 'training-images'} cannot be created"
    before = tree_hashes(tmp_path)
    forbid_loading(monkeypatch)
    line = exit_line(train((cli.cie_parser(), CiESettings), argv, monkeypatch), capsys)
    assert line.startswith(f"error: {expected}")
    assert tree_hashes(tmp_path) == before


def test_too_little_free_space_is_refused_before_loading(
    model_files: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_usage = files.shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1024))
    argv = sepce_argv(model_files, tmp_path)
    before = tree_hashes(tmp_path)
    forbid_loading(monkeypatch)
    line = exit_line(train((cli.sepce_parser(), SepCESettings), argv, monkeypatch), capsys)
    assert "The results and checkpoints of this run need about" in line and "only 0 MiB are free" in line
    assert tree_hashes(tmp_path) == before and not list((tmp_path / "out").glob("*.lock"))


def test_cleanup_never_raises_over_the_real_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unlink_fails(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError("read-only file system")

    with pytest.raises(RuntimeError, match="the real error"):
        with files.atomic_path(tmp_path / "a.txt") as temporary:
            temporary.write_text("half")
            monkeypatch.setattr(Path, "unlink", unlink_fails)
            raise RuntimeError("the real error")


# ----------------------------------------------------------------------------- 4. locks and run names
def test_a_live_run_holding_the_lock_stops_the_second_run(
    model_files: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = sepce_argv(model_files, tmp_path)
    main = train((cli.sepce_parser(), SepCESettings), argv, monkeypatch)
    stem = runs.result_files(cli.request_from_args(cli.sepce_parser().parse_args(argv), SepCESettings), 0.1)[1]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stem.parent.mkdir(parents=True)
        Path(f"{stem}.lock").write_text(f"{other.pid} {files._HOST}\n")
        before = tree_hashes(tmp_path)
        forbid_loading(monkeypatch)
        line = exit_line(main, capsys)
    finally:
        other.kill()
        other.wait()
    assert line.startswith(f"error: Another run (PID {other.pid}) is writing these outputs (it holds {stem}.lock)")
    assert tree_hashes(tmp_path) == before


def test_a_dead_runs_lock_and_temporary_files_are_taken_over(
    model_files: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = sepce_argv(model_files, tmp_path)
    result, stem = runs.result_files(cli.request_from_args(cli.sepce_parser().parse_args(argv), SepCESettings), 0.1)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stem.parent.mkdir(parents=True)
    Path(f"{stem}.lock").write_text(f"{gone.pid} {files._HOST}\n")
    leftover = stem.parent / f".{stem.name}.safetensors.{files._HOST}.{gone.pid}.tmp"
    leftover.write_bytes(b"half a file")
    cli.run_script(train((cli.sepce_parser(), SepCESettings), argv, monkeypatch))
    err = capsys.readouterr().err
    assert f"Took over the lock {stem}.lock of run PID {gone.pid}, which is gone (killed)." in err
    assert f"Removed {leftover}, left behind by a killed save." in err
    assert [path.name for path in stem.parent.iterdir()] == [result["a red"].name]  # no lock, checkpoint, leftover


def test_run_names_hold_every_setting_that_decides_the_result() -> None:
    def names(**settings: object) -> tuple[str, str]:
        request = runs.RunRequest(("vela quorin",), SepCESettings(**settings), output_dir=Path("out"))
        result, stem = runs.result_files(request, 1.0)
        return result["vela quorin"].name, stem.name

    base = names()
    assert base[0].startswith("sepce-vela_quorin-lr_1-beta_1e-4-lam_1e-6-taurel_3e-4-seed_0-")
    for changed in ({"seed": 1}, {"iterations": 5}, {"num_images": 4}, {"batch_size": 2}, {"alpha": 0.5}):
        other = names(**changed)
        assert other[0] != base[0] and other[1] != base[1], changed
    assert names(progress=False, save_every=7) == base  # not part of the result
    assert runs.format_number(float("nan")) == "nan" and runs.format_number(float("inf")) == "inf"


# ----------------------------------------------------------------------------- 5. one-line errors
@pytest.mark.parametrize(("flags", "message"), [
    (["--lr", "nan"], "error: lr (--lr) must be a positive finite number, got nan."),
    (["--lr", "inf"], "error: lr (--lr) must be a positive finite number, got inf."),
    (["--start_guidance", "nan"], "error: start_guidance (--start_guidance) must be a finite number, got nan."),
    (["--device", "cuda"], "error: --device cuda does not apply to training"),
])
def test_bad_training_flags_are_one_line(
    model_files: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    flags: list[str], message: str,
) -> None:
    argv = training_argv(model_files, tmp_path / "out", "--prompt", "a red", *flags)
    forbid_loading(monkeypatch)
    line = exit_line(train((cli.esd_parser(), ESDSettings), argv, monkeypatch), capsys)
    assert line.startswith(message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("settings_class", [SepCESettings, CiESettings, ESDSettings])
def test_settings_refuse_resume_without_a_checkpoint_and_an_unknown_stop_rule(settings_class: type) -> None:
    with pytest.raises(ErasureError, match=r"resume=True needs a checkpoint path"):
        settings_class(resume=True).validate()
    with pytest.raises(ErasureError, match=r"stop \(--stop\) must be one of"):
        settings_class(stop="sometimes").validate()
    settings_class(resume=True, checkpoint="run.ckpt").validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_accelerator_cuda_without_cuda_is_one_line(
    model_files: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(TrainingSetupError, match="--accelerator cuda was asked for, but CUDA is not available"):
        make_fabric(FabricOptions(accelerator="cuda"))
    argv = [*training_argv(model_files, tmp_path / "out", "--prompt", "a red"), "--accelerator", "cuda"]
    line = exit_line(train((cli.esd_parser(), ESDSettings), argv, monkeypatch), capsys)
    assert line.startswith("error: --accelerator cuda was asked for, but CUDA is not available")


@pytest.mark.slow  # a fresh interpreter: about 7 s of imports; the in-process tests above cover the same path
def test_the_lr_nan_script_exits_2_with_one_line(tmp_path: Path) -> None:
    """The real script in a process: exit status and stderr as a user sees them."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train-scripts" / "train-sepce.py"), "--lr", "nan", "--output_dir",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: lr (--lr) must be a positive finite number, got nan."
    assert list(tmp_path.iterdir()) == []


def test_evaluate_input_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mapping = tmp_path / "concepts.json"
    mapping.write_text(json.dumps([{"concept": 1, "original": "a", "erased": "b"}]))
    before = tree_hashes(tmp_path)
    evaluate = script("eval-scripts/evaluate.py")
    argv = ["--mapping", str(mapping), "--metrics", "pixel", "--out_dir", str(tmp_path / "metrics")]
    line = exit_line(lambda: evaluate.main(argv), capsys)
    assert line == f"error: --mapping {mapping} entry 0: ['concept'] must be strings (a name and two folder paths)."
    argv = ["--original", str(tmp_path / "none"), "--erased", str(tmp_path), "--concept", "a", "--out_dir",
            str(tmp_path / "metrics")]
    assert "does not exist" in exit_line(lambda: evaluate.main(argv), capsys)
    assert tree_hashes(tmp_path) == before


def test_an_invalid_json_header_names_the_file(
    model_files: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"kind": "increment", "format_version": "1", "json": "{bad"})
    before = tree_hashes(tmp_path)
    compose = script("train-scripts/compose.py")
    line = exit_line(lambda: compose.main([*model_files, "--increments", str(path)]), capsys)
    assert line.startswith(f"error: {path}: the JSON record in its header is invalid (")
    assert tree_hashes(tmp_path) == before


class RunsCodeThatFails:
    """Pickled as a call of int("not a number"): loading the file runs it and it raises."""

    def __reduce__(self) -> tuple:
        return (int, ("not a number",))


def test_a_pickle_whose_code_fails_says_what_failed(wide_config: Path, tmp_path: Path) -> None:
    code = tmp_path / "code.ckpt"
    torch.save({"state_dict": RunsCodeThatFails()}, code)
    truncated = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(4)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    before = tree_hashes(tmp_path)
    with pytest.raises(ModelLoadError, match=r"ran code stored in the file, and that code failed \(ValueError: "
                       r"invalid literal for int\(\) with base 10: 'not a number'\)"):
        load_model(wide_config, code, verbose=False)
    with pytest.raises(ModelLoadError, match="its bytes are damaged"):
        load_model(wide_config, truncated, verbose=False)
    assert tree_hashes(tmp_path) == before


# ----------------------------------------------------------------------------- 6. messages that say the truth
def test_the_capacity_message_counts_exactly_and_names_the_prompts_to_drop(
    model_files: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Width 64, 8 tokens: "" has rank 8, each filler adds 7; with min_dims 8, 6 fillers fit (14 dims left)."""
    generate = script("train-scripts/generate-bases.py")
    argv = [*model_files, "--concepts", "van gogh", "--protected", *FILLERS, "--output_dir", str(tmp_path / "bases")]
    line = exit_line(lambda: generate.main(argv), capsys)
    assert "6 of the 7 prompts besides \"\" fit: \"\" and the first 6 leave 14 dimensions" in line
    assert "Drop the last 1 ('a clock')" in line
    assert not (tmp_path / "bases").exists()


def test_the_rank_saturates_at_the_text_width(base_model: nn.Module) -> None:
    """18 prompts x 8 rows exceed the width: the rank stops at 64, so the count is measured, not
    extrapolated from an average per prompt (which would say about 15 fit)."""
    prompts = FILLERS + ["moss", "ice", "tall grass", "deep sea", "wet sand", "dry leaf", "hot sun", "cold rain",
                         "dark night", "bright day", "soft wind"]
    with pytest.raises(CapacityError) as failure:
        compute_basis(base_model, "van gogh", prompts, min_dims=8)
    message = str(failure.value)
    assert "6 of the 18 prompts besides \"\" fit" in message and "rank 64 at text width d=64" in message
    assert "Drop the last 12 ('a clock', 'moss', 'ice', 'tall grass', 'deep sea', ...)" in message


def test_two_concepts_with_one_name_are_refused_before_loading(
    model_files: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = training_argv(model_files, tmp_path / "out", "--concepts", "vela quorin", "vela-quorin")
    forbid_loading(monkeypatch)
    line = exit_line(train((cli.sepce_parser(), SepCESettings), argv, monkeypatch), capsys)
    assert line.startswith("error: Concepts ['vela quorin', 'vela-quorin'] have the same name 'vela_quorin'")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(IncrementError, match="same name 'vela_quorin'"):
        data.folder_images(tmp_path, ["vela quorin", "Vela-Quorin"])


# ----------------------------------------------------------------------------- 7. leftovers and the image cache
def test_temporary_files_of_killed_saves_are_removed_by_the_next_write(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f".x.safetensors.{files._HOST}.{gone.pid}.tmp"
    dead_folder = tmp_path / f".unet.{files._HOST}.{gone.pid}.0123abcd.partial"
    live = tmp_path / f".y.safetensors.{files._HOST}.{os.getpid()}.tmp"
    other_host = tmp_path / f".z.safetensors.elsewhere.{gone.pid}.tmp"
    for path in (dead, live, other_host):
        path.write_bytes(b"partial")
    dead_folder.mkdir()
    files.write_text("done", tmp_path / "new.txt")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([live.name, other_host.name, "new.txt"])


def test_the_image_cache_is_per_user_and_follows_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "separable-erasure"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.default_cache_dir() == Path.home() / ".cache" / "separable-erasure"
    assert data.generated_root(tmp_path / "c") == tmp_path / "c" / "training-images"
    assert REPO_ROOT not in data.GENERATED_ROOT.parents


# ----------------------------------------------------------------------------- existing bad-input rows
def test_existing_outputs_and_stale_checkpoints_are_refused_before_loading(
    model_files: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = training_argv(model_files, tmp_path / "out", "--prompt", "a red")
    request = cli.request_from_args(cli.esd_parser().parse_args(argv), ESDSettings)
    result, stem = runs.result_files(request, 1e-5)
    forbid_loading(monkeypatch)
    (tmp_path / "out").mkdir()
    checkpoint = stem.with_name(stem.name + runs.CHECKPOINT_SUFFIX)
    checkpoint.write_bytes(b"old")
    before = tree_hashes(tmp_path)
    line = exit_line(train((cli.esd_parser(), ESDSettings), argv, monkeypatch), capsys)
    assert line == (f"error: A checkpoint of this run exists ({checkpoint}); pass --resume to continue it or "
                    f"--overwrite to start again.")
    result["a red"].write_bytes(b"finished")
    before = tree_hashes(tmp_path)
    line = exit_line(train((cli.esd_parser(), ESDSettings), argv, monkeypatch), capsys)
    assert line.startswith(f"error: Output file {result['a red']} already exists; pass overwrite=True (--overwrite)")
    checkpoint.unlink()
    line = exit_line(train((cli.esd_parser(), ESDSettings), [*argv, "--resume", "--overwrite"], monkeypatch), capsys)
    assert line.startswith("error: --resume: there is no checkpoint")
    assert tree_hashes(tmp_path) == {key: value for key, value in before.items() if key != str(checkpoint)}


def test_files_of_the_wrong_kind_or_not_ours_are_one_line(
    model_files: list[str], base_model: nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    basis = tmp_path / "basis.safetensors"
    save_basis(compute_basis(base_model, "van gogh", ["picasso"]), basis)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    text = tmp_path / "text.safetensors"
    text.write_text("not safetensors")
    before = tree_hashes(tmp_path)
    compose = script("train-scripts/compose.py")
    line = exit_line(lambda: compose.main([*model_files, "--increments", str(basis)]), capsys)
    assert line == f"error: {basis} holds a basis; pass an increment or a weight-difference file."
    assert "without this project's header" in exit_line(lambda: compose.main([*model_files, "--increments", str(foreign)]), capsys)
    assert "the file is truncated or not a safetensors file" in exit_line(
        lambda: compose.main([*model_files, "--increments", str(text)]), capsys)
    line = exit_line(lambda: compose.main([*model_files, "--increments", str(tmp_path / "none.safetensors")]), capsys)
    assert line == f"error: {tmp_path / 'none.safetensors'} does not exist (or is not a file); check the path."
    assert tree_hashes(tmp_path) == before


def test_a_killed_script_run_resumes_to_the_uninterrupted_result(
    model_files: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--resume from the command line: the lock of the killed run is released, the result is bit-exact."""
    from erasure.trainers.sepce import SepCETrainer

    reference_argv = sepce_argv(model_files, tmp_path, "--iterations", "3")
    cli.run_script(train((cli.sepce_parser(), SepCESettings), reference_argv, monkeypatch))
    [reference] = (tmp_path / "out").glob("*.safetensors")
    reference.rename(tmp_path / "reference.safetensors")
    step_loss = SepCETrainer.step_loss

    def killed_at_step_two(self: SepCETrainer, *args: object) -> object:
        if self.step == 2:
            raise KeyboardInterrupt("killed")
        return step_loss(self, *args)

    monkeypatch.setattr(SepCETrainer, "step_loss", killed_at_step_two)
    with pytest.raises(KeyboardInterrupt):
        cli.run_script(train((cli.sepce_parser(), SepCESettings), reference_argv, monkeypatch))
    assert [path.name.endswith(runs.CHECKPOINT_SUFFIX) for path in (tmp_path / "out").iterdir()] == [True]
    monkeypatch.setattr(SepCETrainer, "step_loss", step_loss)
    cli.run_script(train((cli.sepce_parser(), SepCESettings), [*reference_argv, "--resume"], monkeypatch))
    resumed = Increment.load(reference.parent / reference.name)
    original = Increment.load(tmp_path / "reference.safetensors")
    assert all(torch.equal(resumed.coeffs[name], original.coeffs[name]) for name in original.coeffs)
    assert [path.name for path in (tmp_path / "out").iterdir()] == [reference.name]
