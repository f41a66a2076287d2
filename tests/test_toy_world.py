"""The toy world: renderer, vocabulary, tokenizer, oracle plumbing, its `world:` entry and the training loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import CLIPTokenizer

from erasure.classifier import ImageClassifier, SmallCNN, predict
from erasure.toy import TOY_CONFIG, TOY_DIR
from erasure.toy.oracle import ToyOracle, artist_classifier, artist_network, jitter, load_oracle, save_oracle
from erasure.toy.render import render, render_batch
from erasure.toy.text_encoder import prompt_labels, train_text_encoder
from erasure.toy.tokenizer import load_tokenizer, write_tokenizer
from erasure.toy.training import (
    TextEncoderConfig,
    ToyTrainer,
    TrainingConfig,
    learning_rate,
    load_toy_config,
    loss_weights,
    sample_batch,
    write_text_encoder_dir,
)
from erasure.toy.world import (
    ARTISTS,
    BLANK_PROMPT,
    CLASS_NAMES,
    COLOURS,
    OBJECTS,
    Scene,
    all_prompts,
    artist_index,
    class_index,
    class_prompt,
    world_words,
)
from erasure.worlds import world_from_config_file


# ---------------------------------------------------------------------------- world
def test_class_mapping_and_prompts() -> None:
    assert len(ARTISTS) == 9 and all(len(name.split()) == 2 for name in ARTISTS)
    assert CLASS_NAMES[0] == "blank" and class_index("") == 0 and class_prompt(0) == ""
    for k, artist in enumerate(ARTISTS, start=1):
        assert class_index(artist) == k and class_index(artist.title()) == k and class_prompt(k) == artist
    scene = Scene(artist=3, colour=COLOURS.index("blue"), obj=OBJECTS.index("cross"))
    assert scene.prompt("artist") == ARTISTS[2]
    assert scene.prompt("colour_object_by_artist") == f"a blue cross by {ARTISTS[2]}"
    blank = Scene(artist=0, colour=0, obj=0)
    assert blank.prompt("colour_object") == "a red circle" and blank.prompt("blank") == ""
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 1 + 9 + len(COLOURS) * len(OBJECTS) * 10
    assert len(set(world_words())) == len(world_words()), "artist words must not repeat other world words"


def test_bad_world_input_gives_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown artist 'van gogh'.*vela quorin"):
        artist_index("van gogh")
    with pytest.raises(ValueError, match="class"):
        class_index("picasso")
    with pytest.raises(ValueError, match="out of range"):
        Scene(artist=10, colour=0, obj=0)
    with pytest.raises(ValueError, match="need classes 1..9"):
        Scene(artist=0, colour=0, obj=0).prompt("artist")
    with pytest.raises(ValueError, match="unknown template"):
        Scene(artist=1, colour=0, obj=0).prompt("portrait")
    with pytest.raises(TypeError, match="Scene"):
        render((1, 0, 0), seed=0)  # type: ignore[arg-type]


def test_the_toy_config_declares_this_world() -> None:
    """The `world:` entry of configs/toy/toy-ldm.yaml repeats erasure/toy/world.py's classes: they must not drift."""
    world = world_from_config_file(TOY_CONFIG)
    assert world.name == "toy" and world.image_size == 32 and world.protect_classes
    assert world.class_prompts == (BLANK_PROMPT, *ARTISTS) and world.names == CLASS_NAMES
    assert world.classifier == "erasure.toy.oracle.artist_classifier"
    assert world.features == "erasure.toy.oracle.artist_network"
    assert world.classifier_arch == "toy-cnn"


# ---------------------------------------------------------------------------- renderer
def test_renderer_is_deterministic_by_seed() -> None:
    scene = Scene(artist=5, colour=1, obj=2)
    first, again, other = render(scene, 7), render(scene, 7), render(scene, 8)
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    batch = render_batch([scene, scene], [7, 8])
    assert batch.shape == (2, 3, 32, 32) and batch.min() >= -1 and batch.max() <= 1
    assert torch.equal(batch[0], torch.from_numpy(first).permute(2, 0, 1).float() / 127.5 - 1)


