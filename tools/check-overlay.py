"""Check the overlay on a CompVis/stable-diffusion clone without touching the clone.

    python tools/check-overlay.py PATH_TO_CLONE

1. Copies the clone (without .git and weight files) to a temporary folder and copies every file
   that ``ldm-replace.txt`` lists over it, as the README's overlay recipe does.
2. ``modules``: imports every module under ``ldm/`` and ``scripts/`` of the copy, each in a process
   of its own with the copy as working directory and first on ``sys.path``.
3. ``configs``: builds the ``model`` of every YAML under ``configs/`` with
   ``ldm.util.instantiate_from_config`` (``ckpt_path`` entries cleared: no weights are needed), on
   the ``meta`` device first and, when its float32 weights fit ``--real_size_limit`` GiB, at its
   real size on the CPU.
4. ``scripts``: ``--help`` of CompVis's ``main.py``, ``scripts/txt2img.py`` and ``scripts/img2img.py``
   in the copy.
5. ``erasure``: a short toy erasure there (``train-scripts/train-sepce.py`` with a few steps and
   images), which must write its increment.

Everything runs with the Hugging Face Hub switched off (``HF_HUB_OFFLINE=1``): what it checks
must work without the network. Prints one line per failure and a summary; exits 1 on any
failure, 2 on bad input (a path that is no CompVis clone, a clone already overlaid with another
version, a listed file missing from this repository).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from erasure.cli import run_script
from erasure.errors import OverlayError

REPO_ROOT = Path(__file__).resolve().parents[1]
LIST_NAME = "ldm-replace.txt"
PROBE = Path(__file__).resolve().parent / "overlay_probe.py"
RESULT_PREFIX = "OVERLAY-PROBE "
#: Files every CompVis/stable-diffusion clone has (commit 21f890f9 and later).
COMPVIS_MARKERS = (
    "main.py",
    "ldm/util.py",
    "ldm/models/diffusion/ddpm.py",
    "scripts/txt2img.py",
    "configs/stable-diffusion/v1-inference.yaml",
)
#: Paths only this project brings into a clone: any of them means an earlier overlay.
PROJECT_PATHS = ("erasure", "ldm/modules/incremental_linear.py")
#: This project's own package: a module in the clone that ldm-replace.txt does not list is another version's.
PROJECT_PACKAGE = "erasure"
#: Not copied from the clone: its history and weights (the check needs neither).
COPY_IGNORED = (".git", "__pycache__", "*.ckpt", "*.safetensors", "*.pt", "*.pth", "*.bin")
PARTS = ("modules", "configs", "scripts", "erasure")
HELP_SCRIPTS = ("main.py", "scripts/txt2img.py", "scripts/img2img.py")
#: The toy erasure: the README's `python train-scripts/train-sepce.py`, shortened.
ERASURE_SCRIPT = "train-scripts/train-sepce.py"
ERASURE_FLAGS = ("--iterations", "3", "--num_images", "2", "--no_progress", "--no_report")
SCRIPT_TIMEOUT_S = 600
PROBE_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Outcome:
    """One checked item: a module, a config or a script run."""

    part: str
    item: str
    ok: bool
    detail: str = ""


def listed_files(repo: Path) -> list[str]:
    """The relative paths of ``ldm-replace.txt``; every one must be a file of ``repo``."""
    list_file = repo / LIST_NAME
    if not list_file.is_file():
        raise OverlayError(f"{list_file} does not exist; pass --repo the checkout of this project that holds it.")
    entries = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    unsafe = [entry for entry in entries if Path(entry).is_absolute() or ".." in Path(entry).parts]
    if unsafe:
        raise OverlayError(f"{list_file} lists paths outside the repository: {unsafe[:5]}; list relative paths only.")
    missing = [entry for entry in entries if not (repo / entry).is_file()]
    if missing:
        raise OverlayError(
            f"{list_file} lists {len(missing)} file(s) missing from {repo}: {missing[:5]}; restore them "
            f"(git checkout -- FILE) or remove their lines from {LIST_NAME}."
        )
    return entries


def check_clone(clone: Path, repo: Path, entries: list[str]) -> bool:
    """Refuse a path that is no CompVis clone or that holds another version's overlay.

    Returns True when the clone already holds exactly this overlay (it is then checked as it is).
    """
    if not clone.is_dir():
        raise OverlayError(
            f"{clone} is not a folder; pass the folder of a CompVis/stable-diffusion clone "
            f"(git clone https://github.com/CompVis/stable-diffusion)."
        )
    absent = [marker for marker in COMPVIS_MARKERS if not (clone / marker).is_file()]
    if absent:
        raise OverlayError(
            f"{clone} is not a CompVis/stable-diffusion clone: it lacks {absent}; pass the folder of "
            f"`git clone https://github.com/CompVis/stable-diffusion`."
        )
    if not any((clone / path).exists() for path in PROJECT_PATHS):
        return False
    listed = set(entries)
    differing = [entry for entry in entries if not _same_file(clone / entry, repo / entry)]
    extra = sorted(
        str(path.relative_to(clone))
        for path in (clone / PROJECT_PACKAGE).rglob("*.py")
        if str(path.relative_to(clone)) not in listed and "__pycache__" not in path.parts
    )
    problems = [f"{len(differing)} listed files differ or are absent there, e.g. {differing[:3]}"] if differing else []
    problems += [f"{len(extra)} of its {PROJECT_PACKAGE}/ modules are not listed, e.g. {extra[:3]}"] if extra else []
    if problems:
        raise OverlayError(
            f"{clone} is already overlaid with another version of this project ({'; '.join(problems)}); check a "
            f"fresh clone of CompVis/stable-diffusion instead."
        )
    return True


def _same_file(first: Path, second: Path) -> bool:
    return first.is_file() and first.read_bytes() == second.read_bytes()


def make_overlaid_copy(clone: Path, repo: Path, entries: list[str], target: Path) -> None:
    """``target``: the clone's files (writable; COPY_IGNORED left out) with the listed files copied over."""
    shutil.copytree(clone, target, ignore=shutil.ignore_patterns(*COPY_IGNORED), copy_function=shutil.copyfile)
    for folder, _, _ in os.walk(target):
        os.chmod(folder, os.stat(folder).st_mode | stat.S_IWUSR)
    for entry in entries:
        destination = target / entry
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repo / entry, destination)


