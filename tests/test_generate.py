"""generate-images.py, generate-data.py and the LMS sampler on the tiny model (2 sampler steps).

The scripts are run in-process through ``main(argv)`` with a tiny config + safetensors checkpoint
written to a temporary folder; the multi-process runs start the real scripts with --devices 2.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from conftest import perturb_zero_init, tiny_model_config
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from erasure.files import ErasureFileError
from erasure.generation import (
    SEEDS_FILE,
    GenerationError,
    first_stage_factor,
    generate_latents,
    prompt_jobs,
    write_images,
)
from erasure.loading import load_model
from erasure.prompts import PromptFileError, read_prompts
from erasure.samplers import SamplingError, sampling_settings
from erasure.weight_differences import weight_difference
from erasure.worlds import WorldError
from ldm.util import instantiate_from_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "eval-scripts"
STEPS = 2


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate_images = load_script("generate-images")
generate_data = load_script("generate-data")


def sample_latents(
    model: nn.Module,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int,
    guidance_scale: float | None = None,
    eta: float | None = None,
    sampler: str | None = None,
    batch_size: int = 8,
) -> torch.Tensor:
    """Latents through the public API: settings from ``sampling_settings``, then ``generate_latents``."""
    settings = sampling_settings(model, sampler, steps, guidance_scale, eta)
    return generate_latents(model, prompts, seeds, settings=settings, batch_size=batch_size)


def build_tiny(clip_dir: Path, parameterization: str = "eps") -> nn.Module:
    torch.manual_seed(0)
    config = tiny_model_config(clip_dir)
    config.params.parameterization = parameterization
    model = instantiate_from_config(config)
    perturb_zero_init(model, seed=0)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> dict[str, Path]:
    """Config (2 DDIM steps, guidance 3) and checkpoint of the tiny model, a toy-world config, a weight
    difference for it and a prompt CSV."""
    folder = tmp_path_factory.mktemp("generate")
    model = build_tiny(tiny_clip_dir)
    sampling = {"sampler": "ddim", "steps": STEPS, "guidance_scale": 3.0}
    config = folder / "tiny.yaml"
    OmegaConf.save(OmegaConf.create({"model": tiny_model_config(tiny_clip_dir), "sampling": sampling}), config)
    toy_config = folder / "tiny-toy.yaml"
    toy_world = OmegaConf.load(REPO_ROOT / "configs" / "toy" / "toy-ldm.yaml").world
    OmegaConf.save(
        OmegaConf.create({"model": tiny_model_config(tiny_clip_dir), "sampling": sampling, "world": toy_world}),
        toy_config,
    )
    ckpt = folder / "tiny.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(ckpt))
    original = {key: value.clone() for key, value in model.state_dict().items() if ".attn2.to_v." in key}
    generator = torch.Generator().manual_seed(1)
    trained = {key: value + 0.5 * torch.randn(value.shape, generator=generator) for key, value in original.items()}
    difference = weight_difference(original, trained, "esd", "a red")
    erasure = difference.save(folder / "esd-a_red.safetensors")
    prompts = folder / "prompts.csv"
    prompts.write_text(
        "prompt,evaluation_seed,case_number,class_index\na red,40,3,1\nb blue,50,7,2\n,60,9,0\na red,41,11,1\n",
        encoding="utf-8",
    )
    return {"config": config, "toy_config": toy_config, "ckpt": ckpt, "erasure": erasure, "prompts": prompts}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def images_of(folder: Path) -> dict[str, np.ndarray]:
    return {path.name: pixels(path) for path in sorted(folder.glob("*.png"))}


def model_flags(files: dict[str, Path], config: str = "config") -> list[str]:
    return ["--config_path", str(files[config]), "--ckpt_path", str(files["ckpt"]), "--no_progress"]


def image_flags(files: dict[str, Path], save: Path, *extra: str) -> list[str]:
    return ["--prompts_path", str(files["prompts"]), "--save_path", str(save), "--num_samples", "2",
            *model_flags(files), *extra]


# ------------------------------------------------------------------------------------------- LMS
def test_lms_is_deterministic_per_image_and_differs_from_ddim(tiny_model: nn.Module) -> None:
    prompts, seeds = ["a red", "b blue", "a red"], [3, 4, 5]
    lms = sample_latents(tiny_model, prompts, seeds, steps=4, guidance_scale=3.0, sampler="lms")
    again = sample_latents(tiny_model, prompts, seeds, steps=4, guidance_scale=3.0, sampler="lms", batch_size=1)
    ddim = sample_latents(tiny_model, prompts, seeds, steps=4, guidance_scale=3.0, sampler="ddim")
    assert torch.isfinite(lms).all()
    torch.testing.assert_close(lms, again, rtol=0, atol=1e-4)
    assert (lms - ddim).abs().max() > 1e-2
    assert (lms[0] - lms[2]).abs().max() > 1e-2  # same prompt, other seed
    with pytest.raises(SamplingError, match="eta=0.5 applies to DDIM only"):
        sample_latents(tiny_model, prompts[:1], seeds[:1], steps=4, eta=0.5, sampler="lms")


def test_lms_reads_v_outputs_like_the_models_own_conversion(tiny_clip_dir: Path) -> None:
    """4 LMS steps sit on the integer timesteps 999, 666, 333, 0, where predict_eps_from_z_and_v applies."""
    v_model = build_tiny(tiny_clip_dir, parameterization="v")
    eps_model = copy.deepcopy(v_model)
    eps_model.parameterization = "eps"
    v_output = v_model.apply_model

    def eps_output(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        assert torch.equal(t, t.round())
        return v_model.predict_eps_from_z_and_v(x, t.long(), v_output(x, t, cond))

    eps_model.apply_model = eps_output
    from_v = sample_latents(v_model, ["a red"], [0], steps=4, guidance_scale=2.0, sampler="lms")
    from_eps = sample_latents(eps_model, ["a red"], [0], steps=4, guidance_scale=2.0, sampler="lms")
    torch.testing.assert_close(from_v, from_eps, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- generate-images
def test_generate_images_names_seeds_record_and_resume(files: dict[str, Path], tmp_path: Path) -> None:
    summary = generate_images.main(image_flags(files, tmp_path, "--model_name", "base"))
    folder = tmp_path / "base"
    expected = {f"{case}_{k}.png" for case in (3, 7, 9, 11) for k in (0, 1)}
    assert set(images_of(folder)) == expected and summary["present"] == 8
    first = images_of(folder)
    assert first["3_0.png"].shape == (16, 16, 3)
    # seed = evaluation_seed + k: case 3 (seed 40) image 1 is case 11 (seed 41) image 0
    assert np.array_equal(first["3_1.png"], first["11_0.png"])
    assert not np.array_equal(first["3_0.png"], first["3_1.png"])
    record = json.loads((folder / "generation.json").read_text())
    assert record["identity"]["sampling"] == {"sampler": "ddim", "steps": STEPS, "guidance_scale": 3.0, "eta": 0.0}
    assert record["cases"]["9"] == {"prompt": "", "evaluation_seed": 60} and record["num_samples"] == 2
    assert record["identity"]["image_size"] == 16 and "torch" in record["versions"]

    (folder / "7_1.png").unlink()
    kept = (folder / "3_0.png").stat().st_mtime_ns
    generate_images.main(image_flags(files, tmp_path, "--model_name", "base"))
    assert (folder / "3_0.png").stat().st_mtime_ns == kept
    assert np.array_equal(pixels(folder / "7_1.png"), first["7_1.png"])

    generate_images.main(image_flags(files, tmp_path, "--model_name", "again", "--from_case", "4", "--till_case", "9"))
    again = images_of(tmp_path / "again")
    assert set(again) == {"7_0.png", "7_1.png", "9_0.png", "9_1.png"}
    assert all(np.array_equal(again[name], first[name]) for name in again)


def test_generate_images_refuses_mixing_and_overwrites_on_request(files: dict[str, Path], tmp_path: Path) -> None:
    generate_images.main(image_flags(files, tmp_path, "--model_name", "m", "--till_case", "3"))
    with pytest.raises(GenerationError, match=r"records sampling=.*'steps': 2.*this run uses .*'steps': 3"):
        generate_images.main(image_flags(files, tmp_path, "--model_name", "m", "--ddim_steps", "3"))
    lms = image_flags(files, tmp_path, "--model_name", "m", "--till_case", "3", "--sampler", "lms", "--overwrite")
    generate_images.main(lms)
    record = json.loads((tmp_path / "m" / "generation.json").read_text())
    assert record["identity"]["sampling"]["sampler"] == "lms" and set(record["cases"]) == {"3"}


def test_apply_changes_images_and_bad_models_are_errors(files: dict[str, Path], tmp_path: Path) -> None:
    generate_images.main(image_flags(files, tmp_path, "--model_name", "base", "--till_case", "3"))
    summary = generate_images.main(image_flags(files, tmp_path, "--till_case", "3", "--apply", str(files["erasure"])))
    assert Path(summary["folder"]).name == "tiny+esd-a_red"
    base, erased = images_of(tmp_path / "base"), images_of(Path(summary["folder"]))
    assert base.keys() == erased.keys()
    assert all(np.abs(base[name] - erased[name]).max() > 5 for name in base)
    record = json.loads((Path(summary["folder"]) / "generation.json").read_text())
    assert record["model"]["weight_differences"] == ["esd/a red"] and len(record["identity"]["applied_sha256"]) == 1

    with pytest.raises(ErasureFileError, match="does not exist"):
        generate_images.main(image_flags(files, tmp_path, "--apply", str(tmp_path / "missing.safetensors")))
    missing_ckpt = image_flags(files, tmp_path)
    missing_ckpt[missing_ckpt.index(str(files["ckpt"]))] = str(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match="--ckpt_path .*missing.ckpt does not exist"):
        generate_images.main(missing_ckpt)
    with pytest.raises(GenerationError, match="only names the output folder and no weights were given"):
        generate_images.main(["--prompts_path", str(files["prompts"]), "--model_name", "compvis-word_VanGogh"])
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("prompt,case_number\na red,1\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match="lacks the column"):
        generate_images.main(["--prompts_path", str(bad_csv), *model_flags(files)])
    assert not (tmp_path / "tiny").exists()


def test_image_size(files: dict[str, Path], tmp_path: Path, tiny_model: nn.Module) -> None:
    assert first_stage_factor(tiny_model) == 2
    generate_images.main(image_flags(files, tmp_path, "--model_name", "big", "--till_case", "3", "--image_size", "24"))
    assert pixels(tmp_path / "big" / "3_0.png").shape == (24, 24, 3)
    with pytest.raises(GenerationError, match="--image_size 25 is not a positive multiple of 2"):
        generate_images.main(image_flags(files, tmp_path, "--model_name", "odd", "--image_size", "25"))


# --------------------------------------------------------------------------------- generate-data
def test_generate_data_splits_seeds_and_resume(files: dict[str, Path], tmp_path: Path) -> None:
    flags = ["--save_path", str(tmp_path), "--num_samples", "2", *model_flags(files)]
    summary = generate_data.main(["--model_name", "Picasso", *flags])
    assert summary["class_index"] == 2 and summary["prompt"] == "Picasso" and summary["world"] == "sd"
    train = tmp_path / "train" / "2"
    assert sorted(path.name for path in train.iterdir()) == ["00000.png", "00001.png", SEEDS_FILE]
    assert json.loads((train / SEEDS_FILE).read_text())["seeds"] == [0, 1]
    generate_data.main(["--model_name", "2", "--split", "eval", *flags])
    assert json.loads((tmp_path / "eval" / "2" / SEEDS_FILE).read_text())["seeds"] == [1_000_000, 1_000_001]
    assert not np.array_equal(pixels(train / "00000.png"), pixels(tmp_path / "eval" / "2" / "00000.png"))

    first = pixels(train / "00001.png")
    (train / "00001.png").unlink()
    kept = (train / "00000.png").stat().st_mtime_ns
    generate_data.main(["--model_name", "picasso", *flags, "--num_samples", "3"])
    assert (train / "00000.png").stat().st_mtime_ns == kept
    assert np.array_equal(pixels(train / "00001.png"), first) and (train / "00002.png").is_file()
    with pytest.raises(GenerationError, match="same seed0"):
        generate_data.main(["--model_name", "2", *flags, "--seed", "5"])
    generate_data.main(["--model_name", "2", *flags, "--seed", "5", "--overwrite"])
    assert json.loads((train / SEEDS_FILE).read_text())["seeds"] == [5, 6] and not (train / "00002.png").exists()


def test_generate_data_classes_follow_the_config(files: dict[str, Path], tmp_path: Path) -> None:
    flags = ["--save_path", str(tmp_path), "--num_samples", "1", "--no_progress"]
    with pytest.raises(WorldError, match=r"Unknown class 'Monet' for the sd model; valid: 0 blank"):
        generate_data.main(["--model_name", "Monet", *flags, *model_flags(files)])
    with pytest.raises(WorldError, match="Class index 10 is out of range"):
        generate_data.main(["--model_name", "10", *flags, *model_flags(files)])
    with pytest.raises(WorldError, match="for the toy model"):
        generate_data.main(["--model_name", "Van Gogh", *flags, *model_flags(files, "toy_config")])
    summary = generate_data.main(["--model_name", "0", *flags, *model_flags(files, "toy_config")])
    assert summary["world"] == "toy" and summary["prompt"] == "" and (tmp_path / "train" / "0" / "00000.png").is_file()
    with pytest.raises(GenerationError, match="--ckpt_path was given without --config_path"):
        generate_data.main(["--model_name", "1", "--ckpt_path", str(files["ckpt"])])


# ---------------------------------------------------------------------------------- processes
def run_script(name: str, arguments: list[str]) -> dict:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPTS / f"{name}.py"), *arguments],
        capture_output=True, text=True, timeout=600, env=environment,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_two_processes_write_the_same_files_as_one(files: dict[str, Path], tmp_path: Path) -> None:
    one = image_flags(files, tmp_path, "--model_name", "one", "--batch_size", "1")
    generate_images.main(one)
    two = image_flags(files, tmp_path, "--model_name", "two", "--batch_size", "1", "--devices", "2")
    summary = run_script("generate-images", two)
    assert summary["processes"] == 2 and summary["present"] == 8
    single, sharded = images_of(tmp_path / "one"), images_of(tmp_path / "two")
    assert single.keys() == sharded.keys() and len(single) == 8
    assert all(np.array_equal(single[name], sharded[name]) for name in single)


def test_write_images_splits_by_image_index(files: dict[str, Path], tmp_path: Path) -> None:
    """In-process check of the split itself: ranks 0 and 1 of 2 together make every image once."""
    model = load_model(files["config"], files["ckpt"], verbose=False)
    settings = sampling_settings(model)
    rows = read_prompts(files["prompts"])
    jobs = prompt_jobs(rows, 2, tmp_path)
    made = [
        write_images(model, jobs, settings, rank=rank, world_size=2, batch_size=1, progress=False) for rank in (0, 1)
    ]
    assert made == [4, 4] and all(job.path.is_file() for job in jobs)
    assert write_images(model, jobs, settings, batch_size=1, progress=False) == 0


@pytest.mark.slow
def test_two_processes_generate_the_same_class_data_as_one(files: dict[str, Path], tmp_path: Path) -> None:
    data_flags = ["--model_name", "1", "--num_samples", "3", "--batch_size", "1", *model_flags(files)]
    generate_data.main([*data_flags, "--save_path", str(tmp_path / "data-one")])
    summary = run_script("generate-data", [*data_flags, "--save_path", str(tmp_path / "data-two"), "--devices", "2"])
    assert summary["processes"] == 2 and summary["present"] == 3
    single, sharded = images_of(tmp_path / "data-one" / "train" / "1"), images_of(tmp_path / "data-two" / "train" / "1")
    assert single.keys() == sharded.keys() and len(single) == 3
    assert all(np.array_equal(single[name], sharded[name]) for name in single)
