"""Safetensors files with a JSON header, written atomically and never over an existing file by accident.

Every file the method writes (bases, increments, weight differences, exported checkpoints) goes
through ``write_tensors``: the tensors go to a temporary file in the target folder that is then
moved into place with ``os.replace``, so a crash never leaves a half-written file under the
final name. The header's string metadata holds ``kind`` (what the file is), ``format_version``
and ``json`` (everything else, as one JSON document), so ``read_tensors`` can refuse a file of
the wrong kind with a message that says what the file is. Whole folders (diffusers exports) get
the same promise from ``atomic_directory``.

Temporary files and folders are named ``.{name}.{host}.{pid}.tmp`` / ``.partial``: a save killed
mid-write leaves one behind, and the next write into that folder removes it once its process is
gone (``remove_stale_temporaries``). ``check_writable`` checks an output before any work starts:
not a folder, not present (unless overwriting), its parent a writable folder or creatable.
``read_tensors`` refuses NaN/inf in any tensor, so nothing non-finite we wrote is ever used.
``run_lock`` is the exclusive lock a training run holds on its output stem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
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


def check_folder_writable(folder: str | Path, what: str = "Output folder") -> Path:
    """Refuse a ``folder`` that cannot be created or written: the nearest existing ancestor must be
    a writable folder (a file on the way, or a read-only folder, is found before any work starts)."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ErasureFileError(
            f"{what} {folder} cannot be created: {existing} is a file, not a folder; pass another path."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ErasureFileError(
            f"{what} {folder} is not writable ({existing} is read-only for this user); pass a writable folder."
        )
    return folder


def check_writable(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing ``path`` unless ``overwrite``, a directory always, and a path whose folder
    cannot be created or written."""
    path = Path(path)
    if path.is_dir():
        raise ErasureFileError(f"Output path {path} is a directory; pass a file name inside it instead.")
    if path.exists() and not overwrite:
        raise ErasureFileError(f"Output file {path} already exists; pass overwrite=True (--overwrite) to replace it.")
    check_folder_writable(path.parent)
    return path


def check_free_space(folder: str | Path, needed_bytes: int, what: str) -> None:
    """Refuse to start work whose outputs (``needed_bytes``) do not fit on ``folder``'s file system."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise ErasureFileError(
            f"{what} need about {needed_bytes / 2**20:.0f} MiB in {folder}, but only {free / 2**20:.0f} MiB are "
            f"free there; free some space or pass another folder."
        )


_HOST = re.sub(r"[^0-9A-Za-z-]", "-", socket.gethostname()) or "host"
#: ``.{name}.{host}.{pid}[.{tag}].tmp`` / ``.partial``: what ``atomic_path`` and ``atomic_directory`` leave
#: behind when killed.
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[0-9A-Za-z-]+)\.(?P<pid>[0-9]+)(\.[0-9a-f]{8})?\.(tmp|partial)$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Mode of a new file under this process's umask (what ``open`` would give).
_FILE_MODE = 0o666 & ~_umask()


def _temporary_name(path: Path, suffix: str, tag: str = "") -> Path:
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}{tag}.{suffix}")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a pid of another user's process counts as alive)."""
    if pid == os.getpid():
        return True
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: Folders this process has already cleared of leftovers (a folder of many images is listed once, not per image).
_CLEARED: set[Path] = set()


