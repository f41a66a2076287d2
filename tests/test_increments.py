"""Increment algebra: attach, compose in any order, detach exactly, protected keys unchanged,
files, merge/export, weight differences and verify()."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from erasure.bases import ConceptBasis, compute_bases, encode_prompts, load_basis
from erasure.files import ErasureFileError
from erasure.edits import AppliedEdits, apply, load_edit
from erasure.increments import (
    Increment,
    IncrementError,
    active_concepts,
    attach_increment,
    compose,
    cross_attention_kv,
    detach,
    export_checkpoint,
    extract_increment,
    merge_into_weights,
    slugify,
    unet_of,
    unmerge,
    verify,
)
from erasure.loading import load_model, model_fingerprint
from erasure.weight_differences import (
    WeightDifference,
    WeightDifferenceError,
    apply_weight_difference,
    weight_difference,
)
from wide_tiny_model import build_wide_tiny_model, write_wide_tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = ["van gogh", "picasso", "cezanne"]
ATTN2_LAYERS = 14  # tiny UNet: 7 SpatialTransformers x (to_k, to_v)
#: Coefficient scale that makes dW = coeff @ (1e-4 * S) change a concept's keys by a few percent.
COEFF_SCALE = 300.0


@pytest.fixture(scope="module")
def wide_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wide_tiny_config(tmp_path_factory.mktemp("wide"))


@pytest.fixture(scope="module")
def base_model(wide_config: Path) -> nn.Module:
    return build_wide_tiny_model(wide_config)


@pytest.fixture
def model(base_model: nn.Module) -> nn.Module:
    return copy.deepcopy(base_model)


@pytest.fixture(scope="module")
def bases(base_model: nn.Module) -> dict[str, ConceptBasis]:
    return compute_bases(base_model, CONCEPTS, extra_protected=["red circle"])


def random_increment(model: nn.Module, basis: ConceptBasis, seed: int) -> Increment:
    generator = torch.Generator().manual_seed(seed)
    coeffs = {
        name: COEFF_SCALE * torch.randn(layer.out_features, basis.dims, generator=generator)
        for name, layer in cross_attention_kv(model).items()
    }
    metadata = {"method": "test", "base_model_fingerprint": model_fingerprint(model)}
    return Increment(basis.concept, slugify(basis.concept), basis, 1e-4, coeffs, metadata)


@pytest.fixture(scope="module")
def increments(base_model: nn.Module, bases: dict[str, ConceptBasis]) -> list[Increment]:
    return [random_increment(base_model, bases[concept], seed) for seed, concept in enumerate(CONCEPTS)]


def unet_output(model: nn.Module, prompt: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    with torch.no_grad():
        context = model.get_learned_conditioning([prompt])
        return model.apply_model(x, torch.tensor([500]), context)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_slugify() -> None:
    assert slugify("Van Gogh") == "van_gogh"
    assert slugify("  Kelly  McKernan! ") == "kelly_mckernan"
    assert slugify("van_gogh") == "van_gogh"
    with pytest.raises(IncrementError, match="no letters"):
        slugify("!!")


def test_cross_attention_kv_finds_every_attn2_key_value(model: nn.Module) -> None:
    layers = cross_attention_kv(model)
    assert len(layers) == ATTN2_LAYERS
    assert all(name.endswith((".attn2.to_k", ".attn2.to_v")) for name in layers)
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_k" in layers
    with pytest.raises(TypeError, match="LatentDiffusion"):
        cross_attention_kv(nn.Linear(2, 2))


def test_attach_starts_as_a_no_op_and_trains_only_coefficients(model: nn.Module, bases: dict) -> None:
    before = unet_output(model, "van gogh")
    parameters = attach_increment(model, bases["van gogh"])
    assert len(parameters) == ATTN2_LAYERS and all(p.requires_grad and not p.any() for p in parameters)
    assert torch.equal(unet_output(model, "van gogh"), before)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == ATTN2_LAYERS and all(".increments.van_gogh.coeff" in name for name in trainable)
    frozen = attach_increment(model, bases["picasso"], trainable=False)
    assert not any(p.requires_grad for p in frozen)
    with pytest.raises(IncrementError, match="already attached"):
        attach_increment(model, bases["picasso"])


def test_basis_from_another_text_encoder_is_refused(model: nn.Module, bases: dict) -> None:
    foreign = dataclasses.replace(bases["van gogh"], text_encoder_fingerprint="0123456789abcdef")
    with pytest.raises(IncrementError, match="0123456789abcdef.*Recompute the basis"):
        attach_increment(model, foreign)


def test_increment_for_another_base_model_is_refused(model: nn.Module, increments: list, tmp_path: Path) -> None:
    path = increments[0].save(tmp_path / "van_gogh.safetensors")
    loaded = Increment.load(path)
    with torch.no_grad():
        cross_attention_kv(model)["middle_block.1.transformer_blocks.0.attn2.to_v"].weight.mul_(1.01)
    both = f"van_gogh.safetensors.*{loaded.base_model_fingerprint}.*{model_fingerprint(model)}"
    with pytest.raises(IncrementError, match=both):
        compose(model, [loaded, increments[1]])
    assert active_concepts(model) == [], "nothing is attached when any increment is refused"


def test_compose_order_does_not_matter(model: nn.Module, base_model: nn.Module, increments: list) -> None:
    other = copy.deepcopy(base_model)
    assert compose(model, increments) == ["van_gogh", "picasso", "cezanne"]
    compose(other, increments[::-1])
    assert sorted(active_concepts(model)) == sorted(active_concepts(other))
    for prompt in ["van gogh", "a clock"]:
        assert torch.allclose(unet_output(model, prompt), unet_output(other, prompt), atol=1e-6)


def test_detach_all_is_bit_exact(model: nn.Module, increments: list) -> None:
    before = {key: value.clone() for key, value in model.state_dict().items()}
    compose(model, increments)
    detach(model, ["Van Gogh", "picasso"])
    assert active_concepts(model) == ["cezanne"]
    detach(model, ["cezanne"])
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)
    with pytest.raises(IncrementError, match="Cannot detach.*not attached"):
        detach(model, ["picasso"])


def test_protected_keys_and_values_unchanged(model: nn.Module, increments: list) -> None:
    """Keys/values (the real float32 forward) of every protected prompt move by float noise only,
    while each concept's own keys/values move by a few percent."""
    prompts = ["", "red circle", *CONCEPTS]
    encoded = encode_prompts(model, prompts).float()
    layers = cross_attention_kv(model)
    original = {name: layer(encoded) for name, layer in layers.items()}
    compose(model, increments)
    for name, layer in layers.items():
        for index in (0, 1):  # "" and "red circle" are protected by every increment
            assert relative(layer(encoded[index]), original[name][index]) <= 1e-5
    detach(model, ["van gogh", "picasso"])
    only_cezanne = {name: layer(encoded) for name, layer in layers.items()}
    for name in layers:
        assert relative(only_cezanne[name][2], original[name][2]) <= 1e-5, "cezanne protects van gogh"
        assert relative(only_cezanne[name][4], original[name][4]) > 1e-3, "cezanne's own keys move"


