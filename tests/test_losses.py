"""CiE loss terms (values, gradient sign on a tiny model), joint weights and the momentum stopper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from erasure.bases import compute_basis
from erasure.increments import attach_increment
from erasure.losses import (
    MomentumStopper,
    concept_representation,
    direction_loss,
    direction_product,
    joint_weights,
    l1_regulariser,
)
from ldm.modules.incremental_linear import increments_disabled


def test_direction_loss_value_and_shapes() -> None:
    r_trained = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    r_frozen = torch.tensor([[3.0, 4.0], [2.0, -2.0]])
    # (3 + 8 - 2 - 1) / 4
    assert direction_loss(r_trained, r_frozen).item() == pytest.approx(2.0)
    assert torch.equal(direction_product(r_trained, r_frozen), r_trained * r_frozen)
    assert direction_loss(r_frozen, r_frozen).item() == pytest.approx(r_frozen.pow(2).mean().item())
    with pytest.raises(ValueError, match="differ in shape"):
        direction_loss(r_trained, r_frozen[:1])
    eps_c, eps_blank = torch.tensor([1.0, 5.0]), torch.tensor([0.5, 1.0])
    assert torch.equal(concept_representation(eps_c, eps_blank), torch.tensor([0.5, 4.0]))
    with pytest.raises(ValueError, match="same latents"):
        concept_representation(eps_c, eps_blank[:1])


def test_direction_loss_gradient_flows_only_to_the_trained_side() -> None:
    r_trained = torch.randn(2, 4, 3, 3, requires_grad=True)
    r_frozen = torch.randn(2, 4, 3, 3, requires_grad=True)
    direction_loss(r_trained, r_frozen).backward()
    assert torch.allclose(r_trained.grad, r_frozen.detach() / r_frozen.numel())
    assert r_frozen.grad is None
    # A step down the gradient lowers the correlation with the frozen representation.
    stepped = r_trained.detach() - 10.0 * r_trained.grad
    assert direction_loss(stepped, r_frozen) < direction_loss(r_trained, r_frozen)


def test_descending_l_dir_on_a_tiny_model_decorrelates(tiny_model: nn.Module) -> None:
    """SepCE on the tiny model: L_dir starts at mean(r^2) > 0 and Adam on the increment lowers it,
    while the blank prompt's prediction stays the original one (it is protected)."""
    basis = compute_basis(tiny_model, "van gogh", [])
    coefficients = attach_increment(tiny_model, basis)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([300, 700])
    noisy = tiny_model.q_sample(latents, t, torch.randn(latents.shape, generator=generator))
    context = tiny_model.get_learned_conditioning(["van gogh", ""])
    concept, blank = context[:1].expand(2, -1, -1), context[1:].expand(2, -1, -1)
    with torch.no_grad(), increments_disabled(tiny_model):
        eps_concept, eps_blank = tiny_model.apply_model(
            torch.cat([noisy, noisy]), torch.cat([t, t]), torch.cat([concept, blank])
        ).chunk(2)
    r_frozen = concept_representation(eps_concept, eps_blank)

    def l_dir() -> torch.Tensor:
        return direction_loss(concept_representation(tiny_model.apply_model(noisy, t, concept), eps_blank), r_frozen)

    optimiser = torch.optim.Adam(coefficients, lr=1.0)
    losses = []
    for _ in range(4):
        optimiser.zero_grad()
        loss = l_dir()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(r_frozen.pow(2).mean().item(), rel=1e-5)
    assert losses[-1] < losses[0] and all(b < a for a, b in zip(losses, losses[1:]))
    assert any(c.abs().max() > 0 for c in coefficients)
    with torch.no_grad():
        assert torch.allclose(tiny_model.apply_model(noisy, t, blank), eps_blank, atol=1e-6)


def test_l1_regulariser_is_mean_over_tensors() -> None:
    tensors = [torch.ones(2, 2), torch.full((3,), -2.0)]
    assert l1_regulariser(tensors).item() == pytest.approx((4.0 + 6.0) / 2)
    weight = torch.tensor([1.0, -3.0], requires_grad=True)
    l1_regulariser([weight]).backward()
    assert torch.equal(weight.grad, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="M >= 1"):
        l1_regulariser([])


