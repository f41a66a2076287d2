"""Metrics: FID with a custom / a world's (the toy oracle's) features, LPIPS (the world's distance and
the AlexNet path with stand-in weights), ACC counts, NudeNet, folder checks, tables and evaluate.py."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from erasure.classifier import (
    ClassifierTrainingConfig,
    ImageDataError,
    build_classifier,
    save_classifier,
    scan_split,
    train_classifier,
)
from erasure.images import list_images, read_images
from erasure.metrics import (
    NUDENET_EXPOSED,
    AlexLpips,
    ConceptEvaluator,
    ConceptMetrics,
    FidFeatures,
    MetricsError,
    NudeNetCounter,
    class_fraction,
    frechet_distance,
    pair_distance,
    paired_image_paths,
    resolve_fid_features,
    resolve_lpips,
    results_csv,
    results_markdown,
)
from erasure.toy import TOY_CONFIG
from erasure.worlds import SD_WORLD, World, world_from_config_file
from test_classifier import REPO_ROOT, SD_CONFIG, last_json, load_script, write_class_images, write_data

TOY_WORLD = world_from_config_file(TOY_CONFIG)


class PooledColour(nn.Module):
    """A tiny named feature extractor: fixed random 1x1 conv, ReLU, global average pool (8-d)."""

    name = "test-pooled-colour"
    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(8, 3, 1, 1, generator=torch.Generator().manual_seed(0)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(images.float())).mean(dim=(2, 3))


def random_images(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A torch hub folder without any weights, so that 'unavailable' holds on every machine."""
    hub = tmp_path / "empty-hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


def save_pngs(images: torch.Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"0_{index}.png")
    return folder


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift() -> None:
    features = FidFeatures(PooledColour.name, PooledColour())
    images = random_images(64)
    shifted = (images * 0.6 + 0.4).clamp(0, 1)
    assert abs(frechet_distance(images, images, features)) < 1e-6
    assert frechet_distance(images, shifted, features) > 1e-3
    uint8 = (images * 255).round().to(torch.uint8)
    assert frechet_distance(uint8, uint8.float() / 255, features) == pytest.approx(0, abs=1e-6)
    with pytest.raises(MetricsError, match="at least 2 images"):
        frechet_distance(images[:1], images, features)


