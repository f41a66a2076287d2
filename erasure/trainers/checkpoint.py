"""Training checkpoints: trained tensors, Adam state, stoppers and step in ONE safetensors file.

Written atomically by ``erasure.files.write_tensors`` (temporary file, then rename), so the
previous checkpoint survives a crash mid-write; read back only by this project. The random
state needs no saving: every step's draws come from ``runtime.step_generator(seed, step)``.
``run`` records the settings that decide the result; resuming with different ones is refused.
A checkpoint is written only when every trained tensor is finite, so a diverged step never
replaces the last good checkpoint (``read_tensors`` refuses non-finite tensors on resume).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from erasure.errors import CheckpointError, NonFiniteLossError
from erasure.files import read_tensors, write_tensors

CHECKPOINT_KIND = "training_checkpoint"
PARAM_PREFIX = "param."
OPTIMIZER_PREFIX = "optimizer."


@dataclass
class TrainingState:
    step: int
    run: dict[str, Any]
    stoppers: dict[str, dict[str, Any]]
    extra: dict[str, Any]


def _optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Adam-like state as named tensors plus the JSON-able rest (param groups, scalar state)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIMIZER_PREFIX}{names[index]}.{key}"] = value
            else:
                scalars.setdefault(names[index], {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalar_state": scalars}


def save_checkpoint(
    path: Path,
    parameters: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
) -> Path:
    """Write ``parameters`` (named, the optimizer's in its order first; any other tensor restored in place,
    such as a buffer, may follow), the optimizer and ``state`` to ``path``."""
    names = list(parameters)
    tensors = {PARAM_PREFIX + name: parameter.detach() for name, parameter in parameters.items()}
    optimizer_tensors, optimizer_meta = _optimizer_tensors(optimizer, names)
    tensors.update(optimizer_tensors)
    finite = torch.stack([torch.isfinite(tensor).all() for tensor in tensors.values()]).tolist()
    if not all(finite):
        bad = [name for name, ok in zip(tensors, finite) if not ok]
        kept = f"the previous checkpoint {path} was kept" if path.is_file() else "no checkpoint was written"
        raise NonFiniteLossError(
            f"Training diverged: {bad[0]} holds NaN/inf after step {state.step}; {kept}. Start again with a lower "
            f"--lr (--overwrite)."
        )
    metadata = {
        "step": state.step,
        "run": state.run,
        "stoppers": state.stoppers,
        "extra": state.extra,
        "parameters": names,
        "optimizer": optimizer_meta,
    }
    return write_tensors(path, tensors, CHECKPOINT_KIND, metadata, overwrite=True)


def load_checkpoint(
    path: Path,
    parameters: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    run: Mapping[str, Any],
) -> TrainingState:
    """Copy a checkpoint into ``parameters`` and ``optimizer``; refuse one from a different run."""
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {path}; start without --resume (or check --output_dir).")
    tensors, metadata = read_tensors(path, CHECKPOINT_KIND)
    saved_run = metadata["run"]
    changed = {key: (saved_run.get(key), value) for key, value in run.items() if saved_run.get(key) != value}
    if changed:
        raise CheckpointError(
            f"Checkpoint {path} belongs to a run with other settings (saved vs now: {changed}); resume with the "
            f"saved settings, or pass --overwrite to start this run from scratch."
        )
    names = list(parameters)
    if metadata["parameters"] != names:
        raise CheckpointError(
            f"Checkpoint {path} holds other trained tensors ({len(metadata['parameters'])} vs {len(names)} now); "
            f"it was written by a different trainer or model. Pass --overwrite to start from scratch."
        )
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(tensors[PARAM_PREFIX + name].to(parameter.device, parameter.dtype))
    optimizer_meta = metadata["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for index, name in enumerate(names):
        entry = dict(optimizer_meta["scalar_state"].get(name, {}))
        prefix = f"{OPTIMIZER_PREFIX}{name}."
        entry.update({key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)})
        if entry:
            state[index] = entry
    optimizer.load_state_dict({"state": state, "param_groups": optimizer_meta["param_groups"]})
    return TrainingState(metadata["step"], saved_run, metadata["stoppers"], metadata.get("extra", {}))