def _style_statistics(image: np.ndarray) -> np.ndarray:
    """Object-agnostic statistics: grey-level histogram, edge density, vertical tone change."""
    grey = image.astype(np.float64).mean(axis=2) / 255
    histogram = np.histogram(grey, bins=8, range=(0, 1))[0] / grey.size
    dx, dy = np.abs(np.diff(grey, axis=1)).mean(), np.abs(np.diff(grey, axis=0)).mean()
    return np.concatenate([histogram, [dx, dy, grey[:8].mean() - grey[-8:].mean(), grey[:2].mean()]])


def test_every_style_is_distinct_from_every_other() -> None:
    """A nearest-centroid rule on simple image statistics tells all ten styles apart on fresh
    renders of every colour and object: the styles differ in ways that do not depend on the object."""

    def dataset(first_seed: int) -> tuple[np.ndarray, np.ndarray]:
        features, labels = [], []
        for style in range(len(CLASS_NAMES)):
            for i in range(16):
                scene = Scene(artist=style, colour=i % 4, obj=(i // 4) % 4)
                features.append(_style_statistics(render(scene, first_seed + i)))
                labels.append(style)
        return np.array(features), np.array(labels)

    train_x, train_y = dataset(0)
    test_x, test_y = dataset(1000)
    centroids = np.stack([train_x[train_y == k].mean(axis=0) for k in range(len(CLASS_NAMES))])
    scale = train_x.std(axis=0) + 1e-6
    predicted = np.argmin((((test_x[:, None] - centroids[None]) / scale) ** 2).sum(-1), axis=1)
    per_class = [(predicted[test_y == k] == k).mean() for k in range(len(CLASS_NAMES))]
    assert min(per_class) >= 0.9, dict(zip(CLASS_NAMES, per_class))


# ---------------------------------------------------------------------------- tokenizer
def test_tokenizer_has_one_token_per_world_word(tmp_path: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp_path, model_max_length=16)))
    for word in world_words():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    for artist in ARTISTS:
        assert len(tokenizer(artist, add_special_tokens=False).input_ids) == 2, artist
    ids = tokenizer("a red circle by " + ARTISTS[0].upper(), padding="max_length", max_length=16).input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 16
    assert ids[7] == tokenizer.eos_token_id == tokenizer.pad_token_id and ids[-1] == tokenizer.pad_token_id
    assert len(tokenizer("a photo of van gogh", add_special_tokens=False).input_ids) > 4  # still tokenises


