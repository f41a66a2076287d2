"""FrozenCLIPEmbedder against transformers' CLIPTextModel and diffusers' key converter (offline)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from tiny_clip import BOS, EOS, write_tiny_clip

MAX_LENGTH = 16
PROMPTS = ["a photo of the cat, by van gogh", "", "an oil painting of a red house and a tree"]
POSITION_IDS_KEY = "transformer.text_model.embeddings.position_ids"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def embedder(clip_dir: Path) -> FrozenCLIPEmbedder:
    return FrozenCLIPEmbedder(version=str(clip_dir), max_length=MAX_LENGTH)


def _direct_hidden_states(model: CLIPTextModel, clip_dir: Path, prompts: list[str]) -> torch.Tensor:
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    ids = tokenizer(
        prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def test_tiny_tokenizer_splits_words_into_known_tokens(clip_dir: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    sentence = "an oil painting of the house by van gogh"
    ids = tokenizer(sentence)["input_ids"]
    bos, eos = tokenizer.convert_tokens_to_ids([BOS, EOS])
    assert ids[0] == bos and ids[-1] == eos
    assert eos not in ids[1:-1], "a content token fell back to the unknown token"
    assert tokenizer.decode(ids, skip_special_tokens=True) == sentence
    assert tokenizer.tokenize("the") == ["the</w>"], "BPE merges were not applied"


def test_matches_clip_text_model(embedder: FrozenCLIPEmbedder, clip_dir: Path) -> None:
    with torch.no_grad():
        ours = embedder.encode(PROMPTS)
    direct = _direct_hidden_states(CLIPTextModel.from_pretrained(clip_dir), clip_dir, PROMPTS)
    assert ours.shape == (len(PROMPTS), MAX_LENGTH, 32)
    assert (ours - direct).abs().max().item() <= 1e-6


def test_is_frozen_and_keys_are_compvis(embedder: FrozenCLIPEmbedder) -> None:
    assert not embedder.transformer.training
    assert all(not p.requires_grad for p in embedder.parameters())
    keys = list(embedder.state_dict())
    assert keys and all(key.startswith("transformer.text_model.") for key in keys)
    assert embedder.device == torch.device("cpu")


def test_tokens_follow_module_device(embedder: FrozenCLIPEmbedder) -> None:
    moved = copy.deepcopy(embedder).to("meta")
    assert moved.device.type == "meta"
    hidden = moved(PROMPTS)
    assert hidden.device.type == "meta" and hidden.shape == (len(PROMPTS), MAX_LENGTH, 32)


def test_diffusers_converted_state_dict_gives_same_outputs(
    embedder: FrozenCLIPEmbedder, clip_dir: Path
) -> None:
    checkpoint = {f"cond_stage_model.{key}": value for key, value in embedder.state_dict().items()}
    converted = convert_ldm_clip_checkpoint(checkpoint)
    fresh = CLIPTextModel(CLIPTextConfig.from_pretrained(clip_dir)).eval()
    fresh.load_state_dict(converted, strict=True)
    with torch.no_grad():
        ours = embedder(PROMPTS)
    assert (ours - _direct_hidden_states(fresh, clip_dir, PROMPTS)).abs().max().item() <= 1e-6


def test_directory_without_weights_builds_from_config_and_loads_checkpoint(
    embedder: FrozenCLIPEmbedder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bare_dir = write_tiny_clip(tmp_path / "bare", max_length=MAX_LENGTH, with_weights=False)
    assert not any(bare_dir.glob("*.safetensors"))
    with caplog.at_level(logging.INFO, logger="ldm.modules.encoders.modules"):
        bare = FrozenCLIPEmbedder(version=str(bare_dir), max_length=MAX_LENGTH)
    assert "holds no weights" in caplog.text
    with torch.no_grad():
        assert not torch.allclose(bare(PROMPTS), embedder(PROMPTS))
        bare.load_state_dict(embedder.state_dict(), strict=True)
        assert torch.equal(bare(PROMPTS), embedder(PROMPTS))


def test_position_ids_present_or_absent_load_strictly(embedder: FrozenCLIPEmbedder, clip_dir: Path) -> None:
    without_ids = dict(embedder.state_dict())
    assert POSITION_IDS_KEY not in without_ids
    with_ids = {**without_ids, POSITION_IDS_KEY: torch.arange(MAX_LENGTH).unsqueeze(0)}
    other = FrozenCLIPEmbedder(version=str(clip_dir), max_length=MAX_LENGTH)
    other.load_state_dict(with_ids, strict=True)
    # Older transformers releases keep position_ids as a persistent buffer.
    embeddings = other.transformer.text_model.embeddings
    embeddings.register_buffer("position_ids", embeddings.position_ids.clone(), persistent=True)
    assert POSITION_IDS_KEY in other.state_dict()
    other.load_state_dict(without_ids, strict=True)
    other.load_state_dict(with_ids, strict=True)


def test_keys_keep_text_model_prefix_without_text_model_level(
    embedder: FrozenCLIPEmbedder, clip_dir: Path
) -> None:
    """Simulate a transformers release whose CLIPTextModel has no ``text_model`` level."""
    reference = dict(embedder.state_dict())
    flat = FrozenCLIPEmbedder(version=str(clip_dir), max_length=MAX_LENGTH)
    flat.transformer = flat.transformer.text_model
    assert not flat.has_text_model_level
    assert list(flat.state_dict()) == list(reference)
    with torch.no_grad():
        for parameter in flat.parameters():
            parameter.zero_()
        flat.load_state_dict({**reference, POSITION_IDS_KEY: torch.arange(MAX_LENGTH)[None]}, strict=True)
        assert torch.equal(flat(PROMPTS), embedder(PROMPTS))


def test_hidden_and_pooled_layers(clip_dir: Path) -> None:
    penultimate = FrozenCLIPEmbedder(
        version=str(clip_dir), max_length=MAX_LENGTH, layer="hidden", layer_idx=-2
    )
    pooled = FrozenCLIPEmbedder(version=str(clip_dir), max_length=MAX_LENGTH, layer="pooled")
    model = CLIPTextModel.from_pretrained(clip_dir)
    ids = CLIPTokenizer.from_pretrained(clip_dir)(
        PROMPTS, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True)
        assert torch.equal(penultimate(PROMPTS), expected.hidden_states[-2])
        assert torch.equal(pooled(PROMPTS), expected.pooler_output[:, None, :])


def test_bad_arguments_raise_clear_errors(clip_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FrozenCLIPEmbedder(version=str(tmp_path / "no_such_dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        FrozenCLIPEmbedder(version=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="max_length 77"):
        FrozenCLIPEmbedder(version=str(clip_dir), max_length=77)
    with pytest.raises(ValueError, match="layer must be one of"):
        FrozenCLIPEmbedder(version=str(clip_dir), max_length=MAX_LENGTH, layer="penultimate")


def test_unreachable_hub_name_points_to_local_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    # Force offline mode so that the hub lookup fails at once instead of retrying the network.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("transformers.utils.hub._is_offline_mode", True)
    with pytest.raises(OSError, match="cond_stage_config.params.version to that local directory"):
        FrozenCLIPEmbedder(version="no-such-owner/no-such-clip")


def test_sd_v1_text_encoder_builds_offline_and_defers_its_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """SD v1's CLIP ViT-L/14 text model is built from its known architecture without the Hub (its
    weights come from the SD checkpoint); only asking for the tokenizer needs the Hub."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("transformers.utils.hub._is_offline_mode", True)
    with torch.device("meta"):
        embedder = FrozenCLIPEmbedder()
    assert embedder.device.type == "meta"
    assert sum(p.numel() for p in embedder.parameters()) == 123_060_480
    assert "transformer.text_model.encoder.layers.11.mlp.fc2.weight" in embedder.state_dict()
    with pytest.raises(OSError, match="cond_stage_config.params.version") as error:
        _ = embedder.tokenizer
    assert error.value.__cause__ is None and error.value.__suppress_context__
