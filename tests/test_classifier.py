"""The ACC classifier: generate-data folders, training (toy-cnn from scratch, resnet18 head only),
files, class-count checks, bad folders, and the two scripts (tiny synthetic images, no network)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from erasure.classifier import (
    ClassifierTrainingConfig,
    ImageDataError,
    build_classifier,
    evaluate_classifier,
    load_classifier,
    predict,
    save_classifier,
    scan_split,
    single_class_images,
    train_classifier,
)
from erasure.images import read_images
from erasure.files import ErasureFileError
from erasure.loading import TOY_CONFIG
from erasure.worlds import WorldError, world_from_config_file

REPO_ROOT = Path(__file__).resolve().parents[1]
SD_CONFIG = REPO_ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
TOY_WORLD = world_from_config_file(TOY_CONFIG)
FAST = ClassifierTrainingConfig(epochs=10, batch_size=8)


def class_colour(index: int) -> np.ndarray:
    """A distinct mean colour per class (hue steps around the colour wheel)."""
    angle = 2 * np.pi * index / 10
    return 128 + 100 * np.array([np.cos(angle), np.cos(angle - 2.1), np.cos(angle + 2.1)])


def write_class_images(folder: Path, class_index: int, count: int, size: int = 32, seed: int = 0) -> list[Path]:
    """Noisy images of one flat colour per class: separable, but not trivially identical."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed * 1000 + class_index)
    paths = []
    for index in range(count):
        pixels = class_colour(class_index)[None, None, :] + rng.normal(0, 30, (size, size, 3))
        path = folder / f"{index:05d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def write_data(root: Path, num_classes: int, train: int = 12, held_out: int = 6, size: int = 32) -> Path:
    for split, count, seed in (("train", train, 0), ("eval", held_out, 1)):
        for class_index in range(num_classes):
            write_class_images(root / split / str(class_index), class_index, count, size, seed)
    return root


