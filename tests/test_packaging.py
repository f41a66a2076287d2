"""Repository-shape checks: every import is declared where it is used (core or an extra), pins agree
with environment.yaml, CI runs the README's commands, the wheel ships the toy model, and
ldm-replace.txt is complete."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"erasure", "ldm"}
#: Folder -> (groups its module-level imports may come from, groups its function-level imports may).
#: The library and the scripts import an extra's package only inside the function that needs it,
#: so that a core install imports every module (and the error names the extra).
IMPORT_SCOPES: dict[str, tuple[set[str], set[str]]] = {
    "ldm": ({"core"}, {"core", "eval"}),
    "erasure": ({"core"}, {"core", "eval"}),
    "train-scripts": ({"core"}, {"core", "eval"}),
    "eval-scripts": ({"core"}, {"core", "eval"}),
    "bench": ({"core", "bench"}, {"core", "bench"}),
    # CompVis's entry points that the overlay replaces (txt2img's watermark comes from `compvis`)
    "main.py": ({"core"}, {"core"}),
    "scripts": ({"core"}, {"core", "compvis"}),
    "tools": ({"core"}, {"core"}),
    "tests": ({"core", "eval", "bench", "dev"}, {"core", "eval", "bench", "dev", "compvis"}),
}
#: Declared packages that no file imports by name, and why they are declared all the same.
USED_WITHOUT_IMPORT = {
    "torch-fidelity": "torchmetrics' FID loads it for Inception-v3 features (erasure.metrics)",
    "huggingface-hub": "tests switch its offline flag by name (tests/test_text_encoder.py)",
    **dict.fromkeys(
        ["einops", "albumentations", "opencv-python-headless", "taming-transformers-rom1504", "scikit-image",
         "natsort", "openai-clip", "setuptools", "scann"],
        "CompVis's files that the overlay leaves in a clone import it (pyproject.toml's `compvis` extra)",
    ),
}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _groups() -> dict[str, list[str]]:
    """'core' (the dependencies) and each extra -> its requirement strings."""
    project = _project()
    return {"core": project["dependencies"], **project.get("optional-dependencies", {})}


def _group_of_each_package() -> dict[str, str]:
    return {_normalise(req.split("==")[0]): group for group, reqs in _groups().items() for req in reqs}


def _imports(path: Path) -> Iterator[tuple[str, bool, int]]:
    """(top-level module, imported when the file is imported, line) for every absolute import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    deferred: set[int] = set()
    for node in ast.walk(tree):
        type_checking = isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) or type_checking:
            deferred.update(id(child) for child in ast.walk(node) if child is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        for module in modules:
            yield module.split(".")[0], id(node) not in deferred, node.lineno


def _third_party_imports() -> Iterator[tuple[str, Path, int, bool, list[str]]]:
    """(folder, file, line, at module level, distributions) of every third-party import."""
    providers = packages_distributions()
    files = {folder: sorted((ROOT / folder).rglob("*.py")) if (ROOT / folder).is_dir() else [ROOT / folder]
             for folder in IMPORT_SCOPES}
    local = FIRST_PARTY | {path.stem for paths in files.values() for path in paths}  # e.g. tests import bench/common
    for folder, paths in files.items():
        for path in paths:
            for module, eager, line in _imports(path):
                if module in sys.stdlib_module_names or module in local:
                    continue
                dists = [_normalise(dist) for dist in providers.get(module, [])]
                assert dists, (
                    f"{path.relative_to(ROOT)}:{line} imports {module}, which no installed distribution "
                    f"provides; install the extras (pip install -e \".[eval,bench,dev,compvis]\") or declare it."
                )
                yield folder, path, line, eager, dists


def test_every_import_is_declared_in_a_group_its_folder_may_use() -> None:
    group_of = _group_of_each_package()
    problems = []
    for folder, path, line, eager, dists in _third_party_imports():
        allowed = IMPORT_SCOPES[folder][0 if eager else 1]
        groups = {group_of[dist] for dist in dists if dist in group_of}
        if not groups & allowed:
            where = "at module level" if eager else "inside a function"
            found = f"declared in {sorted(groups)}" if groups else "not declared in pyproject.toml"
            problems.append(f"{path.relative_to(ROOT)}:{line} imports {'/'.join(dists)} {where}: {found}, "
                            f"allowed here: {sorted(allowed)}")
    assert not problems, "\n".join(problems)


def test_every_declared_package_is_imported() -> None:
    imported = {dist for *_, dists in _third_party_imports() for dist in dists}
    unused = sorted(set(_group_of_each_package()) - imported - set(USED_WITHOUT_IMPORT))
    assert not unused, f"declared in pyproject.toml but imported nowhere: {unused}"


def test_pins_are_exact_and_each_package_is_in_one_group() -> None:
    requirements = [req for reqs in _groups().values() for req in reqs]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[^=\s]+", req) for req in requirements), requirements
    names = [_normalise(req.split("==")[0]) for req in requirements]
    assert len(names) == len(set(names)), f"a package is declared twice: {sorted(names)}"


def _environment_pip_section() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yaml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yaml must have exactly one pip: section"
    return pip_sections[0]


def _extras_of(command: str) -> set[str]:
    """The extras an install of this checkout names: 'pip install -e ".[a,b]"' -> {'a', 'b'}."""
    match = re.search(r"\.\[([^\]]*)\]", command)
    return {extra.strip() for extra in match.group(1).split(",")} if match else set()


def test_environment_yaml_pins_equal_pyproject() -> None:
    section = _environment_pip_section()
    pyproject = {req for reqs in _groups().values() for req in reqs}
    environment = {p for p in section if not p.startswith("-e")}
    assert pyproject == environment, (
        f"only in pyproject.toml: {sorted(pyproject - environment)}; "
        f"only in environment.yaml: {sorted(environment - pyproject)}"
    )
    editable = [p for p in section if p.startswith("-e")]
    assert len(editable) == 1 and _extras_of(editable[0]) == set(_project()["optional-dependencies"]), editable


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^([^#\n`][^\n]*)$", quick_start.split("```", 2)[1], re.M)
    return [c.split("#")[0].strip() for c in commands]


def test_ci_runs_the_readme_commands() -> None:
    ci_lines = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()]
    install = next(ln for ln in ci_lines if ln.startswith("pip install"))
    test = next(ln for ln in ci_lines if "pytest" in ln and not ln.startswith("#"))
    commands = _quick_start_commands()
    assert install in commands, f"README quick start lacks CI's install command {install!r}"
    assert test in commands, f"README quick start lacks CI's test command {test!r}"


def test_readme_install_line_installs_what_the_tests_import() -> None:
    """The quick start runs the test suite, which imports every extra (metrics, the bench, pytest)."""
    install = next(c for c in _quick_start_commands() if c.startswith("pip install"))
    assert _extras_of(install) == set(_project()["optional-dependencies"]), install
    standalone = next(ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("**Standalone**"))
    assert f"`{install}`" in standalone, f"README's Standalone line should install as the quick start: {install}"


def test_wheel_ships_the_toy_model_and_the_installed_package_finds_it(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", minversion="77", reason="building offline needs setuptools >= 77 installed")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in ("ldm", "erasure", "configs", "models/toy", "data"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    toy_files = [ROOT / "configs" / "toy" / "toy-ldm.yaml", ROOT / "data" / "toy-heldout-wordings.csv",
                 *(p for p in (ROOT / "models" / "toy").rglob("*") if p.is_file())]
    expected = {f"erasure/_resources/{path.relative_to(ROOT).as_posix()}" for path in toy_files}
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.startswith("erasure/_resources/")}
        archive.extractall(tmp_path / "site")
    assert shipped == expected, f"missing: {sorted(expected - shipped)}; unexpected: {sorted(shipped - expected)}"

    # The unpacked wheel, without site-packages or the checkout on the path, resolves to itself.
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from erasure import resources as r; "
             "print(r.source_root()); print(r.require_toy_file(r.toy_config_path())); "
             "print(r.require_toy_file(r.toy_model_dir() / 'model.safetensors'))")
    run = subprocess.run([sys.executable, "-S", "-c", probe, str(tmp_path / "site")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    packaged = tmp_path / "site" / "erasure" / "_resources"
    assert run.stdout.split() == [
        "None", str(packaged / "configs" / "toy" / "toy-ldm.yaml"), str(packaged / "models" / "toy" / "model.safetensors")
    ]


def test_ldm_replace_lists_every_library_file() -> None:
    """The overlay copies exactly these files into a CompVis clone; a missing one breaks an import there."""
    listed = [ln.strip() for ln in (ROOT / "ldm-replace.txt").read_text().splitlines() if ln.strip()]
    missing_on_disk = [p for p in listed if not (ROOT / p).is_file()]
    assert not missing_on_disk, f"ldm-replace.txt lists files that do not exist: {missing_on_disk}"
    library_files = {str(p.relative_to(ROOT)) for package in FIRST_PARTY for p in (ROOT / package).rglob("*.py")}
    unlisted = sorted(library_files - set(listed))
    assert not unlisted, f"library files missing from ldm-replace.txt: {unlisted}"
