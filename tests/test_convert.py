"""ldm -> diffusers export, checked against diffusers itself as an independent implementation, and its provenance."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, V1_INFERENCE_CONFIG, perturb_zero_init, tiny_model_config
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig
from wide_tiny_model import build_wide_tiny_model, write_wide_tiny_config

from erasure.bases import compute_basis
from erasure.cli import EXIT_BAD_INPUT, run_script
from erasure.convert import PROVENANCE_NAME, ExportError, export_diffusers, to_diffusers_scheduler
from erasure.files import ErasureFileError, atomic_directory
from erasure.increments import Increment, compose, cross_attention_kv, slugify
from erasure.errors import ModelLoadError
from erasure.loading import load_model, model_fingerprint
from erasure.weight_differences import WeightDifference
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.encoders import modules as encoder_modules
from ldm.util import instantiate_from_config

PROMPT = "a painting of the sea"
STEPS = 10
GUIDANCE = 7.5
LATENT_SHAPE = (4, 8, 8)  # tiny-sd.yaml: 4 latent channels, image_size 8; the VAE doubles it
TOY_LATENT_SHAPE = (12, 8, 8)  # toy-ldm.yaml's 12 pixel-unshuffled channels, a smaller side
TOY_CONFIG = REPO_ROOT / "configs" / "toy" / "toy-ldm.yaml"
TOLERANCE = 1e-4


def save_model(model_config, folder: Path) -> list[str]:
    """Write ``model.yaml`` + ``model.safetensors`` of a freshly built model; returns the loader flags."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = instantiate_from_config(model_config)
    perturb_zero_init(model, seed=0)
    OmegaConf.save(OmegaConf.create({"model": model_config}), folder / "model.yaml")
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, folder / "model.safetensors")
    return ["--config_path", str(folder / "model.yaml"), "--ckpt_path", str(folder / "model.safetensors")]


def save_and_load(model_config, folder: Path) -> nn.Module:
    """A fresh model, loaded through the one loader (which records the config the export reads)."""
    save_model(model_config, folder)
    return load_model(folder / "model.yaml", folder / "model.safetensors", verbose=False)


