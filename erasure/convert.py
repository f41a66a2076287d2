"""Export an ldm LatentDiffusion (with its edits folded in) to diffusers, with a provenance record.

A full export is a folder in ``StableDiffusionPipeline.save_pretrained`` layout; a UNet-only
export is a folder in ``UNet2DConditionModel.save_pretrained`` layout (config.json +
diffusion_pytorch_model.safetensors). Both carry ``erasure_provenance.json``: the base model's
fingerprint, the applied edits, the export settings and the library versions.
Key renaming is done by diffusers' own single-file converters, driven by the model's own
config, so the result is checked against an independent implementation: the converted state
dicts must load strictly into the diffusers models, or the export stops.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from omegaconf import DictConfig, OmegaConf
from torch import nn

from erasure.edits import Edit, apply
from erasure.errors import ExportError
from erasure.files import atomic_directory, file_sha256, versions, write_json
from erasure.increments import INCREMENT_KIND, Increment
from erasure.loading import model_fingerprint, text_encoder_tokenizer
from erasure.weight_differences import WEIGHT_DIFFERENCE_KIND
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.modules.incremental_linear import incremental_linears

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
#: CompVis ``make_beta_schedule`` names -> diffusers ``beta_schedule`` names of the same betas.
BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}
#: CompVis DDPM defaults, used when a config leaves the schedule out.
DEFAULT_SCHEDULE = {"linear_start": 1e-4, "linear_end": 2e-2, "beta_schedule": "linear"}
ALPHAS_CUMPROD_TOLERANCE = 1e-5
PROVENANCE_NAME = "erasure_provenance.json"
PROVENANCE_VERSION = "1"
#: Suffixes that mark an output path as a file name; the export always writes a folder.
FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")


def _model_config(model: nn.Module) -> DictConfig:
    config = getattr(model, "ldm_config", None)
    if config is None:
        raise ExportError(
            "The model carries no ldm config (model.ldm_config); load it with "
            "erasure.loading.load_model so that the export can read its architecture."
        )
    return config


def effective_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every active, unmerged increment folded into its weight.

    Increment coefficients are dropped from the result, so the keys are those of the plain
    CompVis model and any exporter sees the weights the module actually computes with.
    """
    state = {key: value.detach() for key, value in module.state_dict().items()}
    for name, linear in incremental_linears(module).items():
        prefix = f"{name}." if name else ""
        for key in [key for key in state if key.startswith(prefix)]:
            if key not in (f"{prefix}weight", f"{prefix}bias"):
                del state[key]
        if not linear.merged and linear.active_names:
            state[f"{prefix}weight"] = (linear.weight + linear.delta_weight(linear.active_names)).detach()
    return state


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{key}": value for key, value in state.items()}


