"""Closed-form SepCE coefficients (METHOD.md §6): a ridge least-squares solve, no images, no UNet call.

For concept c with null-space basis S [k, d] (orthonormal rows, erasure.bases) and every
cross-attention key/value projection W_l [out, d], choose A_l [out, k] to minimise

    sum_i omega_i ||(W_l + A_l S) x_i - W_l y_i||^2 + mu ||A_l||^2

where x_i are token rows of the concept's wordings and y_i the aligned rows of their targets
(``erasure.wordings``). With X, Y the stacked rows scaled by sqrt(omega_i), B = S X^T and
M = B B^T + mu I, the solution is A_l = W_l (Y - X)^T B^T M^{-1} = W_l G: one [k, k] solve,
shared by every layer, in float64. The increment's coefficients are w_l = A_l / beta, so the
file is an ordinary increment (compose, restore and export are unchanged) and, because
dW_l = A_l S lives in the null space, every exactly protected prompt keeps its keys and values.

Token alignment (METHOD.md §6). Cross-attention treats the L keys/values of a prompt as a set,
so the edit should make the concept's L rows equal the target's L rows as a set. The causal
encoder gives the tokens before the name the same output in both, so the wording and its target
are paired token by token: start token and prefix with themselves (zero residual: they act as
rows to keep), then everything after the name (suffix, end token, padding) with the target's
tokens after the replacement, in order; the name's tokens are paired with what is left over
(the target's last padding tokens, or the replacement's tokens). Every pair has weight
omega = 1: without the UNet's attention weights, a uniform prior over the keys a query may
read bounds the change of the attention output by the unweighted sum (Cauchy-Schwarz).

Joint sets (``joint=True``, ``--joint_objective paper``): the members' edits all act on every
member's wordings (each basis protects the others' exact prompts only), so they can be solved
together, the sum fitted to every member's rows (``solve_joint_maps``); protection and
restoration stay exact, unprotected prompts move more (METHOD.md §6).

Ridge mu. ``mu`` is relative: the absolute ridge is ``mu * trace(B B^T) / k``, the mean
eigenvalue of B B^T, so one value suits every model width and number of wordings. Small mu
fits the wordings closely with large edits (more drift on unprotected prompts); large mu
shrinks the edit toward zero.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from erasure.bases import ConceptBasis, encode_prompts, normalise_prompt
from erasure.errors import SettingsError
from erasure.files import versions
from erasure.increments import Increment, cross_attention_kv, slugify
from erasure.loading import model_fingerprint
from erasure.settings import SepCESettings
from erasure.wordings import concept_wordings, default_templates, fill, read_templates
from erasure.worlds import world_of

#: METHOD.md §6 (measured in BENCHMARKS.md §7): the toy artist is erased as at 0.1, with less drift elsewhere.
DEFAULT_MU = SepCESettings.mu


@dataclass
class WordingRows:
    """Aligned token rows of one concept: ``concept`` [n, d] and ``target`` [n, d], float64."""

    wordings: list[str]
    targets: list[str]
    concept: torch.Tensor
    target: torch.Tensor


def _tokenizer(model: nn.Module) -> Any:
    tokenizer = getattr(getattr(model, "cond_stage_model", None), "tokenizer", None)
    if tokenizer is None:
        raise SettingsError(
            "The closed-form solver aligns wordings token by token and needs the text encoder's tokenizer "
            "(model.cond_stage_model.tokenizer, as FrozenCLIPEmbedder has); this model has none."
        )
    return tokenizer


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer.tokenize(text)) if text else 0


def _pairing(length: int, prefix: int, name: int, replacement: int) -> tuple[list[int], list[int]]:
    """Concept positions and the target positions they pair with, index by index (module docstring):
    everything but the name in order, then the name's tokens; everything but the replacement in
    order, then the replacement's tokens. Both lists are permutations of range(length)."""
    start = 1 + prefix  # the start token and the prefix are shared
    concept_order = [*range(start), *range(start + name, length), *range(start, start + name)]
    target_order = [*range(start), *range(start + replacement, length), *range(start, start + replacement)]
    return concept_order, target_order


