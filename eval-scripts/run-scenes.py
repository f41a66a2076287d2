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
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from erasure.bases import normalise_prompt
from erasure.classes import class_mapping
from erasure.classifier import ImageClassifier, load_classifier, read_images
from erasure.cli import run_script
from erasure.files import check_writable
from erasure.increments import ConceptIncrement, load_any, slugify, verify
from erasure.loading import add_model_arguments, load_model_from_args, model_fingerprint
from erasure.metrics import (
    FID_FEATURES,
    LPIPS_NETS,
    ConceptEvaluator,
    resolve_fid_features,
    resolve_lpips,
)
from erasure.sampling import (
    SamplingSettings,
    atomic_path,
    generate_concept_images,
    sample_images,
    sampling_settings,
    save_png,
    write_json,
)
from erasure.scenes import (
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
from erasure.toy import TOY_DIR
from erasure.toy.oracle import load_oracle
from erasure.toy.world import ARTISTS, CLASS_NAMES
from erasure.trainers import cli
from erasure.weight_differences import WeightDifference

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
                         help="ACC classifier (artist-cls-train.py); default on the toy model: the toy oracle")
    metrics.add_argument("--fid_features", choices=FID_FEATURES, default="auto", help="default: auto")
    metrics.add_argument("--lpips", dest="lpips_net", choices=LPIPS_NETS, default="auto", help="default: auto")
    metrics.add_argument("--inception_weights", type=Path, default=None)
    metrics.add_argument("--alexnet_weights", type=Path, default=None)
    metrics.add_argument("--oracle_dir", type=Path, default=None, help="toy oracle folder (default: models/toy)")
    training = parser.add_argument_group("training of missing increments (the train-scripts' drivers)")
    training.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                          help=f"step limit per concept (default: {DEFAULT_ITERATIONS})")
    training.add_argument("--lr", type=float, default=None, help="default: the training script's for the method and model (cli.DEFAULT_LRS)")
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
def _driver_argv(args: argparse.Namespace, device_type: str) -> list[str]:
    """Flags every training driver shares, from this script's flags."""
    argv = ["--output_dir", str(args.increments_dir), "--iterations", str(args.iterations),
            "--batch_size", str(args.train_batch_size), "--seed", str(args.train_seed),
            "--accelerator", device_type, "--devices", "1"]
    for flag in ("config_path", "ckpt_path", "lr"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    argv += ["--use_ema"] * args.use_ema + ["--no_progress"] * args.no_progress
    return argv


def _optional(args: argparse.Namespace, *flags: str) -> list[str]:
    given = [flag for flag in flags if getattr(args, flag) is not None]
    return [item for flag in given for item in (f"--{flag}", str(getattr(args, flag)))]


def _image_argv(args: argparse.Namespace) -> list[str]:
    return ["--num_images", str(args.num_images)] + _optional(args, "data_dir")


def _sepce_namespace(
    args: argparse.Namespace, device_type: str, train: list[str], others: list[str]
) -> argparse.Namespace:
    argv = _driver_argv(args, device_type) + _image_argv(args) + _optional(args, "lam", "tau", "beta", "min_dims")
    argv += ["--mode", "joint", "--no_report", "--concepts", *train] + (["--protect", *others] if others else [])
    return cli.sepce_parser().parse_args(argv)


def _single_namespace(args: argparse.Namespace, device_type: str, concept: str) -> tuple[argparse.Namespace, Path]:
    """The CiE / ESD-x driver's namespace for one concept, and the file it writes (the driver's name)."""
    if args.method == "cie":
        argv = _driver_argv(args, device_type) + _image_argv(args) + _optional(args, "lam", "tau")
        namespace = cli.cie_parser().parse_args(argv + ["--prompt", concept])
        stem = cli.cie_stem(namespace)
    else:
        namespace = cli.esd_parser().parse_args(_driver_argv(args, device_type) + ["--prompt", concept])
        stem = cli.esd_stem(namespace)
    return namespace, args.increments_dir / f"{stem}.safetensors"


def _launch(run: Callable[..., Any], namespace: argparse.Namespace, stem: Path, retrain: bool) -> None:
    """Run a driver; continue an interrupted run's checkpoint, or start over with --retrain."""
    checkpoint = stem.with_name(stem.name + cli.CHECKPOINT_SUFFIX)
    namespace.overwrite = retrain
    namespace.resume = checkpoint.is_file() and not retrain
    cli.launch(run, namespace)


def ensure_edit_files(
    args: argparse.Namespace, concepts: list[str], erased: list[str], device_type: str
) -> dict[str, Path]:
    """{concept: file} for every erased concept: existing files, or trained now with the drivers."""
    if args.method == "sepce":
        namespace = _sepce_namespace(args, device_type, erased, [c for c in concepts if c not in erased])
        files = cli.sepce_names(namespace)[0]
        missing = [c for c in erased if args.retrain or not files[c].is_file()]
        if missing:
            print(f"Training SepCE increments of {missing} (each protects \"\" and every other concept).", flush=True)
            namespace = _sepce_namespace(args, device_type, missing, [c for c in concepts if c not in missing])
            _launch(cli.run_sepce, namespace, cli.sepce_names(namespace)[1], args.retrain)
        return files
    files = {}
    for concept in erased:
        namespace, files[concept] = _single_namespace(args, device_type, concept)
        if args.retrain or not files[concept].is_file():
            print(f"Training the {args.method} weight difference of {concept!r}.", flush=True)
            run = cli.run_cie if args.method == "cie" else cli.run_esd
            _launch(run, namespace, files[concept].with_suffix(""), args.retrain)
    return files


def check_reusable(
    edit: ConceptIncrement | WeightDifference, path: Path, concept: str, concepts: list[str],
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
    if isinstance(edit, ConceptIncrement):
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
) -> dict[str, ConceptIncrement | WeightDifference]:
    requested = {"iterations": args.iterations, "batch_size": args.train_batch_size, "seed": args.train_seed}
    edits = {}
    for concept, path in files.items():
        edits[concept] = load_any(path)
        check_reusable(edits[concept], path, concept, concepts, requested, fingerprint)
    return edits


# ------------------------------------------------------------------------------- evaluation
def oracle_classifier(oracle_dir: Path | None) -> ImageClassifier:
    """The toy oracle's artist head as an ACC classifier (classes: blank and the 9 toy artists)."""
    oracle = load_oracle(oracle_dir or TOY_DIR)
    artist = oracle.classifiers["artist"]
    classifier = ImageClassifier("toy-cnn", CLASS_NAMES, width=oracle.width)
    classifier.backbone[0].load_state_dict(artist.features.state_dict())
    classifier.head.load_state_dict(artist.head.state_dict())
    return classifier.eval()


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


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    timeline = SCENES[args.scene]
    outputs = {name: check_writable(args.output_dir / name, args.overwrite)
               for name in ("table.csv", "table.md", "scene.json", "grid.png")}
    model = load_model_from_args(args)
    world = class_mapping(model).world
    concepts = list(args.concepts or (ARTISTS if world == "toy" else SD_SCENE_ARTISTS))
    check_concepts(timeline, concepts)
    erased = [concepts[index] for index in timeline.erased_concepts]
    if args.classifier is None and world != "toy":
        raise SceneError("ACC needs --classifier on this model (train one with train-scripts/artist-cls-train.py).")
    classifier = load_classifier(args.classifier) if args.classifier else oracle_classifier(args.oracle_dir)
    classes = evaluated_classes(classifier, concepts)
    settings = sampling_settings(model, args.sampler, args.steps, args.guidance_scale)
    device = model.betas.device

    fingerprint = model_fingerprint(model)
    files = ensure_edit_files(args, concepts, erased, device.type)
    edits = load_edits(args, files, concepts, fingerprint)
    trained = time.perf_counter()
    separability = verify(model, list(edits.values())) if args.method == "sepce" else None
    originals = original_images(args, model, classes, settings)
    image_size = int(next(iter(originals.values())).shape[-1])
    evaluator = ConceptEvaluator(
        fid=resolve_fid_features(args.fid_features, image_size, classifier, args.inception_weights, args.oracle_dir),
        lpips=resolve_lpips(args.lpips_net, image_size, args.alexnet_weights, args.oracle_dir),
        classifier=classifier, batch_size=args.batch_size, device=device,
    )
    extractors = evaluator.extractors()
    extractors["acc"] += f" from {args.classifier or 'the toy oracle (artist head)'}"
    seeds = [args.seed + index for index in range(args.num_samples)]

    def sample(prompt: str) -> torch.Tensor:
        return sample_images(model, [prompt] * len(seeds), seeds, settings.steps, settings.guidance_scale,
                             settings.eta, args.batch_size, settings.sampler)

    result = run_scene(timeline, concepts, make_edits(model, edits), classes, originals, sample, evaluator,
                       announce=lambda message: print(message, flush=True))
    columns = [originals, *(result.images[step.label] for step in timeline.steps)]
    save_png(scene_grid(classes, columns, args.grid_images), outputs["grid.png"])
    header = (f"# {timeline.name}, {args.method}: {args.num_samples} images per class and step, seeds "
              f"{seeds[0]}..{seeds[-1]}, {settings.sampler} {settings.steps} steps, guidance "
              f"{settings.guidance_scale:g}\n\nGrid columns: original, "
              f"{', '.join(step.label for step in timeline.steps)}.\n\n")
    table = header + scene_markdown(result, extractors)
    write_text(outputs["table.csv"], scene_csv(result))
    write_text(outputs["table.md"], table)
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