def test_detaching_one_concept_brings_back_its_outputs(
    model: nn.Module, base_model: nn.Module, increments: list
) -> None:
    compose(model, increments)
    erased = unet_output(model, "picasso")
    original = unet_output(base_model, "picasso")
    assert relative(erased, original) > 1e-4
    detach(model, ["picasso"])
    assert relative(unet_output(model, "picasso"), original) <= 1e-5
    assert relative(unet_output(model, "van gogh"), unet_output(base_model, "van gogh")) > 1e-4


def test_extract_and_file_round_trip(model: nn.Module, increments: list, tmp_path: Path) -> None:
    source = increments[1]
    compose(model, [source])
    extracted = extract_increment(model, "picasso", source.basis, metadata={"method": "sepce", "steps": 3})
    assert extracted.metadata["base_model_fingerprint"] == model_fingerprint(model)
    assert all(torch.equal(extracted.coeffs[name], source.coeffs[name]) for name in source.coeffs)
    path = extracted.save(tmp_path / "picasso.safetensors")
    loaded = Increment.load(path)
    assert (loaded.concept, loaded.name, loaded.beta, loaded.source) == ("picasso", "picasso", 1e-4, path)
    assert loaded.metadata["steps"] == 3 and loaded.basis.protected_prompts == source.basis.protected_prompts
    assert torch.equal(loaded.basis.basis, source.basis.basis)
    assert all(torch.equal(loaded.coeffs[name], source.coeffs[name]) for name in source.coeffs)
    assert isinstance(load_edit(path), Increment)
    with pytest.raises(ErasureFileError, match="already exists"):
        extracted.save(path)
    with pytest.raises(IncrementError, match="beta"):
        extract_increment(model, "picasso", source.basis, beta=1e-3)
    corrupted = dataclasses.replace(source, coeffs={name: coeff.clone() for name, coeff in source.coeffs.items()})
    next(iter(corrupted.coeffs.values()))[0, 0] = float("inf")
    corrupted_path = corrupted.save(tmp_path / "corrupted.safetensors")
    with pytest.raises(ErasureFileError, match="NaN/inf"):  # files.read_tensors checks every file it reads
        Increment.load(corrupted_path)
    with torch.no_grad():
        next(iter(cross_attention_kv(model).values())).increments["picasso"].coeff[0, 0] = float("nan")
    with pytest.raises(IncrementError, match="NaN"):
        extract_increment(model, "picasso", source.basis)


