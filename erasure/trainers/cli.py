"""What the training scripts share: flags, output names, and one driver per method.

``launch(run, args)`` starts the processes with Lightning Fabric and calls ``run(fabric, args)``
in each; ``run_sepce`` / ``run_cie`` / ``run_esd`` load the model on every rank, prepare the
training images (generated once by the original model when ``--data_dir`` is not given),
train, and let rank 0 write the result and print ONE JSON line: per concept the steps run, why
it stopped and the final momentum, the training seconds, the files written and the total
seconds (loading, images, training, writing).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_fabric import Fabric
from torch import nn

from erasure.bases import (
    BLANK_PROMPT,
    DEFAULT_MIN_DIMS,
    DEFAULT_RTOL,
    compute_bases,
    normalise_prompt,
)
from erasure.classes import class_mapping
from erasure.files import check_writable
from erasure.increments import save_increment, slugify
from erasure.loading import add_model_arguments, load_model
from erasure.sampling import sampling_settings
from erasure.toy.oracle import load_oracle
from erasure.toy.world import ARTISTS, CLASS_NAMES, NUM_CLASSES, class_prompt
from erasure.trainers import cie, esd, sepce
from erasure.trainers.data import concept_latents, default_data_dir, ensure_generated
from erasure.trainers.loop import ConceptTrainer, TrainingConfig
from erasure.trainers.report import before_after_report, markdown_table, report_paths
from erasure.trainers.runtime import (
    TrainingSetupError,
    add_fabric_arguments,
    fabric_options_from_args,
    make_fabric,
)
from erasure.trainers.weights import WeightTrainer
from erasure.weight_differences import save_weight_difference

DEFAULT_NUM_IMAGES = 100
DEFAULT_OUTPUT_DIR = "outputs"
CHECKPOINT_SUFFIX = ".checkpoint.safetensors"


def format_number(value: float) -> str:
    """Short, file-name-safe numbers: 0.1 -> "0.1", 0.001 -> "1e-3", 3 -> "3"."""
    if value != 0 and not 1e-2 <= abs(value) < 1e4:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}"


def output_name(method: str, concept_slug: str, hyperparameters: dict[str, float]) -> str:
    """``{method}-{concept}-{key}_{value}-...`` (e.g. ``sepce-van_gogh-lr_0.1-beta_1e-4-lam_1e-6-tau_1e-4``)."""
    parts = [method, concept_slug, *(f"{key}_{format_number(value)}" for key, value in hyperparameters.items())]
    return "-".join(parts)


def add_training_arguments(
    parser: argparse.ArgumentParser, lr_help: str, iterations: int, needs_images: bool = True
) -> argparse.ArgumentParser:
    """Loader, Fabric and loop flags shared by every training script (defaults: METHOD.md's)."""
    add_model_arguments(parser)
    add_fabric_arguments(parser)
    group = parser.add_argument_group("training")
    group.add_argument("--lr", type=float, default=None, help=lr_help)
    group.add_argument("--iterations", type=int, default=iterations, help=f"step limit per concept (default: {iterations})")
    group.add_argument("--batch_size", type=int, default=1, help="GLOBAL batch per step, split over processes (default: 1)")
    group.add_argument("--seed", type=int, default=0, help="seed of every step's draws (default: 0)")
    group.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help=f"where results go (default: {DEFAULT_OUTPUT_DIR}/)")
    group.add_argument("--overwrite", action="store_true", help="replace existing outputs and start a fresh checkpoint")
    group.add_argument("--resume", action="store_true", help="continue from this run's checkpoint in --output_dir")
    group.add_argument("--save_every", type=int, default=100, help="checkpoint every K steps; 0: never (default: 100)")
    group.add_argument("--no_progress", action="store_true", help="no progress bar")
    if needs_images:
        data = parser.add_argument_group("training images (made by the original model)")
        data.add_argument(
            "--data_dir",
            default=None,
            help="folder with {data_dir}/{concept_slug}/*.png; default: generate --num_images per concept into "
            "data/generated/<model fingerprint>/ once and reuse them",
        )
        data.add_argument(
            "--num_images", type=int, default=DEFAULT_NUM_IMAGES,
            help=f"images to generate per concept when --data_dir is not given (default: {DEFAULT_NUM_IMAGES})",
        )
    return parser


