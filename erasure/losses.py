"""The CiE objective and its stopping rule (METHOD.md §1), shared by the CiE and SepCE trainers.

    r_c(W)  = eps(z_t, c; W) - eps(z_t, ""; W)                    concept representation
    L_dir   = mean( r_c(W0 + dW) * r_c(W0) )                       de-correlation, driven to <= 0
    L       = L_dir + lambda * sum_m ||dW_m||_1 / M                M trained tensors
    m      <- alpha * m + (1 - alpha) * L_dir                      stop when m <= tau after warm-up

Joint SepCE weighs concept i by ``eta_i = ||P_max|| / ||P_i||`` (P_i = r_c(W0+dW) * r_c(W0)
of concept i), so concepts whose product is small are not drowned by the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


def concept_representation(eps_concept: torch.Tensor, eps_blank: torch.Tensor) -> torch.Tensor:
    """``r_c = eps(z_t, c) - eps(z_t, "")`` (both predictions for the same z_t and t)."""
    if eps_concept.shape != eps_blank.shape:
        raise ValueError(
            f"Concept and blank predictions differ in shape ({tuple(eps_concept.shape)} vs "
            f"{tuple(eps_blank.shape)}); predict both for the same latents."
        )
    return eps_concept - eps_blank


def direction_product(r_trained: torch.Tensor, r_frozen: torch.Tensor) -> torch.Tensor:
    """Element-wise ``r_c(W0 + dW) * r_c(W0)``; the frozen side is detached (it has no gradient)."""
    if r_trained.shape != r_frozen.shape:
        raise ValueError(
            f"Trained and frozen representations differ in shape ({tuple(r_trained.shape)} vs "
            f"{tuple(r_frozen.shape)}); compute both for the same latents, timesteps and prompts."
        )
    return r_trained * r_frozen.detach()


def direction_loss(r_trained: torch.Tensor, r_frozen: torch.Tensor) -> torch.Tensor:
    """``L_dir = mean(r_c(W0 + dW) * r_c(W0))``: positive while the edited model still points the
    way the original does for concept c; minimising it de-correlates the two."""
    return direction_product(r_trained, r_frozen).mean()


def l1_regulariser(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_m ||t_m||_1 / M`` over the M trained tensors (weight changes or increments)."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("l1_regulariser needs at least one tensor (M >= 1).")
    return torch.stack([tensor.abs().sum() for tensor in tensors]).sum() / len(tensors)


def joint_weights(products: Sequence[torch.Tensor]) -> torch.Tensor:
    """``eta_i = ||P_max|| / ||P_i||`` (detached, float32 [N]) for the products P_i of N concepts."""
    products = list(products)
    if not products:
        raise ValueError("joint_weights needs the product tensor of at least one concept.")
    norms = torch.stack([product.detach().float().norm() for product in products])
    if not torch.isfinite(norms).all() or (norms == 0).any():
        bad = [index for index, norm in enumerate(norms.tolist()) if not math.isfinite(norm) or norm == 0]
        raise ValueError(
            f"Product tensors {bad} have zero or non-finite norm, so eta = ||P_max|| / ||P_i|| is undefined; "
            f"the concept's prediction equals the blank one or training diverged."
        )
    return norms.max() / norms


def representation_energy(r_frozen: torch.Tensor) -> torch.Tensor:
    """``mean(r_c(W0)^2)``: the value L_dir has at dW = 0, the scale of the relative stop (METHOD.md §1)."""
    return r_frozen.detach().float().pow(2).mean()


class MomentumStopper:
    """Momentum of ``L_dir`` and the CiE stopping rule for one concept.

    ``m`` starts at the first ``L_dir`` and then follows ``m <- alpha m + (1 - alpha) L_dir``.
    ``update`` returns True when training of this concept should stop: ``m <= threshold`` once
    more than ``warmup`` steps have run (``stop_reason = "converged"``), or ``max_steps`` steps
    (``"max_steps"``). After it has stopped, further updates are refused.

    The threshold is ``tau`` (``relative=False``: METHOD.md §1's absolute rule) or ``tau`` times
    the momentum of the concept's representation energy ``mean(r_c(W0)^2)`` (``relative=True``):
    L_dir's scale differs by concept (a toy artist starts near 0.36, a toy object near 0.02, an
    object with a colour near 0.002), so an absolute tau stops an object while most of its
    correlation is left.
    """

    def __init__(
        self, alpha: float = 0.9, tau: float = 1e-4, warmup: int = 10, max_steps: int = 1000, relative: bool = False
    ) -> None:
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}.")
        if not math.isfinite(tau):
            raise ValueError(f"tau must be a finite number, got {tau}.")
        if warmup < 0 or max_steps < 1:
            raise ValueError(f"warmup must be >= 0 and max_steps >= 1, got warmup={warmup}, max_steps={max_steps}.")
        self.alpha = float(alpha)
        self.tau = float(tau)
        self.warmup = int(warmup)
        self.max_steps = int(max_steps)
        self.relative = bool(relative)
        self.momentum: float | None = None
        self.energy: float | None = None
        self.steps = 0
        self.stop_reason: str | None = None

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    @property
    def threshold(self) -> float | None:
        """What the momentum is compared with (None before the first relative update)."""
        if not self.relative:
            return self.tau
        return None if self.energy is None else self.tau * self.energy

    def _follow(self, current: float | None, value: float) -> float:
        return value if current is None else self.alpha * current + (1 - self.alpha) * value

    def update(self, l_dir: float, energy: float | None = None) -> bool:
        """Record one step's ``L_dir`` (and, for the relative rule, the step's ``mean(r_c(W0)^2)``);
        True when this concept should stop now."""
        if self.stopped:
            raise RuntimeError(f"This stopper already stopped ({self.stop_reason}) after {self.steps} steps.")
        value = float(l_dir)
        if not math.isfinite(value):
            raise FloatingPointError(
                f"L_dir is {value} at step {self.steps + 1}; training diverged (lower the learning rate and resume "
                f"from the last good checkpoint)."
            )
        if self.relative:
            if energy is None or not math.isfinite(energy) or energy < 0:
                raise ValueError(f"The relative stop needs the step's representation energy (finite, >= 0), got {energy}.")
            self.energy = self._follow(self.energy, float(energy))
        self.steps += 1
        self.momentum = self._follow(self.momentum, value)
        if self.steps > self.warmup and self.momentum <= self.threshold:
            self.stop_reason = "converged"
        elif self.steps >= self.max_steps:
            self.stop_reason = "max_steps"
        return self.stopped

    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "tau": self.tau,
            "warmup": self.warmup,
            "max_steps": self.max_steps,
            "relative": self.relative,
            "momentum": self.momentum,
            "energy": self.energy,
            "steps": self.steps,
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``; the hyper-parameters must be the ones this stopper was built with."""
        settings = {"alpha": self.alpha, "tau": self.tau, "warmup": self.warmup, "max_steps": self.max_steps,
                    "relative": self.relative}
        saved = {"relative": False, **state}  # checkpoints written before the relative rule used the absolute one
        changed = {key: (saved.get(key), value) for key, value in settings.items() if saved.get(key) != value}
        if changed:
            raise ValueError(
                f"Cannot resume a stopper with other settings (saved vs now: {changed}); resume with the saved "
                f"settings or start a new run."
            )
        self.momentum = None if state["momentum"] is None else float(state["momentum"])
        self.energy = None if saved.get("energy") is None else float(saved["energy"])
        self.steps = int(state["steps"])
        self.stop_reason = state["stop_reason"]
