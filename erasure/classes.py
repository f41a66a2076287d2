"""The 10 evaluation classes (METHOD.md §4): class 0 is the blank prompt "", 1..9 the artists.

Two worlds have such a mapping:
- ``sd``: Stable Diffusion's nine artists in the seed README's order (1 Van Gogh ... 9 Kilian Eng);
- ``toy``: the toy world's nine fictional artists (``erasure.toy.world``).

Which one a model uses is stated by its ldm config: a top-level ``world:`` key (``world: toy`` in
configs/toy/toy-ldm.yaml). CompVis configs such as v1-inference.yaml are used unchanged and carry
no such key, so a config without it means ``sd``; any other value is refused. The choice never
depends on the model's weights or on file names.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig
from torch import nn

from erasure.toy import world as toy_world

WORLD_KEY = "world"
DEFAULT_WORLD = "sd"
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


class ClassError(ValueError):
    """An unknown class, or a model whose class mapping cannot be decided; the message lists the valid ones."""


@dataclass(frozen=True)
class ClassMapping:
    """Class index -> prompt for one world; index 0 is the blank prompt ""."""

    world: str
    prompts: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Display names: "blank" for class 0, the prompt otherwise."""
        return (BLANK_NAME, *self.prompts[1:])

    def __len__(self) -> int:
        return len(self.prompts)

    def describe(self) -> str:
        """``0 blank (""), 1 Van Gogh, ...``: the valid choices, for error messages and --help."""
        return ", ".join(f'{index} {name}' + (' ("")' if index == 0 else "") for index, name in enumerate(self.names))

    def index(self, name_or_index: str | int) -> int:
        """The class of an index (1, "1") or a name ("Van Gogh", case-insensitive; "" or "blank" is 0)."""
        if isinstance(name_or_index, bool):
            raise ClassError(
                f"Class {name_or_index!r} is not a name or an index; valid ({self.world}): {self.describe()}."
            )
        text = str(name_or_index).strip()
        if text.lstrip("-").isdigit():
            index = int(text)
            if 0 <= index < len(self):
                return index
            raise ClassError(
                f"Class index {index} is out of range for the {self.world} model; valid: {self.describe()}."
            )
        key = " ".join(text.lower().split())
        for index, name in enumerate(self.names):
            if key in (name.lower(), self.prompts[index].lower()):
                return index
        raise ClassError(f"Unknown class {text!r} for the {self.world} model; valid: {self.describe()}.")

    def prompt(self, index: int) -> str:
        """The bare prompt of a class: "" for class 0, the artist's name otherwise."""
        return self.prompts[self.index(index)]


SD_CLASSES = ClassMapping("sd", ("", *SD_ARTISTS))
TOY_CLASSES = ClassMapping("toy", tuple(toy_world.class_prompt(index) for index in range(toy_world.NUM_CLASSES)))
MAPPINGS: dict[str, ClassMapping] = {mapping.world: mapping for mapping in (SD_CLASSES, TOY_CLASSES)}


def mapping_for_world(world: str) -> ClassMapping:
    """The mapping called ``world`` ("sd" or "toy")."""
    if world not in MAPPINGS:
        raise ClassError(
            f"Unknown world {world!r}; use one of {sorted(MAPPINGS)} (the `{WORLD_KEY}:` key of the config)."
        )
    return MAPPINGS[world]


def mapping_for_config(config: DictConfig) -> ClassMapping:
    """The class mapping named by a whole ldm config's ``world:`` key (``sd`` when the key is absent)."""
    return mapping_for_world(str(config.get(WORLD_KEY, DEFAULT_WORLD)))


def class_mapping(model: nn.Module) -> ClassMapping:
    """The class mapping of a model loaded by ``erasure.loading.load_model`` (from its ``ldm_config``)."""
    config = getattr(model, "ldm_config", None)
    if config is None:
        raise ClassError(
            "The model carries no config (model.ldm_config), so its class mapping is unknown; load it with "
            "erasure.loading.load_model, or pick a mapping with mapping_for_world('sd' | 'toy')."
        )
    return mapping_for_config(config)
