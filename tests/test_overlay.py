"""tools/check-overlay.py: bad input is refused with one message each, the clone is never changed,
and, when COMPVIS_CLONE points to a CompVis/stable-diffusion clone, the overlay passes the check.

The clone check is split by cost: the imports and the configs (at their real size up to
DEFAULT_TIER_REAL_SIZE_GIB of weights, larger ones on the meta device) run in the default tier, so
every change is checked against the clone; the CompVis scripts' --help (a fresh interpreter each)
and the toy erasure inside the clone are the slow part.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from erasure.cli import EXIT_BAD_INPUT
from erasure.errors import OverlayError

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "check-overlay.py"
CLONE = os.environ.get("COMPVIS_CLONE")
NO_CLONE = (
    "set COMPVIS_CLONE to a CompVis/stable-diffusion clone (e.g. ../shared/upstream/CompVis-stable-diffusion) "
    "to check the overlay"
)

DEFAULT_TIER_REAL_SIZE_GIB = 0.5

_spec = importlib.util.spec_from_file_location("check_overlay", TOOL)
check_overlay = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = check_overlay  # dataclasses look their module up there
_spec.loader.exec_module(check_overlay)


def _fake_clone(folder: Path) -> Path:
    """The files a CompVis clone is recognised by, read-only like the shared pristine copy."""
    for marker in check_overlay.COMPVIS_MARKERS:
        (folder / marker).parent.mkdir(parents=True, exist_ok=True)
        (folder / marker).write_text(f"# CompVis {marker}\n")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "models").mkdir()
    (folder / "models" / "model.ckpt").write_bytes(b"weights")
    for path in sorted(folder.rglob("*"), reverse=True):
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return folder


def _fake_repo(folder: Path, files: dict[str, str], listed: list[str] | None = None) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    (folder / "ldm-replace.txt").write_text("\n".join(listed if listed is not None else files) + "\n")
    return folder


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() + oct(path.stat().st_mode)
        for path in folder.rglob("*") if path.is_file()
    }


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return _fake_repo(tmp_path / "repo", {"ldm/util.py": "# ours\n", "erasure/__init__.py": "# erasure\n"})


def test_a_folder_without_compvis_files_is_refused_naming_what_it_lacks(tmp_path: Path, project: Path) -> None:
    (tmp_path / "other" / "ldm").mkdir(parents=True)
    (tmp_path / "other" / "main.py").write_text("")
    entries = check_overlay.listed_files(project)
    with pytest.raises(OverlayError, match=r"not a CompVis/stable-diffusion clone: it lacks \['ldm/util.py'"):
        check_overlay.check_clone(tmp_path / "other", project, entries)
    with pytest.raises(OverlayError, match="is not a folder"):
        check_overlay.check_clone(tmp_path / "absent", project, entries)


def test_another_versions_overlay_is_refused_and_this_versions_accepted(tmp_path: Path, project: Path) -> None:
    entries = check_overlay.listed_files(project)
    clone = tmp_path / "clone"
    clone.mkdir()
    _fake_clone(clone)
    assert check_overlay.check_clone(clone, project, entries) is False

    overlaid = tmp_path / "overlaid"
    check_overlay.make_overlaid_copy(clone, project, entries, overlaid)
    assert check_overlay.check_clone(overlaid, project, entries) is True

    (overlaid / "erasure" / "__init__.py").write_text("# an older erasure\n")
    differs = r"another version of this project \(1 listed files differ or are absent there, e.g. \['erasure/__init__.py'\]"
    with pytest.raises(OverlayError, match=differs):
        check_overlay.check_clone(overlaid, project, entries)
    (overlaid / "erasure" / "__init__.py").write_text("# erasure\n")
    (overlaid / "erasure" / "gone.py").write_text("")
    with pytest.raises(OverlayError, match=r"\(1 of its erasure/ modules are not listed, e.g. \['erasure/gone.py'\]\)"):
        check_overlay.check_clone(overlaid, project, entries)

    older = tmp_path / "older"  # an overlay from before erasure/ existed
    check_overlay.make_overlaid_copy(clone, project, [], older)
    (older / "ldm" / "modules").mkdir(parents=True)
    (older / "ldm" / "modules" / "incremental_linear.py").write_text("")
    with pytest.raises(OverlayError, match=r"another version of this project \(2 listed files differ or are absent"):
        check_overlay.check_clone(older, project, entries)


def test_a_listed_file_missing_from_the_repository_is_named(tmp_path: Path) -> None:
    listed = ["ldm/util.py", "ldm/gone.py", "models/toy/x.json"]
    repo = _fake_repo(tmp_path / "repo", {"ldm/util.py": ""}, listed=listed)
    with pytest.raises(OverlayError, match=r"lists 2 file\(s\) missing .*\['ldm/gone.py', 'models/toy/x.json'\]"):
        check_overlay.listed_files(repo)
    (repo / "ldm-replace.txt").write_text("ldm/util.py\n../outside.py\n")
    with pytest.raises(OverlayError, match=r"outside the repository: \['../outside.py'\]"):
        check_overlay.listed_files(repo)


def test_the_copy_gets_the_overlay_and_the_clone_stays_as_it_was(tmp_path: Path, project: Path) -> None:
    clone = tmp_path / "clone"
    clone.mkdir()
    _fake_clone(clone)
    before = _tree_digest(clone)
    copy = tmp_path / "copy"
    check_overlay.make_overlaid_copy(clone, project, check_overlay.listed_files(project), copy)
    assert _tree_digest(clone) == before
    assert (copy / "ldm" / "util.py").read_text() == "# ours\n"
    assert (copy / "erasure" / "__init__.py").read_text() == "# erasure\n"
    assert (copy / "main.py").read_text() == "# CompVis main.py\n"
    assert not (copy / ".git").exists() and not (copy / "models" / "model.ckpt").exists()
    assert check_overlay.module_names(copy) == ["ldm.models.diffusion.ddpm", "ldm.util", "scripts/txt2img.py"]


def test_the_script_reports_bad_input_in_one_line_with_status_2(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(TOOL), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == EXIT_BAD_INPUT
    assert run.stderr.strip().splitlines() == [
        f"error: {tmp_path} is not a CompVis/stable-diffusion clone: it lacks {list(check_overlay.COMPVIS_MARKERS)}; "
        "pass the folder of `git clone https://github.com/CompVis/stable-diffusion`."
    ]


def test_the_summary_counts_each_part() -> None:
    outcomes = [
        check_overlay.Outcome("modules", "ldm.util", True),
        check_overlay.Outcome("modules", "scripts/knn2img.py", False, "ImportError"),
        check_overlay.Outcome("configs", "configs/a.yaml", True),
        check_overlay.Outcome("scripts", "python main.py --help", True),
        check_overlay.Outcome("erasure", "python train-scripts/train-sepce.py", False),
    ]
    assert check_overlay.summary(outcomes) == "modules imported 1/2, configs instantiated 1/1, scripts run 1/2"


def _check_clone(parts: list[str], *extra: str) -> dict[str, int]:
    """Run the check on COMPVIS_CLONE; any failure fails the test with the tool's own lines.

    Returns how many items each summary label counted (all of them passed).
    """
    run = subprocess.run(
        [sys.executable, str(TOOL), CLONE, "--parts", *parts, *extra],
        capture_output=True, text=True, timeout=1500, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    summary = run.stdout.splitlines()[-1]
    counts = {label: (int(good), int(total)) for label, good, total in re.findall(r"(\w+ \w+) (\d+)/(\d+)", summary)}
    assert summary.endswith("; 0 failure(s)") and all(good == total for good, total in counts.values()), summary
    return {label: total for label, (_, total) in counts.items()}


def _clone_files(folders: tuple[str, ...], pattern: str) -> int:
    return sum(1 for folder in folders for _ in (Path(CLONE) / folder).rglob(pattern))


@pytest.mark.skipif(CLONE is None, reason=NO_CLONE)
def test_every_module_of_the_overlaid_clone_imports_and_every_config_builds() -> None:
    counts = _check_clone(["modules", "configs"], "--real_size_limit", str(DEFAULT_TIER_REAL_SIZE_GIB))
    # at least every module and config CompVis ships (ours come on top)
    assert counts["modules imported"] >= _clone_files(("ldm", "scripts"), "*.py") > 0
    assert counts["configs instantiated"] >= _clone_files(("configs",), "*.yaml") > 0


@pytest.mark.slow
@pytest.mark.skipif(CLONE is None, reason=NO_CLONE)
def test_compvis_scripts_and_the_toy_erasure_run_in_the_overlaid_clone() -> None:
    assert _check_clone(["scripts", "erasure"]) == {"scripts run": len(check_overlay.HELP_SCRIPTS) + 1}
