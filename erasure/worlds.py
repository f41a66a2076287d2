"""Evaluation worlds (METHOD.md §4): the classes a model is evaluated on, and what evaluates them.

A world is the paper's 10-class setting for one kind of model: class 0 is the blank prompt "",
classes 1..N the concepts (Stable Diffusion's nine artists, or the toy world's nine fictional
ones). It also says what the core needs to evaluate that model's images without knowing the
world's code: whether SepCE protects the other classes by default (METHOD.md §2), the default
ACC classifier and the network whose features FID and the LPIPS-like distance use. The last two
are dotted paths (``module.function``) of factories, imported only when used (``load_target``),
so the core never imports a world's package; a world is a leaf that plugs into the core.

Which world a model belongs to is stated by its ldm config: a top-level ``world:`` mapping (see
configs/toy/toy-ldm.yaml). CompVis configs such as v1-inference.yaml are used unchanged and
carry no such key, so a config without it means ``SD_WORLD``. The choice never depends on the
model's weights or on file names.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from erasure.classifier import ARCHITECTURES, ImageClassifier
from erasure.errors import WorldError
from erasure.resources import resource_root

WORLD_KEY = "world"
BLANK_NAME = "blank"
SD_ARTISTS: tuple[str, ...] = (
    "Van Gogh",
    "Picasso",
    "Cezanne",
    "Jackson Pollock",
    "Caravaggio",
    "Keith Haring",
    "Kelly McKernan",
    "Tyler Edlin",
    "Kilian Eng",
)
REQUIRED_KEYS = ("name", "class_prompts")
DOTTED_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
EXAMPLE = "see the `world:` entry of configs/toy/toy-ldm.yaml"


@dataclass(frozen=True)
class World:
    """One evaluation world: class index -> prompt, and how its images are judged.

    ``classifier`` names a factory ``f(device) -> ImageClassifier`` (the default ACC classifier);
    ``features`` a factory ``f(device) -> nn.Module`` whose ``features`` (an ``nn.Sequential``)
    turn images [B, 3, S, S] in [-1, 1] (the ldm image range), S = ``image_size``, into the
    maps that FID and the LPIPS-like distance compare (erasure/metrics.py). ``classifier_arch``
    is the architecture train-scripts/artist-cls-train.py trains for this world by default.
    """

    name: str
    class_prompts: tuple[str, ...]
    protect_classes: bool = False
    classifier: str | None = None
    features: str | None = None
    image_size: int | None = None
    classifier_arch: str = "resnet18"
    held_out_wordings: str | None = None

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise WorldError("world.name is empty; give the world a short name such as 'toy'.")
        prompts = self.class_prompts
        if len(prompts) < 2 or prompts[0] != "":
            raise WorldError(
                f"world.class_prompts of {self.name!r} must start with the blank prompt \"\" (class 0) followed by "
                f"at least one concept, got {list(prompts)}; {EXAMPLE}."
            )
        keys = [" ".join(prompt.lower().split()) for prompt in prompts]
        repeated = sorted({prompt for prompt, key in zip(prompts, keys) if keys.count(key) > 1 or key == BLANK_NAME})
        if repeated:
            raise WorldError(
                f"world.class_prompts of {self.name!r} repeats or reuses the blank class ({repeated}); "
                f"list every concept once, after \"\"."
            )
        for key in ("classifier", "features"):
            value = getattr(self, key)
            if value is not None and not DOTTED_PATH.fullmatch(value):
                raise WorldError(f"world.{key} of {self.name!r} is {value!r}, not a dotted path module.function.")
        if self.image_size is not None and self.image_size < 1:
            raise WorldError(
                f"world.image_size of {self.name!r} must be a positive pixel count, got {self.image_size}."
            )
        if self.features is not None and self.image_size is None:
            raise WorldError(
                f"world.features of {self.name!r} needs world.image_size (the feature network's input size in px)."
            )
        if self.classifier_arch not in ARCHITECTURES:
            raise WorldError(
                f"world.classifier_arch of {self.name!r} is {self.classifier_arch!r}; "
                f"use one of {sorted(ARCHITECTURES)}."
            )

    def held_out_wordings_path(self) -> Path | None:
        """``held_out_wordings``: a prompt CSV of wordings never trained or protected (columns
        prompt, evaluation_seed, case_number, concept, class; METHOD.md §2). A relative path is
        relative to the folder holding ``configs/`` and ``models/`` (the checkout, or the installed
        copy of the toy files), as the toy config's other paths are."""
        if self.held_out_wordings is None:
            return None
        path = Path(self.held_out_wordings)
        path = path if path.is_absolute() else resource_root() / path
        if not path.is_file():
            raise WorldError(f"world.held_out_wordings of {self.name!r} names {path}, which is not a file; "
                             "fix the path in the config's `world:` entry or remove the key.")
        return path

    @property
    def names(self) -> tuple[str, ...]:
        """Display names: "blank" for class 0, the prompt otherwise."""
        return (BLANK_NAME, *self.class_prompts[1:])

    def __len__(self) -> int:
        return len(self.class_prompts)

    def describe(self) -> str:
        """``0 blank (""), 1 Van Gogh, ...``: the valid choices, for error messages and --help."""
        return ", ".join(f"{index} {name}" + (' ("")' if index == 0 else "") for index, name in enumerate(self.names))

    def index(self, name_or_index: str | int) -> int:
        """The class of an index (1, "1") or a name ("Van Gogh", case-insensitive; "" or "blank" is 0)."""
        if isinstance(name_or_index, bool):
            raise WorldError(
                f"Class {name_or_index!r} is not a name or an index; valid ({self.name}): {self.describe()}."
            )
        text = str(name_or_index).strip()
        if text.lstrip("-").isdigit():
            index = int(text)
            if 0 <= index < len(self):
                return index
            raise WorldError(
                f"Class index {index} is out of range for the {self.name} model; valid: {self.describe()}."
            )
        key = " ".join(text.lower().split())
        for index, name in enumerate(self.names):
            if key in (name.lower(), self.class_prompts[index].lower()):
                return index
        raise WorldError(f"Unknown class {text!r} for the {self.name} model; valid: {self.describe()}.")

    def prompt(self, index: int) -> str:
        """The bare prompt of a class: "" for class 0, the concept's name otherwise."""
        return self.class_prompts[self.index(index)]

    def load_classifier(self, device: str | torch.device = "cpu") -> ImageClassifier:
        """The world's default ACC classifier; a world without one (SD) needs a trained one instead."""
        if self.classifier is None:
            raise WorldError(
                f"The {self.name} world has no default ACC classifier (`classifier:` of the config's `world:` entry); "
                f"pass --classifier with one trained by train-scripts/artist-cls-train.py."
            )
        return _built(self.classifier, device)

    def load_features(self, device: str | torch.device = "cpu") -> nn.Module:
        """The world's feature network for FID / the LPIPS-like distance (see the class docstring)."""
        if self.features is None:
            raise WorldError(
                f"The {self.name} world has no feature network (`features:` of the config's `world:` entry); "
                f"use Inception / AlexNet features for its images."
            )
        return _built(self.features, device)


