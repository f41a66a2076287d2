"""Safetensors files with a JSON header, written atomically and never over an existing file by accident.

Every file the method writes (bases, increments, weight differences, exported checkpoints) goes
through ``write_tensors``: the tensors go to a temporary file in the target folder that is then
moved into place with ``os.replace``, so a crash never leaves a half-written file under the
final name. The header's string metadata holds ``kind`` (what the file is), ``format_version``
and ``json`` (everything else, as one JSON document), so ``read_tensors`` can refuse a file of
the wrong kind with a message that says what the file is. Whole folders (diffusers exports) get
the same promise from ``atomic_directory``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from erasure.errors import ErasureFileError

FORMAT_VERSION = "1"
KIND_KEY = "kind"
FORMAT_KEY = "format_version"
JSON_KEY = "json"


def versions() -> dict[str, str]:
    """Library versions recorded in every file (they explain numerical differences later)."""
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def check_writable(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing ``path`` unless ``overwrite``; refuse a directory always."""
    path = Path(path)
    if path.is_dir():
        raise ErasureFileError(f"Output path {path} is a directory; pass a file name inside it instead.")
    if path.exists() and not overwrite:
        raise ErasureFileError(f"Output file {path} already exists; pass overwrite=True (--overwrite) to replace it.")
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds,
    so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it becomes ``path`` only if the block succeeds.

    Readers never see a half-written folder under the final name: a failed block leaves
    ``path`` as it was (absent, or the old folder) and no temporary folder behind. With
    ``overwrite`` an existing folder is moved aside, the new one renamed into place and the old
    one deleted; if the rename fails the old folder is put back. Cleanup never raises over the
    block's own error.
    """
    path = Path(path)
    _check_directory_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    staging.mkdir()  # not mkdtemp: its 0700 mode would outlive the rename; mkdir follows the umask
    try:
        yield staging
        _check_directory_writable(path, overwrite)  # something may have appeared meanwhile
        if path.exists():
            _replace_directory(staging, path)
        else:
            staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_directory_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise ErasureFileError(f"Output path {path} is a file; pass a folder name (the output is a folder).")
    if path.exists() and not overwrite:
        raise ErasureFileError(
            f"Output folder {path} already exists; pass overwrite=True (--overwrite) to replace it."
        )


def _replace_directory(staging: Path, path: Path) -> None:
    """Swap ``staging`` in for the existing folder ``path``; on failure ``path`` keeps the old folder."""
    aside_parent = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    aside = aside_parent / path.name
    try:
        path.rename(aside)
        try:
            staging.rename(path)
        except OSError:
            aside.rename(path)
            raise
    finally:
        if not aside.exists():  # the old folder is back under ``path``: only an empty folder is left
            shutil.rmtree(aside_parent, ignore_errors=True)
    shutil.rmtree(aside_parent, ignore_errors=True)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read in blocks: provenance records name files by it."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` (UTF-8), atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(record: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``record`` as indented JSON, atomically."""
    return write_text(json.dumps(record, indent=2) + "\n", path)


def write_tensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    kind: str,
    metadata: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write ``tensors`` (moved to CPU, contiguous, unshared) with ``kind`` and JSON ``metadata``, atomically."""
    path = check_writable(path, overwrite)
    if path.suffix != ".safetensors":
        raise ErasureFileError(f"Output file {path} must end in .safetensors (the only format written).")
    header = {KIND_KEY: kind, FORMAT_KEY: FORMAT_VERSION, JSON_KEY: json.dumps(dict(metadata), sort_keys=True)}
    payload = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    with atomic_path(path) as temporary:
        save_file(payload, str(temporary), metadata=header)
    return path


def read_kind(path: str | Path) -> str:
    """The ``kind`` recorded in a file's header (refuses files this project did not write)."""
    return _read_header(Path(path))[KIND_KEY]


def read_tensors(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (on CPU) and JSON metadata of a file written by ``write_tensors`` with this ``kind``."""
    path = Path(path)
    header = _read_header(path)
    if header[KIND_KEY] != kind:
        raise ErasureFileError(f"{path} holds a {header[KIND_KEY]}, not a {kind}; pass a {kind} file here.")
    with safe_open(str(path), framework="pt", device="cpu") as reader:
        tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    return tensors, json.loads(header[JSON_KEY])


def _read_header(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise ErasureFileError(f"{path} does not exist (or is not a file); check the path.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            header = reader.metadata() or {}
    except Exception as error:  # safetensors raises several types for foreign or truncated files
        raise ErasureFileError(
            f"Cannot read {path} as safetensors ({type(error).__name__}: {error}); the file is truncated or "
            f"not a safetensors file."
        ) from error
    if KIND_KEY not in header or JSON_KEY not in header:
        raise ErasureFileError(
            f"{path} is a safetensors file without this project's header (no '{KIND_KEY}'/'{JSON_KEY}'); pass a "
            f"basis, increment or weight-difference file written by the erasure tools."
        )
    if header.get(FORMAT_KEY) != FORMAT_VERSION:
        raise ErasureFileError(
            f"{path} has format version {header.get(FORMAT_KEY)!r}; this code reads version {FORMAT_VERSION}. "
            f"Regenerate the file with this version of the tools."
        )
    return header
