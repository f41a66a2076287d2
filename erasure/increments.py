"""Per-concept SepCE increments: attach, extract, save/load, compose, detach, merge, export, verify.

An increment for concept k lives in every cross-attention key/value projection
(``attn2.to_k`` / ``attn2.to_v``, 32 layers in SD v1) as ``dW_{k,l} = w_{k,l} @ (beta * S_k)``
on the concept's null-space basis ``S_k`` (erasure.bases). It is stored under the name
``slugify(concept)`` inside each ``IncrementalLinear``, and as ONE safetensors file: the
coefficients of every layer (``coeff.<layer>``), the basis (``basis``) and JSON metadata
(beta, the basis' protected prompts and fingerprints, training record, versions).

Increments are tied to the base model they were trained on by ``model_fingerprint`` (the
attn2 key/value weights and the text encoder) and to the text encoder that made the basis by
``text_encoder_fingerprint``; composing onto another model is refused.

The baselines' weight differences (CiE, ESD), which compose by plain addition, are defined in
``erasure.weight_differences``; ``erasure.edits`` applies and removes either kind.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from erasure.bases import (
    ConceptBasis,
    basis_from_metadata,
    basis_metadata,
    encode_prompts,
    normalise_prompt,
)
from erasure.errors import IncrementError, VerificationError
from erasure.files import (
    check_writable,
    read_tensors,
    versions,
    write_tensors,
)
from erasure.loading import model_fingerprint, text_encoder_fingerprint
from ldm.modules.incremental_linear import IncrementalLinear, incremental_linears

DEFAULT_BETA = 1e-4
#: ``verify``'s tolerance on a protected prompt's relative key/value change. Exact in real numbers,
#: the change is float rounding: the float32 basis leaves about 1e-7 (``bases.protected_leakage``) and
#: measured values are 1e-8 .. 2e-7 (toy model, one to three increments). 1e-4 is 500x that and still
#: 1e4x below a broken basis or a tampered file (relative changes of order 1).
DEFAULT_VERIFY_RTOL = 1e-4
INCREMENT_KIND = "increment"
CHECKPOINT_KIND = "ldm_checkpoint"
KV_LAYER_SUFFIXES = (".attn2.to_k", ".attn2.to_v")
COEFF_PREFIX = "coeff."


def slugify(concept: str) -> str:
    """Increment name for ``concept``: lower-case words joined by ``_`` ("Van Gogh" -> "van_gogh")."""
    slug = re.sub(r"[^0-9a-z]+", "_", str(concept).lower()).strip("_")
    if not slug:
        raise IncrementError(f"Concept {concept!r} has no letters or digits; name the concept in words.")
    return slug


def check_distinct_names(concepts: Sequence[str]) -> list[str]:
    """The increment names of ``concepts``; refuse two concepts with one name ("vela quorin", "vela-quorin")."""
    slugs = [slugify(concept) for concept in concepts]
    clashes = {slug: [c for c, s in zip(concepts, slugs) if s == slug] for slug in slugs if slugs.count(slug) > 1}
    if clashes:
        slug, named = next(iter(clashes.items()))
        raise IncrementError(
            f"Concepts {named} have the same name {slug!r} (increment, file and image-folder names use lower-case "
            f"words joined by '_'); list each concept once, under one spelling."
        )
    return slugs


def unet_of(model: nn.Module) -> nn.Module:
    """The UNet inside a LatentDiffusion (``model.model.diffusion_model``)."""
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(unet, nn.Module):
        raise TypeError(
            f"Expected a LatentDiffusion with model.diffusion_model, got {type(model).__name__}; load the model "
            f"with erasure.loading.load_model."
        )
    return unet


def cross_attention_kv(model: nn.Module) -> dict[str, IncrementalLinear]:
    """Every cross-attention key/value projection, keyed by its name inside the UNet."""
    layers = {
        name: layer for name, layer in incremental_linears(unet_of(model)).items() if name.endswith(KV_LAYER_SUFFIXES)
    }
    if not layers:
        raise IncrementError(
            "This UNet has no IncrementalLinear attn2.to_k/to_v layers; build it from this project's ldm package "
            "(SpatialTransformer with a context_dim)."
        )
    return layers


def _require_unmerged(layers: Mapping[str, IncrementalLinear], action: str) -> None:
    if any(layer.merged for layer in layers.values()):
        raise IncrementError(
            f"Cannot {action} while increments are merged into the weights; call unmerge(model) first."
        )


def _check_text_encoder(model_fp: str, basis: ConceptBasis, what: str) -> None:
    if basis.text_encoder_fingerprint != model_fp:
        raise IncrementError(
            f"{what} was made with text encoder {basis.text_encoder_fingerprint}, but this model's text encoder is "
            f"{model_fp}: its basis does not protect this model's prompts. Recompute the basis on this model "
            f"(train-scripts/generate-bases.py) and retrain, or load the model it was made for."
        )


def _check_coeffs(
    layers: Mapping[str, IncrementalLinear], basis: ConceptBasis, coeffs: Mapping[str, torch.Tensor] | None, what: str
) -> None:
    widths = {layer.in_features for layer in layers.values()}
    if widths != {basis.width}:
        raise IncrementError(f"{what}: basis width {basis.width} does not match the cross-attention width {widths}.")
    if coeffs is None:
        return
    missing, extra = sorted(set(layers) - set(coeffs)), sorted(set(coeffs) - set(layers))
    if missing or extra:
        raise IncrementError(
            f"{what} does not fit this UNet: {len(missing)} layers without coefficients {missing[:3]}, "
            f"{len(extra)} unknown layers {extra[:3]}. It was made for another architecture."
        )
    for name, layer in layers.items():
        expected = (layer.out_features, basis.dims)
        if tuple(coeffs[name].shape) != expected:
            got = tuple(coeffs[name].shape)
            raise IncrementError(f"{what}: coefficients of {name} are {got}, expected {expected}.")


def _attach(
    layers: Mapping[str, IncrementalLinear],
    name: str,
    basis: ConceptBasis,
    beta: float,
    coeffs: Mapping[str, torch.Tensor] | None,
    trainable: bool,
) -> list[nn.Parameter]:
    """Add increment ``name`` to every layer; one basis tensor per device/dtype is shared by all layers."""
    taken = [layer_name for layer_name, layer in layers.items() if name in layer.increments]
    if taken:
        raise IncrementError(f"An increment named {name!r} is already attached ({taken[0]}...); detach it first.")
    shared: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
    parameters = []
    for layer_name, layer in layers.items():
        key = (layer.weight.device, layer.weight.dtype)
        if key not in shared:
            shared[key] = basis.basis.detach().to(device=key[0], dtype=key[1])
        coeff = None if coeffs is None else coeffs[layer_name]
        parameter = layer.add_increment(name, shared[key], beta, coeff)
        parameter.requires_grad_(trainable)
        parameters.append(parameter)
    return parameters


def attach_increment(
    model: nn.Module,
    basis: ConceptBasis,
    beta: float = DEFAULT_BETA,
    coeffs: Mapping[str, torch.Tensor] | None = None,
    trainable: bool = True,
) -> list[nn.Parameter]:
    """Attach ``slugify(basis.concept)`` to every attn2 to_k/to_v; returns the coefficient parameters.

    Coefficients start at zero (METHOD.md §2: the model is unchanged until trained) unless
    ``coeffs`` {layer: [d_out, dims]} is given. The basis must come from this model's text encoder.
    """
    layers = cross_attention_kv(model)
    _require_unmerged(layers, "attach an increment")
    what = f"Basis for concept {basis.concept!r}"
    _check_text_encoder(text_encoder_fingerprint(model), basis, what)
    _check_coeffs(layers, basis, coeffs, what)
    return _attach(layers, slugify(basis.concept), basis, beta, coeffs, trainable)


@dataclass
class Increment:
    """One concept's increment: coefficients per layer {layer: [d_out, dims]} on ``basis``.

    ``metadata`` records how it was made (method, hyper-parameters, steps, stop reason, seeds)
    and ``base_model_fingerprint``; ``source`` is the file it was loaded from, if any.
    """

    concept: str
    name: str
    basis: ConceptBasis
    beta: float
    coeffs: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    @property
    def base_model_fingerprint(self) -> str | None:
        return self.metadata.get("base_model_fingerprint")

    def describe(self) -> str:
        return f"Increment {self.concept!r}" + (f" ({self.source})" if self.source else "")

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """One safetensors file: ``coeff.<layer>`` per layer, ``basis``, JSON metadata in the header."""
        if not self.base_model_fingerprint:
            raise IncrementError(f"{self.describe()} has no base_model_fingerprint; create it with extract_increment.")
        tensors = {COEFF_PREFIX + layer: coeff for layer, coeff in self.coeffs.items()}
        tensors["basis"] = self.basis.basis
        header = {
            "concept": self.concept,
            "name": self.name,
            "beta": self.beta,
            "layers": list(self.coeffs),
            "basis": basis_metadata(self.basis),
            "metadata": self.metadata,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        return write_tensors(path, tensors, INCREMENT_KIND, header, overwrite)

    @classmethod
    def load(cls, path: str | Path) -> Increment:
        """An increment file written by ``save`` (``read_tensors`` refuses non-finite tensors)."""
        path = Path(path)
        tensors, header = read_tensors(path, INCREMENT_KIND)
        try:
            basis = basis_from_metadata(tensors["basis"], header["basis"], path)
            coeffs = {layer: tensors[COEFF_PREFIX + layer] for layer in header["layers"]}
            increment = cls(
                header["concept"], header["name"], basis, float(header["beta"]), coeffs, dict(header["metadata"]), path
            )
        except KeyError as error:
            raise IncrementError(f"{path}: increment file lacks {error}; the file is corrupted, re-save it.") from error
        wrong = [layer for layer, coeff in coeffs.items() if coeff.ndim != 2 or coeff.shape[1] != basis.dims]
        if wrong:
            raise IncrementError(
                f"{path}: coefficients of {wrong[0]} do not match the basis' {basis.dims} dims; the file is corrupted."
            )
        return increment


def extract_increment(
    model: nn.Module,
    concept: str,
    basis: ConceptBasis,
    beta: float | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Increment:
    """Read the trained coefficients of ``concept`` out of ``model`` (CPU float32 copies).

    ``beta`` (if given) must equal the attached one. The base-model fingerprint and library
    versions are added to ``metadata`` unless present; non-finite coefficients are refused.
    """
    if normalise_prompt(concept) != normalise_prompt(basis.concept):
        raise IncrementError(f"Concept {concept!r} does not match its basis' concept {basis.concept!r}.")
    layers = cross_attention_kv(model)
    name = slugify(concept)
    missing = [layer_name for layer_name, layer in layers.items() if name not in layer.increments]
    if missing:
        raise IncrementError(
            f"No increment {name!r} attached to {len(missing)} layers (e.g. {missing[0]}); attach and train it first."
        )
    betas = {layer.increments[name].beta for layer in layers.values()}
    if len(betas) != 1 or (beta is not None and betas != {float(beta)}):
        raise IncrementError(f"Increment {name!r} has beta {sorted(betas)} in the model, but beta={beta} was given.")
    coeffs = {
        layer_name: layer.increments[name].coeff.detach().to("cpu", torch.float32).clone()
        for layer_name, layer in layers.items()
    }
    bad = [layer_name for layer_name, coeff in coeffs.items() if not torch.isfinite(coeff).all()]
    if bad:
        raise IncrementError(
            f"Increment {name!r} has NaN/inf coefficients in {len(bad)} layers (e.g. {bad[0]}); training diverged, "
            f"keep the last good checkpoint."
        )
    record = dict(metadata or {})
    record.setdefault("base_model_fingerprint", model_fingerprint(model))
    record.setdefault("versions", versions())
    return Increment(basis.concept, name, basis, betas.pop(), coeffs, record)


def compose(model: nn.Module, increments: Sequence[Increment]) -> list[str]:
    """Attach ``increments`` (frozen, active) after checking all of them; returns their names.

    Every increment must have been trained on this base model (same ``model_fingerprint``) with
    a basis from this text encoder; otherwise nothing is attached and the error names the
    increment and both fingerprints. Increments already attached stay as they are.
    """
    increments = list(increments)
    if not increments:
        raise IncrementError("compose needs at least one increment.")
    layers = cross_attention_kv(model)
    _require_unmerged(layers, "compose increments")
    base_fp, text_fp = model_fingerprint(model), text_encoder_fingerprint(model)
    names: list[str] = []
    for increment in increments:
        what = increment.describe()
        _check_text_encoder(text_fp, increment.basis, what)
        if increment.base_model_fingerprint != base_fp:
            raise IncrementError(
                f"{what} was trained on base model {increment.base_model_fingerprint}, but this model is {base_fp}; "
                f"load the model it was trained on (--config_path/--ckpt_path), or retrain it on this one."
            )
        _check_coeffs(layers, increment.basis, increment.coeffs, what)
        if increment.name in names:
            raise IncrementError(f"{what}: concept {increment.concept!r} is given twice; compose each concept once.")
        names.append(increment.name)
    for increment in increments:
        _attach(layers, increment.name, increment.basis, increment.beta, increment.coeffs, trainable=False)
    return names


def attached_names(model: nn.Module) -> list[str]:
    """Names of the increments attached to the cross-attention layers (active or not)."""
    return next(iter(cross_attention_kv(model).values())).increment_names


def active_concepts(model: nn.Module) -> list[str]:
    """Names (``slugify(concept)``) of the increments active in every cross-attention layer."""
    layers = list(cross_attention_kv(model).values())
    return [name for name in layers[0].increment_names if all(name in layer.active_names for layer in layers)]


def detach(model: nn.Module, concepts: Iterable[str]) -> list[str]:
    """Take the increments of ``concepts`` (names or concept text) off the model; the others stay untouched."""
    if isinstance(concepts, str):
        raise TypeError(f"concepts must be a list of names, got the string {concepts!r}; wrap it in a list.")
    layers = cross_attention_kv(model)
    _require_unmerged(layers, "detach increments")
    names = list(dict.fromkeys(slugify(concept) for concept in concepts))
    present = attached_names(model)
    unknown = [name for name in names if name not in present]
    if unknown:
        raise IncrementError(f"Cannot detach {unknown}: not attached. Attached increments: {present}.")
    for layer in layers.values():
        for name in names:
            layer.remove_increment(name)
    return names


def merge_into_weights(model: nn.Module) -> None:
    """Fold the active increments into the attn2 to_k/to_v weights (exact originals kept)."""
    layers = cross_attention_kv(model)
    _require_unmerged(layers, "merge again")
    for layer in layers.values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Put back the exact pre-merge weights; the increments stay attached."""
    layers = cross_attention_kv(model)
    if not all(layer.merged for layer in layers.values()):
        raise IncrementError("The increments are not merged; there is nothing to unmerge.")
    for layer in layers.values():
        layer.unmerge()


