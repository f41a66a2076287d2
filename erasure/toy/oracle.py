"""Oracle classifiers of the toy world: which artist (10 classes, blank included), object, colour.

They are the toy counterparts of the paper's artist ResNet-18 and object ResNet-50, but trained
on ground truth: rendered images. Generated images are never pixel-perfect (a first probe's
oracle, trained on clean renders, sent every slightly tinted background to one class), so
training jitters brightness, contrast, tint, noise and blur; the oracles must judge style,
shape and colour, not rendering accidents.

The artist oracle is also the toy world's evaluation equipment (the `world:` entry of
configs/toy/toy-ldm.yaml names these factories; METHOD.md §4): ``artist_classifier`` is the
default ACC classifier and ``artist_network`` the feature network of FID and the LPIPS-like
distance on toy images.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from erasure.classifier import ImageClassifier, SmallCNN
from erasure.files import atomic_path, write_json
from erasure.toy import TOY_DIR
from erasure.toy.render import random_scene, render_batch
from erasure.toy.world import CLASS_NAMES, COLOURS, OBJECTS

TASKS: dict[str, tuple[str, ...]] = {"artist": CLASS_NAMES, "object": OBJECTS, "colour": COLOURS}
ORACLE_WEIGHTS = "oracle.safetensors"
ORACLE_META = "oracle.json"
REBUILD_HINT = "rebuild it with `python train-scripts/train-toy-oracle.py`"


class ToyOracle(nn.Module):
    """Independent classifiers for artist, object and colour, on images in [-1, 1] (ldm range)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.width = width
        self.classifiers = nn.ModuleDict({task: SmallCNN(len(names), width) for task, names in TASKS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 4 or images.shape[1:] != (3, 32, 32):
            raise ValueError(f"the toy oracle takes images [B, 3, 32, 32] in [-1, 1], got {tuple(images.shape)}")
        return {task: classifier(images) for task, classifier in self.classifiers.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class index per image for every task (eval mode, no grad)."""
        was_training = self.training
        self.eval()
        try:
            return {task: logits.argmax(dim=1) for task, logits in self(images.clamp(-1, 1)).items()}
        finally:
            self.train(was_training)


@dataclass
class OracleTrainingConfig:
    seed: int = 0
    steps: int = 800
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    pool_size: int = 12000
    eval_size: int = 2000
    width: int = 16

    def __post_init__(self) -> None:
        small = [name for name in ("steps", "batch_size", "pool_size", "eval_size", "width") if getattr(self, name) < 1]
        if small:
            raise ValueError(f"oracle training settings must be >= 1: {', '.join(small)}")


def jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random photometric damage of images in [-1, 1]: brightness, contrast, tint, blur, noise."""
    b = images.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, *shape, 1, 1, generator=generator)

    x = (images + 1) / 2
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * uniform(0.7, 1.2, 1) + mean + uniform(-0.15, 0.15, 1)
    x = x * uniform(0.85, 1.15, 3)
    sigma = uniform(0.0, 1.0, 1).flatten()
    x = _gaussian_blur(x, sigma)
    x = x + torch.randn(x.shape, generator=generator) * uniform(0.0, 0.08, 1)
    return (x.clamp(0, 1) * 2 - 1).to(images.dtype)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur (sigma 0 leaves the image unchanged)."""
    offsets = torch.arange(-2, 3, dtype=x.dtype)
    safe = sigma.clamp_min(1e-3)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None, :] / safe) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [B, 5]
    b, c, h, w = x.shape
    flat = x.reshape(1, b * c, h, w)
    k = kernel.repeat_interleave(c, dim=0)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), k[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), k[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def render_labelled(count: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`count` random scenes drawn with render seeds derived from `seed`, and their labels."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    seeds = rng.integers(0, 2**31 - 1, size=count).tolist()
    labels = {
        "artist": torch.tensor([s.artist for s in scenes]),
        "object": torch.tensor([s.obj for s in scenes]),
        "colour": torch.tensor([s.colour for s in scenes]),
    }
    return render_batch(scenes, seeds), labels


@torch.no_grad()
def evaluate(oracle: ToyOracle, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, object]:
    """Accuracy per task, and per artist class, of predictions on (jittered) images."""
    predictions: dict[str, list[torch.Tensor]] = {task: [] for task in TASKS}
    for chunk in images.split(500):
        for task, pred in oracle.predict(chunk).items():
            predictions[task].append(pred)
    merged = {task: torch.cat(preds) for task, preds in predictions.items()}
    result: dict[str, object] = {task: (merged[task] == labels[task]).float().mean().item() for task in TASKS}
    result["artist_per_class"] = {
        name: (merged["artist"][labels["artist"] == k] == k).float().mean().item() for k, name in enumerate(CLASS_NAMES)
    }
    return result


def train_oracle(config: OracleTrainingConfig, log_every: int = 100) -> tuple[ToyOracle, dict[str, object]]:
    """Train the three classifiers on a pool of renders with fresh jitter every step.

    Returns the oracle and its metadata, including accuracies on freshly rendered, jittered
    images whose render seeds never occur in training.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    started = time.time()
    pool, pool_labels = render_labelled(config.pool_size, seed=config.seed)
    oracle = ToyOracle(config.width)
    optimizer = torch.optim.AdamW(oracle.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps))
    )
    oracle.train()
    for step in range(config.steps):
        index = torch.randint(0, config.pool_size, (config.batch_size,), generator=generator)
        images = jitter(pool[index], generator)
        logits = oracle(images)
        loss = sum(F.cross_entropy(logits[task], pool_labels[task][index]) for task in TASKS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == config.steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - started:6.1f} s", flush=True)
    eval_images, eval_labels = render_labelled(config.eval_size, seed=config.seed + 1_000_003)
    eval_generator = torch.Generator().manual_seed(config.seed + 7)
    metrics = {
        "clean": evaluate(oracle, eval_images, eval_labels),
        "jittered": evaluate(oracle, jitter(eval_images, eval_generator), eval_labels),
    }
    meta = {
        "config": asdict(config),
        "tasks": {task: list(names) for task, names in TASKS.items()},
        "accuracy_on_fresh_renders": metrics,
        "train_seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
    }
    return oracle, meta


