"""Trainers on a tiny model, a few steps each: what changes, what must not, zero_grad, resume, NaN,
bad input, and the script driver."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning_fabric import Fabric
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from wide_tiny_model import build_wide_tiny_model, write_wide_tiny_config

from erasure.bases import compute_bases
from erasure import cli, runs
from erasure.classifier import ImageDataError
from erasure.images import list_images, read_images
from erasure.grids import grid_layout
from erasure.increments import Increment, cross_attention_kv, detach, slugify
from erasure.loading import load_model
from erasure.settings import CiESettings, ESDSettings, SepCESettings, TrainingSettings
from erasure.training import protected_prompts
from erasure.worlds import SD_ARTISTS, World
from erasure.trainers.checkpoint import CheckpointError
from erasure.trainers.cie import CiETrainer
from erasure.trainers.data import concept_latents, folder_images
from erasure.trainers.esd import ESDTrainer
from erasure.trainers.loop import NonFiniteLossError, predict_eps
from erasure.trainers.report import before_after_report, report_paths
from erasure.trainers.runtime import (
    FabricOptions,
    TrainingSetupError,
    _buckets,
    local_rows,
    make_fabric,
    step_generator,
)
from erasure.trainers.sepce import SepCETrainer
from erasure.weight_differences import WeightDifference
from ldm.modules.incremental_linear import increments_disabled

CONCEPTS = ["a red", "b blue"]
IMAGES_PER_CONCEPT = 3


@pytest.fixture(scope="module")
def wide_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wide_tiny_config(tmp_path_factory.mktemp("wide"))


@pytest.fixture
def model(wide_config: Path) -> nn.Module:
    return build_wide_tiny_model(wide_config)


def make_cpu_fabric() -> Fabric:
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    return fabric


@pytest.fixture(scope="module")
def fabric() -> Fabric:
    return make_cpu_fabric()


def random_latents(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (IMAGES_PER_CONCEPT, model.channels, model.image_size, model.image_size)
    return {concept: torch.randn(shape, generator=generator) for concept in CONCEPTS}


def config(kind: type[TrainingSettings] = SepCESettings, **overrides: object) -> TrainingSettings:
    settings = {"lr": 1.0, "iterations": 3, "batch_size": 2, "tau": -1e9, "progress": False, "save_every": 0}
    settings.update(overrides)
    return kind(**settings)


def sepce(model: nn.Module, fabric: Fabric, sequential: bool = False, **overrides: object) -> SepCETrainer:
    bases = compute_bases(model, CONCEPTS, min_dims=1)  # sequential mode uses the joint bases (METHOD.md §2)
    settings = config(mode="sequential" if sequential else "joint", **overrides)
    return SepCETrainer(model, fabric, bases, random_latents(model), settings)


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items() if ".increments." not in key}


def changed_keys(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    after = model.state_dict()
    return {key for key, value in before.items() if not torch.equal(after[key], value)}


# ----------------------------------------------------------------------------- SepCE
def test_sepce_joint_changes_only_coefficients(model: nn.Module, fabric: Fabric) -> None:
    before = frozen_state(model)
    trainer = sepce(model, fabric)
    summary = trainer.fit()
    assert changed_keys(model, before) == set()
    trained = trainer.trained_parameters()
    assert len(trained) == 2 * len(cross_attention_kv(model))
    assert all(torch.count_nonzero(coefficient) > 0 for coefficient in trained.values())
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set()  # all frozen after stopping
    for concept in CONCEPTS:
        assert summary["concepts"][concept]["steps"] == 3
        assert summary["concepts"][concept]["stop_reason"] == "max_steps"


def test_sepce_trains_over_the_concepts_wordings(wide_config: Path, fabric: Fabric) -> None:
    """Each row is conditioned on one of the concept's wordings (METHOD.md §6), so a second wording
    changes what is learned; the bare concept alone is the default."""
    def coefficients(wordings: dict[str, list[str]] | None) -> list[torch.Tensor]:
        model = build_wide_tiny_model(wide_config)
        bases = compute_bases(model, CONCEPTS, min_dims=1)
        trainer = SepCETrainer(model, fabric, bases, random_latents(model), config(batch_size=4), wordings)
        trainer.fit()
        assert trainer.run_settings()["wordings"] == (wordings or {c: [c] for c in CONCEPTS})
        drawn = trainer.draw_wordings(torch.Generator().manual_seed(0), CONCEPTS[0])
        if wordings and len(wordings[CONCEPTS[0]]) > 1:  # a second row per bare row, with a wording other than it
            assert drawn.tolist() == [1] * 4
        else:
            assert drawn is None
        return [value.detach().clone() for value in trainer.trained_parameters().values()]

    bare = coefficients(None)
    assert all(torch.equal(a, b) for a, b in zip(bare, coefficients({c: [c] for c in CONCEPTS})))
    worded = coefficients({c: [c, f"{c} art"] for c in CONCEPTS})
    assert any(not torch.allclose(a, b) for a, b in zip(bare, worded))


def test_sepce_keeps_protected_keys_and_values(model: nn.Module, fabric: Fabric) -> None:
    trainer = sepce(model, fabric, lr=100.0)
    trainer.fit()
    unet = model.model.diffusion_model
    largest = {}
    for prompt in ("", *CONCEPTS):
        context = model.get_learned_conditioning([prompt])
        largest[prompt] = 0.0
        for layer in cross_attention_kv(model).values():
            with torch.no_grad():
                erased = layer(context)
                with increments_disabled(unet):
                    original = layer(context)
            largest[prompt] = max(largest[prompt], float((erased - original).norm() / original.norm()))
    assert largest[""] < 1e-6, largest
    assert min(largest[concept] for concept in CONCEPTS) > 1000 * max(largest[""], 1e-9), largest
    # each concept is protected by the OTHER concept's increment: switch one on at a time
    for own, other in (("a red", "b blue"), ("b blue", "a red")):
        context = model.get_learned_conditioning([other])
        for layer in cross_attention_kv(model).values():
            layer.set_active([slugify(own)])
            with torch.no_grad():
                with_own = layer(context)
            layer.set_active([])
            with torch.no_grad():
                without = layer(context)
            assert float((with_own - without).norm() / without.norm()) < 1e-5


def test_direction_loss_decreases(model: nn.Module, fabric: Fabric) -> None:
    trainer = sepce(model, fabric, iterations=8, lr=3000.0)  # beta = 1e-4 scales the coefficients down
    probe = step_generator(123, 0)

    def direction() -> dict[str, float]:
        with torch.no_grad():
            state = probe.get_state()
            result = trainer.step_loss(torch.Generator().set_state(state), CONCEPTS)
        return {concept: float(value) for concept, value in result.tracked.items()}

    start = direction()
    trainer.fit()
    end = direction()
    for concept in CONCEPTS:
        assert start[concept] > 0
        assert end[concept] < start[concept] * 0.5, (start, end)


def test_gradients_do_not_accumulate_across_steps(model: nn.Module, fabric: Fabric) -> None:
    """The gradient used by each optimizer step equals that step's own loss gradient."""
    trainer = sepce(model, fabric, iterations=3)
    parameters = list(trainer.trained_parameters().values())
    expected: list[list[torch.Tensor]] = []
    compute = trainer.step_loss

    def step_loss_with_reference(generator: torch.Generator, concepts: list[str]):
        result = compute(generator, concepts)
        live = [p for p in parameters if p.requires_grad]
        expected.append([g.clone() for g in torch.autograd.grad(result.loss, live, retain_graph=True)])
        return result

    trainer.step_loss = step_loss_with_reference
    optimizer = trainer._optimizer()
    original_step = optimizer.step
    compared = []

    def checking_step(*args, **kwargs):
        live = [p for p in parameters if p.requires_grad]
        for parameter, reference in zip(live, expected[-1]):
            torch.testing.assert_close(parameter.grad, reference, rtol=1e-5, atol=1e-12)
        compared.append(len(live))
        return original_step(*args, **kwargs)

    optimizer.step = checking_step
    trainer.fit()
    assert len(compared) == 3 and all(count > 0 for count in compared)


