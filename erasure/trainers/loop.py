"""The training loop every trainer shares: one model copy, seeded global batches, stoppers,
checkpoints, a progress bar and a one-line JSON summary.

A trainer subclass says what it trains (``trained_parameters``), which concepts still train
(``training_concepts``) and how one step's loss is computed (``step_loss``); the loop does the
rest: ``zero_grad(set_to_none=True)``, finite-loss check, backward, gradient averaging over
ranks, optimizer step, per-concept momentum stop, checkpoint every ``save_every`` steps.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning_fabric import Fabric
from torch import nn
from tqdm import tqdm

from erasure.errors import NonFiniteLossError
from erasure.increments import slugify
from erasure.losses import MomentumStopper
from erasure.settings import TrainingSettings
from erasure.trainers.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from erasure.trainers.runtime import (
    TrainingSetupError,
    average_gradients,
    global_mean,
    local_rows,
    step_generator,
)
from ldm.models.diffusion.ddim import DDIMSampler


@dataclass
class StepLoss:
    """One step on this rank: the loss to back-propagate, each training concept's tracked value
    (L_dir for CiE/SepCE, the MSE for ESD) and, for the relative stop, its representation energy
    ``mean(r_c(W0)^2)`` (``erasure.losses.representation_energy``), as detached local means."""

    loss: torch.Tensor
    tracked: dict[str, torch.Tensor] = field(default_factory=dict)
    energy: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ConceptBatch:
    """This rank's slice of one concept's global batch."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor


def predict_eps(model: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Noise prediction of the UNet whatever its parameterization (the method is defined on eps)."""
    return DDIMSampler(model).model_eps(x, context, t)


class ConceptTrainer(ABC):
    """Base of the CiE, SepCE and ESD trainers; subclasses set ``method`` and the abstract parts."""

    method: str = ""

    def __init__(self, model: nn.Module, fabric: Fabric, concepts: list[str], settings: TrainingSettings) -> None:
        settings.validate()
        if settings.lr is None:
            raise TrainingSetupError("The trainer needs a learning rate; fill it with settings.with_lr(method, world).")
        if not concepts:
            raise TrainingSetupError("Give at least one concept to erase.")
        slugs = [slugify(concept) for concept in concepts]
        if len(set(slugs)) != len(slugs):
            raise TrainingSetupError(f"Concepts {concepts} repeat a name (as increment names {slugs}); list each once.")
        self.model = model
        self.fabric = fabric
        self.concepts = list(concepts)
        self.settings = settings
        self.rows = local_rows(settings.batch_size, fabric.global_rank, fabric.world_size)
        self.stoppers = {concept: self.make_stopper() for concept in self.concepts}
        self.step = 0
        self.saved_step: int | None = None
        self.seconds = 0.0
        model.requires_grad_(False)
        with torch.no_grad():
            prompts = ["", *self.concepts]
            encoded = model.get_learned_conditioning(prompts).detach()
        self.context = dict(zip(prompts, encoded))
        self.optimizer: torch.optim.Optimizer | None = None

    # ------------------------------------------------------------------ subclass interface
    @abstractmethod
    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """Every tensor this trainer may change, by a stable name (checkpoint keys)."""

    @abstractmethod
    def step_loss(self, generator: torch.Generator, concepts: list[str]) -> StepLoss:
        """This rank's loss for ``concepts`` with draws from ``generator`` (identical on all ranks)."""

    @abstractmethod
    def run_settings(self) -> dict[str, Any]:
        """Everything that decides the result, compared on resume and stored with the outputs."""

    def make_stopper(self) -> MomentumStopper:
        return MomentumStopper(self.settings.alpha, self.settings.stop_tau, self.settings.warmup,
                               self.settings.iterations, relative=self.settings.stop == "relative")

    def training_concepts(self) -> list[str]:
        """Concepts that train in the next step (default: every one not yet stopped)."""
        return [concept for concept in self.concepts if not self.stoppers[concept].stopped]

    def on_stop(self, concept: str) -> None:
        """Called once when ``concept`` stops (SepCE freezes its coefficients here)."""

    def total_steps_bound(self) -> int:
        return self.settings.iterations

    # ------------------------------------------------------------------ shared helpers
    def contexts(self, prompt: str, count: int) -> torch.Tensor:
        """The text encoding of ``prompt`` repeated ``count`` times: [count, L, d]."""
        return self.context[prompt].unsqueeze(0).expand(count, -1, -1)

    def draw_concept_batch(self, generator: torch.Generator, latents: torch.Tensor) -> ConceptBatch:
        """Draw a global batch (image indices, t uniform in [0, T), noise) and keep this rank's rows."""
        size = self.settings.batch_size
        indices = torch.randint(0, latents.shape[0], (size,), generator=generator)
        timesteps = torch.randint(0, self.model.num_timesteps, (size,), generator=generator)
        noise = torch.randn((size, *latents.shape[1:]), generator=generator)
        device = latents.device
        return ConceptBatch(
            latents[indices[self.rows].to(device)],
            timesteps[self.rows].to(device),
            noise[self.rows].to(device=device, dtype=latents.dtype),
        )

    # ------------------------------------------------------------------ the loop
    def _optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            parameters = list(self.trained_parameters().values())
            self.optimizer = self.fabric.setup_optimizers(torch.optim.Adam(parameters, lr=self.settings.lr))
        return self.optimizer

    def _training_state(self) -> TrainingState:
        return TrainingState(
            step=self.step,
            run=self.run_settings(),
            stoppers={concept: stopper.state_dict() for concept, stopper in self.stoppers.items()},
            extra={"seconds": self.seconds},
        )

    def save(self) -> None:
        """Write the checkpoint (rank 0) and wait for every rank."""
        if self.settings.checkpoint is None:
            return
        if self.fabric.global_rank == 0:
            save_checkpoint(self.settings.checkpoint, self.trained_parameters(), self._optimizer(), self._training_state())
        self.saved_step = self.step
        self.fabric.barrier()

    def resume(self) -> None:
        state = load_checkpoint(
            self.settings.checkpoint, self.trained_parameters(), self._optimizer(), self.run_settings()
        )
        self.step = self.saved_step = state.step
        self.seconds = float(state.extra.get("seconds", 0.0))
        for concept, stopper in self.stoppers.items():
            stopper.load_state_dict(state.stoppers[concept])
            if stopper.stopped:
                self.on_stop(concept)

    def _check_finite(self, values: torch.Tensor, names: list[str]) -> None:
        if torch.isfinite(values).all():
            return
        bad = [name for name, value in zip(names, values.tolist()) if not math.isfinite(value)]
        where = (
            f"the last good checkpoint {self.settings.checkpoint} (step {self.saved_step}) was kept; start "
            f"again with a lower --lr (--overwrite)"
            if self.saved_step is not None
            else "no checkpoint had been written yet; start again with a lower --lr"
        )
        raise NonFiniteLossError(
            f"{self.method}: the loss became non-finite at step {self.step + 1} ({', '.join(bad)}); training "
            f"stopped, {where}."
        )

    def _postfix(self, loss: float) -> dict[str, str]:
        postfix = {"loss": f"{loss:.3e}"}
        for concept, stopper in self.stoppers.items():
            momentum = "-" if stopper.momentum is None else f"{stopper.momentum:.2e}"
            postfix[f"m[{slugify(concept)}]"] = momentum
        return postfix

    def train_step(self) -> float:
        """One optimisation step of the concepts still training; returns the global mean loss.

        The step's draws come from ``step_generator(seed, step)``, so a resumed run (and a
        benchmark stepping the trainer by hand) draws exactly what the uninterrupted run draws.
        """
        concepts = self.training_concepts()
        if not concepts:
            raise TrainingSetupError(f"{self.method}: every concept has stopped; nothing is left to train.")
        optimizer = self._optimizer()
        generator = step_generator(self.settings.seed, self.step)
        optimizer.zero_grad(set_to_none=True)
        with self.fabric.autocast():
            result = self.step_loss(generator, concepts)
        relative = [c for c in concepts if self.stoppers[c].relative]
        values = global_mean(self.fabric, [result.loss.detach().float(), *[result.tracked[c] for c in concepts],
                                           *[result.energy[c].float() for c in relative]])
        energies = dict(zip(relative, values[1 + len(concepts):].tolist()))
        values = values[: 1 + len(concepts)]
        self._check_finite(values, ["loss", *concepts])
        self.fabric.backward(result.loss)
        average_gradients(self.fabric, list(self.trained_parameters().values()))
        optimizer.step()
        for concept, value in zip(concepts, values[1:].tolist()):
            if self.stoppers[concept].update(value, energies.get(concept)):
                self.on_stop(concept)
        self.step += 1
        return values[0].item()

    def fit(self) -> dict[str, Any]:
        """Train until every concept has stopped; returns the summary (``summary()``)."""
        self._optimizer()
        if self.settings.resume:
            self.resume()
        started = time.perf_counter() - self.seconds
        bar = tqdm(
            total=self.total_steps_bound(),
            initial=self.step,
            desc=self.method,
            disable=not self.settings.progress or self.fabric.global_rank != 0,
        )
        while self.training_concepts():
            loss = self.train_step()
            self.seconds = time.perf_counter() - started
            if self.settings.save_every and self.step % self.settings.save_every == 0:
                self.save()
            bar.update(1)
            bar.set_postfix(self._postfix(loss), refresh=False)
        bar.close()
        self.seconds = time.perf_counter() - started
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "concepts": {
                concept: {
                    "steps": stopper.steps,
                    "stop_reason": stopper.stop_reason,
                    "momentum": stopper.momentum,
                    "stop_threshold": stopper.threshold,
                }
                for concept, stopper in self.stoppers.items()
            },
            "seconds": round(self.seconds, 2),
            "processes": self.fabric.world_size,
            "global_batch": self.settings.batch_size,
        }

    def metadata(self) -> dict[str, Any]:
        """What the output files record about this run."""
        return {"method": self.method, "settings": self.run_settings(), "summary": self.summary()}
