"""Conditioning encoders (``cond_stage_model``): SD v1's frozen CLIP text encoder here, and
CompVis's other encoders re-exported from ``ldm_conditioners`` and ``openai_clip``.

``FrozenCLIPEmbedder`` needs no Hugging Face Hub to be built: a Hub tokenizer is loaded when
first used, on the ``meta`` device (``with torch.device("meta")``) no weights are loaded, and
for SD v1's ``openai/clip-vit-large-patch14`` without Hub access the text model is built from
that model's known architecture with random weights, which the SD checkpoint replaces
(``cond_stage_model.transformer.*``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.modules.encoders.ldm_conditioners import (  # noqa: F401  (CompVis names)
    AbstractEncoder,
    BERTEmbedder,
    BERTTokenizer,
    ClassEmbedder,
    SpatialRescaler,
    TransformerEmbedder,
)
from ldm.modules.encoders.openai_clip import FrozenClipImageEmbedder, FrozenCLIPTextEmbedder  # noqa: F401

logger = logging.getLogger(__name__)

# The text model of SD v1's CLIP ViT-L/14 (the Hub's config.json of openai/clip-vit-large-patch14).
_KNOWN_TEXT_CONFIGS = {
    "openai/clip-vit-large-patch14": dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=0, pad_token_id=1, eos_token_id=2,
    ),
}

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


def _looks_like_path(version: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else is meant as a local path."""
    return version.startswith(("/", ".", "~")) or version.count("/") > 1 or "\\" in version


def _on_meta_device() -> bool:
    """True inside ``with torch.device("meta")``: modules built now get no real weights."""
    return torch.empty(0).device.type == "meta"


def _check_local(directory: Path) -> None:
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


def _local_text_model(directory: Path) -> CLIPTextModel:
    if not _on_meta_device() and any((directory / name).is_file() for name in _TORCH_WEIGHT_FILES):
        return CLIPTextModel.from_pretrained(directory, local_files_only=True)
    logger.info(
        "FrozenCLIPEmbedder: %s holds no weights (or the meta device is active); text model built from "
        "config.json without weights, which must be loaded from the model checkpoint "
        "(cond_stage_model.transformer.*).",
        directory,
    )
    return CLIPTextModel(CLIPTextConfig.from_pretrained(directory, local_files_only=True))


def _hub_text_model(repo_id: str) -> CLIPTextModel:
    try:
        if _on_meta_device():
            return CLIPTextModel(CLIPTextConfig.from_pretrained(repo_id))
        return CLIPTextModel.from_pretrained(repo_id)
    except (OSError, TypeError):  # offline; a missing file can surface as a TypeError
        if repo_id not in _KNOWN_TEXT_CONFIGS:
            raise _unavailable(repo_id, "text model") from None
    logger.warning(
        "FrozenCLIPEmbedder: %s is not reachable on the Hugging Face Hub; its text model is built from the "
        "known architecture with random weights, which must be loaded from the model checkpoint "
        "(cond_stage_model.transformer.*).",
        repo_id,
    )
    return CLIPTextModel(CLIPTextConfig(**_KNOWN_TEXT_CONFIGS[repo_id]))


def _unavailable(repo_id: str, what: str) -> OSError:
    return OSError(
        f"FrozenCLIPEmbedder: the CLIP {what} {repo_id!r} (cond_stage_config.params.version) is neither in the "
        f"Hugging Face cache nor reachable on the Hub. Fetch it once where the Hub is reachable "
        f"(huggingface-cli download {repo_id} --local-dir clip-tokenizer) and set "
        "cond_stage_config.params.version to that local directory."
    )


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

    ``version`` is a hub id or a local directory (loaded offline; it needs the tokenizer files
    and config.json, weights optional). ``layer``: ``"last"`` (SD v1: last_hidden_state),
    ``"pooled"`` (pooled output as one token) or ``"hidden"`` (``hidden_states[layer_idx]``).
    A Hub tokenizer is loaded when first used (``tokenizer``); without Hub access that raises
    one short ``OSError`` naming ``cond_stage_config.params.version``. The module stays where
    it is built and follows ``.to()``; tokens go to the text model's device. ``device`` is
    CompVis's parameter, kept for drop-in configs: CompVis moved tokens there.
    """

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: str | torch.device = "cuda",
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
        self.version = version
        self._local_directory = local if local.exists() or _looks_like_path(version) else None
        self._tokenizer: CLIPTokenizer | None = None
        if self._local_directory is not None:
            _check_local(local)
            self.transformer = _local_text_model(local)
            # a local tokenizer costs no network: load it now, while the directory surely exists
            self._tokenizer = CLIPTokenizer.from_pretrained(local, local_files_only=True)
        else:
            self.transformer = _hub_text_model(version)
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
        if freeze:
            self.freeze()

    @property
    def tokenizer(self) -> CLIPTokenizer:
        """The CLIP tokenizer (a Hub one is loaded on first use, from the Hub or its cache)."""
        if self._tokenizer is None:
            try:
                self._tokenizer = CLIPTokenizer.from_pretrained(self.version)
            except (OSError, TypeError):  # offline; a missing vocab file surfaces as a TypeError
                raise _unavailable(self.version, "tokenizer") from None
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: CLIPTokenizer) -> None:
        self._tokenizer = tokenizer

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
