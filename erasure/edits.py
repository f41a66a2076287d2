"""Applying and removing edits: SepCE increments and CiE / ESD weight differences, either kind.

``apply(model, edits)`` checks every edit against the model before changing anything, then
attaches the increments (separable: each one leaves the others' protected prompts unchanged)
and adds the weight differences. ``remove(model, edits)`` takes them off again: an increment is
detached (the exact original weights remain), a weight difference is subtracted (exact up to
float rounding; the handle ``apply`` returns restores the original tensors bit for bit). Restoring an erased concept (METHOD.md §4) is ``remove`` of its edit.

``apply`` returns an ``AppliedEdits`` handle, which is also a context manager:

    with erasure.apply(model, edits):
        images = erasure.generate(model, prompts, seeds)   # edited model
    # the edits are removed here
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from torch import nn

from erasure.files import read_kind
from erasure.increments import INCREMENT_KIND, Increment, IncrementError, compose, detach
from erasure.loading import model_fingerprint
from erasure.weight_differences import (
    WEIGHT_DIFFERENCE_KIND,
    DifferenceMerge,
    WeightDifference,
    apply_weight_difference,
    check_base_model,
    check_fits,
)

Edit = Increment | WeightDifference


def load_edit(path: str | Path) -> Edit:
    """An increment or a weight-difference file, by the ``kind`` in its header."""
    kind = read_kind(path)
    if kind == INCREMENT_KIND:
        return Increment.load(path)
    if kind == WEIGHT_DIFFERENCE_KIND:
        return WeightDifference.load(path)
    raise IncrementError(f"{path} holds a {kind}; pass an increment or a weight-difference file.")


def _as_list(edits: Edit | Sequence[Edit]) -> list[Edit]:
    items = [edits] if isinstance(edits, Increment | WeightDifference) else list(edits)
    others = [type(item).__name__ for item in items if not isinstance(item, Increment | WeightDifference)]
    if others or not items:
        raise TypeError(f"edits must be increments and weight differences (at least one), got {others or 'nothing'}.")
    return items


class AppliedEdits:
    """Edits applied to a model; ``remove()`` (or leaving a ``with`` block) takes them off."""

    def __init__(self, model: nn.Module, edits: list[Edit], merge: DifferenceMerge | None = None) -> None:
        self.model = model
        self.edits = edits
        self.merge = merge
        self.removed = False

    @property
    def increments(self) -> list[str]:
        """Names of the applied increments."""
        return [edit.name for edit in self.edits if isinstance(edit, Increment)]

    @property
    def weight_differences(self) -> list[str]:
        """``method/concept`` of the applied weight differences."""
        return [f"{edit.method}/{edit.concept}" for edit in self.edits if isinstance(edit, WeightDifference)]

    def remove(self) -> None:
        """Detach the increments and put back the original tensors the weight differences changed."""
        if self.removed:
            return
        increments = [edit for edit in self.edits if isinstance(edit, Increment)]
        if increments:
            remove(self.model, increments)
        if self.merge is not None:
            self.merge.restore()
        self.removed = True

    def __enter__(self) -> AppliedEdits:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.remove()


def apply(model: nn.Module, edits: Edit | Sequence[Edit]) -> AppliedEdits:
    """Attach the increments and add the weight differences; all are checked before anything changes."""
    items = _as_list(edits)
    increments = [item for item in items if isinstance(item, Increment)]
    differences = [item for item in items if isinstance(item, WeightDifference)]
    if differences:
        fingerprint = model_fingerprint(model)
        for difference in differences:
            check_base_model(difference, fingerprint)
            check_fits(model, difference)
    merge = DifferenceMerge(model, differences) if differences else None
    if increments:
        compose(model, increments)
    if merge is not None:
        merge.merge(differences)
    return AppliedEdits(model, items, merge)


def remove(model: nn.Module, edits: Edit | Sequence[Edit]) -> None:
    """Take ``edits`` off the model: detach the increments, subtract the weight differences."""
    items = _as_list(edits)
    increments = [item.name for item in items if isinstance(item, Increment)]
    if increments:
        detach(model, increments)
    for item in items:
        if isinstance(item, WeightDifference):
            apply_weight_difference(model, item, sign=-1.0, check_fingerprint=False)
