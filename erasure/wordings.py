"""Concept wordings: the prompts a concept is erased over, their targets, and protect files.

A concept is not one token sequence. The text encoder is causal, so every token after the
concept's name (and the end and padding tokens, which cross-attention reads most) changes with
the wording; an edit fitted to the bare name alone leaves "{name} red" untouched. SepCE's
closed form (METHOD.md §6) therefore fits a set of wordings, each a template with one
``{name}`` placeholder, and maps each onto its target: the same wording with the name replaced
by ``target`` (default ``""``: the name removed).

Built-in templates exist per world and concept kind (``artist``, ``object``); a file given with
``--concept_templates`` replaces them (one template a line). The toy world's defaults hold out
wordings on purpose: data/toy-heldout-wordings.csv lists wordings never used here (other words
after the name, the other half of the colour/object grid, other word orders), which is what
the reports measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from erasure.errors import SettingsError
from erasure.settings import CONCEPT_KINDS

PLACEHOLDER = "{name}"
_TOY_COLOURS = ("red", "green", "blue", "yellow")
_TOY_OBJECTS = ("circle", "square", "triangle", "cross")

#: world name -> concept kind -> templates. Worlds not listed use "sd".
DEFAULT_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "sd": {
        "artist": (
            "{name}",
            "a painting by {name}",
            "an artwork by {name}",
            "art by {name}",
            "a painting in the style of {name}",
            "a landscape in the style of {name}",
            "a portrait by {name}",
            "{name} style",
            "{name} painting",
        ),
        "object": (
            "{name}",
            "a {name}",
            "a photo of a {name}",
            "an image of a {name}",
            "a picture of a {name}",
            "a painting of a {name}",
            "a close-up photo of a {name}",
            "{name} in the wild",
        ),
    },
    "toy": {
        # the bare name, the name followed by one word, and the half of the colour/object grid
        # whose (colour index + object index) is even; the other half is held out
        "artist": (
            "{name}",
            *(f"{{name}} {word}" for word in ("a", "red", "green", "circle", "triangle")),
            *(
                f"a {colour} {obj} by {{name}}"
                for c, colour in enumerate(_TOY_COLOURS)
                for o, obj in enumerate(_TOY_OBJECTS)
                if (c + o) % 2 == 0
            ),
        ),
        # the bare object, "a {object}", two colours, and four fixed artists' compositions
        "object": (
            "{name}",
            "a {name}",
            "a red {name}",
            "a green {name}",
            "a red {name} by vela quorin",
            "a green {name} by odile fenwar",
            "a blue {name} by ysolde marrin",
            "a yellow {name} by nilo strand",
        ),
    },
}
REFERENCE_WORLD = "sd"


def normalise(text: str) -> str:
    """The form in which two prompts encode identically: lower case, single spaces."""
    return " ".join(text.lower().split())


def check_templates(templates: Sequence[str], source: str = "concept templates") -> list[str]:
    """Templates with exactly one ``{name}`` each, none empty, none repeated (case and spacing ignored)."""
    if isinstance(templates, str):
        raise SettingsError(f"{source} must be a list of templates, got the string {templates!r}; wrap it in a list.")
    templates = [" ".join(str(template).split()) for template in templates]
    if not templates:
        raise SettingsError(f"{source} is empty; give at least one wording such as '{PLACEHOLDER}'.")
    for number, template in enumerate(templates, 1):
        if not template:
            raise SettingsError(f"{source}, wording {number} is empty; remove the empty line.")
        if template.count(PLACEHOLDER) != 1:
            raise SettingsError(
                f"{source}, wording {number} ({template!r}) must contain {PLACEHOLDER} exactly once, where the "
                f"concept's name goes."
            )
    repeat = first_repeat(templates)
    if repeat:
        number, earlier = repeat
        raise SettingsError(
            f"{source}, wording {number} ({templates[number - 1]!r}) repeats wording {earlier}; list each wording "
            f"once ({len(templates)} given, {len(set(map(normalise, templates)))} distinct)."
        )
    return templates


def first_repeat(texts: Sequence[str]) -> tuple[int, int] | None:
    """(number, earlier number), counted from 1, of the first text that repeats an earlier one once
    normalised (``normalise``); None when all are distinct."""
    seen: dict[str, int] = {}
    for number, text in enumerate(texts, 1):
        key = normalise(text)
        if key in seen:
            return number, seen[key]
        seen[key] = number
    return None


def _read_lines(path: str | Path, what: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"{what} {path} does not exist (or is not a file); check the path.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SettingsError(f"{what} {path} is not UTF-8 text ({error}); save it as plain text.") from error
    return text.splitlines()


def read_templates(path: str | Path) -> list[str]:
    """A ``--concept_templates`` file: one template a line, each with one ``{name}``."""
    return check_templates(_read_lines(path, "Concept templates file"), f"Concept templates file {path}")


def read_protect_file(path: str | Path) -> list[str]:
    """A ``--protect_file``: one prompt a line; empty and repeated lines are refused (they name the line)."""
    lines = _read_lines(path, "Protect file")
    if not lines:
        raise SettingsError(f"Protect file {path} is empty; write one prompt a line.")
    prompts = [" ".join(line.split()) for line in lines]
    for number, prompt in enumerate(prompts, 1):
        if not prompt:
            raise SettingsError(
                f"Protect file {path}, line {number} is empty; \"\" is always protected, remove the line "
                f"({len(lines)} lines)."
            )
    repeat = first_repeat(prompts)
    if repeat:
        number, earlier = repeat
        raise SettingsError(
            f"Protect file {path}, line {number} ({prompts[number - 1]!r}) repeats line {earlier}; list each prompt "
            f"once ({len(lines)} lines, {len(set(map(normalise, lines)))} distinct)."
        )
    return prompts


def default_templates(world: str, kind: str) -> list[str]:
    """The built-in templates of concept ``kind`` for a model of ``world`` (unknown worlds: SD's)."""
    if kind not in CONCEPT_KINDS:
        raise SettingsError(f"concept_kind (--concept_kind) must be one of {CONCEPT_KINDS}, got {kind!r}.")
    return list(DEFAULT_TEMPLATES.get(world, DEFAULT_TEMPLATES[REFERENCE_WORLD])[kind])


def fill(template: str, name: str) -> str:
    """``template`` with ``{name}`` replaced by ``name``, spaces collapsed (an empty name removes it)."""
    return " ".join(template.replace(PLACEHOLDER, name).split())


def concept_wordings(concept: str, templates: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(wording, prefix, suffix)`` per template: the text before and after the concept's name."""
    result = []
    for template in check_templates(templates):
        prefix, suffix = template.split(PLACEHOLDER)
        result.append((fill(template, concept), " ".join(prefix.split()), " ".join(suffix.split())))
    return result
