"""Small helpers shared by the whole ``ldm`` package (CompVis ``ldm/util.py`` interface)."""

from __future__ import annotations

import importlib
import textwrap
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

T = TypeVar("T")

# Sentinel strings CompVis configs use instead of a real sub-model config.
_SENTINEL_CONFIGS = ("__is_first_stage__", "__is_unconditional__")


def exists(x: Any) -> bool:
    return x is not None


def default(val: T | None, d: T | Callable[[], T]) -> T:
    """``val`` unless it is None; a callable fallback ``d`` is only evaluated when needed."""
    if exists(val):
        return val
    return d() if callable(d) else d


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


def log_txt_as_img(wh: tuple[int, int], xc: list[str], size: int = 10) -> torch.Tensor:
    """Render each caption of ``xc`` black on white into a ``wh`` = (width, height) image.

    Returns [len(xc), 3, height, width] in [-1, 1], the range of the model's images, so that
    captions can be logged in the same grid. Lines wrap at 40 characters per 256 pixels.
    """
    font = ImageFont.load_default(size=size)
    characters_per_line = max(1, int(40 * wh[0] / 256))
    images = []
    for caption in xc:
        canvas = Image.new("RGB", tuple(wh), color="white")
        text = "\n".join(textwrap.wrap(caption, characters_per_line, break_long_words=True)) if caption else ""
        ImageDraw.Draw(canvas).text((0, 0), text, fill="black", font=font)
        images.append(np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(images)) if images else torch.empty(0, 3, wh[1], wh[0])


def _apply_to_part(func: Callable[..., Any], part: Any, index: int, use_worker_id: bool) -> Any:
    return func(part, worker_id=index) if use_worker_id else func(part)


def parallel_data_prefetch(
    func: Callable[..., Any],
    data: Iterable[Any] | np.ndarray,
    n_proc: int,
    target_data_type: str = "ndarray",
    cpu_intensive: bool = True,
    use_worker_id: bool = False,
) -> Any:
    """Split ``data`` into ``n_proc`` parts, apply ``func`` to each in parallel, join the results.

    ``cpu_intensive`` uses processes (``func`` must be picklable), otherwise threads. With
    ``target_data_type="ndarray"`` the parts are numpy arrays and the results are concatenated
    along axis 0; with ``"list"`` the parts are lists and the result lists are chained; any
    other value returns the list of per-part results. A dict contributes its values. With
    ``use_worker_id`` each call also gets ``worker_id=<part index>``.
    """
    if n_proc < 1:
        raise ValueError(f"parallel_data_prefetch: n_proc must be >= 1, got {n_proc}.")
    if isinstance(data, np.ndarray) and target_data_type == "list":
        raise ValueError("parallel_data_prefetch: target_data_type='list' needs a list, got an ndarray.")
    if isinstance(data, dict):
        data = list(data.values())
    if not isinstance(data, np.ndarray | Iterable):
        raise TypeError(f"parallel_data_prefetch: data must be an ndarray or an iterable, got {type(data).__name__}.")
    if target_data_type == "ndarray":
        parts: list[Any] = np.array_split(np.asarray(data), n_proc)
    else:
        items = list(data)
        step = -(-len(items) // n_proc) or 1
        parts = [items[start:start + step] for start in range(0, len(items), step)]
    pool: Executor = ProcessPoolExecutor(n_proc) if cpu_intensive else ThreadPoolExecutor(n_proc)
    with pool:
        results = list(pool.map(_apply_to_part, [func] * len(parts), parts, range(len(parts)),
                                [use_worker_id] * len(parts)))
    if target_data_type == "ndarray":
        return np.concatenate([np.asarray(result) for result in results], axis=0)
    if target_data_type == "list":
        return [item for result in results for item in result]
    return results
