"""What every benchmark shares: side-by-side timing, peak memory in a fresh process, the models
the benchmarks run on, one training step of a trainer, and the output (a table, then one JSON line).

Timing. These machines are shared and noisy, so no absolute time is a result: the variants of a
benchmark run interleaved in one process (repeat r runs them in an order rotated by r, after one
untimed warm-up each), and each variant is reported by its median and by the median over repeats
of its time divided by the baseline's time in the same repeat.

Peak memory. Each variant runs alone in its own process, twice: the first run pages in library
code and lazily initialised kernels (about 100 MiB on CPU, the same for every variant, which
would dilute every ratio); then everything is freed and handed back to the OS (``malloc_trim``)
and the second run is measured. ``tracemalloc`` sees only Python's allocator, not the memory
behind torch tensors, so the CPU peak is the resident-set high-water mark (Linux ``VmHWM``,
reset through /proc/self/clear_refs) above the resident set when the measured run starts. On
CUDA it is ``torch.cuda.max_memory_allocated`` of the measured run. CPU processes are forked
from a parent that has built nothing yet; CUDA ones are spawned (CUDA does not survive a fork).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import multiprocessing
import os
import platform
import queue
import reprlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning_fabric import Fabric
from omegaconf import OmegaConf
from torch import nn

from erasure.bases import compute_bases
from erasure.cli import run_script
from erasure.errors import ErasureError
from erasure.loading import TOY_CKPT, TOY_REBUILD_COMMAND, load_model, resolve_device
from erasure.samplers import latent_shape
from erasure.toy.training import TextEncoderConfig, write_text_encoder_dir
from erasure.toy.world import ARTISTS
from erasure.settings import CiESettings, ESDSettings, SepCESettings, TrainingSettings, default_learning_rate
from erasure.trainers.cie import CiETrainer
from erasure.trainers.esd import ESDTrainer
from erasure.trainers.loop import ConceptTrainer
from erasure.trainers.sepce import SepCETrainer
from erasure.tables import markdown_table
from erasure.training import default_fabric
from ldm.modules.attention import BasicTransformerBlock
from ldm.modules.diffusionmodules.openaimodel import ResBlock
from ldm.util import instantiate_from_config

BENCH_DIR = Path(__file__).resolve().parent
CONFIG_DIR = BENCH_DIR / "configs"
#: Models a benchmark can run on: the shipped toy model, or an SD-shaped config of bench/configs/.
MODEL_NAMES = ("toy", "sd-mid", "sd-tiny")
MIB = 2**20
#: The concept every benchmark erases: the first toy artist (its words are in every bench tokenizer).
CONCEPT = ARTISTS[0]
#: Trainers by the name the benchmarks report them under.
METHODS = ("sepce", "cie", "esd_x", "esd_u")


def method_lr(method: str, model_name: str) -> float:
    """The training scripts' default learning rate of ``method`` (a METHODS name) on a bench model:
    the toy model's own on "toy", METHOD.md's reference on the SD-shaped ones."""
    return default_learning_rate("esd" if method.startswith("esd") else method, "toy" if model_name == "toy" else "sd")


class BenchError(ErasureError):
    """A benchmark cannot run as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------- arguments
def bench_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help shows the benchmark's module docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_arguments(parser: argparse.ArgumentParser, repeats: int | None) -> argparse.ArgumentParser:
    """``--quick --device --threads --seed`` and, unless ``repeats`` is None, ``--repeats``."""
    parser.add_argument("--quick", action="store_true", help="tiny sizes that finish in seconds (a smoke test)")
    if repeats is not None:
        parser.add_argument(
            "--repeats", type=int, default=repeats, help=f"timed repeats per variant (default: {repeats})"
        )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: 0)")
    return parser


def sized(value: Any, quick: bool, quick_value: Any, full_value: Any) -> Any:
    """A flag's value if given, else its ``--quick`` or full-size default (0 stays 0 and is refused later)."""
    if value is not None:
        return value
    return quick_value if quick else full_value


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``, check ``--repeats`` and resolve ``--device`` (one clear error if absent)."""
    if getattr(args, "repeats", 1) < 1:
        raise BenchError(f"--repeats must be >= 1, got {args.repeats}.")
    if args.threads is not None:
        if args.threads < 1:
            raise BenchError(f"--threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def run_main(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Parse and run through ``erasure.cli.run_script``: an input error is one line and exit status 2."""
    args = parser.parse_args()
    run_script(lambda: main(args))


