"""Input errors come from one module, are ValueErrors, and scripts turn them into one line and status 2."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import erasure
from erasure import errors
from erasure.cli import EXIT_BAD_INPUT, run_script

ERASURE = Path(__file__).resolve().parents[1] / "erasure"


def test_every_exception_class_of_the_library_is_defined_in_errors() -> None:
    elsewhere = []
    for path in ERASURE.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                elsewhere.append(f"{path.relative_to(ERASURE.parent)}:{node.lineno} {node.name}")
    assert elsewhere == []


def test_every_error_is_an_erasure_error_and_a_value_error() -> None:
    classes = [value for _, value in inspect.getmembers(errors, inspect.isclass) if issubclass(value, Exception)]
    assert len(classes) > 10
    assert all(issubclass(cls, errors.ErasureError) and issubclass(cls, ValueError) for cls in classes)
    assert erasure.ErasureError is errors.ErasureError


def test_run_script_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    def main() -> None:
        raise errors.IncrementError("Increment 'x' does not fit; retrain it.")

    with pytest.raises(SystemExit) as exit_info:
        run_script(main)
    assert exit_info.value.code == EXIT_BAD_INPUT == 2
    assert capsys.readouterr().err == "error: Increment 'x' does not fit; retrain it.\n"
