"""The noise schedule of ``DDPM`` and its closed forms: the schedule buffers (CompVis names,
part of the released checkpoints), q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0) and the
conversions between the eps, x0 and v parameterizations."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.util import default, exists


class NoiseSchedule:
    """Mixin for ``DDPM``: ``register_schedule`` sets the buffers the other methods read."""

    def register_schedule(
        self,
        given_betas: Sequence[float] | None = None,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> None:
        """Compute the schedule in float64 and store it as float32 buffers (CompVis names)."""
        if exists(given_betas):
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            with torch.device("cpu"):  # the numbers are needed even when building on "meta"
                betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start,
                                           linear_end=linear_end, cosine_s=cosine_s)
            betas = np.asarray(betas, dtype=np.float64)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = int(betas.shape[0])
        self.linear_start = linear_start
        self.linear_end = linear_end

        posterior_variance = ((1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                              + self.v_posterior * betas)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            # log of the variance clipped: the posterior variance is 0 at the start of the chain
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))

        if self.parameterization == "eps":
            with np.errstate(divide="ignore"):  # step 0 has zero posterior variance; replaced below
                lvlb_weights = betas ** 2 / (2 * posterior_variance * alphas * (1 - alphas_cumprod))
        elif self.parameterization == "x0":
            lvlb_weights = 0.5 * np.sqrt(alphas_cumprod) / (2.0 - alphas_cumprod)
        else:
            lvlb_weights = np.ones_like(betas)
        lvlb_weights[0] = lvlb_weights[1]
        self.register_buffer("lvlb_weights", torch.tensor(lvlb_weights, dtype=torch.float32), persistent=False)

    def _extract(self, name: str, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return extract_into_tensor(getattr(self, name), t, shape)

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = 1.0 - self._extract("alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Forward noising: z_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise)

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity target v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0."""
        return (self._extract("sqrt_alphas_cumprod", t, x.shape) * noise
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x.shape) * x)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * noise)

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (self._extract("sqrt_alphas_cumprod", t, x_t.shape) * x_t
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t.shape) * v)

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (self._extract("sqrt_alphas_cumprod", t, x_t.shape) * v
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_t.shape) * x_t)

    def q_posterior(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
                + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t)
        variance = self._extract("posterior_variance", t, x_t.shape)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t.shape)
        return mean, variance, log_variance
