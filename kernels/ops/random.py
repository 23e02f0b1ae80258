"""``randn``: Philox4x32-10 normal noise generated in-kernel with ``tl.randn`` (bit-compatible with
``reference.randn``: element ``i`` of the flat output is ``tl.randn(seed, offset + i)``).

``seed`` and ``offset`` are either Python ints (kernel arguments) or int64 0-dim device tensors read with
``tl.load``: a captured CUDA graph then replays with whatever seed / offset the tensors hold at replay time.
No autograd (noise is a leaf).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import BLOCK, NUM_WARPS, custom_op

_NS = "nft_kernels"


@triton.jit
def _randn_kernel(
    out_ptr,
    seed_ptr,
    offset_ptr,
    seed_value,
    offset_value,
    numel,
    SEED_IN_MEMORY: tl.constexpr,
    OFFSET_IN_MEMORY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    if SEED_IN_MEMORY:
        seed = tl.load(seed_ptr)
    else:
        seed = seed_value
    if OFFSET_IN_MEMORY:
        offset = tl.load(offset_ptr).to(tl.int64)
    else:
        offset = tl.full([], offset_value, tl.int64)
    z = tl.randn(seed, offset + idx)
    tl.store(out_ptr + idx, z.to(out_ptr.dtype.element_ty), mask=mask)


def randn_forward(shape, seed_t, seed_i, offset_t, offset_i, dtype, device):
    """Launch: ``shape`` noise; ``seed_t`` / ``offset_t`` (int64 0-dim tensors) override the ints."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    numel = out.numel()
    if numel:
        dummy = out
        _randn_kernel[(triton.cdiv(numel, BLOCK),)](
            out,
            seed_t if seed_t is not None else dummy,
            offset_t if offset_t is not None else dummy,
            seed_i,
            offset_i,
            numel,
            SEED_IN_MEMORY=seed_t is not None,
            OFFSET_IN_MEMORY=offset_t is not None,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    return out


@custom_op(f"{_NS}::randn")
def randn_op(
    shape: list[int],
    seed_t: torch.Tensor | None,
    seed_i: int,
    offset_t: torch.Tensor | None,
    offset_i: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    return randn_forward(shape, seed_t, seed_i, offset_t, offset_i, dtype, device)


@randn_op.register_fake
def _(shape, seed_t, seed_i, offset_t, offset_i, dtype, device):
    return torch.empty(tuple(shape), dtype=dtype, device=device)
