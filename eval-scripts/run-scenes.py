"""The paper's erase/restore scenes (METHOD.md §4) as one command.

    python eval-scripts/run-scenes.py --scene 1                                # SepCE, the paper's protocol, toy model
    python eval-scripts/run-scenes.py --scene 1 --method sepce esd cie         # and the baselines, same timeline
    python eval-scripts/run-scenes.py --scene 1 --protocol protect_all         # our extension (every concept protected)

SepCE trains its increments as --protocol says (erasure/scenes.py): ``paper`` (default) trains a
concept's increment when it is first erased, jointly with the others erased then, protecting "",
the watermark prompt and every concept erased or restored so far; ``protect_all`` trains them all
at the start, each protecting "", the watermark prompt and every other --concepts. CiE and ESD-x
train one weight difference per concept (the protocol does not change them) and are merged as the
original weights plus the differences of the concepts erased at each step. Edits are kept in --increments_dir and reused when their
settings, base model and (SepCE) protected prompts match exactly; otherwise the run stops and
says why (--retrain trains again). An interrupted training resumes.

At every time step the blank class and every concept are sampled with two prompt sets: the exact
concept prompt (as protected) and, where a held-out wording file is given (the toy model's
default: data/toy-heldout-wordings.csv), the concept's wordings that training and protection
never saw, each with its own seed; both are compared with the ORIGINAL model's images of the
same prompts and seeds (cached in --original_dir): FID, LPIPS, ACC (toy model: the toy oracle's
artist head and the oracle's features for FID / LPIPS, labelled "oracle-feature"; SD:
--classifier, Inception, AlexNet).

Writes {output_dir}/table.csv (per method, wording, step and class), table.md (the paper's
Table 2 layout: per step and method the mean FID / ACC / LPIPS of forgotten, recovered and
regular concepts, then per-concept tables), scene.json and grid.png (exact prompts; rows
classes, columns the original then every step of the first method). The last printed line is
the JSON record.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from erasure.bases import compute_bases, normalise_prompt
from erasure.classifier import ImageClassifier, load_classifier
from erasure.cli import add_model_arguments, load_model_from_args, run_script
from erasure.edits import Edit, load_edit
from erasure.errors import CapacityError
from erasure.evaluation import make_evaluator
from erasure.files import check_writable, write_json, write_text
from erasure.generation import ImageJob, generate, generate_concept_images, save_png, write_images
from erasure.images import read_images
from erasure.increments import Increment, slugify, verify
from erasure.loading import model_fingerprint
from erasure.metrics import FID_FEATURES, LPIPS_NETS
from erasure.prompts import REQUIRED_COLUMNS, read_prompts
from erasure.runs import CHECKPOINT_SUFFIX, RunRequest, default_lr, result_files
from erasure.samplers import SamplingSettings, sampling_settings
from erasure.scene_tables import (
    EXACT,
    HELD_OUT,
    metric_labels,
    paper_layout_markdown,
    role_means_record,
    role_summary,
    scene_csv,
    scene_grid,
    scene_markdown,
    scene_record,
)
from erasure.scenes import (
    PROTOCOLS,
    SCENE_METRICS,
    SCENES,
    SD_SCENE_ARTISTS,
    EvaluatedClass,
    SceneError,
    Timeline,
    TrainingGroup,
    check_concepts,
    make_edits,
    run_scene,
    training_plan,
)
from erasure.settings import (
    DEFAULT_WATERMARK_PROMPT,
    JOINT_OBJECTIVES,
    SEPCE_SOLVERS,
    STOP_RULES,
    CiESettings,
    ESDSettings,
    SepCESettings,
    TrainingSettings,
)
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
    parser.add_argument("--method", nargs="+", choices=METHODS, default=["sepce"],
                        help="one or more of sepce (default), cie, esd (ESD-x); all play the same timeline")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="paper",
                        help="which SepCE increments exist and what they protect: paper (default) or protect_all")
    parser.add_argument("--concepts", nargs="+", default=None,
                        help="c0..c8 in order (default: the 9 toy artists; SD: METHOD.md's 9 artists)")
    parser.add_argument("--increments_dir", type=Path, default=OUTPUT_ROOT / "increments",
                        help=f"trained increments / weight differences, reused across scenes (default: "
                             f"{OUTPUT_ROOT / 'increments'})")
    parser.add_argument("--retrain", action="store_true", help="train the scene's increments again")
    parser.add_argument("--num_samples", type=int, default=DEFAULT_NUM_SAMPLES,
                        help=f"images per class and time step, exact prompts (default: {DEFAULT_NUM_SAMPLES})")
    parser.add_argument("--heldout_wordings", type=Path, default=None,
                        help="CSV (prompt, evaluation_seed, case_number, class) of wordings never trained or protected; "
                        "one image per row. Default: the world's held_out_wordings (data/toy-heldout-wordings.csv on the toy model), none on SD")
    parser.add_argument("--heldout_per_class", type=int, default=None,
                        help="use the first N held-out wordings of each class (default: all)")
    parser.add_argument("--no_heldout", action="store_true", help="evaluate the exact prompts only")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"first sampling seed (default: {DEFAULT_SEED})")
    parser.add_argument("--output_dir", type=Path, default=None,
                        help=f"where the tables and grid go (default: {OUTPUT_ROOT}/scene<N>-<protocol>-<methods>)")
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
    training.add_argument("--esd_iterations", type=int, default=None,
                          help="ESD's steps (it has no stop rule; default: --iterations; 50 erase a toy artist)")
    training.add_argument("--lr", type=float, default=None, help="default: the method's for the model (erasure.settings)")
    training.add_argument("--lam", type=float, default=None, help="L1 weight (SepCE, CiE; default: the method's)")
    training.add_argument("--stop", choices=STOP_RULES, default=None,
                          help="momentum stop rule (SepCE, CiE; default: relative, METHOD.md §1)")
    training.add_argument("--tau", type=float, default=None,
                          help="momentum stop threshold (SepCE, CiE; default: the rule's, erasure.settings.DEFAULT_TAU)")
    training.add_argument("--beta", type=float, default=None, help="increment scale (SepCE; default: 1e-4)")
    training.add_argument("--min_dims", type=int, default=None, help="smallest null space (SepCE; default: 8)")
    training.add_argument("--watermark_prompt", default=DEFAULT_WATERMARK_PROMPT,
                          help=f"protected by every SepCE increment (default: {DEFAULT_WATERMARK_PROMPT!r}; '' for none)")
    training.add_argument("--solver", choices=SEPCE_SOLVERS, default=SepCESettings().solver,
                          help="how SepCE's coefficients are found (default: cie, the training loop; closed_form: "
                          "METHOD.md §6, no UNet call)")
    training.add_argument("--concept_templates", type=Path, default=None, metavar="FILE",
                          help="SepCE: wordings each concept is erased over, one a line with {name} (default: the "
                          "built-in artist wordings; a file with the one line {name}: the paper's bare prompt)")
    training.add_argument("--joint_objective", choices=JOINT_OBJECTIVES, default=SepCESettings().joint_objective,
                          help="SepCE's joint objective (default: per_concept; METHOD.md §2)")
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
    args.method = list(dict.fromkeys(args.method))
    args.grid_images = min(args.grid_images, args.num_samples)
    if args.output_dir is None:
        args.output_dir = OUTPUT_ROOT / f"scene{args.scene}-{args.protocol}-{'-'.join(args.method)}"
    return args


# ------------------------------------------------------------------------------- training / reuse
def training_settings(args: argparse.Namespace, method: str) -> TrainingSettings:
    """The method's settings from this script's training flags (unset flags keep the method's defaults)."""
    common: dict[str, Any] = {
        "lr": args.lr, "iterations": args.iterations, "batch_size": args.train_batch_size, "seed": args.train_seed,
        "num_images": args.num_images, "progress": not args.no_progress,
    }
    given = {flag: getattr(args, flag) for flag in ("lam", "tau", "stop", "beta", "min_dims") if getattr(args, flag) is not None}
    if method == "sepce":
        templates = str(args.concept_templates) if args.concept_templates else None
        return SepCESettings(**common, **given, protect_classes=False, watermark_prompt=args.watermark_prompt,
                             joint_objective=args.joint_objective, solver=args.solver, concept_templates=templates)
    if method == "cie":
        return CiESettings(**common, **{key: value for key, value in given.items() if key in ("lam", "tau", "stop")})
    return ESDSettings(**{**common, "iterations": args.esd_iterations or args.iterations})


def group_folder(args: argparse.Namespace, group: TrainingGroup, concepts: list[str]) -> Path:
    """Where a SepCE training group's increments live: one folder per (concepts, protected prompts)."""
    key = json.dumps([sorted(normalise_prompt(concepts[i]) for i in group.concepts),
                      sorted(normalise_prompt(concepts[i]) for i in group.protected),
                      normalise_prompt(args.watermark_prompt)])
    slugs = "+".join(slugify(concepts[i]) for i in group.concepts)
    return args.increments_dir / "sepce" / f"{slugs}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def sepce_groups(args: argparse.Namespace, model: nn.Module, timeline: Timeline, concepts: list[str]) -> list[TrainingGroup]:
    """The protocol's training groups, their bases checked for room before anything is trained."""
    groups = training_plan(timeline, args.protocol, len(concepts))
    watermark = [args.watermark_prompt] if args.watermark_prompt else []
    min_dims = args.min_dims if args.min_dims is not None else SepCESettings().min_dims
    for group in groups:
        extra = [*watermark, *(concepts[i] for i in group.protected)]
        try:
            compute_bases(model, [concepts[i] for i in group.concepts], extra, min_dims=min_dims)
        except CapacityError as error:
            raise SceneError(
                f"{timeline.name} {group.step} ({args.protocol} protocol): each increment would protect \"\", "
                f"{len(watermark)} watermark prompt(s) and {len(group.concepts) + len(group.protected) - 1} concepts, "
                f"more than the null space holds. {error}"
            ) from error
    return groups


def train_group(
    args: argparse.Namespace, model: nn.Module, method: str, group: list[str], protect: list[str], folder: Path,
    files: dict[str, Path],
) -> None:
    """Train one group (SepCE: jointly; CiE / ESD: one concept) through the API, resuming a checkpoint."""
    settings = training_settings(args, method)
    world = world_of(model).name
    print(f"Training the {method} edits of {group}" + (f", protecting {protect}." if protect else "."), flush=True)
    request = RunRequest(tuple(group), settings, output_dir=folder)
    stem = result_files(request, default_lr(request, world))[1]
    checkpoint = stem.with_name(stem.name + CHECKPOINT_SUFFIX)
    resumable = replace(settings, checkpoint=checkpoint, resume=checkpoint.is_file() and not args.retrain)
    if method == "sepce":
        edits = train_sepce(model, group, protect=protect, images=args.data_dir, settings=resumable)
    elif method == "cie":
        edits = [train_cie(model, group[0], settings=resumable, images=args.data_dir)]
    else:
        edits = [train_esd(model, group[0], settings=resumable)]
    for concept, edit in zip(group, edits):
        edit.save(files[concept], overwrite=True)
    checkpoint.unlink(missing_ok=True)


def ensure_edit_files(
    args: argparse.Namespace, method: str, model: nn.Module, timeline: Timeline, concepts: list[str]
) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """{concept: file} for every erased concept (existing, or trained now) and, for SepCE,
    {concept: the concept prompts its increment must protect}."""
    settings = training_settings(args, method)
    world = world_of(model).name
    if method == "sepce":
        plan = [([concepts[i] for i in group.concepts], group, group_folder(args, group, concepts))
                for group in sepce_groups(args, model, timeline, concepts)]
    else:
        plan = [([concepts[i]], None, args.increments_dir) for i in timeline.erased_concepts]
    files: dict[str, Path] = {}
    protected: dict[str, list[str]] = {}
    for group, training_group, folder in plan:
        request = RunRequest(tuple(group), settings, output_dir=folder)
        group_files = result_files(request, default_lr(request, world))[0]
        files.update(group_files)
        protect = [] if training_group is None else [concepts[i] for i in training_group.protected]
        for concept in group:
            protected[concept] = [*protect, *(c for c in group if c != concept)]
        if args.retrain or not all(path.is_file() for path in group_files.values()):
            train_group(args, model, method, group, protect, folder, group_files)
    return files, protected


def check_reusable(
    edit: Edit, path: Path, requested: dict[str, Any], fingerprint: str, protected: list[str] | None,
    watermark: str,
) -> None:
    """Refuse a file made with other settings, on another base model, or (SepCE) protecting other
    prompts than the protocol asks for; the fix is --retrain or another --increments_dir."""
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
    if isinstance(edit, Increment) and protected is not None:
        has = {normalise_prompt(prompt) for prompt in edit.basis.protected_prompts}
        wanted = {normalise_prompt(prompt) for prompt in ["", *([watermark] if watermark else []), *protected]}
        if has != wanted:
            raise SceneError(
                f"{path} protects {sorted(has - wanted)} beyond and lacks {sorted(wanted - has)} of what the protocol "
                f"asks for {edit.concept!r}; {fix}."
            )


def load_edits(
    args: argparse.Namespace, method: str, files: dict[str, Path], protected: dict[str, list[str]],
    fingerprint: str, world: str,
) -> dict[str, Edit]:
    settings = training_settings(args, method).with_lr(training_settings(args, method).method_family, world)
    requested = settings.result_settings()
    edits = {}
    for concept, path in files.items():
        edits[concept] = load_edit(path)
        check_reusable(edits[concept], path, requested, fingerprint, protected.get(concept), args.watermark_prompt)
    return edits


# ------------------------------------------------------------------------------- evaluation
def evaluated_classes(
    classifier: ImageClassifier, concepts: list[str], args: argparse.Namespace, held_out: Path | None
) -> list[EvaluatedClass]:
    """The blank class and every concept with its exact prompt, then every concept's held-out wordings."""
    seeds = tuple(args.seed + index for index in range(args.num_samples))

    def class_index(name: str) -> int:
        try:
            return classifier.class_index(name)
        except ValueError as error:
            raise SceneError(f"ACC of {name!r}: {error} Pass a --classifier trained on these concepts.") from error

    classes = [EvaluatedClass(name, concept, (concept,) * len(seeds), seeds, class_index(name))
               for name, concept in [("blank", ""), *((concept, concept) for concept in concepts)]]
    if held_out is None:
        return classes
    rows = read_prompts(held_out, (*REQUIRED_COLUMNS, "class"))
    for concept in concepts:
        mine = [row for row in rows if normalise_prompt(row.extra.get("class") or "") == normalise_prompt(concept)]
        mine = mine[:args.heldout_per_class]
        if len(mine) < 2:
            raise SceneError(f"{held_out} has {len(mine)} wordings of class {concept!r}; FID needs at least 2 "
                             f"(add rows, or pass --no_heldout).")
        classes.append(EvaluatedClass(f"{concept} ({HELD_OUT})", concept, tuple(row.prompt for row in mine),
                                      tuple(row.evaluation_seed for row in mine), class_index(concept), HELD_OUT))
    return classes


def original_images(
    args: argparse.Namespace, model: nn.Module, classes: list[EvaluatedClass], settings: SamplingSettings
) -> dict[str, torch.Tensor]:
    """The original model's images of every class (uint8), sampled once into --original_dir and reused."""
    root = args.original_dir / model_fingerprint(model)
    sampler = f"{settings.sampler}{settings.steps}-g{settings.guidance_scale:g}"
    images = {}
    for evaluated in classes:
        if evaluated.wording == EXACT:
            folder = root / (BLANK_FOLDER if not evaluated.concept else slugify(evaluated.concept))
            paths = generate_concept_images(
                model, evaluated.concept, len(evaluated.seeds), folder, seed0=evaluated.seeds[0], settings=settings,
                batch_size=args.batch_size, progress=not args.no_progress,
            )
        else:
            folder = root / f"{HELD_OUT}-{sampler}" / slugify(evaluated.concept)
            jobs = [ImageJob(folder / f"{seed}-{slugify(prompt)}.png", prompt, seed)
                    for prompt, seed in zip(evaluated.prompts, evaluated.seeds)]
            write_images(model, jobs, settings, batch_size=args.batch_size, progress=not args.no_progress)
            paths = [job.path for job in jobs]
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
    held_out = None if args.no_heldout else args.heldout_wordings or world.held_out_wordings_path()
    classifier = load_classifier(args.classifier) if args.classifier else world.load_classifier()
    classes = evaluated_classes(classifier, concepts, args, held_out)
    settings = sampling_settings(model, args.sampler, args.steps, args.guidance_scale)
    device = model.betas.device
    fingerprint = model_fingerprint(model)

    edits, files, separability = {}, {}, None
    for method in args.method:
        method_files, protected = ensure_edit_files(args, method, model, timeline, concepts)
        edits[method] = load_edits(args, method, method_files, protected, fingerprint, world.name)
        files[method] = {concept: str(path) for concept, path in method_files.items()}
        if method == "sepce":
            separability = verify(model, list(edits[method].values()))
    trained = time.perf_counter()
    originals = original_images(args, model, classes, settings)
    evaluator = make_evaluator(
        SCENE_METRICS, world=world, classifier=classifier, fid_features=args.fid_features, lpips_net=args.lpips_net,
        inception_weights=args.inception_weights, alexnet_weights=args.alexnet_weights, batch_size=args.batch_size,
        device=device,
    )
    extractors = evaluator.extractors()
    extractors["acc"] += f" from {args.classifier or f'the {world.name} world classifier'}"
    labels = metric_labels(extractors)

    def sample(prompts: tuple[str, ...], seeds: tuple[int, ...]) -> torch.Tensor:
        return generate(model, list(prompts), list(seeds), settings=settings, batch_size=args.batch_size)

    results = [
        run_scene(timeline, concepts, make_edits(model, edits[method]), classes, originals, sample, evaluator,
                  method=method, announce=lambda message: print(message, flush=True))
        for method in args.method
    ]
    exact = [evaluated for evaluated in classes if evaluated.wording == EXACT]
    columns = [originals, *(results[0].images[step.label] for step in timeline.steps)]
    save_png(scene_grid(exact, columns, args.grid_images, ["original", *(s.label for s in timeline.steps)]),
             outputs["grid.png"])
    wordings = [EXACT, *([HELD_OUT] if held_out else [])]
    seeds = classes[0].seeds
    lines = [
        f"# {timeline.name}: {', '.join(args.method)}; SepCE protocol {args.protocol}", "",
        f"Exact prompts: {args.num_samples} images per class and step (seeds {seeds[0]}..{seeds[-1]})"
        + (f"; held-out wordings: one image per row of {held_out}" if held_out else "")
        + f". {settings.sampler} {settings.steps} steps, guidance {settings.guidance_scale:g}. Means over the concepts "
        f"with each role (blank excluded). Grid ({outputs['grid.png'].name}, {args.method[0]}): original, "
        f"{', '.join(step.label for step in timeline.steps)}.", "",
        *(f"- {step.label}: {step.describe(concepts)}" for step in timeline.steps), "",
    ]
    for wording in wordings:
        lines += [f"## {wording} prompts", "", paper_layout_markdown(results, wording, labels), ""]
    lines += [f"- {labels.get(metric, metric)}: {name}" for metric, name in extractors.items()]
    lines += ["- FID is clamped at 0: it is a squared distance, and rounding in the matrix square root makes equal "
              "image sets read slightly negative.", ""]
    lines += [scene_markdown(result, labels, wording) for result in results for wording in wordings]
    table = "\n".join(lines)
    write_text(scene_csv(results), outputs["table.csv"])
    write_text(table, outputs["table.md"])
    record = {
        "scene": args.scene, "methods": args.method, "protocol": args.protocol, "concepts": concepts,
        "watermark_prompt": args.watermark_prompt, "held_out_wordings": str(held_out) if held_out else None,
        "timeline": [{"step": s.label, "erase": [concepts[i] for i in s.erase],
                      "restore": [concepts[i] for i in s.restore]} for s in timeline.steps],
        "num_samples": args.num_samples, "seeds": [seeds[0], seeds[-1]], "sampling": asdict(settings),
        "extractors": extractors, "labels": labels, "increments": files,
        "steps": {result.method: scene_record(result) for result in results},
        "role_means": {result.method: role_means_record(result) for result in results},
        "summary": {result.method: {w: role_summary(result, w) for w in wordings} for result in results},
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
