"""DDIMSampler on the tiny model: determinism, guidance, batching, partial runs, devices, "v"."""

from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import LatentDiffusion

SHAPE = (4, 8, 8)
STEPS = 4  # DDPM steps 1, 251, 501, 751


def _start_noise(batch_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _prompts(model: LatentDiffusion, *prompts: str) -> torch.Tensor:
    with torch.no_grad():
        return model.get_learned_conditioning(list(prompts))


def test_schedule_is_compvis_uniform_on_the_model_device(tiny_model: LatentDiffusion) -> None:
    sampler = DDIMSampler(tiny_model)
    sampler.make_schedule(ddim_num_steps=STEPS, ddim_eta=0.0)
    assert sampler.ddim_timesteps.tolist() == [1, 251, 501, 751]
    torch.testing.assert_close(sampler.ddim_alphas, tiny_model.alphas_cumprod[[1, 251, 501, 751]])
    torch.testing.assert_close(sampler.ddim_alphas_prev, tiny_model.alphas_cumprod[[0, 1, 251, 501]])
    assert torch.count_nonzero(sampler.ddim_sigmas) == 0
    assert sampler.ddim_alphas.device == tiny_model.betas.device
    sampler.make_schedule(ddim_num_steps=50)
    assert sampler.ddim_timesteps[0] == 1 and sampler.ddim_timesteps[-1] == 981
    with pytest.raises(ValueError, match="S <= 500"):
        sampler.make_schedule(ddim_num_steps=1000)


def test_eta_zero_is_deterministic_and_generator_reproducible(tiny_model: LatentDiffusion) -> None:
    sampler = DDIMSampler(tiny_model)
    cond = _prompts(tiny_model, "a red square")
    first, _ = sampler.sample(STEPS, 1, SHAPE, conditioning=cond, x_T=_start_noise(1))
    second, _ = sampler.sample(STEPS, 1, SHAPE, conditioning=cond, x_T=_start_noise(1))
    assert torch.equal(first, second) and not first.requires_grad
    assert not torch.allclose(first, _start_noise(1))
    seeded = [sampler.sample(STEPS, 1, SHAPE, conditioning=cond, eta=1.0,
                             generator=torch.Generator().manual_seed(5))[0] for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])
    other_seed, _ = sampler.sample(STEPS, 1, SHAPE, conditioning=cond, eta=1.0,
                                   generator=torch.Generator().manual_seed(6))
    assert not torch.allclose(seeded[0], other_seed)


def test_guidance_scale_one_is_conditional_only_and_guidance_is_batched_cfg(tiny_model: LatentDiffusion) -> None:
    sampler = DDIMSampler(tiny_model)
    cond = _prompts(tiny_model, "a red square")
    uncond = _prompts(tiny_model, "")
    x_T = _start_noise(1)
    plain, _ = sampler.sample(STEPS, 1, SHAPE, conditioning=cond, x_T=x_T)
    scale_one, _ = sampler.sample(STEPS, 1, SHAPE, conditioning=cond, x_T=x_T,
                                  unconditional_guidance_scale=1.0, unconditional_conditioning=uncond)
    assert torch.equal(plain, scale_one)
    guided, _ = sampler.sample(STEPS, 1, SHAPE, conditioning=cond, x_T=x_T,
                               unconditional_guidance_scale=5.0, unconditional_conditioning=uncond)
    assert not torch.allclose(guided, plain, atol=1e-3)
    t = torch.tensor([501])
    with torch.no_grad():
        eps_c = tiny_model.apply_model(x_T, t, cond)
        eps_u = tiny_model.apply_model(x_T, t, uncond)
        batched = sampler.model_eps(x_T, cond, t, 5.0, uncond)
    torch.testing.assert_close(batched, eps_u + 5.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-4)


def test_batch_of_two_matches_two_batches_of_one(tiny_model: LatentDiffusion) -> None:
    sampler = DDIMSampler(tiny_model)
    cond = _prompts(tiny_model, "a red square", "the blue circle")
    uncond = _prompts(tiny_model, "", "")
    x_T = torch.cat([_start_noise(1, seed=0), _start_noise(1, seed=1)])
    both, _ = sampler.sample(STEPS, 2, SHAPE, conditioning=cond, x_T=x_T,
                             unconditional_guidance_scale=3.0, unconditional_conditioning=uncond)
    for i in range(2):
        single, _ = sampler.sample(STEPS, 1, SHAPE, conditioning=cond[i:i + 1], x_T=x_T[i:i + 1],
                                   unconditional_guidance_scale=3.0, unconditional_conditioning=uncond[i:i + 1])
        torch.testing.assert_close(both[i:i + 1], single, atol=1e-5, rtol=1e-4)


