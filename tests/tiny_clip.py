"""A tiny, offline CLIP text-encoder directory (tokenizer + config [+ weights]) for tests."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# Character-level vocabulary plus a few merges, enough for lower-case English prompts:
# CLIP BPE needs every symbol both inside a word ("a") and word-final ("a</w>").
_SYMBOLS = string.ascii_lowercase + string.digits + ".,!?'-:;()&"
_MERGES = (("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"))


def _tiny_vocab() -> tuple[dict[str, int], list[str]]:
    tokens = list(_SYMBOLS) + [symbol + "</w>" for symbol in _SYMBOLS]
    tokens += ["".join(pair) for pair in _MERGES] + [BOS, EOS]
    merges = ["#version: 0.2"] + [" ".join(pair) for pair in _MERGES]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_tiny_clip(
    directory: str | Path,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    max_length: int = 16,
    with_weights: bool = True,
    seed: int = 0,
) -> Path:
    """Write a CLIP text-encoder directory that ``FrozenCLIPEmbedder(version=dir)`` loads offline.

    ``max_length`` sets ``max_position_embeddings`` (and the tokenizer's model_max_length).
    With ``with_weights`` the randomly initialised model (seeded, global RNG untouched) is
    saved as model.safetensors; otherwise only config.json is written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _tiny_vocab()
    vocab_file = directory / "vocab.json"
    merges_file = directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    merges_file.write_text("\n".join(merges) + "\n", encoding="utf-8")
    CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length).save_pretrained(directory)

    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    if with_weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPTextModel(config)
        model.save_pretrained(directory, safe_serialization=True)
    else:
        config.save_pretrained(directory)
    return directory
