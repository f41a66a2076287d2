"""Learning-rate multipliers referenced by CompVis configs (`scheduler_config` in v1-*.yaml).

`DDPM.configure_optimizers` wraps `schedule(n)` in `torch.optim.lr_scheduler.LambdaLR`, so
each class here maps a global step `n` to a factor of the base learning rate.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any


def _cosine_decay(low: float, high: float, progress: float) -> float:
    """`high` at progress 0, `low` at progress >= 1, half a cosine period in between."""
    return low + 0.5 * (high - low) * (1.0 + math.cos(min(progress, 1.0) * math.pi))


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from `lr_start` to `lr_max`, then cosine decay to `lr_min` at `max_decay_steps`."""

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float,
                 max_decay_steps: int, verbosity_interval: int = 0) -> None:
        if max_decay_steps <= warm_up_steps:
            raise ValueError(f"max_decay_steps ({max_decay_steps}) must exceed warm_up_steps ({warm_up_steps})")
        self.lr_warm_up_steps = warm_up_steps
        self.lr_min, self.lr_max, self.lr_start = lr_min, lr_max, lr_start
        self.lr_max_decay_steps = max_decay_steps
        self.verbosity_interval = verbosity_interval
        self.last_lr = 0.0

    def schedule(self, n: int, **kwargs: Any) -> float:
        if n < self.lr_warm_up_steps:
            lr = self.lr_start + (self.lr_max - self.lr_start) * n / self.lr_warm_up_steps
        else:
            progress = (n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps)
            lr = _cosine_decay(self.lr_min, self.lr_max, progress)
        self.last_lr = lr
        return lr

    def __call__(self, n: int, **kwargs: Any) -> float:
        return self.schedule(n, **kwargs)


class LambdaWarmUpCosineScheduler2:
    """Repeating cycles, each a linear warm-up from `f_start` to `f_max` then a cosine decay to
    `f_min` at the cycle's end. Lists hold one value per cycle; cycle i lasts `cycle_lengths[i]`
    steps. Use with a base learning rate of 1 (the factor is the learning rate)."""

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0) -> None:
        lengths = {len(warm_up_steps), len(f_min), len(f_max), len(f_start), len(cycle_lengths)}
        if len(lengths) != 1:
            raise ValueError("warm_up_steps, f_min, f_max, f_start and cycle_lengths need one entry per cycle")
        self.lr_warm_up_steps = list(warm_up_steps)
        self.f_min, self.f_max, self.f_start = list(f_min), list(f_max), list(f_start)
        self.cycle_lengths = list(cycle_lengths)
        self.cum_cycles = [0]
        for length in self.cycle_lengths:
            self.cum_cycles.append(self.cum_cycles[-1] + length)
        self.verbosity_interval = verbosity_interval
        self.last_f = 0.0

    def find_in_interval(self, n: int) -> int:
        """Index of the cycle holding step `n` (a cycle's last step is its length); steps past
        the last cycle stay in it."""
        return min(bisect.bisect_left(self.cum_cycles, n, lo=1) - 1, len(self.cycle_lengths) - 1)

    def _cycle_and_step(self, n: int) -> tuple[int, int]:
        cycle = self.find_in_interval(n)
        return cycle, n - self.cum_cycles[cycle]

    def _warm_up(self, cycle: int, local: int) -> float:
        return self.f_start[cycle] + (self.f_max[cycle] - self.f_start[cycle]) * local / self.lr_warm_up_steps[cycle]

    def schedule(self, n: int, **kwargs: Any) -> float:
        cycle, local = self._cycle_and_step(n)
        warm_up = self.lr_warm_up_steps[cycle]
        if local < warm_up:
            factor = self._warm_up(cycle, local)
        else:
            factor = _cosine_decay(self.f_min[cycle], self.f_max[cycle],
                                   (local - warm_up) / (self.cycle_lengths[cycle] - warm_up))
        self.last_f = factor
        return factor

    def __call__(self, n: int, **kwargs: Any) -> float:
        return self.schedule(n, **kwargs)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """Like its base, but after the warm-up the factor ramps linearly from `f_max` towards
    `f_min` over the cycle. SD v1 uses a single cycle with 10,000 warm-up steps and
    f_max = f_min = 1 (constant after warm-up)."""

    def schedule(self, n: int, **kwargs: Any) -> float:
        cycle, local = self._cycle_and_step(n)
        if local < self.lr_warm_up_steps[cycle]:
            factor = self._warm_up(cycle, local)
        else:
            remaining = (self.cycle_lengths[cycle] - local) / self.cycle_lengths[cycle]
            factor = self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * remaining
        self.last_f = factor
        return factor
