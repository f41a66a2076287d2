"""Null-space bases: the directions of text-embedding space a concept's increment may act on.

For concept k the protected matrix ``E_k`` stacks the text encoder's token rows (all L of them,
padding included) of ``""``, of the other concepts it must not disturb and of user prompts
(METHOD.md §2). Its right null space ``S_k`` ({s : E_k s = 0}) is found with a float64 SVD;
an increment ``dW = w @ (beta * S_k)`` then leaves the keys and values of every protected
prompt unchanged, because ``dW @ e(p)^T = w @ beta * (S_k @ e(p)^T) = 0``.

Rank tolerance. The text encoder runs in float32, so the rows of ``E_k`` carry relative
rounding noise around float32's epsilon (1.2e-7) of the largest singular value. A singular
value at or below ``rtol * s_max`` is indistinguishable from that noise and is counted as
zero; ``rtol = 1e-6`` (about 8x float32 epsilon) sits just above it. A stricter float64
tolerance would mistake rounding noise for rank and leave no null space at all; a looser one
would admit directions that visibly change protected keys (the change is at most
``rtol * s_max`` per unit of increment, see ``protected_leakage``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from erasure.errors import CapacityError
from erasure.files import read_tensors, versions, write_tensors
from erasure.loading import text_encoder_fingerprint

BLANK_PROMPT = ""
DEFAULT_RTOL = 1e-6
#: Fewer null-space directions than this leave an increment too little room to move a concept.
DEFAULT_MIN_DIMS = 8
BASIS_KIND = "basis"


@dataclass
class ConceptBasis:
    """The null-space basis of one concept and what it protects.

    ``basis`` is float32 [dims, d] with orthonormal rows; ``concept_reach`` is the share of the
    concept's own text encoding (Frobenius norm) that lies in the basis' span, i.e. how much of
    the concept an increment on this basis can touch at all.
    """

    concept: str
    protected_prompts: list[str]
    basis: torch.Tensor
    rank: int
    rtol: float
    text_encoder_fingerprint: str
    concept_reach: float
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return int(self.basis.shape[0])

    @property
    def width(self) -> int:
        return int(self.basis.shape[1])


def normalise_prompt(prompt: str) -> str:
    """The form in which two prompts encode identically: CLIP lower-cases and collapses whitespace."""
    return " ".join(prompt.lower().split())


def _check_prompts(prompts: Sequence[str], what: str) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Iterable):
        raise TypeError(
            f"{what} must be a sequence of strings, got {type(prompts).__name__}; wrap one prompt in a list."
        )
    prompts = list(prompts)
    wrong = [p for p in prompts if not isinstance(p, str)]
    if wrong:
        raise TypeError(f"{what} must all be strings; got {wrong[:3]}.")
    return prompts


def encode_prompts(model: nn.Module, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder outputs [n, L, d] of ``prompts`` via ``get_learned_conditioning``, float64 on CPU."""
    prompts = _check_prompts(prompts, "prompts")
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt.")
    with torch.no_grad():
        encoded = model.get_learned_conditioning(prompts)
    if not isinstance(encoded, torch.Tensor) or encoded.ndim != 3:
        raise TypeError(
            f"get_learned_conditioning returned {type(encoded).__name__} "
            f"{tuple(getattr(encoded, 'shape', ()))}; bases need a cross-attention model whose text encoder "
            f"returns [batch, tokens, width]."
        )
    return encoded.detach().to("cpu", torch.float64)


def protected_matrix(model: nn.Module, prompts: Sequence[str]) -> torch.Tensor:
    """All token rows of ``prompts`` stacked: float64 [n * L, d]."""
    encoded = encode_prompts(model, prompts)
    return encoded.reshape(-1, encoded.shape[-1])