def _environment(root: Path) -> dict[str, str]:
    """The copy first on the path, the hub off, and no byte-code written next to the sources."""
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def _probe(part: str, root: Path, arguments: list[str], items: list[str]) -> list[Outcome]:
    """Run ``overlay_probe.py`` over ``items``; an item without a result line is a failure."""
    run = subprocess.run(
        [sys.executable, str(PROBE), part, str(root), *arguments, *items],
        cwd=root, env=_environment(root), capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
    )
    results = {
        record["item"]: record
        for record in (json.loads(line[len(RESULT_PREFIX):]) for line in run.stdout.splitlines()
                       if line.startswith(RESULT_PREFIX))
    }
    crash = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1]
    outcomes = []
    for item in items:
        record = results.get(item, {"ok": False, "error": f"not probed: the probe stopped ({crash})"})
        detail = record.get("error", "")
        if record["ok"] and "parameters" in record:
            detail = f"{record['parameters']:,} parameters, {record['device']}"
        outcomes.append(Outcome(part, item, record["ok"], detail))
    return outcomes


def module_names(root: Path) -> list[str]:
    """Every module under ldm/ (dotted names) and every script under scripts/ (paths)."""
    names = []
    for path in sorted((root / "ldm").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    names += [str(path.relative_to(root)) for path in sorted((root / "scripts").glob("*.py"))]
    return names


def config_paths(root: Path) -> list[str]:
    return [str(path.relative_to(root)) for path in sorted((root / "configs").rglob("*.yaml"))]


def _run_script(part: str, root: Path, arguments: list[str], expect: Path | None = None) -> Outcome:
    """Run ``python ARGUMENTS`` in the copy; it must exit 0 (and write under ``expect`` if given)."""
    label = " ".join(["python", *arguments])
    started = time.perf_counter()
    try:
        run = subprocess.run([sys.executable, *arguments], cwd=root, env=_environment(root),
                             capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Outcome(part, label, False, f"did not finish within {SCRIPT_TIMEOUT_S} s")
    seconds = f"{time.perf_counter() - started:.1f} s"
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
        return Outcome(part, label, False, f"exit status {run.returncode} after {seconds}: {last[:400]}")
    if expect is not None and not any(expect.rglob("*.safetensors")):
        return Outcome(part, label, False, f"exited 0 after {seconds} but wrote no .safetensors under {expect}")
    return Outcome(part, label, True, seconds)


def check_overlay(clone: Path, repo: Path, parts: list[str], real_size_limit: float, keep: bool) -> list[Outcome]:
    """Every outcome of the check of ``clone`` overlaid with ``repo``'s listed files."""
    entries = listed_files(repo)
    already = check_clone(clone, repo, entries)
    workspace = Path(tempfile.mkdtemp(prefix="check-overlay-"))
    root = (workspace / clone.resolve().name).resolve()
    print(f"Overlaying {len(entries)} files from {repo} on a copy of {clone} in {root}"
          + (" (the clone already holds this overlay)" if already else ""), flush=True)
    try:
        make_overlaid_copy(clone, repo, entries, root)
        outcomes: list[Outcome] = []
        if "modules" in parts:
            outcomes += _probe("modules", root, [], module_names(root))
        if "configs" in parts:
            outcomes += _probe("configs", root, [str(real_size_limit)], config_paths(root))
        if "scripts" in parts:
            outcomes += [_run_script("scripts", root, [script, "--help"]) for script in HELP_SCRIPTS]
        if "erasure" in parts:
            output = workspace / "erasure-outputs"
            # --cache_dir: its training images stay in the temporary folder, not in the user's cache
            arguments = [ERASURE_SCRIPT, *ERASURE_FLAGS, "--output_dir", str(output), "--cache_dir", str(workspace)]
            outcomes.append(_run_script("erasure", root, arguments, expect=output))
        return outcomes
    finally:
        if keep:
            print(f"Kept the overlaid copy: {root}")
        else:
            shutil.rmtree(workspace, ignore_errors=True)


def summary(outcomes: list[Outcome]) -> str:
    """``modules imported N/M, configs instantiated N/M, scripts run N/M`` for the parts checked."""
    labels = {"modules": "modules imported", "configs": "configs instantiated"}
    counts: dict[str, list[int]] = {}
    for outcome in outcomes:
        label = labels.get(outcome.part, "scripts run")
        counts.setdefault(label, [0, 0])
        counts[label][0] += outcome.ok
        counts[label][1] += 1
    return ", ".join(f"{label} {good}/{total}" for label, (good, total) in counts.items())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clone", type=Path, help="a CompVis/stable-diffusion clone (left unchanged)")
    parser.add_argument("--repo", type=Path, default=REPO_ROOT,
                        help=f"the checkout of this project whose {LIST_NAME} files are overlaid (default: this one)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to check (default: all)")
    parser.add_argument("--real_size_limit", type=float, default=8.0,
                        help="GiB of float32 weights up to which a config is also built at its real size; larger "
                        "ones are built on the meta device only (default: 8)")
    parser.add_argument("--keep", action="store_true", help="keep the overlaid copy and print where it is")
    parser.add_argument("--verbose", action="store_true", help="print every item, not only the failures")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    outcomes = check_overlay(args.clone, args.repo.resolve(), args.parts, args.real_size_limit, args.keep)
    for outcome in outcomes:
        if args.verbose or not outcome.ok:
            print(f"{'ok  ' if outcome.ok else 'FAIL'} {outcome.part}: {outcome.item}  {outcome.detail}")
    failures = sum(not outcome.ok for outcome in outcomes)
    print(f"summary: {summary(outcomes)}; {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    run_script(lambda: sys.exit(main()))
