"""The toy world's vocabulary: nine fictional artists, colours, objects, prompts and classes.

It is the miniature of the paper's experiment (METHOD.md §4): class 0 is the blank prompt ""
(plain style), classes 1..9 are the artists. Artist names are two invented words each, so
that, like real artist names, every artist concept spans several tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

ARTISTS: tuple[str, ...] = (
    "vela quorin",
    "tamsin brack",
    "odile fenwar",
    "corvin ashlee",
    "ysolde marrin",
    "baptiste keel",
    "nilo strand",
    "petra gauvin",
    "ilkka dorne",
)
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
OBJECTS: tuple[str, ...] = ("circle", "square", "triangle", "cross")
BLANK_PROMPT = ""
BLANK_CLASS_NAME = "blank"
CONNECTIVES: tuple[str, ...] = ("a", "by")

# Class index -> name; index 0 is the blank prompt, 1..9 the artists in ARTISTS order.
CLASS_NAMES: tuple[str, ...] = (BLANK_CLASS_NAME, *ARTISTS)
NUM_CLASSES = len(CLASS_NAMES)

TEMPLATES: tuple[str, ...] = ("artist", "colour_object_by_artist", "colour_object", "blank")


def world_words() -> list[str]:
    """Every word a toy prompt can contain (each is one token of the toy tokenizer)."""
    words = list(CONNECTIVES) + list(COLOURS) + list(OBJECTS)
    for artist in ARTISTS:
        words.extend(artist.split())
    return words


def _lookup(value: str, options: tuple[str, ...], kind: str) -> int:
    key = value.strip().lower()
    if key not in options:
        raise ValueError(f"unknown {kind} {value!r}; the toy world knows {', '.join(options)}")
    return options.index(key)


def artist_index(name: str) -> int:
    """Index 0..8 of an artist name in ARTISTS (case-insensitive)."""
    return _lookup(name, ARTISTS, "artist")


def colour_index(name: str) -> int:
    return _lookup(name, COLOURS, "colour")


def object_index(name: str) -> int:
    return _lookup(name, OBJECTS, "object")


def class_index(name_or_prompt: str) -> int:
    """Class of a class name or bare prompt: "" or "blank" -> 0, an artist name -> 1..9."""
    key = name_or_prompt.strip().lower()
    if key in (BLANK_PROMPT, BLANK_CLASS_NAME):
        return 0
    return 1 + _lookup(key, ARTISTS, "class (blank or artist)")


def class_prompt(class_id: int) -> str:
    """The bare prompt of a class: "" for class 0, the artist's name for 1..9."""
    _check_class(class_id)
    return BLANK_PROMPT if class_id == 0 else ARTISTS[class_id - 1]


def _check_class(class_id: int) -> None:
    if not 0 <= class_id < NUM_CLASSES:
        raise ValueError(f"class id {class_id} out of range; use 0 (blank) .. {NUM_CLASSES - 1}")


@dataclass(frozen=True)
class Scene:
    """One toy image's ground truth: who drew what. `artist` is a class id (0 = blank style)."""

    artist: int
    colour: int
    obj: int

    def __post_init__(self) -> None:
        _check_class(self.artist)
        if not 0 <= self.colour < len(COLOURS):
            raise ValueError(f"colour id {self.colour} out of range 0..{len(COLOURS) - 1}")
        if not 0 <= self.obj < len(OBJECTS):
            raise ValueError(f"object id {self.obj} out of range 0..{len(OBJECTS) - 1}")

    def prompt(self, template: str) -> str:
        """The caption of this scene under one of TEMPLATES.

        "artist" and "colour_object_by_artist" need an artist (class >= 1); "colour_object" and
        "blank" describe the blank style (class 0), as the empty prompt means the blank style.
        """
        colour, obj = COLOURS[self.colour], OBJECTS[self.obj]
        needs_artist = template in ("artist", "colour_object_by_artist")
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; use one of {', '.join(TEMPLATES)}")
        if needs_artist != (self.artist >= 1):
            raise ValueError(
                f"template {template!r} does not fit class {self.artist} ({CLASS_NAMES[self.artist]}): "
                "artist templates need classes 1..9, 'colour_object' and 'blank' need class 0"
            )
        if template == "artist":
            return ARTISTS[self.artist - 1]
        if template == "colour_object_by_artist":
            return f"a {colour} {obj} by {ARTISTS[self.artist - 1]}"
        if template == "colour_object":
            return f"a {colour} {obj}"
        return BLANK_PROMPT


def all_prompts() -> list[str]:
    """Every distinct prompt of the world (blank, bare names, with and without artist)."""
    prompts = [BLANK_PROMPT, *ARTISTS]
    for colour in COLOURS:
        for obj in OBJECTS:
            prompts.append(f"a {colour} {obj}")
            prompts.extend(f"a {colour} {obj} by {artist}" for artist in ARTISTS)
    return prompts
