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
    concept: str, protected: list[str], rank: int, dims: int, min_dims: int, width: int, rows: int, blank_rank: int
) -> str:
    per_prompt = (rank - blank_rank) / (len(protected) - 1) if len(protected) > 1 else rows - 1
    per_prompt = max(per_prompt, 1.0)
    fit = max(int((width - min_dims - blank_rank) // per_prompt), 0)
    return (
        f"Null space for concept {concept!r} has {dims} dimension(s), fewer than min_dims={min_dims}: the "
        f"{len(protected)} protected prompts (\"\" + {len(protected) - 1}) give {len(protected)} x {rows} token "
        f"rows of rank {rank} at text width d={width}. \"\" alone has rank {blank_rank} and each further prompt "
        f"adds about {per_prompt:.0f} (its first token's output is shared), so about {fit} protected prompt(s) "
        f"besides \"\" fit at this width. Protect fewer prompts (erase in smaller groups or use sequential "
        f"bases), or lower min_dims."
    )


def _basis_from_encodings(
    concept: str,
    protected_prompts: Sequence[str],
    encodings: Mapping[str, torch.Tensor],
    rtol: float,
    min_dims: int,
    fingerprint: str,
) -> ConceptBasis:
    protected = _unique_protected(concept, protected_prompts)
    if min_dims < 1:
        raise ValueError(f"min_dims must be >= 1, got {min_dims}.")
    rows, width = encodings[BLANK_PROMPT].shape
    matrix = torch.cat([encodings[p] for p in protected])
    basis, rank, _ = null_space(matrix, rtol)
    if basis.shape[0] < min_dims:
        blank_rank = null_space(encodings[BLANK_PROMPT], rtol)[1]
        raise CapacityError(
            _capacity_message(concept, protected, rank, basis.shape[0], min_dims, width, rows, blank_rank)
        )
    concept_rows = encodings[concept]
    reach = float((concept_rows @ basis.T).norm() / concept_rows.norm())
    return ConceptBasis(
        concept=concept,
        protected_prompts=protected,
        basis=basis.to(torch.float32),
        rank=rank,
        rtol=rtol,
        text_encoder_fingerprint=fingerprint,
        concept_reach=reach,
    )


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
) -> dict[str, ConceptBasis]:
    """Bases for a set of concepts, each prompt encoded once.

    Joint (default): concept k protects ``""``, every other concept of the set and
    ``extra_protected``; the increments can then be trained together and restored in any order.
    ``sequential=True``: concept k protects ``""``, concepts ``0..k-1`` and ``extra_protected``,
    the memory-saving order in which each newly erased concept protects all earlier ones
    (earlier bases are not recomputed when a concept is added later).
    """
    concepts = _check_prompts(concepts, "concepts")
    if not concepts:
        raise ValueError("compute_bases needs at least one concept.")
    normalised = [normalise_prompt(c) for c in concepts]
    repeated = sorted({c for c in concepts if normalised.count(normalise_prompt(c)) > 1})
    if repeated:
        raise ValueError(f"Concepts {repeated} are given more than once (case and spacing ignored); list each once.")
    extra = _check_prompts(extra_protected, "extra_protected")
    encodings = _encode_unique(model, [BLANK_PROMPT, *concepts, *extra])
    fingerprint = text_encoder_fingerprint(model)
    bases = {}
    for index, concept in enumerate(concepts):
        others = concepts[:index] if sequential else concepts[:index] + concepts[index + 1 :]
        basis = _basis_from_encodings(concept, [*others, *extra], encodings, rtol, min_dims, fingerprint)
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