def test_sequential_trains_one_concept_at_a_time(model: nn.Module, fabric: Fabric) -> None:
    trainer = sepce(model, fabric, sequential=True, iterations=2)
    seen: list[list[str]] = []
    compute = trainer.step_loss

    def recording(generator: torch.Generator, concepts: list[str]):
        seen.append(list(concepts))
        return compute(generator, concepts)

    trainer.step_loss = recording
    summary = trainer.fit()
    assert seen == [["a red"], ["a red"], ["b blue"], ["b blue"]]
    assert all(layer.active_names == ["a_red", "b_blue"] for layer in cross_attention_kv(model).values())
    assert {c: s["steps"] for c, s in summary["concepts"].items()} == {"a red": 2, "b blue": 2}


def test_resume_gives_the_uninterrupted_result(wide_config: Path, fabric: Fabric, tmp_path: Path) -> None:
    full = sepce(build_wide_tiny_model(wide_config), fabric, iterations=4)
    full.fit()
    reference = {name: p.detach().clone() for name, p in full.trained_parameters().items()}

    checkpoint = tmp_path / "run.checkpoint.safetensors"
    killed = sepce(build_wide_tiny_model(wide_config), fabric, iterations=4, save_every=2, checkpoint=checkpoint)
    compute = killed.step_loss

    def crash_after_two_steps(generator: torch.Generator, concepts: list[str]):
        if killed.step == 2:
            raise KeyboardInterrupt("killed")
        return compute(generator, concepts)

    killed.step_loss = crash_after_two_steps
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    resumed = sepce(
        build_wide_tiny_model(wide_config), fabric, iterations=4, save_every=2, checkpoint=checkpoint, resume=True
    )
    summary = resumed.fit()
    for name, parameter in resumed.trained_parameters().items():
        torch.testing.assert_close(parameter, reference[name], rtol=1e-6, atol=0)
    assert all(concept["steps"] == 4 for concept in summary["concepts"].values())

    other = sepce(
        build_wide_tiny_model(wide_config), fabric, iterations=4, lr=0.5, checkpoint=checkpoint, resume=True
    )
    with pytest.raises(CheckpointError, match="other settings"):
        other.fit()