def test_joint_weights() -> None:
    products = [torch.full((4,), 0.5, requires_grad=True), torch.full((4,), 1.0), torch.full((4,), 2.0)]
    eta = joint_weights(products)  # norms 1, 2, 4
    assert torch.allclose(eta, torch.tensor([4.0, 2.0, 1.0]))
    assert not eta.requires_grad
    with pytest.raises(ValueError, match=r"\[1\]"):
        joint_weights([torch.ones(2), torch.zeros(2)])
    with pytest.raises(ValueError, match="at least one"):
        joint_weights([])


def test_stopper_momentum_and_warmup() -> None:
    stopper = MomentumStopper(alpha=0.9, tau=1e-4, warmup=10, max_steps=1000)
    assert not stopper.update(1.0) and stopper.momentum == 1.0
    assert not stopper.update(0.0) and stopper.momentum == pytest.approx(0.9)
    early = MomentumStopper(tau=1e-4, warmup=10)
    stops = [early.update(-1.0) for _ in range(11)]
    assert stops == [False] * 10 + [True], "no stop inside the warm-up, then at once"
    assert (early.stop_reason, early.steps) == ("converged", 11)
    with pytest.raises(RuntimeError, match="already stopped"):
        early.update(-1.0)


def test_stopper_max_steps_and_bad_values() -> None:
    stopper = MomentumStopper(warmup=2, max_steps=5)
    stops = [stopper.update(1.0) for _ in range(5)]
    assert stops == [False] * 4 + [True] and stopper.stop_reason == "max_steps"
    with pytest.raises(FloatingPointError, match="diverged"):
        MomentumStopper().update(float("nan"))
    with pytest.raises(ValueError, match="alpha"):
        MomentumStopper(alpha=1.0)


def test_stopper_resume_continues_identically() -> None:
    values = [0.5 * 0.7**step for step in range(150)]
    uninterrupted = MomentumStopper(tau=1e-3, warmup=5, max_steps=200)
    first_half = MomentumStopper(tau=1e-3, warmup=5, max_steps=200)
    for value in values[:7]:
        uninterrupted.update(value)
        first_half.update(value)
    resumed = MomentumStopper(tau=1e-3, warmup=5, max_steps=200)
    resumed.load_state_dict(first_half.state_dict())
    for value in values[7:]:
        done_a, done_b = uninterrupted.update(value), resumed.update(value)
        assert done_a == done_b and uninterrupted.momentum == resumed.momentum
        if done_a:
            break
    assert uninterrupted.state_dict() == resumed.state_dict() and resumed.stop_reason == "converged"
    with pytest.raises(ValueError, match="other settings"):
        MomentumStopper(tau=1e-2, warmup=5, max_steps=200).load_state_dict(first_half.state_dict())


def test_relative_stop_scales_with_the_concepts_energy() -> None:
    """The same decay of L_dir relative to its start stops a large and a small concept at the same
    step under the relative rule; the absolute rule stops the small one far earlier (METHOD.md §1)."""

    def stop_step(scale: float, relative: bool) -> int:
        stopper = MomentumStopper(tau=3e-4 if relative else 1e-4, warmup=10, max_steps=5000, relative=relative)
        step = 0
        while not stopper.update(scale * 0.97**step, scale if relative else None):
            step += 1
        return stopper.steps

    artist, obj = 0.36, 0.0017
    assert stop_step(artist, True) == stop_step(obj, True)
    assert stop_step(obj, False) < stop_step(artist, False) - 100
    stopper = MomentumStopper(relative=True)
    with pytest.raises(ValueError, match="representation energy"):
        stopper.update(0.1)
    stopper.update(0.1, 0.2)
    assert stopper.threshold == pytest.approx(0.2 * 1e-4)
    fresh = MomentumStopper(relative=True)
    fresh.load_state_dict(stopper.state_dict())
    assert fresh.energy == stopper.energy and fresh.momentum == stopper.momentum
    with pytest.raises(ValueError, match="other settings"):
        MomentumStopper(relative=False).load_state_dict(stopper.state_dict())
