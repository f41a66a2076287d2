"""The paper's erase/restore scenes (METHOD.md §4) as one command.

    python eval-scripts/run-scenes.py --scene 1                  # SepCE on the embedded toy model
    python eval-scripts/run-scenes.py --scene 1 --method esd     # the ESD-x baseline, same timeline

Trains (or reuses) one increment per erased concept in --increments_dir, composes the model at
every time step of the scene (SepCE: attach / drop increments, exact; cie / esd: add / subtract
weight differences), samples the blank class and every concept with the same seeds at every step
and compares them with the ORIGINAL model's images of those seeds (sampled once, cached in
--original_dir): FID, LPIPS, ACC (toy model: the toy oracle's artist head; SD: --classifier).
Writes {output_dir}/table.csv, table.md, scene.json and grid.png (rows classes, columns the
original then every step); the last printed line is one JSON object with, for every step and
class, role (erased / restored / regular), acc, acc_original, fid and lpips.

Reuse: an increment file is reused when its name (method, concept, hyper-parameters) matches
and it records the same iterations, training batch and seed, the same base model and (SepCE)
a basis protecting "" and every other concept; otherwise the run stops and says why
(--retrain trains again). SepCE trains the scene's missing concepts jointly, each protecting
"" and all other --concepts, so the files serve every scene; an interrupted training resumes.

The JSON's "summary" holds the paper's claim in numbers over all steps: the highest ACC of an
erased class, and the largest ACC gap / FID / LPIPS of restored and regular classes to the
original. Time steps are labelled as in METHOD.md (Scene1 and Scene2 go t0, t1, t3).

Cost on the toy model, 2 CPU cores shared with two other jobs (so an upper bound): Scene1 with
SepCE took 13.3 min the first time, 6 of them making 50 training images of each of the six erased
concepts and training their increments jointly (each protects "" and the 8 other concepts; they
stop by the momentum rule, at most --iterations); Scene2, reusing them, 6.3 min. Scene3 and Scene4
sample 5 and 6 steps instead of 3. Sampling is about 0.3 s per image alone (DDIM 25); the
original model's images are cached across scenes and methods. ESD-x trains one concept at a time
with a partial DDIM sample per step (about 1 s per step on the toy model): pass --iterations
(it has no stop rule; 50 erase a toy artist).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from erasure.bases import normalise_prompt
from erasure.classifier import ImageClassifier, load_classifier
from erasure.images import read_images
from erasure.cli import add_model_arguments, load_model_from_args, run_script
from erasure.edits import Edit, load_edit
from erasure.files import check_writable, write_json, write_text
from erasure.generation import generate, generate_concept_images, save_png
from erasure.increments import Increment, slugify, verify
from erasure.loading import model_fingerprint
from erasure.evaluation import make_evaluator
from erasure.metrics import FID_FEATURES, LPIPS_NETS
from erasure.runs import CHECKPOINT_SUFFIX, RunRequest, default_lr, result_files
from erasure.samplers import SamplingSettings, sampling_settings
from erasure.scenes import (
    SCENE_METRICS,
    SCENES,
    SD_SCENE_ARTISTS,
    EvaluatedClass,
    SceneError,
    check_concepts,
    make_edits,
    role_summary,
    run_scene,
    scene_csv,
    scene_grid,
    scene_markdown,
    scene_record,
)
from erasure.settings import CiESettings, ESDSettings, SepCESettings, TrainingSettings
from erasure.training import train_cie, train_esd, train_sepce
from erasure.worlds import world_of

METHODS = ("sepce", "cie", "esd")
OUTPUT_ROOT = Path("outputs") / "scenes"
DEFAULT_NUM_SAMPLES = 16
DEFAULT_ITERATIONS = 1000  # the training scripts' default; SepCE and CiE stop earlier by the momentum rule
DEFAULT_NUM_IMAGES = 50
DEFAULT_SEED = 1_000_000  # evaluation seeds, far from the training images' seeds 0..num_images-1
BLANK_FOLDER = "blank"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene", type=int, choices=sorted(SCENES), required=True, help="METHOD.md §4's scene")
    parser.add_argument("--method", choices=METHODS, default="sepce", help="sepce (default), cie, or esd (ESD-x)")
    parser.add_argument("--concepts", nargs="+", default=None,
                        help="c0..c8 in order (default: the 9 toy artists; SD: METHOD.md's 9 artists)")
    parser.add_argument("--increments_dir", type=Path, default=OUTPUT_ROOT / "increments",
                        help=f"trained increments / weight differences, reused across scenes (default: "
                             f"{OUTPUT_ROOT / 'increments'})")
    parser.add_argument("--retrain", action="store_true", help="train the scene's increments again")
    parser.add_argument("--num_samples", type=int, default=DEFAULT_NUM_SAMPLES,
                        help=f"images per class and time step (default: {DEFAULT_NUM_SAMPLES})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"first sampling seed (default: {DEFAULT_SEED})")
    parser.add_argument("--output_dir", type=Path, default=None,
                        help=f"where the tables and grid go (default: {OUTPUT_ROOT}/scene<N>-<method>)")
    parser.add_argument("--original_dir", type=Path, default=OUTPUT_ROOT / "original",
                        help="cache of the original model's images, one folder per model fingerprint")
    parser.add_argument("--overwrite", action="store_true", help="replace existing tables and grid")
    parser.add_argument("--grid_images", type=int, default=4, help="images per class and step in the grid")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    add_model_arguments(parser)
    sampling = parser.add_argument_group("sampling (default: the config's `sampling:` section)")
    sampling.add_argument("--sampler", choices=("ddim", "lms"), default=None)
    sampling.add_argument("--steps", type=int, default=None, help="sampler steps")
    sampling.add_argument("--guidance_scale", type=float, default=None)
    sampling.add_argument("--batch_size", type=int, default=32, help="images per model call (default: 32)")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--classifier", type=Path, default=None,
                         help="ACC classifier (artist-cls-train.py); default: the model world's (the toy oracle on the toy model)")
    metrics.add_argument("--fid_features", choices=FID_FEATURES, default="auto", help="default: auto")
    metrics.add_argument("--lpips", dest="lpips_net", choices=LPIPS_NETS, default="auto", help="default: auto")
    metrics.add_argument("--inception_weights", type=Path, default=None)
    metrics.add_argument("--alexnet_weights", type=Path, default=None)
    training = parser.add_argument_group("training of missing increments (the train-scripts' drivers)")
    training.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                          help=f"step limit per concept (default: {DEFAULT_ITERATIONS})")
    training.add_argument("--lr", type=float, default=None, help="default: the method's for the model (erasure.settings)")
    training.add_argument("--lam", type=float, default=None, help="L1 weight (SepCE, CiE; default: the method's)")
    training.add_argument("--tau", type=float, default=None, help="momentum stop (SepCE, CiE; default: 1e-4)")
    training.add_argument("--beta", type=float, default=None, help="increment scale (SepCE; default: 1e-4)")
    training.add_argument("--min_dims", type=int, default=None, help="smallest null space (SepCE; default: 8)")
    training.add_argument("--train_batch_size", type=int, default=1, help="training batch (default: 1)")
    training.add_argument("--train_seed", type=int, default=0, help="training seed (default: 0)")
    training.add_argument("--num_images", type=int, default=DEFAULT_NUM_IMAGES,
                          help=f"training images per concept when generated (SepCE, CiE; default: "
                               f"{DEFAULT_NUM_IMAGES})")
    training.add_argument("--data_dir", type=Path, default=None, help="training images {data_dir}/{concept_slug}/")
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        parser.error("--num_samples must be >= 2 (FID compares sets)")
    if args.batch_size < 1 or args.grid_images < 1:
        parser.error("--batch_size and --grid_images must be >= 1")
    args.grid_images = min(args.grid_images, args.num_samples)
    if args.output_dir is None:
        args.output_dir = OUTPUT_ROOT / f"scene{args.scene}-{args.method}"
    return args


# ------------------------------------------------------------------------------- training / reuse
def training_settings(args: argparse.Namespace) -> TrainingSettings:
    """The method's settings from this script's training flags (unset flags keep the method's defaults)."""
    common: dict[str, Any] = {
        "lr": args.lr, "iterations": args.iterations, "batch_size": args.train_batch_size, "seed": args.train_seed,
        "num_images": args.num_images, "progress": not args.no_progress,
    }
    given = {flag: getattr(args, flag) for flag in ("lam", "tau", "beta", "min_dims") if getattr(args, flag) is not None}
    if args.method == "sepce":
        return SepCESettings(**common, **given)
    if args.method == "cie":
        return CiESettings(**common, **{key: value for key, value in given.items() if key in ("lam", "tau")})
    return ESDSettings(**common)


def ensure_edit_files(
    args: argparse.Namespace, model: nn.Module, concepts: list[str], erased: list[str]
) -> dict[str, Path]:
    """{concept: file} for every erased concept: existing files, or trained now through the API.

    SepCE trains the missing concepts jointly, each protecting "" and every other concept of the
    scene; CiE / ESD train one concept at a time. An interrupted training resumes from its checkpoint.
    """
    settings = training_settings(args)
    world = world_of(model).name
    request = RunRequest(tuple(erased), settings, output_dir=args.increments_dir)
    files, _ = result_files(request, default_lr(request, world))
    missing = [concept for concept in erased if args.retrain or not files[concept].is_file()]
    groups = [missing] if args.method == "sepce" and missing else [[concept] for concept in missing]
    for group in groups:
        print(f"Training the {request.method} edits of {group}.", flush=True)
        group_request = RunRequest(tuple(group), settings, output_dir=args.increments_dir)
        stem = result_files(group_request, default_lr(group_request, world))[1]
        checkpoint = stem.with_name(stem.name + CHECKPOINT_SUFFIX)
        resumable = replace(settings, checkpoint=checkpoint, resume=checkpoint.is_file() and not args.retrain)
        if args.method == "sepce":
            others = [concept for concept in concepts if concept not in group]
            edits = train_sepce(model, group, protect=others, images=args.data_dir,
                                settings=replace(resumable, protect_classes=False))
        elif args.method == "cie":
            edits = [train_cie(model, group[0], settings=resumable, images=args.data_dir)]
        else:
            edits = [train_esd(model, group[0], settings=resumable)]
        for concept, edit in zip(group, edits):
            edit.save(files[concept], overwrite=True)
        checkpoint.unlink(missing_ok=True)
    return files


def check_reusable(
    edit: Edit, path: Path, concept: str, concepts: list[str],
    requested: dict[str, Any], fingerprint: str,
) -> None:
    """Refuse a file made with other settings, on another base model, or (SepCE) not separable from
    the other concepts; the fix is --retrain or another --increments_dir."""
    fix = "pass --retrain to train it again, or use another --increments_dir"
    recorded = edit.metadata.get("settings", {})
    differing = {key: (recorded.get(key), value) for key, value in requested.items() if recorded.get(key) != value}
    if differing:
        listing = ", ".join(f"{key} {old!r} (asked: {new!r})" for key, (old, new) in differing.items())
        raise SceneError(f"{path} was trained with {listing}; {fix}.")
    if edit.metadata.get("base_model_fingerprint") != fingerprint:
        raise SceneError(
            f"{path} was trained on base model {edit.metadata.get('base_model_fingerprint')}, not on this one "
            f"({fingerprint}); {fix}."
        )
    if isinstance(edit, Increment):
        protected = {normalise_prompt(prompt) for prompt in edit.basis.protected_prompts}
        needed = [c for c in ["", *concepts] if normalise_prompt(c) != normalise_prompt(concept)]
        lacking = [c for c in needed if normalise_prompt(c) not in protected]
        if lacking:
            raise SceneError(
                f"{path} does not protect {lacking}, so restoring or erasing it would change them (not separable "
                f"for these --concepts); {fix}."
            )


def load_edits(
    args: argparse.Namespace, files: dict[str, Path], concepts: list[str], fingerprint: str
) -> dict[str, Edit]:
    requested = {"iterations": args.iterations, "batch_size": args.train_batch_size, "seed": args.train_seed}
    edits = {}
    for concept, path in files.items():
        edits[concept] = load_edit(path)
        check_reusable(edits[concept], path, concept, concepts, requested, fingerprint)
    return edits


# ------------------------------------------------------------------------------- evaluation
def evaluated_classes(classifier: ImageClassifier, concepts: list[str]) -> list[EvaluatedClass]:
    """The blank class, then every concept, with its class in the classifier."""
    classes = []
    for name, prompt in [("blank", ""), *((concept, concept) for concept in concepts)]:
        try:
            classes.append(EvaluatedClass(name, prompt, classifier.class_index(name)))
        except ValueError as error:
            raise SceneError(f"ACC of {name!r}: {error} Pass a --classifier trained on these concepts.") from error
    return classes


def original_images(
    args: argparse.Namespace, model: nn.Module, classes: list[EvaluatedClass], settings: SamplingSettings
) -> dict[str, torch.Tensor]:
    """The original model's images of every class (uint8), sampled once into --original_dir and reused."""
    root = args.original_dir / model_fingerprint(model)
    images = {}
    for evaluated in classes:
        folder = root / (BLANK_FOLDER if not evaluated.prompt else slugify(evaluated.prompt))
        paths = generate_concept_images(
            model, evaluated.prompt, args.num_samples, folder, seed0=args.seed, settings=settings,
            batch_size=args.batch_size, progress=not args.no_progress,
        )
        images[evaluated.name] = read_images(paths)
    return images


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    timeline = SCENES[args.scene]
    outputs = {name: check_writable(args.output_dir / name, args.overwrite)
               for name in ("table.csv", "table.md", "scene.json", "grid.png")}
    model = load_model_from_args(args)
    world = world_of(model)
    concepts = list(args.concepts or (world.class_prompts[1:] if world.classifier else SD_SCENE_ARTISTS))
    check_concepts(timeline, concepts)
    erased = [concepts[index] for index in timeline.erased_concepts]
    classifier = load_classifier(args.classifier) if args.classifier else world.load_classifier()
    classes = evaluated_classes(classifier, concepts)
    settings = sampling_settings(model, args.sampler, args.steps, args.guidance_scale)
    device = model.betas.device

    fingerprint = model_fingerprint(model)
    files = ensure_edit_files(args, model, concepts, erased)
    edits = load_edits(args, files, concepts, fingerprint)
    trained = time.perf_counter()
    separability = verify(model, list(edits.values())) if args.method == "sepce" else None
    originals = original_images(args, model, classes, settings)
    evaluator = make_evaluator(
        SCENE_METRICS, world=world, classifier=classifier, fid_features=args.fid_features, lpips_net=args.lpips_net,
        inception_weights=args.inception_weights, alexnet_weights=args.alexnet_weights, batch_size=args.batch_size,
        device=device,
    )
    extractors = evaluator.extractors()
    extractors["acc"] += f" from {args.classifier or f'the {world.name} world classifier'}"
    seeds = [args.seed + index for index in range(args.num_samples)]

    def sample(prompt: str) -> torch.Tensor:
        return generate(model, [prompt] * len(seeds), seeds, settings=settings, batch_size=args.batch_size)

    result = run_scene(timeline, concepts, make_edits(model, edits), classes, originals, sample, evaluator,
                       announce=lambda message: print(message, flush=True))
    columns = [originals, *(result.images[step.label] for step in timeline.steps)]
    column_names = ["original", *(step.label for step in timeline.steps)]
    save_png(scene_grid(classes, columns, args.grid_images, column_names), outputs["grid.png"])
    header = (f"# {timeline.name}, {args.method}: {args.num_samples} images per class and step, seeds "
              f"{seeds[0]}..{seeds[-1]}, {settings.sampler} {settings.steps} steps, guidance "
              f"{settings.guidance_scale:g}\n\nGrid columns: original, "
              f"{', '.join(step.label for step in timeline.steps)}.\n\n")
    table = header + scene_markdown(result, extractors)
    write_text(scene_csv(result), outputs["table.csv"])
    write_text(table, outputs["table.md"])
    record = {
        "scene": args.scene, "method": args.method, "concepts": concepts,
        "timeline": [{"step": s.label, "erase": [concepts[i] for i in s.erase],
                      "restore": [concepts[i] for i in s.restore]} for s in timeline.steps],
        "num_samples": args.num_samples, "seeds": [seeds[0], seeds[-1]], "sampling": asdict(settings),
        "extractors": extractors, "increments": {c: str(path) for c, path in files.items()},
        "steps": scene_record(result), "summary": role_summary(result),
        "outputs": {name: str(path) for name, path in outputs.items()},
        "seconds": {"training_and_loading": round(trained - started, 1),
                    "total": round(time.perf_counter() - started, 1)},
    }
    if separability is not None:
        record["separability"] = {
            key: separability[key] for key in ("max_relative_kv_change", "max_restore_abs_diff")
        }
    write_json(record, outputs["scene.json"])
    print(table)
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    run_script(main)