def wording_rows(model: nn.Module, concept: str, templates: Sequence[str], target: str = "") -> WordingRows:
    """The aligned token rows of ``concept`` over ``templates`` and of its ``target`` wordings."""
    tokenizer = _tokenizer(model)
    parts = concept_wordings(concept, templates)
    wordings = [wording for wording, _, _ in parts]
    targets = [fill(template, target) for template in templates]
    encoded = encode_prompts(model, [*wordings, *targets])
    length = encoded.shape[1]
    name_tokens, replacement_tokens = _token_count(tokenizer, concept), _token_count(tokenizer, target)
    concept_rows, target_rows = [], []
    for index, (wording, prefix, suffix) in enumerate(parts):
        prefix_tokens = _token_count(tokenizer, prefix)
        longest = prefix_tokens + max(name_tokens, replacement_tokens) + _token_count(tokenizer, suffix) + 2
        if longest > length:
            raise SettingsError(
                f"Wording {wording!r} (or its target) needs {longest} tokens with start and end, more than the "
                f"text encoder's {length}; shorten the template."
            )
        concept_order, target_order = _pairing(length, prefix_tokens, name_tokens, replacement_tokens)
        concept_rows.append(encoded[index, concept_order])
        target_rows.append(encoded[len(parts) + index, target_order])
    return WordingRows(wordings, targets, torch.cat(concept_rows), torch.cat(target_rows))


def with_kept_wordings(
    model: nn.Module, rows: WordingRows, prompts: Sequence[str], templates: Sequence[str]
) -> WordingRows:
    """``rows`` plus every token row of ``templates`` filled with each of ``prompts``, paired with
    itself (zero residual): the fit then keeps those wordings' keys and values where it can.

    The basis keeps the protected prompts themselves exact; their other wordings ("a red circle
    by {other artist}") are not in the protected span and would drift with the edit. These rows
    are the least-squares counterpart of protection for them (METHOD.md §6).
    """
    kept = list(dict.fromkeys(fill(template, prompt) for prompt in prompts for template in templates))
    encoded = encode_prompts(model, kept)
    encoded = encoded.reshape(-1, encoded.shape[-1])
    return WordingRows(
        rows.wordings, rows.targets, torch.cat([rows.concept, encoded]), torch.cat([rows.target, encoded])
    )


def solve_map(basis: torch.Tensor, rows: WordingRows, mu: float = DEFAULT_MU) -> tuple[torch.Tensor, dict[str, float]]:
    """``G`` [d, k] with A_l = W_l G for every layer, and the solve's diagnostics (float64)."""
    if not mu > 0:
        raise SettingsError(f"mu (--mu) must be a positive number, got {mu}; {DEFAULT_MU:g} is the default.")
    basis = basis.to(torch.float64)
    b = basis @ rows.concept.T  # [k, n]
    gram = b @ b.T
    ridge = mu * float(gram.trace()) / gram.shape[0]
    if ridge == 0:
        raise SettingsError(
            "The concept's wordings have no component in its null space (trace(B B^T) = 0): the basis protects "
            "every direction the concept uses. Protect fewer prompts."
        )
    system = gram + ridge * torch.eye(gram.shape[0], dtype=torch.float64)
    residual = rows.target - rows.concept  # [n, d]
    g = torch.linalg.solve(system, b @ residual).T  # [d, k]: (Y - X)^T B^T M^{-1}, M symmetric
    fitted = (b.T @ g.T)  # [n, d]: the change of every concept row, in input space
    before, after = float(residual.norm()), float((residual - fitted).norm())
    return g, {"ridge": ridge, "rows": int(b.shape[1]), "residual_before": before, "residual_after": after}


