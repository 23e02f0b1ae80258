"""Shared launch helpers for the Triton ops (layer 2 of CONVENTIONS.md "An op, in four layers").

Layout every kernel shares: a ``[B, ...]`` tensor is viewed as ``B`` rows of ``N = numel / B`` contiguous
elements.  Grids put the column blocks (or reduction chunks) of a row on axis 0 and the rows on axes 1 and 2
(``row = pid1 + pid2 * num_programs(1)``: CUDA caps axes 1 and 2 at 65535 programs each); programs past the
last row are masked out.  Program ids and element offsets are int64 (``row * N`` can pass 2^31).

Reductions are two-stage and deterministic: stage 1 writes one fp32 partial per ``(row, chunk)`` where the
chunk partition of a row depends only on ``N`` (``CHUNK`` elements, fixed), stage 2 runs one program per row
and sums that row's partials in a fixed order.  No atomics; a row's result does not depend on the batch it is
computed in, on the device's SM count or on any autotuning.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

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


def _row_axes(b: int) -> tuple[int, int]:
    """Rows over grid axes 1 and 2: ``row = pid1 + pid2 * num_programs(1)`` (CUDA caps both at 65535)."""
    return min(b, MAX_GRID_1), triton.cdiv(b, MAX_GRID_1)


def elementwise_grid(b: int, n: int) -> tuple[int, int, int]:
    return (triton.cdiv(n, BLOCK), *_row_axes(b))


def chunk_grid(b: int, n: int) -> tuple[int, int, int]:
    return (triton.cdiv(n, CHUNK), *_row_axes(b))


def n_chunks(n: int) -> int:
    return triton.cdiv(n, CHUNK)


def n_iter(n: int) -> int:
    """Loop trip count of ``row_sum`` over ``n`` partials: a ``constexpr`` (a loop bounded by a runtime int
    trips older Triton interpreters), 1 for every row shorter than ``CHUNK * PBLOCK`` = 512K elements."""
    return max(1, triton.cdiv(n, PBLOCK))


@triton.jit
def row_sum(ptr, n, NITER: tl.constexpr, PBLOCK: tl.constexpr):
    """``sum(ptr[0:n])`` in a fixed order: lane ``k`` adds items ``k, k + PBLOCK, ...``, then one tree."""
    acc = tl.zeros([PBLOCK], dtype=tl.float32)
    for it in range(NITER):
        idx = it * PBLOCK + tl.arange(0, PBLOCK)
        acc += tl.load(ptr + idx, mask=idx < n, other=0.0)
    return tl.sum(acc, axis=0)


def row_grid(b: int) -> tuple[int]:
    return (b,)


def scalar_f32(s: torch.Tensor) -> torch.Tensor:
    """A per-sample ``[B]`` scalar as a contiguous fp32 buffer the kernels ``tl.load``."""
    return s.to(torch.float32).contiguous()


def empty_grad() -> torch.Tensor:
    return torch.empty(0)