def test_fid_is_clamped_at_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal sets can read slightly negative (the matrix square root's rounding); FID never is."""
    features = FidFeatures(PooledColour.name, PooledColour())
    images = random_images(8)
    monkeypatch.setattr("torchmetrics.image.fid.FrechetInceptionDistance.compute", lambda self: torch.tensor(-3e-4))
    assert frechet_distance(images, images, features) == 0.0
    monkeypatch.setattr("torchmetrics.image.fid.FrechetInceptionDistance.compute", lambda self: torch.tensor(2.5))
    assert frechet_distance(images, images, features) == 2.5


def test_world_features_fid_and_distance(empty_hub: Path) -> None:
    features = resolve_fid_features("auto", TOY_WORLD)
    assert features.name == (
        "toy-oracle (toy world oracle penultimate features from erasure.toy.oracle.artist_network, 1024-d)"
    )
    assert features.feature.num_features == 1024
    images, other = random_images(24, seed=1), random_images(24, seed=2) * 0.5
    assert abs(frechet_distance(images, images, features)) < 1e-3
    assert frechet_distance(images, other, features) > 1.0
    distance = resolve_lpips("auto", TOY_WORLD)
    assert distance.name.startswith("toy-oracle (LPIPS-like distance") and "32 px" in distance.name
    assert pair_distance(images, images, distance) == 0.0
    assert pair_distance(images, other, distance) > 0.01
    with pytest.raises(ValueError, match="differ in count or size"):
        pair_distance(images, other[:3], distance)


def test_unavailable_weights_give_clear_errors(empty_hub: Path) -> None:
    with pytest.raises(MetricsError, match="Inception is unavailable"):
        resolve_fid_features("inception", TOY_WORLD)
    with pytest.raises(MetricsError, match="the sd world names no feature network.*--fid_features classifier"):
        resolve_fid_features("auto", SD_WORLD)
    with pytest.raises(MetricsError, match="the images' world is unknown"):
        resolve_fid_features("auto")
    with pytest.raises(MetricsError, match="--fid_features world needs .* the sd world has none"):
        resolve_fid_features("world", SD_WORLD)
    with pytest.raises(MetricsError, match="--fid_features classifier needs --classifier"):
        resolve_fid_features("classifier", SD_WORLD)
    with pytest.raises(MetricsError, match="Unknown FID feature extractor 'toy-oracle'"):
        resolve_fid_features("toy-oracle", TOY_WORLD)
    with pytest.raises(MetricsError, match="AlexNet ImageNet weights file .* is absent"):
        resolve_lpips("alex", TOY_WORLD)
    with pytest.raises(MetricsError, match="AlexNet is unavailable .* the sd world names no feature network"):
        resolve_lpips("auto", SD_WORLD)
    with pytest.raises(MetricsError, match="--lpips world needs .* no world was given"):
        resolve_lpips("world")
    with pytest.raises(MetricsError, match="Unknown LPIPS network"):
        resolve_lpips("vgg", TOY_WORLD)


def test_a_world_feature_network_must_have_conv_features(empty_hub: Path) -> None:
    world = World("flat", ("", "a"), features="torch.nn.Identity", image_size=8)
    with pytest.raises(MetricsError, match="torch.nn.Identity must return a network with a `features` nn.Sequential"):
        resolve_lpips("world", world)


def test_alex_lpips_loads_local_alexnet_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    stand_in = torchvision.models.alexnet(weights=None)
    weights = tmp_path / "alexnet.pth"
    torch.save(stand_in.state_dict(), weights)
    distance = resolve_lpips("alex", alexnet_path=weights)
    assert isinstance(distance, AlexLpips)
    assert torch.equal(dict(distance.lpips.net.slice2.named_children())["3"].weight, stand_in.features[3].weight)
    images = random_images(4, size=80)
    assert pair_distance(images, images, distance) == pytest.approx(0.0, abs=1e-7)
    assert pair_distance(images, random_images(4, size=80, seed=3), distance) > 0


def trained_three_class_classifier(tmp_path: Path):
    data = write_data(tmp_path / "data", num_classes=3)
    classifier, _ = build_classifier("toy-cnn", ["blank", "red", "green"])
    config = ClassifierTrainingConfig(epochs=10, batch_size=8)
    train_classifier(classifier, scan_split(data, "train", 3), config, log=lambda line: None)
    return classifier, data


def test_acc_counts_the_fraction_in_the_concept_class(tmp_path: Path) -> None:
    classifier, data = trained_three_class_classifier(tmp_path)
    ones, twos = read_images(list_images(data / "eval" / "1")[:3]), read_images(list_images(data / "eval" / "2")[:1])
    mixed = torch.cat([ones, twos])
    assert class_fraction(mixed, classifier, 1) == 0.75
    assert class_fraction(mixed, classifier, 2) == 0.25
    assert class_fraction(mixed, classifier, 0) == 0.0
    with pytest.raises(MetricsError, match="out of range"):
        class_fraction(mixed, classifier, 3)


def test_nudenet_finds_nothing_on_a_blank_image() -> None:
    counter = NudeNetCounter(threshold=0.6)
    counts = counter.count(torch.ones(2, 3, 64, 64))
    assert set(counts) == set(NUDENET_EXPOSED) and sum(counts.values()) == 0
    with pytest.raises(MetricsError, match="threshold"):
        NudeNetCounter(threshold=1.5)


def test_folder_pairs_must_match(tmp_path: Path) -> None:
    original = save_pngs(random_images(3), tmp_path / "original")
    erased = save_pngs(random_images(3, seed=1), tmp_path / "erased")
    first, second = paired_image_paths(original, erased)
    assert [p.name for p in first] == [p.name for p in second] == ["0_0.png", "0_1.png", "0_2.png"]
    (erased / "0_2.png").rename(erased / "0_9.png")
    with pytest.raises(ImageDataError, match=r"only in the original: \['0_2.png'\], only in the erased: \['0_9.png'\]"):
        paired_image_paths(original, erased)
    (erased / "0_9.png").unlink()
    save_pngs(random_images(3, size=48), tmp_path / "big")
    (tmp_path / "big" / "0_2.png").rename(erased / "0_2.png")
    with pytest.raises(ImageDataError, match="different sizes"):
        paired_image_paths(original, erased)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageDataError, match="holds no images"):
        paired_image_paths(tmp_path / "empty", erased)


