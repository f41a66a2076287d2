"""A training run with files: what ``train-sepce.py``, ``train-cie.py`` and ``train-esd.py`` do
around the API call.

``run_training(fabric, request)`` runs in every process: before loading anything it checks every
output (not present unless --overwrite, its folder writable or creatable, the image cache too),
takes the run's lock ``{stem}.lock`` (one run per output stem; a killed run's lock is taken over)
and removes temporary files that killed saves left in the output folder, and checks the free space
the results and checkpoints need (from the config's UNet shapes on ``meta``); then it loads the
model and calls ``train_sepce`` / ``train_cie`` /
``train_esd`` with a checkpoint next to the outputs (``--resume`` continues a killed run to the
same result), lets rank 0 write the result files (and, for a world with a classifier, the
before/after report), removes the checkpoint and prints ONE JSON line: per concept the steps run,
why it stopped and the final momentum, the training seconds, the files written, the total
seconds.

Run names hold the method, the concept, the main hyper-parameters, the seed and an 8-digit digest
of every other setting that decides the result (``run_record``): two different runs never share a
result file, checkpoint or lock; the files' JSON headers record the settings in full.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lightning_fabric import Fabric

from erasure.edits import Edit
from erasure.errors import ErasureError
from erasure.files import check_folder_writable, check_free_space, check_writable, remove_stale_temporaries, run_lock
from erasure.images import list_images
from erasure.increments import check_distinct_names, cross_attention_kv, slugify
from erasure.loading import TOY_CONFIG, load_model, unet_on_meta
from erasure.settings import CiESettings, ESDSettings, SepCESettings, TrainingSettings
from erasure.trainers.data import concept_folder, generated_root
from erasure.trainers.esd import TRAINED_SETS
from erasure.trainers.report import before_after_report, report_paths
from erasure.trainers.runtime import TrainingSetupError
from erasure.trainers.weights import cross_attention_parameters
from erasure.training import train_cie, train_esd, train_sepce
from erasure.worlds import world_from_config_file

CHECKPOINT_SUFFIX = ".checkpoint.safetensors"
#: Copies of the trained tensors a checkpoint holds (values, Adam's two moments), and checkpoints on
#: disk at once while one is replaced (the old one and the new temporary file).
CHECKPOINT_COPIES = 3 * 2
#: Room for the report (grid PNG, accuracy JSON) and file headers.
REPORT_BYTES = 16 * 2**20


@dataclass(frozen=True)
class RunRequest:
    """Everything a training run needs: the model files, the method's settings, where results go."""

    concepts: tuple[str, ...]
    settings: TrainingSettings
    config_path: str | None = None
    ckpt_path: str | None = None
    use_ema: bool = False
    protect: tuple[str, ...] = ()
    output_dir: Path = Path("outputs")
    overwrite: bool = False
    data_dir: Path | None = None
    report: bool = True
    cache_dir: Path | None = None
    precision: str = "32-true"

    def validate(self) -> None:
        """Check the settings as the run uses them: ``resume`` continues the checkpoint the run names."""
        replace(self.settings, resume=False).validate()

    @property
    def method(self) -> str:
        """The name results are recorded and named under (sepce, sepce_seq, cie, esd_x, esd_u)."""
        settings = self.settings
        if isinstance(settings, SepCESettings):
            return "sepce" if settings.mode == "joint" else "sepce_seq"
        if isinstance(settings, ESDSettings):
            return settings.method
        return "cie"


def format_number(value: float) -> str:
    """Short, file-name-safe numbers: 0.1 -> "0.1", 0.001 -> "1e-3", 3 -> "3" (nan, inf as they are)."""
    if not math.isfinite(value):
        return str(value)
    if value != 0 and not 1e-2 <= abs(value) < 1e4:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}"


def output_name(method: str, concept_slug: str, hyperparameters: dict[str, float]) -> str:
    """``{method}-{concept}-{key}_{value}-...`` (e.g. ``sepce-van_gogh-lr_0.1-beta_1e-4-lam_1e-6-tau_1e-4``)."""
    parts = [method, concept_slug, *(f"{key}_{format_number(value)}" for key, value in hyperparameters.items())]
    return "-".join(parts)