def add_stopping_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("momentum stop (METHOD.md §1)")
    group.add_argument("--alpha", type=float, default=0.9, help="momentum of L_dir (default: 0.9)")
    group.add_argument("--tau", type=float, default=1e-4, help="stop when the momentum <= tau (default: 1e-4)")
    group.add_argument("--warmup", type=int, default=10, help="steps before the stop rule applies (default: 10)")


def training_config(args: argparse.Namespace, checkpoint_path: Path, lr: float) -> TrainingConfig:
    return TrainingConfig(
        lr=lr,
        iterations=args.iterations,
        batch_size=args.batch_size,
        seed=args.seed,
        alpha=getattr(args, "alpha", 0.9),
        tau=getattr(args, "tau", 1e-4),
        warmup=getattr(args, "warmup", 10),
        save_every=args.save_every,
        checkpoint_path=checkpoint_path,
        resume=args.resume,
        progress=not args.no_progress,
    )


def launch(run: Callable[[Fabric, argparse.Namespace], Any], args: argparse.Namespace) -> Any:
    """Start the processes asked for by the Fabric flags and call ``run(fabric, args)`` in each."""
    fabric = make_fabric(fabric_options_from_args(args))
    return fabric.launch(run, args)


def main(run: Callable[[Fabric, argparse.Namespace], Any], parser: argparse.ArgumentParser) -> None:
    """Script entry point: parse, launch, and turn the project's input errors into one message."""
    args = parser.parse_args()
    try:
        launch(run, args)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:  # this project's input errors
        parser.exit(2, f"{parser.prog}: error: {error}\n")


