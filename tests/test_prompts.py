"""Prompt CSVs: the shipped files are valid and follow the worlds' classes, bad files get one clear error each."""

from __future__ import annotations

from pathlib import Path

import pytest

from erasure.errors import SettingsError
from erasure.prompts import PromptFileError, read_i2p_prompts, read_prompts, select_cases
from erasure.toy import TOY_CONFIG
from erasure.wordings import check_templates, default_templates, fill, normalise, read_protect_file, read_templates
from erasure.worlds import SD_WORLD, world_from_config_file

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "data"
SHIPPED = ("artist-classes.csv", "art-prompts.csv", "toy-classes.csv", "toy-prompts.csv", "imagenette.csv")


def write(tmp_path: Path, text: str, name: str = "prompts.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_prompt_files_are_valid(name: str) -> None:
    rows = read_prompts(DATA / name)
    assert len(rows) >= 50
    assert all("class_index" in row.extra for row in rows)
    seeds_by_prompt: dict[str, list[int]] = {}
    for row in rows:
        seeds_by_prompt.setdefault(row.prompt, []).append(row.evaluation_seed)
    for seeds in seeds_by_prompt.values():  # 10 samples per row never repeat a seed of the same prompt
        ordered = sorted(seeds)
        assert all(later - earlier >= 10 for earlier, later in zip(ordered, ordered[1:]))
    assert min(row.evaluation_seed for row in rows) >= 2_000_000  # disjoint from generate-data's seeds


@pytest.mark.parametrize(
    ("name", "world"), [("artist-classes.csv", SD_WORLD), ("toy-classes.csv", world_from_config_file(TOY_CONFIG))]
)
def test_class_prompt_files_follow_the_worlds_classes(name: str, world) -> None:
    rows = read_prompts(DATA / name)
    counts = [0] * len(world)
    for row in rows:
        index = int(row.extra["class_index"])
        assert row.prompt == world.prompt(index)
        counts[index] += 1
    assert counts == [50] * 10
    assert rows[0].prompt == ""  # the empty cell is the blank prompt


def test_reading_keeps_extra_columns_and_accepts_pandas_integers(tmp_path: Path) -> None:
    path = write(tmp_path, ',case_number,prompt,evaluation_seed,class\n0,7,"a cat, sitting",42.0,cat\n1,3,,5,blank\n')
    rows = read_prompts(path)
    read = [(row.case_number, row.prompt, row.evaluation_seed) for row in rows]
    assert read == [(7, "a cat, sitting", 42), (3, "", 5)]
    assert rows[0].extra == {"": "0", "class": "cat"} and rows[1].line == 3
    assert [row.case_number for row in select_cases(rows, from_case=4)] == [7]
    assert [row.case_number for row in select_cases(rows, till_case=3)] == [3]
    with pytest.raises(PromptFileError, match=r"No case_number lies in \[8, None\] \(the file has 3..7\)"):
        select_cases(rows, from_case=8)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty; it needs a header line with the columns prompt, evaluation_seed, case_number"),
        ("prompt,evaluation_seed,case_number\n", "has a header but no rows"),
        ("prompt,case_number\na,1\n", r"lacks the column\(s\) evaluation_seed \(it has: prompt, case_number\)"),
        ("prompt,evaluation_seed,case_number\na,1,0\nb,x1,1\n", r"line 3: evaluation_seed='x1' is not an integer"),
        ("prompt,evaluation_seed,case_number\na,-5,0\n", r"line 2: evaluation_seed='-5' is not an integer in \[0, 2"),
        ("prompt,evaluation_seed,case_number\na,1.5,0\n", "evaluation_seed='1.5' is not an integer"),
        ("prompt,evaluation_seed,case_number\na,,0\n", "evaluation_seed='' is not an integer"),
        ("prompt,evaluation_seed,case_number\na,1,0\nb,2,0\n", "line 3: case_number 0 already used on line 2"),
        ("prompt,evaluation_seed,case_number\na,b,1,0\n", "line 2: more cells than header columns; quote prompts"),
    ],
)
def test_bad_prompt_files_name_the_file_the_line_and_the_fix(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PromptFileError, match=message) as error:
        read_prompts(path)
    assert str(path) in str(error.value)


def test_missing_prompt_file(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match="does not exist.*--prompts_path"):
        read_prompts(tmp_path / "nothing.csv")


I2P_HEADER = "prompt,categories,hard,nudity_percentage,lexica_url,evaluation_seed,evaluation_guidance,case_number\n"


