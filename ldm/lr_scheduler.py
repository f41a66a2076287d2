"""Learning-rate multipliers referenced by CompVis configs (`scheduler_config` in v1-*.yaml).

`DDPM.configure_optimizers` wraps `schedule(step)` in `torch.optim.lr_scheduler.LambdaLR`, so
each class here maps a global step to a factor of the base learning rate.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from `lr_start` to `lr_max`, then cosine decay to `lr_min` at `max_decay_steps`."""

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float,
                 max_decay_steps: int, verbosity_interval: int = 0) -> None:
        if max_decay_steps <= warm_up_steps:
            raise ValueError(f"max_decay_steps ({max_decay_steps}) must exceed warm_up_steps ({warm_up_steps})")
        self.warm_up_steps = warm_up_steps
        self.lr_min, self.lr_max, self.lr_start = lr_min, lr_max, lr_start
        self.max_decay_steps = max_decay_steps

    def schedule(self, step: int) -> float:
        if step < self.warm_up_steps:
            return self.lr_start + (self.lr_max - self.lr_start) * step / self.warm_up_steps
        progress = min((step - self.warm_up_steps) / (self.max_decay_steps - self.warm_up_steps), 1.0)
        return self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1.0 + math.cos(progress * math.pi))

    __call__ = schedule


class LambdaLinearScheduler:
    """Repeating cycles, each a linear warm-up from `f_start` to `f_max` then a linear ramp to `f_min`.

    Lists hold one value per cycle; cycle i lasts `cycle_lengths[i]` steps. SD v1 uses a single
    cycle with 10,000 warm-up steps and f_max = f_min = 1 (constant after warm-up).
    """

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0) -> None:
        lengths = {len(warm_up_steps), len(f_min), len(f_max), len(f_start), len(cycle_lengths)}
        if len(lengths) != 1:
            raise ValueError("warm_up_steps, f_min, f_max, f_start and cycle_lengths need one entry per cycle")
        self.warm_up_steps = list(warm_up_steps)
        self.f_min, self.f_max, self.f_start = list(f_min), list(f_max), list(f_start)
        self.cycle_lengths = list(cycle_lengths)
        self.cycle_ends = [sum(self.cycle_lengths[: i + 1]) for i in range(len(self.cycle_lengths))]

    def schedule(self, step: int) -> float:
        cycle = min(bisect.bisect_right(self.cycle_ends, step), len(self.cycle_lengths) - 1)
        local = step - (self.cycle_ends[cycle] - self.cycle_lengths[cycle])
        warm_up = self.warm_up_steps[cycle]
        if local < warm_up:
            return self.f_start[cycle] + (self.f_max[cycle] - self.f_start[cycle]) * local / warm_up
        remaining = (self.cycle_lengths[cycle] - local) / self.cycle_lengths[cycle]
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * remaining

    __call__ = schedule