def test_nan_loss_stops_and_keeps_the_last_checkpoint(
    model: nn.Module, wide_config: Path, fabric: Fabric, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "run.checkpoint.safetensors"
    trainer = sepce(model, fabric, iterations=6, save_every=2, checkpoint=checkpoint)
    apply_model = model.apply_model

    def poisoned(x, t, cond, *args, **kwargs):
        output = apply_model(x, t, cond, *args, **kwargs)
        return output * float("nan") if trainer.step >= 3 else output

    model.apply_model = poisoned
    with pytest.raises(NonFiniteLossError, match=r"step 4 .*checkpoint .*step 2"):
        trainer.fit()
    saved = checkpoint.read_bytes()
    resumed = sepce(
        build_wide_tiny_model(wide_config), fabric, iterations=6, save_every=2, checkpoint=checkpoint, resume=True
    )
    resumed.resume()
    assert resumed.step == 2 and checkpoint.read_bytes() == saved
    assert all(torch.isfinite(p).all() for p in resumed.trained_parameters().values())


def test_each_rank_takes_its_slice_of_the_global_batch(model: nn.Module) -> None:
    latents = random_latents(model)
    draws = {}
    for rank in (0, 1):
        rank_fabric = SimpleNamespace(global_rank=rank, world_size=2, device=torch.device("cpu"))
        bases = compute_bases(model, CONCEPTS[:1], min_dims=1)
        trainer = SepCETrainer(model, rank_fabric, bases, latents, config(batch_size=4))
        draws[rank] = trainer.draw_concept_batch(step_generator(0, 7), latents["a red"])
        detach(model, CONCEPTS[:1])
    whole = SepCETrainer(model, make_cpu_fabric(), compute_bases(model, CONCEPTS[:1], min_dims=1), latents, config(batch_size=4))
    full = whole.draw_concept_batch(step_generator(0, 7), latents["a red"])
    for field in ("latents", "timesteps", "noise"):
        halves = torch.cat([getattr(draws[0], field), getattr(draws[1], field)])
        assert getattr(draws[0], field).shape[0] == 2
        assert torch.equal(halves, getattr(full, field))


def test_bf16_autocast_trains_on_cpu(model: nn.Module) -> None:
    bf16 = Fabric(accelerator="cpu", devices=1, precision="bf16-mixed")
    bf16.launch()
    before = frozen_state(model)
    trainer = sepce(model, bf16, iterations=2, lr=100.0)
    trainer.fit()
    assert changed_keys(model, before) == set()
    assert all(torch.isfinite(p).all() and torch.count_nonzero(p) for p in trainer.trained_parameters().values())


# ----------------------------------------------------------------------------- CiE and ESD
def attn2_keys(model: nn.Module) -> set[str]:
    return {key for key in frozen_state(model) if key.startswith("model.diffusion_model.") and ".attn2." in key}


def test_cie_changes_only_cross_attention(model: nn.Module, fabric: Fabric) -> None:
    before = frozen_state(model)
    trainer = CiETrainer(model, fabric, "a red", random_latents(model)["a red"], config(CiESettings, lr=1e-3, iterations=2))
    trainer.fit()
    assert changed_keys(model, before) == attn2_keys(model)
    difference = trainer.difference()
    assert set(difference.deltas) == attn2_keys(model)
    for key, delta in difference.deltas.items():
        torch.testing.assert_close(before[key] + delta, model.state_dict()[key])


@pytest.mark.parametrize("train_method", ["xattn", "noxattn"])
def test_esd_changes_only_its_weights(model: nn.Module, fabric: Fabric, train_method: str) -> None:
    before = frozen_state(model)
    trainer = ESDTrainer(model, fabric, "a red", config(ESDSettings, lr=1e-3, iterations=2, train_method=train_method, ddim_steps=4))
    summary = trainer.fit()
    unet_keys = {key for key in before if key.startswith("model.diffusion_model.")}
    frozen_by_esd = {key for key in unet_keys if ".time_embed." in key or key.startswith("model.diffusion_model.out.")}
    assert frozen_by_esd  # the rule below has something to leave out
    expected = attn2_keys(model) if train_method == "xattn" else unet_keys - attn2_keys(model) - frozen_by_esd
    assert changed_keys(model, before) == expected
    assert summary["method"] == {"xattn": "esd_x", "noxattn": "esd_u"}[train_method]
    assert summary["concepts"]["a red"]["stop_reason"] == "max_steps"


def test_original_weights_swap_back_bit_exactly(model: nn.Module, fabric: Fabric) -> None:
    trainer = CiETrainer(model, fabric, "a red", random_latents(model)["a red"], config(CiESettings, lr=1e-2, iterations=1))
    trainer.fit()
    trained = {name: p.detach().clone() for name, p in trainer.trained_parameters().items()}
    with trainer.original_weights():
        for name, parameter in trainer.trained_parameters().items():
            assert not torch.equal(parameter, trained[name]) or name.endswith("bias")
    for name, parameter in trainer.trained_parameters().items():
        assert torch.equal(parameter, trained[name])


# ----------------------------------------------------------------------------- runtime and data
def test_step_draws_are_seeded_and_rows_split_evenly() -> None:
    first = torch.randn(4, generator=step_generator(0, 5))
    assert torch.equal(first, torch.randn(4, generator=step_generator(0, 5)))
    assert not torch.equal(first, torch.randn(4, generator=step_generator(0, 6)))
    assert [local_rows(6, rank, 3) for rank in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 6)]
    with pytest.raises(TrainingSetupError, match="multiple of 4"):
        local_rows(6, 0, 4)


