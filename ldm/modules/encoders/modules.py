"""Text conditioning of SD v1: the frozen CLIP text encoder (``cond_stage_model``)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

logger = logging.getLogger(__name__)

_TORCH_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_REQUIRED_LOCAL_FILES = ("vocab.json", "merges.txt", "config.json")
_LAYERS = ("last", "pooled", "hidden")

# Checkpoint keys of the text model, relative to the embedder: CompVis files (and
# transformers < 5) nest the transformer under ``text_model.``.
_CHECKPOINT_TEXT_PREFIX = "transformer.text_model."
_POSITION_IDS = "embeddings.position_ids"


class AbstractEncoder(nn.Module):
    """Base class of conditioning encoders: ``encode`` maps a condition to its embedding."""

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement encode().")


def _looks_like_path(version: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else is meant as a local path."""
    return version.startswith(("/", ".", "~")) or version.count("/") > 1 or "\\" in version


def _load_local(directory: Path) -> tuple[CLIPTokenizer, CLIPTextModel]:
    if not directory.is_dir():
        raise FileNotFoundError(
            f"FrozenCLIPEmbedder: local directory {str(directory)!r} does not exist (resolved to "
            f"{str(directory.resolve())!r}); pass a directory holding the CLIP tokenizer files "
            "(vocab.json, merges.txt) and config.json."
        )
    absent = [name for name in _REQUIRED_LOCAL_FILES if not (directory / name).is_file()]
    if absent:
        raise FileNotFoundError(
            f"FrozenCLIPEmbedder: {str(directory)!r} lacks {absent}; a CLIP text-encoder directory needs "
            "vocab.json, merges.txt and config.json (weights optional)."
        )
    tokenizer = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    if any((directory / name).is_file() for name in _TORCH_WEIGHT_FILES):
        return tokenizer, CLIPTextModel.from_pretrained(directory, local_files_only=True)
    logger.info(
        "FrozenCLIPEmbedder: %s holds no weights; text model built from config.json with random "
        "weights, which must be loaded from the model checkpoint (cond_stage_model.transformer.*).",
        directory,
    )
    return tokenizer, CLIPTextModel(CLIPTextConfig.from_pretrained(directory, local_files_only=True))


def _load_from_hub(repo_id: str) -> tuple[CLIPTokenizer, CLIPTextModel]:
    try:
        transformer = CLIPTextModel.from_pretrained(repo_id)
        tokenizer = CLIPTokenizer.from_pretrained(repo_id)
    except (OSError, TypeError) as err:  # offline, a missing vocab file surfaces as a TypeError
        raise OSError(
            f"FrozenCLIPEmbedder: could not load {repo_id!r} from the Hugging Face Hub or its cache "
            f"({err}). Without network access pass version=<local directory> holding the tokenizer "
            "files and config.json (weights optional)."
        ) from err
    return tokenizer, transformer


def _add_text_model_prefix(
    module: FrozenCLIPEmbedder, state_dict: OrderedDict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """state_dict post-hook: name text-model keys ``transformer.text_model.*`` even when the
    installed CLIPTextModel has no ``text_model`` level."""
    if module.has_text_model_level:
        return
    bare = prefix + "transformer."
    renamed = [
        (prefix + _CHECKPOINT_TEXT_PREFIX + key[len(bare):] if key.startswith(bare) else key, value)
        for key, value in state_dict.items()
    ]
    state_dict.clear()
    state_dict.update(renamed)


class FrozenCLIPEmbedder(AbstractEncoder):
    """CLIP text encoder (transformers) returning per-token hidden states for prompts.

    ``version`` is a hub id or a local directory (loaded offline; see ``_load_local``).
    ``layer``: ``"last"`` (SD v1: last_hidden_state), ``"pooled"`` (pooled output as one
    token) or ``"hidden"`` (``hidden_states[layer_idx]``). The module's device follows
    ``.to()``; ``device`` only sets the initial placement.
    """

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: str | torch.device = "cpu",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
    ) -> None:
        super().__init__()
        if layer not in _LAYERS:
            raise ValueError(f"FrozenCLIPEmbedder: layer must be one of {_LAYERS}, got {layer!r}.")
        if (layer == "hidden") != (layer_idx is not None):
            raise ValueError("FrozenCLIPEmbedder: pass layer_idx exactly when layer='hidden'.")
        local = Path(version).expanduser()
        if local.exists() or _looks_like_path(version):
            self.tokenizer, self.transformer = _load_local(local)
        else:
            self.tokenizer, self.transformer = _load_from_hub(version)
        positions = self.transformer.config.max_position_embeddings
        if not 0 < max_length <= positions:
            raise ValueError(
                f"FrozenCLIPEmbedder: max_length {max_length} must be in 1..{positions} "
                f"(max_position_embeddings of {version!r})."
            )
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        self.register_state_dict_post_hook(_add_text_model_prefix)
        self.to(device)
        if freeze:
            self.freeze()

    @property
    def has_text_model_level(self) -> bool:
        """True when the CLIPTextModel nests its transformer as ``text_model`` (transformers < 5)."""
        return hasattr(self.transformer, "text_model")

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def freeze(self) -> None:
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    def forward(self, text: str | list[str]) -> torch.Tensor:
        batch_encoding = self.tokenizer(
            text,
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        tokens = batch_encoding["input_ids"].to(self.device)
        outputs = self.transformer(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return outputs.last_hidden_state
        if self.layer == "pooled":
            return outputs.pooler_output[:, None, :]
        return outputs.hidden_states[self.layer_idx]

    def encode(self, text: str | list[str]) -> torch.Tensor:
        return self(text)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Accept checkpoint names ``transformer.text_model.*`` whatever the installed layout,
        with or without ``embeddings.position_ids`` (older files carry it).

        Renaming here is seen by the child modules: torch builds their state dicts from
        this (already per-call copied) dictionary after this method returns.
        """
        checkpoint_text = prefix + _CHECKPOINT_TEXT_PREFIX
        installed_text = prefix + ("transformer.text_model." if self.has_text_model_level else "transformer.")
        if checkpoint_text != installed_text:
            for key in [key for key in state_dict if key.startswith(checkpoint_text)]:
                state_dict[installed_text + key[len(checkpoint_text):]] = state_dict.pop(key)
        text_model = self.transformer.text_model if self.has_text_model_level else self.transformer
        embeddings = text_model.embeddings
        position_key = installed_text + _POSITION_IDS
        if "position_ids" in embeddings.state_dict(keep_vars=True):
            state_dict.setdefault(position_key, embeddings.position_ids.detach().clone())
        else:
            state_dict.pop(position_key, None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
