"""DPM-Solver and DPM-Solver++ (CompVis ``ldm.models.diffusion.dpm_solver.dpm_solver`` interface).

Fast ODE solvers for diffusion models (Lu et al., "DPM-Solver", NeurIPS 2022, and
"DPM-Solver++", 2022). The probability-flow ODE is solved exactly in its linear part and with a
Taylor expansion of the model output in the half log-SNR ``lambda = log(alpha) - log(sigma)``:

- noise prediction (DPM-Solver):  x_t = alpha_t/alpha_s x_s - alpha_t * int_{lambda_s}^{lambda_t} e^{-lambda} eps d lambda
- data prediction (DPM-Solver++): x_t = sigma_t/sigma_s x_s + sigma_t * int_{lambda_s}^{lambda_t} e^{lambda} x0 d lambda

With h = lambda_t - lambda_s, D1 ~ h * (first derivative) and D2 ~ h^2 * (second derivative) of
the model output, every update below is ``ratio * x + c0 * m + c1 * D1 + c2 * D2`` with the
phi-functions of ``DPM_Solver._update``; the variants differ only in how D1 and D2 are estimated (singlestep:
extra model calls inside the step; multistep: previous steps' outputs). ``solver_type="dpm_solver"``
uses the paper's cheaper first-order coefficient, ``"taylor"`` the exact one.

Public names and signatures follow the CompVis file; everything works on the input's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SCHEDULES = ("discrete", "linear", "cosine")
SKIP_TYPES = ("logSNR", "time_uniform", "time_quadratic")
SOLVER_TYPES = ("dpm_solver", "taylor")
METHODS = ("singlestep", "multistep", "singlestep_fixed", "adaptive")


def expand_dims(v: torch.Tensor, dims: int) -> torch.Tensor:
    """A per-sample vector ``v`` of shape [N] as [N, 1, ..., 1] with ``dims`` dimensions in all."""
    return v[(...,) + (None,) * (dims - 1)]


def interpolate_fn(x: torch.Tensor, xp: torch.Tensor, yp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of the points (``xp``, ``yp``) at ``x``, extrapolated linearly
    beyond both ends (so it is differentiable everywhere). Shapes: x [N, C], xp and yp [1 or C, K]."""
    xp = xp.expand(x.shape[1], -1)
    yp = yp.expand(x.shape[1], -1)
    keys = x.t().contiguous()  # [C, N]
    right = torch.searchsorted(xp.contiguous(), keys).clamp(1, xp.shape[1] - 1)
    x0, x1 = torch.gather(xp, 1, right - 1), torch.gather(xp, 1, right)
    y0, y1 = torch.gather(yp, 1, right - 1), torch.gather(yp, 1, right)
    return (y0 + (keys - x0) * (y1 - y0) / (x1 - x0)).t()