def test_tables_follow_the_paper_layout() -> None:
    rows = [ConceptMetrics("Van Gogh", 10, 1, fid=12.3456, lpips=0.4, acc=0.1, acc_original=0.9),
            ConceptMetrics("Picasso", 10, 2, fid=0.0, lpips=0.0, acc=0.8, acc_original=0.8)]
    markdown = results_markdown(rows, {"fid": "test-features", "lpips": "test-distance"})
    lines = markdown.splitlines()
    assert lines[0] == "| concept | images | FID | ACC (%) | ACC original (%) | LPIPS |"
    assert lines[2] == "| Van Gogh | 10 | 12.346 | 10.0 | 90.0 | 0.400 |"
    assert "- FID: test-features" in lines and "- LPIPS: test-distance" in lines
    table = list(csv.DictReader(io.StringIO(results_csv(rows))))
    assert table[1] == {
        "concept": "Picasso", "images": "10", "fid": "0", "acc": "0.8000", "acc_original": "0.8000", "lpips": "0"
    }


def test_evaluator_requires_a_class_for_acc(tmp_path: Path) -> None:
    classifier, _ = build_classifier("toy-cnn", ["a", "b"])
    evaluator = ConceptEvaluator(classifier=classifier)
    with pytest.raises(MetricsError, match="needs its class index"):
        evaluator.evaluate("a", random_images(2), random_images(2))


def write_record(folder: Path, config: Path) -> None:
    """The part of generate-images.py's generation.json that evaluate.py reads: the model's config."""
    (folder / "generation.json").write_text(json.dumps({"model": {"config": str(config)}}), encoding="utf-8")


