"""Closed-form SepCE coefficients and approximate protection (METHOD.md §6) on the wide tiny model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning_fabric import Fabric
from omegaconf import OmegaConf
from torch import nn

from erasure.bases import compute_bases, energy_null_space, null_space, protected_leakage
from erasure.closed_form import (
    WordingRows,
    _pairing,
    check_target,
    closed_form_increments,
    solve_map,
    solve_sepce,
    wording_rows,
)
from erasure.errors import CapacityError, SettingsError
from erasure.increments import Increment, compose, cross_attention_kv, detach
from erasure.protection import relative_kv_changes
from erasure.settings import SepCESettings
from erasure.training import train_sepce
from erasure.wordings import fill
from wide_tiny_model import WIDE_TEXT_LENGTH, build_wide_tiny_model, write_wide_tiny_config

CONCEPT = "q"
PROTECTED = ["m", "n w"]
#: Short wordings: the tiny tokenizer spells words letter by letter and the wide model has 8 positions.
TEMPLATES = ["{name}", "a {name}", "{name} z", "b {name} c"]


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    model = build_wide_tiny_model(write_wide_tiny_config(tmp_path_factory.mktemp("wide")))
    model.ldm_config = OmegaConf.create({})  # no `world:` key: Stable Diffusion's world
    return model


@pytest.fixture(scope="module")
def basis(wide_model: nn.Module):
    return compute_bases(wide_model, [CONCEPT], PROTECTED)[CONCEPT]


def test_pairing_matches_prefix_suffix_and_sends_the_name_to_the_last_padding() -> None:
    concept, target = _pairing(length=8, prefix=1, name=2, replacement=0)
    assert concept == [0, 1, 4, 5, 6, 7, 2, 3]  # start, prefix, suffix..., then the name's two tokens
    assert target == [0, 1, 2, 3, 4, 5, 6, 7]  # ... paired with the target's last two positions
    concept, target = _pairing(length=8, prefix=0, name=1, replacement=2)  # a longer replacement
    assert sorted(concept) == sorted(target) == list(range(8))
    assert concept[:1] == target[:1] == [0] and concept[-1] == 1 and target[-2:] == [1, 2]


def test_solve_is_the_ridge_least_squares_solution() -> None:
    generator = torch.Generator().manual_seed(0)
    width, dims, rows = 12, 5, 9
    basis = torch.linalg.qr(torch.randn(width, dims, generator=generator, dtype=torch.float64))[0].T
    concept = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    target = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    mu = 0.3
    g, diagnostics = solve_map(basis, WordingRows([], [], concept, target), mu)
    b = basis @ concept.T
    ridge = mu * float((b @ b.T).trace()) / dims
    assert diagnostics["ridge"] == pytest.approx(ridge)
    # min ||G B - (Y - X)^T||^2 + ridge ||G||^2 as an ordinary least-squares problem on stacked rows
    design = torch.cat([b.T, ridge**0.5 * torch.eye(dims, dtype=torch.float64)])
    response = torch.cat([target - concept, torch.zeros(dims, width, dtype=torch.float64)])
    expected = torch.linalg.lstsq(design, response).solution.T
    torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-11)
    assert diagnostics["residual_after"] < diagnostics["residual_before"]


def test_wording_rows_pair_the_shared_prefix_with_itself(wide_model: nn.Module) -> None:
    rows = wording_rows(wide_model, CONCEPT, ["b {name} c"], target="")
    assert rows.wordings == ["b q c"] and rows.targets == ["b c"]
    assert rows.concept.shape == rows.target.shape == (WIDE_TEXT_LENGTH, 64)
    # start token and the prefix "b" see the same text in both (causal encoder): zero residual
    torch.testing.assert_close(rows.concept[:2], rows.target[:2])
    assert (rows.concept[2:] - rows.target[2:]).norm() > 1e-3


def test_closed_form_increment_keeps_protected_prompts_and_maps_wordings_to_targets(
    wide_model: nn.Module, basis, tmp_path: Path
) -> None:
    fitted = closed_form_increments(wide_model, {CONCEPT: basis}, {CONCEPT: TEMPLATES}, mu=1e-4, keep=False)
    increment = fitted[CONCEPT]
    path = increment.save(tmp_path / "q.safetensors")
    loaded = Increment.load(path)  # the ordinary increment format
    rows = wording_rows(wide_model, CONCEPT, TEMPLATES)
    layers = cross_attention_kv(wide_model)
    before = {name: layer(rows.concept.float()) - layer(rows.target.float()) for name, layer in layers.items()}
    compose(wide_model, [loaded])
    try:
        after = {name: layer(rows.concept.float()) for name, layer in layers.items()}
    finally:
        detach(wide_model, [loaded.name])
    for name, layer in layers.items():
        gap = after[name] - layer(rows.target.float())
        assert gap.norm() < 0.1 * before[name].norm(), name  # the wordings now read as their targets
    strong = closed_form_increments(wide_model, {CONCEPT: basis}, {CONCEPT: TEMPLATES}, mu=10.0, keep=False)[CONCEPT]
    weak_fit = strong.metadata["closed_form"]["residual_after"]
    assert weak_fit > increment.metadata["closed_form"]["residual_after"]  # a larger ridge fits less
    changes = relative_kv_changes(wide_model, loaded, ["", *PROTECTED, CONCEPT])
    assert max(changes[p] for p in ["", *PROTECTED]) < 1e-5
    assert changes[CONCEPT] > 0.1  # the concept itself is edited


def test_train_sepce_closed_form_records_protection(wide_model: nn.Module, tmp_path: Path) -> None:
    templates = tmp_path / "wordings.txt"
    templates.write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")
    protect_file = tmp_path / "protect.txt"
    protect_file.write_text("k\nv x\nr\n", encoding="utf-8")
    settings = SepCESettings(
        solver="closed_form", concept_templates=str(templates), protect_file=str(protect_file),
        protect_energy=0.9, watermark_prompt="", progress=False,
    )
    fabric = Fabric(accelerator="cpu", devices=1)
    [increment] = train_sepce(wide_model, [CONCEPT], protect=PROTECTED, settings=settings, fabric=fabric)
    protection = increment.metadata["protection"]
    assert protection["exact"]["count"] == 3 and protection["exact"]["worst"] < 1e-5
    assert protection["approximate"]["count"] == 3 and set(protection["prompts"]) == {"", *PROTECTED, "k", "v x", "r"}
    assert increment.metadata["summary"]["protection"][CONCEPT]["approximate"]["median"] > protection["exact"]["worst"]
    assert increment.metadata["closed_form"]["wordings"] == ["q", "a q", "q z", "b q c"]
    assert increment.metadata["summary"]["concepts"][CONCEPT]["stop_reason"] == "closed_form"


def test_closed_form_plus_cie_starts_from_the_closed_form(wide_model: nn.Module, tmp_path: Path) -> None:
    templates = tmp_path / "wordings.txt"
    templates.write_text("\n".join(TEMPLATES), encoding="utf-8")
    base = SepCESettings(solver="closed_form", watermark_prompt="", concept_templates=str(templates), progress=False)
    fabric = Fabric(accelerator="cpu", devices=1)
    [solved] = train_sepce(wide_model, [CONCEPT], protect=PROTECTED, settings=base, fabric=fabric)
    images = {CONCEPT: torch.rand(2, 3, 32, 32)}
    started = SepCESettings(solver="closed_form+cie", watermark_prompt="", concept_templates=str(templates),
                            iterations=1, lr=1e-12, progress=False, save_every=0)
    [trained] = train_sepce(wide_model, [CONCEPT], protect=PROTECTED, settings=started, fabric=fabric, images=images)
    assert trained.metadata["training"]["steps"] == 1
    for layer, coeff in solved.coeffs.items():
        torch.testing.assert_close(trained.coeffs[layer], coeff, rtol=1e-4, atol=1e-3)
    assert max(float(c.abs().max()) for c in solved.coeffs.values()) > 1.0  # far from the zero start


def test_approximate_protection_keeps_exact_prompts_exact(wide_model: nn.Module) -> None:
    many = ["k", "v x", "r", "t u", "y", "h"]
    with pytest.raises(CapacityError, match="protect"):  # 9 prompts x 8 rows exactly: no room left
        compute_bases(wide_model, [CONCEPT], PROTECTED, approximate=many)
    bases = compute_bases(wide_model, [CONCEPT], PROTECTED, approximate=many, energy=0.9)
    approximate_basis = bases[CONCEPT]
    assert protected_leakage(wide_model, approximate_basis, ["", *PROTECTED]) < 1e-6
    assert approximate_basis.extra["approximate"]["prompts"] == many
    assert 0 < protected_leakage(wide_model, approximate_basis, many) < 1.0
    with pytest.raises(CapacityError, match=r"Lower --protect_energy"):
        compute_bases(wide_model, [CONCEPT], PROTECTED, approximate=many, energy=0.999999, min_dims=8)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        compute_bases(wide_model, [CONCEPT], PROTECTED, approximate=many, energy=0.0)


def test_energy_null_space_keeps_the_fewest_directions_holding_the_energy() -> None:
    basis = torch.eye(4, dtype=torch.float64)[:3]  # span of e0, e1, e2
    rows = torch.tensor([[3.0, 0, 0, 0], [0, 1.0, 0, 0]], dtype=torch.float64)  # energies 9 and 1 (90% / 10%)
    remaining, kept = energy_null_space(basis, rows, 0.85)
    assert kept == 1 and remaining.shape == (2, 4)
    assert float((remaining @ rows[0]).abs().max()) < 1e-12 and float((remaining @ rows[1]).norm()) > 0.99
    remaining, kept = energy_null_space(basis, rows, 0.95)
    assert kept == 2 and torch.allclose(remaining.abs(), torch.tensor([[0, 0, 1.0, 0]], dtype=torch.float64))
    assert null_space(remaining, 1e-6)[1] == 1


def test_closed_form_bad_input(wide_model: nn.Module, basis) -> None:
    with pytest.raises(SettingsError, match="protected prompt"):
        check_target("M", [CONCEPT], ["", *PROTECTED])
    with pytest.raises(SettingsError, match="one of the concepts"):
        check_target("q", [CONCEPT], [""])
    check_target("", [CONCEPT], [""])  # the default target: the name removed
    with pytest.raises(SettingsError, match="tokens"):
        wording_rows(wide_model, CONCEPT, ["abcdefgh {name}"])
    with pytest.raises(SettingsError, match="mu"):
        closed_form_increments(wide_model, {CONCEPT: basis}, {CONCEPT: TEMPLATES}, mu=0.0)
    for bad, match in [({"mu": -1.0}, "mu"), ({"solver": "sgd"}, "solver"), ({"protect_energy": 1.5}, r"\(0, 1\]"),
                       ({"protect_energy": 0.0}, r"\(0, 1\]"), ({"concept_kind": "style"}, "concept_kind")]:
        with pytest.raises(SettingsError, match=match):
            SepCESettings(**bad).validate()


@pytest.mark.parametrize(("flags", "message"), [
    (["--protect_energy", "1.5"], r"protect_energy \(--protect_energy\) must be in \(0, 1\]"),
    (["--target", "tamsin brack"], "is a protected prompt"),  # the toy model protects its other artists
])
def test_train_script_refuses_bad_closed_form_input(flags: list[str], message: str, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "train-scripts/train-sepce.py", "--solver", "closed_form", "--output_dir", str(tmp_path),
         "--no_report", *flags], cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and re.search(message, result.stderr), result.stderr
    assert result.stderr.count("error:") == 1 and not list(tmp_path.iterdir())


def test_kept_wordings_of_protected_prompts_move_less(wide_model: nn.Module, basis) -> None:
    """The protected prompts themselves are exact either way; their other wordings ("a m", "b n w c")
    are only held by the kept rows of the fit."""
    fits = {
        keep: closed_form_increments(wide_model, {CONCEPT: basis}, {CONCEPT: TEMPLATES}, mu=1.0, keep=keep)[CONCEPT]
        for keep in (False, True)
    }
    others = [fill(template, prompt) for prompt in PROTECTED for template in TEMPLATES[1:]]
    moved = {keep: relative_kv_changes(wide_model, fit, others) for keep, fit in fits.items()}
    assert sum(moved[True].values()) < 0.5 * sum(moved[False].values())
    assert [fits[keep].metadata["closed_form"]["keep_wordings"] for keep in (False, True)] == [False, True]


def test_solve_sepce_passes_the_settings_on(wide_model: nn.Module, basis, tmp_path: Path) -> None:
    templates = tmp_path / "wordings.txt"
    templates.write_text("\n".join(TEMPLATES), encoding="utf-8")
    for keep, mu in [(False, 1.0), (True, 0.3)]:
        settings = SepCESettings(solver="closed_form", keep_wordings=keep, mu=mu, concept_templates=str(templates))
        record = solve_sepce(wide_model, {CONCEPT: basis}, settings)[CONCEPT].metadata
        assert (record["closed_form"]["keep_wordings"], record["closed_form"]["mu"]) == (keep, mu)
        assert record["settings"]["templates"] == TEMPLATES and record["settings"]["solver"] == "closed_form"


def test_run_names_show_the_solver_and_only_the_settings_it_uses(tmp_path: Path) -> None:
    from erasure.runs import RunRequest, result_files

    def name(**settings: object) -> str:
        request = RunRequest(concepts=("vela quorin",), settings=SepCESettings(**settings), output_dir=tmp_path)
        return result_files(request, lr=1.0)[0]["vela quorin"].name

    assert re.fullmatch(r"sepce_closed_form-vela_quorin-mu_1-seed_0-[0-9a-f]{8}\.safetensors", name(solver="closed_form"))
    assert name(solver="closed_form", mu=0.5) != name(solver="closed_form")
    assert name(solver="closed_form+cie").startswith("sepce_closed_form_cie-vela_quorin-lr_1-beta_1e-4-")
    assert name().startswith("sepce-vela_quorin-lr_1-")


def test_joint_solve_fits_the_sum_on_every_members_wordings(wide_model: nn.Module, monkeypatch) -> None:
    """--joint_objective paper: the set's edits are solved together, so their SUM maps every member's wordings
    onto its targets better than independently solved edits do; each increment still leaves the
    other members' exact prompts unchanged (restoring one is exact), and a set too large for one
    system is refused with the sizes (METHOD.md §6)."""
    concepts = ["q", "r"]
    bases = compute_bases(wide_model, concepts, PROTECTED)
    layers = cross_attention_kv(wide_model)

    rows = {concept: wording_rows(wide_model, concept, TEMPLATES) for concept in concepts}
    with torch.no_grad():
        targets = {(c, name): layer(rows[c].target.float()) for c in concepts for name, layer in layers.items()}

    def residual(increments: dict[str, Increment]) -> float:
        compose(wide_model, list(increments.values()))
        try:
            with torch.no_grad():
                return sum(float((layer(rows[c].concept.float()) - targets[c, name]).norm() ** 2)
                           for c in concepts for name, layer in layers.items())
        finally:
            detach(wide_model, [increment.name for increment in increments.values()])

    templates = dict.fromkeys(concepts, TEMPLATES)
    alone = closed_form_increments(wide_model, bases, templates, mu=1e-3)
    together = closed_form_increments(wide_model, bases, templates, mu=1e-3, joint=True)
    assert together["q"].metadata["closed_form"]["joint"] and not alone["q"].metadata["closed_form"]["joint"]
    assert residual(together) < residual(alone)
    changes = relative_kv_changes(wide_model, together["q"], ["", *PROTECTED, "r"])
    assert max(changes.values()) <= 1e-5  # q's increment leaves r (and every protected prompt) exact
    monkeypatch.setattr("erasure.closed_form.MAX_JOINT_UNKNOWNS", bases["q"].dims)
    with pytest.raises(SettingsError, match=rf"{bases['q'].dims + bases['r'].dims} coefficients.*--joint_objective per_concept"):
        closed_form_increments(wide_model, bases, templates, joint=True)
