"""A small CLIP byte-level BPE tokenizer for the toy world, written as vocab.json + merges.txt.

transformers' `CLIPTokenizer.from_pretrained(directory)` loads it like the real CLIP tokenizer.
Every word of the toy world is one token (so an artist's two-word name is two tokens, like
"van gogh" in SD); any other text still tokenises, character by character, because the vocab
holds every byte-level symbol with and without the end-of-word marker, as CLIP's does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from erasure.toy.world import world_words

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def _chain_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build `word</w>` from its characters."""
    symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
    merges = []
    while len(symbols) > 1:
        merges.append((symbols[0], symbols[1]))
        symbols = [symbols[0] + symbols[1], *symbols[2:]]
    return merges


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one lower-case word: merge the lowest-ranked adjacent pair until none is left."""
    symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        candidates = [(rank, i) for rank, i in pairs if rank is not None]
        if not candidates:
            break
        _, i = min(candidates)
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def build_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A vocab and merge list under which every given word BPE-encodes to a single token.

    Chains of merges for different words can interfere (a merge learnt for one word can fire
    inside another and leave it split), so after the chains every word is re-encoded and the
    pair it got stuck on is appended, until all words are single tokens.
    """
    words = sorted({w.lower() for w in words})
    for word in words:
        if not word.isalpha() or not word.isascii():
            raise ValueError(f"toy words must be plain ASCII letters, got {word!r}")
    merges: list[tuple[str, str]] = []
    for word in words:
        merges.extend(m for m in _chain_merges(word) if m not in merges)
    ranks = {m: i for i, m in enumerate(merges)}
    while True:
        stuck = [symbols for symbols in (_bpe(w, ranks) for w in words) if len(symbols) > 1]
        if not stuck:
            break
        pair = (stuck[0][0], stuck[0][1])
        ranks[pair] = len(merges)
        merges.append(pair)

    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + END_OF_WORD for s in byte_symbols] + [a + b for a, b in merges]
    tokens += [START_TOKEN, END_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_tokenizer(directory: str | Path, model_max_length: int) -> Path:
    """Write the toy tokenizer files into `directory` (created if needed) and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(world_words())
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    merge_lines = [MERGES_HEADER] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    special = {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN, "pad_token": END_TOKEN}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return directory


def load_tokenizer(directory: str | Path) -> CLIPTokenizer:
    """Load the toy tokenizer written by `write_tokenizer`, with one clear error if files are missing."""
    directory = Path(directory)
    missing = [name for name in TOKENIZER_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"toy tokenizer files missing in {directory}: {', '.join(missing)}; "
            "rebuild them with `python train-scripts/train-toy.py`"
        )
    return CLIPTokenizer.from_pretrained(str(directory))
