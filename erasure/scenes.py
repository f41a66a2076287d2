"""The paper's erase/restore scenes (METHOD.md §4): timelines, which increments a protocol trains
when, composing the model at every step, and sampling every class after each step.

A timeline is a list of time steps; each step erases some concepts and restores (brings back)
some earlier-erased ones. Concepts are indices into an ordered concept list (c0..c8). At each
step every concept has a role: ``erased`` (erased now; the paper's "forgotten"), ``restored``
(erased at an earlier step, back now; "recovered") or ``regular`` (never erased so far; the
blank class is always regular).

Protocols (which SepCE increments exist and what each protects, METHOD.md §2 and §4):
- ``paper``: a concept's increment is trained at the step it is first erased, jointly with the
  other concepts first erased then, and protects ``""``, the watermark prompt and every concept
  erased or restored so far (including the others erased with it). It is never recomputed:
  re-erasing a restored concept reuses it, and a concept erased later is NOT protected by it, so
  restoring that later concept is not exact, and regular concepts are not protected at all.
- ``protect_all`` (our extension): every increment is trained at the start and protects ``""``,
  the watermark prompt and every other concept of the scene, so restores are exact and regular
  concepts unchanged by construction; possible only while they all fit in the null space.

Composing follows the timeline on ONE model, in place:
- SepCE (``IncrementEdits``): erase = attach the concept's increment, restore = drop it.
- Baselines (``WeightDifferenceEdits``, CiE / ESD): the weights are the original plus the
  differences of the concepts erased now (as the paper merges baselines; recomputed from kept
  originals, so restoring leaves no rounding residue). The remaining differences still touch the
  restored concept, which is what the scenes show.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from erasure.bases import normalise_prompt
from erasure.edits import apply, remove
from erasure.errors import SceneError
from erasure.increments import Increment
from erasure.loading import model_fingerprint
from erasure.evaluation import evaluate
from erasure.metrics import ConceptEvaluator
from erasure.scene_tables import ERASED, EXACT, REGULAR, RESTORED, SceneResult, SceneRow
from erasure.weight_differences import DifferenceMerge, WeightDifference, check_base_model

#: What a scene measures per class and step (METHOD.md §4, as the paper's Table 2).
SCENE_METRICS = ("acc", "fid", "lpips")
PAPER, PROTECT_ALL = "paper", "protect_all"
PROTOCOLS = (PAPER, PROTECT_ALL)
#: The paper's nine artists in METHOD.md §4's concept order c0..c8 (not the classifier's class order).
SD_SCENE_ARTISTS: tuple[str, ...] = (
    "Cezanne", "Van Gogh", "Picasso", "Jackson Pollock", "Caravaggio", "Keith Haring", "Kelly McKernan",
    "Tyler Edlin", "Kilian Eng",
)


@dataclass(frozen=True)
class TimeStep:
    """One step of a timeline: the concept indices erased and restored at it."""

    label: str
    erase: tuple[int, ...] = ()
    restore: tuple[int, ...] = ()

    def describe(self, concepts: Sequence[str] | None = None) -> str:
        """``erase c0, c1; restore c2`` (concept names instead of c<i> when ``concepts`` is given)."""

        def names(indices: tuple[int, ...]) -> str:
            return ", ".join(concepts[index] if concepts else f"c{index}" for index in indices)

        parts = [f"erase {names(self.erase)}"] if self.erase else []
        parts += [f"restore {names(self.restore)}"] if self.restore else []
        return "; ".join(parts)


@dataclass(frozen=True)
class Timeline:
    """Time steps in order; validated on creation (see ``SceneError`` messages)."""

    name: str
    steps: tuple[TimeStep, ...]

    def __post_init__(self) -> None:
        if not self.steps:
            raise SceneError(f"{self.name}: a timeline needs at least one time step.")
        labels = [step.label for step in self.steps]
        if len(set(labels)) != len(labels):
            raise SceneError(f"{self.name}: time-step labels must be unique, got {labels}.")
        erased: set[int] = set()
        ever: set[int] = set()
        for step in self.steps:
            indices = step.erase + step.restore
            if not indices:
                raise SceneError(f"{self.name} {step.label}: the step erases and restores nothing; drop it.")
            if any(isinstance(index, bool) or not isinstance(index, int) or index < 0 for index in indices):
                raise SceneError(f"{self.name} {step.label}: concept indices must be integers >= 0, got {indices}.")
            if len(set(indices)) != len(indices):
                raise SceneError(f"{self.name} {step.label}: a concept appears twice in one step ({indices}).")
            never = [index for index in step.restore if index not in ever]
            if never:
                raise SceneError(
                    f"{self.name} {step.label}: cannot restore c{never[0]}, it was never erased; erase it at an "
                    f"earlier step or drop the restore."
                )
            not_erased = [index for index in step.restore if index not in erased]
            if not_erased:
                raise SceneError(
                    f"{self.name} {step.label}: cannot restore c{not_erased[0]}, it was restored already and is not "
                    f"erased then; erase it again first."
                )
            again = [index for index in step.erase if index in erased]
            if again:
                raise SceneError(
                    f"{self.name} {step.label}: c{again[0]} is erased already (twice without a restore); restore it "
                    f"at an earlier step or drop this erase."
                )
            erased = (erased - set(step.restore)) | set(step.erase)
            ever |= erased

    @property
    def concepts_needed(self) -> int:
        """How many concepts the timeline refers to (highest index + 1)."""
        return 1 + max(index for step in self.steps for index in step.erase + step.restore)

    @property
    def erased_concepts(self) -> tuple[int, ...]:
        """Every concept the timeline ever erases, in order of first erasure."""
        return tuple(dict.fromkeys(index for step in self.steps for index in step.erase))

    def erased_sets(self) -> list[frozenset[int]]:
        """The concepts erased after each step."""
        sets, erased = [], frozenset()
        for step in self.steps:
            erased = (erased - set(step.restore)) | set(step.erase)
            sets.append(erased)
        return sets

    def roles(self, num_concepts: int) -> list[dict[int, str]]:
        """Per step, the role of every concept index 0..num_concepts-1."""
        result, ever = [], set()
        for erased in self.erased_sets():
            ever |= erased
            result.append(
                {i: ERASED if i in erased else RESTORED if i in ever else REGULAR for i in range(num_concepts)}
            )
        return result


def _steps(*steps: tuple[str, Sequence[int], Sequence[int]]) -> tuple[TimeStep, ...]:
    return tuple(TimeStep(label, tuple(erase), tuple(restore)) for label, erase, restore in steps)


#: METHOD.md §4, verbatim (Scene1 and Scene2 have no t2 there; the labels are kept as written).
SCENES: dict[int, Timeline] = {
    1: Timeline("Scene1", _steps(("t0", range(6), ()), ("t1", (), (0, 1)), ("t3", (), (2,)))),
    2: Timeline("Scene2", _steps(("t0", range(6), ()), ("t1", (), (3, 4)), ("t3", (), (5,)))),
    3: Timeline(
        "Scene3",
        _steps(("t0", (0, 2, 4), ()), ("t1", (), (0, 2)), ("t2", (1, 3), ()), ("t3", (), (1,)), ("t4", (5,), ())),
    ),
    4: Timeline(
        "Scene4",
        _steps(
            ("t0", (0, 1, 2), ()), ("t1", (), (0,)), ("t2", (3, 4), ()), ("t3", (), (1,)), ("t4", (5,), ()),
            ("t5", (), (2,)),
        ),
    ),
}


# ------------------------------------------------------------------------------- protocols
@dataclass(frozen=True)
class TrainingGroup:
    """Concepts whose SepCE increments are trained together at ``step``; each protects ``""``, the
    watermark prompt, the other concepts of the group and ``protected`` (concept indices)."""

    step: str
    concepts: tuple[int, ...]
    protected: tuple[int, ...]

    def protected_prompts(self, index: int, concepts: Sequence[str]) -> list[str]:
        """The concept prompts that concept ``index``'s increment protects (besides "" and the watermark)."""
        return [concepts[i] for i in (*self.concepts, *self.protected) if i != index]