@pytest.fixture(scope="module")
def tiny_flags(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> list[str]:
    return save_model(tiny_model_config(tiny_clip_dir), tmp_path_factory.mktemp("tiny_ldm"))


@pytest.fixture(scope="module")
def tiny_ldm(tiny_flags: list[str]) -> nn.Module:
    return load_model(tiny_flags[1], tiny_flags[3], verbose=False)


@pytest.fixture(scope="module")
def exported_pipeline(tmp_path_factory: pytest.TempPathFactory, tiny_ldm: nn.Module) -> Path:
    return export_diffusers(tiny_ldm, tmp_path_factory.mktemp("export") / "pipeline")


def initial_latents() -> torch.Tensor:
    return torch.randn((1, *LATENT_SHAPE), generator=torch.Generator().manual_seed(0))


def test_full_export_layout_and_scheduler(exported_pipeline: Path, tiny_ldm: nn.Module) -> None:
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (exported_pipeline / part).is_dir(), part
    index = json.loads((exported_pipeline / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    scheduler = json.loads((exported_pipeline / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler"
    assert (scheduler["beta_schedule"], scheduler["beta_start"], scheduler["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    assert (scheduler["num_train_timesteps"], scheduler["steps_offset"]) == (1000, 1)
    assert scheduler["clip_sample"] is False and scheduler["set_alpha_to_one"] is False
    vae = json.loads((exported_pipeline / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == pytest.approx(float(tiny_ldm.scale_factor))


def test_pipeline_matches_our_ddim_sampler(exported_pipeline: Path, tiny_ldm: nn.Module) -> None:
    pipeline = StableDiffusionPipeline.from_pretrained(exported_pipeline, safety_checker=None, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.scheduler.init_noise_sigma == 1.0  # so the pipeline uses our latents as they are
    size = LATENT_SHAPE[1] * pipeline.vae_scale_factor
    call = dict(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=size, width=size)
    with torch.no_grad():
        theirs_latents = pipeline(**call, latents=initial_latents(), output_type="latent").images
        theirs_images = pipeline(**call, latents=initial_latents(), output_type="pt").images
        sampler = DDIMSampler(tiny_ldm)
        ours_latents, _ = sampler.sample(
            S=STEPS,
            batch_size=1,
            shape=LATENT_SHAPE,
            conditioning=tiny_ldm.get_learned_conditioning([PROMPT]),
            unconditional_guidance_scale=GUIDANCE,
            unconditional_conditioning=tiny_ldm.get_learned_conditioning([""]),
            x_T=initial_latents(),
        )
        ours_images = ((tiny_ldm.decode_first_stage(ours_latents) + 1) / 2).clamp(0, 1)
    latent_scale = ours_latents.abs().max().item()
    relative_latent_gap = (theirs_latents - ours_latents).abs().max().item() / latent_scale
    image_gap = (theirs_images - ours_images).abs().max().item()
    assert latent_scale > 0.1 and ours_images.std() > 1e-3  # a non-trivial output
    assert relative_latent_gap < TOLERANCE, relative_latent_gap  # measured 1.2e-6 (|z| up to 28)
    assert image_gap < TOLERANCE, image_gap  # measured 1.1e-6


def unet_from_folder(folder: Path) -> UNet2DConditionModel:
    """The UNet as diffusers loads the folder (``from_pretrained``), checked against a strict
    load of the same files by hand, so that nothing is silently skipped or re-initialised."""
    files = sorted(path.name for path in folder.iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors", PROVENANCE_NAME]
    config = {
        key: value
        for key, value in json.loads((folder / "config.json").read_text()).items()
        if not key.startswith("_")
    }
    by_hand = UNet2DConditionModel(**config)
    incompatible = by_hand.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), strict=False)
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    unet = UNet2DConditionModel.from_pretrained(folder, local_files_only=True)
    loaded = unet.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in by_hand.state_dict().items())
    return unet.eval()


def provenance(folder: Path) -> dict:
    return json.loads((folder / PROVENANCE_NAME).read_text())


def unet_gap(
    unet: UNet2DConditionModel,
    model: nn.Module,
    shape: tuple[int, ...] = LATENT_SHAPE,
    context: torch.Tensor | None = None,
) -> float:
    """Largest difference of the two UNets' outputs on two inputs (conditioned on PROMPT and "" unless ``context``)."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn((2, *shape), generator=generator)
    timesteps = torch.tensor([10, 700])
    with torch.no_grad():
        if context is None:
            context = model.get_learned_conditioning([PROMPT, ""])
        theirs = unet(latents, timesteps, encoder_hidden_states=context).sample
        ours = model.apply_model(latents, timesteps, context)
    return (theirs - ours).abs().max().item()


def test_unet_only_export_is_a_from_pretrained_folder(tiny_ldm: nn.Module, tmp_path: Path) -> None:
    folder = export_diffusers(tiny_ldm, tmp_path / "unet", unet_only=True)
    assert unet_gap(unet_from_folder(folder), tiny_ldm) < TOLERANCE  # measured 7.8e-7
    record = provenance(folder)
    assert record["base_model_fingerprint"] == model_fingerprint(tiny_ldm)
    assert record["edits"] == [] and record["folded_increments"] == []
    assert record["export"] == {"format": "UNet2DConditionModel", "unet_only": True, "dtype": "float32"}
    assert {"torch", "transformers", "safetensors", "diffusers"} <= set(record["versions"])


def test_full_export_carries_provenance(exported_pipeline: Path, tiny_ldm: nn.Module) -> None:
    record = provenance(exported_pipeline)
    assert record["base_model_fingerprint"] == model_fingerprint(tiny_ldm)
    assert record["export"] == {"format": "StableDiffusionPipeline", "unet_only": False, "dtype": "float32"}


def test_a_file_name_target_is_refused(tiny_ldm: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="looks like a file name.*unet"):
        export_diffusers(tiny_ldm, tmp_path / "unet.safetensors", unet_only=True)
    assert list(tmp_path.iterdir()) == []


def test_active_increments_are_folded_into_the_export(tiny_clip_dir: Path, tmp_path: Path) -> None:
    model = save_and_load(tiny_model_config(tiny_clip_dir), tmp_path / "model")
    to_k = model.model.diffusion_model.middle_block[1].transformer_blocks[0].attn2.to_k
    basis = torch.eye(to_k.in_features)[:3]
    coeff = torch.randn(to_k.out_features, 3, generator=torch.Generator().manual_seed(2))
    to_k.add_increment("probe", basis, beta=1.0, coeff=coeff)
    unet = unet_from_folder(export_diffusers(model, tmp_path / "with-increment", unet_only=True))
    assert unet_gap(unet, model) < TOLERANCE
    to_k.set_active([])
    assert unet_gap(unet, model) > 1e-3
    assert provenance(tmp_path / "with-increment")["folded_increments"] == ["probe"]
    to_k.merge()
    with pytest.raises(ExportError, match="merged increments.*unmerge them first"):
        export_diffusers(model, tmp_path / "merged", unet_only=True)


def test_existing_target_is_refused_unless_overwrite(tiny_ldm: nn.Module, tmp_path: Path) -> None:
    target = tmp_path / "unet"
    target.mkdir()
    (target / "old.txt").write_text("keep me")
    with pytest.raises(ErasureFileError, match="--overwrite"):
        export_diffusers(tiny_ldm, target, unet_only=True)
    assert (target / "old.txt").read_text() == "keep me"
    export_diffusers(tiny_ldm, target, unet_only=True, overwrite=True)
    assert not (target / "old.txt").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["unet"]  # no staging leftovers


def test_a_failed_export_leaves_the_old_folder_and_no_leftovers(
    tiny_ldm: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "unet"
    target.mkdir()
    (target / "old.txt").write_text("keep me")

    def fail(*args, **kwargs) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(UNet2DConditionModel, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):  # the real error, not one from the cleanup
        export_diffusers(tiny_ldm, target, unet_only=True, overwrite=True)
    assert sorted(path.name for path in target.iterdir()) == ["old.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["unet"]


def test_atomic_directory_appears_only_complete(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_directory(target) as folder:
        (folder / "a.txt").write_text("a")
        assert not target.exists()  # nothing under the final name while the block runs
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"] and (target / "a.txt").exists()
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target, overwrite=True) as folder:
            (folder / "b.txt").write_text("b")
            raise RuntimeError("boom")
    assert sorted(path.name for path in target.iterdir()) == ["a.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ErasureFileError, match="is a file; pass a folder name"):
        with atomic_directory(tmp_path / "file", overwrite=True):
            pass
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file", "out"]


def toy_layout_config(clip_dir: Path):
    """configs/toy/toy-ldm.yaml (pixel-unshuffle first stage, v-prediction, cosine schedule,
    num_head_channels) with the tiny text encoder and a smaller latent."""
    toy = OmegaConf.load(TOY_CONFIG).model
    config = tiny_model_config(clip_dir)
    for key in ("parameterization", "beta_schedule", "channels", "scale_factor", "first_stage_config", "unet_config"):
        config.params[key] = toy.params[key]
    config.params.image_size = TOY_LATENT_SHAPE[1]
    config.params.unet_config.params.context_dim = 32
    return config


def test_toy_layout_exports_the_unet_only(tiny_clip_dir: Path, tmp_path: Path) -> None:
    model = save_and_load(toy_layout_config(tiny_clip_dir), tmp_path / "toy")
    with pytest.raises(ExportError, match="PixelUnshuffleFirstStage. Export the UNet alone with --unet_only"):
        export_diffusers(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    unet = unet_from_folder(export_diffusers(model, tmp_path / "unet", unet_only=True))
    assert unet.config.down_block_types[0] == "DownBlock2D"  # toy: no attention at full resolution
    assert unet_gap(unet, model, TOY_LATENT_SHAPE) < TOLERANCE
    scheduler = to_diffusers_scheduler(model)  # cosine betas are passed as trained_betas
    assert scheduler.config.prediction_type == "v_prediction"
    assert torch.allclose(scheduler.alphas_cumprod, model.alphas_cumprod, atol=1e-6)


def load_script():
    spec = importlib.util.spec_from_file_location("convert_script", REPO_ROOT / "eval-scripts" / "convert-to-diffusers.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_script_exports_and_refuses_an_existing_target(
    tiny_flags: list[str], tiny_ldm: nn.Module, tmp_path: Path
) -> None:
    script = load_script()
    argv = [*tiny_flags, "--dump_path", str(tmp_path / "out"), "--unet_only"]
    assert unet_gap(unet_from_folder(script.main(argv)), tiny_ldm) < TOLERANCE
    with pytest.raises(ErasureFileError, match="--overwrite"):
        script.main(argv)


def wide_model_files(tmp_path: Path) -> tuple[nn.Module, list[str], Path]:
    """The wide tiny model (room for a null space), its loader flags and one SepCE increment file."""
    config_path = write_wide_tiny_config(tmp_path)
    model = build_wide_tiny_model(config_path)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, tmp_path / "wide.safetensors")
    flags = ["--config_path", str(config_path), "--ckpt_path", str(tmp_path / "wide.safetensors")]
    basis = compute_basis(model, "van gogh")
    generator = torch.Generator().manual_seed(3)
    coeffs = {
        name: 300.0 * torch.randn(layer.out_features, basis.dims, generator=generator)
        for name, layer in cross_attention_kv(model).items()
    }
    metadata = {"method": "test", "base_model_fingerprint": model_fingerprint(model)}
    increment = Increment(basis.concept, slugify(basis.concept), basis, 1e-4, coeffs, metadata)
    return model, flags, increment.save(tmp_path / "van-gogh.safetensors")


def test_script_applies_increment_files_and_records_them(tmp_path: Path) -> None:
    """``--apply``: a SepCE increment file is composed and folded into the exported UNet, and
    the provenance names the base model and the file as applied."""
    model, flags, increment_file = wide_model_files(tmp_path)
    argv = [*flags, "--dump_path", str(tmp_path / "out"), "--unet_only", "--apply", str(increment_file)]
    exported = load_script().main(argv)
    unet = unet_from_folder(exported)
    erased = load_model(flags[1], flags[3], verbose=False)
    compose(erased, [Increment.load(increment_file)])
    latents, timesteps = initial_latents(), torch.tensor([500])
    with torch.no_grad():
        context = erased.get_learned_conditioning(["van gogh"])
        theirs = unet(latents, timesteps, encoder_hidden_states=context).sample
        assert (theirs - erased.apply_model(latents, timesteps, context)).abs().max() < TOLERANCE
        assert (theirs - model.apply_model(latents, timesteps, context)).abs().max() > 1e-3
    record = provenance(exported)
    assert record["base_model_fingerprint"] == model_fingerprint(model)
    [edit] = record["edits"]
    assert (edit["kind"], edit["concept"], edit["name"]) == ("increment", "van gogh", "van_gogh")
    assert edit["path"] == str(increment_file.resolve())
    assert edit["sha256"] == hashlib.sha256(increment_file.read_bytes()).hexdigest()
    assert edit["base_model_fingerprint"] == model_fingerprint(model)
    assert edit["metadata"] == Increment.load(increment_file).metadata
    assert record["folded_increments"] == ["van_gogh"]


def test_export_applies_edits_of_both_kinds_and_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    """The fingerprint recorded is the model's before the edits, though a weight difference changes it."""
    _, flags, increment_file = wide_model_files(tmp_path)
    model = load_model(flags[1], flags[3], verbose=False)
    base = model_fingerprint(model)
    key = next(k for k in model.state_dict() if k.endswith("attn2.to_v.weight"))
    delta = torch.full_like(model.state_dict()[key], 1e-2)
    difference_file = WeightDifference("esd", "picasso", {key: delta}, {"base_model_fingerprint": base}).save(
        tmp_path / "picasso.safetensors"
    )
    before = {name: value.clone() for name, value in model.state_dict().items()}
    edits = [Increment.load(increment_file), WeightDifference.load(difference_file)]
    folder = export_diffusers(model, tmp_path / "both", unet_only=True, edits=edits)
    record = provenance(folder)
    assert record["base_model_fingerprint"] == base
    kinds = [(edit["kind"], edit["concept"]) for edit in record["edits"]]
    assert kinds == [("increment", "van gogh"), ("weight_difference", "picasso")]
    assert record["edits"][1]["path"] == str(difference_file.resolve()) and record["edits"][1]["method"] == "esd"
    assert record["folded_increments"] == ["van_gogh"]
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.allclose(after[k], before[k], atol=1e-6) for k in before)
    assert unet_gap(unet_from_folder(folder), model) > 1e-3  # the export differs from the model left behind


def narrow_v1_config(clip_dir: Path):
    """configs/stable-diffusion/v1-inference.yaml with every width cut down, layout unchanged."""
    config = OmegaConf.load(V1_INFERENCE_CONFIG).model
    config.params.image_size = LATENT_SHAPE[1]
    config.params.unet_config.params.model_channels = 32
    config.params.unet_config.params.context_dim = 32
    config.params.first_stage_config.params.ddconfig.ch = 32
    config.params.cond_stage_config.params = {"version": str(clip_dir), "max_length": 16}
    return config


def test_sd_v1_layout_exports_part_by_part(tiny_clip_dir: Path, tmp_path: Path) -> None:
    """Four levels, two res blocks, attention at [4, 2, 1]: the mapping SD v1.4 itself needs."""
    model = save_and_load(narrow_v1_config(tiny_clip_dir), tmp_path / "v1")
    pipeline = StableDiffusionPipeline.from_pretrained(
        export_diffusers(model, tmp_path / "v1-diffusers"), safety_checker=None, local_files_only=True
    )
    assert pipeline.unet.config.down_block_types[-1] == "DownBlock2D" and pipeline.unet.config.layers_per_block == 2
    assert unet_gap(pipeline.unet, model) < TOLERANCE
    latents = initial_latents()
    tokens = pipeline.tokenizer([PROMPT], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs_image = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor).sample
        theirs_text = pipeline.text_encoder(tokens)[0]
        assert (theirs_image - model.decode_first_stage(latents)).abs().max() < TOLERANCE
        assert (theirs_text - model.get_learned_conditioning([PROMPT])).abs().max() < TOLERANCE


# --------------------------------------------------------------------------- without the Hugging Face Hub
HUB_ONLY_CLIP = "test-owner/tiny-clip"  # a Hub name no cache holds; its architecture is made known below
TEXT_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


@pytest.fixture
def hub_only_flags(tiny_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Loader flags of a tiny model whose text encoder is a Hub name, with the Hub switched off.

    ldm knows the text model's architecture (as it knows SD v1's CLIP ViT-L/14), so only the
    tokenizer would need the Hub, like SD v1.4 on a machine that never downloaded its tokenizer.
    """
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("transformers.utils.hub._is_offline_mode", True)
    known = CLIPTextConfig.from_pretrained(tiny_clip_dir).to_dict()
    architecture = {key: known[key] for key in TEXT_CONFIG_KEYS}
    monkeypatch.setitem(encoder_modules._KNOWN_TEXT_CONFIGS, HUB_ONLY_CLIP, architecture)
    config = tiny_model_config(tiny_clip_dir)
    config.params.cond_stage_config.params.version = HUB_ONLY_CLIP
    return save_model(config, tmp_path / "hub_only")


def test_unet_only_export_needs_no_tokenizer(hub_only_flags: list[str], tmp_path: Path) -> None:
    exported = load_script().main([*hub_only_flags, "--dump_path", str(tmp_path / "unet"), "--unet_only"])
    model = load_model(hub_only_flags[1], hub_only_flags[3], verbose=False, needs_tokenizer=False)
    context = torch.randn((2, 16, 32), generator=torch.Generator().manual_seed(2))  # a prompt would need the tokenizer
    assert unet_gap(unet_from_folder(exported), model, context=context) < TOLERANCE


def test_a_tokenizer_out_of_reach_is_one_short_error_naming_the_config_key(
    hub_only_flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_script(lambda: load_script().main([*hub_only_flags, "--dump_path", str(tmp_path / "full")]))
    assert exit_info.value.code == EXIT_BAD_INPUT
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"tokenizer '{HUB_ONLY_CLIP}' (cond_stage_config.params.version in {hub_only_flags[1]})" in lines[0]
    assert "--local-dir" in lines[0] and "--unet_only" in lines[0]
    assert not (tmp_path / "full").exists()

    model = load_model(hub_only_flags[1], hub_only_flags[3], verbose=False, needs_tokenizer=False)
    with pytest.raises(ModelLoadError, match=r"cond_stage_config\.params\.version of the model's config") as error:
        export_diffusers(model, tmp_path / "full")
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no chained traceback


def test_an_unknown_hub_text_encoder_is_one_error_naming_the_config_key(
    hub_only_flags: list[str], tmp_path: Path
) -> None:
    config = OmegaConf.load(hub_only_flags[1])
    config.model.params.cond_stage_config.params.version = "test-owner/unknown-clip"
    OmegaConf.save(config, tmp_path / "unknown.yaml")
    with pytest.raises(ModelLoadError, match=r"'test-owner/unknown-clip' \(cond_stage_config\.params\.version in "):
        load_model(tmp_path / "unknown.yaml", hub_only_flags[3], verbose=False, needs_tokenizer=False)