# ---------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    variants: Mapping[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    prepare: Mapping[str, Callable[[], None]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every variant, ``repeats`` values each, measured interleaved.

    ``prepare[name]`` (untimed) runs before each timed call of ``name``, e.g. to put a shared
    model into that variant's state. One untimed warm-up call per variant comes first.
    """
    names = list(variants)
    prepare = prepare or {}

    def timed(name: str) -> float:
        if name in prepare:
            prepare[name]()
        synchronize(device)
        started = time.perf_counter()
        variants[name]()
        synchronize(device)
        return time.perf_counter() - started

    for name in names:
        timed(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(name))
    return times


def timing_summary(times: Mapping[str, Sequence[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Median and minimum seconds per variant and the median paired ratio to ``baseline``."""
    summary = {}
    for name, values in times.items():
        ratios = [value / base for value, base in zip(values, times[baseline])]
        summary[name] = {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "ratio": statistics.median(ratios),
        }
    return summary


# ---------------------------------------------------------------------------------- processes and memory
def _resident_mib() -> tuple[float, float]:
    """(current, high-water mark) resident set of this process, MiB, from /proc/self/status."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def _free_memory_and_reset_peak(device: torch.device) -> None:
    """Collect garbage, hand freed heap back to the OS and restart the peak counter."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")  # Linux >= 4.0: reset VmHWM to the current resident set


def _measured_run(function: Callable[..., Any], args: tuple[Any, ...], device_name: str) -> tuple[dict[str, Any], Any]:
    """Warm-up run, free everything, then the measured run: (peak record, its result)."""
    device = torch.device(device_name)
    function(*args)
    _free_memory_and_reset_peak(device)
    if device.type == "cuda":
        result = function(*args)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / MIB
        return {"peak_mib": peak, "memory": "cuda max_memory_allocated"}, result
    start, _ = _resident_mib()
    result = function(*args)
    _, peak = _resident_mib()
    return {"peak_mib": peak - start, "memory": "resident set (VmHWM) above start"}, result


def _child(function: Callable[..., Any], args: tuple[Any, ...], results: multiprocessing.Queue) -> None:
    try:
        results.put(("ok", function(*args)))
    except BaseException as error:  # reported to the parent, which raises it with the function's name
        results.put(("error", f"{type(error).__name__}: {error}"))


def run_in_process(
    function: Callable[..., Any], args: tuple[Any, ...], device: torch.device, timeout: float | None = None
) -> Any:
    """``function(*args)`` in a fresh process (forked on CPU, spawned with CUDA); its result.

    The result must be picklable, and with CUDA (spawn) ``function`` importable. After ``timeout``
    seconds the process is killed and ``TimeoutError`` raised.
    """
    context = multiprocessing.get_context("spawn" if device.type == "cuda" else "fork")
    results = context.Queue()
    process = context.Process(target=_child, args=(function, args, results), daemon=True)
    process.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    name = f"{getattr(function, '__name__', function)}{reprlib.repr(args)}"
    while True:
        wait = 1.0 if deadline is None else min(1.0, max(deadline - time.monotonic(), 0.0))
        try:
            status, payload = results.get(timeout=wait)
            break
        except queue.Empty:
            if not process.is_alive():
                raise BenchError(f"{name} died in its process (exit code {process.exitcode}); out of memory?") from None
            if deadline is not None and time.monotonic() > deadline:
                process.kill()
                process.join()
                raise TimeoutError(f"{name} did not finish within {timeout:g} s") from None
    process.join()
    if status != "ok":
        raise BenchError(f"{name} failed in its process: {payload}")
    return payload


def peak_memory(
    function: Callable[..., Any], args: tuple[Any, ...], device: torch.device
) -> tuple[dict[str, Any], Any]:
    """Peak memory of ``function(*args)`` run alone in a fresh process (module docstring): the
    record {"peak_mib", "memory"} and the function's result. Call it before building any model."""
    if device.type == "cpu" and not (Path("/proc/self/clear_refs").exists() and ctypes.util.find_library("c")):
        raise BenchError("CPU peak memory needs Linux (/proc/self/clear_refs) and its C library; pass --no_memory.")
    return run_in_process(_measured_run, (function, args, str(device)), device)


# ---------------------------------------------------------------------------------- models
def require_models(names: Sequence[str]) -> None:
    """Fail before any work when a named model cannot be built (the toy model is not trained yet)."""
    unknown = [name for name in names if name not in MODEL_NAMES]
    if unknown:
        raise BenchError(f"Unknown model(s) {unknown}; choose from {', '.join(MODEL_NAMES)}.")
    if "toy" in names and not TOY_CKPT.is_file():
        raise BenchError(
            f"The toy model {TOY_CKPT} does not exist yet; train it first with `{TOY_REBUILD_COMMAND}`."
        )


def build_model(name: str, device: torch.device, checkpointing: bool | None = None) -> nn.Module:
    """A frozen LatentDiffusion in eval mode on ``device``.

    ``toy``: the shipped toy model (models/toy/; the loader says how to rebuild it when missing).
    ``sd-mid`` / ``sd-tiny``: bench/configs/<name>.yaml with random weights (seeded by the caller's
    ``torch.manual_seed``); its text-encoder directory is written to a temporary folder.
    ``checkpointing``, when given, overrides the UNet's activation checkpointing (its config's
    ``use_checkpoint``; SD v1.4's v1-inference.yaml sets it, the bench configs do not).
    """
    require_models([name])
    if name == "toy":
        model = load_model(None, None, device=str(device), verbose=False)
    else:
        model = build_random_model(name, device)
    if checkpointing is not None:
        set_unet_checkpointing(model, checkpointing)
    return model