def solve_joint_maps(
    bases: Sequence[torch.Tensor], rows: Sequence[WordingRows], mu: float = DEFAULT_MU
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """``G_j`` [d, k_j] for every concept of a joint set, solved together (METHOD.md §6).

    Erased together, the increments all act on every member's wordings: increment j leaves the
    other members' exact prompts unchanged (its basis protects them) but not their other
    wordings. The joint solve fits the SUM of the edits to every member's rows:
    ``min sum_i ||sum_j A_j S_j x - W (y - x)||^2 + sum_j ridge_j ||A_j||^2`` over all members'
    rows, one [K, K] system (K = sum_j k_j) with each block's ridge as in ``solve_map``.
    """
    stacked = torch.cat([basis.to(torch.float64) for basis in bases])  # [K, d]
    concept = torch.cat([r.concept for r in rows])  # [n, d]
    residual = torch.cat([r.target - r.concept for r in rows])
    b = stacked @ concept.T  # [K, n]
    ridges, blocks = [], []
    for basis, r in zip(bases, rows):
        own = basis.to(torch.float64) @ r.concept.T
        ridge = mu * float((own * own).sum()) / own.shape[0]
        if ridge == 0:
            raise SettingsError(
                "A concept's wordings have no component in its null space (trace(B B^T) = 0): the basis protects "
                "every direction the concept uses. Protect fewer prompts."
            )
        ridges.append(ridge)
        blocks.append(torch.full((own.shape[0],), ridge, dtype=torch.float64))
    system = b @ b.T + torch.diag(torch.cat(blocks))
    g = torch.linalg.solve(system, b @ residual).T  # [d, K]
    fitted = b.T @ g.T
    sizes = [int(basis.shape[0]) for basis in bases]
    diagnostics = {"ridges": ridges, "rows": int(b.shape[1]), "unknowns": int(b.shape[0]),
                   "residual_before": float(residual.norm()), "residual_after": float((residual - fitted).norm())}
    return list(g.split(sizes, dim=1)), diagnostics


def coefficients_from_map(
    model: nn.Module, basis: ConceptBasis, g: torch.Tensor, beta: float = 1e-4
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Coefficients {layer: w_l = W_l G / beta [out, k]}, float32, and the edits' relative sizes."""
    coeffs, relative = {}, []
    for name, layer in cross_attention_kv(model).items():
        weight = layer.weight.detach().to("cpu", torch.float64)
        change = weight @ g  # A_l
        relative.append(float((change @ basis.basis.to(torch.float64)).norm() / weight.norm()))
        coeffs[name] = (change / beta).to(torch.float32)
    return coeffs, {"edit_norm_relative": {"max": max(relative), "mean": sum(relative) / len(relative)}}


#: The joint solve's [K, K] float64 system above this many unknowns (2 GiB) is refused.
MAX_JOINT_UNKNOWNS = 16384


def check_target(target: str, concepts: Sequence[str], protected: Sequence[str]) -> None:
    """Refuse a target that is one of the concepts or a protected prompt (it could not both stay and receive)."""
    key = normalise_prompt(target)
    if not key:
        return
    if key in {normalise_prompt(concept) for concept in concepts}:
        raise SettingsError(f"target (--target) {target!r} is one of the concepts being erased; choose another target.")
    if key in {normalise_prompt(prompt) for prompt in protected}:
        raise SettingsError(
            f"target (--target) {target!r} is a protected prompt ({len(protected)} protected); mapping a concept onto "
            f"a protected concept would tie the two. Choose an unprotected target or \"\"."
        )


def closed_form_increments(
    model: nn.Module,
    bases: Mapping[str, ConceptBasis],
    templates: Mapping[str, Sequence[str]],
    target: str = "",
    mu: float = DEFAULT_MU,
    beta: float = 1e-4,
    record: Mapping[str, Any] | None = None,
    keep: bool = False,
    joint: bool = False,
) -> dict[str, Increment]:
    """One closed-form increment per concept of ``bases``, each fitted over its ``templates``;
    with ``keep`` the same templates filled with every prompt its basis protects are kept as they
    are (``with_kept_wordings``). ``joint`` (``--joint_objective paper``) solves the set together
    (``solve_joint_maps``: the sum of the edits fits every member's wordings), else each concept
    alone (the default: an increment does not depend on the set it was solved with).

    ``record`` (the run's settings) is stored in every increment's metadata beside the solve's
    diagnostics and a ``summary`` shaped like the trainers' (steps 0, stop reason "closed_form").
    """
    fingerprint = model_fingerprint(model)
    started = time.perf_counter()
    rows = {}
    for concept, basis in bases.items():
        rows[concept] = wording_rows(model, concept, templates[concept], target)
        if keep:
            rows[concept] = with_kept_wordings(model, rows[concept], basis.protected_prompts, templates[concept])
    if joint and len(bases) > 1:
        unknowns = sum(basis.dims for basis in bases.values())
        if unknowns > MAX_JOINT_UNKNOWNS:
            raise SettingsError(
                f"The joint closed form of {len(bases)} concepts solves for {unknowns} coefficients per output row "
                f"(the sum of their null-space dimensions), more than {MAX_JOINT_UNKNOWNS} ({unknowns ** 2 * 8 / 2**30:.1f} "
                f"GiB in float64); solve them one at a time (--joint_objective per_concept)."
            )
        maps, shared = solve_joint_maps([basis.basis for basis in bases.values()], list(rows.values()), mu)
        solves = {concept: (g, {"ridge": ridge, "joint": shared})
                  for concept, g, ridge in zip(bases, maps, shared["ridges"])}
    else:
        solves = {concept: solve_map(basis.basis, rows[concept], mu) for concept, basis in bases.items()}
    solved = {}
    for concept, basis in bases.items():
        g, diagnostics = solves[concept]
        coeffs, sizes = coefficients_from_map(model, basis, g, beta)
        diagnostics = {**diagnostics, **sizes, "wordings": rows[concept].wordings, "targets": rows[concept].targets}
        solved[concept] = (coeffs, diagnostics)
    seconds = time.perf_counter() - started
    summary = {
        "method": "sepce",
        "solver": "closed_form",
        "concepts": {
            concept: {"steps": 0, "stop_reason": "closed_form", "momentum": None}
            for concept in solved
        },
        "seconds": round(seconds, 4),
    }
    result = {}
    for concept, (coeffs, diagnostics) in solved.items():
        metadata = {
            "method": "sepce",
            "settings": dict(record or {}),
            "summary": summary,
            "closed_form": {"mu": mu, "target": target, "keep_wordings": keep, "joint": joint and len(bases) > 1,
                            **diagnostics},
            "base_model_fingerprint": fingerprint,
            "versions": versions(),
        }
        result[concept] = Increment(bases[concept].concept, slugify(concept), bases[concept], beta, coeffs, metadata)
    return result


def concept_templates(world: str, settings: SepCESettings) -> list[str]:
    """The wordings of a run: ``settings.concept_templates`` (a file), else the built-in ones of
    ``settings.concept_kind`` for a model of ``world``."""
    if settings.concept_templates:
        return read_templates(settings.concept_templates)
    return default_templates(world, settings.concept_kind)


def solve_sepce(model: nn.Module, bases: Mapping[str, ConceptBasis], settings: SepCESettings) -> dict[str, Increment]:
    """The closed-form increments of a ``train_sepce`` run (``SepCESettings``: mu, target, wordings)."""
    templates = concept_templates(world_of(model).name, settings)
    protected = {prompt for basis in bases.values() for prompt in basis.protected_prompts}
    check_target(settings.target, list(bases), sorted(protected))
    record = {**settings.result_settings(), "concepts": list(bases), "templates": templates,
              "basis_dims": {concept: basis.dims for concept, basis in bases.items()},
              "protected_prompts": {concept: basis.protected_prompts for concept, basis in bases.items()}}
    return closed_form_increments(
        model, bases, dict.fromkeys(bases, templates), settings.target, settings.mu, settings.beta, record,
        settings.keep_wordings, settings.mode == "joint" and settings.joint_objective == "paper",
    )
