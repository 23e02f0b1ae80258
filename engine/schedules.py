"""Noise schedules: SD3-family sigmas for flow models (SPEC §0) and DDPM/DDIM alpha-bars for epsilon models.

Schedules are built in float64 on the host and returned as fp32 on ``device``: the rollout reads per-step
flags (first step, last step) from a CPU copy, never from the device.
"""

from __future__ import annotations

import numbers

import torch

__all__ = [
    "sd3_sigmas",
    "timesteps_from_sigmas",
    "ddpm_alpha_bars",
    "ddim_timesteps",
    "ddim_alpha_bars",
]


def _check_num_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
        raise ValueError(f"num_steps: expected an int >= 1, got {type(num_steps).__name__}")
    if num_steps < 1:
        raise ValueError(f"num_steps: expected an int >= 1, got {num_steps}")
    return int(num_steps)


def sd3_sigmas(num_steps: int, shift: float = 3.0, device=None) -> torch.Tensor:
    """SPEC §0: ``s_i = 1 - i/N`` (i = 0..N), shifted ``shift s / (1 + (shift - 1) s)``; fp32 ``[N+1]``."""
    n = _check_num_steps(num_steps)
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not shift > 0:
        raise ValueError(f"shift: expected a float > 0, got {shift!r}")
    s = 1.0 - torch.arange(n + 1, dtype=torch.float64) / n
    sigmas = shift * s / (1.0 + (shift - 1.0) * s)
    sigmas[-1] = 0.0
    return sigmas.to(device=device, dtype=torch.float32)


def timesteps_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """SPEC §0: the transformer's timestep is ``1000 * sigma`` as a float, never truncated."""
    if not isinstance(sigmas, torch.Tensor) or not sigmas.is_floating_point():
        raise ValueError(f"sigmas: expected a floating-point tensor, got {type(sigmas).__name__}")
    return sigmas.float() * 1000.0


def ddpm_alpha_bars(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, device=None
) -> torch.Tensor:
    """SD1.5 "scaled_linear" DDPM schedule: ``beta = linspace(sqrt(b0), sqrt(b1), T)^2``,
    ``ab = cumprod(1 - beta)``.

    Returns fp32 ``[T]``; entry ``k`` is ``alpha_bar`` at the integer DDPM timestep ``k``.
    """
    t = _check_num_steps(num_train_timesteps)
    if not 0 < beta_start < beta_end < 1:
        raise ValueError(
            f"beta_start, beta_end: expected 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}"
        )
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, t, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(device=device, dtype=torch.float32)


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> torch.Tensor:
    """DDIM "leading" spacing (diffusers' default, SD1.5 ``steps_offset=1``): ``(N-1-i) * (T // N) + offset``.

    Returns int64 ``[N]``, descending (the model timesteps of steps 0..N-1).
    """
    n = _check_num_steps(num_steps)
    t = _check_num_steps(num_train_timesteps)
    if n > t:
        raise ValueError(f"num_steps: expected at most num_train_timesteps={t}, got {n}")
    ratio = t // n
    ts = torch.arange(n, dtype=torch.int64).flip(0) * ratio + steps_offset
    if int(ts[0]) >= t:
        raise ValueError(f"steps_offset: expected the largest timestep below {t}, got {int(ts[0])}")
    return ts


def ddim_alpha_bars(
    num_steps: int,
    *,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    steps_offset: int = 1,
    final_alpha_bar: float = 1.0,
    device=None,
):
    """SPEC §1 DDIM schedule -> ``(timesteps int64 [N], alpha_bars fp32 [N+1])``.

    ``alpha_bars[i]`` is ``ab`` of the state entering step ``i`` and ``alpha_bars[i+1]`` its ``ab_prev``; the
    last entry is ``final_alpha_bar`` (1.0: the last step lands on ``x0_hat``,
    diffusers' ``set_alpha_to_one``; SD1.5's config uses ``alpha_bar[0]``).
    """
    ts = ddim_timesteps(num_steps, num_train_timesteps, steps_offset)
    ab = ddpm_alpha_bars(num_train_timesteps, beta_start, beta_end)
    if not 0 < final_alpha_bar <= 1:
        raise ValueError(f"final_alpha_bar: expected a value in (0, 1], got {final_alpha_bar}")
    out = torch.cat([ab[ts], torch.tensor([final_alpha_bar], dtype=torch.float32)])
    return ts.to(device), out.to(device)