def save_oracle(oracle: ToyOracle, meta: dict[str, object], directory: str | Path = TOY_DIR) -> Path:
    """Write oracle.safetensors and oracle.json, each atomically (``erasure.files``)."""
    directory = Path(directory)
    weights = directory / ORACLE_WEIGHTS
    state = {k: v.detach().contiguous() for k, v in oracle.state_dict().items()}
    with atomic_path(weights) as temporary:
        save_file(state, str(temporary), metadata={"width": str(oracle.width)})
    write_json(meta, directory / ORACLE_META)
    return weights


def load_oracle(directory: str | Path = TOY_DIR, device: str | torch.device = "cpu") -> ToyOracle:
    """Load the shipped oracle (eval mode); a missing or damaged file raises one clear error."""
    path = Path(directory) / ORACLE_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"toy oracle weights not found: {path}; {REBUILD_HINT}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            width = int((handle.metadata() or {})["width"])
        state = load_file(str(path))
        oracle = ToyOracle(width)
        oracle.load_state_dict(state, strict=True)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as error:
        raise RuntimeError(f"toy oracle weights are damaged or incompatible: {path} ({error}); {REBUILD_HINT}") from error
    return oracle.to(device).eval()


def artist_classifier(device: str | torch.device = "cpu") -> ImageClassifier:
    """The shipped artist oracle as an ACC classifier (classes: blank and the nine artists).

    The ``toy-cnn`` architecture is the oracle's ``SmallCNN`` behind a [0, 1] -> [-1, 1]
    normalisation, so the weights carry over unchanged and its predictions on images in [0, 1]
    are the oracle's on the same images in [-1, 1].
    """
    oracle = load_oracle()
    artist = oracle.classifiers["artist"]
    classifier = ImageClassifier("toy-cnn", CLASS_NAMES, width=oracle.width)
    classifier.backbone[0].load_state_dict(artist.features.state_dict())
    classifier.head.load_state_dict(artist.head.state_dict())
    return classifier.to(device).eval()


def artist_network(device: str | torch.device = "cpu") -> SmallCNN:
    """The shipped artist oracle's network (images in [-1, 1], 32 px): its conv features are what
    FID and the LPIPS-like distance compare on toy images, where Inception and AlexNet see little."""
    return load_oracle(device=device).classifiers["artist"]
