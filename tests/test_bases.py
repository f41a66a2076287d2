"""Null-space bases: exactness on random matrices, the tolerance, capacity, joint/sequential sets, files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from erasure.bases import (
    CapacityError,
    compute_basis,
    compute_bases,
    encode_prompts,
    load_basis,
    null_space,
    protected_leakage,
    protected_matrix,
    save_basis,
)
from erasure.files import ErasureFileError
from erasure.loading import text_encoder_fingerprint
from wide_tiny_model import WIDE_TEXT_LENGTH, WIDE_TEXT_WIDTH, build_wide_tiny_model, write_wide_tiny_config

CONCEPTS = ["van gogh", "picasso", "cezanne"]
#: Prompts that share no first letter with each other or the concepts: the tiny tokenizer works on
#: characters, and prompts with a common prefix share token rows (causal attention).
FILLERS = ["red circle", "blue square", "green dog", "old tree", "the moon", "snow hill", "a clock", "moss", "ice"]


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    return build_wide_tiny_model(write_wide_tiny_config(tmp_path_factory.mktemp("wide")))


def low_rank(rows: int, rank: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(rows, rank, generator=generator, dtype=torch.float64)
    return left @ torch.randn(rank, width, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize(("rows", "rank", "width"), [(40, 10, 32), (5, 5, 32), (100, 31, 32), (7, 3, 768)])
def test_null_space_is_exact_on_random_low_rank_matrices(rows: int, rank: int, width: int) -> None:
    matrix = low_rank(rows, rank, width, seed=rows + rank)
    basis, found_rank, singular_values = null_space(matrix)
    assert found_rank == rank
    assert basis.dtype == torch.float64 and basis.shape == (width - rank, width)
    assert (matrix @ basis.T).abs().max() <= 1e-12 * matrix.norm()
    assert torch.allclose(basis @ basis.T, torch.eye(width - rank, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(basis.norm(dim=1), torch.ones(width - rank, dtype=torch.float64), atol=1e-14)
    assert singular_values.shape == (min(rows, width),)


def test_tolerance_ignores_float32_rounding_noise() -> None:
    """A low-rank matrix rounded to float32 (as text-encoder outputs are) keeps its rank at rtol 1e-6;
    a float64-sized tolerance would take the rounding noise for rank and find no null space."""
    noisy = low_rank(60, 20, 32, seed=1).float().double()
    assert null_space(noisy)[1] == 20
    assert null_space(noisy, rtol=1e-13)[1] == 32


def test_null_space_edge_cases_and_bad_input() -> None:
    full = null_space(torch.eye(6, dtype=torch.float64))
    assert full[0].shape == (0, 6) and full[1] == 6
    zero_basis, zero_rank, _ = null_space(torch.zeros(3, 5))
    assert zero_rank == 0 and torch.allclose(zero_basis @ zero_basis.T, torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        null_space(torch.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        null_space(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="rtol"):
        null_space(torch.eye(3), rtol=0.0)


def test_protected_matrix_has_all_token_rows(wide_model: nn.Module) -> None:
    encoded = encode_prompts(wide_model, ["", "van gogh"])
    assert encoded.shape == (2, WIDE_TEXT_LENGTH, WIDE_TEXT_WIDTH) and encoded.dtype == torch.float64
    matrix = protected_matrix(wide_model, ["", "van gogh"])
    assert matrix.shape == (2 * WIDE_TEXT_LENGTH, WIDE_TEXT_WIDTH)
    assert torch.equal(matrix[WIDE_TEXT_LENGTH:], encoded[1])
    with pytest.raises(TypeError, match="wrap one prompt"):
        encode_prompts(wide_model, "van gogh")


def test_basis_annihilates_protected_prompts_but_reaches_the_concept(wide_model: nn.Module) -> None:
    basis = compute_basis(wide_model, "van gogh", ["picasso", "red circle"])
    assert basis.protected_prompts == ["", "picasso", "red circle"]
    # "" has rank 8; each further prompt adds 7 rows (the first token's output is shared).
    assert basis.rank == 8 + 7 + 7 and basis.dims == WIDE_TEXT_WIDTH - basis.rank
    assert basis.basis.dtype == torch.float32 and basis.width == WIDE_TEXT_WIDTH
    assert basis.text_encoder_fingerprint == text_encoder_fingerprint(wide_model)
    assert protected_leakage(wide_model, basis) <= 1e-6
    assert protected_leakage(wide_model, basis, ["van gogh"]) == pytest.approx(basis.concept_reach)
    assert basis.concept_reach > 0.05


def test_concept_that_is_also_protected_is_refused(wide_model: nn.Module) -> None:
    with pytest.raises(ValueError, match="also a protected prompt"):
        compute_basis(wide_model, "Van Gogh", ["picasso", "van  gogh"])
    with pytest.raises(ValueError, match="non-empty"):
        compute_basis(wide_model, "  ", [])
    with pytest.raises(ValueError, match="more than once"):
        compute_bases(wide_model, ["picasso", "Picasso"])


def test_capacity_error_says_how_many_prompts_fit(wide_model: nn.Module) -> None:
    """Width 64, "" rank 8, 7 rows per prompt, min_dims 8: (64 - 8 - 8) // 7 = 6 prompts fit."""
    basis = compute_basis(wide_model, "van gogh", FILLERS[:6], min_dims=8)
    assert basis.dims == 64 - 8 - 6 * 7
    with pytest.raises(CapacityError) as error:
        compute_basis(wide_model, "van gogh", FILLERS[:7], min_dims=8)
    message = str(error.value)
    assert "d=64" in message and "rank 57" in message and "6 of the 7 prompts besides \"\" fit" in message
    assert "Drop the last 1 ('a clock')" in message
    assert "7 dimension(s)" in message