def test_missing_tokenizer_files_name_the_rebuild_script(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train-toy.py"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------- oracle
def test_jitter_is_seeded_and_stays_in_range() -> None:
    images = render_batch([Scene(k, 0, 0) for k in range(4)], [1, 2, 3, 4])
    first = jitter(images, torch.Generator().manual_seed(0))
    again = jitter(images, torch.Generator().manual_seed(0))
    assert torch.equal(first, again) and first.shape == images.shape
    assert first.min() >= -1 and first.max() <= 1 and not torch.equal(first, images)


def test_oracle_save_load_round_trip_and_bad_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    oracle = ToyOracle(width=4).eval()
    save_oracle(oracle, {"note": "test"}, tmp_path)
    loaded = load_oracle(tmp_path)
    images = render_batch([Scene(1, 2, 3), Scene(0, 1, 1)], [0, 1])
    for task, logits in oracle(images).items():
        assert torch.equal(logits, loaded(images)[task])
    assert json.loads((tmp_path / "oracle.json").read_text())["note"] == "test"
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        loaded(torch.zeros(1, 3, 16, 16))
    with pytest.raises(FileNotFoundError, match="train-toy-oracle.py"):
        load_oracle(tmp_path / "nowhere")
    (tmp_path / "oracle.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match="damaged.*train-toy-oracle.py"):
        load_oracle(tmp_path)


def test_the_artist_oracle_is_the_worlds_classifier_and_feature_network() -> None:
    oracle = load_oracle()
    images = (render_batch([Scene(k, k % 4, k % 4) for k in range(10)], list(range(10))) + 1) / 2
    world = world_from_config_file(TOY_CONFIG)
    classifier = world.load_classifier()
    assert isinstance(classifier, ImageClassifier) and classifier.class_names == list(CLASS_NAMES)
    assert torch.equal(predict(classifier, images), oracle.predict(images * 2 - 1)["artist"])
    assert torch.equal(predict(artist_classifier(), images), predict(classifier, images))
    network = world.load_features()
    assert isinstance(network, SmallCNN) and not network.training
    assert torch.equal(network(images * 2 - 1), oracle.classifiers["artist"](images * 2 - 1))
    assert isinstance(artist_network(), SmallCNN)


# ---------------------------------------------------------------------------- training
def test_training_batches_are_a_function_of_seed_and_step() -> None:
    cfg = TrainingConfig(batch_size=12)
    prompts, images = sample_batch(0, 5, cfg)
    prompts_again, images_again = sample_batch(0, 5, cfg)
    assert prompts == prompts_again and torch.equal(images, images_again)
    assert sample_batch(0, 6, cfg)[0] != prompts
    assert set(prompts) <= set(all_prompts()) and images.shape == (12, 3, 32, 32)


def test_learning_rate_warms_up_and_decays() -> None:
    cfg = TrainingConfig(steps=1000, warmup_steps=100, lr=1e-3, final_lr_fraction=0.1)
    assert learning_rate(0, cfg) == pytest.approx(1e-5)
    assert learning_rate(99, cfg) == pytest.approx(1e-3)
    assert learning_rate(550, cfg) == pytest.approx(0.55e-3)
    assert learning_rate(999, cfg) == pytest.approx(1e-4, rel=1e-3)


def test_loss_weights_clamp_the_snr_in_x0_space() -> None:
    snr = torch.tensor([1e-6, 0.5, 3.0, 100.0])
    # v error = x0 error * sqrt(SNR + 1): the x0-space weight is clamp(SNR, floor, gamma)
    x0_space = loss_weights(snr, "v", 5.0, 1.0) * (snr + 1)
    assert torch.allclose(x0_space, torch.tensor([1.0, 1.0, 3.0, 5.0]))
    assert torch.allclose(loss_weights(snr, "v", 5.0) * (snr + 1), torch.tensor([1e-6, 0.5, 3.0, 5.0]))
    assert torch.allclose(loss_weights(snr, "x0", 5.0, 1.0), torch.tensor([1.0, 1.0, 3.0, 5.0]))
    assert torch.allclose(loss_weights(snr, "eps", 5.0) * snr, torch.tensor([1e-6, 0.5, 3.0, 5.0]))
    with pytest.raises(ValueError, match="snr_weight_floor.*v or x0"):
        loss_weights(snr, "eps", 5.0, 1.0)


def test_training_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown keys.*learning_rate"):
        TrainingConfig.from_mapping({"learning_rate": 1e-3})


def test_shipped_config_leaves_sepce_room() -> None:
    """Width x tokens of the toy text encoder: "" + 9 artists give at most 1 + 10 * 15 independent
    rows (the start token's row is the same for every prompt); the null space must keep >= 64."""
    config, cfg = load_toy_config(TOY_CONFIG)
    max_length = config.model.params.cond_stage_config.params.max_length
    assert cfg.text_encoder.hidden_size - (1 + 10 * (max_length - 1)) >= 64
    assert config.model.params.unet_config.params.context_dim == cfg.text_encoder.hidden_size


def _tiny_toy_config(path: Path, steps: int) -> Path:
    """The toy config scaled down to a few seconds of CPU: same structure, tiny widths."""
    config = OmegaConf.load(TOY_CONFIG)
    unet = config.model.params.unet_config.params
    unet.model_channels, unet.channel_mult, unet.attention_resolutions, unet.context_dim = 32, [1, 2], [2], 32
    config.training.update({"steps": steps, "batch_size": 4, "warmup_steps": 1, "log_every": 1,
                            "text_encoder_steps": 2})
    config.training.text_encoder.update({"hidden_size": 32, "intermediate_size": 64,
                                         "num_hidden_layers": 1, "num_attention_heads": 2})
    OmegaConf.save(config, path)
    return path


def test_resumed_run_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    config_path = _tiny_toy_config(tmp_path / "tiny.yaml", steps=3)
    quiet = lambda line: None
    straight = ToyTrainer(config_path, tmp_path / "straight", tmp_path / "straight-out", log=quiet)
    assert straight.run()
    interrupted = ToyTrainer(config_path, tmp_path / "split", tmp_path / "split-out", log=quiet)
    assert not interrupted.run(stop_requested=lambda: interrupted.step >= 1)  # as after a SIGTERM
    resumed = ToyTrainer(config_path, tmp_path / "split", tmp_path / "split-out", log=quiet)
    assert resumed.step == 1
    assert resumed.run()
    a = straight.model.state_dict()
    b = resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "split-out" / "model.json").read_text())
    assert meta["steps"] == 3 and meta["null_space"]["width"] == 32
    assert meta["text_encoder_training"]["steps"] == 2  # recorded though the resumed process skipped it
    assert not any(p.requires_grad for p in resumed.model.cond_stage_model.parameters())
    assert (tmp_path / "split-out" / "text_encoder" / "config.json").is_file()
    assert not list((tmp_path / "split-out" / "text_encoder").glob("*.safetensors")), "no duplicate weights"
    with pytest.raises(ValueError, match=r"other settings .*'steps': \(3, 9\).*--overwrite"):
        ToyTrainer(config_path, tmp_path / "split", tmp_path / "x", steps=9, log=quiet)
    assert [p.name for p in (tmp_path / "split").glob("checkpoint*")] == ["checkpoint.safetensors"]
    restarted = ToyTrainer(config_path, tmp_path / "split", tmp_path / "x", steps=9, overwrite=True, log=quiet)
    assert restarted.step == 0 and not (tmp_path / "split" / "loss.csv").exists()


