"""Benchmark 7: does a SepCE erasure hold over wordings, objects and sets? (METHOD.md §6)

On the shipped toy model, ``erasure.train_sepce`` (``--solver``, default the closed form) erases:
- ``artist``: one artist ("ysolde marrin"), over the toy world's built-in artist wordings;
- ``object``: one object ("triangle"), over the built-in object wordings;
- ``joint``: sets of the first 2, 3 and 9 artists at once; then every member is restored alone
  (its increment dropped) and its bare prompt must come back exactly;
- ``protect``: the artist again, with every composition of the other eight artists in a protect
  file (128 prompts) at ``--energies`` (METHOD.md §6, approximate protection).
The toy oracle judges ``--samples`` images per prompt, before and after with the same seeds: the
concept's training wordings, its held-out wordings (data/toy-heldout-wordings.csv: never used to
erase, written before any tuning) and collateral prompts (other artists' compositions and bare
names, other objects, blank-style compositions). Seeds of prompts outside the held-out file start
at 8,000,000, which nothing else samples. Reported per case: the share drawn as the expected class
(objects: the share showing the expected object), the mean absolute pixel change (pixels in
[0, 1]), the solve seconds and the protected prompts' relative K/V change.

    python bench/wordings.py                      # 20 samples per prompt, all cases (~40 min on 2 CPU cores)
    python bench/wordings.py --quick              # 2 samples, fewer prompts: a smoke test
    python bench/wordings.py --cases artist --mu 0.1 1 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import (
    add_common_arguments,
    bench_parser,
    build_model,
    print_json,
    print_table,
    progress,
    require_models,
    run_main,
    setup,
    sized,
)
from erasure.edits import apply
from erasure.evaluation import pixel_change
from erasure.generation import generate
from erasure.increments import Increment
from erasure.settings import SepCESettings
from erasure.toy.oracle import ToyOracle, load_oracle
from erasure.toy.quality import WordingRow, read_wording_rows
from erasure.toy.world import ARTISTS, COLOURS, OBJECTS, class_index
from erasure.training import train_sepce
from erasure.wordings import default_templates, fill
from erasure.worlds import world_of

CASES = ("artist", "object", "joint", "protect")
ARTIST = "ysolde marrin"
OBJECT = "triangle"
JOINT_SIZES = (2, 3, 9)
FIRST_SEED = 8_000_000
THRESHOLD = 0.20
#: The oracle's labels per task and the images of one prompt's samples.
Verdict = tuple[dict[str, torch.Tensor], torch.Tensor]


def row(prompt: str, artist: str, seed: int) -> WordingRow:
    """A row expecting ``artist`` ("" = blank) and the colour / object words the prompt names."""
    words = prompt.split()
    colour = next((COLOURS.index(word) for word in words if word in COLOURS), None)
    obj = next((OBJECTS.index(word) for word in words if word in OBJECTS), None)
    return WordingRow(prompt, seed, class_index(artist), obj, colour)


class Judge:
    """The oracle's verdict on ``samples`` images per row, the original model's kept for every row."""

    def __init__(self, model: nn.Module, oracle: ToyOracle, samples: int) -> None:
        self.model, self.oracle, self.samples = model, oracle, samples
        self.original: dict[tuple[str, int], Verdict] = {}
        self.seeds: dict[str, int] = {}
        self.held_out_path = world_of(model).held_out_wordings_path()

    def held_out(self, concept: str, limit: int | None) -> list[WordingRow]:
        """The concept's rows of the world's held-out wordings (never used to erase)."""
        return read_wording_rows(self.held_out_path, concept=concept)[:limit]

    def rows(self, prompts: Sequence[tuple[str, str]]) -> list[WordingRow]:
        """Rows for (prompt, expected artist) pairs, each prompt with its own block of seeds."""
        result = []
        for prompt, artist in prompts:
            seed = self.seeds.setdefault(prompt, FIRST_SEED + 1000 * len(self.seeds))
            result.append(row(prompt, artist, seed))
        return result

    def _sample(self, rows: Sequence[WordingRow]) -> dict[tuple[str, int], Verdict]:
        prompts = [r.prompt for r in rows for _ in range(self.samples)]
        seeds = [r.seed + k for r in rows for k in range(self.samples)]
        images = generate(self.model, prompts, seeds, batch_size=50).cpu() if rows else torch.empty(0)
        labels = self.oracle.predict(images * 2 - 1) if rows else {}
        result = {}
        for index, r in enumerate(rows):
            part = slice(index * self.samples, (index + 1) * self.samples)
            result[r.prompt, r.seed] = ({task: value[part] for task, value in labels.items()}, images[part])
        return result

    def measure(self, rows: Sequence[WordingRow], edits: Sequence[Any]) -> dict[str, Any]:
        """Per group of ``rows``: expected-class share before / after, object share, pixel change."""
        self.original.update(self._sample([r for r in rows if (r.prompt, r.seed) not in self.original]))
        if edits:
            with apply(self.model, list(edits)):
                after = self._sample(rows)
        else:
            after = {(r.prompt, r.seed): self.original[r.prompt, r.seed] for r in rows}

        def share(verdicts: dict[tuple[str, int], Verdict], task: str) -> float | None:
            hits = []
            for r in rows:
                labels = verdicts[r.prompt, r.seed][0]
                if task == "artist":
                    hits += (labels["artist"] == r.class_id).tolist()
                elif r.obj is not None:
                    hits += (labels["object"] == r.obj).tolist()
            return sum(hits) / len(hits) if hits else None

        changes = [pixel_change(self.original[r.prompt, r.seed][1], after[r.prompt, r.seed][1]) for r in rows]
        return {
            "prompts": len(rows),
            "class_before": share(self.original, "artist"), "class_after": share(after, "artist"),
            "object_before": share(self.original, "object"), "object_after": share(after, "object"),
            "pixel_mean": statistics.mean(mean for mean, _ in changes),
            "pixel_max": max(largest for _, largest in changes),
        }


def erase(model: nn.Module, concepts: list[str], settings: SepCESettings) -> tuple[list[Increment], float]:
    started = time.perf_counter()
    increments = train_sepce(model, concepts, settings=settings)
    return increments, time.perf_counter() - started


def compositions(artists: Sequence[str], limit: int) -> list[tuple[str, str]]:
    """One ``a {colour} {object} by {artist}`` prompt per artist, cycling through the grid."""
    return [(f"a {COLOURS[i % 4]} {OBJECTS[(i + 1 + i // 4) % 4]} by {artist}", artist)
            for i, artist in enumerate(list(artists)[:limit])]


def artist_case(judge: Judge, settings: SepCESettings, quick: bool) -> list[dict[str, Any]]:
    others = [a for a in ARTISTS if a != ARTIST]
    [increment], seconds = erase(judge.model, [ARTIST], settings)
    trained = [fill(t, ARTIST) for t in default_templates("toy", "artist")]
    groups = {
        "bare name": judge.rows([(ARTIST, ARTIST)]),
        "training wordings": judge.rows([(p, ARTIST) for p in trained[: 4 if quick else None]]),
        "held-out wordings": judge.held_out(ARTIST, 4 if quick else None),
        "other artists' compositions": judge.rows(compositions(others, 3 if quick else 8)),
        "other artists' bare names": judge.rows([(a, a) for a in others[: 2 if quick else 8]]),
        "blank-style compositions": judge.rows([(f"a {c} {o}", "") for c, o in zip(COLOURS, OBJECTS[::-1])]
                                               [: 2 if quick else 4]),
    }
    return [{"case": "artist", "what": what, "solve_s": seconds, **judge.measure(rows, [increment]),
             "protection": increment.metadata["summary"]["protection"][ARTIST]["exact"]["worst"]}
            for what, rows in groups.items()]


#: The object recipe beside the default: map the object onto a neighbour and keep the other objects'
#: prompts (data/toy-protect-other-objects.txt: bare, "a", every colour, every colour by every artist)
#: at this share of their energy (METHOD.md §6).
NEIGHBOUR, OBJECT_ENERGY = "circle", 0.99
OTHER_OBJECTS = Path(__file__).resolve().parents[1] / "data" / "toy-protect-other-objects.txt"


def object_groups(judge: Judge, quick: bool) -> dict[str, list[WordingRow]]:
    """What an erasure of OBJECT is judged on: its training and held-out wordings, the held-out ones
    with the name removed (to be sampled from the original model: the closed form's default targets),
    the other objects, other objects by artists and the artists' bare names."""
    others = [o for o in OBJECTS if o != OBJECT]
    return {
        "training wordings": judge.rows([(fill(t, OBJECT), artist_of(fill(t, OBJECT)))
                                         for t in default_templates("toy", "object")][: 3 if quick else None]),
        "held-out wordings": judge.held_out(OBJECT, 3 if quick else None),
        # the closed form's targets, same seeds: how often the original model draws the object unasked
        NAME_REMOVED: [
            WordingRow(" ".join(r.prompt.replace(OBJECT, "").split()), r.seed, r.class_id, OBJECTS.index(OBJECT), None)
            for r in judge.held_out(OBJECT, 3 if quick else None)],
        "other objects": judge.rows([(f"a {c} {o}", "") for o in others for c in COLOURS[:2]][: 2 if quick else None]),
        "other objects by artists": judge.rows([(f"a {COLOURS[i]} {o} by {ARTISTS[i]}", ARTISTS[i])
                                                for i, o in enumerate(others)][: 1 if quick else None]),
        "artists' bare names": judge.rows([(a, a) for a in ARTISTS[: 2 if quick else 9]]),
    }


#: The group of ``object_groups`` sampled from the original model whatever the erasure.
NAME_REMOVED = "held-out wordings, name removed (original model)"


def object_case(judge: Judge, settings: SepCESettings, quick: bool) -> list[dict[str, Any]]:
    """The object with the default target ("" removes the name) and with the recipe: target
    NEIGHBOUR, every other object's prompt protected at OBJECT_ENERGY."""
    groups = object_groups(judge, quick)
    variants = {
        "object": replace(settings, concept_kind="object"),
        f"object -> {NEIGHBOUR}, others protected {OBJECT_ENERGY:g}": replace(
            settings, concept_kind="object", target=NEIGHBOUR, protect_file=str(OTHER_OBJECTS),
            protect_energy=OBJECT_ENERGY),
    }
    results = []
    for case, variant in variants.items():
        [increment], seconds = erase(judge.model, [OBJECT], variant)
        for what, rows in groups.items():
            edits = [] if what == NAME_REMOVED else [increment]
            results.append({"case": case, "what": what, "solve_s": seconds, **judge.measure(rows, edits),
                            "protection": increment.metadata["summary"]["protection"][OBJECT]["exact"]["worst"],
                            "dims": increment.basis.dims})
    return results


def artist_of(prompt: str) -> str:
    return next((artist for artist in ARTISTS if prompt.endswith(artist)), "")


def joint_case(judge: Judge, settings: SepCESettings, quick: bool) -> list[dict[str, Any]]:
    """Sets of 2, 3 and 9 artists erased together, each solved alone (the default) and together
    (``--joint_objective paper``: the sum fitted to every member's wordings)."""
    results = []
    for objective in ("per_concept", "paper"):
        results += joint_sets(judge, replace(settings, joint_objective=objective), quick)
    return results


def joint_sets(judge: Judge, settings: SepCESettings, quick: bool) -> list[dict[str, Any]]:
    results = []
    for size in JOINT_SIZES[:1] if quick else JOINT_SIZES:
        members = list(ARTISTS[:size])
        increments, seconds = erase(judge.model, members, settings)
        results += [{"case": f"joint {size} ({settings.joint_objective})", "solve_s": seconds, **result}
                    for result in measure_set(judge, members, increments, quick)]
    return results


def measure_set(judge: Judge, members: Sequence[str], edits: Sequence[Any], quick: bool) -> list[dict[str, Any]]:
    """A set erased at once (``edits[i]`` erases ``members[i]``): every member's bare prompt and
    held-out wordings with every edit applied, then its bare prompt with its own edit dropped."""
    results = []
    for member in members:
        rows = judge.rows([(member, member)]) + judge.held_out(member, 1 if quick else 2)
        results.append({"what": f"{member}: bare + held-out, all erased", **judge.measure(rows, edits)})
    for member, edit in zip(members, edits):
        kept = [other for other in edits if other is not edit]
        results.append({"what": f"{member}: bare, restored alone", **judge.measure(judge.rows([(member, member)]), kept)})
    return results


def protect_case(judge: Judge, settings: SepCESettings, energies: Sequence[float], quick: bool) -> list[dict[str, Any]]:
    others = [a for a in ARTISTS if a != ARTIST]
    protected = [f"a {c} {o} by {a}" for a in others for c in COLOURS for o in OBJECTS]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-protect-") as folder:
        path = Path(folder) / "protect.txt"
        path.write_text("\n".join(protected) + "\n", encoding="utf-8")
        for energy in energies:
            energy_settings = replace(settings, protect_file=str(path), protect_energy=energy)
            [increment], seconds = erase(judge.model, [ARTIST], energy_settings)
            report = increment.metadata["summary"]["protection"][ARTIST]
            groups = {
                "other artists' compositions (protected)": judge.rows(compositions(others, 3 if quick else 8)),
                "held-out wordings": judge.held_out(ARTIST, 3 if quick else 8),
            }
            for what, rows in groups.items():
                results.append({"case": f"protect {energy}", "what": what, "solve_s": seconds,
                                **judge.measure(rows, [increment]), "protection": report["approximate"]["median"],
                                "protection_worst": report["approximate"]["worst"],
                                "dims": increment.basis.dims})
    return results


def main(args: argparse.Namespace) -> None:
    device = setup(args)
    require_models(["toy"])
    samples = sized(args.samples, args.quick, 2, 20)
    if samples < 1:
        raise ValueError("--samples must be >= 1.")
    model = build_model("toy", device)
    judge = Judge(model, load_oracle(device=device), samples)
    results = []
    for mu in args.mu:
        settings = SepCESettings(solver=args.solver, mu=mu, progress=False, iterations=args.iterations,
                                 save_every=0, seed=args.seed, tau=args.tau, target=args.target,
                                 protect_file=args.protect_file, protect_energy=args.protect_energy,
                                 concept_templates=args.concept_templates)
        for case in args.cases:
            progress(f"{case}, mu {mu}")
            if case == "artist":
                rows = artist_case(judge, settings, args.quick)
            elif case == "object":
                rows = object_case(judge, settings, args.quick)
            elif case == "joint":
                rows = joint_case(judge, settings, args.quick)
            else:
                rows = protect_case(judge, settings, args.energies, args.quick)
            results.extend({"mu": mu, **result} for result in rows)
    print_table(
        f"SepCE ({args.solver}) on the toy model: share drawn as the expected class / showing the expected object, "
        f"before -> after ({samples} samples per prompt, same seeds)",
        [{**r, **{key: f"{r[key]:.3g}" for key in r if isinstance(r[key], float)}} for r in results],
        ["mu", "case", "what", "prompts", "class_before", "class_after", "object_before", "object_after",
         "pixel_mean", "pixel_max", "solve_s", "protection"],
    )
    print_json("wordings", args, device, {"samples": samples, "threshold": THRESHOLD, "results": results})


def parser() -> argparse.ArgumentParser:
    result = bench_parser(__doc__)
    result.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="default: all")
    result.add_argument("--solver", choices=("closed_form", "closed_form+cie", "cie"), default="closed_form",
                        help="SepCE's solver (default: closed_form; the others need training images and minutes)")
    result.add_argument("--mu", type=float, nargs="+", default=[SepCESettings().mu],
                        help=f"closed-form ridge(s) (default: {SepCESettings().mu})")
    result.add_argument("--energies", type=float, nargs="+", default=[0.999, 0.99],
                        help="protect_energy values of the protect case (default: 0.999 0.99)")
    result.add_argument("--samples", type=int, default=None, help="samples per prompt (default: 20; --quick: 2)")
    result.add_argument("--iterations", type=int, default=1000, help="step limit of the optimising solvers")
    result.add_argument("--concept_templates", default=None,
                        help="wordings file of the solvers (default: the built-in ones; the groups measured stay the "
                        "built-in training wordings and the held-out file)")
    result.add_argument("--protect_file", default=None,
                        help="prompts every case's increments also protect (--protect_energy; the protect case adds its own)")
    result.add_argument("--protect_energy", type=float, default=SepCESettings().protect_energy,
                        help=f"share of --protect_file's energy kept (default: {SepCESettings().protect_energy:g})")
    result.add_argument("--target", default=SepCESettings().target,
                        help="what replaces the concept's name in every wording (default: '' = removed)")
    result.add_argument("--tau", type=float, default=SepCESettings().tau,
                        help=f"momentum stop of the optimising solvers (default: {SepCESettings().tau})")
    return add_common_arguments(result, repeats=None)


if __name__ == "__main__":
    run_main(main, parser())
