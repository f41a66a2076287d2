"""Trainers that change ordinary UNet weights (CiE, ESD) in the one model copy.

The frozen predictions need the original weights. Instead of a second UNet, the trainer keeps
one copy of the ORIGINAL values of only the trained tensors and swaps them in for the no-grad
frozen calls (``original_weights``): the parameters' storage is exchanged, nothing is copied,
and the trained values come back bit-exactly. The result is a weight difference
(``erasure.weight_differences``) keyed by state-dict names, which composes by addition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning_fabric import Fabric
from torch import nn

from erasure.loading import model_fingerprint
from erasure.settings import TrainingSettings
from erasure.trainers.loop import ConceptTrainer
from erasure.trainers.runtime import TrainingSetupError
from erasure.weight_differences import WeightDifference, weight_difference

UNET_PREFIX = "model.diffusion_model."
CROSS_ATTENTION = ".attn2."
INCREMENT_MARK = ".increments."


def unet_parameters(model: nn.Module, select: Callable[[str], bool]) -> dict[str, nn.Parameter]:
    """UNet parameters (by state-dict name) whose name INSIDE the UNet (without ``UNET_PREFIX``,
    e.g. ``out.2.weight``) passes ``select``; increments never."""
    chosen = {
        name: parameter
        for name, parameter in model.named_parameters()
        if name.startswith(UNET_PREFIX) and INCREMENT_MARK not in name and select(name[len(UNET_PREFIX):])
    }
    if not chosen:
        raise TrainingSetupError("No UNet parameters match the trained set; is this a cross-attention LatentDiffusion?")
    return chosen


def is_cross_attention(unet_name: str) -> bool:
    """ESD-x's rule (``xattn``): the parameter belongs to a cross-attention block (attn2)."""
    return CROSS_ATTENTION in f".{unet_name}"


def is_esd_u_parameter(unet_name: str) -> bool:
    """ESD-u's rule (ESD's ``noxattn``, METHOD.md §5): every UNet parameter except attn2, the
    timestep embedding (any name containing ``time_embed``) and the output head (``out.*``), which
    ESD leaves frozen. On SD v1.4 this is 813,495,680 of the UNet's 859,520,964 parameters."""
    return not (is_cross_attention(unet_name) or "time_embed" in unet_name or unet_name.startswith("out."))


def cross_attention_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every attn2 weight and bias: to_q, to_k, to_v, to_out (CiE, ESD-x)."""
    return unet_parameters(model, is_cross_attention)


def esd_u_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters ESD-u trains (``is_esd_u_parameter``)."""
    return unet_parameters(model, is_esd_u_parameter)


class WeightTrainer(ConceptTrainer):
    """A ConceptTrainer whose trained tensors are UNet parameters; one concept per run."""

    def __init__(
        self,
        model: nn.Module,
        fabric: Fabric,
        concept: str,
        parameters: dict[str, nn.Parameter],
        settings: TrainingSettings,
    ) -> None:
        if not isinstance(concept, str):
            raise TrainingSetupError(f"{self.method} erases one concept per run; got {concept!r}.")
        self.base_fingerprint = model_fingerprint(model)
        super().__init__(model, fabric, [concept], settings)
        self.concept = concept
        self.parameters = parameters
        for parameter in parameters.values():
            parameter.requires_grad_(True)
        self.originals = {name: parameter.detach().clone() for name, parameter in parameters.items()}

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        return self.parameters

    @contextmanager
    def original_weights(self) -> Iterator[None]:
        """Swap the original values of the trained tensors in (for no-grad frozen calls only)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for name, parameter in self.parameters.items():
            parameter.data, self.originals[name] = self.originals[name], parameter.data

    @torch.no_grad()
    def put_back_originals(self) -> None:
        """Leave the model as it was before training: original values, no gradients."""
        for name, parameter in self.parameters.items():
            parameter.copy_(self.originals[name])
            parameter.requires_grad_(False)
            parameter.grad = None

    def weight_changes(self) -> list[torch.Tensor]:
        """``W - W0`` per trained tensor (with grad), for the L1 regulariser."""
        return [parameter - self.originals[name] for name, parameter in self.parameters.items()]

    def difference(self) -> WeightDifference:
        """``trained - original`` of every changed tensor, recording this run."""
        record = {**self.metadata(), "base_model_fingerprint": self.base_fingerprint}
        return weight_difference(
            self.originals,
            {name: parameter.detach() for name, parameter in self.parameters.items()},
            self.method,
            self.concept,
            record,
        )

    def base_settings(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "concept": self.concept,
            "trained_tensors": len(self.parameters),
            "base_model_fingerprint": self.base_fingerprint,
        }
