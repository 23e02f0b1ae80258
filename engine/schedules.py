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


# SD1.5's scheduler (runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, a PNDMScheduler
# config that DDIMScheduler.from_config reads, as ddpo-pytorch does): the DDIM schedule of an epsilon model
# that ships no scheduler config.  ``set_alpha_to_one=False``: the last step goes to
# ``alphas_cumprod[0] = 0.99915``.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def ddim_alpha_bars(num_steps: int, *, scheduler_config=None, device=None):
    """SPEC §1 DDIM schedule of an epsilon model -> ``(timesteps int64 [N], alpha_bars fp32 [N+1])``, computed
    by diffusers: ``DDIMScheduler.from_config(scheduler_config).set_timesteps(N)``.

    ``scheduler_config`` is the model's scheduler config (a dict, e.g. a pipeline's
    ``scheduler/scheduler_config.json``; any diffusers DDPM-family config, as ddpo-pytorch builds its
    ``DDIMScheduler`` from SD1.x's ``PNDMScheduler`` config), or a scheduler object (its config is used); None
    is SD1.5's (:data:`SD15_SCHEDULER_CONFIG`).  ``alpha_bars[i]`` is ``alphas_cumprod`` at step ``i``'s
    timestep and ``alpha_bars[i+1]`` its ``ab_prev``: ``alphas_cumprod[t - T // N]``, and for the last step
    the scheduler's ``final_alpha_cumprod`` (``set_alpha_to_one=False``: ``alphas_cumprod[0]``, 0.99915 for
    SD1.x, so the last step is stochastic under ``eta > 0`` and trained, as in ddpo-pytorch; ``True``: 1.0,
    a deterministic last step landing on ``x0_hat``).
    """
    from diffusers import DDIMScheduler

    n = _check_num_steps(num_steps)
    if scheduler_config is None:
        config = dict(SD15_SCHEDULER_CONFIG)
    elif hasattr(scheduler_config, "config") and not isinstance(scheduler_config, dict):
        config = dict(scheduler_config.config)
    elif isinstance(scheduler_config, dict):
        config = dict(scheduler_config)
    else:
        raise ValueError(
            f"scheduler_config: expected a diffusers scheduler config dict or scheduler, "
            f"got {type(scheduler_config).__name__}"
        )
    sched = DDIMScheduler.from_config(config)
    c = sched.config
    if c.prediction_type != "epsilon":
        raise ValueError(
            f"scheduler_config: expected prediction_type 'epsilon' (the DDIM step predicts noise), "
            f"got {c.prediction_type!r}"
        )
    if c.clip_sample or c.thresholding:
        raise ValueError(
            "scheduler_config: expected clip_sample=False and thresholding=False (the fused DDIM step does "
            f"not clip x0_hat), got clip_sample={c.clip_sample}, thresholding={c.thresholding}"
        )
    if n > c.num_train_timesteps:
        raise ValueError(f"num_steps: expected at most num_train_timesteps={c.num_train_timesteps}, got {n}")
    sched.set_timesteps(n)
    ts = sched.timesteps.to(torch.int64)
    acp = sched.alphas_cumprod.to(torch.float32)
    prev = ts - c.num_train_timesteps // n
    if bool((ts[1:] != prev[:-1]).any()):
        raise ValueError(
            f"scheduler_config: expected timesteps {c.num_train_timesteps // n} apart (DDIM prev_timestep), "
            f"got {ts.tolist()} with timestep_spacing {c.timestep_spacing!r}"
        )
    final = torch.tensor([float(sched.final_alpha_cumprod)], dtype=torch.float32)
    last = acp[prev[-1]] if int(prev[-1]) >= 0 else final[0]
    out = torch.cat([acp[ts], last.reshape(1)])
    return ts.to(device), out.to(device)