def test_empty_null_space_is_a_capacity_error(wide_model: nn.Module) -> None:
    with pytest.raises(CapacityError, match="0 dimension"):
        compute_basis(wide_model, "van gogh", FILLERS + CONCEPTS[1:], min_dims=1)


def test_joint_and_sequential_sets(wide_model: nn.Module) -> None:
    joint = compute_bases(wide_model, CONCEPTS, extra_protected=["red circle"])
    assert list(joint) == CONCEPTS
    for concept, basis in joint.items():
        others = [c for c in CONCEPTS if c != concept]
        assert basis.protected_prompts == ["", *others, "red circle"]
        assert protected_leakage(wide_model, basis) <= 1e-6
        assert basis.extra["mode"] == "joint"
    sequential = compute_bases(wide_model, CONCEPTS, sequential=True)
    assert [b.protected_prompts for b in sequential.values()] == [
        [""],
        ["", "van gogh"],
        ["", "van gogh", "picasso"],
    ]
    alone = compute_basis(wide_model, "cezanne", ["van gogh", "picasso"])
    assert torch.allclose(sequential["cezanne"].basis, alone.basis)


def test_save_load_round_trip_and_refusals(wide_model: nn.Module, tmp_path: Path) -> None:
    basis = compute_basis(wide_model, "van gogh", ["picasso"])
    path = save_basis(basis, tmp_path / "van_gogh.safetensors")
    loaded = load_basis(path)
    assert torch.equal(loaded.basis, basis.basis)
    for field in ("concept", "protected_prompts", "rank", "rtol", "text_encoder_fingerprint", "concept_reach"):
        assert getattr(loaded, field) == getattr(basis, field)
    with pytest.raises(ErasureFileError, match="already exists"):
        save_basis(basis, path)
    other = compute_basis(wide_model, "picasso", [])
    save_basis(other, path, overwrite=True)
    assert load_basis(path).concept == "picasso"
    assert [p.name for p in tmp_path.iterdir()] == ["van_gogh.safetensors"], "no temporary files left behind"
    foreign = tmp_path / "foreign.safetensors"
    save_file({"basis": basis.basis}, str(foreign))
    with pytest.raises(ErasureFileError, match="without this project's header"):
        load_basis(foreign)
    with pytest.raises(ErasureFileError, match="does not exist"):
        load_basis(tmp_path / "missing.safetensors")
