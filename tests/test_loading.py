"""The one loader: both checkpoint formats, EMA, the toy default, and one clear error per bad input."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import perturb_zero_init, tiny_model_config
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from erasure import loading
from erasure.cli import add_model_arguments, load_model_from_args
from erasure.loading import (
    ModelLoadError,
    load_model,
    model_fingerprint,
    resolve_device,
    text_encoder_fingerprint,
)
from ldm.util import instantiate_from_config

UNET_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
VAE_KEY = "first_stage_model.encoder.conv_in.weight"


@dataclass
class TinyFiles:
    config: Path
    safetensors: Path
    ckpt: Path
    state: dict[str, torch.Tensor]


def write_config(path: Path, model_config) -> Path:
    OmegaConf.save(OmegaConf.create({"model": model_config}), path)
    return path


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({key: value.contiguous() for key, value in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def reference_model(tiny_clip_dir: Path) -> nn.Module:
    """The tiny model the files below were saved from; tests must not modify it."""
    torch.manual_seed(0)
    model = instantiate_from_config(tiny_model_config(tiny_clip_dir))
    perturb_zero_init(model, seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_files(
    tmp_path_factory: pytest.TempPathFactory, reference_model: nn.Module, tiny_clip_dir: Path
) -> TinyFiles:
    folder = tmp_path_factory.mktemp("tiny_files")
    state = {key: value.clone() for key, value in reference_model.state_dict().items()}
    ckpt = folder / "tiny.ckpt"
    torch.save({"state_dict": state, "global_step": 0}, ckpt)
    return TinyFiles(
        config=write_config(folder / "tiny.yaml", tiny_model_config(tiny_clip_dir)),
        safetensors=save_safetensors(state, folder / "tiny.safetensors"),
        ckpt=ckpt,
        state=state,
    )


def assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_safetensors_and_lightning_ckpt_load_the_same_weights(tiny_files: TinyFiles) -> None:
    from_safetensors = load_model(tiny_files.config, tiny_files.safetensors, verbose=False)
    from_ckpt = load_model(tiny_files.config, tiny_files.ckpt, verbose=False)
    assert_same_state(from_safetensors, tiny_files.state)
    assert_same_state(from_ckpt, tiny_files.state)
    assert not from_ckpt.training
    assert not any(parameter.requires_grad for parameter in from_ckpt.parameters())
    assert model_fingerprint(from_safetensors) == model_fingerprint(from_ckpt)


def test_plain_state_dict_with_v14_extras_loads(tiny_files: TinyFiles, tmp_path: Path) -> None:
    """SD v1.4 files carry CLIP's position_ids, EMA copies and no lvlb buffers: all harmless."""
    state = dict(tiny_files.state)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(16)[None]
    state["model_ema.decay"] = torch.tensor(0.9999)
    del state["betas"]
    path = tmp_path / "plain.pt"
    torch.save(state, path)
    model = load_model(tiny_files.config, path, verbose=False)
    assert_same_state(model, tiny_files.state)


def test_text_encoder_loads_end_to_end(tiny_files: TinyFiles, reference_model: nn.Module) -> None:
    assert any(key.startswith("cond_stage_model.transformer.text_model.") for key in tiny_files.state)
    model = load_model(tiny_files.config, tiny_files.safetensors, verbose=False)
    prompts = ["a painting of the sea", ""]
    with torch.no_grad():
        expected = reference_model.get_learned_conditioning(prompts)
        assert torch.equal(model.get_learned_conditioning(prompts), expected)
    assert text_encoder_fingerprint(model) == text_encoder_fingerprint(reference_model)


def ema_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    with_ema = dict(state)
    for name, parameter in model.model.named_parameters():
        with_ema["model_ema." + name.replace(".", "")] = parameter.detach() + 1.0
    with_ema["model_ema.decay"] = torch.tensor(0.9999)
    with_ema["model_ema.num_updates"] = torch.tensor(7)
    return with_ema


def test_use_ema_takes_the_ema_unet(tiny_files: TinyFiles, reference_model: nn.Module, tmp_path: Path) -> None:
    path = save_safetensors(ema_state(tiny_files.state, reference_model), tmp_path / "ema.safetensors")
    with_ema = load_model(tiny_files.config, path, use_ema=True, verbose=False)
    without_ema = load_model(tiny_files.config, path, verbose=False)
    assert torch.equal(with_ema.state_dict()[UNET_KEY], tiny_files.state[UNET_KEY] + 1.0)
    assert torch.equal(with_ema.state_dict()[VAE_KEY], tiny_files.state[VAE_KEY])
    assert_same_state(without_ema, tiny_files.state)


