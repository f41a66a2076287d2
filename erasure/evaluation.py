"""The one before/after evaluation: an edited model's images against the original's, same seeds.

``evaluate(original_images, edited_images, concept=...)`` gives one ``ConceptMetrics`` row
(METHOD.md §4): ACC (the fraction the classifier puts in the concept's class, after and before),
FID and LPIPS between the two sets, and the pixel change (mean and largest absolute difference,
images in [0, 1]) — the quantity that shows whether an edit left a concept's samples untouched.
The trainers' report, the toy quality comparison, ``eval-scripts/evaluate.py`` and the scenes
all go through it. The classifier and the FID / LPIPS features default to the model world's
(``erasure.worlds``): the toy oracle on toy images, Inception / AlexNet (when their weights are on
disk) and a user-trained classifier on SD images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from erasure.classifier import ImageClassifier
from erasure.images import unit_float
from erasure.metrics import (
    ConceptEvaluator,
    ConceptMetrics,
    MetricsError,
    NudeNetCounter,
    resolve_fid_features,
    resolve_lpips,
)
from erasure.worlds import World

METRICS = ("acc", "fid", "lpips", "nudenet", "pixel")
DEFAULT_METRICS = ("acc", "pixel")


def make_evaluator(
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    world: World | None = None,
    classifier: ImageClassifier | None = None,
    fid_features: str = "auto",
    lpips_net: str = "auto",
    inception_weights: str | Path | None = None,
    alexnet_weights: str | Path | None = None,
    nudenet_threshold: float = 0.6,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> ConceptEvaluator:
    """A ``ConceptEvaluator`` for ``metrics`` (reuse it across concepts: it loads its networks once).

    ``classifier`` defaults to the world's (``acc``); ``fid_features`` / ``lpips_net`` choose the
    feature networks as ``erasure.metrics`` describes (``auto``: Inception / AlexNet when their
    weights are on disk, else the world's features).
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise MetricsError(f"Unknown metrics {unknown}; choose from {', '.join(METRICS)}.")
    device = torch.device(device)
    if classifier is None and ("acc" in metrics or ("fid" in metrics and fid_features == "classifier")):
        classifier = world.load_classifier(device) if world is not None and world.classifier else None
        if classifier is None and "acc" in metrics:
            where = f"the {world.name} world has no default classifier" if world else "no world was given"
            raise MetricsError(
                f"ACC needs a classifier and {where}; pass a classifier (train one with "
                f"train-scripts/artist-cls-train.py) or leave 'acc' out of the metrics."
            )
    return ConceptEvaluator(
        fid=resolve_fid_features(fid_features, world, classifier, inception_weights) if "fid" in metrics else None,
        lpips=resolve_lpips(lpips_net, world, alexnet_weights) if "lpips" in metrics else None,
        classifier=classifier if "acc" in metrics else None,
        nudenet=NudeNetCounter(nudenet_threshold) if "nudenet" in metrics else None,
        batch_size=batch_size,
        device=device,
    )


def pixel_change(original: torch.Tensor, edited: torch.Tensor) -> tuple[float, float]:
    """(mean, largest) absolute pixel difference of same-seed pairs, images in [0, 1]."""
    difference = (unit_float(edited).cpu() - unit_float(original).cpu()).abs()
    return float(difference.mean()), float(difference.max())


def evaluate(
    original_images: torch.Tensor,
    edited_images: torch.Tensor,
    *,
    concept: str,
    classifier: ImageClassifier | None = None,
    world: World | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    class_index: int | None = None,
    evaluator: ConceptEvaluator | None = None,
) -> ConceptMetrics:
    """One concept's metrics (see the module docstring); images uint8 or float in [0, 1], [N, 3, H, W].

    ``class_index`` defaults to the classifier's class named ``concept``. Pass ``evaluator``
    (``make_evaluator``) to reuse loaded networks over many calls.
    """
    for name, images in (("original", original_images), ("edited", edited_images)):
        if images.is_floating_point() and not torch.isfinite(images).all():
            raise MetricsError(f"The {name} images of {concept!r} hold NaN/inf pixels; regenerate them.")
    evaluator = evaluator or make_evaluator(
        metrics, world=world, classifier=classifier, device=original_images.device
    )
    if evaluator.classifier is not None and class_index is None:
        class_index = evaluator.classifier.class_index(concept)
    result = evaluator.evaluate(concept, original_images, edited_images, class_index)
    if "pixel" in metrics:
        result.pixel_change_mean, result.pixel_change_max = pixel_change(original_images, edited_images)
    return result
