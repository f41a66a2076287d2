"""Benchmark 4: wall time until the erased toy artist is gone, SepCE vs CiE vs ESD-x vs the closed form.

On the shipped toy model (models/toy/) each method erases the first toy artist with the
library's trainer at the training scripts' toy-model defaults (learning rates:
``erasure.settings.DEFAULT_LEARNING_RATES``; at most 1000 steps; SepCE and CiE keep their momentum
stop, ESD-x has none; SepCE's basis protects "" and the other 8 artists, as train-sepce.py's
``--protect_classes`` does there). Every ``--check_every`` steps the
clock stops and the toy oracle scores ``--check_samples`` samples of the artist's prompt; the
method is done when that accuracy is <= 0.20 (or when it stops or reaches its step limit
without getting there, reported as not reached). Reported per method: training seconds to the
threshold (checks excluded), steps, the seconds spent making its training images (SepCE and
CiE train on images of the artist made by the original model; ESD-x needs none) and, from
``erasure.toy.quality.measure_quality`` with ``--samples`` per class before and after, the
erased artist's accuracy and two measures of collateral damage on the other nine classes (blank + 8
artists): their mean accuracy change, and the mean absolute pixel change of their samples (same
seeds before and after, pixels in [0, 1]; accuracy alone cannot tell a method that leaves the
other classes untouched from one that redraws them in a way the oracle still recognises).
Goal: SepCE >= 3x faster than ESD-x (total seconds, training images included) with less collateral
damage (an accuracy change no larger and a smaller pixel change).
``closed_form`` is SepCE's closed-form solve (METHOD.md §6; ``train_sepce`` with
``solver="closed_form"``, bases included, no training images, no steps), checked once. Every method
is also judged on the artist's training wordings (the closed form's built-in ones) and its
held-out wordings (data/toy-heldout-wordings.csv), ``--wording_samples`` each. Goal of the closed
form: >= 100x faster than ESD-x in total seconds (model loading excluded for both) with its
held-out wordings erased at least as well.

The ``object`` and ``joint`` cases erase the object "triangle" and the sets of the first 2, 3 and 9
artists with every method at the library's defaults (``train_sepce`` with its solver and the
concept kind's built-in wordings, ``train_cie`` and ``train_esd`` per concept, their weight
differences merged as the paper merges baselines; ESD-x ``--esd_iterations`` steps per concept,
since it has no stop rule). Each is judged as bench/wordings.py judges the closed form (same
prompts, seeds and groups): the object's training and held-out wordings, the other objects, the
artists; every member of a set with the whole set erased, then with its own edit dropped
(restored). Seconds: training to the method's own stop, and the training images of every member.

    python bench/time_to_erase.py                   # needs models/toy/model.safetensors
    python bench/time_to_erase.py --cases artist    # only the time-to-erase table of one artist
    python bench/time_to_erase.py --quick           # fewer samples, images and steps (still the toy model)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from common import (
    CONCEPT,
    add_common_arguments,
    bench_settings,
    bench_parser,
    build_model,
    make_fabric,
    make_trainer,
    print_json,
    print_table,
    progress,
    require_models,
    run_main,
    setup,
    sized,
)
from erasure.edits import Edit, apply
from erasure.evaluation import pixel_change
from erasure.generation import generate
from erasure.toy.oracle import ToyOracle, load_oracle
from erasure.increments import Increment
from erasure.toy.quality import SEED_STRIDE, WordingRow, measure_prompts, measure_quality, read_wording_rows
from erasure.toy.world import ARTISTS, CLASS_NAMES, COLOURS, OBJECTS, class_index, class_prompt
from erasure.settings import CiESettings, ESDSettings, SepCESettings
from erasure.trainers.data import encode_images
from erasure.trainers.loop import ConceptTrainer
from erasure.training import train_cie, train_esd, train_sepce
from erasure.wordings import default_templates, fill
from erasure.worlds import world_of
from wordings import JOINT_SIZES, NAME_REMOVED, OBJECT, Judge, measure_set, object_groups

METHODS = ("sepce", "cie", "esd_x", "closed_form", "closed_form_cie")
CASES = ("artist", "object", "joint")
#: The SepCE solver behind each SepCE method name of the object and joint cases.
SEPCE_SOLVERS = {"sepce": "cie", "closed_form": "closed_form", "closed_form_cie": "closed_form+cie"}
THRESHOLD = 0.20
SPEED_GOAL = 3.0
#: The closed form's goal against ESD-x (total seconds, model loading excluded for both).
CLOSED_FORM_GOAL = 100.0
LAMBDAS = {"sepce": SepCESettings().lam, "cie": CiESettings().lam, "esd_x": 0.0}
#: Seeds of the training-wording samples (the held-out file's rows bring their own): used by nothing else.
WORDING_SEED = 9_000_000
#: First seed of the other artists' compositions (collateral), far from every other seed here.
COMPOSITION_SEED = 9_500_000
TAU = 1e-4
MAX_STEPS = 1000


def artist_accuracy(model: nn.Module, oracle: ToyOracle, class_id: int, samples: int, seed: int) -> float:
    """The oracle's accuracy on ``samples`` images of class ``class_id``'s prompt, with the seeds
    ``measure_quality`` uses for that class."""
    seeds = [seed + class_id * SEED_STRIDE + index for index in range(samples)]
    images = generate(model, [class_prompt(class_id)] * samples, seeds, batch_size=50)
    predicted = oracle.predict(images.to(next(oracle.parameters()).device) * 2 - 1)["artist"]
    return float((predicted.cpu() == class_id).float().mean())


def erase_until(
    trainer: ConceptTrainer, accuracy: Callable[[], float], threshold: float, check_every: int
) -> dict[str, Any]:
    """Step ``trainer`` until ``accuracy()`` <= ``threshold`` (checked every ``check_every`` steps and
    when the trainer stops); only the steps are timed. Returns steps, seconds and every check."""
    seconds, step, checks = 0.0, 0, []
    device = trainer.fabric.device
    while trainer.training_concepts():
        started = time.perf_counter()
        trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - started
        step += 1
        if step % check_every == 0 or not trainer.training_concepts():
            value = accuracy()
            progress(f"step {step}: accuracy {value:.2f} after {seconds:.1f} s of training")
            checks.append({"step": step, "seconds": seconds, "accuracy": value})
            if value <= threshold:
                return {"reached": True, "steps": step, "train_s": seconds, "checks": checks}
    return {"reached": False, "steps": step, "train_s": seconds, "checks": checks,
            "stop_reason": trainer.stoppers[CONCEPT].stop_reason}


def training_images(model: nn.Module, count: int, concept: str = CONCEPT) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images of ``concept`` by the original model, 8-bit quantised as the training
    scripts' PNG files are (seeds 0..count-1, the model's default sampling), and their latents."""
    images = (generate(model, [concept] * count, list(range(count))) * 255).round() / 255
    return images, encode_images(model, images)