class RunContext:
    """One rank's view of a training run: the model, where things go, how to talk."""

    def __init__(self, fabric: Fabric, args: argparse.Namespace) -> None:
        if args.device != "cpu":
            raise TrainingSetupError(
                f"--device {args.device} does not apply to training: processes and devices are chosen with "
                f"--accelerator/--devices (e.g. --accelerator cuda --devices 1)."
            )
        self.started = time.perf_counter()
        self.fabric = fabric
        self.args = args
        self.rank = fabric.global_rank
        self.output_dir = Path(args.output_dir)
        self.model: nn.Module | None = None

    def load(self) -> nn.Module:
        """Load the base model on CPU and move it to this process's device."""
        args = self.args
        self.model = load_model(args.config_path, args.ckpt_path, "cpu", args.use_ema, verbose=self.rank == 0)
        self.model.to(self.fabric.device)
        self.say(f"Training on {self.fabric.device} in {self.fabric.world_size} process(es).")
        return self.model

    def say(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def prepare_outputs(self, outputs: Sequence[Path], checkpoint: Path, extra: Sequence[Path] = ()) -> None:
        """Refuse existing outputs (unless --overwrite) and a stale checkpoint (unless --resume/--overwrite)."""
        for path in outputs:
            check_writable(path, self.args.overwrite)
        for path in extra:
            if path.exists() and not self.args.overwrite:
                raise TrainingSetupError(f"Output file {path} already exists; pass --overwrite to replace it.")
        if self.args.resume and not checkpoint.is_file():
            raise TrainingSetupError(f"--resume: there is no checkpoint {checkpoint}; run without --resume.")
        stale = checkpoint.exists() and not self.args.resume
        if stale and not self.args.overwrite:
            raise TrainingSetupError(
                f"A checkpoint of this run exists ({checkpoint}); pass --resume to continue it or --overwrite to "
                f"start again."
            )
        self.fabric.barrier()  # every rank has looked before rank 0 removes the stale checkpoint
        if stale and self.rank == 0:
            checkpoint.unlink()
        self.fabric.barrier()

    def latents(self, concepts: Sequence[str]) -> dict:
        """Training latents of ``concepts``: from --data_dir, or generated once and reused."""
        if self.args.data_dir is not None:
            return concept_latents(self.model, Path(self.args.data_dir), concepts)
        data_dir = default_data_dir(self.model)
        ensure_generated(
            self.model, concepts, data_dir, self.args.num_images, sampling_settings(self.model), seed=0,
            rank=self.rank, world_size=self.fabric.world_size, barrier=self.fabric.barrier, announce=self.say,
        )
        return concept_latents(self.model, data_dir, concepts, limit=self.args.num_images)

    def finish(self, trainer: ConceptTrainer, written: Callable[[], list[Path]]) -> dict[str, Any]:
        """Train, let rank 0 write the results (then drop the run's checkpoint, whose job is done)
        and print the summary line; returns the summary."""
        summary = trainer.fit()
        if self.rank == 0:
            summary["outputs"] = [str(path) for path in written()]
            checkpoint = trainer.config.checkpoint_path
            if checkpoint is not None:
                checkpoint.unlink(missing_ok=True)
            summary["total_seconds"] = round(time.perf_counter() - self.started, 2)
            print(json.dumps(summary, default=_json_number), flush=True)
        self.fabric.barrier()
        return summary


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---------------------------------------------------------------------------------- SepCE
def sepce_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="SepCE: one separable increment per concept (METHOD.md §2).")
    parser.add_argument(
        "--concepts", nargs="+", default=[ARTISTS[0]], help=f"concepts to erase (default: the toy artist {ARTISTS[0]!r})"
    )
    parser.add_argument("--mode", choices=("joint", "sequential"), default="joint", help="train together or one by one")
    parser.add_argument("--protect", nargs="*", default=[], help="extra prompts every increment must leave unchanged")
    parser.add_argument(
        "--protect_classes", action=argparse.BooleanOptionalAction, default=None,
        help="also protect the model's other evaluation classes (METHOD.md §4: the other artists) -- the 'known "
        "concepts' of §2. Default: on for the embedded toy model (9 artists x 15 tokens fit its null space), off "
        "for SD (about 76 rows per prompt at width 768 leave room for only a handful)",
    )
    parser.add_argument("--beta", type=float, default=sepce.DEFAULT_BETA, help="increment scale (default: 1e-4)")
    parser.add_argument("--lam", type=float, default=sepce.DEFAULT_LAMBDA, help="L1 weight lambda (default: 1e-6)")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="null-space rank tolerance (default: 1e-6)")
    parser.add_argument("--min_dims", type=int, default=DEFAULT_MIN_DIMS, help=f"smallest usable null space (default: {DEFAULT_MIN_DIMS})")
    parser.add_argument(
        "--no_report", action="store_true",
        help="skip the before/after grid and oracle accuracy table written when the embedded toy model is used",
    )
    add_stopping_arguments(parser)
    return add_training_arguments(parser, lr_help=_lr_help("sepce"), iterations=1000)


@dataclass(frozen=True)
class LearningRates:
    """A method's default Adam learning rate: METHOD.md's reference (SD) and the toy model's."""

    reference: float
    toy: float


#: Default learning rates per method (``--lr`` overrides them). The toy values are measured on the
#: shipped toy model, erasing vela quorin with the other defaults (oracle, 20 samples): at the SD
#: reference values the artist is not erased (SepCE at 0.1: momentum still 0.13 after 1000 steps;
#: CiE at 1e-5 stops by the momentum rule at step 421 with the artist at 0.80); at the toy values
#: it is gone (<= 0.20) after about 630 (SepCE), 60 (CiE) and 50 (ESD-x) steps.
DEFAULT_LRS: dict[str, LearningRates] = {
    "sepce": LearningRates(reference=sepce.DEFAULT_LR, toy=1.0),
    "cie": LearningRates(reference=cie.DEFAULT_LR, toy=1e-4),
    "esd": LearningRates(reference=esd.DEFAULT_LR, toy=1e-4),
}