def _clear_once(folder: Path) -> None:
    key = folder.resolve()
    if key not in _CLEARED:
        remove_stale_temporaries(folder)
        _CLEARED.add(key)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files and folders that killed writes of this machine left in ``folder``.

    Only names of ``atomic_path`` / ``atomic_directory`` whose process is gone are removed;
    returns them. Never raises: a leftover that cannot be removed stays.
    """
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if not match or match["host"] != _HOST or process_alive(int(match["pid"])):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


def _discard(path: Path) -> None:
    """Remove a temporary file or folder; never raises (the block's own error is the one to report)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds,
    so readers never see a half-written file. Leftovers of killed writes in the folder are removed
    first; cleanup never raises over the block's own error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_once(path.parent)
    temporary = _temporary_name(path, "tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        _discard(temporary)


@contextmanager
def run_lock(stem: str | Path) -> Iterator[Path]:
    """Hold ``{stem}.lock`` (holding this process's PID and host) for the block: one run per output stem.

    A lock of a live process is one clear error; the lock of a process that is gone (killed run)
    is reported and taken over. The lock file is created with O_EXCL, so two runs starting at
    once cannot both take it.
    """
    lock = Path(f"{stem}.lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ErasureFileError(
            f"Cannot create the output folder {lock.parent} ({error.strerror}); pass a writable folder."
        ) from error
    owner = f"{os.getpid()} {_HOST}\n"
    for _ in range(3):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            descriptor = None
        if descriptor is None:
            _take_over_stale_lock(lock)
            continue
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(owner)
        break
    else:
        raise ErasureFileError(f"Cannot take the lock {lock}: other runs keep taking it; start this run again.")
    try:
        yield lock
    finally:
        try:
            if lock.read_text(encoding="utf-8") == owner:
                lock.unlink()
        except OSError:
            pass


def _take_over_stale_lock(lock: Path) -> None:
    """Remove ``lock`` if its process is gone (and say so); refuse if it is alive."""
    try:
        pid_text, host = lock.read_text(encoding="utf-8").split()
        pid = int(pid_text)
    except FileNotFoundError:
        return  # released meanwhile: try again
    except (OSError, ValueError):
        raise ErasureFileError(
            f"{lock} exists but does not hold a process id; if no run writes into this folder, delete it."
        ) from None
    if host != _HOST:
        raise ErasureFileError(
            f"Another run (PID {pid} on {host}) holds {lock}: it writes the same outputs. Wait for it to end, or "
            f"pass another --output_dir; if that run is gone, delete {lock}."
        )
    if process_alive(pid):
        raise ErasureFileError(
            f"Another run (PID {pid}) is writing these outputs (it holds {lock}); wait for it to end, or pass "
            f"another --output_dir. If no such run is going on, delete {lock}."
        )
    aside = lock.with_name(f"{lock.name}.{os.getpid()}.stale")
    try:
        os.rename(lock, aside)  # only one of several runs taking over gets the stale file
    except FileNotFoundError:
        return
    if aside.read_text(encoding="utf-8") != f"{pid} {host}\n":  # a live run took it over just before us
        os.rename(aside, lock)
        raise ErasureFileError(f"Another run has just taken {lock}; wait for it to end, or pass another --output_dir.")
    aside.unlink()
    print(f"Took over the lock {lock} of run PID {pid}, which is gone (killed).", file=sys.stderr, flush=True)


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
    _clear_once(path.parent)
    staging = _temporary_name(path, "partial", f".{uuid.uuid4().hex[:8]}")
    staging.mkdir()  # not mkdtemp: its 0700 mode would outlive the rename; mkdir follows the umask
    try:
        yield staging
        _check_directory_writable(path, overwrite)  # something may have appeared meanwhile
        if path.exists():
            _replace_directory(staging, path)
        else:
            staging.rename(path)
    finally:
        _discard(staging)


def _check_directory_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise ErasureFileError(f"Output path {path} is a file; pass a folder name (the output is a folder).")
    if path.exists() and not overwrite:
        raise ErasureFileError(
            f"Output folder {path} already exists; pass overwrite=True (--overwrite) to replace it."
        )
    check_folder_writable(path.parent)


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
        os.chmod(temporary, _FILE_MODE)  # safetensors creates files 0600; give them the usual umask mode
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
    bad = [key for key, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise ErasureFileError(
            f"{path}: tensor {bad[0]} holds NaN/inf values ({len(bad)} of {len(tensors)} tensors); the file is "
            f"corrupted or was written from a diverged run. Use an earlier file, or train again with a lower lr."
        )
    return tensors, _json_record(path, header[JSON_KEY])


def _json_record(path: Path, text: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ErasureFileError(
            f"{path}: the JSON record in its header is invalid ({error}); the file was altered or truncated. "
            f"Write it again with the erasure tools."
        ) from error
    if not isinstance(record, dict):
        raise ErasureFileError(f"{path}: the JSON record in its header is not an object; write it again.")
    return record


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
