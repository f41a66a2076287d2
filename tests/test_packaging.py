"""Repository-shape checks: pins agree, CI runs the README's commands, ldm-replace.txt is complete."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_pins() -> set[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["project"]["dependencies"])


def _environment_pins() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yaml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yaml must have exactly one pip: section"
    return {p for p in pip_sections[0] if not p.startswith("-e")}


def test_environment_yaml_pins_equal_pyproject() -> None:
    pyproject, environment = _pyproject_pins(), _environment_pins()
    assert pyproject == environment, (
        f"only in pyproject.toml: {sorted(pyproject - environment)}; "
        f"only in environment.yaml: {sorted(environment - pyproject)}"
    )
    assert all("==" in p for p in pyproject), "every dependency is pinned exactly"


def test_ci_runs_the_readme_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    ci_lines = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()]
    install = next(ln for ln in ci_lines if ln.startswith("pip install"))
    test = next(ln for ln in ci_lines if "pytest" in ln and not ln.startswith("#"))
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^([^#\n`][^\n]*)$", quick_start.split("```", 2)[1], re.M)
    commands = [c.split("#")[0].strip() for c in commands]
    assert install in commands, f"README quick start lacks CI's install command {install!r}"
    assert test in commands, f"README quick start lacks CI's test command {test!r}"


def test_ldm_replace_lists_every_ldm_file() -> None:
    listed = [ln.strip() for ln in (ROOT / "ldm-replace.txt").read_text().splitlines() if ln.strip()]
    missing_on_disk = [p for p in listed if not (ROOT / p).is_file()]
    assert not missing_on_disk, f"ldm-replace.txt lists files that do not exist: {missing_on_disk}"
    ldm_files = {str(p.relative_to(ROOT)) for p in (ROOT / "ldm").rglob("*.py")}
    unlisted = sorted(ldm_files - set(listed))
    assert not unlisted, f"ldm files missing from ldm-replace.txt: {unlisted}"
