"""Command-line flags, in one place: they map onto the API's arguments and settings, nothing more.

Every script in train-scripts/, eval-scripts/ and bench/ builds its parser from these groups and
runs its ``main`` through ``run_script``: the project's input errors (``erasure.errors``, all
ValueErrors) and files that are missing, present or cannot be written (OSError) become
``error: <message>`` on stderr and exit status 2, the status argparse gives bad flags.
``ERASURE_TRACEBACK=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from erasure.loading import TOY_CONFIG, load_model, read_config
from erasure.runs import RunRequest, run_training
from erasure.samplers import SAMPLERS, SamplingSettings, sampling_settings
from erasure.settings import (
    CONCEPT_KINDS,
    DEFAULT_TAU,
    ESD_TIMESTEPS,
    SEPCE_SOLVERS,
    STOP_RULES,
    JOINT_OBJECTIVES,
    CiESettings,
    ESDSettings,
    SepCESettings,
    TrainingSettings,
    default_learning_rate,
)
from erasure.trainers.runtime import ACCELERATORS, PRECISIONS, STRATEGIES, FabricOptions, make_fabric
from erasure.worlds import world_from_config

#: OSError: a file that cannot be read or written (permissions, a full disk) is reported, not a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError)


EXIT_BAD_INPUT = 2


def run_script(main: Callable[[], object]) -> None:
    """Call a script's ``main()``; bad input exits with one clear line (status 2)."""
    try:
        main()
    except USER_ERRORS as error:
        if os.environ.get("ERASURE_TRACEBACK") == "1":
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


# ---------------------------------------------------------------------------------- model
def add_model_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The loader's flags (``--config_path``, ``--ckpt_path``, ``--device``, ``--use_ema``)."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--config_path", default=None,
        help="ldm YAML config (e.g. configs/stable-diffusion/v1-inference.yaml); default: the embedded toy model "
        "(configs/toy/toy-ldm.yaml), used when neither path is given",
    )
    group.add_argument(
        "--ckpt_path", default=None,
        help="checkpoint (.safetensors, or a trusted .ckpt/.pt pickle such as sd-v1-4-full-ema.ckpt); default: the "
        "embedded toy model (models/toy/model.safetensors)",
    )
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    group.add_argument("--use_ema", action="store_true",
                       help="use the checkpoint's EMA UNet weights (model_ema.*); the toy model ships without them")
    return parser


def load_model_from_args(args: argparse.Namespace, verbose: bool = True, needs_tokenizer: bool = True) -> nn.Module:
    """``erasure.load_model`` driven by the flags of ``add_model_arguments``."""
    return load_model(args.config_path, args.ckpt_path, device=args.device, use_ema=args.use_ema, verbose=verbose,
                      needs_tokenizer=needs_tokenizer)


