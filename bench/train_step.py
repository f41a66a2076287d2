"""Benchmark 2 (issue 6): the time and peak memory of one training step, three ways.

- ``sepce``: the library's SepCE step on ONE model copy. ``""`` is protected by the increment,
  so eps(c; W0) and eps(""; W0) come from one no-grad batch-2 call with increments switched off
  and eps(c; W0 + dW) from one call with grad: 3 UNet evaluations, 1 backward (METHOD.md §2).
- ``sepce_two_copy``: the reference's way (METHOD.md §3): the frozen predictions come from a
  second, deep-copied UNet, and the trained model predicts both c and ``""`` with grad (4
  evaluations, the backward runs through both). Same basis, loss and optimiser otherwise.
- ``esd_x``: the library's ESD-x step (METHOD.md §5): a guided partial DDIM run from noise
  (0 .. ddim_steps-1 steps, drawn per step, no grad), then frozen (original attn2 weights
  swapped in) and trained predictions; attn2 trained.

``--checkpointing`` turns on the UNet's activation checkpointing for every variant, as SD v1.4's
configs/stable-diffusion/v1-inference.yaml does (``use_checkpoint: True``; the toy and bench configs
leave it off): activations are recomputed in the backward instead of stored.

Per model: seconds per step (interleaved repeats, ratio to ``sepce``) and peak memory of each
variant alone in a fresh process (2 steps, so Adam's state exists), with the goal's ratio
sepce / sepce_two_copy <= 0.6. Both SepCE variants use lambda = 0 (the L1 term costs the same).

    python bench/train_step.py                      # toy model and the ~53 M SD-shaped UNet
    python bench/train_step.py --checkpointing      # the same with SD v1.4's activation checkpointing
    python bench/train_step.py --quick              # tiny model, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
from lightning_fabric import Fabric
from torch import nn

from common import (
    CONCEPT,
    MODEL_NAMES,
    add_common_arguments,
    bench_settings,
    bench_parser,
    build_model,
    make_fabric,
    make_trainer,
    peak_memory,
    print_json,
    print_table,
    progress,
    random_latents,
    require_models,
    run_main,
    setup,
    sized,
    time_interleaved,
    timing_summary,
)
from erasure.bases import compute_bases
from erasure.losses import concept_representation, direction_loss, representation_energy
from erasure.settings import SepCESettings
from erasure.trainers.loop import ConceptTrainer, StepLoss, predict_eps
from erasure.trainers.sepce import SepCETrainer

VARIANTS = ("sepce", "sepce_two_copy", "esd_x")
MEMORY_STEPS = 2
TRAINING_IMAGES = 8
MEMORY_GOAL = 0.6


class TwoCopySepCETrainer(SepCETrainer):
    """SepCE as the reference computes it: a second, frozen copy of the UNet for eps(.; W0) and
    trained predictions for both c and ``""`` (the increment's invariance on ``""`` unused)."""

    method = "sepce_two_copy"

    def __init__(self, model: nn.Module, fabric: Fabric, latents: torch.Tensor, settings: SepCESettings) -> None:
        # Copy before the increments are attached; the first and cond stages are shared, not copied.
        shared = {id(part): part for part in (model.first_stage_model, model.cond_stage_model)}
        self.frozen_model = copy.deepcopy(model, memo=shared).requires_grad_(False)
        bases = compute_bases(model, [CONCEPT], min_dims=1)
        super().__init__(model, fabric, bases, {CONCEPT: latents}, settings)

    def step_loss(self, generator: torch.Generator, concepts: list[str]) -> StepLoss:
        (concept,) = concepts
        batch = self.draw_concept_batch(generator, self.latents[concept])
        noisy = self.model.q_sample(batch.latents, batch.timesteps, batch.noise)
        rows = noisy.shape[0]
        inputs, timesteps = torch.cat([noisy, noisy]), torch.cat([batch.timesteps, batch.timesteps])
        context = torch.cat([self.contexts(concept, rows), self.contexts("", rows)])
        with torch.no_grad():
            frozen = predict_eps(self.frozen_model, inputs, timesteps, context)
        trained = predict_eps(self.model, inputs, timesteps, context)
        r_frozen = concept_representation(*frozen.chunk(2))
        direction = direction_loss(concept_representation(*trained.chunk(2)), r_frozen)
        return StepLoss(direction, {concept: direction.detach()}, {concept: representation_energy(r_frozen)})


def make_variant(
    variant: str, model_name: str, device: torch.device, seed: int, ddim_steps: int, checkpointing: bool
) -> ConceptTrainer:
    """A fresh model (seeded) and the trainer of ``variant`` on it."""
    torch.manual_seed(seed)
    model = build_model(model_name, device, checkpointing)
    fabric = make_fabric(device)
    latents = random_latents(model, TRAINING_IMAGES, seed)
    if variant == "sepce_two_copy":
        return TwoCopySepCETrainer(model, fabric, latents, bench_settings("sepce", model_name, seed))
    return make_trainer(variant, model, fabric, latents, bench_settings(variant, model_name, seed, ddim_steps=ddim_steps))


def run_variant_steps(
    variant: str, model_name: str, device_name: str, seed: int, ddim_steps: int, checkpointing: bool
) -> None:
    """Build ``variant`` and run ``MEMORY_STEPS`` steps (the body of a peak-memory process)."""
    trainer = make_variant(variant, model_name, torch.device(device_name), seed, ddim_steps, checkpointing)
    for _ in range(MEMORY_STEPS):
        trainer.train_step()


def measure_memory(model_name: str, args: argparse.Namespace, device: torch.device, ddim_steps: int) -> dict[str, Any]:
    """Peak memory of every variant on ``model_name``, each alone in a fresh process."""
    progress(f"{model_name}: peak memory, one process per variant")
    return {
        variant: peak_memory(
            run_variant_steps, (variant, model_name, str(device), args.seed, ddim_steps, args.checkpointing), device
        )[0]
        for variant in VARIANTS
    }


def bench_model(
    model_name: str, args: argparse.Namespace, device: torch.device, ddim_steps: int, memory: dict[str, Any]
) -> dict[str, Any]:
    progress(f"{model_name}: timing {', '.join(VARIANTS)}")
    trainers = {
        variant: make_variant(variant, model_name, device, args.seed, ddim_steps, args.checkpointing)
        for variant in VARIANTS
    }
    times = time_interleaved({variant: trainers[variant].train_step for variant in VARIANTS}, args.repeats, device)
    summary = timing_summary(times, baseline="sepce")
    increment = sum(p.numel() for p in trainers["sepce"].trained_parameters().values())
    parameters = sum(p.numel() for p in trainers["sepce"].model.model.diffusion_model.parameters()) - increment
    rows = []
    for variant in VARIANTS:
        row: dict[str, Any] = {
            "model": model_name,
            "variant": variant,
            "median_s": summary[variant]["median_s"],
            "time_ratio_to_sepce": summary[variant]["ratio"],
            "trained_parameters": sum(p.numel() for p in trainers[variant].trained_parameters().values()),
        }
        if memory:
            row["peak_mib"] = memory[variant]["peak_mib"]
            row["memory_ratio_to_two_copy"] = memory[variant]["peak_mib"] / memory["sepce_two_copy"]["peak_mib"]
        rows.append(row)
    # the UNet's own weights, without the SepCE increment attached to it
    result: dict[str, Any] = {"unet_parameters": parameters, "rows": rows, "times_s": times}
    if memory:
        ratio = memory["sepce"]["peak_mib"] / memory["sepce_two_copy"]["peak_mib"]
        result["memory"] = memory
        result["goal_one_copy_memory_ratio"] = {"value": ratio, "goal": MEMORY_GOAL, "met": ratio <= MEMORY_GOAL}
    return result


def main(args: argparse.Namespace) -> None:
    device = setup(args)
    models = sized(args.models, args.quick, ["sd-tiny"], ["toy", "sd-mid"])
    require_models(models)
    ddim_steps = sized(args.ddim_steps, args.quick, 4, 50)
    # Every memory process is forked before the parent runs any model (see bench/common.py).
    memory = {name: {} if args.no_memory else measure_memory(name, args, device, ddim_steps) for name in models}
    results = {name: bench_model(name, args, device, ddim_steps, memory[name]) for name in models}
    rows = [row for result in results.values() for row in result["rows"]]
    columns = ["model", "variant", "median_s", "time_ratio_to_sepce", "trained_parameters"]
    if not args.no_memory:
        columns += ["peak_mib", "memory_ratio_to_two_copy"]
    print_table(
        f"One training step, batch 1, ESD partial sampling up to {ddim_steps} DDIM steps, {args.repeats} repeats, "
        f"activation checkpointing {'on' if args.checkpointing else 'off'}",
        rows,
        columns,
    )
    print_json("train_step", args, device, {"ddim_steps": ddim_steps, "models": results})


def parser() -> argparse.ArgumentParser:
    result = bench_parser(__doc__)
    result.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=None,
                        help="models to run on (default: toy sd-mid; --quick: sd-tiny)")
    result.add_argument("--ddim_steps", type=int, default=None, help="ESD's DDIM schedule (default: 50; --quick: 4)")
    result.add_argument("--no_memory", action="store_true", help="skip the peak-memory processes")
    result.add_argument("--checkpointing", action="store_true",
                        help="UNet activation checkpointing on, as SD v1.4's v1-inference.yaml sets it")
    return add_common_arguments(result, repeats=10)


if __name__ == "__main__":
    run_main(main, parser())
