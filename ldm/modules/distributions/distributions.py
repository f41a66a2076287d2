"""Diagonal Gaussian posterior of the KL autoencoder, the point mass, and the Gaussian KL helper of ddpm."""

from __future__ import annotations

import math
from typing import Sequence

import torch


class AbstractDistribution:
    """A distribution that can be sampled and has a mode."""

    def sample(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement sample().")

    def mode(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement mode().")


class DiracDistribution(AbstractDistribution):
    """All mass on ``value``: sampling and the mode both return it."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def sample(self) -> torch.Tensor:
        return self.value

    def mode(self) -> torch.Tensor:
        return self.value


class DiagonalGaussianDistribution(AbstractDistribution):
    """Gaussian with diagonal covariance, parameterised by ``[mean, logvar]`` along dim 1.

    ``logvar`` is clamped to [-30, 20] as in CompVis so that ``exp`` stays finite.
    With ``deterministic=True`` the distribution collapses onto its mean (zero variance,
    zero KL and NLL).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        if parameters.shape[1] % 2 != 0:
            raise ValueError(
                f"DiagonalGaussianDistribution: dim 1 of parameters has {parameters.shape[1]} channels; "
                "it must hold mean and logvar stacked, i.e. an even count."
            )
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def _non_batch_dims(self) -> tuple[int, ...]:
        return tuple(range(1, self.mean.ndim))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample ``mean + std * n``; ``generator`` (on the tensors' device)
        makes it reproducible."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per batch element; ``other=None`` means the standard normal."""
        dims = self._non_batch_dims()
        if self.deterministic:
            return torch.zeros_like(self.mean).sum(dim=dims)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample``, summed over ``dims``."""
        if self.deterministic:
            return torch.zeros_like(self.mean).sum(dim=tuple(dims))
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
            dim=tuple(dims),
        )


def normal_kl(
    mean1: torch.Tensor | float,
    logvar1: torch.Tensor | float,
    mean2: torch.Tensor | float,
    logvar2: torch.Tensor | float,
) -> torch.Tensor:
    """Element-wise KL divergence between two Gaussians given means and log-variances.

    Scalars are broadcast against the tensor arguments (at least one must be a tensor).
    """
    reference = next((obj for obj in (mean1, logvar1, mean2, logvar2) if isinstance(obj, torch.Tensor)), None)
    if reference is None:
        raise TypeError("normal_kl: at least one argument must be a torch.Tensor.")
    logvar1_t, logvar2_t = (
        x if isinstance(x, torch.Tensor) else torch.tensor(x).to(reference) for x in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0
        + logvar2_t
        - logvar1_t
        + torch.exp(logvar1_t - logvar2_t)
        + ((mean1 - mean2) ** 2) * torch.exp(-logvar2_t)
    )