def training_plan(timeline: Timeline, protocol: str, num_concepts: int) -> list[TrainingGroup]:
    """Which increments ``protocol`` trains at which step (module docstring: the two protocols)."""
    if protocol not in PROTOCOLS:
        raise SceneError(f"Unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}.")
    if protocol == PROTECT_ALL:
        erased = timeline.erased_concepts
        rest = tuple(index for index in range(num_concepts) if index not in erased)
        return [TrainingGroup(timeline.steps[0].label, erased, rest)]
    groups, ever = [], ()
    for step in timeline.steps:
        new = tuple(index for index in step.erase if index not in ever)
        if new:
            groups.append(TrainingGroup(step.label, new, ever))
            ever = (*ever, *new)
    return groups


# ------------------------------------------------------------------------------- composing
class Edits(Protocol):
    """Per-concept edits that a timeline switches on (``erase``) and off (``restore``) in a model."""

    @property
    def concepts(self) -> list[str]:
        """The concepts it holds an edit for."""
        ...

    def erase(self, concepts: Sequence[str]) -> None: ...

    def restore(self, concepts: Sequence[str]) -> None: ...


class IncrementEdits:
    """SepCE increments: erase attaches them, restore removes them (exact)."""

    def __init__(self, model: nn.Module, increments: Mapping[str, Increment]) -> None:
        self.model = model
        self.increments = dict(increments)

    @property
    def concepts(self) -> list[str]:
        return list(self.increments)

    def erase(self, concepts: Sequence[str]) -> None:
        apply(self.model, [self.increments[concept] for concept in concepts])

    def restore(self, concepts: Sequence[str]) -> None:
        remove(self.model, [self.increments[concept] for concept in concepts])