def default_lr(method: str, toy: bool) -> float:
    """The default learning rate of ``method`` (a DEFAULT_LRS key) on the toy model or on SD."""
    rates = DEFAULT_LRS[method]
    return rates.toy if toy else rates.reference


def method_lr(method: str, args: argparse.Namespace) -> float:
    """--lr, or the method's default for the model the flags name."""
    return args.lr if args.lr is not None else default_lr(method, uses_toy_model(args))


def _lr_help(method: str) -> str:
    rates = DEFAULT_LRS[method]
    return f"Adam learning rate (default: METHOD.md's {rates.reference:g}; {rates.toy:g} on the embedded toy model)"


def sepce_names(args: argparse.Namespace) -> tuple[dict[str, Path], Path]:
    """Increment file per concept and the run's stem (checkpoint, report files)."""
    method = "sepce" if args.mode == "joint" else "sepce_seq"
    hyper = {"lr": method_lr("sepce", args), "beta": args.beta, "lam": args.lam, "tau": args.tau}
    output_dir = Path(args.output_dir)
    files = {c: output_dir / f"{output_name(method, slugify(c), hyper)}.safetensors" for c in args.concepts}
    return files, output_dir / output_name(method, "+".join(slugify(c) for c in args.concepts), hyper)


def run_sepce(fabric: Fabric, args: argparse.Namespace) -> dict[str, Any]:
    context = RunContext(fabric, args)
    files, stem = sepce_names(args)
    report = uses_toy_model(args) and not args.no_report
    context.prepare_outputs(
        list(files.values()), stem.with_name(stem.name + CHECKPOINT_SUFFIX), report_paths(stem) if report else ()
    )
    model = context.load()
    classes = class_prompts_to_protect(model, args)
    if classes:
        context.say(f"Also protecting the model's other classes {classes} (--no-protect_classes turns this off).")
    protected = [*args.protect, *classes]
    bases = compute_bases(
        model, args.concepts, protected, rtol=args.rtol, min_dims=args.min_dims, sequential=args.mode == "sequential"
    )
    for concept, basis in bases.items():
        context.say(f"Basis of {concept!r}: {basis.dims} dimensions, protects {len(basis.protected_prompts)} prompts.")
    latents = context.latents(args.concepts)
    config = training_config(args, stem.with_name(stem.name + CHECKPOINT_SUFFIX), method_lr("sepce", args))
    trainer = sepce.SepCETrainer(
        model, fabric, bases, latents, config, args.beta, args.lam, sequential=args.mode == "sequential",
    )

    def write() -> list[Path]:
        increments = trainer.increments()
        written = [save_increment(increments[c], files[c], overwrite=args.overwrite) for c in args.concepts]
        return written + (toy_report(context, stem) if report else [])

    return context.finish(trainer, write)


def class_prompts_to_protect(model: nn.Module, args: argparse.Namespace) -> list[str]:
    """The other evaluation classes' prompts when --protect_classes is on (by default: on the toy model)."""
    enabled = uses_toy_model(args) if args.protect_classes is None else args.protect_classes
    if not enabled:
        return []
    taken = {normalise_prompt(p) for p in [*args.concepts, *args.protect, BLANK_PROMPT]}
    return [p for p in class_mapping(model).prompts if normalise_prompt(p) not in taken]


def uses_toy_model(args: argparse.Namespace) -> bool:
    return args.config_path is None and args.ckpt_path is None


def toy_report(context: RunContext, stem: Path) -> list[Path]:
    """The quick start's evidence: before/after grid and the toy oracle's accuracy per class."""
    oracle = load_oracle(device=context.fabric.device)
    report = before_after_report(
        context.model,
        [class_prompt(label) for label in range(NUM_CLASSES)],
        CLASS_NAMES,
        context.args.concepts,
        lambda images: oracle.predict(images * 2 - 1)["artist"],
        stem,
    )
    context.say(markdown_table(report))
    return list(report_paths(stem))