def test_gradient_buckets_respect_size_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("erasure.trainers.runtime.BUCKET_ELEMENTS", 10)
    grads = [torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(2, dtype=torch.float64), torch.zeros(30)]
    assert [[g.numel() for g in bucket] for bucket in _buckets(grads)] == [[4, 4], [4], [2], [30]]


def test_fp16_autocast_is_refused_on_cpu() -> None:
    with pytest.raises(TrainingSetupError, match="16-mixed needs CUDA"):
        make_fabric(FabricOptions(accelerator="cpu", precision="16-mixed"))
    with pytest.raises(TrainingSetupError, match="--strategy"):
        make_fabric(FabricOptions(strategy="fsdp"))


def write_images(folder: Path, count: int, size: int = 16, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index:05d}.png")


def test_training_images_bad_input(model: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ImageDataError, match="does not exist"):
        list_images(tmp_path / "a_red")
    (tmp_path / "a_red").mkdir()
    with pytest.raises(ImageDataError, match="holds no images"):
        list_images(tmp_path / "a_red")
    write_images(tmp_path / "mixed", 1, size=16)
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "00001.png")
    with pytest.raises(ImageDataError, match="different sizes"):
        read_images(list_images(tmp_path / "mixed"))
    write_images(tmp_path / "a_red", 2)
    latents = concept_latents(model, folder_images(tmp_path, ["a red"]), ["a red"])
    assert latents["a red"].shape == (2, model.channels, model.image_size, model.image_size)


# ----------------------------------------------------------------------------- the script driver
def cli_args(parser: argparse.ArgumentParser, model_files: tuple[Path, Path], *extra: str) -> argparse.Namespace:
    config_path, ckpt_path = model_files
    return parser.parse_args(
        ["--config_path", str(config_path), "--ckpt_path", str(ckpt_path), "--accelerator", "cpu", "--no_progress",
         "--iterations", "2", "--batch_size", "1", *extra]
    )


