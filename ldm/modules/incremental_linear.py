"""A linear layer that carries named, switchable additive weight increments.

Each increment is ``dW = coeff @ (beta * basis)`` with a fixed ``basis`` [r, in_features]
(rows spanning the directions the increment may act on), a scalar ``beta`` and a trainable
``coeff`` [out_features, r]. Increments can be switched on and off, merged into the weight
for plain-speed inference and un-merged bit-exactly. The layer knows nothing about what the
increments mean; with no increments it is an ``nn.Linear`` (same keys, same outputs).

State dict
    Unmerged, the layer saves ``weight`` (the original), ``bias`` and per increment
    ``increments.<name>.coeff``, ``.basis``, ``.beta`` (float64 scalar) and ``.active`` (bool
    scalar); loading such a state dict into a fresh layer recreates the increments.
    Merged, the layer saves itself as the plain linear layer it currently is: the merged
    ``weight`` and no increments, so exporters get baked weights (unmerge() before saving to
    keep the increments).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_INCREMENTS = "increments"


class LinearIncrement(nn.Module):
    """One increment ``coeff @ (beta * basis)``; ``beta`` and ``active`` are Python values."""

    def __init__(self, basis: torch.Tensor, beta: float, coeff: torch.Tensor) -> None:
        super().__init__()
        self.coeff = nn.Parameter(coeff)
        self.register_buffer("basis", basis)
        self.beta = beta
        self.active = True

    def delta_weight(self) -> torch.Tensor:
        return self.coeff @ (self.beta * self.basis)

    def extra_repr(self) -> str:
        rank, in_features = self.basis.shape
        return f"rank={rank}, in_features={in_features}, beta={self.beta:g}, active={self.active}"

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "beta"] = torch.tensor(self.beta, dtype=torch.float64)
        destination[prefix + "active"] = torch.tensor(self.active)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        scalars = {"beta": None, "active": None}
        for field in scalars:
            key = prefix + field
            if key in state_dict:
                scalars[field] = state_dict[key]
            elif strict:
                missing_keys.append(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for field, value in scalars.items():
            if prefix + field in unexpected_keys:
                unexpected_keys.remove(prefix + field)
            if value is not None:
                setattr(self, field, float(value) if field == "beta" else bool(value))


class IncrementalLinear(nn.Linear):
    """``nn.Linear`` plus named increments ``dW_k = coeff_k @ (beta_k * basis_k)``.

    Forward is ``F.linear(x, weight + sum of active dW_k, bias)`` while unmerged and plain
    ``F.linear(x, weight, bias)`` when merged or when no increment is active. Inputs may have
    any leading shape. Increment tensors follow the weight's device and dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.increments = nn.ModuleDict()
        self.register_buffer("_original_weight", None, persistent=False)

    @property
    def merged(self) -> bool:
        return self._original_weight is not None

    @property
    def increment_names(self) -> list[str]:
        return list(self.increments.keys())

    @property
    def active_names(self) -> list[str]:
        return [name for name, increment in self.increments.items() if increment.active]

    def add_increment(
        self, name: str, basis: torch.Tensor, beta: float = 1e-4, coeff: torch.Tensor | None = None
    ) -> nn.Parameter:
        """Add an active increment and return its trainable ``coeff`` [out_features, r].

        ``basis`` [r, in_features] is stored detached and without a copy when its dtype and
        device already match the weight, so one basis tensor can serve many layers; treat it
        as read-only. ``coeff`` defaults to zeros (the increment starts as a no-op).
        """
        self._require_unmerged("add an increment")
        self._check_new_name(name)
        if not isinstance(basis, torch.Tensor) or basis.ndim != 2 or basis.shape[0] < 1:
            raise ValueError(
                f"basis must be a 2-D tensor [r >= 1, in_features={self.in_features}], got "
                f"{tuple(basis.shape) if isinstance(basis, torch.Tensor) else type(basis).__name__}."
            )
        if basis.shape[1] != self.in_features:
            raise ValueError(
                f"basis has {basis.shape[1]} columns but this layer has in_features={self.in_features}; "
                "build the basis in the space of this layer's input."
            )
        if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"beta must be a finite positive number, got {beta!r}.")
        rank = basis.shape[0]
        like = {"device": self.weight.device, "dtype": self.weight.dtype}
        if coeff is None:
            coeff = torch.zeros(self.out_features, rank, **like)
        elif tuple(coeff.shape) != (self.out_features, rank):
            raise ValueError(
                f"coeff must have shape [out_features={self.out_features}, r={rank}], got {tuple(coeff.shape)}."
            )
        increment = LinearIncrement(basis.detach().to(**like), float(beta), coeff.detach().to(**like).clone())
        self.increments[name] = increment
        return increment.coeff

    def remove_increment(self, name: str) -> None:
        self._require_unmerged("remove an increment")
        self._check_known([name])
        del self.increments[name]

    def set_active(self, names: Iterable[str] | None) -> None:
        """Activate exactly ``names`` (None activates every increment)."""
        self._require_unmerged("change the active increments")
        wanted = set(self.increment_names if names is None else self._check_known(names))
        for name, increment in self.increments.items():
            increment.active = name in wanted

    def delta_weight(self, names: Iterable[str] | None = None) -> torch.Tensor:
        """Sum of the increments ``names`` (None: the active ones) as an [out, in] matrix."""
        selected = self.active_names if names is None else self._check_known(names)
        delta = torch.zeros_like(self.weight)
        for name in selected:
            delta = delta + self.increments[name].delta_weight()
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not any(increment.active for increment in self.increments.values()):
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight + self.delta_weight(), self.bias)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active increments into ``weight``, keeping an exact copy of the original."""
        if self.merged:
            raise RuntimeError("IncrementalLinear is already merged; call unmerge() before merging again.")
        self._original_weight = self.weight.detach().clone()
        self.weight.add_(self.delta_weight())

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back the exact pre-merge weight (a copy, not a subtraction); the increments stay.

        Named ``unmerge`` rather than ``restore``: in the project "restore" means bringing an
        erased concept back (removing its increment), which this does not do.
        """
        if not self.merged:
            raise RuntimeError("IncrementalLinear is not merged; there is nothing to unmerge.")
        self.weight.copy_(self._original_weight)
        self._original_weight = None

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        destination = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self.merged:
            for key in [k for k in destination if k.startswith(prefix + _INCREMENTS + ".")]:
                del destination[key]
        return destination

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Recreate the increments named in ``state_dict`` before their tensors are loaded."""
        if self.merged:
            raise RuntimeError(f"Cannot load a state dict into the merged layer '{prefix}'; call unmerge() first.")
        head = prefix + _INCREMENTS + "."
        for key, coeff in state_dict.items():
            if not (key.startswith(head) and key.endswith(".coeff")):
                continue
            name = key[len(head) : -len(".coeff")]
            basis = state_dict.get(head + name + ".basis")
            if name in self.increments or basis is None or "." in name:
                continue
            self.add_increment(
                name,
                torch.empty(basis.shape, device=self.weight.device, dtype=self.weight.dtype),
                coeff=torch.empty(coeff.shape, device=self.weight.device, dtype=self.weight.dtype),
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(
                f"Increment name must be a non-empty string without '.', got {name!r} "
                "(it becomes a state-dict key)."
            )
        if name in self.increments:
            raise ValueError(f"An increment named {name!r} already exists; remove_increment() it first.")
        if hasattr(self.increments, name):
            raise ValueError(f"Increment name {name!r} clashes with an nn.ModuleDict attribute; choose another name.")

    def _check_known(self, names: Iterable[str]) -> list[str]:
        if isinstance(names, str):
            raise TypeError(f"Expected an iterable of increment names, got the string {names!r}; wrap it in a list.")
        names = list(names)
        unknown = [name for name in names if name not in self.increments]
        if unknown:
            raise KeyError(f"Unknown increment(s) {unknown}; this layer has {self.increment_names}.")
        return names

    def _require_unmerged(self, action: str) -> None:
        if self.merged:
            raise RuntimeError(f"Cannot {action} while the increments are merged; call unmerge() first.")


def incremental_linears(model: nn.Module) -> dict[str, IncrementalLinear]:
    """Every ``IncrementalLinear`` in ``model``, keyed by qualified module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, IncrementalLinear)}


@contextmanager
def increments_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Switch off every increment in ``model`` inside the block; the previous state returns after.

    Do not let a backward pass through gradient-checkpointed blocks cross the boundary of
    this block: recomputation would see a different active set than the forward.
    """
    layers = incremental_linears(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"Cannot disable merged increments (layers {merged[:3]}...); call unmerge() first.")
    previous = {name: layer.active_names for name, layer in layers.items()}
    for layer in layers.values():
        layer.set_active([])
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.set_active(previous[name])
