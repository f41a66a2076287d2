"""The one loader every script uses: config + checkpoint -> a frozen LatentDiffusion.

Also the embedded toy default, device resolution, the shared command-line flags and the
fingerprints that tie increment files to the base model they were trained on.

Loading is strict about the parts that matter: a checkpoint that lacks (or mis-shapes) any
UNet, VAE or text-encoder weight is refused with one error that names the file, the first
few keys and the fix. Only keys known to be harmless are tolerated: EMA copies when EMA is
not used (counted when verbose), CLIP's ``position_ids`` buffer, and noise-schedule buffers,
which the config recomputes when a file lacks them. Any other key the model does not know is
warned about; ``load_state_dict(strict=False)`` is never used without checking its result.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import load_file as load_safetensors
from torch import nn

from erasure.errors import ModelLoadError
from erasure.resources import require_toy_file, resource_root, toy_config_path, toy_model_dir
from ldm.util import instantiate_from_config

if TYPE_CHECKING:
    from ldm.models.diffusion.ddpm import LatentDiffusion

TOY_CONFIG = toy_config_path()
TOY_CKPT = toy_model_dir() / "model.safetensors"
TOY_NOTICE = "Using the embedded toy model (models/toy/); pass --config_path/--ckpt_path for SD v1.4"
TOY_REBUILD_COMMAND = "python train-scripts/train-toy.py"

#: State-dict prefixes of the three networks a LatentDiffusion cannot work without.
REQUIRED_PARTS = {
    "model.diffusion_model.": "UNet",
    "first_stage_model.": "VAE",
    "cond_stage_model.": "text-encoder",
}
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING_KEYS = frozenset({"model_ema.decay", "model_ema.num_updates"})
#: Buffers derived from the config's noise schedule (CompVis DDPM.register_schedule).
SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "lvlb_weights",
        "logvar",
        "scale_factor",
    }
)
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
#: Above this share of broken required weights the file is for another architecture.
ARCHITECTURE_MISMATCH_SHARE = 0.25
KEYS_SHOWN = 5


def resolve_device(device: str) -> torch.device:
    """Turn a device string into a ``torch.device`` that exists on this machine, or fail clearly."""
    available = ["cpu"]
    if torch.cuda.is_available():
        available += ["cuda"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        available.append("mps")
    choices = ", ".join(available)
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ModelLoadError(
            f"Unknown device {device!r} ({error}); use one of: {choices}."
        ) from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"Device {device!r} was requested but CUDA is not available on this machine; "
                f"use one of: {choices} (e.g. --device cpu)."
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"Device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                f"CUDA device(s); use one of: {choices}."
            )
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise ModelLoadError(
                f"Device {device!r} was requested but MPS is not available on this machine; "
                f"use one of: {choices}."
            )
    elif resolved.type != "cpu":
        raise ModelLoadError(f"Unsupported device {device!r}; use one of: {choices}.")
    return resolved


def _resolve_paths(
    config_path: str | Path | None, ckpt_path: str | Path | None, verbose: bool
) -> tuple[Path, Path]:
    """Pick the user's pair of files, or the embedded toy pair when neither is given."""
    if config_path is None and ckpt_path is None:
        if verbose:
            print(TOY_NOTICE, flush=True)
        for toy_file in (TOY_CONFIG, TOY_CKPT):
            require_toy_file(toy_file)
        return TOY_CONFIG, TOY_CKPT
    if config_path is None or ckpt_path is None:
        given, missing = (
            ("--ckpt_path", "--config_path") if config_path is None else ("--config_path", "--ckpt_path")
        )
        raise ModelLoadError(
            f"Only {given} was given; pass {missing} as well (e.g. "
            f"configs/stable-diffusion/v1-inference.yaml with sd-v1-4-full-ema.ckpt), "
            f"or neither to use the embedded toy model."
        )
    paths = Path(config_path), Path(ckpt_path)
    for flag, path in zip(("--config_path", "--ckpt_path"), paths):
        if not path.is_file():
            raise FileNotFoundError(f"{flag} {path} does not exist (or is not a file); check the path.")
    return paths


def unet_on_meta(config_path: str | Path | None = None) -> nn.Module:
    """The config's UNet on the ``meta`` device (shapes, no memory, no weights, no text encoder),
    inside the attribute path of a LatentDiffusion (``model.diffusion_model``), so that sizes can be
    measured before the model is loaded. No path: the embedded toy model's config."""
    config = read_config(Path(config_path) if config_path is not None else require_toy_file(TOY_CONFIG))
    holder = nn.Module()
    holder.model = nn.Module()
    with torch.device("meta"):
        holder.model.diffusion_model = instantiate_from_config(config.model.params.unet_config)
    return holder