def wording_rows(model: nn.Module) -> dict[str, list[WordingRow]]:
    """The artist's training wordings (the closed form's built-in ones), its held-out wordings, and
    one "a {colour} {object} by {artist}" composition of every other artist (collateral)."""
    trained = [fill(template, CONCEPT) for template in default_templates("toy", "artist")]
    class_id = class_index(CONCEPT)
    others = [artist for artist in ARTISTS if artist != CONCEPT]
    return {
        "training": [WordingRow(p, WORDING_SEED + 1000 * i, class_id, None, None) for i, p in enumerate(trained)],
        "held_out": read_wording_rows(world_of(model).held_out_wordings_path(), concept=CONCEPT),
        "other_compositions": [
            WordingRow(f"a {COLOURS[i % 4]} {OBJECTS[(i + 1) % 4]} by {artist}", COMPOSITION_SEED + 1000 * i,
                       class_index(artist), (i + 1) % 4, i % 4)
            for i, artist in enumerate(others)
        ],
    }


def wording_accuracy(
    model: nn.Module, oracle: ToyOracle, rows: dict[str, list[WordingRow]], samples: int,
    images: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Share of samples drawn as the expected class per group (the artist for its wordings, each
    other artist for its composition); ``images`` receives every prompt's samples."""
    return {name: measure_prompts(model, oracle, group, samples, images=images).attribute_artist
            for name, group in rows.items()}


def closed_form_run(
    model: nn.Module, accuracy: Callable[[], float], solver: str = "closed_form", images: torch.Tensor | None = None,
    max_steps: int = MAX_STEPS, seed: int = 0,
) -> tuple[dict[str, Any], list[Increment]]:
    """The closed-form solve (bases included) or the optimiser started from it (``closed_form+cie``,
    to its stop on the given training images), timed, then one accuracy check with it applied."""
    settings = SepCESettings(solver=solver, progress=False, iterations=max_steps, seed=seed, save_every=0)
    started = time.perf_counter()
    increments = train_sepce(model, [CONCEPT], settings=settings, images=None if images is None else {CONCEPT: images})
    seconds = time.perf_counter() - started
    with apply(model, increments):
        value = accuracy()
    steps = increments[0].metadata.get("training", {}).get("steps", 0)  # the optimiser's, after the solve
    return {"reached": value <= THRESHOLD, "steps": steps, "train_s": seconds,
            "checks": [{"step": steps, "seconds": seconds, "accuracy": value}]}, increments


def others_change(before: dict[str, float], after: dict[str, float], erased: str) -> float:
    return statistics.mean(after[name] - before[name] for name in CLASS_NAMES if name != erased)


def others_pixel_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], erased: str) -> float:
    """Mean absolute pixel change of the other classes' samples (same seeds), pixels in [0, 1]."""
    return statistics.mean(pixel_change(before[name], after[name])[0] for name in CLASS_NAMES if name != erased)


