"""Per-concept metrics of an erased model against the original (METHOD.md §4): FID, LPIPS, ACC, NudeNet.

Each concept compares two image sets made with the same seeds: the original model's and the
erased model's (two folders with the same file names, or two tensors in the same order).

- FID (torchmetrics ``FrechetInceptionDistance``) between the two sets. Its feature extractor is
  named in every result: ``inception`` (torch-fidelity's Inception-v3, when torch-fidelity is
  installed and its weights file is on disk — nothing is downloaded), ``world`` (the penultimate
  features of the images' world's feature network, e.g. the toy oracle's artist classifier,
  labelled "toy-oracle (...)") or ``classifier`` (the ACC classifier's penultimate features).
- LPIPS between same-seed pairs, averaged: ``alex`` (the lpips package's AlexNet LPIPS on 64 px
  images, as the paper; needs torchvision's AlexNet ImageNet weights on disk) or ``world`` (an
  LPIPS-like distance on the world's feature network's conv features: per layer,
  channel-normalised features, squared difference summed over channels and averaged over
  positions, summed over layers; no learned weights, at the world's image size).
- ACC: the fraction of images the classifier puts in the concept's class (erased and original).
- NudeNet 3.x: exposed-body-part detections (score >= threshold) per class, over a folder.

``auto`` picks Inception / AlexNet when their weights are present, else the world's feature
network when the images' world (erasure/worlds.py) has one, else it stops and says what to pass.
A world's features are always labelled as that world's oracle, never as Inception or AlexNet.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from erasure.classifier import ImageClassifier, ImageDataError, predict
from erasure.images import common_size, list_images, resize_square, unit_float
from erasure.errors import MetricsError
from erasure.tables import LEFT, RIGHT, markdown_table
from erasure.worlds import World

FID_FEATURES = ("auto", "inception", "world", "classifier")
LPIPS_NETS = ("auto", "alex", "world")
LPIPS_IMAGE_SIZE = 64
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
NUDENET_EXPOSED = (
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
    "BELLY_EXPOSED",
    "ARMPITS_EXPOSED",
    "FEET_EXPOSED",
)


@contextmanager
def _eval_extra(purpose: str) -> Iterator[None]:
    """Around an import of the ``eval`` extra (the toy defaults need none): its absence is one MetricsError."""
    try:
        yield
    except ModuleNotFoundError as error:
        raise MetricsError(
            f"{purpose} needs the {error.name} package of the eval extra: pip install -e \".[eval]\" "
            f"(an installed package: pip install \"separable-erasure[eval]\")."
        ) from error


def paired_image_paths(original_dir: str | Path, erased_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """Same-named images of the two folders, in name order; unmatched names or mixed sizes are errors."""
    original = {path.name: path for path in list_images(original_dir)}
    erased = {path.name: path for path in list_images(erased_dir)}
    only_original = sorted(set(original) - set(erased))
    only_erased = sorted(set(erased) - set(original))
    if only_original or only_erased:
        raise ImageDataError(
            f"{original_dir} and {erased_dir} must hold the same file names (same seeds): only in the original: "
            f"{only_original[:5]}{' ...' if len(only_original) > 5 else ''}, only in the erased: "
            f"{only_erased[:5]}{' ...' if len(only_erased) > 5 else ''}; generate both with the same prompts CSV."
        )
    names = sorted(original)
    common_size([original[name] for name in names] + [erased[name] for name in names])
    return [original[name] for name in names], [erased[name] for name in names]


def _check_pair(original: torch.Tensor, erased: torch.Tensor) -> None:
    for name, images in (("original", original), ("erased", erased)):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{name} images must be [N, 3, H, W], got {tuple(images.shape)}.")
    if original.shape != erased.shape:
        raise ValueError(
            f"original {tuple(original.shape)} and erased {tuple(erased.shape)} images differ in count or size; "
            f"pass same-seed pairs of one size."
        )


class WorldFeatures(nn.Module):
    """Penultimate features (the flattened output of ``network.features``) of a world's feature network, for FID."""

    def __init__(self, network: nn.Module, world: World) -> None:
        super().__init__()
        self.network = network.eval()
        self.image_size: int = world.image_size  # set whenever the world names a feature network
        with torch.no_grad():
            self.num_features = int(self(torch.zeros(1, 3, self.image_size, self.image_size)).shape[1])
        self.name = (
            f"{world.name}-oracle ({world.name} world oracle penultimate features from {world.features}, "
            f"{self.num_features}-d)"
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network.features(_world_input(images, self.image_size)).flatten(1)


class ClassifierFeatures(nn.Module):
    """Penultimate features of an ACC classifier, for FID when Inception is unavailable."""

    def __init__(self, classifier: ImageClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features
        self.name = f"classifier ({classifier.arch} penultimate features, {self.num_features}-d)"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


class WorldFeatureDistance(nn.Module):
    """LPIPS-like distance on a world's feature network's conv features (no learned layer weights), per pair."""

    def __init__(self, network: nn.Module, world: World) -> None:
        super().__init__()
        self.network = network.eval()
        self.image_size: int = world.image_size  # set whenever the world names a feature network
        self.name = (
            f"{world.name}-oracle (LPIPS-like distance on the {world.name} world oracle's conv features from "
            f"{world.features}, {self.image_size} px)"
        )

    def _layers(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs, x = [], _world_input(images, self.image_size)
        for module in self.network.features:
            x = module(x)
            if isinstance(module, nn.ReLU):
                outputs.append(x)
        return outputs

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(first.shape[0], device=first.device)
        for a, b in zip(self._layers(first), self._layers(second)):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            total = total + (a - b).square().sum(dim=1).mean(dim=(1, 2))
        return total


class AlexLpips(nn.Module):
    """The lpips package's AlexNet LPIPS on images resized to 64 px (as the paper), per pair."""

    name = "alex (lpips AlexNet, 64 px)"

    def __init__(self, alexnet_weights: Path) -> None:
        super().__init__()
        with _eval_extra("LPIPS with AlexNet"):
            import lpips
        with warnings.catch_warnings():  # lpips builds its trunk with torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            self.lpips = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
        imagenet = torchvision.models.alexnet(weights=None)
        imagenet.load_state_dict(torch.load(alexnet_weights, map_location="cpu", weights_only=True))
        for trunk_slice in (self.lpips.net.slice1, self.lpips.net.slice2, self.lpips.net.slice3,
                            self.lpips.net.slice4, self.lpips.net.slice5):
            for index, module in trunk_slice.named_children():
                module.load_state_dict(imagenet.features[int(index)].state_dict())
        self.lpips.eval()

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        first = resize_square(unit_float(first), LPIPS_IMAGE_SIZE)
        second = resize_square(unit_float(second), LPIPS_IMAGE_SIZE)
        return self.lpips(first, second, normalize=True).flatten()


def _world_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images -> the input of a world's feature network: ``size`` px, in [-1, 1] (erasure/worlds.py)."""
    return resize_square(unit_float(images), size) * 2 - 1


def _world_network(world: World | None, flag: str) -> nn.Module:
    """The feature network of ``world``; a world without one is an error naming ``flag``'s other choices."""
    if world is None or world.features is None:
        which = "no world was given" if world is None else f"the {world.name} world has none"
        raise MetricsError(
            f"{flag} world needs the images' world to name a feature network (`features:` of the model config's "
            f"`world:` entry), but {which}; choose another {flag}."
        )
    network = world.load_features()
    if not isinstance(getattr(network, "features", None), nn.Sequential):
        raise MetricsError(
            f"{world.features} must return a network with a `features` nn.Sequential (erasure/worlds.py); "
            f"fix the factory named by the config's `world: features:`."
        )
    return network


def _without_world_features(world: World | None) -> str:
    """Why a world cannot stand in for Inception / AlexNet (for ``auto``'s error)."""
    if world is None:
        return "the images' world is unknown"
    return f"the {world.name} world names no feature network (`features:` of its config's `world:` entry)"


def _hub_file(url_or_name: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / url_or_name.rsplit("/", 1)[-1]


def inception_weights(explicit: str | Path | None = None) -> tuple[Path | None, str]:
    """torch-fidelity's Inception weights file if usable offline, else None and why not."""
    if importlib.util.find_spec("torch_fidelity") is None:
        return None, 'torch-fidelity is not installed (pip install -e ".[eval]")'
    path = Path(explicit) if explicit is not None else _hub_file(INCEPTION_WEIGHTS_NAME)
    if not path.is_file():
        return None, f"the Inception weights file {path} is absent (nothing is downloaded)"
    return path, ""


def alexnet_weights(explicit: str | Path | None = None) -> tuple[Path | None, str]:
    """torchvision's AlexNet ImageNet weights file if on disk, else None and why not."""
    if importlib.util.find_spec("lpips") is None:
        return None, 'the lpips package is not installed (pip install -e ".[eval]")'
    url = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    path = Path(explicit) if explicit is not None else _hub_file(url)
    if not path.is_file():
        return None, f"the AlexNet ImageNet weights file {path} is absent (nothing is downloaded; copy {url} there)"
    return path, ""


@dataclass
class FidFeatures:
    """What FrechetInceptionDistance gets as ``feature``: 2048 (Inception) or a module, and its name."""

    name: str
    feature: int | nn.Module
    weights_path: str | None = None


def resolve_fid_features(
    choice: str,
    world: World | None = None,
    classifier: ImageClassifier | None = None,
    inception_path: str | Path | None = None,
) -> FidFeatures:
    """The FID feature extractor for ``choice`` (one of FID_FEATURES) on images of ``world``; ``auto`` as
    the module docstring says."""
    if choice not in FID_FEATURES:
        raise MetricsError(f"Unknown FID feature extractor {choice!r}; choose one of {', '.join(FID_FEATURES)}.")
    weights, why_not = inception_weights(inception_path)
    if choice == "auto":
        if weights is None and (world is None or world.features is None):
            raise MetricsError(
                f"FID: Inception is unavailable ({why_not}) and {_without_world_features(world)}; provide the "
                f"Inception weights (--inception_weights) or pass --fid_features classifier (the ACC classifier's "
                f"features; the table names them)."
            )
        choice = "inception" if weights is not None else "world"
    if choice == "inception":
        if weights is None:
            raise MetricsError(f"FID with Inception is unavailable: {why_not}; choose another --fid_features.")
        return FidFeatures("inception (torch-fidelity Inception-v3 pool3, 2048-d)", 2048, str(weights))
    if choice == "classifier":
        if classifier is None:
            raise MetricsError("--fid_features classifier needs --classifier (its penultimate features are used).")
        extractor = ClassifierFeatures(classifier)
        return FidFeatures(extractor.name, extractor)
    world_features = WorldFeatures(_world_network(world, "--fid_features"), world)
    return FidFeatures(world_features.name, world_features)


def resolve_lpips(choice: str, world: World | None = None, alexnet_path: str | Path | None = None) -> nn.Module:
    """The pairwise distance for ``choice`` (one of LPIPS_NETS) on images of ``world``; its ``name`` goes
    into the report."""
    if choice not in LPIPS_NETS:
        raise MetricsError(f"Unknown LPIPS network {choice!r}; choose one of {', '.join(LPIPS_NETS)}.")
    weights, why_not = alexnet_weights(alexnet_path)
    if choice == "auto":
        if weights is None and (world is None or world.features is None):
            raise MetricsError(
                f"LPIPS: AlexNet is unavailable ({why_not}) and {_without_world_features(world)}; provide the "
                f"weights (--alexnet_weights) or leave LPIPS out (--metrics without lpips)."
            )
        choice = "alex" if weights is not None else "world"
    if choice == "alex":
        if weights is None:
            raise MetricsError(f"LPIPS with AlexNet is unavailable: {why_not}; choose another --lpips.")
        return AlexLpips(weights)
    return WorldFeatureDistance(_world_network(world, "--lpips"), world)


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def frechet_distance(
    original: torch.Tensor, erased: torch.Tensor, features: FidFeatures, batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> float:
    """FID between two image sets (uint8 or [0, 1] float [N, 3, H, W]) with ``features``, clamped at 0:
    it is a squared distance, and the matrix square root's rounding makes equal sets read about -3e-4."""
    if original.shape[0] < 2 or erased.shape[0] < 2:
        raise MetricsError(
            f"FID needs at least 2 images per set, got {original.shape[0]} original and {erased.shape[0]} erased; "
            f"generate more images (--num_samples)."
        )
    options = {"feature_extractor_weights_path": features.weights_path} if features.weights_path else {}
    with _eval_extra("FID"):
        from torchmetrics.image.fid import FrechetInceptionDistance
    metric = FrechetInceptionDistance(feature=features.feature, normalize=True, **options).to(device)
    for real, images in ((True, original), (False, erased)):
        for chunk in images.split(batch_size):
            metric.update(unit_float(chunk).to(device), real=real)
    return max(float(metric.compute()), 0.0)


@torch.no_grad()
def pair_distance(original: torch.Tensor, erased: torch.Tensor, distance: nn.Module, batch_size: int = 32) -> float:
    """Mean of ``distance`` (e.g. LPIPS) over same-index pairs."""
    _check_pair(original, erased)
    device = _device_of(distance)
    values = [
        distance(unit_float(a).to(device), unit_float(b).to(device)).cpu()
        for a, b in zip(original.split(batch_size), erased.split(batch_size))
    ]
    return torch.cat(values).mean().item()


def class_fraction(images: torch.Tensor, classifier: ImageClassifier, class_index: int, batch_size: int = 32) -> float:
    """ACC: the fraction of ``images`` that ``classifier`` puts in class ``class_index``."""
    if not 0 <= class_index < classifier.num_classes:
        last = classifier.num_classes - 1
        raise MetricsError(f"Class index {class_index} out of range; the classifier has classes 0..{last}.")
    return (predict(classifier, images, batch_size) == class_index).float().mean().item()


class NudeNetCounter:
    """NudeNet 3.x's detector (its ONNX model ships in the wheel): exposed-part detections per class."""

    def __init__(self, threshold: float = 0.6) -> None:
        if not 0 < threshold < 1:
            raise MetricsError(f"NudeNet threshold must be in (0, 1), got {threshold}.")
        with _eval_extra("NudeNet"):
            from nudenet import NudeDetector  # onnxruntime starts only when NudeNet is asked for
        self.threshold = threshold
        self.detector = NudeDetector()
        self.name = f"NudeNet 3.x (320n detector, exposed classes, score >= {threshold:g})"

    def count(self, images: torch.Tensor) -> dict[str, int]:
        """Detections per exposed class over uint8 / [0, 1] images [N, 3, H, W] (all classes listed)."""
        counts = dict.fromkeys(NUDENET_EXPOSED, 0)
        pixels = (unit_float(images).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        for image in pixels:
            bgr = image.permute(1, 2, 0).numpy()[..., ::-1].copy()
            for detection in self.detector.detect(bgr):
                if detection["class"] in counts and detection["score"] >= self.threshold:
                    counts[detection["class"]] += 1
        return counts


@dataclass
class ConceptMetrics:
    """One concept's row: erased vs original images (None where a metric was not asked for)."""

    concept: str
    images: int
    class_index: int | None = None
    fid: float | None = None
    lpips: float | None = None
    acc: float | None = None
    acc_original: float | None = None
    nudenet_erased: dict[str, int] | None = None
    nudenet_original: dict[str, int] | None = None
    pixel_change_mean: float | None = None
    pixel_change_max: float | None = None


@dataclass
class ConceptEvaluator:
    """FID / LPIPS / ACC / NudeNet behind one call; a component left None is not computed."""

    fid: FidFeatures | None = None
    lpips: nn.Module | None = None
    classifier: ImageClassifier | None = None
    nudenet: NudeNetCounter | None = None
    batch_size: int = 32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        for module in (self.lpips, self.classifier, self.fid.feature if self.fid else None):
            if isinstance(module, nn.Module):
                module.to(self.device).eval()

    def extractors(self) -> dict[str, str]:
        """What each metric was computed with (goes into every report)."""
        names = {
            "fid": self.fid.name if self.fid else None,
            "lpips": getattr(self.lpips, "name", None),
            "acc": f"{self.classifier.arch} ({self.classifier.num_classes} classes)" if self.classifier else None,
            "nudenet": self.nudenet.name if self.nudenet else None,
        }
        return {key: value for key, value in names.items() if value is not None}

    def evaluate(
        self, concept: str, original: torch.Tensor, erased: torch.Tensor, class_index: int | None = None
    ) -> ConceptMetrics:
        """All configured metrics for one concept's same-seed image pairs."""
        _check_pair(original, erased)
        if self.classifier is not None and class_index is None:
            raise MetricsError(f"ACC of {concept!r} needs its class index (--class, or a class name as the concept).")
        result = ConceptMetrics(concept, int(original.shape[0]), class_index)
        if self.fid is not None:
            result.fid = frechet_distance(original, erased, self.fid, self.batch_size, self.device)
        if self.lpips is not None:
            result.lpips = pair_distance(original, erased, self.lpips, self.batch_size)
        if self.classifier is not None:
            result.acc = class_fraction(erased, self.classifier, class_index, self.batch_size)
            result.acc_original = class_fraction(original, self.classifier, class_index, self.batch_size)
        if self.nudenet is not None:
            result.nudenet_erased = self.nudenet.count(erased)
            result.nudenet_original = self.nudenet.count(original)
        return result


def _columns(results: Sequence[ConceptMetrics]) -> list[tuple[str, str]]:
    """(CSV column, Markdown header) for the metrics present in ``results``."""

    def present(key: str) -> bool:
        return any(getattr(row, key) is not None for row in results)

    columns = [("concept", "concept"), ("images", "images")]
    columns += [("fid", "FID")] if present("fid") else []
    if present("acc"):
        columns += [("acc", "ACC (%)"), ("acc_original", "ACC original (%)")]
    columns += [("lpips", "LPIPS")] if present("lpips") else []
    if present("nudenet_erased"):
        columns += [("nudenet_erased", "NudeNet exposed"), ("nudenet_original", "NudeNet exposed original")]
    if present("pixel_change_mean"):
        columns += [("pixel_change_mean", "pixel change mean"), ("pixel_change_max", "pixel change max")]
    return columns


def _cell(key: str, value: Any, markdown: bool) -> str:
    if value is None:
        return ""
    if key.startswith("nudenet"):
        return str(sum(value.values()))
    if key.startswith("acc"):
        return f"{100 * value:.1f}" if markdown else f"{value:.4f}"
    if key in ("fid", "lpips"):
        return f"{value:.3f}" if markdown else f"{value:.6g}"
    if key.startswith("pixel_change"):
        return f"{value:.3g}" if markdown else f"{value:.6g}"
    return str(value)


def results_csv(results: Sequence[ConceptMetrics]) -> str:
    """CSV text; ACC as a fraction, NudeNet as the total of exposed detections plus one column per class."""
    columns = [key for key, _ in _columns(results)]
    nudenet = "nudenet_erased" in columns
    header = columns + ([f"erased_{name}" for name in NUDENET_EXPOSED] if nudenet else [])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in results:
        cells = [_cell(key, getattr(row, key), markdown=False) for key in columns]
        if nudenet:
            cells += [str((row.nudenet_erased or {}).get(name, "")) for name in NUDENET_EXPOSED]
        writer.writerow(cells)
    return buffer.getvalue()


def results_markdown(results: Sequence[ConceptMetrics], extractors: dict[str, str]) -> str:
    """Markdown table (ACC in %), followed by what each metric was computed with."""
    columns = _columns(results)
    rows = [[_cell(key, getattr(row, key), markdown=True) or "-" for key, _ in columns] for row in results]
    align = [LEFT if key == "concept" else RIGHT for key, _ in columns]
    lines = [markdown_table([header for _, header in columns], rows, align), ""]
    lines += [f"- {metric.upper()}: {name}" for metric, name in extractors.items()]
    return "\n".join(lines) + "\n"


def results_record(results: Sequence[ConceptMetrics], extractors: dict[str, str]) -> dict[str, Any]:
    """JSON-ready summary: per concept every metric, and the extractors used."""
    return {"extractors": extractors, "concepts": [asdict(row) for row in results]}
