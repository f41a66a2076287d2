"""The concept classifier behind ACC (METHOD.md §4): folders of generated images, two architectures,
training, evaluation and files.

Data is what ``eval-scripts/generate-data.py`` writes: ``{data}/{train|eval}/{class_index}/*.png``.
Architectures (``ARCHITECTURES``):

- ``resnet18`` — for Stable Diffusion: torchvision ResNet-18 with ImageNet weights (found
  locally, never downloaded), only the last layer trained, 20 epochs, SGD momentum 0.9, wd 5e-4,
  batch 30, lr up to 1e-2, as the paper (METHOD.md §4). It differs from the paper's recipe in
  three places: (1) inputs are resized to 224 px, where the paper centre-crops 512 px — the
  frozen ImageNet features are the ones the weights were trained for at 224 px, and the frozen
  pass costs about 5x less; (2) inputs get ImageNet normalisation, where the paper feeds [0, 1]
  pixels — the frozen backbone expects it, and only its last layer could adapt otherwise;
  (3) the lr follows one one-cycle schedule (up then down once over the 20 epochs), where the
  paper names a cyclic schedule without its cycle length — one cycle is the case of it that
  needs no extra hyper-parameter. ACC therefore matches the paper's classifier in kind, not to
  the decimal. ``from_scratch`` trains every layer from random weights instead and is recorded
  as such.
- ``toy-cnn`` — ``SmallCNN`` (below) on 32 px inputs in [-1, 1], trained from scratch: the
  architecture of the toy world's oracle, which is therefore usable as an ACC classifier as is.

A classifier takes images in [0, 1] (float) or [0, 255] (uint8) of any size and resizes them to
its input size itself, so every caller (training, ACC, scenes) feeds it the same way.

Training freezes the backbone in eval mode when only the head is trained: the backbone's
features are then a fixed function of each image, so they are computed once and the 20 epochs
run on the cached features (same result as running the frozen network every epoch).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from erasure.errors import ImageDataError
from erasure.files import (
    ErasureFileError,
    read_tensors,
    versions,
    write_json,
    write_tensors,
)
from erasure.images import common_size, list_images, read_image, resize_square, unit_float
from erasure.tables import LEFT, RIGHT, markdown_table

CLASSIFIER_KIND = "image-classifier"
SPLITS = ("train", "eval")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_HINT = "train one with `python train-scripts/artist-cls-train.py`"


@dataclass(frozen=True)
class LabelledImages:
    """Image files with class labels (one split of a generate-data folder, or one class's images)."""

    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    num_classes: int
    size: tuple[int, int]
    source: str

    def __len__(self) -> int:
        return len(self.paths)


def scan_split(data_root: str | Path, split: str, num_classes: int | None = None) -> LabelledImages:
    """``{data_root}/{split}/{0..num_classes-1}/*`` as labelled images.

    Every class folder must exist and hold images, all images one size. Class folders beyond
    ``num_classes`` are an error too (the data was made for another class mapping); with
    ``num_classes=None`` the folders found must be 0..N-1 without gaps.
    """
    if split not in SPLITS:
        raise ImageDataError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    split_dir = Path(data_root) / split
    folders = split_dir.iterdir() if split_dir.is_dir() else ()
    found = {int(p.name) for p in folders if p.is_dir() and p.name.isdigit()}
    if not found:
        raise ImageDataError(
            f"{split_dir} does not exist or holds no class folders (0, 1, ...); make them with "
            f"`python eval-scripts/generate-data.py --split {split} ...`, or point --data at the folder with {split}/."
        )
    expected = set(range(num_classes if num_classes is not None else max(found) + 1))
    if found - expected:
        raise ImageDataError(
            f"{split_dir} has class folders {sorted(found - expected)} beyond the {len(expected)} classes of this "
            f"mapping; use the data made for these classes or the matching class mapping."
        )
    if expected - found:
        raise ImageDataError(
            f"{split_dir} lacks class folders {sorted(expected - found)} (expected 0..{len(expected) - 1}); "
            f"generate them with eval-scripts/generate-data.py --split {split}."
        )
    paths: list[Path] = []
    labels: list[int] = []
    for class_index in range(len(expected)):
        class_paths = list_images(split_dir / str(class_index))
        paths += class_paths
        labels += [class_index] * len(class_paths)
    return LabelledImages(tuple(paths), tuple(labels), len(expected), common_size(paths), str(split_dir))


def single_class_images(folder: str | Path, class_index: int, num_classes: int) -> LabelledImages:
    """Every image of a flat folder (e.g. a generate-images output) labelled ``class_index``."""
    if not 0 <= class_index < num_classes:
        raise ImageDataError(f"Class index {class_index} out of range; this classifier knows 0..{num_classes - 1}.")
    paths = list_images(folder)
    return LabelledImages(tuple(paths), (class_index,) * len(paths), num_classes, common_size(paths), str(folder))


class ImageFileDataset(Dataset):
    """(uint8 image [3, H, W], label) pairs read from disk on demand."""

    def __init__(self, images: LabelledImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return read_image(self.images.paths[index]), self.images.labels[index]


class SmallCNN(nn.Module):
    """Pixel-unshuffle to 16x16x12 (lossless, cheap), two conv stages (16 -> 8 -> 4 px), and a
    linear layer on the 4x4 map, for 32 px images in [-1, 1].

    Flattening the 4x4 map instead of global pooling keeps where things are, which some styles
    need (a vertical gradient, a frame around the border).
    """

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            nn.PixelUnshuffle(2),
            *conv(12, width),
            *conv(width, 2 * width),
            *conv(2 * width, 2 * width),
            nn.MaxPool2d(2),
            *conv(2 * width, 4 * width),
            *conv(4 * width, 4 * width),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(4 * width * 4 * 4, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).flatten(1))


@dataclass(frozen=True)
class Architecture:
    """Input size and normalisation of an architecture (toy-cnn's maps [0, 1] to the oracle's [-1, 1])."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


ARCHITECTURES: dict[str, Architecture] = {
    "resnet18": Architecture(224, IMAGENET_MEAN, IMAGENET_STD),
    "toy-cnn": Architecture(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _architecture(arch: str) -> Architecture:
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown classifier architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}.")
    return ARCHITECTURES[arch]


class ImageClassifier(nn.Module):
    """``backbone`` (image -> feature vector) and ``head`` (Linear), with its own resizing and
    normalisation. ``class_names`` index the outputs; ``trained_layers`` is "head" or "all"."""

    def __init__(
        self,
        arch: str,
        class_names: Sequence[str],
        input_size: int | None = None,
        width: int = 16,
        trained_layers: str = "all",
    ) -> None:
        super().__init__()
        spec = _architecture(arch)
        if len(class_names) < 2:
            raise ValueError(f"A classifier needs at least 2 classes, got {list(class_names)}.")
        if trained_layers not in ("head", "all"):
            raise ValueError(f"trained_layers must be 'head' or 'all', got {trained_layers!r}.")
        self.arch = arch
        self.class_names = list(class_names)
        self.input_size = int(input_size or spec.input_size)
        self.width = width
        self.trained_layers = trained_layers
        self.record: dict[str, Any] = {}  # what load_classifier read besides the architecture
        if arch == "resnet18":
            network = torchvision.models.resnet18(weights=None)
            feature_dim = network.fc.in_features
            network.fc = nn.Identity()
            self.backbone: nn.Module = network
            self.head = nn.Linear(feature_dim, len(class_names))
        else:
            if self.input_size != spec.input_size:
                raise ValueError(f"toy-cnn takes {spec.input_size} px inputs (fixed layout), got {self.input_size}.")
            network = SmallCNN(len(class_names), width)
            self.backbone = nn.Sequential(network.features, nn.Flatten(1))
            self.head = network.head
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_features(self) -> int:
        return self.head.in_features

    def class_index(self, name_or_index: str | int) -> int:
        """The output index of a class index ("3", 3) or name (case-insensitive, e.g. "Van Gogh", "blank")."""
        text = " ".join(str(name_or_index).split()).lower()
        if text.isdigit() and int(text) < self.num_classes:
            return int(text)
        for index, name in enumerate(self.class_names):
            if name.lower() == text:
                return index
        listing = ", ".join(f"{index} {name}" for index, name in enumerate(self.class_names))
        raise ValueError(f"Unknown class {name_or_index!r} for this classifier; valid: {listing}.")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [0, 1] images [B, 3, H, W] -> normalised [B, 3, S, S] on the model's device."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected RGB images [B, 3, H, W], got shape {tuple(images.shape)}.")
        x = resize_square(unit_float(images.to(self.mean.device)), self.input_size)
        return (x - self.mean) / self.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, num_features]."""
        return self.backbone(self.preprocess(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def metadata(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "class_names": self.class_names,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "width": self.width,
            "trained_layers": self.trained_layers,
        }


def imagenet_weights_file() -> Path:
    """Where torchvision keeps ResNet-18's ImageNet weights once downloaded (torch hub cache)."""
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def build_classifier(
    arch: str,
    class_names: Sequence[str],
    pretrained_path: str | Path | None = None,
    from_scratch: bool = False,
    input_size: int | None = None,
    seed: int = 0,
) -> tuple[ImageClassifier, str]:
    """A new classifier (random layers drawn from ``seed``) and a note of where its starting weights came from.

    ``resnet18`` starts from ImageNet weights (``pretrained_path`` or torchvision's cache; never
    downloaded) and trains only its head; without them it refuses unless ``from_scratch``, which
    trains every layer. ``toy-cnn`` always trains from scratch.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_classifier(arch, class_names, pretrained_path, from_scratch, input_size)


def _build_classifier(
    arch: str,
    class_names: Sequence[str],
    pretrained_path: str | Path | None,
    from_scratch: bool,
    input_size: int | None,
) -> tuple[ImageClassifier, str]:
    _architecture(arch)
    if arch == "toy-cnn":
        if pretrained_path is not None:
            raise ValueError("toy-cnn trains from scratch; drop --pretrained_path (it is for resnet18).")
        classifier = ImageClassifier(arch, class_names, input_size, trained_layers="all")
        return classifier, "none (toy-cnn, trained from scratch)"
    weights = Path(pretrained_path) if pretrained_path is not None else imagenet_weights_file()
    if pretrained_path is not None and not weights.is_file():
        raise FileNotFoundError(f"--pretrained_path {weights} does not exist; pass the ResNet-18 ImageNet .pth file.")
    if from_scratch:
        if pretrained_path is not None:
            raise ValueError("--from_scratch and --pretrained_path contradict each other; pass one.")
        classifier = ImageClassifier(arch, class_names, input_size, trained_layers="all")
        return classifier, "none (from scratch, all layers trained)"
    if not weights.is_file():
        raise FileNotFoundError(
            f"ResNet-18 ImageNet weights are not available locally (looked for {weights}; nothing is downloaded). "
            f"Copy {torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url} there or pass --pretrained_path FILE; "
            f"or pass --from_scratch to train all layers from random weights (not the paper's recipe)."
        )
    classifier = ImageClassifier(arch, class_names, input_size, trained_layers="head")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    backbone_state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    try:
        classifier.backbone.load_state_dict(backbone_state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{weights} is not a torchvision ResNet-18 state dict ({error}).") from error
    return classifier, f"pretrained ({weights})"


@dataclass(frozen=True)
class ClassifierTrainingConfig:
    """The paper's recipe (20 epochs, SGD momentum 0.9, wd 5e-4, batch 30, lr up to 1e-2) with one
    one-cycle schedule as its cyclic lr (module docstring: where this differs from the paper)."""

    epochs: int = 20
    batch_size: int = 30
    max_lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        small = [name for name in ("epochs", "batch_size", "eval_batch_size") if getattr(self, name) < 1]
        if small or self.max_lr <= 0:
            raise ValueError(f"classifier training settings must be positive: {', '.join(small) or 'max_lr'}")


def _batches(images: LabelledImages, batch_size: int) -> DataLoader:
    return DataLoader(ImageFileDataset(images), batch_size=batch_size, shuffle=False)


@torch.no_grad()
def _frozen_features(classifier: ImageClassifier, images: LabelledImages, batch_size: int) -> torch.Tensor:
    classifier.eval()
    return torch.cat([classifier.features(batch) for batch, _ in _batches(images, batch_size)])


def _fit(
    trained: nn.Module,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    config: ClassifierTrainingConfig,
    device: torch.device,
    log: Callable[[str], None],
) -> float:
    """SGD with a one-cycle schedule over ``config.epochs``; returns the last epoch's mean loss."""
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(
        trained.parameters(), lr=config.max_lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    steps = config.epochs * len(loader)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.max_lr, total_steps=steps)
    epoch_loss = float("nan")
    for epoch in range(config.epochs):
        total, count = 0.0, 0
        for inputs, labels in loader:
            labels = labels.to(device)
            loss = F.cross_entropy(logits_of(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * labels.shape[0]
            count += labels.shape[0]
        epoch_loss = total / count
        log(f"epoch {epoch + 1:3d}/{config.epochs}  loss {epoch_loss:.4f}  lr {schedule.get_last_lr()[0]:.2e}")
    return epoch_loss


def train_classifier(
    classifier: ImageClassifier,
    train: LabelledImages,
    config: ClassifierTrainingConfig,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``classifier`` in place on ``train`` (head only or all layers, per ``trained_layers``)."""
    if train.num_classes != classifier.num_classes:
        raise ValueError(
            f"The data has {train.num_classes} classes but the classifier {classifier.num_classes}; "
            f"use data and class names of the same mapping."
        )
    torch.manual_seed(config.seed)
    device = classifier.mean.device
    started = time.time()
    labels = torch.tensor(train.labels)
    if classifier.trained_layers == "head":
        classifier.backbone.requires_grad_(False)
        features = _frozen_features(classifier, train, config.eval_batch_size)
        classifier.head.train()
        loss = _fit(classifier.head, classifier.head, TensorDataset(features, labels), config, device, log)
    else:
        classifier.train()
        loss = _fit(classifier, classifier, ImageFileDataset(train), config, device, log)
    classifier.eval()
    return {"final_loss": loss, "train_images": len(train), "train_seconds": round(time.time() - started, 1)}


@torch.no_grad()
def predict(classifier: ImageClassifier, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Class index per image (eval mode), for uint8 or [0, 1] float images [N, 3, H, W]."""
    classifier.eval()
    if images.shape[0] == 0:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([classifier(chunk).argmax(dim=1).cpu() for chunk in images.split(batch_size)])


@torch.no_grad()
def evaluate_classifier(classifier: ImageClassifier, images: LabelledImages, batch_size: int = 64) -> dict[str, Any]:
    """Overall accuracy, and per class present in ``images``: accuracy and image count."""
    if images.num_classes != classifier.num_classes:
        raise ValueError(
            f"Classifier trained for {classifier.num_classes} classes ({', '.join(classifier.class_names)}) but "
            f"the images are labelled for {images.num_classes}; use a classifier made for these classes "
            f"({TRAIN_HINT})."
        )
    classifier.eval()
    predictions = torch.cat([classifier(batch).argmax(dim=1).cpu() for batch, _ in _batches(images, batch_size)])
    labels = torch.tensor(images.labels)
    correct = predictions == labels
    per_class: dict[str, dict[str, float | int]] = {}
    for index, name in enumerate(classifier.class_names):
        mask = labels == index
        if mask.any():
            accuracy = correct[mask].float().mean().item()
            per_class[name] = {"class_index": index, "accuracy": accuracy, "images": int(mask.sum())}
    predicted_counts = torch.bincount(predictions, minlength=classifier.num_classes).tolist()
    return {
        "accuracy": correct.float().mean().item(),
        "images": len(images),
        "per_class": per_class,
        "predicted": dict(zip(classifier.class_names, predicted_counts)),
    }


def accuracy_table(result: dict[str, Any]) -> str:
    """Markdown table of ``evaluate_classifier``'s per-class accuracies, with the overall row."""
    rows = [[row["class_index"], name or "(blank)", row["images"], f"{100 * row['accuracy']:.1f}"]
            for name, row in result["per_class"].items()]
    rows.append(["all", "", result["images"], f"{100 * result['accuracy']:.1f}"])
    return markdown_table(["class", "name", "images", "accuracy (%)"], rows, [RIGHT, LEFT, RIGHT, RIGHT])


def save_classifier(
    classifier: ImageClassifier, path: str | Path, record: dict[str, Any], overwrite: bool = False
) -> tuple[Path, Path]:
    """Weights (safetensors, metadata in its header) and the same metadata as ``{path}.json``."""
    metadata = {**classifier.metadata(), **record, "versions": versions()}
    path = write_tensors(path, classifier.state_dict(), CLASSIFIER_KIND, metadata, overwrite=overwrite)
    sidecar = write_json(metadata, path.with_suffix(".json"))
    return path, sidecar


def load_classifier(
    path: str | Path, device: str | torch.device = "cpu", num_classes: int | None = None
) -> ImageClassifier:
    """A saved classifier in eval mode; ``num_classes`` (when given) must match the file's."""
    tensors, metadata = read_tensors(path, CLASSIFIER_KIND)
    if num_classes is not None and metadata["num_classes"] != num_classes:
        raise ErasureFileError(
            f"{path} classifies {metadata['num_classes']} classes ({', '.join(metadata['class_names'])}) but "
            f"{num_classes} are needed here; {TRAIN_HINT} on data with {num_classes} classes."
        )
    classifier = ImageClassifier(
        metadata["arch"], metadata["class_names"], metadata["input_size"], metadata["width"], metadata["trained_layers"]
    )
    try:
        classifier.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        message = f"{path}: weights do not fit its recorded architecture ({error}); {TRAIN_HINT}."
        raise ErasureFileError(message) from error
    classifier.record = {key: value for key, value in metadata.items() if key not in classifier.metadata()}
    return classifier.to(device).eval()