def test_merge_export_and_reload(model: nn.Module, increments: list, wide_config: Path, tmp_path: Path) -> None:
    compose(model, increments[:2])
    composed = unet_output(model, "van gogh")
    merge_into_weights(model)
    assert torch.allclose(unet_output(model, "van gogh"), composed, atol=1e-6)
    with pytest.raises(IncrementError, match="unmerge"):
        detach(model, ["picasso"])
    unmerge(model)
    path = export_checkpoint(model, tmp_path / "composed.safetensors")
    assert active_concepts(model) == ["van_gogh", "picasso"] and not any(
        layer.merged for layer in cross_attention_kv(model).values()
    )
    reloaded = load_model(wide_config, path, verbose=False)
    assert set(reloaded.state_dict()) == set(build_wide_tiny_model(wide_config).state_dict())
    assert torch.allclose(unet_output(reloaded, "van gogh"), composed, atol=1e-6)
    with pytest.raises(ErasureFileError, match="already exists"):
        export_checkpoint(model, path)


def test_verify_reports_exactness(model: nn.Module, increments: list) -> None:
    before = {key: value.clone() for key, value in model.state_dict().items()}
    report = verify(model, increments)
    assert report["increments"] == ["van_gogh", "picasso", "cezanne"] and report["layers"] == ATTN2_LAYERS
    assert report["protected_prompts_checked"] == 5  # "", the three concepts, "red circle"
    assert report["max_relative_kv_change"] <= 1e-5
    assert min(report["concept_kv_change"].values()) > 1e-3
    assert report["max_restore_abs_diff"] == 0.0
    after = model.state_dict()
    assert active_concepts(model) == [] and all(torch.equal(after[key], value) for key, value in before.items())


def test_weight_difference_apply_and_remove(model: nn.Module, base_model: nn.Module, tmp_path: Path) -> None:
    unet = unet_of(model)
    original = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if ".attn2." in name:
                parameter.add_(0.01 * torch.randn_like(parameter))
    trained = model.state_dict()
    attn2_keys = [key for key in trained if ".attn2." in key]
    difference = weight_difference(
        original, trained, metadata={"base_model_fingerprint": model_fingerprint(base_model)}
    )
    assert sorted(difference.deltas) == sorted(attn2_keys)
    with pytest.raises(ValueError, match="method and concept"):
        difference.save(tmp_path / "cie.safetensors")
    difference.method, difference.concept = "cie", "van gogh"
    path = difference.save(tmp_path / "cie.safetensors")
    loaded = load_edit(path)
    assert isinstance(loaded, WeightDifference) and loaded.method == "cie"
    fresh = copy.deepcopy(base_model)
    apply_weight_difference(fresh, loaded)
    applied = fresh.state_dict()
    assert all(torch.allclose(applied[key], trained[key], atol=1e-7) for key in attn2_keys)
    with pytest.raises(WeightDifferenceError, match="trained on base model"):
        apply_weight_difference(fresh, loaded)
    apply_weight_difference(fresh, loaded, sign=-1.0, check_fingerprint=False)
    removed = fresh.state_dict()
    assert all(torch.allclose(removed[key], original[key], atol=1e-7) for key in original)
    with pytest.raises(ValueError, match="no weight changed"):
        weight_difference(original, original)
    foreign = WeightDifference.load(path)
    foreign.deltas = {"model.diffusion_model.nonexistent.weight": torch.zeros(2)}
    with pytest.raises(WeightDifferenceError, match="lacks"):
        apply_weight_difference(fresh, foreign, check_fingerprint=False)