def test_device_use_ema_and_verbose_are_keyword_only(tiny_files: TinyFiles) -> None:
    with pytest.raises(TypeError):
        load_model(tiny_files.config, tiny_files.safetensors, "cpu")
    with pytest.raises(TypeError):
        load_model(tiny_files.config, tiny_files.safetensors, "cpu", False, False)
    model = load_model(tiny_files.config, tiny_files.safetensors, device="cpu", use_ema=False, verbose=False)
    assert_same_state(model, tiny_files.state)


def test_use_ema_without_ema_weights_is_refused(tiny_files: TinyFiles) -> None:
    with pytest.raises(ModelLoadError, match="no EMA weights") as error:
        load_model(tiny_files.config, tiny_files.safetensors, use_ema=True, verbose=False)
    assert str(tiny_files.safetensors) in str(error.value) and "Drop --use_ema" in str(error.value)


@pytest.mark.parametrize("which", ["config", "ckpt"])
def test_missing_file(tiny_files: TinyFiles, tmp_path: Path, which: str) -> None:
    absent = tmp_path / "absent.yaml"
    paths = (absent, tiny_files.safetensors) if which == "config" else (tiny_files.config, absent)
    with pytest.raises(FileNotFoundError, match=re.escape(f"--{which}_path {absent} does not exist")):
        load_model(*paths, verbose=False)


def test_corrupted_checkpoints(tiny_files: TinyFiles, tmp_path: Path) -> None:
    for name in ("broken.safetensors", "broken.ckpt"):
        path = tmp_path / name
        path.write_bytes(b"\x00not a checkpoint" * 10)
        with pytest.raises(ModelLoadError, match="Cannot read checkpoint") as error:
            load_model(tiny_files.config, path, verbose=False)
        assert str(path) in str(error.value)
    unknown = tmp_path / "weights.npz"
    unknown.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="unknown extension '.npz'"):
        load_model(tiny_files.config, unknown, verbose=False)


def test_unknown_config_target(tiny_files: TinyFiles, tiny_clip_dir: Path, tmp_path: Path) -> None:
    config = tiny_model_config(tiny_clip_dir)
    config.params.unet_config.target = "ldm.modules.diffusionmodules.openaimodel.NoSuchUNet"
    path = write_config(tmp_path / "bad.yaml", config)
    with pytest.raises(ModelLoadError, match="unknown target") as error:
        load_model(path, tiny_files.safetensors, verbose=False)
    assert str(path) in str(error.value) and "ldm.modules.diffusionmodules.openaimodel.NoSuchUNet" in str(error.value)


def test_unparsable_config(tiny_files: TinyFiles, tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ModelLoadError, match=f"Cannot parse config {path}"):
        load_model(path, tiny_files.safetensors, verbose=False)


def test_config_ckpt_path_is_never_loaded(tiny_files: TinyFiles, tiny_clip_dir: Path, tmp_path: Path) -> None:
    config = tiny_model_config(tiny_clip_dir)
    config.params.ckpt_path = str(tmp_path / "never-read.ckpt")
    path = write_config(tmp_path / "with-ckpt.yaml", config)
    with pytest.warns(UserWarning, match="ignoring ckpt_path"):
        model = load_model(path, tiny_files.safetensors, verbose=False)
    assert_same_state(model, tiny_files.state)


def test_missing_unet_key_is_refused(tiny_files: TinyFiles, tmp_path: Path) -> None:
    state = dict(tiny_files.state)
    del state[UNET_KEY]
    path = save_safetensors(state, tmp_path / "no-unet-key.safetensors")
    with pytest.raises(ModelLoadError) as error:
        load_model(tiny_files.config, path, verbose=False)
    message = str(error.value)
    assert f"missing UNet weight {UNET_KEY}" in message
    assert str(path) in message and "incomplete" in message and "--config_path" in message


def test_unexpected_unet_key_is_refused(tiny_files: TinyFiles, tmp_path: Path) -> None:
    state = dict(tiny_files.state)
    state["model.diffusion_model.extra_block.weight"] = torch.zeros(3)
    path = save_safetensors(state, tmp_path / "extra-unet-key.safetensors")
    with pytest.raises(ModelLoadError, match="unexpected UNet weight model.diffusion_model.extra_block.weight"):
        load_model(tiny_files.config, path, verbose=False)


