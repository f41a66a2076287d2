"""Weight differences of the baselines (CiE on all attn2 weights, ESD) and files of either kind.

A baseline is stored, as the paper merges baselines, as ``trained - original`` for every
state-dict tensor that training changed; applying it adds it to a model (``sign=-1`` takes
it away again, exact up to float rounding; ``DifferenceMerge`` keeps the original tensors, so a
set of differences can be switched on and off any number of times and the model restored bit for
bit). Keys are the model's state-dict keys, i.e. the
CompVis checkpoint keys (``model.diffusion_model....attn2.to_q.weight``).

``erasure.edits`` applies and removes files of either kind, so scripts can
``--apply`` increments and weight differences alike.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from erasure.errors import WeightDifferenceError
from erasure.files import read_tensors, versions, write_tensors
from erasure.loading import model_fingerprint
from ldm.modules.incremental_linear import incremental_linears

WEIGHT_DIFFERENCE_KIND = "weight_difference"
DELTA_PREFIX = "delta."


@dataclass
class WeightDifference:
    """``deltas`` {state-dict key: trained - original} of one baseline run for one concept."""

    method: str
    concept: str
    deltas: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    def describe(self) -> str:
        return f"Weight difference {self.method}/{self.concept!r}" + (f" ({self.source})" if self.source else "")

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """One safetensors file: ``delta.<key>`` per changed tensor, JSON metadata in the header."""
        if not self.method or not self.concept:
            raise WeightDifferenceError(
                f"Set the weight difference's method and concept before saving (got {self.method!r}, {self.concept!r})."
            )
        _check_finite(self.deltas, self.describe())
        header = {
            "method": self.method,
            "concept": self.concept,
            "keys": list(self.deltas),
            "metadata": {**self.metadata, "versions": self.metadata.get("versions", versions())},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        tensors = {DELTA_PREFIX + key: delta for key, delta in self.deltas.items()}
        return write_tensors(path, tensors, WEIGHT_DIFFERENCE_KIND, header, overwrite)

    @classmethod
    def load(cls, path: str | Path) -> WeightDifference:
        """A weight-difference file written by ``save`` (``read_tensors`` refuses non-finite tensors)."""
        path = Path(path)
        tensors, header = read_tensors(path, WEIGHT_DIFFERENCE_KIND)
        try:
            deltas = {key: tensors[DELTA_PREFIX + key] for key in header["keys"]}
            difference = cls(header["method"], header["concept"], deltas, dict(header["metadata"]), path)
        except KeyError as error:
            raise WeightDifferenceError(
                f"{path}: weight-difference file lacks {error}; the file is corrupted, re-save it."
            ) from error
        return difference


def _check_finite(deltas: Mapping[str, torch.Tensor], what: str) -> None:
    bad = [key for key, delta in deltas.items() if not torch.isfinite(delta).all()]
    if bad:
        raise WeightDifferenceError(
            f"{what} has NaN/inf in {bad[0]}; training diverged. Train again with a lower lr (a resumable run keeps "
            f"its last good checkpoint)."
        )


def weight_difference(
    original: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    method: str = "",
    concept: str = "",
    metadata: Mapping[str, Any] | None = None,
) -> WeightDifference:
    """``trained - original`` (float32, CPU) for every key whose tensor changed.

    Both mappings must have the same keys and shapes (pass the same subset of the state dict,
    e.g. only the trained attn2 weights). ``method`` and ``concept`` may be set later, but
    before saving. Record ``base_model_fingerprint`` in ``metadata`` to have it checked on apply.
    """
    if set(original) != set(trained):
        differing = sorted(set(original) ^ set(trained))
        raise ValueError(
            f"original and trained have different keys, e.g. {differing[:3]}; pass the same state-dict subset."
        )
    deltas = {}
    for key, before in original.items():
        after = trained[key]
        if before.shape != after.shape:
            raise ValueError(
                f"{key}: original {tuple(before.shape)} vs trained {tuple(after.shape)}; not the same model."
            )
        if torch.equal(before.detach().cpu(), after.detach().cpu()):
            continue
        if not before.is_floating_point():
            raise ValueError(f"{key}: a non-floating tensor changed in training; only weights may differ.")
        deltas[key] = after.detach().to("cpu", torch.float32) - before.detach().to("cpu", torch.float32)
    if not deltas:
        raise ValueError("trained equals original: no weight changed, so there is no difference to store.")
    _check_finite(deltas, f"The weight difference of {method or 'a run'}/{concept!r}")
    return WeightDifference(method, concept, deltas, dict(metadata or {}))


def check_base_model(difference: WeightDifference, fingerprint: str) -> None:
    """Refuse a difference whose recorded ``base_model_fingerprint`` is not ``fingerprint``."""
    recorded = difference.metadata.get("base_model_fingerprint")
    if recorded is not None and recorded != fingerprint:
        raise WeightDifferenceError(
            f"{difference.describe()} was trained on base model {recorded}, but this model is {fingerprint}; load "
            f"the model it was trained on, or retrain it on this one."
        )


def check_fits(model: nn.Module, difference: WeightDifference) -> None:
    """Refuse a difference with keys or shapes the model lacks, or a model with merged increments."""
    merged = [name for name, layer in incremental_linears(model).items() if layer.merged]
    if merged:
        raise WeightDifferenceError(
            f"Cannot add weight differences to merged layers ({merged[0]}...); call unmerge(model) first."
        )
    state = model.state_dict(keep_vars=True)
    unknown = [key for key in difference.deltas if key not in state]
    if unknown:
        raise WeightDifferenceError(
            f"{difference.describe()} has keys this model lacks, e.g. {unknown[:3]}; it was made for another model."
        )
    for key, delta in difference.deltas.items():
        if state[key].shape != delta.shape:
            raise WeightDifferenceError(
                f"{difference.describe()}: {key} is {tuple(delta.shape)} but the model's is {tuple(state[key].shape)}."
            )


def apply_weight_difference(
    model: nn.Module, difference: WeightDifference, sign: float = 1.0, check_fingerprint: bool = True
) -> None:
    """Add ``sign * deltas`` to the model's tensors in place (``sign=-1`` removes a difference).

    With ``check_fingerprint`` a recorded ``base_model_fingerprint`` must match the model; turn
    it off only when the model already carries other differences (``erasure.edits.apply`` checks first).
    """
    check_fits(model, difference)
    if check_fingerprint:
        check_base_model(difference, model_fingerprint(model))
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, delta in difference.deltas.items():
            target = state[key]
            target.add_(delta.to(device=target.device, dtype=target.dtype), alpha=sign)


class DifferenceMerge:
    """Merge any subset of ``differences`` into a model as ``original + sum`` (in the given order),
    from copies of the original tensors they touch.

    Adding and subtracting float32 differences in place leaves rounding residue: after a scene's
    erase / restore steps the model would no longer be the base model (its fingerprint changes,
    and later steps would carry the residue). Every merge here starts from the kept originals, so
    a subset's weights do not depend on the order of earlier steps and ``restore()`` is exact.
    """

    def __init__(self, model: nn.Module, differences: Sequence[WeightDifference]) -> None:
        state = model.state_dict(keep_vars=True)
        for difference in differences:
            check_fits(model, difference)
        keys = sorted({key for difference in differences for key in difference.deltas})
        self.targets = {key: state[key] for key in keys}
        self.originals = {key: state[key].detach().clone() for key in keys}
        self.differences = list(differences)

    def merge(self, active: Sequence[WeightDifference]) -> None:
        """Set every touched tensor to its original plus the deltas of ``active`` (others off)."""
        chosen = {id(difference) for difference in active}
        unknown = [d.describe() for d in active if all(d is not known for known in self.differences)]
        if unknown:
            raise WeightDifferenceError(f"{unknown} are not part of this merge; build it with every difference.")
        with torch.no_grad():
            for key, target in self.targets.items():
                value = self.originals[key].clone()
                for difference in self.differences:
                    if id(difference) in chosen and key in difference.deltas:
                        value.add_(difference.deltas[key].to(device=value.device, dtype=value.dtype))
                target.copy_(value)

    def restore(self) -> None:
        """The original tensors, bit for bit."""
        self.merge([])