# ---------------------------------------------------------------------------------- CiE and ESD
def cie_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="CiE: train every attn2 weight to erase one concept (METHOD.md §1).")
    parser.add_argument("--prompt", default=ARTISTS[0], help=f"the concept to erase (default: the toy artist {ARTISTS[0]!r})")
    parser.add_argument("--lam", type=float, default=cie.DEFAULT_LAMBDA, help="L1 weight lambda (1e-6 .. 3e-5)")
    add_stopping_arguments(parser)
    return add_training_arguments(parser, lr_help=_lr_help("cie"), iterations=1000)


def _stem_paths(context: RunContext, stem: str) -> tuple[Path, Path]:
    """The result file and the checkpoint of a one-file run."""
    return context.output_dir / f"{stem}.safetensors", context.output_dir / f"{stem}{CHECKPOINT_SUFFIX}"


def _finish_with_difference(context: RunContext, trainer: WeightTrainer, output: Path) -> dict[str, Any]:
    return context.finish(
        trainer, lambda: [save_weight_difference(trainer.difference(), output, overwrite=context.args.overwrite)]
    )


def cie_stem(args: argparse.Namespace) -> str:
    """The name of a CiE run's result file (without suffix): method, concept, hyper-parameters."""
    return output_name("cie", slugify(args.prompt), {"lr": method_lr("cie", args), "lam": args.lam, "tau": args.tau})


def run_cie(fabric: Fabric, args: argparse.Namespace) -> dict[str, Any]:
    context = RunContext(fabric, args)
    output, checkpoint = _stem_paths(context, cie_stem(args))
    context.prepare_outputs([output], checkpoint)
    model = context.load()
    latents = context.latents([args.prompt])[args.prompt]
    config = training_config(args, checkpoint, method_lr("cie", args))
    trainer = cie.CiETrainer(model, fabric, args.prompt, latents, config, args.lam)
    return _finish_with_difference(context, trainer, output)


def esd_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="ESD baseline: ESD-x (attn2) or ESD-u (non-attn2) (METHOD.md §5).")
    parser.add_argument("--prompt", default=ARTISTS[0], help=f"the concept to erase (default: the toy artist {ARTISTS[0]!r})")
    parser.add_argument("--train_method", choices=tuple(esd.TRAINED_SETS), default="xattn",
                        help="xattn: ESD-x (attn2 weights); noxattn: ESD-u (every other UNet weight)")
    parser.add_argument("--ddim_steps", type=int, default=esd.DEFAULT_DDIM_STEPS, help="DDIM steps of the partial sample")
    parser.add_argument("--start_guidance", type=float, default=esd.DEFAULT_START_GUIDANCE, help="guidance of the partial sample")
    parser.add_argument("--negative_guidance", type=float, default=esd.DEFAULT_NEGATIVE_GUIDANCE, help="eta of the ESD target")
    return add_training_arguments(parser, lr_help=_lr_help("esd"), iterations=1000, needs_images=False)


def esd_stem(args: argparse.Namespace) -> str:
    """The name of an ESD run's result file (without suffix): method, concept, hyper-parameters."""
    hyper = {"lr": method_lr("esd", args), "iter": args.iterations, "sg": args.start_guidance,
             "ng": args.negative_guidance}
    return output_name(esd.METHOD_NAMES[args.train_method], slugify(args.prompt), hyper)


def run_esd(fabric: Fabric, args: argparse.Namespace) -> dict[str, Any]:
    context = RunContext(fabric, args)
    output, checkpoint = _stem_paths(context, esd_stem(args))
    context.prepare_outputs([output], checkpoint)
    config = training_config(args, checkpoint, method_lr("esd", args))
    trainer = esd.ESDTrainer(
        context.load(), fabric, args.prompt, config,
        args.train_method, args.ddim_steps, args.start_guidance, args.negative_guidance,
    )
    return _finish_with_difference(context, trainer, output)