def main(args: argparse.Namespace) -> None:
    device = setup(args)
    require_models(["toy"])
    args.max_steps = sized(args.max_steps, args.quick, 20, MAX_STEPS)
    args.num_images = sized(args.num_images, args.quick, 8, 100)
    args.sizes = sized(args.sizes, args.quick, list(JOINT_SIZES[:1]), list(JOINT_SIZES))
    args.esd_iterations = sized(args.esd_iterations, args.quick, 5, 50)
    if min(args.max_steps, args.num_images, args.esd_iterations, *args.sizes) < 1 or max(args.sizes) > len(ARTISTS):
        raise ValueError(f"--max_steps, --num_images and --esd_iterations must be >= 1 and --sizes in 1..{len(ARTISTS)}.")
    results: dict[str, Any] = {}
    if "artist" in args.cases:
        results["artist"] = artist_case(args, device)
    if {"object", "joint"} & set(args.cases):
        results["sets"] = sets_case(args, device)
    print_json("time_to_erase", args, device, results)


def artist_case(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The first artist, each method stepped until its prompt is erased, then judged (module docstring)."""
    samples = sized(args.samples, args.quick, 10, 100)
    check_samples = sized(args.check_samples, args.quick, 5, 20)
    if min(samples, check_samples, args.check_every) < 1:
        raise ValueError("--samples, --check_samples and --check_every must be >= 1.")
    oracle = load_oracle(device=device)
    class_id = class_index(CONCEPT)
    original = build_model("toy", device)
    before_images: dict[str, torch.Tensor] = {}
    before = measure_quality(original, oracle, samples, args.seed, images=before_images).artist
    wordings = wording_rows(original)
    wording_samples = sized(args.wording_samples, args.quick, 1, 10)
    if args.quick:
        wordings = {name: rows[:2] for name, rows in wordings.items()}
    wording_images_before: dict[str, torch.Tensor] = {}
    wordings_before = wording_accuracy(original, oracle, wordings, wording_samples, wording_images_before)
    started = time.perf_counter()
    images, latents = training_images(original, args.num_images)
    data_s = time.perf_counter() - started
    del original
    # SepCE protects "" and the other classes, as train-sepce.py does on the toy model (--protect_classes)
    other_classes = [class_prompt(index) for index in range(1, len(CLASS_NAMES)) if class_prompt(index) != CONCEPT]
    rows, runs = [], {}
    for method in args.methods:
        progress(f"{method}: erasing {CONCEPT!r}")
        model = build_model("toy", device)
        def check(model: nn.Module = model) -> float:
            return artist_accuracy(model, oracle, class_id, check_samples, args.seed)

        edits: list[Increment] = []
        if method == "closed_form":  # no training images, no steps: one solve
            run, edits = closed_form_run(model, check)
        elif method == "closed_form_cie":  # the solve, then the optimiser from it to its stop (one check at the end)
            run, edits = closed_form_run(model, check, "closed_form+cie", images, args.max_steps, args.seed)
        else:
            settings = bench_settings(method, "toy", args.seed, iterations=args.max_steps, tau=TAU, lam=LAMBDAS[method])
            trainer = make_trainer(method, model, make_fabric(device), latents, settings, protected=other_classes)
            run = erase_until(trainer, check, THRESHOLD, args.check_every)
        after_images: dict[str, torch.Tensor] = {}
        with apply(model, edits) if edits else nullcontext():
            after = measure_quality(model, oracle, samples, args.seed, images=after_images).artist
            wording_images_after: dict[str, torch.Tensor] = {}
            wordings_after = wording_accuracy(model, oracle, wordings, wording_samples, wording_images_after)
        method_data_s = 0.0 if method in ("esd_x", "closed_form") else data_s
        run.update(data_s=method_data_s, total_s=run["train_s"] + method_data_s, erased_accuracy=after[CONCEPT],
                   others_mean_change=others_change(before, after, CONCEPT),
                   others_pixel_change=others_pixel_change(before_images, after_images, CONCEPT),
                   training_wordings=wordings_after["training"], held_out_wordings=wordings_after["held_out"],
                   compositions_class=wordings_after["other_compositions"],
                   compositions_pixel_change=statistics.mean(
                       pixel_change(wording_images_before[r.prompt], wording_images_after[r.prompt])[0]
                       for r in wordings["other_compositions"]))
        runs[method] = run
        rows.append({"method": method, **{key: value for key, value in run.items() if key != "checks"}})
    goal: dict[str, Any] = {"speed_goal": SPEED_GOAL}
    if {"sepce", "esd_x"} <= set(runs) and runs["sepce"]["reached"] and runs["esd_x"]["reached"]:
        sepce, esd_x = runs["sepce"], runs["esd_x"]
        speedup = esd_x["total_s"] / sepce["total_s"]
        less_damage = (abs(sepce["others_mean_change"]) <= abs(esd_x["others_mean_change"])
                       and sepce["others_pixel_change"] < esd_x["others_pixel_change"])
        goal.update(esd_x_over_sepce_time=speedup, esd_x_over_sepce_train_time=esd_x["train_s"] / sepce["train_s"],
                    sepce_less_collateral=less_damage, met=speedup >= SPEED_GOAL and less_damage)
    else:
        goal["met"] = False
    if {"closed_form", "esd_x"} <= set(runs):
        ratio = runs["esd_x"]["total_s"] / runs["closed_form"]["total_s"]
        goal.update(esd_x_over_closed_form_time=ratio, closed_form_goal=CLOSED_FORM_GOAL,
                    closed_form_met=ratio >= CLOSED_FORM_GOAL
                    and runs["closed_form"]["held_out_wordings"] <= runs["esd_x"]["held_out_wordings"])
    print_table(
        f"Time until the oracle's accuracy on {CONCEPT!r} <= {THRESHOLD} (checks of {check_samples} samples every "
        f"{args.check_every} steps; quality with {samples} samples per class)",
        rows,
        ["method", "reached", "steps", "train_s", "data_s", "total_s", "erased_accuracy", "training_wordings",
         "held_out_wordings", "others_mean_change", "others_pixel_change", "compositions_class",
         "compositions_pixel_change"],
    )
    return {"before": before, "wordings_before": wordings_before, "runs": runs, "goal": goal}


def erase_set(
    method: str, model: nn.Module, concepts: list[str], kind: str, images: dict[str, torch.Tensor],
    args: argparse.Namespace,
) -> tuple[list[Edit], float]:
    """``concepts`` erased by ``method`` through the library, with its defaults: the SepCE solvers in one
    call (one increment per concept, solved or trained together), CiE and ESD-x one weight difference
    per concept, merged as the paper merges baselines. Returns the edits and the seconds it took."""
    common = {"progress": False, "save_every": 0, "seed": args.seed}
    started = time.perf_counter()
    if method in SEPCE_SOLVERS:
        settings = SepCESettings(solver=SEPCE_SOLVERS[method], concept_kind=kind, iterations=args.max_steps, **common)
        edits: list[Edit] = list(train_sepce(model, concepts, settings=settings,
                                             images=None if method == "closed_form" else images))
    elif method == "cie":
        settings = CiESettings(iterations=args.max_steps, **common)
        edits = [train_cie(model, concept, settings=settings, images=images) for concept in concepts]
    else:
        settings = ESDSettings(train_method="xattn", iterations=args.esd_iterations, **common)
        edits = [train_esd(model, concept, settings=settings) for concept in concepts]
    return edits, time.perf_counter() - started


def summarise_sets(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """One line per case and method of ``sets_case``'s rows: seconds, then for the object its share on
    each group, for a set how many members are erased (<= THRESHOLD on bare + held-out wordings), the
    worst member and the restores (lowest share drawn as the member, largest pixel change)."""
    lines: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        line = lines.setdefault((r["case"], r["method"]), {
            "case": r["case"], "method": r["method"], "total_s": f"{r['train_s'] + r['data_s']:.3g}",
            "train_s": f"{r['train_s']:.3g}", "data_s": f"{r['data_s']:.3g}"})
        if r["case"] == "object":
            task = "class" if r["object_after"] is None else "object"  # groups without an object: the artist
            before, after = r[f"{task}_before"], r[f"{task}_after"]
            line[r["what"]] = f"{after:.2f}" if r["what"] == NAME_REMOVED else f"{before:.2f} -> {after:.2f}"
            if r["what"] == "artists' bare names":
                line["artists' pixel change"] = f"{r['pixel_mean']:.2g}"
        elif r["what"].endswith("all erased"):
            line.setdefault("erased", []).append(r["class_after"])
        else:
            line.setdefault("restored", []).append((r["class_after"], r["pixel_max"]))
    summaries: dict[str, list[dict[str, Any]]] = {}
    for (case, _), line in lines.items():
        if case != "object":
            erased, restored = line.pop("erased"), line.pop("restored")
            line.update({"members erased": f"{sum(v <= THRESHOLD for v in erased)} / {len(erased)}",
                         "worst member": f"{max(erased):.2f}",
                         "restored: lowest share": f"{min(share for share, _ in restored):.2f}",
                         "restored: largest pixel change": f"{max(change for _, change in restored):.2g}"})
        title = (f"Object {OBJECT!r}: share showing it (artists: drawn as the artist), before -> after" if case == "object"
                 else "Joint sets: members erased, worst member, restores (one member's edit dropped)")
        summaries.setdefault(title, []).append(line)
    return summaries


def steps_of(edit: Edit) -> int:
    """The optimiser steps behind an edit (0 for the closed form)."""
    if isinstance(edit, Increment):
        return edit.metadata.get("training", {}).get("steps", 0)
    return edit.metadata["summary"]["concepts"][edit.concept]["steps"]


def sets_case(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """The object and the joint sets, every method, judged as bench/wordings.py judges the closed form."""
    model = build_model("toy", device)
    judge = Judge(model, load_oracle(device=device), sized(args.wording_samples, args.quick, 1, 10))
    jobs = []  # (case, kind, members)
    if "object" in args.cases:
        jobs.append(("object", "object", [OBJECT]))
    if "joint" in args.cases:
        jobs += [(f"joint {size}", "artist", list(ARTISTS[:size])) for size in args.sizes]
    images: dict[str, torch.Tensor] = {}
    data_s: dict[str, float] = {}
    for concept in sorted({member for _, _, members in jobs for member in members}):
        started = time.perf_counter()
        images[concept] = training_images(model, args.num_images, concept)[0]
        data_s[concept] = time.perf_counter() - started
    rows: list[dict[str, Any]] = []
    for case, kind, members in jobs:
        for method in args.methods:
            progress(f"{case}: {method} erasing {', '.join(members)}")
            edits, seconds = erase_set(method, model, members, kind, images, args)
            needs_images = method not in ("esd_x", "closed_form")
            timing = {"case": case, "method": method, "train_s": seconds,
                      "data_s": sum(data_s[m] for m in members) if needs_images else 0.0,
                      "steps": [steps_of(edit) for edit in edits]}
            if kind == "object":
                measured = [{"what": what, **judge.measure(group, [] if what == NAME_REMOVED else edits)}
                            for what, group in object_groups(judge, args.quick).items()]
            else:
                measured = measure_set(judge, members, edits, args.quick)
            rows += [{**timing, **result} for result in measured]
    for title, summary in summarise_sets(rows).items():
        print_table(title, summary, list(summary[0]))
    print_table(
        f"Object {OBJECT!r} and joint sets of the first artists, every method with the library's defaults "
        f"(ESD-x {args.esd_iterations} steps per concept; CiE and ESD-x merged): share drawn as the expected "
        f"class / showing the expected object, before -> after ({judge.samples} samples per prompt, same seeds)",
        [{**r, **{key: f"{r[key]:.3g}" for key in r if isinstance(r[key], float)}} for r in rows],
        ["case", "method", "what", "prompts", "class_before", "class_after", "object_before", "object_after",
         "pixel_mean", "train_s", "data_s", "steps"],
    )
    return rows


def parser() -> argparse.ArgumentParser:
    result = bench_parser(__doc__)
    result.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="default: all five")
    result.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                        help="artist: time to erase one artist; object: the object 'triangle'; joint: sets of the "
                        "first --sizes artists (default: all)")
    result.add_argument("--sizes", type=int, nargs="+", default=None,
                        help=f"joint set sizes (default: {' '.join(map(str, JOINT_SIZES))}; --quick: {JOINT_SIZES[0]})")
    result.add_argument("--esd_iterations", type=int, default=None,
                        help="ESD-x steps per concept in the object and joint cases (ESD has no stop rule; "
                        "default 50, what the artist case measures it needs; --quick: 5)")
    result.add_argument("--wording_samples", type=int, default=None,
                        help="samples per training / held-out wording of the artist (default: 10; --quick: 1)")
    result.add_argument("--samples", type=int, default=None,
                        help="quality samples per class (default: 100; --quick: 10)")
    result.add_argument("--check_samples", type=int, default=None,
                        help="samples per accuracy check (default: 20; --quick: 5)")
    result.add_argument("--check_every", type=int, default=10, help="steps between accuracy checks (default: 10)")
    result.add_argument("--max_steps", type=int, default=None,
                        help="step limit per method (default: 1000; --quick: 20)")
    result.add_argument("--num_images", type=int, default=None,
                        help="training images of the artist for SepCE and CiE (default: 100 as the training scripts; "
                             "--quick: 8)")
    return add_common_arguments(result, repeats=None)


if __name__ == "__main__":
    run_main(main, parser())