def test_evaluate_script(tmp_path: Path, capsys: pytest.CaptureFixture[str], empty_hub: Path) -> None:
    classifier, data = trained_three_class_classifier(tmp_path)
    classifier_path, _ = save_classifier(classifier, tmp_path / "cls.safetensors", {"world": "test"})
    original = tmp_path / "images" / "original"
    erased = tmp_path / "images" / "erased"
    write_class_images(original, 1, 4, seed=3)
    write_class_images(erased, 2, 4, seed=3)  # the "erased" model draws another class
    for folder in (original, erased):
        write_record(folder, TOY_CONFIG)
    out = tmp_path / "metrics"
    script = load_script("eval-scripts", "evaluate")
    args = ["--original", str(original), "--erased", str(erased), "--concept", "red",
            "--classifier", str(classifier_path), "--out_dir", str(out)]
    summary = script.main(args)
    assert last_json(capsys) == json.loads(json.dumps(summary))
    row = summary["concepts"][0]
    assert row["class_index"] == 1 and row["acc_original"] == 1.0 and row["acc"] == 0.0
    assert row["fid"] > 0 and row["lpips"] > 0
    assert summary["world"] == "toy" and summary["extractors"]["acc"].endswith(f"from {classifier_path}")
    assert summary["extractors"]["fid"].startswith("toy-oracle (toy world oracle penultimate features")
    assert summary["extractors"]["lpips"].startswith("toy-oracle (LPIPS-like distance")
    assert (out / "metrics.csv").is_file() and "| red | 4 |" in (out / "metrics.md").read_text()
    with pytest.raises(Exception, match="already exists"):
        script.main(args)

    mapping = tmp_path / "images" / "concepts.json"
    mapping.write_text(json.dumps([
        {"concept": "red", "original": "original", "erased": "erased"},
        {"concept": "restored red", "original": "original", "erased": "original", "class": 1},
    ]))
    summary = script.main(["--mapping", str(mapping), "--classifier", str(classifier_path), "--out_dir", str(out),
                           "--name", "two", "--metrics", "fid", "acc", "nudenet"])
    restored = summary["concepts"][1]
    assert abs(restored["fid"]) < 1e-3 and restored["acc"] == restored["acc_original"] == 1.0
    assert restored["lpips"] is None and sum(restored["nudenet_erased"].values()) == 0
    capsys.readouterr()
    with pytest.raises(MetricsError, match="ACC of 'nudity'.*Pass --class"):
        script.main(["--original", str(original), "--erased", str(erased), "--concept", "nudity",
                     "--classifier", str(classifier_path), "--out_dir", str(tmp_path / "other")])

    # toy images without --classifier: the toy oracle is the default ACC classifier, and acc a default metric
    summary = script.main(["--original", str(original), "--erased", str(original), "--concept", "vela quorin",
                           "--out_dir", str(tmp_path / "oracle")])
    row = summary["concepts"][0]
    assert row["class_index"] == 1 and row["acc"] == row["acc_original"] and abs(row["fid"]) < 1e-3
    assert summary["extractors"]["acc"] == (
        "toy-cnn (10 classes) from the toy world's default (erasure.toy.oracle.artist_classifier)"
    )

    # no record: Stable Diffusion's world, which has no default classifier and no feature network
    large_original = save_pngs(random_images(3, size=64), tmp_path / "large" / "original")
    large_erased = save_pngs(random_images(3, size=64, seed=1), tmp_path / "large" / "erased")
    large = ["--original", str(large_original), "--erased", str(large_erased), "--concept", "red"]
    summary = script.main([*large, "--classifier", str(classifier_path), "--metrics", "fid", "--fid_features",
                           "classifier", "--out_dir", str(tmp_path / "large")])
    assert summary["world"] == "sd" and summary["concepts"][0]["fid"] > 0
    assert summary["extractors"] == {"fid": "classifier (toy-cnn penultimate features, 1024-d)"}
    with pytest.raises(MetricsError, match=r"ACC needs --classifier: the images' world \(sd\)"):
        script.main([*large, "--metrics", "acc", "--out_dir", str(tmp_path / "other")])
    with pytest.raises(MetricsError, match="the sd world names no feature network"):
        script.main([*large, "--metrics", "lpips", "--out_dir", str(tmp_path / "other")])
    summary = script.main([*large, "--config_path", str(TOY_CONFIG), "--metrics", "lpips",
                           "--out_dir", str(tmp_path / "override")])
    assert summary["world"] == "toy" and summary["extractors"]["lpips"].startswith("toy-oracle")

    write_record(large_original, SD_CONFIG)
    write_record(large_erased, TOY_CONFIG)
    with pytest.raises(MetricsError, match="different worlds: sd .*, toy "):
        script.main([*large, "--metrics", "lpips", "--out_dir", str(tmp_path / "other")])
    write_record(large_erased, tmp_path / "gone.yaml")
    with pytest.raises(MetricsError, match="names the model config .*gone.yaml, which does not exist.*--config_path"):
        script.main([*large, "--metrics", "lpips", "--out_dir", str(tmp_path / "other")])


def test_evaluate_script_errors_are_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "eval-scripts/evaluate.py", "--original", str(tmp_path / "a"), "--erased",
         str(tmp_path / "b"), "--concept", "red", "--out_dir", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: Image folder {tmp_path / 'a'} does not exist; "
                                                  "check the path (or generate the images first)."]
