"""The benchmarks (bench/, issue 6): each --quick run ends with one JSON line holding its results,
the measuring tools measure what they claim, and the scripts that cannot run here say why.

The scripts are loaded and run in this process (no interpreter start-up per script); the peak
memory processes they fork are real."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_ROOT / "bench"


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py as a module (the scripts import their neighbours, so bench/ goes on the path)."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(f"bench_{name.replace('-', '_')}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(name: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    """Run a benchmark's main with ``argv``; its printed last line, parsed as JSON."""
    module = load_bench(name)
    module.main(module.parser().parse_args(argv))
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])
    assert record["bench"] == name.replace("-", "_")
    assert record["machine"]["torch"] == torch.__version__
    assert any(line.startswith("| ") for line in lines[:-1]), "a table comes before the JSON line"
    return record


@pytest.fixture(scope="module")
def common() -> ModuleType:
    load_bench("common")
    import common as module

    return module


# ------------------------------------------------------------------------------------- tools
def test_time_interleaved_rotates_and_summarises(common: ModuleType) -> None:
    calls: list[str] = []
    variants = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = common.time_interleaved(variants, repeats=3, device=torch.device("cpu"))
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(value > 0 for values in times.values() for value in values)
    # The ratio is the median of the per-repeat ratios (4, 0.5, 1.5 -> 1.5), not the ratio of the
    # medians (4 / 2 = 2): the two differ here, so the test tells them apart.
    summary = common.timing_summary({"base": [1.0, 2.0, 4.0], "x": [4.0, 1.0, 6.0]}, baseline="base")
    assert summary["base"] == {"median_s": 2.0, "min_s": 1.0, "ratio": 1.0}
    assert summary["x"] == {"median_s": 4.0, "min_s": 1.0, "ratio": 1.5}


