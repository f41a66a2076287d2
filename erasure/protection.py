"""How much an increment changes the prompts it protects (METHOD.md §6, approximate protection).

For every protected prompt p of an increment (its basis' exactly protected prompts and the
approximately protected ones of a protect file) the relative key/value change is
``max_l ||dW_l e(p)^T|| / ||W_l e(p)^T + b_l||`` over the cross-attention key/value layers l,
in float64. Exactly protected prompts sit at float32 rounding (about 1e-7); approximately
protected ones at what the kept energy allows. Every SepCE run records the result per prompt,
with the worst and the median, in the increment's metadata and the run summary.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from erasure.bases import encode_prompts
from erasure.increments import Increment, cross_attention_kv

#: Prompts encoded and measured per batch (bounds the float64 rows held at once).
BATCH = 64


def approximate_prompts(increment: Increment) -> list[str]:
    """The prompts ``increment``'s basis protects only approximately (a protect file at energy < 1)."""
    return list(increment.basis.extra.get("approximate", {}).get("prompts", []))


def relative_kv_changes(model: nn.Module, increment: Increment, prompts: Sequence[str]) -> dict[str, float]:
    """``{prompt: max over layers of ||dW e(p)^T|| / ||W e(p)^T + b||}`` for ``increment`` (not attached)."""
    prompts = list(dict.fromkeys(prompts))
    layers = cross_attention_kv(model)
    changes = dict.fromkeys(prompts, 0.0)
    for start in range(0, len(prompts), BATCH):
        batch = prompts[start : start + BATCH]
        encoded = encode_prompts(model, batch)  # [P, L, d] float64
        for name, layer in layers.items():
            device = layer.weight.device
            rows = encoded.to(device)
            weight = layer.weight.detach().to(torch.float64)
            basis = increment.basis.basis.to(device, torch.float64) * increment.beta
            delta = increment.coeffs[name].to(device, torch.float64) @ basis
            base = rows @ weight.T + (0 if layer.bias is None else layer.bias.detach().to(torch.float64))
            ratio = (rows @ delta.T).flatten(1).norm(dim=1) / base.flatten(1).norm(dim=1)
            for prompt, value in zip(batch, ratio.tolist()):
                changes[prompt] = max(changes[prompt], value)
    return changes


def protection_report(model: nn.Module, increment: Increment) -> dict[str, Any]:
    """Relative K/V change of every prompt ``increment`` protects: per prompt, worst and median,
    for the exactly protected prompts and, if any, the approximately protected ones."""
    exact = list(increment.basis.protected_prompts)
    approximate = approximate_prompts(increment)
    changes = relative_kv_changes(model, increment, [*exact, *approximate])

    def summary(prompts: list[str]) -> dict[str, Any]:
        if not prompts:
            return {"count": 0}
        worst = max(prompts, key=lambda prompt: changes[prompt])
        return {
            "count": len(prompts),
            "worst": changes[worst],
            "worst_prompt": worst,
            "median": statistics.median(changes[prompt] for prompt in prompts),
        }

    return {"exact": summary(exact), "approximate": summary(approximate), "prompts": changes}


def attach_protection_reports(model: nn.Module, increments: Sequence[Increment]) -> None:
    """Store ``protection_report`` in every increment's metadata and the worst/median of each in the
    run summary every increment carries (``metadata["summary"]["protection"]``)."""
    reports = {increment.concept: protection_report(model, increment) for increment in increments}
    overview = {
        concept: {kind: dict(report[kind]) for kind in ("exact", "approximate")}
        for concept, report in reports.items()
    }
    for increment in increments:
        increment.metadata["protection"] = reports[increment.concept]
        summary = dict(increment.metadata.get("summary", {}))
        summary["protection"] = overview
        increment.metadata["summary"] = summary
