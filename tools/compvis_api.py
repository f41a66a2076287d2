"""Is our ``ldm/`` a superset of CompVis's? Compare public names and signatures by AST.

For every file under ``ldm/`` that ``ldm-replace.txt`` lists and the CompVis clone also has,
every public module-level class and function of the CompVis file must exist in ours with a
compatible signature: the same parameters in the same order with the same defaults; ours may
add parameters that have defaults. A class's signature is its ``__init__`` (looked up through
base classes defined in ``ldm``). Names that ours re-exports (``from ldm.x import Name``) are
followed to the module that defines them. Nothing is imported, so the check runs without
torch and without the optional packages.

Public methods of those classes are compared the same way; ``--methods`` lists their gaps
too (a method that ours lacks, or has with an incompatible signature).

Usage: ``python tools/compvis_api.py PATH_TO_COMPVIS_CLONE [--methods]`` (exit 1 on gaps).
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Signature:
    """Parameters of a def: (name, default source or None) in order, plus the star flags."""

    positional: tuple[tuple[str, str | None], ...]
    keyword_only: tuple[tuple[str, str | None], ...]
    var_positional: bool
    var_keyword: bool

    def describe(self) -> str:
        parts = [name if default is None else f"{name}={default}" for name, default in self.positional]
        if self.var_positional:
            parts.append("*args")
        elif self.keyword_only:
            parts.append("*")
        parts += [name if default is None else f"{name}={default}" for name, default in self.keyword_only]
        if self.var_keyword:
            parts.append("**kwargs")
        return f"({', '.join(parts)})"


def signature_of(function: ast.FunctionDef | ast.AsyncFunctionDef) -> Signature:
    arguments = function.args
    positional_args = arguments.posonlyargs + arguments.args
    defaults: list[str | None] = [None] * (len(positional_args) - len(arguments.defaults))
    defaults += [ast.unparse(value) for value in arguments.defaults]
    keyword_defaults = [None if value is None else ast.unparse(value) for value in arguments.kw_defaults]
    return Signature(
        positional=tuple((arg.arg, default) for arg, default in zip(positional_args, defaults)),
        keyword_only=tuple((arg.arg, default) for arg, default in zip(arguments.kwonlyargs, keyword_defaults)),
        var_positional=arguments.vararg is not None,
        var_keyword=arguments.kwarg is not None,
    )


_EMPTY_SEQUENCES = {"[]", "()", "list()", "tuple()"}
_EMPTY_MAPPINGS = {"{}", "dict()"}


def same_default(theirs: str, ours: str | None) -> bool:
    """Equal literal defaults. An empty list and an empty tuple count as the same, and None may
    stand for CompVis's mutable empty default (``[]``, ``{}``): the usual way to write it."""
    if ours is None:
        return False
    if theirs in _EMPTY_SEQUENCES | _EMPTY_MAPPINGS and ours == "None":
        return True
    if theirs in _EMPTY_SEQUENCES:
        return ours in _EMPTY_SEQUENCES
    if theirs in _EMPTY_MAPPINGS:
        return ours in _EMPTY_MAPPINGS
    try:
        their_value, our_value = ast.literal_eval(theirs), ast.literal_eval(ours)
    except (ValueError, SyntaxError):
        return theirs == ours
    if isinstance(their_value, list | tuple) and isinstance(our_value, list | tuple):
        return list(their_value) == list(our_value)
    return type(their_value) is type(our_value) and their_value == our_value or (
        isinstance(their_value, int | float) and isinstance(our_value, int | float)
        and not isinstance(their_value, bool) and not isinstance(our_value, bool) and their_value == our_value
    )