def test_prompt_labels_name_artist_colour_and_object() -> None:
    assert prompt_labels("") == (0, 0, 0)
    assert prompt_labels(ARTISTS[1]) == (2, 0, 0)
    assert prompt_labels("a red circle") == (0, 1, 1)
    assert prompt_labels(f"a blue cross by {ARTISTS[8]}") == (9, 3, 4)


def test_text_encoder_training_separates_colours_then_freezes(tmp_path: Path) -> None:
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    torch.manual_seed(0)
    text = TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    embedder = FrozenCLIPEmbedder(version=str(write_text_encoder_dir(tmp_path, text, max_length=16)), max_length=16)
    report = train_text_encoder(embedder, steps=60, lr=3e-3, seed=0)
    assert report["accuracy"]["colour"] == 1.0 and report["accuracy"]["object"] == 1.0, report
    assert report["accuracy"]["artist"] >= 0.9, report
    assert not any(p.requires_grad for p in embedder.parameters())


def test_text_encoder_directory_loads_through_frozen_clip_embedder(tmp_path: Path) -> None:
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    config, cfg = load_toy_config(TOY_CONFIG)
    directory = write_text_encoder_dir(tmp_path, cfg.text_encoder, max_length=16)
    embedder = FrozenCLIPEmbedder(version=str(directory), max_length=16)
    out = embedder.encode(["", ARTISTS[0], "a red circle by " + ARTISTS[1]])
    assert out.shape == (3, 16, cfg.text_encoder.hidden_size)
    assert all(key.startswith("transformer.text_model.") for key in embedder.state_dict())


# ---------------------------------------------------------------------------- shipped model
def test_shipped_model_loads_strictly_and_keeps_sepce_room() -> None:
    from erasure.loading import load_model

    model = load_model(TOY_CONFIG, TOY_DIR / "model.safetensors", verbose=False)
    meta = json.loads((TOY_DIR / "model.json").read_text())
    assert meta["null_space"]["null_space_dims"] >= 64
    assert model.parameterization == OmegaConf.load(TOY_CONFIG).model.params.parameterization
    total = sum(f.stat().st_size for f in TOY_DIR.rglob("*") if f.is_file())
    assert total <= 40 * 2**20, f"models/toy holds {total / 2**20:.1f} MB (limit 40)"


@pytest.mark.slow
def test_shipped_model_draws_the_prompted_artist() -> None:
    """The default sampler, 4 held-out seeds per class: the oracle recognises most samples."""
    from erasure.loading import load_model
    from erasure.toy.quality import measure_quality

    model = load_model(TOY_CONFIG, TOY_DIR / "model.safetensors", verbose=False)
    report = measure_quality(model, load_oracle(), num_samples=4, seed=10_000)
    hits = list(report.artist.values())
    assert min(hits) >= 0.5 and sum(hits) / len(hits) >= 0.8, report.artist
    assert report.object >= 0.5 and report.colour >= 0.5, report