# ---------------------------------------------------------------------------------- processes
def add_fabric_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--accelerator --devices --num_nodes --strategy --precision`` (Lightning's names)."""
    group = parser.add_argument_group("processes and devices (Lightning Fabric)")
    group.add_argument("--accelerator", default="auto", choices=ACCELERATORS, help="default: auto (a GPU if present)")
    group.add_argument("--devices", type=int, default=1, help="processes (devices) per node (default: 1)")
    group.add_argument("--num_nodes", type=int, default=1, help="number of machines (default: 1)")
    group.add_argument("--strategy", default="auto", choices=STRATEGIES, help="default: auto (ddp when devices > 1)")
    group.add_argument("--precision", default="32-true", choices=PRECISIONS,
                       help="autocast: bf16-mixed, or 16-mixed on CUDA only")
    return parser


def fabric_options_from_args(args: argparse.Namespace) -> FabricOptions:
    return FabricOptions(args.accelerator, args.devices, args.num_nodes, args.strategy, args.precision)


# ---------------------------------------------------------------------------------- image generation
def add_generation_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Sampler, process and output flags of the image-generation scripts."""
    sampling = parser.add_argument_group("sampling (defaults: the config's `sampling:` section, else DDIM 50, 7.5)")
    sampling.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="ddim or lms (the paper's)")
    sampling.add_argument("--ddim_steps", type=int, default=None, help="sampler steps (DDIM or LMS)")
    sampling.add_argument("--guidance_scale", type=float, default=None, help="classifier-free guidance scale")
    sampling.add_argument("--batch_size", type=int, default=8, help="images per model call (default: 8)")
    parser.add_argument_group("processes").add_argument(
        "--devices", type=int, default=1,
        help="processes on this machine (Lightning Fabric DDP); with --device cuda one GPU each. Under torchrun "
        "leave it at 1: torchrun's processes are used",
    )
    parser.add_argument("--overwrite", action="store_true", help="delete the output folder's images and start over")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def sampling_from_args(model: nn.Module, args: argparse.Namespace) -> SamplingSettings:
    return sampling_settings(model, args.sampler, args.ddim_steps, args.guidance_scale)


# ---------------------------------------------------------------------------------- training
def _lr_help(method: str) -> str:
    return (f"Adam learning rate (default: METHOD.md's {default_learning_rate(method, 'sd'):g} on SD; "
            f"{default_learning_rate(method, 'toy'):g} on the embedded toy model)")


def add_training_arguments(parser: argparse.ArgumentParser, method: str, needs_images: bool = True) -> None:
    """Loader, Fabric and loop flags shared by every training script (defaults: ``erasure.settings``)."""
    add_model_arguments(parser)
    add_fabric_arguments(parser)
    defaults = TrainingSettings()
    group = parser.add_argument_group("training")
    group.add_argument("--lr", type=float, default=None, help=_lr_help(method))
    group.add_argument("--iterations", type=int, default=defaults.iterations,
                       help=f"step limit per concept (default: {defaults.iterations})")
    group.add_argument("--batch_size", type=int, default=defaults.batch_size,
                       help="GLOBAL batch per step, split over processes (default: 1)")
    group.add_argument("--seed", type=int, default=defaults.seed, help="seed of every step's draws (default: 0)")
    group.add_argument("--output_dir", type=Path, default=Path("outputs"), help="where results go (default: outputs/)")
    group.add_argument("--overwrite", action="store_true", help="replace existing outputs and start a fresh checkpoint")
    group.add_argument("--resume", action="store_true", help="continue from this run's checkpoint in --output_dir")
    group.add_argument("--save_every", type=int, default=defaults.save_every,
                       help="checkpoint every K steps; 0: never (default: 100)")
    group.add_argument("--no_progress", action="store_true", help="no progress bar")
    group.add_argument("--no_report", action="store_true",
                       help="skip the before/after grid and accuracy table (written when the model's world has a "
                       "classifier, e.g. the embedded toy model)")
    if needs_images:
        data = parser.add_argument_group("training images (made by the original model)")
        data.add_argument("--data_dir", type=Path, default=None,
                          help="folder with {data_dir}/{concept_slug}/*.png; default: generate --num_images per concept "
                          "into {cache_dir}/training-images/<model fingerprint>/ once and reuse them")
        data.add_argument("--cache_dir", type=Path, default=None,
                          help="where generated training images are kept (default: $XDG_CACHE_HOME/separable-erasure, "
                          "else ~/.cache/separable-erasure)")
        data.add_argument("--num_images", type=int, default=defaults.num_images,
                          help="images to generate per concept when --data_dir is not given (default: 100)")
    if method != "esd":
        stop = parser.add_argument_group("momentum stop (METHOD.md §1)")
        stop.add_argument("--alpha", type=float, default=defaults.alpha, help="momentum of L_dir (default: 0.9)")
        stop.add_argument("--stop", choices=STOP_RULES, default=defaults.stop,
                          help="relative (default): stop when the momentum <= tau x the concept's representation "
                          "energy mean(r_c(W0)^2), so objects and artists train alike; absolute: <= tau (the reference)")
        stop.add_argument("--tau", type=float, default=defaults.tau,
                          help=f"the stop's threshold (default: {DEFAULT_TAU['relative']:g} relative, "
                          f"{DEFAULT_TAU['absolute']:g} absolute)")
        stop.add_argument("--warmup", type=int, default=defaults.warmup,
                          help="steps before the stop rule applies (default: 10)")


def sepce_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="SepCE: one separable increment per concept (METHOD.md §2).")
    defaults = SepCESettings()
    parser.add_argument("--concepts", nargs="+", default=None,
                        help="concepts to erase (default: the model world's first artist; the toy model's 'vela quorin')")
    parser.add_argument("--mode", choices=("joint", "sequential"), default=defaults.mode,
                        help="train together or one by one")
    parser.add_argument("--protect", nargs="*", default=[], help="extra prompts every increment must leave unchanged")
    parser.add_argument("--watermark_prompt", default=defaults.watermark_prompt,
                        help=f"protected by every increment, so a watermark prompt keeps its output (METHOD.md §2; "
                        f"default: {defaults.watermark_prompt!r}; '' for none)")
    parser.add_argument("--joint_objective", choices=JOINT_OBJECTIVES, default=defaults.joint_objective,
                        help="per_concept (default; the authors' code: one momentum stop and L1 term per concept) or "
                        "paper (Eq. 34/37: L1 of the summed increments, one weighted momentum; --mode joint)")
    parser.add_argument(
        "--protect_classes", action=argparse.BooleanOptionalAction, default=None,
        help="also protect the model's other evaluation classes (METHOD.md §4: the other artists) -- the 'known "
        "concepts' of §2. Default: the model world's choice (on for the embedded toy model, whose 256-wide text space "
        "holds them; off for SD, whose 768-wide space holds only about nine prompts)",
    )
    parser.add_argument("--beta", type=float, default=defaults.beta, help="increment scale (default: 1e-4)")
    parser.add_argument("--lam", type=float, default=defaults.lam, help="L1 weight lambda (default: 1e-6)")
    parser.add_argument("--rtol", type=float, default=defaults.rtol, help="null-space rank tolerance (default: 1e-6)")
    parser.add_argument("--min_dims", type=int, default=defaults.min_dims,
                        help=f"smallest usable null space (default: {defaults.min_dims})")
    solve = parser.add_argument_group("solver and wordings (METHOD.md §6)")
    solve.add_argument("--solver", choices=SEPCE_SOLVERS, default=defaults.solver,
                       help="cie: train the CiE loss from zero (the paper; default); closed_form: ridge least squares over "
                       "the concept's wordings, in seconds, no images; closed_form+cie: train from the closed form")
    solve.add_argument("--mu", type=float, default=defaults.mu,
                       help=f"closed form's ridge, relative to trace(B B^T)/k (default: {defaults.mu})")
    solve.add_argument("--target", default=defaults.target,
                       help="what replaces the concept's name in every wording (default: '' = the name removed)")
    solve.add_argument("--concept_templates", default=None, metavar="FILE",
                       help="wordings, one a line, each with {name}, fitted by the closed form and trained over by the "
                       "optimiser (default: the built-in ones of --concept_kind; a file with the one line {name}: the "
                       "paper's bare prompt)")
    solve.add_argument("--concept_kind", choices=CONCEPT_KINDS, default=defaults.concept_kind,
                       help="which built-in wordings: artist (default) or object")
    solve.add_argument("--protect_file", default=None, metavar="FILE",
                       help="prompts to protect, one a line (hundreds allowed with --protect_energy < 1)")
    solve.add_argument("--protect_energy", type=float, default=defaults.protect_energy,
                       help="share of --protect_file's energy kept out of the null space; 1 (default): exactly")
    solve.add_argument("--keep_wordings", action=argparse.BooleanOptionalAction, default=defaults.keep_wordings,
                       help="closed form: also keep the wordings of every protected prompt (the templates filled "
                       "with it) as they are: less drift on them, weaker erasure of unseen wordings (default: off)")
    add_training_arguments(parser, "sepce")
    return parser


def cie_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="CiE: train every attn2 weight to erase one concept (METHOD.md §1).")
    parser.add_argument("--prompt", default=None,
                        help="the concept to erase (default: the model world's first artist; the toy model's 'vela quorin')")
    parser.add_argument("--lam", type=float, default=CiESettings().lam, help="L1 weight lambda (1e-6 .. 3e-5)")
    add_training_arguments(parser, "cie")
    return parser


def esd_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="ESD baseline: ESD-x (attn2) or ESD-u (non-attn2) (METHOD.md §5).")
    defaults = ESDSettings()
    parser.add_argument("--prompt", default=None,
                        help="the concept to erase (default: the model world's first artist; the toy model's 'vela quorin')")
    parser.add_argument("--train_method", choices=("xattn", "noxattn"), default=defaults.train_method,
                        help="xattn: ESD-x (attn2 weights); noxattn: ESD-u (every other UNet weight)")
    parser.add_argument("--ddim_steps", type=int, default=defaults.ddim_steps, help="DDIM steps of the partial sample")
    parser.add_argument("--start_guidance", type=float, default=defaults.start_guidance,
                        help="guidance of the partial sample")
    parser.add_argument("--negative_guidance", type=float, default=defaults.negative_guidance,
                        help="eta of the ESD target")
    parser.add_argument("--timestep", choices=ESD_TIMESTEPS, default=defaults.timestep,
                        help="UNet timestep of the partial sample: reference (default; ESD's code, a DDPM index from "
                        "the DDIM step's bin) or noise_level (the sample's true noise level); METHOD.md §5")
    add_training_arguments(parser, "esd", needs_images=False)
    return parser


def _settings(cls: type[TrainingSettings], args: argparse.Namespace) -> TrainingSettings:
    """``cls`` with every field the flags set (``--no_progress`` -> progress=False)."""
    values: dict[str, Any] = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    values["progress"] = not args.no_progress
    values.pop("checkpoint", None)
    return cls(**values)


def request_from_args(args: argparse.Namespace, cls: type[TrainingSettings]) -> RunRequest:
    """The training run the flags describe (the concept default: the model world's first artist)."""
    concepts = getattr(args, "concepts", None) or ([args.prompt] if getattr(args, "prompt", None) else None)
    if concepts is None:
        prompts = world_from_config(read_config(Path(args.config_path or TOY_CONFIG))).class_prompts
        concepts = [prompts[1]]
    if args.device != "cpu":
        raise ValueError(
            f"--device {args.device} does not apply to training: processes and devices are chosen with "
            f"--accelerator/--devices (e.g. --accelerator cuda --devices 1)."
        )
    return RunRequest(
        concepts=tuple(concepts), settings=_settings(cls, args), config_path=args.config_path,
        ckpt_path=args.ckpt_path, use_ema=args.use_ema, protect=tuple(getattr(args, "protect", ())),
        output_dir=args.output_dir, overwrite=args.overwrite, data_dir=getattr(args, "data_dir", None),
        report=not args.no_report, cache_dir=getattr(args, "cache_dir", None), precision=args.precision,
    )


def train_main(parser: argparse.ArgumentParser, cls: type[TrainingSettings]) -> None:
    """A training script: parse, start the processes, run ``run_training`` in each."""
    args = parser.parse_args()

    def main() -> None:
        request = request_from_args(args, cls)
        request.validate()
        fabric = make_fabric(fabric_options_from_args(args))
        fabric.launch(run_training, request)

    run_script(main)