SD_WORLD = World("sd", ("", *SD_ARTISTS))


def load_target(dotted: str) -> Callable[..., Any]:
    """The function a dotted path ``package.module.function`` names (imported now)."""
    module_name, _, attribute = dotted.strip().rpartition(".")
    if not module_name or not attribute:
        raise WorldError(f"{dotted!r} is not a dotted path module.function; {EXAMPLE}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise WorldError(
            f"Cannot import {module_name!r} for {dotted!r} ({error}); fix the path in the config's `world:` entry "
            f"or install the package that provides it."
        ) from error
    target = getattr(module, attribute, None)
    if not callable(target):
        raise WorldError(
            f"{module_name} has no function {attribute!r} (named by {dotted!r}); fix the config's `world:` entry."
        )
    return target


def _built(dotted: str, device: str | torch.device) -> Any:
    built = load_target(dotted)(device)
    if not isinstance(built, nn.Module):
        raise WorldError(f"{dotted}(device) returned a {type(built).__name__}, not a torch module; fix the factory.")
    return built


def _checked_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The ``world:`` mapping's values, each checked for its type (one error naming the key and the fix)."""
    known = [spec.name for spec in fields(World)]
    unknown = sorted(set(entry) - set(known))
    if unknown:
        raise WorldError(f"Unknown key(s) {unknown} in `world:`; the keys are {known} ({EXAMPLE}).")
    missing = [key for key in REQUIRED_KEYS if key not in entry]
    if missing:
        raise WorldError(f"`world:` lacks {missing}; every world needs {list(REQUIRED_KEYS)} ({EXAMPLE}).")
    expected = {
        "name": (str,),
        "class_prompts": (list,),
        "protect_classes": (bool,),
        "classifier": (str, type(None)),
        "features": (str, type(None)),
        "image_size": (int, type(None)),
        "classifier_arch": (str,),
        "held_out_wordings": (str, type(None)),
    }
    for key, value in entry.items():
        wrong_int = key == "image_size" and isinstance(value, bool)
        if not isinstance(value, expected[key]) or wrong_int:
            kinds = " or ".join("null" if kind is type(None) else kind.__name__ for kind in expected[key])
            raise WorldError(f"world.{key} must be {kinds}, got {value!r}; {EXAMPLE}.")
    prompts = entry["class_prompts"]
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise WorldError(f"world.class_prompts must be a list of strings (\"\" first), got {prompts!r}; {EXAMPLE}.")
    return {**entry, "class_prompts": tuple(prompts)}


def world_from_config(config: DictConfig, source: str = "the config") -> World:
    """The world of a whole ldm config: its ``world:`` mapping, or ``SD_WORLD`` when it has none."""
    if WORLD_KEY not in config:
        return SD_WORLD
    entry = config[WORLD_KEY]
    if not isinstance(entry, DictConfig):
        raise WorldError(
            f"{source}: `world:` must be a mapping (name, class_prompts, ...), got {entry!r}; {EXAMPLE}, "
            f"or remove the key for Stable Diffusion's world."
        )
    try:
        return World(**_checked_entry(OmegaConf.to_container(entry, resolve=True)))
    except WorldError as error:
        raise WorldError(f"{source}: {error}") from error


def world_from_config_file(path: str | Path) -> World:
    """The world named by the ldm config file at ``path`` (``SD_WORLD`` when it has no ``world:`` key)."""
    path = Path(path)
    if not path.is_file():
        raise WorldError(f"Config {path} does not exist (or is not a file); pass the ldm config of the model.")
    try:
        config = OmegaConf.load(path)
    except Exception as error:  # yaml, OmegaConf and OS errors all mean "unreadable config"
        raise WorldError(f"Cannot parse config {path} ({error}); pass a valid ldm YAML config.") from error
    if not isinstance(config, DictConfig):
        raise WorldError(f"Config {path} is not a YAML mapping; pass an ldm model config.")
    return world_from_config(config, str(path))


def world_of(model: nn.Module) -> World:
    """The world of a model loaded by ``erasure.loading.load_model`` (from its ``ldm_config``)."""
    config = getattr(model, "ldm_config", None)
    if config is None:
        raise WorldError(
            "The model carries no config (model.ldm_config), so its world is unknown; load it with "
            "erasure.loading.load_model, or use a World directly (e.g. erasure.worlds.SD_WORLD)."
        )
    return world_from_config(config)