def incompatibility(theirs: Signature, ours: Signature) -> str | None:
    """Why a call written against ``theirs`` could fail or change meaning with ``ours``; None if it cannot."""
    if len(ours.positional) < len(theirs.positional) and not ours.var_positional:
        return "fewer positional parameters"
    for index, (name, default) in enumerate(theirs.positional):
        if index >= len(ours.positional):
            if ours.var_positional and ours.var_keyword:
                continue  # passed positionally it lands in *args, by keyword in **kwargs
            return f"parameter '{name}' missing"
        our_name, our_default = ours.positional[index]
        if our_name != name:
            return f"parameter {index} is '{our_name}', CompVis calls it '{name}'"
        if default is not None and not same_default(default, our_default):
            return f"'{name}' defaults to {our_default}, CompVis {default}"
    our_keywords = dict(ours.keyword_only)
    for name, default in theirs.keyword_only:
        if name not in our_keywords and name not in dict(ours.positional):
            if not ours.var_keyword:
                return f"keyword parameter '{name}' missing"
            continue
        our_default = our_keywords.get(name, dict(ours.positional).get(name))
        if default is not None and not same_default(default, our_default):
            return f"'{name}' defaults to {our_default}, CompVis {default}"
    for name, default in ours.positional[len(theirs.positional):] + ours.keyword_only:
        if default is None and name not in dict(theirs.keyword_only):
            return f"our extra parameter '{name}' has no default"
    if theirs.var_positional and not ours.var_positional:
        return "CompVis accepts *args, ours does not"
    if theirs.var_keyword and not ours.var_keyword:
        return "CompVis accepts **kwargs, ours does not"
    return None


