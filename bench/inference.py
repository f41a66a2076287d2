"""Benchmark 3 (issue 6): sampling time of the base model vs erased models, merged or per call.

Variants (DDIM with classifier-free guidance, the model's default sampling settings):
- ``base``: no increments.
- ``merged_1`` / ``merged_9``: 1 or 9 concept increments folded into the attn2 to_k / to_v
  weights (``merge_into_weights``): the forward is a plain linear layer again.
- ``per_call_1`` / ``per_call_9``: the same increments left unmerged and active, so every
  to_k / to_v call adds ``sum_k coeff_k @ (beta * basis_k)`` to its weight (the reference's way).
The 9 increments are the toy artists' joint bases (each protects "" and the other 8) with random
coefficients: sampling cost does not depend on the coefficients' values. Merged and per-call
models share one copy per concept count (merge / unmerge run untimed before each call). Checks:
the largest difference between merged and per-call samples (they compute the same function) and
between base and merged samples (the increments do change the output).
Goal: merged <= 1.02x base.

    python bench/inference.py                       # toy model and the ~53 M SD-shaped UNet
    python bench/inference.py --quick               # tiny model, seconds (smoke test)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from common import (
    MODEL_NAMES,
    add_common_arguments,
    bench_parser,
    build_model,
    print_json,
    print_table,
    progress,
    require_models,
    run_main,
    setup,
    sized,
    time_interleaved,
    timing_summary,
)
from erasure.bases import compute_bases
from erasure.increments import attach_increment, cross_attention_kv, merge_into_weights, unmerge
from erasure.generation import generate_latents
from erasure.samplers import sampling_settings
from erasure.toy.world import ARTISTS

CONCEPT_COUNTS = (1, 9)
MERGED_GOAL = 1.02


def with_increments(model: nn.Module, count: int, seed: int) -> nn.Module:
    """``model`` with the first ``count`` toy artists' increments attached (random coefficients)."""
    bases = compute_bases(model, list(ARTISTS[:count]), min_dims=1)
    generator = torch.Generator().manual_seed(seed)
    layers = cross_attention_kv(model)
    for basis in bases.values():
        coeffs = {
            name: torch.randn((layer.out_features, basis.dims), generator=generator)
            for name, layer in layers.items()
        }
        attach_increment(model, basis, coeffs=coeffs, trainable=False)
    return model


def is_merged(model: nn.Module) -> bool:
    return next(iter(cross_attention_kv(model).values())).merged


def set_merged(model: nn.Module, merged: bool) -> None:
    if merged and not is_merged(model):
        merge_into_weights(model)
    elif not merged and is_merged(model):
        unmerge(model)


def bench_model(model_name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    progress(f"{model_name}: sampling")
    models = {}
    for count in (0, *CONCEPT_COUNTS):
        torch.manual_seed(args.seed)  # the same random weights in every copy
        model = build_model(model_name, device)
        models[count] = with_increments(model, count, args.seed + count) if count else model
    settings = sampling_settings(models[0], steps=args.steps)
    prompts = [ARTISTS[-1]] * args.batch_size
    seeds = [args.seed + index for index in range(args.batch_size)]

    def sample(model: nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: generate_latents(model, prompts, seeds, settings=settings, batch_size=args.batch_size)

    variants = {"base": sample(models[0])}
    prepare = {}
    for count in CONCEPT_COUNTS:
        for merged in (True, False):
            name = f"{'merged' if merged else 'per_call'}_{count}"
            variants[name] = sample(models[count])
            prepare[name] = lambda model=models[count], merged=merged: set_merged(model, merged)
    base_latents = variants["base"]()
    checks = {}
    for count in CONCEPT_COUNTS:
        set_merged(models[count], True)
        merged_latents = variants[f"merged_{count}"]()
        set_merged(models[count], False)
        per_call_latents = variants[f"per_call_{count}"]()
        checks[f"merged_vs_per_call_{count}_max_abs_diff"] = float((merged_latents - per_call_latents).abs().max())
        checks[f"base_vs_merged_{count}_max_abs_diff"] = float((merged_latents - base_latents).abs().max())
    times = time_interleaved(variants, args.repeats, device, prepare=prepare)
    summary = timing_summary(times, baseline="base")
    rows = [
        {"model": model_name, "variant": name, "median_s": value["median_s"], "ratio_to_base": value["ratio"]}
        for name, value in summary.items()
    ]
    merged_worst = max(summary[f"merged_{count}"]["ratio"] for count in CONCEPT_COUNTS)
    return {
        "sampler": settings.sampler,
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "batch_size": args.batch_size,
        "rows": rows,
        "times_s": times,
        "checks": checks,
        "goal_merged_ratio": {"value": merged_worst, "goal": MERGED_GOAL, "met": merged_worst <= MERGED_GOAL},
    }


def main(args: argparse.Namespace) -> None:
    device = setup(args)
    models = sized(args.models, args.quick, ["sd-tiny"], ["toy", "sd-mid"])
    require_models(models)
    args.batch_size = sized(args.batch_size, args.quick, 2, 4)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}.")
    results = {name: bench_model(name, args, device) for name in models}
    rows = [
        {**row, "sampling": f"{result['sampler']} {result['steps']}, guidance {result['guidance_scale']:g}"}
        for result in results.values()
        for row in result["rows"]
    ]
    print_table(
        f"Sampling {args.batch_size} images per call, each model's default sampler, {args.repeats} repeats",
        rows,
        ["model", "sampling", "variant", "median_s", "ratio_to_base"],
    )
    print_json("inference", args, device, {"models": results})


def parser() -> argparse.ArgumentParser:
    result = bench_parser(__doc__)
    result.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=None,
                        help="models to run on (default: toy sd-mid; --quick: sd-tiny)")
    result.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model config's)")
    result.add_argument("--batch_size", type=int, default=None,
                        help="images per sampling call (default: 4; --quick: 2)")
    return add_common_arguments(result, repeats=5)


if __name__ == "__main__":
    run_main(main, parser())