def read_config(config_path: Path) -> DictConfig:
    """Read an ldm YAML config; every ``ckpt_path`` in it is cleared (weights come from the loader)."""
    try:
        config = OmegaConf.load(config_path)
    except Exception as error:  # yaml, OmegaConf and OS errors all mean "unreadable config"
        raise ModelLoadError(
            f"Cannot parse config {config_path}: {error}. Pass a valid ldm YAML config such as "
            f"configs/stable-diffusion/v1-inference.yaml."
        ) from error
    if not isinstance(config, DictConfig) or "target" not in config.get("model", {}):
        raise ModelLoadError(
            f"Config {config_path} has no `model: target:` section; pass an ldm model config such "
            f"as configs/stable-diffusion/v1-inference.yaml."
        )
    _clear_config_checkpoints(config.model, config_path)
    _anchor_text_encoder_directory(config.model)
    return config


def _config_nodes(node: object) -> Iterable[DictConfig]:
    """Every mapping inside a config tree, depth first."""
    if isinstance(node, DictConfig):
        yield node
        for value in node.values():
            yield from _config_nodes(value)
    elif isinstance(node, ListConfig):
        for value in node:
            yield from _config_nodes(value)


def _clear_config_checkpoints(model_config: DictConfig, config_path: Path) -> None:
    """Set every ``ckpt_path`` in the config to None: weights come only from ``--ckpt_path``."""
    for node in _config_nodes(model_config):
        if node.get("ckpt_path") is not None:
            warnings.warn(
                f"Config {config_path}: ignoring ckpt_path={node.ckpt_path!r}; weights are loaded "
                f"only from the checkpoint passed to the loader.",
                stacklevel=3,
            )
            node.ckpt_path = None


def _anchor_text_encoder_directory(model_config: DictConfig) -> None:
    """Make a text-encoder directory relative to the toy files' root (``models/toy/text_encoder``) absolute.

    Without this, a script started outside the repository root would look the relative path up
    on the Hugging Face Hub instead of reading the local directory.
    """
    params = model_config.get("params", {}).get("cond_stage_config", {})
    params = params.get("params") if isinstance(params, DictConfig) else None
    version = None if params is None else params.get("version")
    if version is None or Path(version).is_absolute() or Path(version).exists():
        return
    root = resource_root()
    if (root / version).is_dir():
        params.version = str(root / version)


