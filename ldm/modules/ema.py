"""Exponential moving average of a model's trainable parameters (CompVis ``LitEma`` interface).

The shadow copies are buffers named after the parameters with the dots removed
(``diffusion_model.input_blocks.0.0.weight`` -> ``diffusion_modelinput_blocks00weight``), next
to ``decay`` and ``num_updates``: the ``model_ema.*`` keys of the released SD checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)


class LitEma(nn.Module):
    """EMA of the parameters of ``model`` that require grad at construction time.

    With ``use_num_upates`` (CompVis's spelling, kept for drop-in configs and callers) the
    effective decay warms up as ``min(decay, (1 + n) / (10 + n))`` over the first updates.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"Decay must be between 0 and 1, got {decay}.")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            shadow_name = name.replace(".", "")
            if shadow_name in self._buffers:
                clash = next(k for k, v in self.m_name2s_name.items() if v == shadow_name)
                raise ValueError(
                    f"Parameters '{clash}' and '{name}' both map to EMA buffer '{shadow_name}'; rename one."
                )
            self.m_name2s_name[name] = shadow_name
            self.register_buffer(shadow_name, param.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """Move every shadow towards the current parameter value of ``model``."""
        decay = float(self.decay)
        if int(self.num_updates) >= 0:
            self.num_updates += 1
            updates = int(self.num_updates)
            decay = min(decay, (1 + updates) / (10 + updates))
        for name, param in self._tracked(model):
            shadow = self._buffers[self.m_name2s_name[name]]
            shadow.lerp_(param.detach().to(shadow.dtype), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the tracked parameters of ``model`` with their averages."""
        for name, param in self._tracked(model):
            param.copy_(self._buffers[self.m_name2s_name[name]])

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Keep a copy of ``parameters`` to bring back with :meth:`restore`."""
        self.collected_params = [param.detach().clone() for param in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Copy the values saved by :meth:`store` back into ``parameters`` (same order)."""
        parameters = list(parameters)
        if len(parameters) != len(self.collected_params):
            raise RuntimeError(
                f"restore() got {len(parameters)} parameters but store() saved {len(self.collected_params)}; "
                "call store() with the same parameters first."
            )
        for stored, param in zip(self.collected_params, parameters):
            param.copy_(stored)
        self.collected_params = []

    def _tracked(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The parameters of ``model`` that require grad; each must have a shadow."""
        tracked = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        unknown = [name for name, _ in tracked if name not in self.m_name2s_name]
        if unknown:
            raise KeyError(
                f"Parameters {unknown[:3]} require grad but have no EMA shadow (added or unfrozen after the "
                "EMA was created); freeze them or build a new LitEma."
            )
        return tracked


@contextlib.contextmanager
def ema_weights(ema: LitEma | None, model: nn.Module, context: str | None = None) -> Iterator[None]:
    """Run the body with ``ema``'s weights copied into ``model`` (nothing when ``ema`` is None),
    restoring the trained weights after; ``context`` names the switch in the log."""
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model)
        if context is not None:
            logger.info("%s: switched to EMA weights", context)
    try:
        yield None
    finally:
        if ema is not None:
            ema.restore(model.parameters())
            if context is not None:
                logger.info("%s: restored training weights", context)