class NoiseScheduleVP:
    """The marginals alpha_t, sigma_t (alpha_t^2 + sigma_t^2 = 1) of a VP diffusion at continuous t.

    ``discrete``: a trained schedule given by ``betas`` or ``alphas_cumprod``; step n of N sits at
    t = (n + 1) / N and log(alpha) is interpolated linearly in between. ``linear`` and ``cosine``:
    the continuous-time VP-SDE schedules.
    """

    def __init__(self, schedule: str = "discrete", betas: torch.Tensor | None = None,
                 alphas_cumprod: torch.Tensor | None = None, continuous_beta_0: float = 0.1,
                 continuous_beta_1: float = 20.0) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"Unsupported noise schedule {schedule!r}; choose one of {SCHEDULES}.")
        self.schedule = schedule
        self.T = 1.0
        self.total_N = 1000
        if schedule == "discrete":
            if betas is not None:
                log_alphas = 0.5 * torch.log(1 - torch.as_tensor(betas, dtype=torch.float64)).cumsum(dim=0)
            elif alphas_cumprod is not None:
                log_alphas = 0.5 * torch.log(torch.as_tensor(alphas_cumprod, dtype=torch.float64))
            else:
                raise ValueError("The discrete schedule needs betas or alphas_cumprod.")
            self.total_N = len(log_alphas)
            self.t_array = torch.linspace(0.0, 1.0, self.total_N + 1, dtype=torch.float64)[1:].reshape(1, -1).float()
            self.log_alpha_array = log_alphas.reshape(1, -1).float()
        else:
            self.beta_0, self.beta_1 = continuous_beta_0, continuous_beta_1
            self.cosine_s = 0.008
            self.cosine_log_alpha_0 = math.log(math.cos(self.cosine_s / (1.0 + self.cosine_s) * math.pi / 2.0))
            if schedule == "cosine":
                # alpha -> 0 at t = 1 makes lambda infinite; stop where beta(t) reaches 999.
                self.T = 0.9946

    def marginal_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log(alpha_t)."""
        if self.schedule == "discrete":
            return interpolate_fn(t.reshape(-1, 1), self.t_array.to(t.device), self.log_alpha_array.to(t.device)).reshape(-1)
        if self.schedule == "linear":
            return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0
        cosine = torch.cos((t + self.cosine_s) / (1.0 + self.cosine_s) * math.pi / 2.0)
        return torch.log(cosine) - self.cosine_log_alpha_0

    def marginal_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: torch.Tensor) -> torch.Tensor:
        """Half log-SNR: log(alpha_t) - log(sigma_t)."""
        log_mean = self.marginal_log_mean_coeff(t)
        return log_mean - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_mean))

    def inverse_lambda(self, lamb: torch.Tensor) -> torch.Tensor:
        """The t whose half log-SNR is ``lamb``."""
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lamb), -2.0 * lamb)
        if self.schedule == "discrete":
            t = interpolate_fn(log_alpha.reshape(-1, 1), torch.flip(self.log_alpha_array.to(lamb.device), [1]),
                               torch.flip(self.t_array.to(lamb.device), [1]))
            return t.reshape(-1)
        if self.schedule == "linear":
            tmp = 2.0 * (self.beta_1 - self.beta_0) * torch.logaddexp(-2.0 * lamb, torch.zeros_like(lamb))
            delta = self.beta_0**2 + tmp
            return tmp / (torch.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)
        angle = torch.arccos(torch.exp(log_alpha + self.cosine_log_alpha_0))
        return angle * 2.0 * (1.0 + self.cosine_s) / math.pi - self.cosine_s


def model_wrapper(
    model: Callable[..., torch.Tensor],
    noise_schedule: NoiseScheduleVP,
    model_type: str = "noise",
    model_kwargs: Mapping[str, Any] | None = None,
    guidance_type: str = "uncond",
    condition: Any = None,
    unconditional_condition: Any = None,
    guidance_scale: float = 1.0,
    classifier_fn: Callable[..., torch.Tensor] | None = None,
    classifier_kwargs: Mapping[str, Any] | None = None,
) -> ModelFn:
    """Turn ``model(x, t_input[, cond])`` into the noise prediction ``fn(x, t_continuous)`` the solver needs.

    ``model_type``: what the model predicts ("noise", "x_start", "v" or "score"). Discrete-time
    models get t_input = 1000 * (t - 1/N), i.e. their own step index. ``guidance_type``: "uncond",
    "classifier" (gradient of ``classifier_fn``'s log-probability) or "classifier-free" (one batched
    call on [unconditional, conditional]).
    """
    model_kwargs = dict(model_kwargs or {})
    classifier_kwargs = dict(classifier_kwargs or {})
    if model_type not in ("noise", "x_start", "v", "score"):
        raise ValueError(f"Unsupported model_type {model_type!r}; choose noise, x_start, v or score.")
    if guidance_type not in ("uncond", "classifier", "classifier-free"):
        raise ValueError(f"Unsupported guidance_type {guidance_type!r}; choose uncond, classifier or classifier-free.")
    if guidance_type == "classifier" and classifier_fn is None:
        raise ValueError("guidance_type='classifier' needs classifier_fn.")

    def model_time(t_continuous: torch.Tensor) -> torch.Tensor:
        if noise_schedule.schedule == "discrete":
            return (t_continuous - 1.0 / noise_schedule.total_N) * 1000.0
        return t_continuous

    def noise_pred(x: torch.Tensor, t_continuous: torch.Tensor, cond: Any = None) -> torch.Tensor:
        t_input = model_time(t_continuous)
        output = model(x, t_input, **model_kwargs) if cond is None else model(x, t_input, cond, **model_kwargs)
        if model_type == "noise":
            return output
        dims = x.dim()
        alpha_t = expand_dims(noise_schedule.marginal_alpha(t_continuous), dims)
        sigma_t = expand_dims(noise_schedule.marginal_std(t_continuous), dims)
        if model_type == "x_start":
            return (x - alpha_t * output) / sigma_t
        if model_type == "v":
            return alpha_t * output + sigma_t * x
        return -sigma_t * output

    def model_fn(x: torch.Tensor, t_continuous: torch.Tensor) -> torch.Tensor:
        if t_continuous.reshape(-1).shape[0] == 1:
            t_continuous = t_continuous.reshape(-1).expand(x.shape[0])
        if guidance_type == "uncond":
            return noise_pred(x, t_continuous)
        if guidance_type == "classifier":
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                log_prob = classifier_fn(x_in, model_time(t_continuous), condition, **classifier_kwargs)
                grad = torch.autograd.grad(log_prob.sum(), x_in)[0]
            sigma_t = expand_dims(noise_schedule.marginal_std(t_continuous), x.dim())
            return noise_pred(x, t_continuous) - guidance_scale * sigma_t * grad
        if guidance_scale == 1.0 or unconditional_condition is None:
            return noise_pred(x, t_continuous, cond=condition)
        c_in = _concat(unconditional_condition, condition)
        uncond, cond = noise_pred(torch.cat([x, x]), torch.cat([t_continuous, t_continuous]), cond=c_in).chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return model_fn


def _concat(unconditional: Any, conditional: Any) -> Any:
    """[uncond, cond] along the batch for tensors and for CompVis dict / list conditionings."""
    if isinstance(conditional, dict):
        return {key: _concat(unconditional[key], value) for key, value in conditional.items()}
    if isinstance(conditional, list):
        return [_concat(u, c) for u, c in zip(unconditional, conditional, strict=True)]
    return torch.cat([unconditional, conditional])


class DPM_Solver:
    """DPM-Solver (``predict_x0=False``) or DPM-Solver++ (``predict_x0=True``) for ``model_fn(x, t) -> noise``.

    ``thresholding`` (DPM-Solver++ only) clips each predicted x0 to its 99.5th absolute percentile
    (at least ``max_val``) and rescales, Imagen's dynamic thresholding.
    """

    def __init__(self, model_fn: ModelFn, noise_schedule: NoiseScheduleVP, predict_x0: bool = False,
                 thresholding: bool = False, max_val: float = 1.0) -> None:
        self.model = model_fn
        self.noise_schedule = noise_schedule
        self.predict_x0 = predict_x0
        self.thresholding = thresholding
        self.max_val = max_val

    def noise_prediction_fn(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t)

    def data_prediction_fn(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = (x - sigma_t eps) / alpha_t, optionally dynamically thresholded."""
        dims = x.dim()
        ns = self.noise_schedule
        x0 = (x - expand_dims(ns.marginal_std(t), dims) * self.noise_prediction_fn(x, t)) / expand_dims(ns.marginal_alpha(t), dims)
        if self.thresholding:
            s = torch.quantile(x0.abs().reshape(x0.shape[0], -1), 0.995, dim=1)
            s = expand_dims(torch.clamp(s, min=self.max_val), dims)
            x0 = torch.clamp(x0, -s, s) / s
        return x0

    def model_fn(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.data_prediction_fn(x, t) if self.predict_x0 else self.noise_prediction_fn(x, t)

    def get_time_steps(self, skip_type: str, t_T: float, t_0: float, N: int, device: torch.device | str) -> torch.Tensor:
        """N + 1 times from ``t_T`` down to ``t_0``: uniform in log-SNR, in t, or in sqrt(t)."""
        if skip_type == "logSNR":
            ends = self.noise_schedule.marginal_lambda(torch.tensor([t_T, t_0], device=device))
            return self.noise_schedule.inverse_lambda(torch.linspace(float(ends[0]), float(ends[1]), N + 1, device=device))
        if skip_type == "time_uniform":
            return torch.linspace(t_T, t_0, N + 1, device=device)
        if skip_type == "time_quadratic":
            return torch.linspace(t_T**0.5, t_0**0.5, N + 1, device=device).pow(2)
        raise ValueError(f"Unsupported skip_type {skip_type!r}; choose one of {SKIP_TYPES}.")

    def get_orders_and_timesteps_for_singlestep_solver(
        self, steps: int, order: int, skip_type: str, t_T: float, t_0: float, device: torch.device | str
    ) -> tuple[torch.Tensor, list[int]]:
        """Outer steps and their orders so that singlestep DPM-Solver uses exactly ``steps`` model calls
        (orders <= ``order``; lower orders only at the end)."""
        if order == 3:
            count = steps // 3 + 1
            tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
            orders = [3] * (count - len(tail)) + tail
        elif order == 2:
            orders = [2] * (steps // 2) + [1] * (steps % 2)
        elif order == 1:
            orders = [1] * steps
        else:
            raise ValueError(f"order must be 1, 2 or 3, got {order}.")
        if skip_type == "logSNR":
            return self.get_time_steps(skip_type, t_T, t_0, len(orders), device), orders
        boundaries = torch.cumsum(torch.tensor([0, *orders]), 0).to(device)
        return self.get_time_steps(skip_type, t_T, t_0, steps, device)[boundaries], orders

    def denoise_to_zero_fn(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Jump from time ``s`` to 0 with the data prediction (one extra model call)."""
        return self.data_prediction_fn(x, s)

    # ---------------------------------------------------------------- the update rules
    def _ends(self, s: torch.Tensor, t: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h, ratio, scale) of a step from s to t: ratio = sigma_t/sigma_s and scale = alpha_t for data
        prediction, ratio = alpha_t/alpha_s and scale = sigma_t for noise prediction ([N, 1, ...])."""
        ns = self.noise_schedule
        h = ns.marginal_lambda(t) - ns.marginal_lambda(s)
        if self.predict_x0:
            ratio = torch.exp(torch.log(ns.marginal_std(t)) - torch.log(ns.marginal_std(s)))
            scale = ns.marginal_alpha(t)
        else:
            ratio = torch.exp(ns.marginal_log_mean_coeff(t) - ns.marginal_log_mean_coeff(s))
            scale = ns.marginal_std(t)
        return h, expand_dims(ratio, dims), expand_dims(scale, dims)

    def _update(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, model_s: torch.Tensor,
                d1: torch.Tensor | None = None, d2: torch.Tensor | None = None, first_order_d1: bool = False) -> torch.Tensor:
        """x_t from x_s with model output ``model_s`` and derivative estimates D1 ~ h m', D2 ~ h^2 m''.

        The integrals of the Taylor terms are phi_1 (term 0), h phi_2 (term 1) and h^2 phi_3 (term 2):
        data prediction  x_t = ratio x - scale (phi_1 m - phi_2 D1 + phi_3 D2), phi_1 = e^-h - 1;
        noise prediction x_t = ratio x - scale (phi_1 m + phi_2 D1 + phi_3 D2), phi_1 = e^h - 1.
        ``first_order_d1`` replaces phi_2 by its leading term -+phi_1 / 2 ("dpm_solver" type).
        """
        h, ratio, scale = self._ends(s, t, x.dim())
        h = expand_dims(h, x.dim())
        if self.predict_x0:
            phi_1 = torch.expm1(-h)
            phi_2 = phi_1 / h + 1.0
            d1_coefficient = 0.5 * phi_1 if first_order_d1 else -phi_2
        else:
            phi_1 = torch.expm1(h)
            phi_2 = phi_1 / h - 1.0
            d1_coefficient = 0.5 * phi_1 if first_order_d1 else phi_2
        phi_3 = phi_2 / h - 0.5
        out = ratio * x - scale * phi_1 * model_s
        if d1 is not None:
            out = out - scale * d1_coefficient * d1
        if d2 is not None:
            out = out - scale * phi_3 * d2
        return out

    def dpm_solver_first_update(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, model_s: torch.Tensor | None = None,
                                return_intermediate: bool = False) -> Any:
        """First order (DDIM) from s to t."""
        model_s = self.model_fn(x, s) if model_s is None else model_s
        x_t = self._update(x, s, t, model_s)
        return (x_t, {"model_s": model_s}) if return_intermediate else x_t

    def _inner_time(self, s: torch.Tensor, t: torch.Tensor, r: float) -> torch.Tensor:
        ns = self.noise_schedule
        lambda_s = ns.marginal_lambda(s)
        return ns.inverse_lambda(lambda_s + r * (ns.marginal_lambda(t) - lambda_s))

    def singlestep_dpm_solver_second_update(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, r1: float = 0.5,
                                            model_s: torch.Tensor | None = None, return_intermediate: bool = False,
                                            solver_type: str = "dpm_solver") -> Any:
        """Second order from s to t with one extra model call at lambda_s + r1 h."""
        _check_solver_type(solver_type)
        r1 = 0.5 if r1 is None else float(r1)
        model_s = self.model_fn(x, s) if model_s is None else model_s
        s1 = self._inner_time(s, t, r1)
        model_s1 = self.model_fn(self._update(x, s, s1, model_s), s1)
        x_t = self._update(x, s, t, model_s, d1=(model_s1 - model_s) / r1, first_order_d1=solver_type == "dpm_solver")
        return (x_t, {"model_s": model_s, "model_s1": model_s1}) if return_intermediate else x_t

    def singlestep_dpm_solver_third_update(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, r1: float = 1.0 / 3.0,
                                           r2: float = 2.0 / 3.0, model_s: torch.Tensor | None = None,
                                           model_s1: torch.Tensor | None = None, return_intermediate: bool = False,
                                           solver_type: str = "dpm_solver") -> Any:
        """Third order from s to t with model calls at lambda_s + r1 h and lambda_s + r2 h."""
        _check_solver_type(solver_type)
        r1 = 1.0 / 3.0 if r1 is None else float(r1)
        r2 = 2.0 / 3.0 if r2 is None else float(r2)
        model_s = self.model_fn(x, s) if model_s is None else model_s
        s1, s2 = self._inner_time(s, t, r1), self._inner_time(s, t, r2)
        if model_s1 is None:
            model_s1 = self.model_fn(self._update(x, s, s1, model_s), s1)
        # x at s2 to second order; the D1 there is measured in units of the sub-step r2 h.
        x_s2 = self._update(x, s, s2, model_s, d1=(model_s1 - model_s) * (r2 / r1))
        model_s2 = self.model_fn(x_s2, s2)
        if solver_type == "dpm_solver":
            x_t = self._update(x, s, t, model_s, d1=(model_s2 - model_s) / r2)
        else:
            d1_0, d1_1 = (model_s1 - model_s) / r1, (model_s2 - model_s) / r2
            d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
            d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
            x_t = self._update(x, s, t, model_s, d1=d1, d2=d2)
        if return_intermediate:
            return x_t, {"model_s": model_s, "model_s1": model_s1, "model_s2": model_s2}
        return x_t

    def multistep_dpm_solver_second_update(self, x: torch.Tensor, model_prev_list: Sequence[torch.Tensor],
                                           t_prev_list: Sequence[torch.Tensor], t: torch.Tensor,
                                           solver_type: str = "dpm_solver") -> torch.Tensor:
        """Second order from the last previous time to t, D1 from the last two outputs."""
        _check_solver_type(solver_type)
        ns = self.noise_schedule
        (m1, m0), (t1, t0) = model_prev_list[-2:], t_prev_list[-2:]
        lambda_1, lambda_0 = ns.marginal_lambda(t1), ns.marginal_lambda(t0)
        r0 = expand_dims((lambda_0 - lambda_1) / (ns.marginal_lambda(t) - lambda_0), x.dim())
        return self._update(x, t0, t, m0, d1=(m0 - m1) / r0, first_order_d1=solver_type == "dpm_solver")

    def multistep_dpm_solver_third_update(self, x: torch.Tensor, model_prev_list: Sequence[torch.Tensor],
                                          t_prev_list: Sequence[torch.Tensor], t: torch.Tensor,
                                          solver_type: str = "dpm_solver") -> torch.Tensor:
        """Third order from the last previous time to t, D1 and D2 from the last three outputs."""
        _check_solver_type(solver_type)
        ns = self.noise_schedule
        (m2, m1, m0), (t2, t1, t0) = model_prev_list[-3:], t_prev_list[-3:]
        lambda_2, lambda_1, lambda_0 = (ns.marginal_lambda(v) for v in (t2, t1, t0))
        h = ns.marginal_lambda(t) - lambda_0
        r0 = expand_dims((lambda_0 - lambda_1) / h, x.dim())
        r1 = expand_dims((lambda_1 - lambda_2) / h, x.dim())
        d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        # (d1_0 - d1_1) / (r0 + r1) estimates h^2 m'' / 2; D2 is h^2 m''.
        d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)
        return self._update(x, t0, t, m0, d1=d1, d2=d2)

    def singlestep_dpm_solver_update(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, order: int,
                                     return_intermediate: bool = False, solver_type: str = "dpm_solver",
                                     r1: float | None = None, r2: float | None = None) -> Any:
        if order == 1:
            return self.dpm_solver_first_update(x, s, t, return_intermediate=return_intermediate)
        if order == 2:
            return self.singlestep_dpm_solver_second_update(x, s, t, r1=r1, return_intermediate=return_intermediate,
                                                            solver_type=solver_type)
        if order == 3:
            return self.singlestep_dpm_solver_third_update(x, s, t, r1=r1, r2=r2, return_intermediate=return_intermediate,
                                                           solver_type=solver_type)
        raise ValueError(f"Solver order must be 1, 2 or 3, got {order}.")

    def multistep_dpm_solver_update(self, x: torch.Tensor, model_prev_list: Sequence[torch.Tensor],
                                    t_prev_list: Sequence[torch.Tensor], t: torch.Tensor, order: int,
                                    solver_type: str = "dpm_solver") -> torch.Tensor:
        if order == 1:
            return self.dpm_solver_first_update(x, t_prev_list[-1], t, model_s=model_prev_list[-1])
        if order == 2:
            return self.multistep_dpm_solver_second_update(x, model_prev_list, t_prev_list, t, solver_type=solver_type)
        if order == 3:
            return self.multistep_dpm_solver_third_update(x, model_prev_list, t_prev_list, t, solver_type=solver_type)
        raise ValueError(f"Solver order must be 1, 2 or 3, got {order}.")

    def dpm_solver_adaptive(self, x: torch.Tensor, order: int, t_T: float, t_0: float, h_init: float = 0.05,
                            atol: float = 0.0078, rtol: float = 0.05, theta: float = 0.9, t_err: float = 1e-5,
                            solver_type: str = "dpm_solver") -> torch.Tensor:
        """Adaptive step size: accept a step when orders (order - 1) and ``order`` agree within
        max(atol, rtol * |x|) (RMS over each sample), and scale h by theta * E^(-1/order)."""
        ns = self.noise_schedule
        if order == 2:
            def lower(x_, s_, t_):
                return self.dpm_solver_first_update(x_, s_, t_, return_intermediate=True)

            def higher(x_, s_, t_, **kw):
                return self.singlestep_dpm_solver_second_update(x_, s_, t_, r1=0.5, solver_type=solver_type, **kw)
        elif order == 3:
            def lower(x_, s_, t_):
                return self.singlestep_dpm_solver_second_update(x_, s_, t_, r1=1.0 / 3.0, return_intermediate=True,
                                                                solver_type=solver_type)

            def higher(x_, s_, t_, **kw):
                return self.singlestep_dpm_solver_third_update(x_, s_, t_, r1=1.0 / 3.0, r2=2.0 / 3.0,
                                                               solver_type=solver_type, **kw)
        else:
            raise ValueError(f"The adaptive solver needs order 2 or 3, got {order}.")
        s = t_T * torch.ones(x.shape[0], device=x.device)
        lambda_s = ns.marginal_lambda(s)
        lambda_0 = ns.marginal_lambda(t_0 * torch.ones_like(s))
        h = h_init * torch.ones_like(s)
        x_prev = x
        while (s - t_0).abs().mean() > t_err:
            t = ns.inverse_lambda(lambda_s + h)
            x_lower, intermediate = lower(x, s, t)
            x_higher = higher(x, s, t, **intermediate)
            delta = torch.maximum(torch.full_like(x, atol), rtol * torch.maximum(x_lower.abs(), x_prev.abs()))
            error = ((x_lower - x_higher) / delta).pow(2).reshape(x.shape[0], -1).mean(dim=1).sqrt().max()
            if error <= 1.0:
                x, s, x_prev = x_higher, t, x_lower
                lambda_s = ns.marginal_lambda(s)
            h = torch.minimum(theta * h * error.clamp(min=1e-12).pow(-1.0 / order), lambda_0 - lambda_s)
        return x

    def sample(self, x: torch.Tensor, steps: int = 20, t_start: float | None = None, t_end: float | None = None,
               order: int = 3, skip_type: str = "time_uniform", method: str = "singlestep",
               lower_order_final: bool = True, denoise_to_zero: bool = False, solver_type: str = "dpm_solver",
               atol: float = 0.0078, rtol: float = 0.05) -> torch.Tensor:
        """Solve from ``t_start`` (default T) to ``t_end`` (default 1/N) with ``steps`` model calls.

        ``method``: "multistep" (one call a step; the first steps and, with ``lower_order_final`` and
        fewer than 15 steps, the last ones use lower orders), "singlestep" (orders mixed to use
        exactly ``steps`` calls), "singlestep_fixed" (steps // order steps of ``order``) or "adaptive".
        """
        if method not in METHODS:
            raise ValueError(f"Unsupported method {method!r}; choose one of {METHODS}.")
        t_0 = 1.0 / self.noise_schedule.total_N if t_end is None else t_end
        t_T = self.noise_schedule.T if t_start is None else t_start
        device, batch = x.device, x.shape[0]
        with torch.no_grad():
            if method == "adaptive":
                x = self.dpm_solver_adaptive(x, order=order, t_T=t_T, t_0=t_0, atol=atol, rtol=rtol, solver_type=solver_type)
            elif method == "multistep":
                if steps < order:
                    raise ValueError(f"Multistep DPM-Solver of order {order} needs at least {order} steps, got {steps}.")
                timesteps = self.get_time_steps(skip_type, t_T, t_0, steps, device)
                t_prev = [timesteps[0].expand(batch)]
                model_prev = [self.model_fn(x, t_prev[0])]
                for step in range(1, steps + 1):
                    vec_t = timesteps[step].expand(batch)
                    step_order = min(order, step)
                    if lower_order_final and steps < 15:
                        step_order = min(step_order, steps + 1 - step)
                    x = self.multistep_dpm_solver_update(x, model_prev, t_prev, vec_t, step_order, solver_type=solver_type)
                    t_prev = (t_prev + [vec_t])[-order:]
                    if step < steps:  # the last output would never be used
                        model_prev = (model_prev + [self.model_fn(x, vec_t)])[-order:]
            else:
                if method == "singlestep":
                    outer, orders = self.get_orders_and_timesteps_for_singlestep_solver(steps, order, skip_type, t_T, t_0, device)
                else:
                    orders = [order] * (steps // order)
                    outer = self.get_time_steps(skip_type, t_T, t_0, len(orders), device)
                for i, step_order in enumerate(orders):
                    inner = self.get_time_steps(skip_type, float(outer[i]), float(outer[i + 1]), step_order, device)
                    lambdas = self.noise_schedule.marginal_lambda(inner)
                    h = lambdas[-1] - lambdas[0]
                    r1 = None if step_order <= 1 else float((lambdas[1] - lambdas[0]) / h)
                    r2 = None if step_order <= 2 else float((lambdas[2] - lambdas[0]) / h)
                    x = self.singlestep_dpm_solver_update(x, outer[i].expand(batch), outer[i + 1].expand(batch), step_order,
                                                          solver_type=solver_type, r1=r1, r2=r2)
            if denoise_to_zero:
                x = self.denoise_to_zero_fn(x, torch.full((batch,), t_0, device=device))
        return x


def _check_solver_type(solver_type: str) -> None:
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"Unsupported solver_type {solver_type!r}; choose one of {SOLVER_TYPES}.")