def load_script(folder: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), REPO_ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def last_json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_toy_cnn_learns_separable_classes_and_round_trips(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data", num_classes=3)
    classifier, note = build_classifier("toy-cnn", ["red", "green", "blue"])
    assert classifier.trained_layers == "all" and "scratch" in note
    train, held_out = scan_split(data, "train", 3), scan_split(data, "eval", 3)
    fit = train_classifier(classifier, train, FAST, log=lambda line: None)
    result = evaluate_classifier(classifier, held_out)
    assert result["accuracy"] >= 0.9, result
    assert set(result["per_class"]) == {"red", "green", "blue"} and result["images"] == 18

    path, sidecar = save_classifier(classifier, tmp_path / "cls.safetensors", {"training": fit})
    loaded = load_classifier(path, num_classes=3)
    images = read_images(list(held_out.paths))
    assert torch.equal(predict(loaded, images), predict(classifier, images))
    assert loaded.record["training"]["train_images"] == 36
    assert json.loads(sidecar.read_text())["class_names"] == ["red", "green", "blue"]
    with pytest.raises(ErasureFileError, match="already exists"):
        save_classifier(classifier, path, {})


def test_loading_for_another_class_count_is_refused(tmp_path: Path) -> None:
    classifier, _ = build_classifier("toy-cnn", ["a", "b", "c"])
    path, _ = save_classifier(classifier, tmp_path / "three.safetensors", {})
    with pytest.raises(ErasureFileError, match="classifies 3 classes .* 10 are needed"):
        load_classifier(path, num_classes=10)


def test_resnet18_trains_only_its_head_from_pretrained_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    data = write_data(tmp_path / "data", num_classes=3, train=8, held_out=4)
    classifier, note = build_classifier("resnet18", ["a", "b", "c"], pretrained_path=weights, input_size=64)
    assert classifier.trained_layers == "head" and str(weights) in note
    before = {key: value.clone() for key, value in classifier.backbone.state_dict().items()}
    head_before = classifier.head.weight.clone()
    train = scan_split(data, "train", 3)
    train_classifier(classifier, train, ClassifierTrainingConfig(epochs=20, batch_size=8), log=lambda line: None)
    after = classifier.backbone.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # frozen, BN statistics included
    assert not torch.equal(classifier.head.weight, head_before)
    # A random stand-in backbone gives weak features: the head must at least fit its training images.
    assert evaluate_classifier(classifier, train)["accuracy"] >= 0.9


def test_resnet18_without_local_imagenet_weights_needs_from_scratch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    with pytest.raises(FileNotFoundError, match="not available locally.*--from_scratch"):
        build_classifier("resnet18", ["a", "b"])
    classifier, note = build_classifier("resnet18", ["a", "b"], from_scratch=True)
    assert classifier.trained_layers == "all" and "from scratch" in note
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_classifier("resnet18", ["a", "b"], pretrained_path=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="trains from scratch"):
        build_classifier("toy-cnn", ["a", "b"], pretrained_path=tmp_path / "missing.pth")


def test_bad_folders_are_refused(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data", num_classes=3, train=2, held_out=1)
    with pytest.raises(ImageDataError, match=r"lacks class folders \[3\]"):
        scan_split(data, "train", 4)
    with pytest.raises(ImageDataError, match=r"class folders \[2\] beyond"):
        scan_split(data, "train", 2)
    with pytest.raises(ImageDataError, match="does not exist or holds no class folders"):
        scan_split(tmp_path / "nowhere", "train", 3)
    (data / "eval" / "1").rename(data / "eval" / "7")
    with pytest.raises(ImageDataError, match=r"lacks class folders \[1, 3, 4, 5, 6\]"):
        scan_split(data, "eval")
    (data / "eval" / "7").rename(data / "eval" / "1")
    for path in (data / "eval" / "1").iterdir():
        path.unlink()
    with pytest.raises(ImageDataError, match="holds no images"):
        scan_split(data, "eval", 3)
    write_class_images(data / "train" / "2", 2, 1, size=48, seed=5)  # overwrites 00000.png at another size
    with pytest.raises(ImageDataError, match="different sizes"):
        scan_split(data, "train", 3)
    with pytest.raises(ImageDataError, match="out of range"):
        single_class_images(data / "train" / "0", 5, 3)


def test_train_and_test_scripts_on_the_toy_world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_data(tmp_path / "data", num_classes=len(TOY_WORLD), train=4, held_out=2)
    save_path = tmp_path / "toy-cls.safetensors"
    train_args = ["--data", str(data), "--save_path", str(save_path)]  # the embedded toy model's world
    train_args += ["--epochs", "8", "--batch_size", "10"]
    train_script = load_script("train-scripts", "artist-cls-train")
    summary = train_script.main(train_args)
    assert last_json(capsys) == summary
    assert summary["arch"] == "toy-cnn" and summary["eval_accuracy"] >= 0.8
    assert set(summary["eval_per_class"]) == set(TOY_WORLD.names)
    assert json.loads(Path(summary["metadata"]).read_text())["world"] == "toy"
    with pytest.raises(ErasureFileError, match="already exists"):
        train_script.main(train_args)

    test_script = load_script("eval-scripts", "artist-cls-test")
    result = test_script.main(["--classifier", str(save_path), "--data", str(data)])
    assert last_json(capsys)["accuracy"] == result["accuracy"] == summary["eval_accuracy"]

    one_class = tmp_path / "images" / "sepce"
    write_class_images(one_class, 3, 4, seed=7)
    name = TOY_WORLD.names[3]
    result = test_script.main(["--classifier", str(save_path), "--images", str(one_class), "--class", name])
    assert list(result["per_class"]) == [name] and result["images"] == 4
    assert result["per_class"][name]["class_index"] == 3
    capsys.readouterr()

    four_classes = write_data(tmp_path / "four", num_classes=4, train=1, held_out=1)
    with pytest.raises(ErasureFileError, match="classifies 10 classes .* 4 are needed"):
        test_script.main(["--classifier", str(save_path), "--data", str(four_classes)])
    with pytest.raises(ValueError, match="Unknown class 'nobody'"):
        test_script.main(["--classifier", str(save_path), "--images", str(one_class), "--class", "nobody"])


def test_the_config_names_the_classes_and_the_architecture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SD's config has no `world:` entry: its nine artists and ResNet-18 (whose ImageNet weights are absent here)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    data = write_data(tmp_path / "data", num_classes=10, train=1, held_out=1)
    script = load_script("train-scripts", "artist-cls-train")
    base = ["--data", str(data), "--save_path", str(tmp_path / "sd.safetensors")]
    with pytest.raises(FileNotFoundError, match="ResNet-18 ImageNet weights are not available locally"):
        script.main([*base, "--config_path", str(SD_CONFIG)])
    old_style = tmp_path / "old.yaml"
    old_style.write_text("world: toy\nmodel:\n  target: x\n", encoding="utf-8")
    with pytest.raises(WorldError, match=r"old.yaml: `world:` must be a mapping"):
        script.main([*base, "--config_path", str(old_style)])