def allocate_and_hold(mib: int) -> int:
    block = torch.ones(mib * 2**20 // 4)
    return int(block.numel())


_calls_in_this_process = 0


def allocate_on_the_first_call_only(first_mib: int, later_mib: int) -> int:
    """``first_mib`` on the first call in a process (peak_memory's warm-up), ``later_mib`` after."""
    global _calls_in_this_process
    _calls_in_this_process += 1
    return allocate_and_hold(first_mib if _calls_in_this_process == 1 else later_mib)


def test_peak_memory_sees_an_allocation_and_not_the_warm_up(common: ModuleType) -> None:
    """Differences between runs, not absolute numbers: the baseline every run shares (the
    interpreter, torch, the allocator) depends on the machine, the 95 MiB between them does not."""
    cpu = torch.device("cpu")
    big, numel = common.peak_memory(allocate_and_hold, (96,), cpu)
    small, _ = common.peak_memory(allocate_and_hold, (1,), cpu)
    big_warm_up_only, _ = common.peak_memory(allocate_on_the_first_call_only, (96, 1), cpu)
    assert numel == 96 * 2**18
    assert big["memory"] == small["memory"] == "resident set (VmHWM) above start"
    assert big["peak_mib"] - small["peak_mib"] == pytest.approx(96 - 1, abs=8)  # the measured run's own block
    assert big_warm_up_only["peak_mib"] - small["peak_mib"] == pytest.approx(0, abs=8)  # the warm-up's is not counted


def sleep_then_touch(seconds: float, path: str) -> None:
    time.sleep(seconds)
    Path(path).touch()


def test_run_in_process_times_out_and_reports_errors(common: ModuleType, tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    finished = tmp_path / "finished"
    children = set(multiprocessing.active_children())
    with pytest.raises(TimeoutError, match="did not finish within 0.5 s"):
        common.run_in_process(sleep_then_touch, (30, str(finished)), cpu, timeout=0.5)
    # killed at the time limit: neither left running nor waited for until it finished
    assert set(multiprocessing.active_children()) == children
    assert not finished.exists()
    with pytest.raises(common.BenchError, match="ZeroDivisionError"):
        common.run_in_process(divmod, (1, 0), cpu)


def test_unknown_model_is_refused(common: ModuleType) -> None:
    with pytest.raises(common.BenchError, match="Unknown model"):
        common.require_models(["sd-huge"])


# ------------------------------------------------------------------------------------- benches
def test_bases_quick(capsys: pytest.CaptureFixture[str]) -> None:
    record = run_bench("bases", ["--quick", "--prompts", "1", "2", "--svd_number", "2"], capsys)
    rows = record["rows"]
    sizes = [(row["prompts"], row["arithmetic"]) for row in rows]
    assert sizes == [(1, "float"), (2, "float"), (1, "rational"), (2, "rational")]
    for row in rows:
        assert row["sympy_finished"]
        assert row["rank"] == 1 + row["prompts"] * 7  # the shared first token, then 7 rows per prompt
        assert row["svd_dims"] == row["sympy_dims"] == 64 - row["rank"]
        assert row["max_angle_rad"] < 1e-6
        assert row["svd_residual"] < 1e-12 and row["sympy_residual"] < 1e-12
        assert row["svd_s"] > 0 and row["sympy_s"] > 0  # the speed-up itself is measured, not asserted
    assert record["goals"] == {"speedup_at_least": 1000.0, "angle_below_rad": 1e-6}


def test_bases_goal_needs_a_finished_run_the_angle_and_the_speedup() -> None:
    goal_met = load_bench("bases").goal_met
    met = {"sympy_finished": True, "max_angle_rad": 1e-8, "speedup": 1500.0}
    assert goal_met(met) is True
    assert goal_met({**met, "speedup": 999.0}) is False
    assert goal_met({**met, "max_angle_rad": 2e-6}) is False
    assert goal_met({**met, "max_angle_rad": "dims differ"}) is False
    assert not goal_met({"sympy_finished": False, "sympy_s": "> 1"})


def check_train_step(record: dict) -> dict:
    result = record["models"]["sd-tiny"]
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"sepce", "sepce_two_copy", "esd_x"}
    assert rows["sepce"]["trained_parameters"] == rows["sepce_two_copy"]["trained_parameters"]
    assert rows["sepce"]["trained_parameters"] < rows["esd_x"]["trained_parameters"]
    assert all(row["median_s"] > 0 for row in rows.values())
    repeats = record["settings"]["repeats"]
    assert {variant: len(times) for variant, times in result["times_s"].items()} == dict.fromkeys(rows, repeats)
    assert all(value > 0 for times in result["times_s"].values() for value in times)
    load_bench("common")
    import common

    unet = common.build_model("sd-tiny", torch.device("cpu")).model.diffusion_model
    assert result["unet_parameters"] == sum(p.numel() for p in unet.parameters())  # without the increment
    return rows


def test_bases_reports_a_sympy_run_past_its_time_limit(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--quick", "--prompts", "2", "--arithmetic", "float", "--svd_number", "1", "--sympy_timeout", "0.001"]
    (row,) = run_bench("bases", argv, capsys)["rows"]
    assert not row["sympy_finished"] and not row["goal_met"]
    assert row["sympy_s"] == "> 0.001" and "speedup" not in row


def test_train_step_quick_timing(capsys: pytest.CaptureFixture[str]) -> None:
    record = run_bench("train_step", ["--quick", "--repeats", "1", "--no_memory"], capsys)
    assert "peak_mib" not in check_train_step(record)["sepce"]


def test_activation_checkpointing_changes_memory_not_the_step(common: ModuleType) -> None:
    """--checkpointing (SD v1.4's use_checkpoint) recomputes activations; the trained increment
    after a SepCE step is the same."""
    bench = load_bench("train_step")
    cpu = torch.device("cpu")
    increments = {}
    for checkpointing in (False, True):
        trainer = bench.make_variant("sepce", "sd-tiny", cpu, seed=0, ddim_steps=4, checkpointing=checkpointing)
        blocks = [m for m in trainer.model.modules() if isinstance(m, (common.ResBlock, common.BasicTransformerBlock))]
        assert blocks and all(getattr(m, "use_checkpoint", getattr(m, "checkpoint", None)) is checkpointing
                              for m in blocks)
        trainer.train_step()
        increments[checkpointing] = {name: p.detach().clone() for name, p in trainer.trained_parameters().items()}
    assert increments[False].keys() == increments[True].keys()
    assert any(p.abs().max() > 0 for p in increments[True].values())
    for name, value in increments[False].items():
        torch.testing.assert_close(increments[True][name], value, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_train_step_quick_with_memory(capsys: pytest.CaptureFixture[str]) -> None:
    record = run_bench("train_step", ["--quick", "--repeats", "1"], capsys)
    rows = check_train_step(record)
    assert rows["sepce"]["peak_mib"] < rows["sepce_two_copy"]["peak_mib"]  # the second UNet copy
    result = record["models"]["sd-tiny"]
    assert {variant: peak["memory"] for variant, peak in result["memory"].items()} == dict.fromkeys(
        rows, "resident set (VmHWM) above start"
    )
    goal = result["goal_one_copy_memory_ratio"]
    assert goal["goal"] == 0.6  # bench/train_step.py's docstring: sepce / sepce_two_copy <= 0.6
    assert 0 < goal["value"] < 1  # one copy over two copies, not the other way round


def test_inference_quick(capsys: pytest.CaptureFixture[str]) -> None:
    record = run_bench("inference", ["--quick", "--repeats", "1"], capsys)
    result = record["models"]["sd-tiny"]
    variants = ["base", "merged_1", "per_call_1", "merged_9", "per_call_9"]
    assert [row["variant"] for row in result["rows"]] == variants
    # bench/configs/sd-tiny.yaml's sampling section and --quick's batch size
    assert (result["sampler"], result["steps"], result["guidance_scale"], result["batch_size"]) == ("ddim", 4, 7.5, 2)
    for count in (1, 9):
        assert result["checks"][f"merged_vs_per_call_{count}_max_abs_diff"] < 1e-5
        assert result["checks"][f"base_vs_merged_{count}_max_abs_diff"] > 0
    assert {name: len(times) for name, times in result["times_s"].items()} == dict.fromkeys(variants, 1)
    assert all(times[0] > 0 for times in result["times_s"].values())
    goal = result["goal_merged_ratio"]
    assert goal["goal"] == 1.02 and goal["value"] > 0 and isinstance(goal["met"], bool)  # the ratio is measured


def test_cost_model_quick_counts_unet_calls(capsys: pytest.CaptureFixture[str]) -> None:
    record = run_bench("cost_model", ["--quick", "--ddim_steps", "10"], capsys)
    rows = {row["method"]: row for row in record["rows"]}

    def counts(method: str) -> tuple[float, float, float]:
        return rows[method]["rows_no_grad"], rows[method]["rows_grad"], rows[method]["rows_backward"]

    assert counts("sepce") == (2, 1, 1)  # one no-grad batch-2 call, one call with grad (METHOD.md §2)
    assert counts("sepce_two_copy") == (2, 2, 2)
    assert counts("cie") == (2, 2, 2)
    assert rows["esd_x"]["rows_grad"] == 1 and rows["esd_x"]["rows_no_grad"] >= 2  # + the partial DDIM run
    assert record["sd14_sepce_dims"] == 768 - 77
    assert rows["sepce"]["trained_parameters_sd14"] == 691 * sum(2 * c for c in [320] * 5 + [640] * 5 + [1280] * 6)
    assert rows["cie"]["trained_parameters_sd14"] == rows["esd_x"]["trained_parameters_sd14"]
    # forward-equivalents = rows evaluated + 2 (--backward_factor's default) x rows through a backward
    assert rows["sepce"]["forward_equivalents_per_step"] == 2 + 1 + 2 * 1
    assert rows["sepce"]["forward_equivalents_1000_steps"] == 5 * 1000
    assert rows["cie"]["forward_equivalents_per_step"] == 2 + 2 + 2 * 2
    assert rows["cie"]["cost_ratio_to_sepce"] == pytest.approx(8 / 5)
    assert rows["sepce_two_copy"]["cost_ratio_to_sepce"] == pytest.approx(8 / 5)


def test_erase_until_stops_at_the_threshold_or_the_step_limit(common: ModuleType) -> None:
    bench = load_bench("time_to_erase")
    cpu = torch.device("cpu")

    def trainer(iterations: int):
        torch.manual_seed(0)
        model = common.build_model("sd-tiny", cpu)
        latents = common.random_latents(model, 2, seed=0)
        settings = common.bench_settings("sepce", "sd-tiny", seed=0, iterations=iterations)
        return common.make_trainer("sepce", model, common.make_fabric(cpu), latents, settings)

    readings = iter([0.9, 0.5, 0.1])
    run = bench.erase_until(trainer(100), lambda: next(readings), threshold=0.2, check_every=2)
    assert run["reached"] and run["steps"] == 6
    assert [check["step"] for check in run["checks"]] == [2, 4, 6]
    assert run["train_s"] > 0
    run = bench.erase_until(trainer(3), lambda: 0.9, threshold=0.2, check_every=2)
    assert not run["reached"] and run["steps"] == 3 and run["stop_reason"] == "max_steps"
    assert [check["step"] for check in run["checks"]] == [2, 3]


def test_others_pixel_change_averages_the_other_classes_only() -> None:
    bench = load_bench("time_to_erase")
    names = bench.CLASS_NAMES
    before = {name: torch.zeros(2, 3, 4, 4) for name in names}
    after = {name: torch.zeros(2, 3, 4, 4) for name in names}
    after[bench.CONCEPT] = torch.ones(2, 3, 4, 4)  # the erased class changes: not collateral
    assert bench.others_pixel_change(before, after, bench.CONCEPT) == 0.0
    after[names[0]] = torch.full((2, 3, 4, 4), 0.9)
    assert bench.others_pixel_change(before, after, bench.CONCEPT) == pytest.approx(0.9 / (len(names) - 1))


def test_time_to_erase_refuses_a_missing_toy_model(
    common: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(common, "TOY_CKPT", tmp_path / "model.safetensors")
    bench = load_bench("time_to_erase")
    monkeypatch.setattr(sys, "argv", ["time_to_erase.py", "--quick"])
    with pytest.raises(SystemExit) as exit_info:
        bench.run_main(bench.main, bench.parser())
    assert exit_info.value.code == 2
    assert "does not exist yet; train it first with `python train-scripts/train-toy.py`" in capsys.readouterr().err


@pytest.mark.slow
def test_time_to_erase_quick_on_the_toy_model(capsys: pytest.CaptureFixture[str]) -> None:
    if not (REPO_ROOT / "models" / "toy" / "model.safetensors").is_file():
        pytest.skip("the toy model is not trained yet")
    record = run_bench("time_to_erase", ["--quick", "--cases", "artist", "--methods", "sepce", "--samples", "2",
                                         "--max_steps", "4"], capsys)["artist"]
    run = record["runs"]["sepce"]
    assert run["steps"] <= 4 and run["data_s"] > 0
    # SepCE protects "" and the other artists: their samples move by float rounding only (measured 7e-8)
    assert run["others_pixel_change"] < 1e-5
    assert set(record["before"]) >= {"blank", "vela quorin"}


def test_sd_gpu_fails_clearly_without_checkpoint_or_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_bench("sd-gpu")
    monkeypatch.setattr(sys, "argv", ["sd-gpu.py", "--ckpt_path", str(tmp_path / "missing.ckpt")])
    with pytest.raises(SystemExit) as exit_info:
        bench.run_main(bench.main, bench.parser())
    assert exit_info.value.code == 2
    assert f"Checkpoint {tmp_path / 'missing.ckpt'} not found" in capsys.readouterr().err
    if torch.cuda.is_available():
        return
    checkpoint = tmp_path / "sd-v1-4.ckpt"
    checkpoint.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(sys, "argv", ["sd-gpu.py", "--ckpt_path", str(checkpoint)])
    with pytest.raises(SystemExit) as exit_info:
        bench.run_main(bench.main, bench.parser())
    assert exit_info.value.code == 2
    assert "needs a CUDA GPU, but torch sees none here" in capsys.readouterr().err


def test_build_model_loads_the_shipped_toy_model(common: ModuleType) -> None:
    model = common.build_model("toy", torch.device("cpu"))
    assert model.ldm_config.world.name == "toy" and not any(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_time_to_erase_closed_form_needs_no_images_or_steps(capsys: pytest.CaptureFixture[str]) -> None:
    if not (REPO_ROOT / "models" / "toy" / "model.safetensors").is_file():
        pytest.skip("the toy model is not trained yet")
    record = run_bench("time_to_erase", ["--quick", "--cases", "artist", "--methods", "closed_form", "--samples", "2"],
                       capsys)["artist"]
    run = record["runs"]["closed_form"]
    assert run["steps"] == 0 and run["data_s"] == 0 and run["total_s"] == run["train_s"] < 60
    assert run["others_pixel_change"] < 1e-5  # "" and the other artists are exactly protected
    assert set(record["wordings_before"]) == {"training", "held_out", "other_compositions"}


@pytest.mark.slow
def test_time_to_erase_sets_restore_exactly_only_with_increments(capsys: pytest.CaptureFixture[str]) -> None:
    if not (REPO_ROOT / "models" / "toy" / "model.safetensors").is_file():
        pytest.skip("the toy model is not trained yet")
    record = run_bench("time_to_erase", ["--quick", "--cases", "object", "joint", "--methods", "cie", "closed_form",
                                         "--max_steps", "5"], capsys)
    rows = {(row["case"], row["method"], row["what"]): row for row in record["sets"]}
    restored = {key: row for key, row in rows.items() if key[2].endswith("restored alone")}
    assert {key[1] for key in restored} == {"cie", "closed_form"} and len(restored) == 4  # a set of 2, two methods
    # dropping an increment is exact; dropping one merged CiE difference leaves the other's change
    assert all(row["pixel_max"] < 1e-5 for key, row in restored.items() if key[1] == "closed_form")
    assert all(row["pixel_max"] > 1e-3 for key, row in restored.items() if key[1] == "cie")
    name_removed = [row for key, row in rows.items() if key[0] == "object" and key[2].endswith("(original model)")]
    assert len(name_removed) == 2 and all(row["pixel_max"] == 0 for row in name_removed)
    solve = rows["object", "closed_form", "training wordings"]
    assert solve["steps"] == [0] and solve["data_s"] == 0
    assert rows["object", "cie", "training wordings"]["data_s"] > 0


def test_summarise_sets_counts_erased_members_and_worst_restore() -> None:
    bench = load_bench("time_to_erase")

    def row(what: str, after: float, pixel: float) -> dict:
        return {"case": "joint 2", "method": "cie", "train_s": 1.0, "data_s": 2.0, "what": what, "class_before": 1.0,
                "class_after": after, "object_before": None, "object_after": None, "pixel_mean": pixel,
                "pixel_max": pixel}

    rows = [row("a: bare + held-out, all erased", 0.1, 0.3), row("b: bare + held-out, all erased", 0.7, 0.2),
            row("a: bare, restored alone", 1.0, 1e-7), row("b: bare, restored alone", 0.4, 0.5)]
    [[line]] = bench.summarise_sets(rows).values()
    assert line["total_s"] == "3" and line["members erased"] == "1 / 2" and line["worst member"] == "0.70"
    assert line["restored: lowest share"] == "0.40" and line["restored: largest pixel change"] == "0.5"


def test_closed_form_scale_quick(capsys: pytest.CaptureFixture[str]) -> None:
    if not (REPO_ROOT / "models" / "toy" / "model.safetensors").is_file():
        pytest.skip("the toy model is not trained yet")
    record = run_bench("closed_form_scale", ["--quick", "--no_step"], capsys)
    rows = {row["concepts"]: row for row in record["rows"]}
    assert set(rows) == {1, 3} and all(row["solve_s"] > 0 and row["basis_s"] > 0 for row in rows.values())
    # with 3 concepts each also protects the other two (approximately): fewer null-space dimensions
    assert rows[3]["dims_max"] < rows[1]["dims_min"]
    assert rows[1]["optimiser_step_s"] is None


def test_concept_names_are_distinct_toy_words() -> None:
    bench = load_bench("closed_form_scale")
    names = bench.concept_names(100)
    assert len(set(names)) == 100 and all(len(name.split()) == 4 for name in names)
    with pytest.raises(ValueError, match="At most 144"):  # 9 artists x 4 colours x 4 objects
        bench.concept_names(145)


@pytest.mark.slow
def test_wordings_quick_on_the_toy_model(capsys: pytest.CaptureFixture[str]) -> None:
    if not (REPO_ROOT / "models" / "toy" / "model.safetensors").is_file():
        pytest.skip("the toy model is not trained yet")
    record = run_bench("wordings", ["--quick", "--cases", "artist", "joint"], capsys)
    rows = {(row["case"], row["what"]): row for row in record["results"]}
    assert rows["artist", "other artists' bare names"]["pixel_max"] < 1e-5  # exactly protected
    restored = [row for (case, what), row in rows.items() if what.endswith("restored alone")]
    assert restored and all(row["pixel_max"] < 1e-5 for row in restored)  # restoring one is exact


def test_wording_rows_read_colour_and_object_words() -> None:
    bench = load_bench("wordings")
    row = bench.row("a red circle by tamsin brack", "tamsin brack", 8_000_000)
    assert (row.class_id, row.colour, row.obj, row.seed) == (2, 0, 0, 8_000_000)
    assert bench.row("vela quorin", "vela quorin", 1).obj is None
