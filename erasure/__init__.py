"""Separable concept erasure (CiE / SepCE) for Stable Diffusion v1.x on the project's ldm package.

The public API (each name is loaded on first use, so command lines start fast):

    import erasure
    model = erasure.load_model()                                  # the embedded toy model
    increments = erasure.train_sepce(model, ["vela quorin"])       # SepCESettings() defaults
    with erasure.apply(model, increments):
        after = erasure.generate(model, ["vela quorin"] * 4, [0, 1, 2, 3])
    before = erasure.generate(model, ["vela quorin"] * 4, [0, 1, 2, 3])
    print(erasure.evaluate(before, after, concept="vela quorin", world=erasure.world_of(model)))
    increments[0].save("outputs/vela_quorin.safetensors")
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module that defines it
_API: dict[str, str] = {
    "load_model": "erasure.loading",
    "train_sepce": "erasure.training",
    "train_cie": "erasure.training",
    "train_esd": "erasure.training",
    "SepCESettings": "erasure.settings",
    "CiESettings": "erasure.settings",
    "ESDSettings": "erasure.settings",
    "Increment": "erasure.increments",
    "WeightDifference": "erasure.weight_differences",
    "apply": "erasure.edits",
    "remove": "erasure.edits",
    "load_edit": "erasure.edits",
    "generate": "erasure.generation",
    "SamplingSettings": "erasure.samplers",
    "evaluate": "erasure.evaluation",
    "world_of": "erasure.worlds",
    "verify": "erasure.increments",
    "ErasureError": "erasure.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'erasure' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