def build_random_model(name: str, device: torch.device) -> nn.Module:
    """bench/configs/<name>.yaml with random weights, frozen, in eval mode on ``device``."""
    config = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    text = TextEncoderConfig(**OmegaConf.to_container(config.bench.text_encoder))
    with tempfile.TemporaryDirectory(prefix="bench-clip-") as directory:
        write_text_encoder_dir(directory, text, int(config.model.params.cond_stage_config.params.max_length))
        config.model.params.cond_stage_config.params.version = directory
        model = instantiate_from_config(config.model)
    reset_zero_initialised(model)
    model.ldm_config = config
    return model.eval().requires_grad_(False).to(device)


def set_unet_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Switch activation checkpointing of every ResBlock and transformer block of the UNet, as
    ``use_checkpoint`` in the config would have."""
    for module in model.model.diffusion_model.modules():
        if isinstance(module, ResBlock):
            module.use_checkpoint = enabled
        elif isinstance(module, BasicTransformerBlock):
            module.checkpoint = enabled


def reset_zero_initialised(model: nn.Module) -> None:
    """Give the layers SD initialises to zero (UNet ``out``, ResBlock ``out_layers``, ``proj_out``)
    torch's default initialisation. With them at zero a random model ignores its text, so the
    concept and blank predictions coincide and the erasure losses are undefined."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear) and not module.weight.any():
            module.reset_parameters()


def make_fabric(device: torch.device) -> Fabric:
    """A one-process Fabric on ``device`` (the trainers' runtime)."""
    return default_fabric(device)


def random_latents(model: nn.Module, count: int, seed: int) -> torch.Tensor:
    """``count`` standard-normal latents of the model's shape, on its device (stand-ins for the
    encoded training images: a step's cost does not depend on what the images show)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((count, *latent_shape(model)), generator=generator).to(model.betas.device)


def bench_settings(
    method: str, model_name: str, seed: int, iterations: int = 10**9, tau: float = -1e30, lam: float = 0.0,
    ddim_steps: int = 50,
) -> TrainingSettings:
    """Settings of ``method`` (a ``METHODS`` name) for stepping its trainer by hand: the scripts' learning
    rate on ``model_name``, no checkpoints or progress bar, by default never stopping on its own; ``lam`` is
    the L1 weight of SepCE and CiE (0: the term's cost is the same for every variant)."""
    common = {"lr": method_lr(method, model_name), "iterations": iterations, "tau": tau, "seed": seed,
              "save_every": 0, "progress": False}
    if method.startswith("sepce"):
        return SepCESettings(**common, lam=lam, min_dims=1)
    if method == "cie":
        return CiESettings(**common, lam=lam)
    if method in ("esd_x", "esd_u"):
        return ESDSettings(**common, train_method="xattn" if method == "esd_x" else "noxattn", ddim_steps=ddim_steps)
    raise BenchError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")


def make_trainer(
    method: str,
    model: nn.Module,
    fabric: Fabric,
    latents: torch.Tensor,
    settings: TrainingSettings,
    protected: Sequence[str] = (),
) -> ConceptTrainer:
    """The library's trainer of ``method`` (a ``METHODS`` name) erasing ``CONCEPT`` from ``model``.

    SepCE gets the basis protecting "" and ``protected`` (``compute_bases``); SepCE and CiE train on ``latents``.
    """
    if method == "sepce":
        bases = compute_bases(model, [CONCEPT], list(protected), min_dims=1)
        return SepCETrainer(model, fabric, bases, {CONCEPT: latents}, settings)
    if method == "cie":
        return CiETrainer(model, fabric, CONCEPT, latents, settings)
    if method in ("esd_x", "esd_u"):
        return ESDTrainer(model, fabric, CONCEPT, settings)
    raise BenchError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")


# ---------------------------------------------------------------------------------- output
def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def progress(message: str) -> None:
    """One line on stderr while a benchmark runs (stdout holds only the table and the JSON line)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def print_table(title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """A Markdown table of ``rows`` (missing cells blank), under ``title``."""
    print(f"\n{title}")
    print(markdown_table(columns, [[row.get(column, "") for column in columns] for row in rows]))


def print_json(bench: str, args: argparse.Namespace, device: torch.device, results: Mapping[str, Any]) -> None:
    """The benchmark's last line: one JSON object with its name, settings, machine and results."""
    record = {
        "bench": bench,
        "quick": bool(args.quick),
        "settings": {key: value for key, value in vars(args).items() if key != "quick"},
        "machine": machine_info(device),
        **results,
    }
    print(json.dumps(record, default=str), flush=True)