def null_space(matrix: torch.Tensor, rtol: float = DEFAULT_RTOL) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Right null space of ``matrix`` [m, d] by float64 SVD.

    Returns ``(basis, rank, singular_values)``: ``basis`` float64 [d - rank, d] with orthonormal
    (so unit-norm) rows spanning {s : matrix @ s = 0} up to the tolerance, where singular values
    ``<= rtol * s_max`` count as zero (module docstring: why 1e-6).
    """
    if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError(f"matrix must be a 2-D tensor [rows, d >= 1], got {getattr(matrix, 'shape', type(matrix))}.")
    if not 0.0 < rtol < 1.0:
        raise ValueError(f"rtol must be in (0, 1), got {rtol}; the default {DEFAULT_RTOL} suits float32 encoders.")
    matrix = matrix.detach().to("cpu", torch.float64)
    if not torch.isfinite(matrix).all():
        raise ValueError("matrix contains NaN or inf; the text encoder produced non-finite outputs.")
    rows, width = matrix.shape
    # With fewer rows than columns only the full V^T holds the null directions; otherwise the
    # reduced SVD already gives all d right singular vectors without an [m, m] U.
    _, singular_values, vh = torch.linalg.svd(matrix, full_matrices=rows < width)
    if singular_values.numel() == 0 or singular_values[0] == 0:
        rank = 0
    else:
        rank = int((singular_values > rtol * singular_values[0]).sum())
    basis = vh[rank:]
    basis = (basis / basis.norm(dim=1, keepdim=True)).contiguous()
    return basis, rank, singular_values


def _unique_protected(concept: str, protected_prompts: Sequence[str]) -> list[str]:
    """``""`` first, then the protected prompts without repeats; refuse the concept itself."""
    if not isinstance(concept, str) or not normalise_prompt(concept):
        raise ValueError(f"concept must be a non-empty prompt, got {concept!r}; the blank prompt is always protected.")
    protected = [BLANK_PROMPT]
    seen = {BLANK_PROMPT}
    for prompt in _check_prompts(protected_prompts, "protected_prompts"):
        key = normalise_prompt(prompt)
        if key == normalise_prompt(concept):
            raise ValueError(
                f"Concept {concept!r} is also a protected prompt ({prompt!r}); a concept cannot be erased and "
                f"protected at once. Remove it from the protected prompts (or from the concepts)."
            )
        if key not in seen:
            seen.add(key)
            protected.append(prompt)
    return protected


def _capacity_message(
    concept: str,
    protected: list[str],
    encodings: Mapping[str, torch.Tensor],
    rtol: float,
    rank: int,
    dims: int,
    min_dims: int,
    width: int,
) -> str:
    """Say exactly how many protected prompts fit: the rank of ``""`` plus the first k prompts, for every
    k, measured as the basis measures it (it saturates at the text width; no per-prompt formula)."""
    fit, fit_dims = -1, 0
    for count in range(1, len(protected) + 1):
        prefix_rank = null_space(torch.cat([encodings[p] for p in protected[:count]]), rtol)[1]
        if width - prefix_rank < min_dims:
            break
        fit, fit_dims = count - 1, width - prefix_rank
    rows = len(protected) * encodings[BLANK_PROMPT].shape[0]
    head = (
        f"Null space for concept {concept!r} has {dims} dimension(s), fewer than min_dims={min_dims}: the "
        f"{len(protected)} protected prompts (\"\" + {len(protected) - 1}) give {rows} token rows of rank {rank} at "
        f"text width d={width}."
    )
    if fit < 0:
        return f"{head} Even \"\" alone leaves fewer than {min_dims} dimensions; lower min_dims."
    dropped = protected[fit + 1 :]
    shown = ", ".join(repr(prompt) for prompt in dropped[:5]) + (", ..." if len(dropped) > 5 else "")
    return (
        f"{head} {fit} of the {len(protected) - 1} prompts besides \"\" fit: \"\" and the first {fit} leave {fit_dims} "
        f"dimensions. Drop the last {len(dropped)} ({shown}): erase in smaller groups, protect fewer prompts, or "
        f"lower min_dims."
    )


def _basis_from_encodings(
    concept: str,
    protected_prompts: Sequence[str],
    encodings: Mapping[str, torch.Tensor],
    rtol: float,
    min_dims: int,
    fingerprint: str,
    approximate: Sequence[str] = (),
    energy: float = 1.0,
) -> ConceptBasis:
    protected = _unique_protected(concept, protected_prompts)
    if min_dims < 1:
        raise ValueError(f"min_dims must be >= 1, got {min_dims}.")
    rows, width = encodings[BLANK_PROMPT].shape
    exact_keys = {normalise_prompt(prompt) for prompt in protected}
    approximate = [prompt for prompt in approximate if normalise_prompt(prompt) not in exact_keys]
    if normalise_prompt(concept) in {normalise_prompt(prompt) for prompt in approximate}:
        raise ValueError(
            f"Concept {concept!r} is in the protect file; a concept cannot be erased and protected at once."
        )
    exact = protected + approximate if energy >= 1 else protected
    matrix = torch.cat([encodings[p] for p in exact])
    basis, rank, _ = null_space(matrix, rtol)
    if basis.shape[0] < min_dims:
        raise CapacityError(
            _capacity_message(concept, exact, encodings, rtol, rank, basis.shape[0], min_dims, width)
        )
    extra: dict[str, object] = {}
    if approximate and energy < 1:
        exact_dims = basis.shape[0]
        basis, kept = energy_null_space(basis, torch.cat([encodings[p] for p in approximate]), energy)
        if basis.shape[0] < min_dims:
            raise CapacityError(
                f"Null space for concept {concept!r} has {basis.shape[0]} dimension(s), fewer than "
                f"min_dims={min_dims}: keeping {energy} of the energy of {len(approximate)} approximately "
                f"protected prompts ({len(approximate)} x {rows} rows) takes {kept} of the {exact_dims} "
                f"directions the {len(protected)} exactly protected prompts leave. Lower --protect_energy "
                f"(e.g. 0.99) or protect fewer prompts."
            )
        extra["approximate"] = {"prompts": approximate, "energy": energy, "exact_dims": exact_dims, "kept": kept}
    concept_rows = encodings[concept]
    reach = float((concept_rows @ basis.T).norm() / concept_rows.norm())
    return ConceptBasis(
        concept=concept,
        protected_prompts=exact,
        basis=basis.to(torch.float32),
        rank=rank,
        rtol=rtol,
        text_encoder_fingerprint=fingerprint,
        concept_reach=reach,
        extra=extra,
    )


def energy_null_space(basis: torch.Tensor, rows: torch.Tensor, energy: float) -> tuple[torch.Tensor, int]:
    """The part of ``basis``' span [k, d] left after protecting ``energy`` of ``rows``' energy there.

    Approximate protection (METHOD.md §6): the rows [m, d] are projected onto the span, the
    fewest right-singular directions holding ``energy`` of the projections' squared norm are
    kept out, the rest is returned (orthonormal rows) with the number kept out. Prompts that
    made ``basis`` stay exactly protected because the result lies inside its span.
    """
    projected = rows.to(torch.float64) @ basis.T
    # eigenvectors of the [k, k] Gram matrix are the right-singular vectors (squared singular values
    # as eigenvalues) without the [m, m] left factor an SVD of thousands of rows would build
    energies, vectors = torch.linalg.eigh(projected.T @ projected)
    energies, vectors = energies.flip(0).clamp_min(0), vectors.flip(1)
    share = energies.cumsum(0) / energies.sum().clamp_min(1e-300)
    kept = min(int((share < energy).sum()) + 1, basis.shape[0])
    remaining = vectors[:, kept:].T @ basis
    return (remaining / remaining.norm(dim=1, keepdim=True)).contiguous(), kept


def _encode_unique(model: nn.Module, prompts: Iterable[str]) -> dict[str, torch.Tensor]:
    unique = list(dict.fromkeys(prompts))
    encoded = encode_prompts(model, unique)
    return dict(zip(unique, encoded))


def compute_basis(
    model: nn.Module,
    concept: str,
    protected_prompts: Sequence[str] = (),
    rtol: float = DEFAULT_RTOL,
    min_dims: int = DEFAULT_MIN_DIMS,
) -> ConceptBasis:
    """Basis for ``concept`` protecting ``""`` (always added first) and ``protected_prompts``.

    ``protected_prompts`` are the other concepts of the set and any user prompts. Raises
    ``ValueError`` when the concept is among them and ``CapacityError`` when the null space has
    fewer than ``min_dims`` directions (the message says how many protected prompts fit).
    """
    protected = _unique_protected(concept, protected_prompts)
    encodings = _encode_unique(model, [*protected, concept])
    return _basis_from_encodings(concept, protected, encodings, rtol, min_dims, text_encoder_fingerprint(model))


def compute_bases(
    model: nn.Module,
    concepts: Sequence[str],
    extra_protected: Sequence[str] = (),
    rtol: float = DEFAULT_RTOL,
    min_dims: int = DEFAULT_MIN_DIMS,
    sequential: bool = False,
    approximate: Sequence[str] = (),
    energy: float = 1.0,
) -> dict[str, ConceptBasis]:
    """Bases for a set of concepts, each prompt encoded once.

    Joint (default): concept k protects ``""``, every other concept of the set and
    ``extra_protected``; the increments can then be trained together and restored in any order.
    ``sequential=True``: concept k protects ``""``, concepts ``0..k-1`` and ``extra_protected``,
    the order in which each newly erased concept protects all earlier ones (earlier bases are not
    recomputed when a concept is added later; the paper's scene protocol, METHOD.md §4). SepCE's
    ``--mode sequential`` does NOT use it: it trains on the joint bases (METHOD.md §2).
    ``approximate`` prompts (a protect file; METHOD.md §6) are protected exactly when ``energy`` is 1,
    else by ``energy_null_space``: hundreds fit, ``""`` and the other prompts stay exact.
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy (--protect_energy) must be in (0, 1], got {energy}.")
    concepts = _check_prompts(concepts, "concepts")
    if not concepts:
        raise ValueError("compute_bases needs at least one concept.")
    normalised = [normalise_prompt(c) for c in concepts]
    repeated = sorted({c for c in concepts if normalised.count(normalise_prompt(c)) > 1})
    if repeated:
        raise ValueError(f"Concepts {repeated} are given more than once (case and spacing ignored); list each once.")
    extra = _check_prompts(extra_protected, "extra_protected")
    approximate = _check_prompts(approximate, "approximate")
    encodings = _encode_unique(model, [BLANK_PROMPT, *concepts, *extra, *approximate])
    fingerprint = text_encoder_fingerprint(model)
    bases = {}
    for index, concept in enumerate(concepts):
        others = concepts[:index] if sequential else concepts[:index] + concepts[index + 1 :]
        basis = _basis_from_encodings(
            concept, [*others, *extra], encodings, rtol, min_dims, fingerprint, approximate, energy
        )
        basis.extra["mode"] = "sequential" if sequential else "joint"
        bases[concept] = basis
    return bases


def protected_leakage(model: nn.Module, basis: ConceptBasis, prompts: Sequence[str] | None = None) -> float:
    """Largest ``||e(p) S^T||_F / ||e(p)||_F`` over ``prompts`` (default: the basis' protected prompts).

    0 means the basis is exactly orthogonal to the prompts' token rows, so no increment built on
    it can change their keys or values; the float32 basis keeps it around 1e-7.
    """
    prompts = basis.protected_prompts if prompts is None else _check_prompts(prompts, "prompts")
    encoded = encode_prompts(model, prompts)
    if encoded.shape[-1] != basis.width:
        raise ValueError(f"Basis width {basis.width} differs from this model's text width {encoded.shape[-1]}.")
    projected = encoded @ basis.basis.to(torch.float64).T
    return float((projected.flatten(1).norm(dim=1) / encoded.flatten(1).norm(dim=1)).max())


def basis_metadata(basis: ConceptBasis) -> dict[str, object]:
    """Everything about a basis except its tensor (stored in basis and increment files)."""
    return {
        "concept": basis.concept,
        "protected_prompts": basis.protected_prompts,
        "rank": basis.rank,
        "dims": basis.dims,
        "width": basis.width,
        "rtol": basis.rtol,
        "text_encoder_fingerprint": basis.text_encoder_fingerprint,
        "concept_reach": basis.concept_reach,
        "extra": basis.extra,
    }


def basis_from_metadata(tensor: torch.Tensor, metadata: Mapping[str, object], source: Path) -> ConceptBasis:
    """Rebuild a ``ConceptBasis`` from its stored tensor and ``basis_metadata``; check they agree."""
    try:
        basis = ConceptBasis(
            concept=str(metadata["concept"]),
            protected_prompts=list(metadata["protected_prompts"]),
            basis=tensor.to(torch.float32),
            rank=int(metadata["rank"]),
            rtol=float(metadata["rtol"]),
            text_encoder_fingerprint=str(metadata["text_encoder_fingerprint"]),
            concept_reach=float(metadata["concept_reach"]),
            extra=dict(metadata.get("extra", {})),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{source}: basis metadata is incomplete ({error!r}); regenerate the file.") from error
    if tensor.ndim != 2 or (basis.dims, basis.width) != (metadata.get("dims"), metadata.get("width")):
        raise ValueError(
            f"{source}: basis tensor {tuple(tensor.shape)} disagrees with its metadata "
            f"(dims {metadata.get('dims')}, width {metadata.get('width')}); the file is corrupted, regenerate it."
        )
    return basis


def save_basis(basis: ConceptBasis, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``basis`` as safetensors (tensor ``basis``) with its metadata as JSON in the header."""
    metadata = {**basis_metadata(basis), "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return write_tensors(path, {"basis": basis.basis}, BASIS_KIND, metadata, overwrite)


def load_basis(path: str | Path) -> ConceptBasis:
    path = Path(path)
    tensors, metadata = read_tensors(path, BASIS_KIND)
    if "basis" not in tensors:
        raise ValueError(f"{path}: no 'basis' tensor; the file is corrupted, regenerate it.")
    return basis_from_metadata(tensors["basis"], metadata, path)
