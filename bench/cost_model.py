"""Benchmark 5 (issue 6): a cost model of erasing one concept from SD v1.4, from counted calls.

1. Count. Real trainer steps of every method run on a small SD-shaped model (bench/configs/
   sd-tiny.yaml) with hooks on its UNet: a forward hook counts each call and its batch rows,
   with or without grad, and a hook on each grad-carrying output counts the backward passes
   through it. Trained parameters are those of the trainer. ESD's partial DDIM run has a random
   length (0 .. ddim_steps-1 steps, drawn per step), so its counts are means over ``--steps``.
2. Scale. The same selections (attn2 to_k/to_v increments, attn2 weights, all other UNet
   weights) are applied to SD v1.4's UNet (configs/stable-diffusion/v1-inference.yaml, built on
   the meta device: no memory, no weights) for its trained-parameter counts. SepCE's basis
   dimension there is 768 - 77 - 76 (concepts - 1): the protected rows' rank bound of METHOD.md §2.
3. Estimate 1000 steps at 64x64 latents: UNet rows evaluated x the per-row cost of an SD v1.4
   UNet forward (and backward), in forward-equivalents (a backward counted as
   ``--backward_factor`` forwards) and, when a per-row cost is given (``--forward_s`` /
   ``--backward_s``) or measured (``--measure_sd_unet``: random SD v1.4 UNet, batch 1, on
   ``--device``), in seconds. Rows are costed one by one; batching them makes real runs cheaper.

    python bench/cost_model.py                                  # counts + forward-equivalents
    python bench/cost_model.py --device cuda --measure_sd_unet  # + seconds on this GPU
    python bench/cost_model.py --quick                          # a few steps (smoke test)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from common import (
    add_common_arguments,
    bench_settings,
    bench_parser,
    build_model,
    make_fabric,
    make_trainer,
    print_json,
    print_table,
    progress,
    random_latents,
    run_main,
    setup,
    sized,
    time_interleaved,
    timing_summary,
)
from erasure.increments import cross_attention_kv
from erasure.loading import unet_on_meta
from erasure.settings import ESDSettings
from erasure.trainers.weights import cross_attention_parameters, esd_u_parameters
from ldm.util import instantiate_from_config
from train_step import TRAINING_IMAGES, TwoCopySepCETrainer

REPO_ROOT = Path(__file__).resolve().parents[1]  # the bench runs from the checkout
SD_CONFIG = REPO_ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
METHODS = ("sepce", "sepce_two_copy", "cie", "esd_x", "esd_u")
SD_TOKENS = 77
ESTIMATE_STEPS = 1000


class UNetCallCounter:
    """Forward calls and rows of a UNet, with and without grad, and backward passes through them."""

    def __init__(self, unet: nn.Module) -> None:
        keys = ("calls_no_grad", "rows_no_grad", "calls_grad", "rows_grad", "backward", "rows_backward")
        self.counts = dict.fromkeys(keys, 0)
        self.handle = unet.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        rows = int(output.shape[0])
        if output.requires_grad:
            self.counts["calls_grad"] += 1
            self.counts["rows_grad"] += rows
            output.register_hook(lambda grad, rows=rows: self._on_backward(rows))
        else:
            self.counts["calls_no_grad"] += 1
            self.counts["rows_no_grad"] += rows

    def _on_backward(self, rows: int) -> None:
        self.counts["backward"] += 1
        self.counts["rows_backward"] += rows

    def remove(self) -> None:
        self.handle.remove()


def count_method(method: str, steps: int, ddim_steps: int, seed: int, device: torch.device) -> dict[str, Any]:
    """Per-step means of the UNet counts over ``steps`` real steps of ``method`` on sd-tiny."""
    torch.manual_seed(seed)
    model = build_model("sd-tiny", device)
    fabric = make_fabric(device)
    latents = random_latents(model, TRAINING_IMAGES, seed)
    if method == "sepce_two_copy":
        trainer = TwoCopySepCETrainer(model, fabric, latents, bench_settings("sepce", "sd-tiny", seed))
        unets = [model.model.diffusion_model, trainer.frozen_model.model.diffusion_model]
    else:
        trainer = make_trainer(method, model, fabric, latents, bench_settings(method, "sd-tiny", seed, ddim_steps=ddim_steps))
        unets = [model.model.diffusion_model]
    counters = [UNetCallCounter(unet) for unet in unets]
    for _ in range(steps):
        trainer.train_step()
    for counter in counters:
        counter.remove()
    totals = {key: sum(counter.counts[key] for counter in counters) for key in counters[0].counts}
    per_step = {key: value / steps for key, value in totals.items()}
    per_step["trained_parameters_tiny"] = sum(p.numel() for p in trainer.trained_parameters().values())
    return per_step


def sd_trained_parameters(concepts: int) -> dict[str, int]:
    """Trained parameters of each method on SD v1.4 (``concepts`` erased jointly by SepCE)."""
    holder = unet_on_meta(SD_CONFIG)
    layers = cross_attention_kv(holder)
    width = next(iter(layers.values())).in_features
    dims = width - SD_TOKENS - (SD_TOKENS - 1) * (concepts - 1)
    if dims < 1:
        raise ValueError(f"{concepts} concepts leave no null space at width {width} (rank bound); use fewer.")
    sepce = dims * sum(layer.out_features for layer in layers.values())
    attn2 = sum(p.numel() for p in cross_attention_parameters(holder).values())
    others = sum(p.numel() for p in esd_u_parameters(holder).values())
    return {"sepce": sepce, "sepce_two_copy": sepce, "cie": attn2, "esd_x": attn2, "esd_u": others, "sepce_dims": dims}


def measure_sd_unet(device: torch.device, repeats: int) -> dict[str, float]:
    """Seconds of one SD v1.4 UNet forward (no grad) and of its backward to the attn2 weights, batch 1, 64x64."""
    config = OmegaConf.load(SD_CONFIG).model.params.unet_config
    torch.manual_seed(0)
    unet = instantiate_from_config(config).to(device).eval().requires_grad_(False)
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(".attn2." in name)
    x = torch.randn(1, 4, 64, 64, device=device)
    t = torch.tensor([500], device=device)
    context = torch.randn(1, SD_TOKENS, 768, device=device)

    def forward() -> None:
        with torch.no_grad():
            unet(x, t, context=context)

    def forward_backward() -> None:
        unet(x, t, context=context).square().mean().backward()
        unet.zero_grad(set_to_none=True)

    times = time_interleaved({"forward": forward, "forward_backward": forward_backward}, repeats, device)
    times = timing_summary(times, baseline="forward")
    forward_s = times["forward"]["median_s"]
    return {"forward_s": forward_s, "backward_s": max(times["forward_backward"]["median_s"] - forward_s, 0.0)}


def main(args: argparse.Namespace) -> None:
    device = setup(args)
    steps = sized(args.steps, args.quick, 2, 200)
    if steps < 1 or args.sd_concepts < 1 or args.backward_factor <= 0:
        raise ValueError("--steps and --sd_concepts must be >= 1 and --backward_factor > 0.")
    per_row = None
    if args.measure_sd_unet:
        per_row = measure_sd_unet(device, args.repeats)
    elif args.forward_s is not None:
        per_row = {"forward_s": args.forward_s, "backward_s": args.backward_s or args.backward_factor * args.forward_s}
    sd_parameters = sd_trained_parameters(args.sd_concepts)
    rows = []
    for method in METHODS:
        progress(f"{method}: counting {steps} steps")
        counts = count_method(method, steps, args.ddim_steps, args.seed, device)
        forward_rows = counts["rows_no_grad"] + counts["rows_grad"]
        equivalents = forward_rows + args.backward_factor * counts["rows_backward"]
        row = {"method": method, **counts, "trained_parameters_sd14": sd_parameters[method],
               "forward_equivalents_per_step": equivalents,
               f"forward_equivalents_{ESTIMATE_STEPS}_steps": equivalents * ESTIMATE_STEPS}
        if per_row is not None:
            seconds = forward_rows * per_row["forward_s"] + counts["rows_backward"] * per_row["backward_s"]
            row[f"seconds_{ESTIMATE_STEPS}_steps"] = seconds * ESTIMATE_STEPS
        rows.append(row)
    base = rows[0]["forward_equivalents_per_step"]
    for row in rows:
        row["cost_ratio_to_sepce"] = row["forward_equivalents_per_step"] / base
    columns = ["method", "calls_no_grad", "rows_no_grad", "calls_grad", "rows_grad", "rows_backward",
               "trained_parameters_tiny", "trained_parameters_sd14", "forward_equivalents_per_step",
               f"forward_equivalents_{ESTIMATE_STEPS}_steps", "cost_ratio_to_sepce"]
    if per_row is not None:
        columns.append(f"seconds_{ESTIMATE_STEPS}_steps")
    print_table(
        f"UNet calls per step (means over {steps} steps on sd-tiny; ESD: DDIM {args.ddim_steps}) and SD v1.4 "
        f"estimate for {ESTIMATE_STEPS} steps at 64x64 (backward = {args.backward_factor:g} forwards; SepCE dims "
        f"{sd_parameters['sepce_dims']})",
        rows,
        columns,
    )
    print_json("cost_model", args, device, {"steps_counted": steps, "per_row_cost_s": per_row,
                                            "sd14_sepce_dims": sd_parameters["sepce_dims"], "rows": rows})


def parser() -> argparse.ArgumentParser:
    result = bench_parser(__doc__)
    result.add_argument("--steps", type=int, default=None,
                        help="trainer steps counted per method (default: 200; --quick: 2)")
    result.add_argument("--ddim_steps", type=int, default=ESDSettings().ddim_steps, help="ESD's DDIM schedule (default: 50)")
    result.add_argument("--sd_concepts", type=int, default=1,
                        help="concepts SepCE erases jointly on SD v1.4 (default: 1)")
    result.add_argument("--backward_factor", type=float, default=2.0,
                        help="a backward row in forward-equivalents (default: 2, the usual rule of thumb)")
    result.add_argument("--forward_s", type=float, default=None,
                        help="seconds of one SD v1.4 UNet forward row at 64x64")
    result.add_argument("--backward_s", type=float, default=None,
                        help="seconds of one backward row (default: backward_factor x forward_s)")
    result.add_argument("--measure_sd_unet", action="store_true",
                        help="measure forward_s / backward_s on --device with a random SD v1.4 UNet (3.4 GB)")
    return add_common_arguments(result, repeats=3)


if __name__ == "__main__":
    run_main(main, parser())
