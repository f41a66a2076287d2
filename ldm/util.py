"""Small helpers shared by the whole ``ldm`` package (CompVis ``ldm/util.py`` interface)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")

# Sentinel strings CompVis configs use instead of a real sub-model config.
_SENTINEL_CONFIGS = ("__is_first_stage__", "__is_unconditional__")


def exists(value: Any) -> bool:
    return value is not None


def default(value: T | None, fallback: T | Callable[[], T]) -> T:
    """``value`` unless it is None; a callable fallback is only evaluated when needed."""
    if exists(value):
        return value
    return fallback() if callable(fallback) else fallback


def ismap(x: Any) -> bool:
    """True for a [B, C, H, W] tensor with more than 3 channels (a feature map, not an image)."""
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] > 3


def isimage(x: Any) -> bool:
    """True for a [B, C, H, W] tensor with 1 or 3 channels."""
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] in (1, 3)


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def count_params(model: nn.Module, verbose: bool = False) -> int:
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"{model.__class__.__name__} has {total * 1.e-6:.2f} M params.")
    return total


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Resolve a dotted path ``package.module.Name`` to the object it names."""
    module_name, _, attr = string.rpartition(".")
    if not module_name:
        raise ValueError(f"'{string}' is not a dotted path of the form 'package.module.Name'.")
    module = importlib.import_module(module_name)
    if reload:
        module = importlib.reload(module)
    return getattr(module, attr)


def instantiate_from_config(config: Mapping[str, Any] | str, **overrides: Any) -> Any:
    """Build ``target(**params)`` from a config mapping (a dict or an OmegaConf node).

    ``overrides`` are merged over ``params``. The CompVis sentinels ``"__is_first_stage__"``
    and ``"__is_unconditional__"`` give None.
    """
    if isinstance(config, str) and config in _SENTINEL_CONFIGS:
        return None
    if not isinstance(config, Mapping) and not hasattr(config, "keys"):
        raise TypeError(
            f"Expected a config mapping with a `target` key, got {type(config).__name__}: {config!r}."
        )
    if "target" not in config:
        raise KeyError(
            f"Expected key `target` to instantiate; the config has keys {sorted(config.keys())}. "
            "Add `target: package.module.ClassName` (and optional `params:`)."
        )
    target = config["target"]
    try:
        factory = get_obj_from_str(target)
    except (ImportError, AttributeError, ValueError) as error:
        raise ImportError(
            f"Cannot resolve config key `target: {target}` ({error}). "
            "Check the spelling of the dotted path and that its package is importable."
        ) from error
    params = dict(config.get("params", None) or {})
    params.update(overrides)
    return factory(**params)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file or a trusted torch checkpoint; unwrap ``state_dict``.

    CompVis ``.ckpt`` files pickle PyTorch-Lightning objects, so they need
    ``weights_only=False``: only load such files from sources you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint '{path}' does not exist; pass the path of a .ckpt or .safetensors file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"Checkpoint '{path}' holds a {type(checkpoint).__name__}, not a state dict.")
    return dict(checkpoint)