def run(fabric: Fabric, args: argparse.Namespace, kind: type[TrainingSettings]) -> dict:
    return runs.run_training(fabric, cli.request_from_args(args, kind))


@pytest.fixture(scope="module")
def model_files(wide_config: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    ckpt = tmp_path_factory.mktemp("ckpt") / "wide.safetensors"
    state = build_wide_tiny_model(wide_config).state_dict()
    save_file({key: value.contiguous() for key, value in state.items()}, str(ckpt))
    return wide_config, ckpt


def test_sepce_script_writes_named_increments_and_one_json_line(
    model_files: tuple[Path, Path], fabric: Fabric, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    write_images(tmp_path / "data" / "a_red", 2)
    args = cli_args(
        cli.sepce_parser(), model_files, "--concepts", "a red", "--data_dir", str(tmp_path / "data"),
        "--output_dir", str(tmp_path / "out"), "--min_dims", "1",
    )
    run(fabric, args, SepCESettings)
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    [expected] = runs.result_files(cli.request_from_args(args, SepCESettings), 0.1)[0].values()
    assert expected.name.startswith("sepce-a_red-lr_0.1-beta_1e-4-lam_1e-6-taurel_3e-4-seed_0-")
    assert summary["outputs"] == [str(expected)]
    assert summary["concepts"]["a red"]["steps"] == 2 and summary["seconds"] > 0
    increment = Increment.load(expected)
    assert increment.metadata["training"]["steps"] == 2 and increment.metadata["settings"]["lr"] == 0.1
    with pytest.raises(ValueError, match="already exists"):
        run(fabric, args, SepCESettings)


def test_sepce_protects_the_other_classes_on_request(model_files: tuple[Path, Path]) -> None:
    model = load_model(*model_files)
    on = SepCESettings(protect_classes=True)
    assert protected_prompts(model, ["van gogh"], ["Picasso"], on) == ["watermark SRS-ME", "Picasso", *SD_ARTISTS[2:]]
    assert protected_prompts(model, ["van gogh"], [], SepCESettings()) == ["watermark SRS-ME"]  # SD default: no classes
    assert protected_prompts(model, ["van gogh"], [], SepCESettings(watermark_prompt="")) == []
    toy = World("toy-like", ("", "a red", "b blue"), protect_classes=True)
    model.ldm_config.world = {"name": toy.name, "class_prompts": list(toy.class_prompts), "protect_classes": True}
    assert protected_prompts(model, ["a red"], [], SepCESettings(watermark_prompt="")) == ["b blue"]  # toy default: on


@pytest.mark.parametrize(("method", "kind", "reference", "toy"), [
    ("sepce", SepCESettings, 0.1, 1.0), ("cie", CiESettings, 1e-5, 1e-4), ("esd", ESDSettings, 1e-5, 1e-4),
])
def test_learning_rate_defaults_per_world(method: str, kind: type[TrainingSettings], reference: float, toy: float) -> None:
    assert kind().with_lr(method, "toy").lr == toy
    assert kind().with_lr(method, "sd").lr == reference  # METHOD.md's on SD and any world without its own
    assert kind().with_lr(method, "other").lr == reference
    assert kind(lr=0.3).with_lr(method, "toy").lr == 0.3


def test_cie_script_generates_missing_images_once(
    model_files: tuple[Path, Path], fabric: Fabric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setattr("erasure.trainers.data.GENERATED_ROOT", tmp_path / "generated")
    args = cli_args(
        cli.cie_parser(), model_files, "--prompt", "a red", "--num_images", "2", "--output_dir", str(tmp_path / "out"),
        "--lr", "1e-3",
    )
    original_load = runs.load_model

    def load_with_fast_sampling(*arguments: object, **keywords: object) -> nn.Module:
        loaded = original_load(*arguments, **keywords)
        loaded.ldm_config.sampling = {"steps": 2, "guidance_scale": 1.0}
        return loaded

    monkeypatch.setattr(runs, "load_model", load_with_fast_sampling)
    run(fabric, args, CiESettings)
    out = capsys.readouterr().out
    assert "Generating 2 training images of 'a red'" in out
    folders = list((tmp_path / "generated").glob("*/a_red"))
    assert len(folders) == 1 and len(list(folders[0].glob("*.png"))) == 2
    written = json.loads(out.strip().splitlines()[-1])["outputs"][0]
    assert Path(written).name.startswith("cie-a_red-lr_1e-3-lam_1e-6-taurel_3e-4-seed_0-")
    assert WeightDifference.load(written).method == "cie"
    run(fabric, cli_args(
        cli.cie_parser(), model_files, "--prompt", "a red", "--num_images", "2", "--output_dir", str(tmp_path / "out"),
        "--lr", "1e-3", "--overwrite",
    ), CiESettings)
    assert "Generating" not in capsys.readouterr().out


def test_script_refuses_a_stale_checkpoint_and_device_flag(
    model_files: tuple[Path, Path], fabric: Fabric, tmp_path: Path
) -> None:
    args = cli_args(cli.esd_parser(), model_files, "--prompt", "a red", "--output_dir", str(tmp_path))
    stem = runs.result_files(cli.request_from_args(args, ESDSettings), 1e-5)[1].name
    (tmp_path / f"{stem}{runs.CHECKPOINT_SUFFIX}").write_bytes(b"old")
    with pytest.raises(TrainingSetupError, match="pass --resume to continue it or --overwrite"):
        run(fabric, args, ESDSettings)
    args.device = "cuda"
    with pytest.raises(ValueError, match="--accelerator"):
        run(fabric, args, ESDSettings)


def test_output_names_record_the_hyperparameters() -> None:
    assert runs.format_number(1e-4) == "1e-4" and runs.format_number(0.1) == "0.1" and runs.format_number(3e-5) == "3e-5"
    assert runs.output_name("sepce", "van_gogh", {"lr": 0.1, "beta": 1e-4, "lam": 1e-6, "tau": 1e-4}) == (
        "sepce-van_gogh-lr_0.1-beta_1e-4-lam_1e-6-tau_1e-4"
    )


class ConstantClassifier(nn.Module):
    """An ACC classifier that always answers class 0 (the report test's stand-in)."""

    arch = "constant"
    num_classes = 2

    def class_index(self, name: str) -> int:
        return {"blank": 0, "a red": 1}[name]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0]]).expand(len(images), 2)


