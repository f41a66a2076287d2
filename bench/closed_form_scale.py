"""Benchmark 8: the closed-form SepCE solve at Stable Diffusion's size (METHOD.md §6), beside one
SepCE optimiser step.

Models with random weights (the solve's cost does not depend on what the weights learnt):
``sd-mid`` (bench/configs/sd-mid.yaml) and ``v1`` (configs/stable-diffusion/v1-inference.yaml, SD
v1.4's own layout: 32 key/value projections of width 768). SD's CLIP text encoder cannot be
downloaded here, so both use a random CLIP text model of SD's width and length (768 x 77) with 2
layers and the toy tokenizer; encoding the wordings is a small part of the solve.

For 1, 10 and 100 concepts (names built from toy words), every concept protects ``""`` and the
watermark prompt exactly and, when there are several, the other concepts approximately
(``--protect_energy``; 768 dimensions hold only about nine exactly protected SD prompts). Timed:
the bases (``compute_bases``, float64 SVDs) and the closed form (``solve_sepce``: encode the
SD wordings of every concept, one [k, k] solve, W_l G per layer), each once after an untimed
one-concept warm-up; memory: the resident-set (CPU) or allocated (CUDA) high-water mark of the solve above
what the built model holds. Beside them: one SepCE optimiser step (batch 1, one concept).

    python bench/closed_form_scale.py                     # sd-mid and v1; 1, 10, 100 concepts (CPU: ~15 min)
    python bench/closed_form_scale.py --quick             # the toy model; 1 and 3 concepts
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from common import (
    CONFIG_DIR,
    _free_memory_and_reset_peak,
    _resident_mib,
    add_common_arguments,
    bench_parser,
    bench_settings,
    build_model,
    make_fabric,
    make_trainer,
    print_json,
    print_table,
    progress,
    random_latents,
    reset_zero_initialised,
    run_main,
    setup,
    synchronize,
)
from erasure.bases import compute_bases
from erasure.closed_form import solve_sepce
from erasure.increments import detach
from erasure.settings import SepCESettings
from erasure.toy.training import TextEncoderConfig, write_text_encoder_dir
from erasure.toy.world import ARTISTS, COLOURS, OBJECTS
from ldm.util import instantiate_from_config

V1_CONFIG = CONFIG_DIR.parents[1] / "configs" / "stable-diffusion" / "v1-inference.yaml"
#: SD v1's text width and length, with a 2-layer random encoder (see the module docstring).
SD_TEXT = TextEncoderConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12)
MIB = 2**20


def build(name: str, device: torch.device) -> nn.Module:
    """A bench model (``build_model``) or SD v1.4's layout from v1-inference.yaml, random weights."""
    if name != "v1":
        return build_model(name, device)
    config = OmegaConf.load(V1_CONFIG)
    with tempfile.TemporaryDirectory(prefix="bench-clip-") as directory:
        write_text_encoder_dir(directory, SD_TEXT, 77)
        config.model.params.cond_stage_config.params = {"version": directory, "max_length": 77}
        model = instantiate_from_config(config.model)
    reset_zero_initialised(model)
    model.ldm_config = OmegaConf.create({"model": config.model})
    return model.eval().requires_grad_(False).to(device)


def concept_names(count: int) -> list[str]:
    """``count`` distinct concept names made of toy words (every bench tokenizer spells them)."""
    names = [" ".join(words) for words in itertools.product(ARTISTS, COLOURS, OBJECTS)]
    if count > len(names):
        raise ValueError(f"At most {len(names)} concepts, got {count}.")
    return names[:count]


def memory_mark(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MIB
    return _resident_mib()[0]


def memory_peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return _resident_mib()[1]


def solve(model: nn.Module, count: int, energy: float, device: torch.device) -> dict[str, Any]:
    settings = SepCESettings(solver="closed_form")  # one concept at a time (the default per_concept objective)
    protected = [settings.watermark_prompt]
    for concepts in (concept_names(1), concept_names(count)):  # an untimed one-concept warm-up first
        _free_memory_and_reset_peak(device)
        start = memory_mark(device)
        began = time.perf_counter()
        bases = {}
        for concept in concepts:  # each protects the others approximately, "" and the watermark exactly
            others = [other for other in concepts if other != concept]
            bases.update(compute_bases(model, [concept], protected, approximate=others,
                                       energy=energy if others else 1.0))
        synchronize(device)
        basis_s = time.perf_counter() - began
        began = time.perf_counter()
        increments = solve_sepce(model, bases, settings)
        synchronize(device)
        solve_s = time.perf_counter() - began
        peak = memory_peak(device) - start
    dims = [basis.dims for basis in bases.values()]
    edit = max(i.metadata["closed_form"]["edit_norm_relative"]["max"] for i in increments.values())
    return {"concepts": count, "basis_s": basis_s, "solve_s": solve_s, "total_s": basis_s + solve_s,
            "per_concept_s": (basis_s + solve_s) / count, "peak_mib": peak, "dims_min": min(dims),
            "dims_max": max(dims), "edit_norm_relative_max": edit}


def optimiser_step(model: nn.Module, name: str, device: torch.device, seed: int) -> float:
    """Seconds of one SepCE optimiser step (batch 1, one concept), after one untimed step."""
    settings = bench_settings("sepce", name, seed)
    trainer = make_trainer("sepce", model, make_fabric(device), random_latents(model, 2, seed), settings,
                           protected=["watermark SRS-ME"])
    trainer.train_step()
    synchronize(device)
    began = time.perf_counter()
    trainer.train_step()
    synchronize(device)
    seconds = time.perf_counter() - began
    detach(model, list(trainer.bases))
    return seconds


def main(args: argparse.Namespace) -> None:
    device = setup(args)
    models = ["toy"] if args.quick else args.models
    counts = [1, 3] if args.quick else args.concepts
    rows = []
    for name in models:
        progress(f"building {name}")
        torch.manual_seed(args.seed)
        model = build(name, device)
        step_s = None if args.no_step else optimiser_step(model, name, device, args.seed)
        for count in counts:
            progress(f"{name}: {count} concept(s)")
            rows.append({"model": name, **solve(model, count, args.protect_energy, device), "optimiser_step_s": step_s})
        del model
    print_table(
        "Closed-form SepCE: bases and solve (seconds, once after a warm-up) and the solve's peak memory above the "
        f"model, beside one SepCE optimiser step (protect_energy {args.protect_energy} for the other concepts)",
        [{**r, **{k: f"{v:.3g}" for k, v in r.items() if isinstance(v, float)}} for r in rows],
        ["model", "concepts", "basis_s", "solve_s", "total_s", "per_concept_s", "peak_mib", "dims_min", "dims_max",
         "optimiser_step_s"],
    )
    print_json("closed_form_scale", args, device, {"rows": rows})


def parser() -> argparse.ArgumentParser:
    result = bench_parser(__doc__)
    result.add_argument("--models", nargs="+", choices=("sd-mid", "v1", "toy"), default=["sd-mid", "v1"])
    result.add_argument("--concepts", type=int, nargs="+", default=[1, 10, 100])
    result.add_argument("--protect_energy", type=float, default=0.99,
                        help="energy kept of the other concepts' rows (default: 0.99)")
    result.add_argument("--no_step", action="store_true", help="skip the optimiser step (slow for v1 on a CPU)")
    return add_common_arguments(result, repeats=None)


if __name__ == "__main__":
    run_main(main, parser())