def _load_strictly(target: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load a converted state dict; a key the converter missed means the export would be wrong."""
    try:
        incompatible = target.load_state_dict(state, strict=False)
    except RuntimeError as error:  # mis-shaped tensors
        raise ExportError(
            f"diffusers' converter produced tensors of the wrong shape for this {what} "
            f"({str(error)[:300]}); its architecture has no diffusers equivalent."
        ) from error
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise ExportError(
            f"diffusers' converter could not map this {what}: missing "
            f"{incompatible.missing_keys[:5]}, unexpected {incompatible.unexpected_keys[:5]}. "
            f"Its architecture has no diffusers equivalent; export is not possible."
        )


def diffusers_unet_config(model: nn.Module) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config of the model's UNet, from its ldm config."""
    unet_params = OmegaConf.to_container(_model_config(model).model.params.unet_config.params, resolve=True)
    # diffusers reads the VAE's ch_mult only to turn a pixel image size into the latent
    # sample_size; sample_size is set from the model's latent size below, so a neutral
    # factor lets the same converter serve first stages that are not KL autoencoders.
    converter_view = {
        "model": {
            "params": {
                "unet_config": {"params": unet_params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1]}}},
            }
        }
    }
    config = create_unet_diffusers_config_from_ldm(converter_view, checkpoint={})
    config["sample_size"] = int(model.image_size)
    head_channels = unet_params.get("num_head_channels", -1)
    if head_channels != -1:
        # CompVis then derives the head count per level; diffusers' "attention_head_dim"
        # is in fact that head count.
        config["attention_head_dim"] = [width // head_channels for width in config["block_out_channels"]]
    return config


def to_diffusers_unet(model: nn.Module) -> UNet2DConditionModel:
    """The model's UNet (increments folded in) as a diffusers ``UNet2DConditionModel``."""
    config = diffusers_unet_config(model)
    ldm_state = _prefixed(UNET_PREFIX, effective_state_dict(model.model.diffusion_model))
    unet = UNet2DConditionModel(**config)
    _load_strictly(unet, convert_ldm_unet_checkpoint(ldm_state, config), "UNet")
    return unet.to(next(model.parameters()).dtype)


def to_diffusers_vae(model: nn.Module) -> DiffusersAutoencoderKL:
    """The model's first stage as a diffusers ``AutoencoderKL`` with the model's scale factor."""
    first_stage = model.first_stage_model
    if not isinstance(first_stage, AutoencoderKL):
        raise ExportError(
            f"A full diffusers export needs an AutoencoderKL first stage; this model's is "
            f"{type(first_stage).__name__}. Export the UNet alone with --unet_only "
            f"(unet_only=True)."
        )
    config = _model_config(model)
    ddconfig = config.model.params.first_stage_config.params.ddconfig
    embed_dim = config.model.params.first_stage_config.params.embed_dim
    attention_levels = list(ddconfig.get("attn_resolutions", []))
    double_z = ddconfig.get("double_z", True)
    if attention_levels or not double_z or embed_dim != ddconfig.z_channels:
        raise ExportError(
            "diffusers' AutoencoderKL needs attn_resolutions [], double_z true and embed_dim == "
            f"z_channels; this VAE has {attention_levels}, {double_z}, {embed_dim} vs "
            f"{ddconfig.z_channels}. Use --unet_only."
        )
    vae_config = create_vae_diffusers_config_from_ldm(
        OmegaConf.to_container(config, resolve=True), checkpoint={}, scaling_factor=float(model.scale_factor)
    )
    vae_config["sample_size"] = int(model.image_size) * 2 ** (len(ddconfig.ch_mult) - 1)
    vae = DiffusersAutoencoderKL(**vae_config)
    ldm_state = _prefixed(VAE_PREFIX, effective_state_dict(first_stage))
    _load_strictly(vae, convert_ldm_vae_checkpoint(ldm_state, vae_config), "VAE")
    return vae.to(next(first_stage.parameters()).dtype)


def to_diffusers_scheduler(model: nn.Module) -> DDIMScheduler:
    """A DDIMScheduler with the model's training schedule, in the SD v1 sampling settings."""
    params = _model_config(model).model.params
    schedule = {key: params.get(key, default) for key, default in DEFAULT_SCHEDULE.items()}
    if model.parameterization not in PREDICTION_TYPES:
        raise ExportError(
            f"diffusers has no prediction type for parameterization {model.parameterization!r}; "
            f"only {sorted(PREDICTION_TYPES)} can be exported."
        )
    schedule_settings: dict[str, Any] = (
        {"beta_schedule": BETA_SCHEDULES[schedule["beta_schedule"]]}
        if schedule["beta_schedule"] in BETA_SCHEDULES
        else {"trained_betas": model.betas.detach().cpu().double().numpy()}
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=int(model.num_timesteps),
        beta_start=float(schedule["linear_start"]),
        beta_end=float(schedule["linear_end"]),
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=PREDICTION_TYPES[model.parameterization],
        **schedule_settings,
    )
    gap = (scheduler.alphas_cumprod - model.alphas_cumprod.detach().cpu().float()).abs().max().item()
    if gap > ALPHAS_CUMPROD_TOLERANCE:
        raise ExportError(
            f"The exported scheduler's alphas_cumprod differ from the model's by {gap:.2e}; the "
            f"config's schedule ({schedule}) does not match the model's buffers."
        )
    return scheduler


def to_diffusers_pipeline(model: nn.Module) -> StableDiffusionPipeline:
    """The whole model as a StableDiffusionPipeline (no safety checker, no feature extractor)."""
    vae = to_diffusers_vae(model)
    text_encoder = model.cond_stage_model
    if not isinstance(text_encoder, FrozenCLIPEmbedder):
        raise ExportError(
            f"A full diffusers export needs a FrozenCLIPEmbedder text encoder; this model's is "
            f"{type(text_encoder).__name__}. Use --unet_only."
        )
    tokenizer = text_encoder_tokenizer(model)
    if tokenizer.model_max_length != text_encoder.max_length:
        raise ExportError(
            f"The tokenizer pads to {tokenizer.model_max_length} tokens but the text encoder to "
            f"{text_encoder.max_length}; diffusers would compute other embeddings. Set the "
            f"tokenizer's model_max_length to {text_encoder.max_length} in its tokenizer_config.json."
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.transformer,
        tokenizer=tokenizer,
        unet=to_diffusers_unet(model),
        scheduler=to_diffusers_scheduler(model),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _edit_record(edit: Edit) -> dict[str, Any]:
    """What the provenance says about one applied edit: its file (path and sha256), what it
    erases, and the fingerprints and metadata recorded in its own header."""
    source = None if edit.source is None else Path(edit.source).resolve()
    record: dict[str, Any] = {
        "path": None if source is None else str(source),
        "sha256": None if source is None else file_sha256(source),
    }
    if isinstance(edit, Increment):
        return {
            **record,
            "kind": INCREMENT_KIND,
            "concept": edit.concept,
            "name": edit.name,
            "beta": edit.beta,
            "basis_dims": edit.basis.dims,
            "base_model_fingerprint": edit.base_model_fingerprint,
            "text_encoder_fingerprint": edit.basis.text_encoder_fingerprint,
            "metadata": edit.metadata,
        }
    return {
        **record,
        "kind": WEIGHT_DIFFERENCE_KIND,
        "concept": edit.concept,
        "method": edit.method,
        "tensors": len(edit.deltas),
        "base_model_fingerprint": edit.metadata.get("base_model_fingerprint"),
        "metadata": edit.metadata,
    }


def _applied(model: nn.Module, edits: Sequence[Edit]) -> AbstractContextManager[object]:
    """``erasure.edits.apply`` as a context manager (nothing to apply: a no-op one)."""
    return apply(model, list(edits)) if edits else nullcontext()


def export_provenance(
    model: nn.Module,
    base_model_fingerprint: str,
    edits: Sequence[Edit],
    unet_only: bool,
) -> dict[str, Any]:
    """The ``erasure_provenance.json`` record of an export of ``model`` as it computes now.

    ``folded_increments`` names every active increment folded into the weights (the applied
    edits' and any the caller attached beforehand), so a reader sees which concepts the
    exported weights erase even though the diffusers files keep no increments.
    """
    active = {name for layer in incremental_linears(model).values() for name in layer.active_names}
    return {
        "format_version": PROVENANCE_VERSION,
        "base_model_fingerprint": base_model_fingerprint,
        "edits": [_edit_record(edit) for edit in edits],
        "folded_increments": sorted(active),
        "export": {
            "format": "UNet2DConditionModel" if unet_only else "StableDiffusionPipeline",
            "unet_only": unet_only,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        },
        "versions": {**versions(), "diffusers": diffusers.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def export_diffusers(
    model: nn.Module,
    out_dir: str | Path,
    unet_only: bool = False,
    overwrite: bool = False,
    edits: Sequence[Edit] = (),
) -> Path:
    """Write ``model`` (a loaded ldm LatentDiffusion) with ``edits`` folded in to the folder ``out_dir``.

    Full export: a ``StableDiffusionPipeline.from_pretrained`` folder. ``unet_only``: a
    ``UNet2DConditionModel.from_pretrained`` folder (config.json + weights). Both also hold
    ``erasure_provenance.json`` (``export_provenance``), because diffusers files cannot say
    which concepts their weights erase.

    ``edits`` (increments and weight differences, e.g. from ``erasure.edits.load_edit``) are
    checked against the model, applied for the export and removed after it (``erasure.edits``),
    so the model is left as it was. Pass edits here rather than applying them first: the
    provenance's ``base_model_fingerprint`` is the model's before the edits, and a weight
    difference added beforehand would change it unrecorded. Increments already attached and
    active are folded in and named in the provenance too. An existing ``out_dir`` is refused
    unless ``overwrite``; the folder appears only complete (``erasure.files.atomic_directory``).
    """
    target = Path(out_dir)
    if target.suffix in FILE_SUFFIXES:
        raise ExportError(
            f"Output path {target} looks like a file name, but the export is a folder (diffusers "
            f"from_pretrained layout); pass a folder name such as {target.with_suffix('')}."
        )
    merged = [name for name, layer in incremental_linears(model).items() if layer.merged]
    if merged:
        raise ExportError(
            f"Layers {merged[:3]} hold merged increments, which hide the base model's fingerprint; "
            f"unmerge them first (the export folds active increments in by itself)."
        )
    base_model_fingerprint = model_fingerprint(model)
    with atomic_directory(target, overwrite) as folder, _applied(model, edits):
        exported: UNet2DConditionModel | StableDiffusionPipeline = (
            to_diffusers_unet(model) if unet_only else to_diffusers_pipeline(model)
        )
        exported.save_pretrained(folder, safe_serialization=True)
        write_json(export_provenance(model, base_model_fingerprint, edits, unet_only), folder / PROVENANCE_NAME)
    return target
