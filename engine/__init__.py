"""Rollouts: sigma schedules, the solver loop over a denoiser, CUDA-graph capture, NVTX ranges.

Imports ``models`` (the :class:`~models.conditioning.Conditioning` type) and ``kernels`` (the fused solver
steps); never ``train``.
"""

from __future__ import annotations

from .batch_invariant import BatchInvariantDenoiser, guided_prediction
from .graphs import GraphCache
from .profiling import nvtx_range
from .rollout import (
    SOLVERS,
    STOCHASTIC_SOLVERS,
    RolloutBatch,
    RolloutEngine,
    default_engine,
    per_sample_randn,
    rollout,
    sample_seeds,
)
from .schedules import (
    FLOW_FAMILIES,
    ddim_alpha_bars,
    ddim_timesteps,
    ddpm_alpha_bars,
    scheduler_sigmas,
    sd3_sigmas,
    timesteps_from_sigmas,
)

__all__ = [
    "BatchInvariantDenoiser",
    "guided_prediction",
    "GraphCache",
    "nvtx_range",
    "SOLVERS",
    "STOCHASTIC_SOLVERS",
    "RolloutBatch",
    "RolloutEngine",
    "default_engine",
    "per_sample_randn",
    "rollout",
    "sample_seeds",
    "FLOW_FAMILIES",
    "scheduler_sigmas",
    "sd3_sigmas",
    "timesteps_from_sigmas",
    "ddpm_alpha_bars",
    "ddim_timesteps",
    "ddim_alpha_bars",
]