def test_partial_sampling_stops_and_resumes_at_the_requested_step(tiny_model: LatentDiffusion) -> None:
    sampler = DDIMSampler(tiny_model)
    cond = _prompts(tiny_model, "a red square")
    x_T = _start_noise(1)
    full, inter = sampler.sample(STEPS, 1, SHAPE, conditioning=cond, x_T=x_T, log_every_t=1)
    assert inter["stopped_at"] == 0 and len(inter["x_inter"]) == STEPS + 1
    for steps, timestep in [(0, 751), (1, 501), (3, 1)]:
        partial, partial_inter = sampler.sample(STEPS, 1, SHAPE, conditioning=cond, x_T=x_T, till_T=steps)
        torch.testing.assert_close(partial, inter["x_inter"][steps])
        assert partial_inter["stopped_at"] == timestep
    # Resuming from the latent at DDPM step 501 with the two remaining steps finishes the run.
    resumed, _ = sampler.sample(STEPS, 1, SHAPE, conditioning=cond, x_T=inter["x_inter"][2], t_start=2)
    torch.testing.assert_close(resumed, full)
    torch.testing.assert_close(sampler.decode(inter["x_inter"][2], cond, t_start=2), full)
    with pytest.raises(ValueError, match="till_T"):
        sampler.sample(STEPS, 1, SHAPE, conditioning=cond, x_T=x_T, till_T=STEPS + 1)


def test_stochastic_encode_noises_to_the_ddim_level(tiny_model: LatentDiffusion) -> None:
    sampler = DDIMSampler(tiny_model)
    sampler.make_schedule(STEPS)
    x0, noise = _start_noise(2, seed=3), _start_noise(2, seed=4)
    index = torch.tensor([0, 2])
    noised = sampler.stochastic_encode(x0, index, noise=noise)
    expected = tiny_model.q_sample(x0, torch.tensor([1, 501]), noise)
    torch.testing.assert_close(noised, expected)


def test_bad_inputs_get_one_clear_error(tiny_model: LatentDiffusion) -> None:
    sampler = DDIMSampler(tiny_model)
    cond = _prompts(tiny_model, "a red square")
    with pytest.raises(ValueError, match="batch_size=2"):
        sampler.sample(STEPS, 2, SHAPE, conditioning=cond)
    with pytest.raises(ValueError, match="x_T has shape"):
        sampler.sample(STEPS, 1, SHAPE, conditioning=cond, x_T=_start_noise(2))
    with pytest.raises(RuntimeError, match="make_schedule"):
        DDIMSampler(tiny_model).decode(_start_noise(1), cond, t_start=1)


def test_gradients_flow_only_when_asked(tiny_model: LatentDiffusion) -> None:
    sampler = DDIMSampler(tiny_model)
    cond = _prompts(tiny_model, "a red square")
    x_T = _start_noise(1).requires_grad_(True)
    latent, _ = sampler.sample(2, 1, SHAPE, conditioning=cond, x_T=x_T, enable_grad=True)
    latent.sum().backward()
    assert x_T.grad is not None and x_T.grad.abs().sum() > 0
    assert any(p.grad is not None for p in tiny_model.model.diffusion_model.parameters())
    no_grad_latent, _ = sampler.sample(2, 1, SHAPE, conditioning=cond, x_T=x_T)
    assert not no_grad_latent.requires_grad


def test_v_parameterization_matches_the_eps_model(tiny_model: LatentDiffusion,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A model predicting v = (eps - sqrt(1 - abar) x_t) / sqrt(abar) must sample like the eps model."""
    sampler = DDIMSampler(tiny_model)
    cond = _prompts(tiny_model, "a red square")
    uncond = _prompts(tiny_model, "")
    x_T = _start_noise(1)
    eps_result, _ = sampler.sample(STEPS, 1, SHAPE, conditioning=cond, x_T=x_T,
                                   unconditional_guidance_scale=4.0, unconditional_conditioning=uncond)
    eps_apply = tiny_model.apply_model

    def v_apply(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        abar = tiny_model.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (eps_apply(x, t, c) - (1 - abar).sqrt() * x) / abar.sqrt()

    monkeypatch.setattr(tiny_model, "apply_model", v_apply)
    monkeypatch.setattr(tiny_model, "parameterization", "v")
    v_result, _ = sampler.sample(STEPS, 1, SHAPE, conditioning=cond, x_T=x_T,
                                 unconditional_guidance_scale=4.0, unconditional_conditioning=uncond)
    torch.testing.assert_close(v_result, eps_result, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampler_follows_the_model_to_cuda(tiny_model: LatentDiffusion) -> None:
    sampler = DDIMSampler(tiny_model)
    cond = _prompts(tiny_model, "a red square")
    x_T = _start_noise(1)
    on_cpu, _ = sampler.sample(STEPS, 1, SHAPE, conditioning=cond, x_T=x_T)
    tiny_model.to("cuda")
    on_gpu, _ = sampler.sample(STEPS, 1, SHAPE, conditioning=cond.cuda(), x_T=x_T,
                               generator=torch.Generator().manual_seed(0))
    assert on_gpu.device.type == "cuda" and sampler.ddim_alphas.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-3, rtol=1e-3)
    seeded, _ = sampler.sample(STEPS, 1, SHAPE, conditioning=cond.cuda(), eta=0.5,
                               generator=torch.Generator().manual_seed(0))
    assert seeded.device.type == "cuda" and torch.isfinite(seeded).all()
