"""SepCE (METHOD.md §2): one increment per concept on every attn2 to_k / to_v, trained with the
CiE loss, jointly (all concepts in every step) or sequentially (one concept after another).

Cost of a step: ``""`` is protected by every increment, so eps(z_t, ""; W0 + sum dW) equals
eps(z_t, ""; W0) exactly. One no-grad call with increments switched off gives eps(c; W0) and
eps(""; W0) for every training concept, one call with grad gives eps(c; W0 + dW): three UNet
evaluations per concept and one backward (five with a wording row: its blank is the bare row's).
Only the coefficients require grad.

Joint: the loss of concept i depends on dW_i only (dW_j protects c_i), so all increments stay
switched on; concept i is weighted by eta_i = ||P_max|| / ||P_i|| (norms over the GLOBAL batch).
The joint objective (``SepCESettings.joint_objective``, METHOD.md §2):
- ``per_concept`` (the authors' code): L1 term sum_i ||dW_i||_1 / M, and concept i stops on its
  own momentum of L_dir(c_i), after which its coefficients are frozen;
- ``paper`` (Eq. 34/37): L1 term ||sum_i dW_i||_1 / M (per layer, the summed increments), and one
  momentum of the weighted sum sum_i eta_i L_dir(c_i) stops every concept at once.
Wordings (METHOD.md §6): every row of a concept's batch is conditioned on the bare concept
prompt (the paper's data) and, when the concept has other wordings (``wordings``), the same noisy
latent is conditioned once more on one of them, drawn per row: the paper's training plus the
wordings the closed form fits, at the cost of one more row per concept.
The other increments protect a concept's bare prompt, not its other wordings, so with several
wordings a joint run's loss of concept i also sees the others' increments; bases (and so what
every increment leaves exact) are the same either way.
Sequential: concept i trains alone with only its own increment switched on, then is frozen
before concept i + 1 starts. It uses the bases joint mode uses (every concept of the set
protects every other one), so joint and sequential increments are interchangeable and differ
only in memory and time (METHOD.md §2, SRS-ME vs SRS-ME†).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning_fabric import Fabric
from torch import nn

from erasure.bases import ConceptBasis, normalise_prompt
from erasure.increments import (
    Increment,
    attach_increment,
    cross_attention_kv,
    extract_increment,
    slugify,
)
from erasure.loading import model_fingerprint
from erasure.settings import SepCESettings
from erasure.losses import (
    concept_representation,
    direction_product,
    joint_weights,
    l1_regulariser,
    representation_energy,
)
from erasure.trainers.loop import (
    ConceptTrainer,
    StepLoss,
    predict_eps,
)
from erasure.trainers.runtime import TrainingSetupError, global_sum
from ldm.modules.incremental_linear import increments_disabled


class SepCETrainer(ConceptTrainer):
    """Train one increment per concept of ``bases`` on ``latents`` (images of each concept)."""

    method = "sepce"

    def __init__(
        self,
        model: nn.Module,
        fabric: Fabric,
        bases: Mapping[str, ConceptBasis],
        latents: Mapping[str, torch.Tensor],
        settings: SepCESettings,
        wordings: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        concepts = list(bases)
        missing = [concept for concept in concepts if concept not in latents]
        if missing:
            raise TrainingSetupError(f"No training latents for concepts {missing}; give images of every concept.")
        self.base_fingerprint = model_fingerprint(model)
        super().__init__(model, fabric, concepts, settings)
        self.bases = dict(bases)
        self.latents = {concept: latents[concept].to(fabric.device) for concept in concepts}
        self.beta = float(settings.beta)
        self.lam = float(settings.lam)
        self.sequential = settings.mode == "sequential"
        self.paper_objective = settings.joint_objective == "paper"
        self.layers = cross_attention_kv(model)
        self.unet = model.model.diffusion_model
        self.names = {concept: slugify(concept) for concept in concepts}
        given = wordings or {}
        self.wordings = {c: [c, *(w for w in given.get(c, ()) if normalise_prompt(w) != normalise_prompt(c))]
                         for c in concepts}
        extra = sorted({w for words in self.wordings.values() for w in words} - set(self.context))
        if extra:
            with torch.no_grad():
                self.context.update(zip(extra, model.get_learned_conditioning(extra).detach()))
        self.coefficients = {
            concept: attach_increment(model, self.bases[concept], self.beta, trainable=True) for concept in concepts
        }

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        return {
            f"{self.names[concept]}.{layer}": coefficient
            for concept in self.concepts
            for layer, coefficient in zip(self.layers, self.coefficients[concept])
        }

    def training_concepts(self) -> list[str]:
        remaining = super().training_concepts()
        return remaining[:1] if self.sequential else remaining

    def total_steps_bound(self) -> int:
        return self.settings.iterations * (len(self.concepts) if self.sequential else 1)

    def on_stop(self, concept: str) -> None:
        """Freeze the concept's coefficients where they are: its increment is final."""
        for coefficient in self.coefficients[concept]:
            coefficient.requires_grad_(False)
            coefficient.grad = None

    def run_settings(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "mode": "sequential" if self.sequential else "joint",
            "joint_objective": self.settings.joint_objective,
            "concepts": self.concepts,
            "basis_dims": {concept: basis.dims for concept, basis in self.bases.items()},
            "protected_prompts": {concept: basis.protected_prompts for concept, basis in self.bases.items()},
            "wordings": self.wordings,
            "images": {concept: int(latents.shape[0]) for concept, latents in self.latents.items()},
            "base_model_fingerprint": self.base_fingerprint,
            **self.settings.result_settings(),
        }

    def _switch_on(self, concepts: list[str]) -> None:
        """Sequential: only the training concept's increment is on; joint: all of them."""
        names = [self.names[concept] for concept in concepts] if self.sequential else None
        for layer in self.layers.values():
            layer.set_active(names)

    def draw_wordings(self, generator: torch.Generator, concept: str) -> torch.Tensor | None:
        """Indices into ``self.wordings[concept]`` (1.. : the wordings other than the bare prompt), one
        per row of the global batch; None when the concept has no other wording."""
        others = len(self.wordings[concept]) - 1
        if not others:
            return None
        return torch.randint(others, (self.settings.batch_size,), generator=generator) + 1

    def step_loss(self, generator: torch.Generator, concepts: list[str]) -> StepLoss:
        # Draw for every concept in a fixed order, so a concept's draws do not depend on which
        # other concepts are still training.
        batches = {concept: self.draw_concept_batch(generator, self.latents[concept]) for concept in self.concepts}
        chosen = {concept: self.draw_wordings(generator, concept) for concept in self.concepts}
        noisy = {c: self.model.q_sample(batches[c].latents, batches[c].timesteps, batches[c].noise) for c in concepts}
        rows = batches[concepts[0]].latents.shape[0]
        # every row with the bare prompt (the paper's data) and, when the concept has other
        # wordings, the same noisy latent again with one of them (METHOD.md §6)
        copies = {c: 1 if chosen[c] is None else 2 for c in concepts}
        contexts = {c: self.contexts(c, rows) if chosen[c] is None else torch.cat([
            self.contexts(c, rows),
            torch.stack([self.context[self.wordings[c][i]] for i in chosen[c][self.rows].tolist()]),
        ]) for c in concepts}
        inputs = torch.cat([noisy[c].repeat(copies[c], 1, 1, 1) for c in concepts])
        timesteps = torch.cat([batches[c].timesteps.repeat(copies[c]) for c in concepts])
        self._switch_on(concepts)
        with torch.no_grad(), increments_disabled(self.unet):
            frozen = predict_eps(
                self.model,
                torch.cat([inputs, *(noisy[c] for c in concepts)]),
                torch.cat([timesteps, *(batches[c].timesteps for c in concepts)]),
                torch.cat([*(contexts[c] for c in concepts), self.contexts("", rows * len(concepts))]),
            )
        trained = predict_eps(self.model, inputs, timesteps, torch.cat([contexts[c] for c in concepts]))
        frozen_concept, frozen_blank = frozen[: len(inputs)], frozen[len(inputs):]
        products, energies = [], []
        start = 0
        for index, c in enumerate(concepts):
            part = slice(start, start + rows * copies[c])
            start = part.stop
            blank = frozen_blank[index * rows: (index + 1) * rows].repeat(copies[c], 1, 1, 1)
            r_frozen = concept_representation(frozen_concept[part], blank)
            r_trained = concept_representation(trained[part], blank)
            products.append(direction_product(r_trained, r_frozen))
            energies.append(representation_energy(r_frozen))
        # eta_i uses the norms of P_i over the global batch: sum the squares over ranks.
        global_norms = global_sum(self.fabric, [product.detach().float().pow(2).sum() for product in products]).sqrt()
        if torch.isfinite(global_norms).all():
            eta = joint_weights([norm.reshape(1) for norm in global_norms]).to(trained.device)
        else:  # the loss is non-finite too; the loop stops with NonFiniteLossError
            eta = torch.ones(len(products), device=trained.device)
        directions = [product.mean() for product in products]
        weighted = sum(weight * direction for weight, direction in zip(eta, directions))
        loss = weighted + self.lam * self.regulariser(concepts) if self.lam else weighted
        if self.paper_objective:  # one weighted momentum: every concept tracks the same value (and scale)
            energy = sum(weight * value for weight, value in zip(eta, energies))
            return StepLoss(loss, {c: weighted.detach() for c in concepts}, {c: energy for c in concepts})
        return StepLoss(loss, {c: direction.detach() for c, direction in zip(concepts, directions)},
                        dict(zip(concepts, energies)))

    def regulariser(self, concepts: list[str]) -> torch.Tensor:
        """``sum_i ||dW_i||_1 / M`` (per_concept) or ``||sum_i dW_i||_1 / M`` (paper), M layers."""
        deltas = [[layer.increments[self.names[c]].delta_weight() for c in concepts] for layer in self.layers.values()]
        if self.paper_objective:
            return l1_regulariser([torch.stack(per_layer).sum(0) for per_layer in deltas])
        return sum(l1_regulariser([per_layer[index] for per_layer in deltas]) for index in range(len(concepts)))

    def fit(self) -> dict[str, Any]:
        try:
            return super().fit()
        finally:
            for layer in self.layers.values():
                layer.set_active(None)

    def increments(self) -> dict[str, Increment]:
        """The trained increments, one per concept, with this run's record in their metadata."""
        summary = self.summary()
        result = {}
        for concept in self.concepts:
            record = {
                **self.metadata(),
                "training": summary["concepts"][concept],
                "base_model_fingerprint": self.base_fingerprint,
            }
            result[concept] = extract_increment(self.model, concept, self.bases[concept], self.beta, record)
        return result