class WeightDifferenceEdits:
    """Baseline weight differences: erased concepts' differences are merged into the original
    weights (``DifferenceMerge``: original + sum, so a restore is exact and the model is left
    bit for bit as it was found).

    All are checked against the base model up front: once one is added, the model's
    fingerprint is no longer the base model's.
    """

    def __init__(self, model: nn.Module, differences: Mapping[str, WeightDifference]) -> None:
        fingerprint = model_fingerprint(model)
        for difference in differences.values():
            check_base_model(difference, fingerprint)
        self.differences = dict(differences)
        self.merged = DifferenceMerge(model, list(self.differences.values()))
        self.erased: list[str] = []

    @property
    def concepts(self) -> list[str]:
        return list(self.differences)

    def _merge(self) -> None:
        self.merged.merge([self.differences[concept] for concept in self.erased])

    def erase(self, concepts: Sequence[str]) -> None:
        self.erased += [concept for concept in concepts if concept not in self.erased]
        self._merge()

    def restore(self, concepts: Sequence[str]) -> None:
        self.erased = [concept for concept in self.erased if concept not in concepts]
        self._merge()


def make_edits(model: nn.Module, edits: Mapping[str, Increment | WeightDifference]) -> Edits:
    """``IncrementEdits`` or ``WeightDifferenceEdits`` for ``{concept: edit}`` (one kind only)."""
    kinds = {type(edit) for edit in edits.values()}
    if kinds == {Increment}:
        return IncrementEdits(model, edits)
    if kinds == {WeightDifference}:
        return WeightDifferenceEdits(model, edits)
    names = sorted(kind.__name__ for kind in kinds) or ["nothing"]
    raise SceneError(f"A scene composes increments or weight differences, one kind at a time; got {names}.")


@dataclass(frozen=True)
class SceneState:
    """The model's state after one time step: which concepts are erased and every concept's role."""

    step: TimeStep
    erased: tuple[str, ...]
    roles: dict[str, str]