def test_i2p_loader_filters_by_nudity_and_category(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        I2P_HEADER
        + '"a statue",sexual,0,80.5,u,11,7,0\n'
        + '"a storm","violence,shocking",1,2.0,u,12,7,1\n'
        + '"a beach","sexual,harassment",0,55,u,13,7,2\n',
    )
    assert [row.case_number for row in read_i2p_prompts(path)] == [0, 1, 2]
    assert [row.case_number for row in read_i2p_prompts(path, min_nudity_percentage=50)] == [0, 2]
    assert [row.case_number for row in read_i2p_prompts(path, category="Shocking")] == [1]
    with pytest.raises(PromptFileError, match="no row has nudity_percentage >= 90"):
        read_i2p_prompts(path, min_nudity_percentage=90)
    bad = write(tmp_path, I2P_HEADER + '"x",sexual,0,180,u,1,7,0\n', "bad.csv")
    with pytest.raises(PromptFileError, match=r"line 2: nudity_percentage='180' is not a number in \[0, 100\]"):
        read_i2p_prompts(bad)
    raw = write(tmp_path, "prompt,categories,nudity_percentage,sd_seed\nx,sexual,3,5\n", "raw.csv")
    with pytest.raises(PromptFileError, match="raw I2P release"):
        read_i2p_prompts(raw)


# ---------------------------------------------------------------------------------- concept wordings
HELD_OUT = DATA / "toy-heldout-wordings.csv"


def test_held_out_wordings_are_never_among_the_default_training_wordings() -> None:
    from erasure.toy.quality import read_wording_rows
    from erasure.toy.world import ARTISTS, OBJECTS

    rows = read_prompts(HELD_OUT, ("prompt", "evaluation_seed", "case_number", "concept", "class", "object", "colour"))
    assert len(read_wording_rows(HELD_OUT)) == len(rows) == len({row.prompt for row in rows})
    assert min(row.evaluation_seed for row in rows) >= 7_000_000  # no other file or script samples these seeds
    for concept in (*ARTISTS, *OBJECTS):
        kind = "object" if concept in OBJECTS else "artist"
        trained = {normalise(fill(template, concept)) for template in default_templates("toy", kind)}
        held = [row.prompt for row in rows if row.extra["concept"] == concept]
        assert len(held) >= 8, concept
        assert not trained & {normalise(prompt) for prompt in held}, concept
        assert all(concept in prompt for prompt in held)


def test_default_templates_per_world_and_kind() -> None:
    assert default_templates("toy", "artist")[0] == "{name}" and len(default_templates("toy", "artist")) == 14
    assert default_templates("some-world", "object") == default_templates("sd", "object")  # SD's for other worlds
    assert fill("a painting by {name}", "") == "a painting by" and fill("{name} style", "Van Gogh") == "Van Gogh style"
    with pytest.raises(SettingsError, match="concept_kind"):
        default_templates("sd", "style")


@pytest.mark.parametrize(("lines", "message"), [
    (["{name}", "a {name}", "A  {name}"], r"repeats wording 2; list each wording once \(3 given, 2 distinct\)"),
    (["{name}", ""], "wording 2 is empty"),
    (["a painting"], r"exactly once"),
    (["{name} and {name}"], r"exactly once"),
    ([], "empty"),
])
def test_bad_templates_are_refused(lines: list[str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        check_templates(lines)


def test_template_and_protect_files(tmp_path: Path) -> None:
    templates = write(tmp_path, "{name}\nart by {name}\n", "wordings.txt")
    assert read_templates(templates) == ["{name}", "art by {name}"]
    assert read_protect_file(write(tmp_path, "a cat\n a  dog \n", "protect.txt")) == ["a cat", "a dog"]
    repeated = r"line 2 \(.A cat.\) repeats line 1; list each prompt once \(2 lines, 1 distinct\)"
    with pytest.raises(SettingsError, match=repeated):
        read_protect_file(write(tmp_path, "a cat\nA cat\n", "protect.txt"))
    with pytest.raises(SettingsError, match="line 2 is empty"):
        read_protect_file(write(tmp_path, "a cat\n\nb\n", "protect.txt"))
    with pytest.raises(SettingsError, match="is empty"):
        read_protect_file(write(tmp_path, "", "protect.txt"))
    with pytest.raises(SettingsError, match="does not exist"):
        read_templates(tmp_path / "missing.txt")
