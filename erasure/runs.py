"""A training run with files: what ``train-sepce.py``, ``train-cie.py`` and ``train-esd.py`` do
around the API call.

``run_training(fabric, request)`` runs in every process: it checks the outputs before loading
anything, loads the model on the process's device, calls ``train_sepce`` / ``train_cie`` /
``train_esd`` with a checkpoint next to the outputs (``--resume`` continues a killed run to the
same result), lets rank 0 write the result files (and, for a world with a classifier, the
before/after report), removes the checkpoint and prints ONE JSON line: per concept the steps run,
why it stopped and the final momentum, the training seconds, the files written, the total
seconds.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lightning_fabric import Fabric

from erasure.edits import Edit
from erasure.files import check_writable
from erasure.increments import slugify
from erasure.loading import TOY_CONFIG, load_model
from erasure.settings import CiESettings, ESDSettings, SepCESettings, TrainingSettings
from erasure.trainers.report import before_after_report, report_paths
from erasure.trainers.runtime import TrainingSetupError
from erasure.training import train_cie, train_esd, train_sepce
from erasure.worlds import world_from_config_file

CHECKPOINT_SUFFIX = ".checkpoint.safetensors"


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
    """Short, file-name-safe numbers: 0.1 -> "0.1", 0.001 -> "1e-3", 3 -> "3"."""
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
    if isinstance(settings, SepCESettings):
        return {"lr": settings.lr, "beta": settings.beta, "lam": settings.lam, "tau": settings.tau}
    if isinstance(settings, ESDSettings):
        return {"lr": settings.lr, "iter": settings.iterations, "sg": settings.start_guidance,
                "ng": settings.negative_guidance}
    return {"lr": settings.lr, "lam": settings.lam, "tau": settings.tau}


def result_files(request: RunRequest, lr: float) -> tuple[dict[str, Path], Path]:
    """The result file of every concept and the run's stem (checkpoint and report files)."""
    hyper = _hyperparameters(replace(request.settings, lr=lr))
    files = {
        concept: request.output_dir / f"{output_name(request.method, slugify(concept), hyper)}.safetensors"
        for concept in request.concepts
    }
    joined = "+".join(slugify(concept) for concept in request.concepts)
    return files, request.output_dir / output_name(request.method, joined, hyper)


def default_lr(request: RunRequest, world: str) -> float:
    """``request.settings.lr``, or its method's default for a model of ``world``."""
    return request.settings.with_lr(request.settings.method_family, world).lr


def prepare_outputs(fabric: Fabric, outputs: Sequence[Path], checkpoint: Path, request: RunRequest) -> None:
    """Refuse existing outputs (unless overwrite) and a stale checkpoint (unless resume/overwrite)."""
    for path in outputs:
        check_writable(path, request.overwrite)
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
    images = request.data_dir
    if isinstance(settings, SepCESettings):
        return list(train_sepce(model, request.concepts, protect=request.protect, settings=settings, fabric=fabric,
                                images=images))
    if len(request.concepts) != 1:
        raise TrainingSetupError(f"{request.method} erases one concept per run; got {list(request.concepts)}.")
    if isinstance(settings, CiESettings):
        return [train_cie(model, request.concepts[0], settings=settings, fabric=fabric, images=images)]
    return [train_esd(model, request.concepts[0], settings=settings, fabric=fabric)]


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def run_training(fabric: Fabric, request: RunRequest) -> dict[str, Any]:
    """One training run in this process (see the module docstring); returns the summary."""
    started = time.perf_counter()
    request.settings.validate()
    say = print if fabric.global_rank == 0 else (lambda *args, **kwargs: None)
    world = world_from_config_file(request.config_path or TOY_CONFIG)  # outputs are checked before loading
    lr = default_lr(request, world.name)
    files, stem = result_files(request, lr)
    checkpoint = stem.with_name(stem.name + CHECKPOINT_SUFFIX)
    report = request.report and world.classifier is not None
    prepare_outputs(fabric, [*files.values(), *(report_paths(stem) if report else ())], checkpoint, request)
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