def constant_classifier(device: torch.device) -> ConstantClassifier:
    return ConstantClassifier()


def test_before_after_report_on_the_tiny_model(
    model: nn.Module, fabric: Fabric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wordings = tmp_path / "held-out.csv"
    wordings.write_text("prompt,evaluation_seed,case_number,class\nred a,5,0,a red\na red one,6,1,a red\n")
    model.ldm_config = OmegaConf.create({"sampling": {"steps": 2, "guidance_scale": 1.0}})
    trainer = sepce(model, fabric, iterations=1, lr=1000.0)
    trainer.fit()
    increment = trainer.increments()["a red"]
    detach(model, CONCEPTS)
    world = World("tiny", ("", "a red"), classifier=f"{__name__}.constant_classifier", held_out_wordings=str(wordings))
    table = before_after_report(model, [increment], world, tmp_path / "run", samples_per_class=2)
    record = json.loads(report_paths(tmp_path / "run")[1].read_text())
    rows = {(row["class"], row["prompts"]): row for row in record["classes"]}
    assert list(rows) == [("blank", "exact"), ("a red", "exact"), ("a red", "held-out")]
    blank, exact, held_out = rows.values()
    assert blank["acc_before"] == 1.0 and exact["acc_after"] == 0.0 and exact["erased"] == "yes"
    assert blank["pixel_change_max"] < 1e-5  # "" is protected: its samples move by float rounding only
    assert exact["pixel_change_max"] > 0.0 and held_out["pixel_change_max"] > 0.0
    assert "| a red | exact | yes | 0 | 0 |" in table and "| a red | held-out | yes |" in table
    # a row per class of 2 samples before + 2 after (16 px), labelled: the layout's size
    layout = grid_layout([torch.zeros(4, 3, 16, 16)] * 2, list(world.names), block_labels=[("before", 2), ("after", 2)])
    assert Image.open(report_paths(tmp_path / "run")[0]).size == (layout.width, layout.height)


def test_losses_are_defined_on_eps_for_v_models(model: nn.Module) -> None:
    x = torch.randn(2, model.channels, model.image_size, model.image_size)
    t = torch.tensor([10, 900])
    context = model.get_learned_conditioning(["a red", ""])
    with torch.no_grad():
        raw = model.apply_model(x, t, context)
        assert torch.equal(predict_eps(model, x, t, context), raw)
        model.parameterization = "v"
        torch.testing.assert_close(predict_eps(model, x, t, context), model.predict_eps_from_z_and_v(x, t, raw))