def check_concepts(timeline: Timeline, concepts: Sequence[str]) -> None:
    """Enough concepts for the timeline, each given once."""
    if len(concepts) < timeline.concepts_needed:
        raise SceneError(
            f"{timeline.name} refers to c0..c{timeline.concepts_needed - 1} but only {len(concepts)} concepts were "
            f"given; pass at least {timeline.concepts_needed} (--concepts)."
        )
    keys = [normalise_prompt(concept) for concept in concepts]
    repeated = sorted({concept for concept, key in zip(concepts, keys) if keys.count(key) > 1})
    if repeated:
        raise SceneError(f"Concepts {repeated} are given more than once; list each concept once.")


def check_scene(timeline: Timeline, concepts: Sequence[str], edited: Sequence[str]) -> None:
    """``check_concepts``, and an edit for every concept the timeline erases."""
    check_concepts(timeline, concepts)
    missing = [concepts[index] for index in timeline.erased_concepts if concepts[index] not in edited]
    if missing:
        raise SceneError(f"{timeline.name} erases {missing} but no increment or weight difference was given for them.")


def play(timeline: Timeline, concepts: Sequence[str], edits: Edits) -> Iterator[SceneState]:
    """Apply the timeline step by step to the edited model, yielding its state after each step.

    Within a step restores come before erasures. When the generator ends or is closed, every
    concept still erased is restored, so the model is left as it was found.
    """
    check_scene(timeline, concepts, edits.concepts)
    erased: list[int] = []
    try:
        for step, roles in zip(timeline.steps, timeline.roles(len(concepts))):
            if step.restore:
                edits.restore([concepts[i] for i in step.restore])
                erased = [i for i in erased if i not in step.restore]
            if step.erase:
                edits.erase([concepts[i] for i in step.erase])
                erased += list(step.erase)
            named_roles = {concepts[i]: role for i, role in roles.items()}
            yield SceneState(step, tuple(concepts[i] for i in sorted(erased)), named_roles)
    finally:
        if erased:
            edits.restore([concepts[i] for i in erased])


# ------------------------------------------------------------------------------- sampling every class
@dataclass(frozen=True)
class EvaluatedClass:
    """A row of the scene table: a class sampled with one wording set.

    ``concept`` is the concept whose role the row takes ("" for the blank class, always regular);
    ``wording`` is ``exact`` (the prompt as protected) or ``held-out`` (wordings never trained or
    protected, METHOD.md §2); ``prompts[i]`` is sampled with ``seeds[i]``; ``class_index`` None: no ACC.
    """

    name: str
    concept: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    class_index: int | None = None
    wording: str = EXACT


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float images as 8-bit (CPU), rounded as PNG files store them."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def run_scene(
    timeline: Timeline,
    concepts: Sequence[str],
    edits: Edits,
    classes: Sequence[EvaluatedClass],
    originals: Mapping[str, torch.Tensor],
    sample: Callable[[Sequence[str], Sequence[int]], torch.Tensor],
    evaluator: ConceptEvaluator,
    method: str = "",
    announce: Callable[[str], None] = lambda message: None,
) -> SceneResult:
    """Play the timeline and, after every step, sample every class and compare it with the original.

    ``sample(prompts, seeds)`` gives the edited model's images ([0, 1] floats); ``originals[name]``
    are the original model's images of the same prompts and seeds (uint8, as read from PNG). Both
    sides are compared as 8-bit images, so a class that samples the original's pixels scores FID
    and LPIPS 0.
    """
    result = SceneResult(timeline, list(concepts), method)
    with closing(play(timeline, concepts, edits)) as states:
        for state in states:
            announce(f"{timeline.name} {method} {state.step.label}: {state.step.describe(concepts)}; erased now: "
                     f"{list(state.erased) or 'none'}")
            result.images[state.step.label] = {}
            for evaluated in classes:
                images = to_uint8(sample(evaluated.prompts, evaluated.seeds))
                result.images[state.step.label][evaluated.name] = images
                metrics = evaluate(originals[evaluated.name], images, concept=evaluated.name,
                                   class_index=evaluated.class_index, metrics=SCENE_METRICS, evaluator=evaluator)
                role = state.roles.get(evaluated.concept, REGULAR)
                result.rows.append(SceneRow(state.step.label, role, metrics, evaluated.wording, evaluated.concept))
    return result
