"""Shared launch helpers for the Triton ops (layer 2 of CONVENTIONS.md "An op, in four layers").

Layout every kernel shares: a ``[B, ...]`` tensor is viewed as ``B`` rows of ``N = numel / B`` contiguous
elements.  Grids put the column blocks (or reduction chunks) of a row on axis 0 and the rows on axis 1; axis 1
is capped at 65535 programs (CUDA's limit) and each program loops over rows ``pid1, pid1 + 65535, ...``.
Element offsets are computed in int64 (``row * N`` can pass 2^31).

Reductions are two-stage and deterministic: stage 1 writes one fp32 partial per ``(row, chunk)`` where the
chunk partition of a row depends only on ``N`` (``CHUNK`` elements, fixed), stage 2 runs one program per row
and sums that row's partials in a fixed order.  No atomics; a row's result does not depend on the batch it is
computed in, on the device's SM count or on any autotuning.
"""

from __future__ import annotations

import math

import torch
import triton

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

BLOCK = 1024  # elements per program for element-wise kernels, and per loop iteration in reductions
CHUNK = (
    4096  # elements of one row reduced by one stage-1 program (a multiple of BLOCK); fixed for determinism
)
PBLOCK = 128  # partials summed per loop iteration by a stage-2 program
MAX_GRID_1 = 65535  # CUDA's limit on grid axes 1 and 2
NUM_WARPS = 4


def rows(x: torch.Tensor) -> tuple[int, int]:
    """``(B, N)``: batch size and elements per row of a ``[B, ...]`` tensor."""
    b = x.shape[0]
    return b, (x.numel() // b if b else 0)


def contig(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.contiguous()


def elementwise_grid(b: int, n: int) -> tuple[int, int]:
    return (triton.cdiv(n, BLOCK), min(b, MAX_GRID_1))


def chunk_grid(b: int, n: int) -> tuple[int, int]:
    return (triton.cdiv(n, CHUNK), min(b, MAX_GRID_1))


def n_chunks(n: int) -> int:
    return triton.cdiv(n, CHUNK)


def row_grid(b: int) -> tuple[int]:
    return (b,)


def scalar_f32(s: torch.Tensor) -> torch.Tensor:
    """A per-sample ``[B]`` scalar as a contiguous fp32 buffer the kernels ``tl.load``."""
    return s.to(torch.float32).contiguous()


def empty_grad() -> torch.Tensor:
    return torch.empty(0)