def test_mis_shaped_vae_key_is_refused(tiny_files: TinyFiles, tmp_path: Path) -> None:
    state = dict(tiny_files.state)
    good_shape = tuple(state[VAE_KEY].shape)
    state[VAE_KEY] = torch.zeros(7, 3, 3, 3)
    path = save_safetensors(state, tmp_path / "bad-vae.safetensors")
    with pytest.raises(ModelLoadError) as error:
        load_model(tiny_files.config, path, verbose=False)
    assert f"mis-shaped VAE weight {VAE_KEY} (checkpoint (7, 3, 3, 3), model {good_shape})" in str(error.value)


def test_checkpoint_of_another_architecture(tiny_files: TinyFiles, tiny_clip_dir: Path, tmp_path: Path) -> None:
    other = tiny_model_config(tiny_clip_dir)
    other.params.unet_config.params.model_channels = 64
    other.params.first_stage_config.params.ddconfig.ch = 64
    path = save_safetensors(instantiate_from_config(other).state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(ModelLoadError, match="this checkpoint does not match the config") as error:
        load_model(tiny_files.config, path, verbose=False)
    assert str(tiny_files.config) in str(error.value) and "mis-shaped" in str(error.value)


def test_only_one_path_is_refused(tiny_files: TinyFiles) -> None:
    with pytest.raises(ModelLoadError, match="Only --config_path was given; pass --ckpt_path"):
        load_model(tiny_files.config, None, verbose=False)
    with pytest.raises(ModelLoadError, match="Only --ckpt_path was given; pass --config_path"):
        load_model(None, tiny_files.ckpt, verbose=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(tiny_files: TinyFiles) -> None:
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ModelLoadError, match=f"Device '{device}' was requested but CUDA is not available") as error:
            resolve_device(device)
        assert "cpu" in str(error.value)
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model(tiny_files.config, tiny_files.safetensors, device="cuda", verbose=False)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="Unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.backends.mps.is_available():
        with pytest.raises(ModelLoadError, match="MPS is not available"):
            resolve_device("mps")


def test_toy_default_announces_itself_and_names_the_rebuild_script(
    tiny_files: TinyFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(loading, "TOY_CONFIG", tiny_files.config)
    monkeypatch.setattr(loading, "TOY_CKPT", tmp_path / "models" / "toy" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="python train-scripts/train-toy.py") as error:
        load_model()
    assert "model.safetensors is missing" in str(error.value)
    assert capsys.readouterr().out.splitlines()[0] == loading.TOY_NOTICE

    monkeypatch.setattr(loading, "TOY_CKPT", tiny_files.safetensors)
    model = load_model()
    assert capsys.readouterr().out.splitlines()[0] == loading.TOY_NOTICE
    assert_same_state(model, tiny_files.state)


def test_command_line_flags(tiny_files: TinyFiles) -> None:
    parser = add_model_arguments(argparse.ArgumentParser())
    assert "toy" in parser.format_help()
    args = parser.parse_args(["--config_path", str(tiny_files.config), "--ckpt_path", str(tiny_files.ckpt)])
    assert (args.device, args.use_ema) == ("cpu", False)
    assert_same_state(load_model_from_args(args, verbose=False), tiny_files.state)


def test_fingerprints_follow_the_weights_they_cover(tiny_model: nn.Module) -> None:
    text_before, model_before = text_encoder_fingerprint(tiny_model), model_fingerprint(tiny_model)
    assert len(text_before) == len(model_before) == 16
    attention = tiny_model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2
    with torch.no_grad():
        tiny_model.model.diffusion_model.out[2].weight.add_(1.0)  # not an attn2 to_k/to_v weight
    assert model_fingerprint(tiny_model) == model_before
    with torch.no_grad():
        attention.to_v.weight[0, 0] += 1e-3
    assert model_fingerprint(tiny_model) != model_before
    assert text_encoder_fingerprint(tiny_model) == text_before
    attention.to_k.add_increment("probe", torch.eye(attention.to_k.in_features)[:2])
    attention.to_k.merge()
    with pytest.raises(ModelLoadError, match="merged increments"):
        model_fingerprint(tiny_model)


def test_repo_relative_text_encoder_directory_is_anchored(
    tiny_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The toy config names models/toy/text_encoder relative to the repository, not the cwd."""
    repo = tmp_path / "repo"
    (repo / "models" / "clip").mkdir(parents=True)
    config = tiny_model_config(tiny_clip_dir)
    config.params.cond_stage_config.params.version = "models/clip"
    path = write_config(tmp_path / "relative.yaml", config)
    monkeypatch.setattr(loading, "resource_root", lambda: repo)
    monkeypatch.chdir(tmp_path)
    version = loading.read_config(path).model.params.cond_stage_config.params.version
    assert version == str(repo / "models" / "clip")
