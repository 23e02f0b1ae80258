"""Noise schedules: flow-model sigmas from the model's own diffusers scheduler (math.md §0) and DDPM/DDIM
alpha-bars for epsilon models.

Flow sigmas are computed BY diffusers (``FlowMatchEulerDiscreteScheduler.set_timesteps``, with the arguments
the model's pipeline passes), never re-derived here, so a scheduler config saved beside a model gives exactly
the schedule its pipeline samples on.  Schedules are returned as fp32 on ``device``: the rollout reads
per-step flags (first step, last step) from a CPU copy, never from the device.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import torch

__all__ = [
    "FLOW_FAMILIES",
    "scheduler_sigmas",
    "sd3_sigmas",
    "timesteps_from_sigmas",
    "ddpm_alpha_bars",
    "ddim_timesteps",
    "ddim_alpha_bars",
]

# whose pipeline drives the scheduler: "sd3" (StableDiffusion3Pipeline: ``set_timesteps(N)``, ``mu`` only
# under dynamic shifting) or "flux" (FluxPipeline: ``sigmas = linspace(1, 1/N, N)`` and ``mu`` always)
FLOW_FAMILIES = ("sd3", "flux")
_FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"


def _check_num_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
        raise ValueError(f"num_steps: expected an int >= 1, got {type(num_steps).__name__}")
    if num_steps < 1:
        raise ValueError(f"num_steps: expected an int >= 1, got {num_steps}")
    return int(num_steps)


def _check_shift(shift) -> float:
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not shift > 0:
        raise ValueError(f"shift: expected a float > 0, got {shift!r}")
    return float(shift)


def scheduler_sigmas(
    scheduler,
    num_steps: int,
    *,
    family: str = "sd3",
    image_seq_len: int | None = None,
    shift: float | None = None,
    device=None,
) -> torch.Tensor:
    """math.md §0: the sigmas ``[N+1]`` (fp32, decreasing from 1, final 0) that the model's pipeline samples
    on,
    computed by diffusers' ``FlowMatchEulerDiscreteScheduler`` from ``scheduler`` (its config dict, e.g. a
    pipeline's ``scheduler/scheduler_config.json``, or a scheduler object, whose config is used; the object
    is not modified).

    ``family`` names the pipeline whose ``set_timesteps`` call is reproduced:

    * ``"sd3"`` (diffusers@v0.42 ``StableDiffusion3Pipeline.__call__`` step 5): ``set_timesteps(N)``; under
      ``use_dynamic_shifting`` also ``mu = calculate_shift(image_seq_len, base_image_seq_len,
      max_image_seq_len, base_shift, max_shift)`` (that pipeline's function and defaults).
    * ``"flux"`` (``FluxPipeline.__call__`` step 5): ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=mu)``
      with ``mu`` from the FLUX pipeline's ``calculate_shift`` (ignored by a scheduler without dynamic
      shifting, e.g. FLUX.1-schnell's).

    ``image_seq_len`` is the transformer's image token count, ``(H/2) * (W/2)`` for a latent ``H x W`` with
    patch size 2 (FLUX's packed tokens); it is required where ``mu`` is.  ``shift`` (None: the config's)
    overrides the config's static shift as ``from_config(config, shift=shift)`` does, so ``sd3_sigmas(N, s)``
    is ``FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(N).sigmas``; it has no meaning under
    dynamic shifting and is refused there.  The model's timestep input is ``1000 * sigma``
    (:func:`timesteps_from_sigmas`), as the scheduler's ``timesteps``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    n = _check_num_steps(num_steps)
    if family not in FLOW_FAMILIES:
        raise ValueError(f"family: expected one of {FLOW_FAMILIES}, got {family!r}")
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        config = dict(scheduler.config)
    elif isinstance(scheduler, Mapping):
        config = dict(scheduler)
        name = config.get("_class_name", _FLOW_SCHEDULER)
        if name != _FLOW_SCHEDULER:
            raise ValueError(
                f"scheduler: expected a {_FLOW_SCHEDULER} config (flow models), got _class_name {name!r}"
            )
    else:
        raise ValueError(
            f"scheduler: expected a {_FLOW_SCHEDULER} or its config dict, got {type(scheduler).__name__}"
        )
    if config.get("invert_sigmas"):
        raise ValueError("scheduler: invert_sigmas=True (ascending sigmas) is not a text-to-image schedule")
    if config.get("num_train_timesteps", 1000) != 1000:
        raise ValueError(
            "scheduler: expected num_train_timesteps 1000 (the model's timestep input is 1000 * sigma), "
            f"got {config['num_train_timesteps']}"
        )
    dynamic = bool(config.get("use_dynamic_shifting", False))
    overrides = {}
    if shift is not None:
        if dynamic:
            raise ValueError(
                f"shift: the model's scheduler shifts by the image size (use_dynamic_shifting), a fixed "
                f"shift does not apply; expected None, got {shift!r}"
            )
        overrides["shift"] = _check_shift(shift)
    sched = FlowMatchEulerDiscreteScheduler.from_config(config, **overrides)

    kwargs = {}
    if family == "flux" or dynamic:
        seq = image_seq_len
        if isinstance(seq, bool) or not isinstance(seq, numbers.Integral) or seq < 1:
            raise ValueError(
                f"image_seq_len: expected the image token count (an int >= 1) for a {family} schedule"
                f"{' with dynamic shifting' if dynamic else ''}, got {image_seq_len!r}"
            )
        if family == "flux":
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            max_shift = 1.15
        else:
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            max_shift = 1.16
        kwargs["mu"] = calculate_shift(
            int(image_seq_len),
            sched.config.get("base_image_seq_len", 256),
            sched.config.get("max_image_seq_len", 4096),
            sched.config.get("base_shift", 0.5),
            sched.config.get("max_shift", max_shift),
        )
    if family == "flux" and not getattr(sched.config, "use_flow_sigmas", False):
        import numpy as np

        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), device="cpu", **kwargs)
    else:
        sched.set_timesteps(n, device="cpu", **kwargs)
    sigmas = sched.sigmas.to(torch.float32)
    if sigmas.shape != (n + 1,) or not (
        float(sigmas[0]) <= 1.0 and float(sigmas[-1]) == 0.0 and bool((sigmas[1:] < sigmas[:-1]).all())
    ):
        raise ValueError(
            f"scheduler: expected {n + 1} strictly decreasing sigmas from <= 1 to 0, got {sigmas.tolist()}"
        )
    return sigmas.to(device=device).clone()


def sd3_sigmas(num_steps: int, shift: float = 3.0, device=None) -> torch.Tensor:
    """math.md §0, SD3 / SD3.5: ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(N).sigmas``, fp32
    ``[N+1]``: ``sigma_min = shift(1/1000)``, ``s = linspace(1, sigma_min, N)``, ``sigmas = shift(s)``, then 0
    (``shift(s) = shift s / (1 + (shift - 1) s)``).  N = 10, shift 3: ``1.0, 0.9601, ..., 0.2780, 0.0089, 0``.
    """
    return scheduler_sigmas({"shift": _check_shift(shift)}, num_steps, device=device)


def timesteps_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """math.md §0: the transformer's timestep is ``1000 * sigma`` as a float, never truncated."""
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
    """math.md §1 DDIM schedule of an epsilon model -> ``(timesteps int64 [N], alpha_bars fp32 [N+1])``,
    computed
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
