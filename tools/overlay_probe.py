"""Probes that ``tools/check-overlay.py`` runs inside the overlaid copy of a CompVis clone.

    python overlay_probe.py modules ROOT NAME...        import each module (ldm.util, scripts/txt2img.py)
    python overlay_probe.py configs ROOT LIMIT PATH...  build each config's ``model``

The working directory and ``sys.path[0]`` are ROOT (the copy), so every ``ldm`` import comes from
there, as in a clone installed with ``pip install -e .``. Each item runs in a process of its own:
forked from this one after the third-party packages every item needs (torch, ...) are imported,
which keeps the items independent of each other (nothing of ROOT is imported before the fork)
without paying the interpreter and torch start-up per item. One ``RESULT_PREFIX`` JSON line per
item goes to stdout; whatever the items print goes to stderr.

This file imports nothing from the project, so that the copy's code is the only code probed.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULT_PREFIX = "OVERLAY-PROBE "
#: Imported before forking: not project code, only start-up time saved per item.
PRELOAD = ("numpy", "torch", "torchvision", "omegaconf", "pytorch_lightning", "transformers")
ITEM_TIMEOUT_S = 300
BYTES_PER_PARAMETER = 4


def _error_text(error: BaseException, root: Path) -> str:
    """``Type: message`` and the innermost frame inside ROOT (where the fix belongs)."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename.startswith(str(root))]
    where = f" [{Path(frames[-1].filename).relative_to(root)}:{frames[-1].lineno}]" if frames else ""
    message = " ".join(str(error).split())
    if len(message) > 400:
        message = message[:400] + " ..."
    return f"{type(error).__name__}: {message}{where}"


def _in_child(item: str, work: Callable[[str], dict[str, Any]], root: Path) -> dict[str, Any]:
    """Run ``work(item)`` in a forked process; its result, or why the process ended without one."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.dup2(2, 1)  # the item's own prints must not mix with the result lines
        signal.alarm(ITEM_TIMEOUT_S)
        try:
            result = {"ok": True, **work(item)}
        except BaseException as error:  # the probe reports every failure, SystemExit included
            result = {"ok": False, "error": _error_text(error, root)}
        with os.fdopen(write_end, "w") as channel:
            channel.write(json.dumps(result))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as channel:
        payload = channel.read()
    _, status = os.waitpid(pid, 0)
    if payload:
        return json.loads(payload)
    why = f"the process ended without a result (wait status {status}; timeout {ITEM_TIMEOUT_S} s)"
    return {"ok": False, "error": why}


def _import_module(root: Path) -> Callable[[str], dict[str, Any]]:
    def work(name: str) -> dict[str, Any]:
        if name.endswith(".py"):  # a script: run its top level as `python scripts/x.py` would, minus __main__
            sys.path.insert(0, str((root / name).parent))
            runpy.run_path(str(root / name), run_name="__overlay_probe__")
            return {}
        module = importlib.import_module(name)
        origin = Path(getattr(module, "__file__", "") or "")
        if root not in origin.parents:
            raise ImportError(f"{name} was imported from {origin}, not from the overlaid copy {root}")
        return {}

    return work


def _prepare_config(node: Any) -> None:
    """What a config needs to be built offline without weights: every ``ckpt_path`` becomes None
    (CompVis's configs name first-stage checkpoints a fresh clone lacks and load them when built),
    and a training loss from ``ldm.modules.losses`` (CompVis's LPIPS losses download VGG16 weights
    when built) must resolve but is built as ``torch.nn.Identity``."""
    from omegaconf import DictConfig, ListConfig

    from ldm.util import get_obj_from_str

    if isinstance(node, DictConfig):
        if node.get("ckpt_path") is not None:
            node.ckpt_path = None
        target = node.get("target")
        if isinstance(target, str) and target.startswith("ldm.modules.losses."):
            get_obj_from_str(target)
            node.target, node.params = "torch.nn.Identity", {}
        for value in node.values():
            _prepare_config(value)
    elif isinstance(node, ListConfig):
        for value in node:
            _prepare_config(value)


def _build_config(root: Path, real_size_limit_bytes: float) -> Callable[[str], dict[str, Any]]:
    def work(path: str) -> dict[str, Any]:
        import torch
        from omegaconf import DictConfig, OmegaConf

        from ldm.util import instantiate_from_config

        config = OmegaConf.load(root / path)
        if not isinstance(config, DictConfig) or "target" not in config.get("model", {}):
            raise ValueError("no `model: target:` section")
        _prepare_config(config.model)
        with torch.device("meta"):
            model = instantiate_from_config(config.model)
        parameters = sum(parameter.numel() for parameter in model.parameters())
        del model
        if parameters * BYTES_PER_PARAMETER > real_size_limit_bytes:
            return {"parameters": parameters, "device": "meta"}
        model = instantiate_from_config(config.model)
        return {"parameters": sum(parameter.numel() for parameter in model.parameters()), "device": "cpu"}

    return work


def main(argv: list[str]) -> None:
    kind, root_text, *rest = argv
    root = Path(root_text).resolve()
    sys.path[0] = str(root)
    os.chdir(root)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # an absent package fails the items that need it, each with its own message
            pass
    if kind == "modules":
        work, items = _import_module(root), rest
    else:
        work, items = _build_config(root, float(rest[0]) * 2**30), rest[1:]
    for item in items:
        print(RESULT_PREFIX + json.dumps({"item": item, **_in_child(item, work, root)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