def _hyperparameters(settings: TrainingSettings) -> dict[str, float]:
    """The settings a run's file names show (``lr`` already resolved)."""
    if isinstance(settings, SepCESettings) and settings.solver == "closed_form":
        shown = {"mu": settings.mu}  # no optimiser: lr, lam and tau play no part
    elif isinstance(settings, SepCESettings):
        shown = {"lr": settings.lr, "beta": settings.beta, "lam": settings.lam, **_stop(settings)}
        if settings.solver == "closed_form+cie":
            shown["mu"] = settings.mu
    elif isinstance(settings, ESDSettings):
        shown = {"lr": settings.lr, "iter": settings.iterations, "sg": settings.start_guidance,
                 "ng": settings.negative_guidance}
    else:
        shown = {"lr": settings.lr, "lam": settings.lam, **_stop(settings)}
    return {**shown, "seed": settings.seed}


def _stop(settings: TrainingSettings) -> dict[str, float]:
    """``taurel_<tau>`` for the relative stop, ``tau_<tau>`` for the absolute one (METHOD.md §1)."""
    return {"taurel" if settings.stop == "relative" else "tau": settings.stop_tau}


def _resolved(path: str | Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def run_record(request: RunRequest, lr: float) -> dict[str, Any]:
    """Everything that decides a run's result: method, concepts, settings, protected prompts, model
    files, training images and precision (the devices do not: METHOD.md's global batch is split)."""
    return {
        "method": request.method,
        "concepts": list(request.concepts),
        "settings": replace(request.settings, lr=lr).result_settings(),
        "protect": list(request.protect),
        "config_path": _resolved(request.config_path),
        "ckpt_path": _resolved(request.ckpt_path),
        "use_ema": request.use_ema,
        "data_dir": _resolved(request.data_dir),
        "precision": request.precision,
    }


def result_files(request: RunRequest, lr: float) -> tuple[dict[str, Path], Path]:
    """The result file of every concept and the run's stem (checkpoint, lock and report files)."""
    hyper = _hyperparameters(replace(request.settings, lr=lr))
    method = request.method
    if isinstance(request.settings, SepCESettings) and request.settings.solver != "cie":
        method = f"{method}_{request.settings.solver.replace('+', '_')}"  # sepce_closed_form, sepce_closed_form_cie
    record = json.dumps(run_record(request, lr), sort_keys=True, default=str)
    digest = hashlib.sha256(record.encode()).hexdigest()[:8]
    files = {
        concept: request.output_dir / f"{output_name(method, slugify(concept), hyper)}-{digest}.safetensors"
        for concept in request.concepts
    }
    joined = "+".join(slugify(concept) for concept in request.concepts)
    return files, request.output_dir / f"{output_name(method, joined, hyper)}-{digest}"


def default_lr(request: RunRequest, world: str) -> float:
    """``request.settings.lr``, or its method's default for a model of ``world``."""
    return request.settings.with_lr(request.settings.method_family, world).lr


def check_inputs_and_outputs(outputs: Sequence[Path], request: RunRequest) -> None:
    """Everything about files that can be checked before the model is loaded: the outputs (absent
    unless overwrite, folders writable or creatable), the image cache, the training-image folders."""
    check_distinct_names(request.concepts)
    if not isinstance(request.settings, SepCESettings) and len(request.concepts) != 1:
        raise TrainingSetupError(f"{request.method} erases one concept per run; got {list(request.concepts)}.")
    check_folder_writable(request.output_dir)
    for path in outputs:
        check_writable(path, request.overwrite)
    if isinstance(request.settings, ESDSettings):
        return
    if request.data_dir is None:
        check_folder_writable(generated_root(request.cache_dir), "Image cache folder (--cache_dir)")
    else:
        for concept in request.concepts:
            list_images(concept_folder(request.data_dir, concept))


@contextmanager
def output_lock(fabric: Fabric, stem: Path) -> Iterator[None]:
    """Rank 0 holds ``{stem}.lock`` for the block; every rank stops with rank 0's error if it cannot."""
    with ExitStack() as stack:
        refusal = ""
        if fabric.global_rank == 0:
            try:
                stack.enter_context(run_lock(stem))
            except ErasureError as error:
                refusal = str(error)
        if fabric.world_size > 1:
            refusal = fabric.broadcast(refusal, src=0)
        if refusal:
            raise TrainingSetupError(refusal)
        yield


def prepare_outputs(fabric: Fabric, outputs: Sequence[Path], checkpoint: Path, request: RunRequest) -> None:
    """Refuse existing outputs (unless overwrite) and a stale checkpoint (unless resume/overwrite);
    remove the temporary files of killed saves in the output folder. Called under the run's lock:
    the outputs are checked again, as a run that held the lock may have written them meanwhile."""
    check_inputs_and_outputs(outputs, request)
    if fabric.global_rank == 0:
        for leftover in remove_stale_temporaries(request.output_dir):
            print(f"Removed {leftover}, left behind by a killed save.", file=sys.stderr, flush=True)
    resume = request.settings.resume
    if resume and not checkpoint.is_file():
        raise TrainingSetupError(f"--resume: there is no checkpoint {checkpoint}; run without --resume.")
    stale = checkpoint.exists() and not resume
    if stale and not request.overwrite:
        raise TrainingSetupError(
            f"A checkpoint of this run exists ({checkpoint}); pass --resume to continue it or --overwrite to start again."
        )
    fabric.barrier()  # every rank has looked before rank 0 removes the stale checkpoint
    if stale and fabric.global_rank == 0:
        checkpoint.unlink()
    fabric.barrier()


def _train(model: Any, request: RunRequest, settings: TrainingSettings, fabric: Fabric) -> list[Edit]:
    images, cache = request.data_dir, request.cache_dir
    if isinstance(settings, SepCESettings):
        return list(train_sepce(model, request.concepts, protect=request.protect, settings=settings, fabric=fabric,
                                images=images, cache_dir=cache))
    if isinstance(settings, CiESettings):
        return [train_cie(model, request.concepts[0], settings=settings, fabric=fabric, images=images, cache_dir=cache)]
    return [train_esd(model, request.concepts[0], settings=settings, fabric=fabric)]


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def needed_bytes(model: Any, request: RunRequest) -> int:
    """An upper bound of the bytes a run writes into ``output_dir`` (``model`` may be the UNet on
    ``meta``: only shapes count): its results (float32 trained
    tensors; a SepCE increment's coefficients are at most its layers' width), the checkpoints
    (``CHECKPOINT_COPIES``) and the report."""
    settings = request.settings
    if isinstance(settings, SepCESettings):
        per_concept = sum(layer.weight.numel() for layer in cross_attention_kv(model).values())
        trained = per_concept * len(request.concepts)
    elif isinstance(settings, ESDSettings):
        trained = sum(p.numel() for p in TRAINED_SETS[settings.train_method](model).values())
    else:
        trained = sum(p.numel() for p in cross_attention_parameters(model).values())
    copies = 1 + (CHECKPOINT_COPIES if settings.save_every else 0)
    return 4 * trained * copies + REPORT_BYTES


def run_training(fabric: Fabric, request: RunRequest) -> dict[str, Any]:
    """One training run in this process (see the module docstring); returns the summary."""
    started = time.perf_counter()
    request.validate()
    world = world_from_config_file(request.config_path or TOY_CONFIG)  # outputs are checked before loading
    lr = default_lr(request, world.name)
    files, stem = result_files(request, lr)
    report = request.report and world.classifier is not None
    outputs = [*files.values(), *(report_paths(stem) if report else ())]
    check_inputs_and_outputs(outputs, request)
    with output_lock(fabric, stem):
        return _locked_run(fabric, request, world, lr, files, stem, outputs, started)


def _locked_run(
    fabric: Fabric, request: RunRequest, world: Any, lr: float, files: dict[str, Path], stem: Path,
    outputs: list[Path], started: float,
) -> dict[str, Any]:
    say = print if fabric.global_rank == 0 else (lambda *args, **kwargs: None)
    checkpoint = stem.with_name(stem.name + CHECKPOINT_SUFFIX)
    report = len(outputs) > len(files)
    prepare_outputs(fabric, outputs, checkpoint, request)
    check_free_space(request.output_dir, needed_bytes(unet_on_meta(request.config_path), request),
                     "The results and checkpoints of this run")
    model = load_model(request.config_path, request.ckpt_path, use_ema=request.use_ema, verbose=fabric.global_rank == 0)
    model.to(fabric.device)
    say(f"Training on {fabric.device} in {fabric.world_size} process(es).", flush=True)
    settings = replace(request.settings, lr=lr, checkpoint=checkpoint)
    edits = _train(model, request, settings, fabric)
    summary = dict(edits[0].metadata["summary"])  # the trainer records the run's summary in every result
    if fabric.global_rank == 0:
        written = [edit.save(files[concept], overwrite=request.overwrite) for edit, concept in zip(edits, request.concepts)]
        if report:
            table = before_after_report(model, edits, world, stem, device=fabric.device)
            say(table, flush=True)
            written += list(report_paths(stem))
        checkpoint.unlink(missing_ok=True)
        summary["outputs"] = [str(path) for path in written]
        summary["total_seconds"] = round(time.perf_counter() - started, 2)
        say(json.dumps(summary, default=_json_number), flush=True)
    fabric.barrier()
    return summary
