"""The layering rule of docs/ARCHITECTURE.md: the toy world is a leaf that plugs into the core.

``erasure.toy`` may import the core, but no module of the core (every .py file under erasure/
outside erasure/toy/) may import ``erasure.toy``: not at module level, not inside a function,
not relatively, not by ``importlib.import_module``. A model's config names its world
(erasure/worlds.py) and the core reads that instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "erasure"
LEAF = "erasure.toy"


def _is_leaf(module: str) -> bool:
    return module == LEAF or module.startswith(LEAF + ".")


def _package_of(path: Path, root: Path) -> list[str]:
    """The dotted package a file's relative imports start from (its folder, as a list of names)."""
    return list(path.relative_to(root).parent.parts)


def _imported_modules(node: ast.AST, package: list[str]) -> list[str]:
    """Every module (and ``module.name`` for ``from module import name``) an import node may load."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = package[: len(package) - node.level + 1] if node.level else []
        module = ".".join([*base, *(node.module.split(".") if node.module else [])])
        return [module, *(f"{module}.{alias.name}" for alias in node.names)]
    called = getattr(node.func, "attr", getattr(node.func, "id", None)) if isinstance(node, ast.Call) else None
    if (
        called in ("import_module", "__import__")
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return [node.args[0].value]
    return []


def leaf_imports(path: Path, root: Path = REPO_ROOT) -> list[str]:
    """``file:line: module`` for every import of the toy world in the file at ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _package_of(path, root)
    found = []
    for node in ast.walk(tree):
        for module in _imported_modules(node, package):
            if _is_leaf(module):
                found.append(f"{path.relative_to(root)}:{node.lineno}: imports {module}")
                break
    return found


def core_files() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if not path.is_relative_to(PACKAGE / "toy"))


@pytest.mark.parametrize("path", core_files(), ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_the_core_never_imports_the_toy_world(path: Path) -> None:
    violations = leaf_imports(path)
    assert not violations, "the core must not import erasure.toy (read the model's world instead):\n" + "\n".join(
        violations
    )


def test_every_kind_of_toy_import_is_found(tmp_path: Path) -> None:
    """The checker itself: absolute, relative at any depth, inside functions, and by importlib."""
    module = tmp_path / "erasure" / "trainers" / "example.py"
    module.parent.mkdir(parents=True)
    module.write_text(
        "import erasure.toy.world\n"
        "from erasure.toy import oracle\n"
        "from erasure import toy\n"
        "from .. import toy as t\n"
        "from ..toy.render import render\n"
        "def later():\n"
        "    from erasure.toy.oracle import load_oracle\n"
        "    importlib.import_module('erasure.toy.world')\n"
        "from erasure import worlds\n"
        "from . import loop\n"
        "import erasure.toys_elsewhere\n",
        encoding="utf-8",
    )
    lines = sorted(int(entry.split(":")[1]) for entry in leaf_imports(module, tmp_path))
    assert lines == [1, 2, 3, 4, 5, 7, 8]