def read_checkpoint(ckpt_path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or from a CompVis/Lightning ``.ckpt``/``.pt`` pickle.

    Pickles are opened with ``torch.load(weights_only=False)`` because CompVis checkpoints hold
    Lightning objects next to the weights. Unpickling can run code, so this is done only for
    the file the user named on purpose; prefer ``.safetensors`` for anything shared.
    """
    suffix = ckpt_path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ModelLoadError(
            f"Checkpoint {ckpt_path} has an unknown extension {suffix!r}; expected one of "
            f"{', '.join(CHECKPOINT_SUFFIXES)}."
        )
    try:
        if suffix == ".safetensors":
            payload: object = load_safetensors(str(ckpt_path), device="cpu")
        else:
            payload = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as error:  # every reader failure is explained by _unreadable_checkpoint
        raise _unreadable_checkpoint(ckpt_path, suffix, error) from error
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping) or not payload:
        raise ModelLoadError(
            f"Checkpoint {ckpt_path} holds neither a `state_dict` nor a state dict of tensors; "
            f"pass an ldm checkpoint (e.g. sd-v1-4-full-ema.ckpt)."
        )
    not_tensors = [key for key, value in payload.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ModelLoadError(
            f"Checkpoint {ckpt_path}: entries {not_tensors[:KEYS_SHOWN]} are not tensors; pass a "
            f"state dict of tensors or a Lightning checkpoint with a `state_dict`."
        )
    non_finite = [key for key, value in payload.items()
                  if value.is_floating_point() and not torch.isfinite(value).all()]
    if non_finite:
        raise ModelLoadError(
            f"Checkpoint {ckpt_path}: {len(non_finite)} tensors hold NaN/inf values, e.g. {non_finite[:KEYS_SHOWN]}; "
            f"the model would make black or noise images. Use the original checkpoint, or export it again from "
            f"finite weights."
        )
    return dict(payload)


#: Errors of the pickle and zip readers themselves: the file's bytes are broken.
_DAMAGED_FILE_ERRORS = (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, UnicodeDecodeError)


def _unreadable_checkpoint(ckpt_path: Path, suffix: str, error: Exception) -> ModelLoadError:
    """One message for a checkpoint that could not be read, saying what failed.

    A pickle is a program: reading one imports the classes it names and runs their code. An
    import that fails means the file needs a package this environment lacks; any other error
    raised while unpickling came from code in the file, not from damaged bytes.
    """
    failure = f"{type(error).__name__}: {error}"
    if suffix == ".safetensors":
        return ModelLoadError(
            f"Cannot read checkpoint {ckpt_path} as safetensors ({failure}); the file is truncated or not a "
            f"safetensors file. Download or export it again."
        )
    message = str(error)
    if isinstance(error, _DAMAGED_FILE_ERRORS) or "PytorchStreamReader" in message or "zip archive" in message:
        return ModelLoadError(
            f"Cannot read checkpoint {ckpt_path}: its bytes are damaged ({failure}); the file is truncated or not "
            f"a torch {suffix} file. Download it again (compare its sha256 with the published one)."
        )
    if isinstance(error, ImportError | AttributeError):
        return ModelLoadError(
            f"Loading the pickle {ckpt_path} ran its code, which needs something this environment lacks ({failure}); "
            f"install the package it was saved with, or convert it to .safetensors where it loads."
        )
    return ModelLoadError(
        f"Loading the pickle {ckpt_path} ran code stored in the file, and that code failed ({failure}). The file "
        f"was not written by torch.save of a state dict as CompVis checkpoints are; use a checkpoint you trust, "
        f"or .safetensors."
    )


def _with_ema_weights(
    state: dict[str, torch.Tensor], model: nn.Module, ckpt_path: Path
) -> dict[str, torch.Tensor]:
    """Replace the UNet weights by the checkpoint's EMA copy (CompVis LitEma names, dots removed)."""
    ema = {key for key in state if key.startswith(EMA_PREFIX) and key not in EMA_BOOKKEEPING_KEYS}
    if not ema:
        raise ModelLoadError(
            f"--use_ema was given but checkpoint {ckpt_path} has no EMA weights (no "
            f"'{EMA_PREFIX}*' keys). Drop --use_ema to use its regular weights, or pass a "
            f"checkpoint saved with EMA (e.g. sd-v1-4-full-ema.ckpt)."
        )
    result = dict(state)
    absent = []
    for name, _ in model.model.named_parameters():
        ema_key = EMA_PREFIX + name.replace(".", "")
        if ema_key in ema:
            result[f"model.{name}"] = state[ema_key]
        else:
            absent.append(ema_key)
    if absent:
        raise ModelLoadError(
            f"--use_ema: checkpoint {ckpt_path} lacks {len(absent)} EMA weights of this UNet, "
            f"e.g. {absent[:KEYS_SHOWN]}. Drop --use_ema, or pass the config this checkpoint "
            f"was trained with."
        )
    return result


def _required_part(key: str) -> str | None:
    return next((part for prefix, part in REQUIRED_PARTS.items() if key.startswith(prefix)), None)


def _is_tolerated(key: str) -> bool:
    """Keys whose absence or presence never changes what the model computes.

    CLIP's ``position_ids`` was a persistent buffer in the transformers version SD v1.4 was
    saved with and is non-persistent today.
    """
    is_clip_position_ids = key.startswith("cond_stage_model.") and key.endswith("embeddings.position_ids")
    return key.startswith(EMA_PREFIX) or is_clip_position_ids or key in SCHEDULE_BUFFERS


def _describe(key: str) -> str:
    return f"{_required_part(key) or 'non-network'} weight {key}"


def _refusal(ckpt_path: Path, config_path: Path, share_broken: float, details: str) -> ModelLoadError:
    summary = (
        f"this checkpoint does not match the config {config_path}"
        if share_broken > ARCHITECTURE_MISMATCH_SHARE
        else f"it is incomplete for the config {config_path}"
    )
    return ModelLoadError(
        f"Refusing checkpoint {ckpt_path}: {summary}. {details} Fix: pass the config this "
        f"checkpoint was made for (--config_path), or a checkpoint made for this config (--ckpt_path)."
    )


def _load_weights(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    ckpt_path: Path,
    config_path: Path,
    ema_used: bool,
    verbose: bool,
) -> None:
    """Load ``state`` into ``model``; refuse any missing, unexpected or mis-shaped network weight."""
    expected = model.state_dict()
    required_count = sum(_required_part(key) is not None for key in expected)
    mis_shaped = {
        key: (tuple(value.shape), tuple(expected[key].shape))
        for key, value in state.items()
        if key in expected and value.shape != expected[key].shape
    }
    loadable = {
        key: value
        for key, value in state.items()
        if key not in mis_shaped and (key in expected or not _is_tolerated(key))
    }
    try:
        # strict=False only so that the result is checked below and explained; the text encoder's
        # own load hook maps older CLIP key layouts, so its result is judged, not the raw names.
        incompatible = model.load_state_dict(loadable, strict=False)
    except RuntimeError as error:  # a size mismatch that shows only after that key mapping
        raise _refusal(ckpt_path, config_path, 1.0, f"{str(error)[:600]}.") from error
    missing = [key for key in incompatible.missing_keys if key not in mis_shaped]
    unexpected = [key for key in incompatible.unexpected_keys if not _is_tolerated(key)]
    broken_missing = [key for key in missing if _required_part(key) is not None]
    broken_unexpected = [key for key in unexpected if _required_part(key) is not None]
    if mis_shaped or broken_missing or broken_unexpected:
        problems = (
            [
                f"mis-shaped {_describe(key)} (checkpoint {got}, model {want})"
                for key, (got, want) in mis_shaped.items()
            ]
            + [f"missing {_describe(key)}" for key in broken_missing]
            + [f"unexpected {_describe(key)}" for key in broken_unexpected]
        )
        details = (
            f"Of {required_count} UNet/VAE/text-encoder weights, {len(broken_missing)} are missing, "
            f"{len(mis_shaped)} mis-shaped and {len(broken_unexpected)} unexpected; first problems: "
            f"{'; '.join(problems[:KEYS_SHOWN])}."
        )
        share_broken = (len(broken_missing) + len(mis_shaped)) / max(required_count, 1)
        raise _refusal(ckpt_path, config_path, share_broken, details)
    unknown_missing = [key for key in missing if not _is_tolerated(key)]
    unknown_unexpected = [key for key in unexpected if _required_part(key) is None]
    if unknown_missing or unknown_unexpected:
        warnings.warn(
            f"Checkpoint {ckpt_path}: {len(unknown_missing)} non-network keys missing "
            f"{unknown_missing[:KEYS_SHOWN]}, {len(unknown_unexpected)} unknown keys ignored "
            f"{unknown_unexpected[:KEYS_SHOWN]}; the UNet, VAE and text encoder loaded completely.",
            stacklevel=3,
        )
    ignored_ema = 0 if ema_used else sum(key.startswith(EMA_PREFIX) and key not in expected for key in state)
    if verbose and ignored_ema:
        print(f"Checkpoint {ckpt_path}: ignored {ignored_ema} EMA keys (pass --use_ema to use them).")
    recomputed = [key for key in missing if key in SCHEDULE_BUFFERS]
    if verbose and recomputed:
        print(f"Checkpoint {ckpt_path}: no {recomputed}; kept the values computed from the config.")


def _instantiate(config: DictConfig, config_path: Path) -> LatentDiffusion:
    """Build the model of ``config``. Only the targets built now must be importable; training-only
    ones (``scheduler_config``) are resolved by the trainer when it needs them."""
    from ldm.models.diffusion.ddpm import LatentDiffusion

    try:
        model = instantiate_from_config(config.model)
    except ImportError as error:
        raise ModelLoadError(
            f"Config {config_path} names an unknown target: {error} Use classes importable from "
            f"this project, e.g. ldm.models.diffusion.ddpm.LatentDiffusion."
        ) from error
    except OSError as error:
        raise _text_encoder_unavailable(config, config_path, error) from None
    if not isinstance(model, LatentDiffusion):
        raise ModelLoadError(
            f"Config {config_path} builds a {type(model).__name__}, not a LatentDiffusion; pass a "
            f"latent text-to-image config such as configs/stable-diffusion/v1-inference.yaml."
        )
    return model


def _text_encoder_unavailable(config: DictConfig, config_path: Path | None, error: OSError) -> Exception:
    """One short error for a text encoder whose tokenizer or config cannot be had (the Hub is unreachable).

    A local directory that is wrong keeps its own error (it names the directory and the files it lacks).
    """
    cond_stage = config.model.get("params", {}).get("cond_stage_config")
    params = cond_stage.get("params") if isinstance(cond_stage, DictConfig) else None
    version = str((params or {}).get("version", "openai/clip-vit-large-patch14"))
    if isinstance(error, FileNotFoundError) or Path(version).expanduser().exists():
        return error
    where = f"in {config_path}" if config_path is not None else "of the model's config"
    return ModelLoadError(
        f"The text encoder's tokenizer {version!r} (cond_stage_config.params.version {where}) is neither on "
        f"this machine nor reachable on the Hugging Face Hub. Fetch it once where the Hub is reachable "
        f"(huggingface-cli download {version} --local-dir clip-tokenizer), copy that directory here and set "
        f"cond_stage_config.params.version to its path. Work on the UNet alone needs no tokenizer "
        f"(e.g. convert-to-diffusers.py --unet_only)."
    )


def text_encoder_tokenizer(model: nn.Module, config_path: Path | None = None) -> object:
    """The text encoder's tokenizer (None if it has none), loaded now if the encoder defers it, or one clear error."""
    try:
        return getattr(model.cond_stage_model, "tokenizer", None)
    except OSError as error:
        raise _text_encoder_unavailable(model.ldm_config, config_path, error) from None


def load_model(
    config_path: str | Path | None = None,
    ckpt_path: str | Path | None = None,
    *,
    device: str = "cpu",
    use_ema: bool = False,
    verbose: bool = True,
    needs_tokenizer: bool = True,
) -> LatentDiffusion:
    """Build the LatentDiffusion of ``config_path`` and load ``ckpt_path`` into it, frozen, in eval mode.

    With neither path the embedded toy model is used (and announced as the first printed line).
    The returned model keeps its config as ``model.ldm_config`` (used by the diffusers export).
    ``use_ema`` takes the UNet weights from the checkpoint's ``model_ema.*`` copy.
    ``needs_tokenizer=False`` is for work on the UNet alone (e.g. a UNet-only export): the text
    encoder's tokenizer, which may have to come from the Hugging Face Hub, is then not loaded here.
    """
    config_file, ckpt_file = _resolve_paths(config_path, ckpt_path, verbose)
    target_device = resolve_device(device)
    config = read_config(config_file)
    state = read_checkpoint(ckpt_file)
    model = _instantiate(config, config_file)
    if use_ema:
        state = _with_ema_weights(state, model, ckpt_file)
    _load_weights(model, state, ckpt_file, config_file, use_ema, verbose)
    model.ldm_config = config
    if needs_tokenizer:
        text_encoder_tokenizer(model, config_file)
    model.eval().requires_grad_(False)
    model.to(target_device)
    if verbose:
        weights = "EMA" if use_ema else "regular"
        print(f"Loaded {config.model.target} from {ckpt_file} ({weights} weights) on {target_device}.")
    return model


def _digest(tensors: Iterable[tuple[str, torch.Tensor]], suffix: str = "") -> str:
    """First 16 hex digits of a sha256 over named tensors (name, dtype, shape and bytes)."""
    digest = hashlib.sha256()
    for key, tensor in tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    digest.update(suffix.encode())
    return digest.hexdigest()[:16]


def text_encoder_fingerprint(model: nn.Module) -> str:
    """First 16 hex digits of a sha256 over the text encoder's state-dict tensors, in key order."""
    return _digest(model.cond_stage_model.state_dict().items())


def model_fingerprint(model: nn.Module) -> str:
    """First 16 hex digits of a sha256 over the UNet's attn2 to_k/to_v weights and the text encoder.

    These are exactly the weights a SepCE increment is built on, so an increment file can tell
    whether it is being applied to the base model it was trained for. Merged increments would
    change the weights, so a model with merged increments is refused.
    """
    unet = model.model.diffusion_model
    merged = [name for name, module in unet.named_modules() if getattr(module, "merged", False)]
    if merged:
        raise ModelLoadError(
            f"Cannot fingerprint a model with merged increments ({merged[:KEYS_SHOWN]}); call "
            f"unmerge them first (erasure.increments.unmerge(model))."
        )
    attention_weights = (
        (key, value)
        for key, value in unet.state_dict().items()
        if key.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))
    )
    return _digest(attention_weights, suffix=text_encoder_fingerprint(model))
