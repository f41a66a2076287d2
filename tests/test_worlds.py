"""Evaluation worlds: SD's built-in world, worlds read from a config's `world:` entry, one clear error per bad entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from erasure.toy import TOY_CONFIG
from erasure.toy.world import ARTISTS
from erasure.worlds import (
    SD_WORLD,
    World,
    WorldError,
    load_target,
    world_from_config,
    world_from_config_file,
    world_of,
)

TOY_ENTRY: dict[str, Any] = {"name": "toy", "class_prompts": ["", *ARTISTS]}


def test_the_sd_world_is_the_papers_classes() -> None:
    assert SD_WORLD.class_prompts[1] == "Van Gogh" and SD_WORLD.class_prompts[9] == "Kilian Eng" and len(SD_WORLD) == 10
    assert SD_WORLD.index("van  gogh") == 1 and SD_WORLD.index("9") == 9 and SD_WORLD.index(4) == 4
    assert SD_WORLD.index("blank") == 0 and SD_WORLD.index("") == 0 and SD_WORLD.prompt(0) == ""
    assert not SD_WORLD.protect_classes and SD_WORLD.classifier is None and SD_WORLD.features is None
    expected = r"Unknown class 'Monet' for the sd model; valid: 0 blank \(\"\"\), 1 Van Gogh"
    with pytest.raises(WorldError, match=expected):
        SD_WORLD.index("Monet")
    with pytest.raises(WorldError, match="Class index 10 is out of range"):
        SD_WORLD.index(10)
    with pytest.raises(WorldError, match="no default ACC classifier.*--classifier"):
        SD_WORLD.load_classifier()
    with pytest.raises(WorldError, match="no feature network"):
        SD_WORLD.load_features()


def test_the_config_chooses_the_world(tiny_model) -> None:
    assert world_from_config(OmegaConf.create({"model": {}})) is SD_WORLD
    toy = world_from_config(OmegaConf.create({"world": TOY_ENTRY}))
    assert toy.name == "toy" and toy.index(ARTISTS[2].upper()) == 3 and toy.prompt(0) == ""
    assert not toy.protect_classes and toy.classifier_arch == "resnet18"  # the defaults of optional keys
    with pytest.raises(WorldError, match=f"valid: 0 blank .*1 {ARTISTS[0]}"):
        toy.index("Van Gogh")
    with pytest.raises(WorldError, match="carries no config"):
        world_of(tiny_model)
    tiny_model.ldm_config = OmegaConf.load(TOY_CONFIG)
    assert world_of(tiny_model) == world_from_config_file(TOY_CONFIG)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("toy", r"`world:` must be a mapping .*got 'toy'"),
        ({"name": "toy"}, r"`world:` lacks \['class_prompts'\]"),
        ({**TOY_ENTRY, "oracle": "x.y"}, r"Unknown key\(s\) \['oracle'\] in `world:`"),
        ({**TOY_ENTRY, "image_size": "32"}, "world.image_size must be int or null, got '32'"),
        ({**TOY_ENTRY, "image_size": True}, "world.image_size must be int or null, got True"),
        ({**TOY_ENTRY, "protect_classes": "yes"}, "world.protect_classes must be bool"),
        ({**TOY_ENTRY, "class_prompts": [*ARTISTS]}, r"must start with the blank prompt \"\""),
        ({**TOY_ENTRY, "class_prompts": ["", "a", "A"]}, r"repeats or reuses the blank class \(\['A', 'a'\]\)"),
        ({**TOY_ENTRY, "class_prompts": ["", 3]}, "world.class_prompts must be a list of strings"),
        ({**TOY_ENTRY, "classifier": "oracle"}, "world.classifier of 'toy' is 'oracle', not a dotted path"),
        ({**TOY_ENTRY, "features": "a.b"}, r"world.features of 'toy' needs world.image_size"),
        ({**TOY_ENTRY, "classifier_arch": "vgg"}, r"world.classifier_arch of 'toy' is 'vgg'; use one of"),
    ],
)
def test_a_bad_world_entry_is_one_clear_error(entry: Any, message: str) -> None:
    with pytest.raises(WorldError, match="the config: .*" + message):
        world_from_config(OmegaConf.create({"world": entry}))


def test_config_files_and_dotted_paths(tmp_path: Path) -> None:
    with pytest.raises(WorldError, match="does not exist"):
        world_from_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("world: [unclosed\n", encoding="utf-8")
    with pytest.raises(WorldError, match="Cannot parse config .*bad.yaml"):
        world_from_config_file(bad)
    assert load_target("erasure.worlds.world_of") is world_of
    with pytest.raises(WorldError, match="Cannot import 'erasure.nowhere'.*fix the path"):
        load_target("erasure.nowhere.factory")
    with pytest.raises(WorldError, match="erasure.worlds has no function 'nothing'"):
        load_target("erasure.worlds.nothing")
    with pytest.raises(WorldError, match="returned a str, not a torch module"):
        World("x", ("", "a"), classifier="os.path.basename").load_classifier()


def test_held_out_wordings_resolve_beside_the_toy_files_and_a_wrong_path_is_named() -> None:
    world = world_from_config_file(TOY_CONFIG)
    path = world.held_out_wordings_path()
    assert path is not None and path.is_file() and path.name == "toy-heldout-wordings.csv"
    assert World("sd-like", ("", "x")).held_out_wordings_path() is None
    with pytest.raises(WorldError, match="not-there.csv, which is not a file"):
        World("w", ("", "x"), held_out_wordings="data/not-there.csv").held_out_wordings_path()