def test_apply_takes_both_kinds_and_removes_them(model: nn.Module, increments: list) -> None:
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_q.weight"
    delta = torch.full_like(model.state_dict()[key], 1e-3)
    record = {"base_model_fingerprint": model_fingerprint(model)}
    difference = WeightDifference("esd-x", "picasso", {key: delta}, record)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    applied = apply(model, [increments[0], difference])
    assert isinstance(applied, AppliedEdits)
    assert applied.increments == ["van_gogh"] and applied.weight_differences == ["esd-x/picasso"]
    assert active_concepts(model) == ["van_gogh"]
    assert torch.allclose(model.state_dict()[key], before[key] + delta)
    applied.remove()
    assert active_concepts(model) == []
    after = model.state_dict()
    assert all(torch.equal(after[name], before[name]) for name in before)  # the originals put back
    applied.remove()  # a second remove is a no-op
    with apply(model, [increments[0], difference]) as handle:
        assert handle.increments == ["van_gogh"] and active_concepts(model) == ["van_gogh"]
        assert torch.allclose(model.state_dict()[key], before[key] + delta)
    assert active_concepts(model) == []
    assert torch.allclose(model.state_dict()[key], before[key], atol=1e-7)
    with pytest.raises(TypeError, match="increments and weight differences"):
        apply(model, [])


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), REPO_ROOT / "train-scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_bases_and_compose_scripts(
    base_model: nn.Module, wide_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = export_checkpoint(base_model, tmp_path / "base.safetensors")
    model_args = ["--config_path", str(wide_config), "--ckpt_path", str(ckpt)]
    bases_dir = tmp_path / "bases"
    generate = load_script("generate-bases")
    generate.main(
        [*model_args, "--concepts", *CONCEPTS[:2], "--protected", "red circle", "--output_dir", str(bases_dir)]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [row["concept"] for row in summary["bases"]] == CONCEPTS[:2] and summary["mode"] == "joint"
    basis = load_basis(bases_dir / "basis-van_gogh.safetensors")
    assert basis.protected_prompts == ["", "picasso", "red circle"] and basis.dims == summary["bases"][0]["dims"]
    with pytest.raises(ErasureFileError, match="already exists"):
        generate.main([*model_args, "--concepts", "van gogh", "--output_dir", str(bases_dir)])

    files = []
    for seed, concept in enumerate(CONCEPTS[:2]):
        increment = random_increment(base_model, load_basis(bases_dir / f"basis-{slugify(concept)}.safetensors"), seed)
        files.append(str(increment.save(tmp_path / f"{slugify(concept)}.safetensors")))
    compose_script = load_script("compose")
    output = tmp_path / "composed.safetensors"
    compose_script.main([*model_args, "--increments", *files, "--verify", "--output", str(output)])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["max_relative_kv_change"] <= 1e-5 and report["max_restore_abs_diff"] == 0.0
    assert report["applied"]["increments"] == ["van_gogh", "picasso"] and Path(report["output"]) == output
    composed = load_model(wide_config, output, verbose=False)
    reference = copy.deepcopy(base_model)
    compose(reference, [Increment.load(path) for path in files])
    assert torch.allclose(unet_output(composed, "picasso"), unet_output(reference, "picasso"), atol=1e-6)


def test_written_files_get_the_umask_mode_not_0600(tmp_path: Path) -> None:
    """safetensors creates files readable by their owner only; ours follow the umask like any file."""
    from erasure.files import write_tensors

    mask = os.umask(0)
    os.umask(mask)
    path = write_tensors(tmp_path / "t.safetensors", {"a": torch.zeros(2)}, kind="test", metadata={})
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