class ModuleIndex:
    """Module-level definitions of Python files under one root, following ``from ... import``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._trees: dict[str, ast.Module | None] = {}

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            path = self.root / Path(*module.split("."))
            candidates = [path.with_suffix(".py"), path / "__init__.py"]
            found = next((candidate for candidate in candidates if candidate.is_file()), None)
            self._trees[module] = None if found is None else ast.parse(found.read_text(), str(found))
        return self._trees[module]

    def definition(self, module: str, name: str, depth: int = 0) -> tuple[str, ast.AST] | None:
        """(defining module, node) of ``name`` as seen from ``module``: a def, a class or an alias."""
        tree = self.tree(module)
        if tree is None or depth > 8:
            return None
        found: tuple[str, ast.AST] | None = None
        for node in tree.body + _lazy_imports(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name:
                found = (module, node)
            elif isinstance(node, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == name for target in node.targets
            ):
                if isinstance(node.value, ast.Name):
                    found = self.definition(module, node.value.id, depth + 1)
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        source = self._absolute(module, node)
                        found = self.definition(source, alias.name, depth + 1) if source else None
        return found

    def _absolute(self, module: str, node: ast.ImportFrom) -> str | None:
        if node.level == 0:
            return node.module
        is_package = (self.root / Path(*module.split(".")) / "__init__.py").is_file()
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - node.level + 1]
        return ".".join(parts + ([node.module] if node.module else []))

    def methods(self, module: str, cls: ast.ClassDef, depth: int = 0) -> dict[str, ast.FunctionDef]:
        """Methods of ``cls`` including those inherited from bases this index can resolve."""
        found: dict[str, ast.FunctionDef] = {}
        if depth > 8:
            return found
        for base in reversed(cls.bases):  # earlier bases win, as in the method resolution order
            base_name = base.id if isinstance(base, ast.Name) else None
            resolved = self.definition(module, base_name, depth + 1) if base_name else None
            if resolved and isinstance(resolved[1], ast.ClassDef):
                found.update(self.methods(resolved[0], resolved[1], depth + 1))
        for node in cls.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                found[node.name] = node
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and node.value.id in found:
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        found[target.id] = found[node.value.id]
        return found


def _lazy_imports(tree: ast.Module) -> list[ast.ImportFrom]:
    """``from ... import`` statements inside a module-level ``__getattr__``: names the module
    re-exports on first use (PEP 562), where a top-level import would be circular."""
    hooks = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"]
    return [node for hook in hooks for node in ast.walk(hook) if isinstance(node, ast.ImportFrom)]


_NO_ARGUMENTS = Signature(positional=(("self", None),), keyword_only=(), var_positional=False, var_keyword=False)


def public_definitions(tree: ast.Module) -> list[ast.FunctionDef | ast.ClassDef]:
    return [
        node for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and not node.name.startswith("_")
    ]


def replaced_modules(clone: Path, repo: Path = REPO_ROOT) -> list[str]:
    """Dotted names of the ``ldm`` files listed in ldm-replace.txt that the clone also has."""
    modules = []
    for line in (repo / "ldm-replace.txt").read_text().splitlines():
        path = line.strip()
        if path.startswith("ldm/") and path.endswith(".py") and (clone / path).is_file():
            modules.append(path[:-3].replace("/", "."))
    return modules


@dataclass
class Report:
    names: int = 0
    methods: int = 0
    missing: list[str] = None  # type: ignore[assignment]
    method_gaps: list[str] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.missing = []
        self.method_gaps = []


def compare(clone: Path, repo: Path = REPO_ROOT) -> Report:
    """Every gap between the clone's public ``ldm`` API and ours."""
    theirs, ours = ModuleIndex(clone), ModuleIndex(repo)
    report = Report()
    for module in replaced_modules(clone, repo):
        tree = theirs.tree(module)
        assert tree is not None
        for node in public_definitions(tree):
            report.names += 1
            where = f"{module}.{node.name}"
            resolved = ours.definition(module, node.name)
            if resolved is None:
                report.missing.append(f"{where}: missing")
                continue
            our_module, our_node = resolved
            if isinstance(node, ast.ClassDef) != isinstance(our_node, ast.ClassDef):
                report.missing.append(f"{where}: CompVis has a {'class' if isinstance(node, ast.ClassDef) else 'function'}, ours is not")
                continue
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                problem = incompatibility(signature_of(node), signature_of(our_node))  # type: ignore[arg-type]
                if problem:
                    report.missing.append(f"{where}{signature_of(node).describe()}: {problem}")
                continue
            their_methods = theirs.methods(module, node)
            our_methods = ours.methods(our_module, our_node)  # type: ignore[arg-type]
            for method_name, method in their_methods.items():
                if method_name.startswith("_") and method_name != "__init__":
                    continue
                if method_name != "__init__":
                    report.methods += 1
                gaps = report.missing if method_name == "__init__" else report.method_gaps
                label = where if method_name == "__init__" else f"{where}.{method_name}"
                if method_name == "__init__" and "__init__" not in our_methods:
                    if signature_of(method) != _NO_ARGUMENTS:
                        gaps.append(f"{label}{signature_of(method).describe()}: ours inherits __init__ from outside ldm")
                    continue
                if method_name not in our_methods:
                    gaps.append(f"{label}: missing")
                    continue
                problem = incompatibility(signature_of(method), signature_of(our_methods[method_name]))
                if problem:
                    gaps.append(f"{label}{signature_of(method).describe()}: {problem}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("clone", type=Path, help="a CompVis/stable-diffusion clone (not overlaid)")
    parser.add_argument("--methods", action="store_true", help="also list gaps in public methods")
    args = parser.parse_args(argv)
    if not (args.clone / "ldm" / "models" / "diffusion" / "ddpm.py").is_file():
        print(f"error: {args.clone} is not a CompVis/stable-diffusion clone (no ldm/models/diffusion/ddpm.py)",
              file=sys.stderr)
        return 2
    report = compare(args.clone)
    for gap in report.missing + (report.method_gaps if args.methods else []):
        print(gap)
    print(f"{report.names} CompVis public names, {len(report.missing)} missing or incompatible; "
          f"{report.methods} public methods, {len(report.method_gaps)} missing or incompatible")
    return 1 if report.missing or (args.methods and report.method_gaps) else 0


if __name__ == "__main__":
    sys.exit(main())
