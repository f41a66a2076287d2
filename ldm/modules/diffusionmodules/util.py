"""Building blocks shared by the diffusion UNet and the samplers (CompVis ``util.py`` interface).

Schedules, DDIM step selection, timestep embeddings, layer factories, float32 group norm,
gradient checkpointing and the hybrid (concat + cross-attention) conditioner.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ldm.util import instantiate_from_config, mean_flat  # noqa: F401  (CompVis imports mean_flat from here)

BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Noise schedule betas as a float64 numpy array of length ``n_timestep``.

    ``"linear"`` is the "scaled linear" schedule of Stable Diffusion: linear in sqrt(beta).
    ``"sqrt_linear"`` is linear in beta, ``"sqrt"`` takes the square root of that, and
    ``"cosine"`` is the improved-DDPM cosine schedule (clipped at 0.999).
    """
    if n_timestep < 1:
        raise ValueError(f"n_timestep must be a positive integer, got {n_timestep}.")
    if schedule == "linear":
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64) ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas_cumprod = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
        betas = (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0.0, 0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    else:
        raise ValueError(f"Unknown beta schedule '{schedule}'; choose one of {BETA_SCHEDULES}.")
    return betas.numpy()


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Betas whose cumulative product of (1 - beta) follows ``alpha_bar(t)`` on t in [0, 1].

    beta_i = 1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), capped at ``max_beta`` so that the
    last steps of schedules reaching alpha_bar(1) = 0 stay finite.
    """
    grid = [step / num_diffusion_timesteps for step in range(num_diffusion_timesteps + 1)]
    return np.array([min(1.0 - alpha_bar(t1) / alpha_bar(t0), max_beta) for t0, t1 in zip(grid, grid[1:])])


def make_ddim_timesteps(
    ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int, verbose: bool = True
) -> np.ndarray:
    """DDPM steps visited by a DDIM sampler with ``num_ddim_timesteps`` steps.

    As in CompVis, one is added to every step (``arange(0, T, T // S) + 1`` for "uniform") so
    the last DDIM step lands on alpha_cumprod[1], not on the clean-data end of the schedule.
    """
    if not 1 <= num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(
            f"num_ddim_timesteps must be in [1, {num_ddpm_timesteps}] (the DDPM steps), "
            f"got {num_ddim_timesteps}."
        )
    if ddim_discr_method == "uniform":
        stride = num_ddpm_timesteps // num_ddim_timesteps
        ddim_timesteps = np.arange(0, num_ddpm_timesteps, stride)
    elif ddim_discr_method == "quad":
        ddim_timesteps = (np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps) ** 2).astype(int)
    else:
        raise ValueError(f"Unknown DDIM discretization '{ddim_discr_method}'; choose 'uniform' or 'quad'.")
    steps_out = ddim_timesteps + 1
    if verbose:
        print(f"Selected timesteps for ddim sampler: {steps_out}")
    return steps_out


def make_ddim_sampling_parameters(
    alphacums: torch.Tensor | np.ndarray, ddim_timesteps: Sequence[int] | np.ndarray, eta: float, verbose: bool = True
) -> tuple[Any, Any, Any]:
    """(sigmas, alphas, alphas_prev) of a DDIM run; see DDIM eq. 16.

    ``alphas_prev`` of the first step is ``alphacums[0]``. Tensors come back when
    ``alphacums`` is a tensor (on its device and dtype), numpy arrays otherwise.
    """
    as_tensor = isinstance(alphacums, torch.Tensor)
    cums = torch.as_tensor(alphacums.detach().cpu() if as_tensor else np.asarray(alphacums), dtype=torch.float64)
    index = torch.as_tensor(np.asarray(ddim_timesteps), dtype=torch.long)
    alphas = cums[index]
    alphas_prev = torch.cat([cums[:1], cums[index[:-1]]])
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    if verbose:
        print(f"Selected alphas for ddim sampler: a_t: {alphas}; a_(t-1): {alphas_prev}")
        print(f"For the chosen value of eta, which is {eta}, this results in the following sigma_t schedule "
              f"for ddim sampler {sigmas}")
    if as_tensor:
        return tuple(v.to(device=alphacums.device, dtype=alphacums.dtype) for v in (sigmas, alphas, alphas_prev))
    return sigmas.numpy(), alphas.numpy(), alphas_prev.numpy()


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """``a[t]`` per batch element, shaped [B, 1, 1, ...] to broadcast against ``x_shape``."""
    batch = t.shape[0]
    return a.gather(-1, t).reshape(batch, *((1,) * (len(x_shape) - 1)))


def noise_like(shape: Sequence[int], device: torch.device | str, repeat: bool = False) -> torch.Tensor:
    """Standard normal noise; with ``repeat`` one sample is shared by the whole batch."""
    if repeat:
        single = torch.randn((1, *shape[1:]), device=device)
        return single.repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device)


def checkpoint(
    func: Callable[..., Any], inputs: Sequence[Any], params: Iterable[torch.Tensor], flag: bool
) -> Any:
    """Run ``func(*inputs)``, recomputing it in backward instead of storing activations.

    Only active when ``flag`` is set and autograd is recording. Uses PyTorch's non-reentrant
    checkpoint, which (unlike CompVis's hand-written one) works when only some parameters of
    the block require grad. ``params`` is accepted for CompVis compatibility and unused: the
    non-reentrant implementation finds them itself.
    """
    del params
    if flag and torch.is_grad_enabled():
        return torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


class CheckpointFunction(torch.autograd.Function):
    """CompVis's reentrant gradient checkpoint as an autograd function.

    ``CheckpointFunction.apply(run_function, length, *args)``: the first ``length`` of ``args``
    are the inputs of ``run_function``, the rest the parameters that need gradients. Forward
    runs without storing activations; backward runs ``run_function`` again with grad enabled.
    ``checkpoint`` above uses PyTorch's non-reentrant checkpoint instead; this class is kept
    for code that calls it directly.
    """

    @staticmethod
    def forward(ctx: Any, run_function: Callable[..., Any], length: int, *args: Any) -> Any:
        ctx.run_function = run_function
        ctx.input_tensors = list(args[:length])
        ctx.input_params = list(args[length:])
        with torch.no_grad():
            return run_function(*ctx.input_tensors)

    @staticmethod
    def backward(ctx: Any, *output_grads: torch.Tensor) -> tuple[Any, ...]:
        inputs = [x.detach().requires_grad_(True) if isinstance(x, torch.Tensor) else x for x in ctx.input_tensors]
        with torch.enable_grad():
            # view_as gives fresh tensors, so an in-place first op cannot modify the detached inputs.
            outputs = ctx.run_function(*[x.view_as(x) if isinstance(x, torch.Tensor) else x for x in inputs])
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        tensor_inputs = [x for x in inputs if isinstance(x, torch.Tensor)]
        grads = iter(torch.autograd.grad(outputs, tensor_inputs + ctx.input_params, output_grads, allow_unused=True))
        input_grads = [next(grads) if isinstance(x, torch.Tensor) else None for x in inputs]
        return (None, None, *input_grads, *grads)


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """Sinusoidal embeddings [B, dim] of (possibly fractional) timesteps [B], order [cos, sin]."""
    if repeat_only:
        return timesteps[:, None].expand(-1, dim)
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` in place and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Multiply all parameters of ``module`` by ``scale`` in place and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


class SiLU(nn.Module):
    """x * sigmoid(x) (``nn.SiLU``; kept as a class of its own for CompVis imports)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, cast back afterwards."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(
            x.float(), self.num_groups, _float_or_none(self.weight), _float_or_none(self.bias), self.eps
        ).type(x.dtype)


def _float_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def normalization(channels: int) -> GroupNorm32:
    """The UNet's standard normalisation: 32 groups, float32 computation."""
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1-D, 2-D or 3-D convolution."""
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in convs:
        raise ValueError(f"Unsupported number of dimensions: {dims}; use 1, 2 or 3.")
    return convs[dims](*args, **kwargs)


def linear(*args: Any, **kwargs: Any) -> nn.Linear:
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1-D, 2-D or 3-D average pooling."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in pools:
        raise ValueError(f"Unsupported number of dimensions: {dims}; use 1, 2 or 3.")
    return pools[dims](*args, **kwargs)


class HybridConditioner(nn.Module):
    """Two conditioners at once: one for channel-concatenated, one for cross-attention input."""

    def __init__(self, c_concat_config: Any, c_crossattn_config: Any) -> None:
        super().__init__()
        self.concat_conditioner = instantiate_from_config(c_concat_config)
        self.crossattn_conditioner = instantiate_from_config(c_crossattn_config)

    def forward(self, c_concat: Any, c_crossattn: Any) -> dict[str, list[torch.Tensor]]:
        return {
            "c_concat": [self.concat_conditioner(c_concat)],
            "c_crossattn": [self.crossattn_conditioner(c_crossattn)],
        }