def export_checkpoint(model: nn.Module, path: str | Path, overwrite: bool = False) -> Path:
    """Write the model as it computes now (active increments merged) as an ldm safetensors checkpoint.

    The keys are exactly the base model's (CompVis) keys, so ``erasure.loading.load_model``
    loads it with the original config. The model is left as it was.
    """
    path = check_writable(path, overwrite)
    layers = cross_attention_kv(model)
    merged_here = not any(layer.merged for layer in layers.values())
    concepts = active_concepts(model)
    if merged_here:
        merge_into_weights(model)
    try:
        header = {"merged_increments": concepts, "versions": versions()}
        return write_tensors(path, model.state_dict(), CHECKPOINT_KIND, header, overwrite)
    finally:
        if merged_here:
            unmerge(model)


def _worse(value: float, current: float) -> bool:
    """Whether ``value`` is worse than ``current`` in a search for the largest change; NaN is worst."""
    return not math.isnan(current) and (math.isnan(value) or value > current)


def _relative_change(rows: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
    """``||rows @ delta^T|| / ||rows @ weight^T + bias||`` in float64 (no cancellation of K_new - K_0)."""
    base = rows @ weight.T + (0 if bias is None else bias)
    return float((rows @ delta.T).norm() / base.norm())


def kv_changes(model: nn.Module, increments: Sequence[Increment]) -> dict[str, Any]:
    """Key/value changes of the attached ``increments``, per layer, in float64.

    A prompt protected by some increments must keep its keys and values under the sum of
    exactly those increments (the others may change it: a concept's own increment changes the
    concept). ``max_relative_kv_change`` is the largest such change over every protected prompt
    of every increment and every layer; ``concept_kv_change`` is, per concept, the largest change
    of its own keys/values under its own increment (how strongly it is edited).
    """
    protectors: dict[str, tuple[str, list[str]]] = {}
    for increment in increments:
        for prompt in increment.basis.protected_prompts:
            protectors.setdefault(normalise_prompt(prompt), (prompt, []))[1].append(increment.name)
    prompts = [prompt for prompt, _ in protectors.values()]
    encoded = dict(zip(prompts, encode_prompts(model, prompts)))
    concept_rows = dict(zip([i.name for i in increments], encode_prompts(model, [i.concept for i in increments])))
    worst = {"value": 0.0, "prompt": None, "layer": None}
    concept_change = {increment.concept: 0.0 for increment in increments}
    for layer_name, layer in cross_attention_kv(model).items():
        weight = layer.weight.detach().to("cpu", torch.float64)
        bias = None if layer.bias is None else layer.bias.detach().to("cpu", torch.float64)
        deltas = {i.name: layer.delta_weight([i.name]).detach().to("cpu", torch.float64) for i in increments}
        for prompt, names in protectors.values():
            change = _relative_change(encoded[prompt], sum(deltas[name] for name in names), weight, bias)
            if _worse(change, worst["value"]):
                worst = {"value": change, "prompt": prompt, "layer": layer_name}
        for increment in increments:
            change = _relative_change(concept_rows[increment.name], deltas[increment.name], weight, bias)
            if _worse(change, concept_change[increment.concept]):
                concept_change[increment.concept] = change
    return {
        "max_relative_kv_change": worst["value"],
        "worst_prompt": worst["prompt"],
        "worst_layer": worst["layer"],
        "protected_prompts_checked": len(prompts),
        "concept_kv_change": concept_change,
    }


def verify(model: nn.Module, increments: Sequence[Increment], rtol: float = DEFAULT_VERIFY_RTOL) -> dict[str, Any]:
    """Compose ``increments``, measure ``kv_changes``, restore them all and compare every tensor.

    ``max_restore_abs_diff`` is the largest absolute difference, over every parameter and buffer
    of the model, between before compose and after compose -> detach-all (0 means bit-exact).
    Keeps one CPU copy of the state dict while it runs; the model is left as it was found.
    Raises ``VerificationError`` (its ``report`` holds the measurements) when a protected prompt's
    keys/values change by more than ``rtol`` (relative; NaN fails; ``DEFAULT_VERIFY_RTOL``: why
    1e-4) or the restore is not bit-exact; returns the report otherwise.
    """
    if not 0 < rtol < math.inf:
        raise IncrementError(f"rtol (--rtol) must be a positive finite number, got {rtol}.")
    before = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
    started = time.perf_counter()
    names = compose(model, increments)
    try:
        result = kv_changes(model, increments)
    finally:
        detach(model, names)
    after = model.state_dict()
    if set(after) != set(before):
        raise IncrementError(f"Detaching left different state-dict keys: {sorted(set(after) ^ set(before))[:5]}.")
    restore_diff = 0.0
    for key, original in before.items():
        now = after[key].detach().to("cpu")
        if torch.equal(now, original):
            continue
        if not original.is_floating_point():
            raise IncrementError(f"Detaching changed the non-floating tensor {key}; this is a bug, please report it.")
        difference = float((now.double() - original.double()).abs().max())
        restore_diff = difference if _worse(difference, restore_diff) else restore_diff
    report = {
        "increments": names,
        "layers": len(cross_attention_kv(model)),
        **result,
        "max_restore_abs_diff": restore_diff,
        "rtol": rtol,
        "seconds": round(time.perf_counter() - started, 3),
    }
    change = report["max_relative_kv_change"]
    if not change <= rtol:
        raise VerificationError(
            f"Verification failed: the protected prompt {report['worst_prompt']!r} changes its keys/values by "
            f"{change:.3g} (relative) in {report['worst_layer']}, above rtol={rtol:g}; an increment's basis does not "
            f"protect it (the file was altered, or made for another model). Retrain that increment.", report
        )
    if restore_diff != 0.0:
        raise VerificationError(
            f"Verification failed: compose -> detach left the weights different from the original (largest "
            f"absolute difference {restore_diff:.3g}); the increments are not exactly removable. Please report this.",
            report,
        )
    return report
