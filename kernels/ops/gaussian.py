"""``gaussian_log_prob`` and ``gaussian_kl`` (math.md §1), reduced per row (``mean`` or ``sum`` over dims).

Both reduce ``sum((a - b)^2)`` per row with the deterministic two-stage order of ``_common`` and finish
with per-row scalar math:

* ``log N(x; m, s^2)``: ``-sum(d^2) / (2 s^2) - K (log s + log sqrt(2 pi))`` with ``d = x - m``;
  0 where ``s == 0``.
* ``KL(N(m_p, s_p^2) || N(m_q, s_q^2))``:
  ``sum(d^2) / (2 s_q^2) + K (log(s_q / s_p) + s_p^2 / (2 s_q^2) - 1/2)`` with ``d = m_p - m_q``.

``K = N`` for ``reduce="sum"``; for ``"mean"`` everything is divided by ``N`` (so ``K = 1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    BLOCK,
    CHUNK,
    LOG_SQRT_2PI,
    NUM_WARPS,
    PBLOCK,
    chunk_grid,
    contig,
    custom_op,
    elementwise_grid,
    n_chunks,
    n_iter,
    row_sum,
    rows,
    scalar_f32,
)

_NS = "nft_kernels"
MODE_LOGP, MODE_KL = 0, 1


@triton.jit(do_not_specialize=["B"])  # B never changes the code of a row: same bits at any batch
def _sqdiff_partial_kernel(a_ptr, b_ptr, part_ptr, B, N, NCHUNK, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Stage 1: program ``(chunk, row)`` -> ``sum((a - b)^2)`` over its chunk of the row."""
    chunk = tl.program_id(0)
    # rows on grid axes 1 and 2 (CUDA caps axis 1 at 65535); a clamped row keeps loads in bounds
    row_id = tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    row_ok = row_id < B
    row = tl.minimum(row_id, B - 1)
    base = tl.cast(row, tl.int64) * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, CHUNK, BLOCK):
        cols = tl.cast(chunk, tl.int64) * CHUNK + j + tl.arange(0, BLOCK)
        mask = tl.where(row_ok, cols < N, False)
        a = tl.load(a_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        d = a - b
        acc += d * d
    tl.store(part_ptr + tl.cast(row, tl.int64) * NCHUNK + chunk, tl.sum(acc, axis=0), mask=row_ok)


@triton.jit
def _gaussian_reduce_kernel(
    part_ptr,
    s1_ptr,
    s2_ptr,
    out_ptr,
    N,
    NCHUNK,
    MODE: tl.constexpr,
    MEAN: tl.constexpr,
    LOG_SQRT_2PI: tl.constexpr,
    NITER: tl.constexpr,
    PBLOCK: tl.constexpr,
):
    """Stage 2: one program per row; ``s1 = std`` (log-prob) or ``(s1, s2) = (std_p, std_q)`` (KL)."""
    row = tl.program_id(0).to(tl.int64)
    sumsq = row_sum(part_ptr + row * NCHUNK, NCHUNK, NITER, PBLOCK)
    if MEAN:
        sumsq = sumsq / N
        k = 1.0
    else:
        k = N * 1.0
    if MODE == 0:
        std = tl.load(s1_ptr + row)
        point = std == 0.0
        s = tl.where(point, 1.0, std)
        out = -sumsq / (2.0 * s * s) - k * (tl.log(s) + LOG_SQRT_2PI)
        out = tl.where(point, 0.0, out)
    else:
        sp = tl.load(s1_ptr + row)
        sq = tl.load(s2_ptr + row)
        out = sumsq / (2.0 * sq * sq) + k * (tl.log(sq) - tl.log(sp) + sp * sp / (2.0 * sq * sq) - 0.5)
    tl.store(out_ptr + row, out)


@triton.jit
def _gaussian_bwd_kernel(
    a_ptr,
    b_ptr,
    g_ptr,
    s_ptr,
    ga_ptr,
    gb_ptr,
    B,
    N,
    MODE: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``d out / d a = coef (a - b)``, ``d out / d b = -coef (a - b)`` with ``coef = -1/s^2``
    (log-prob, 0 where ``s == 0``) or ``1/s_q^2`` (KL), divided by ``N`` for ``reduce="mean"``."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    # rows on grid axes 1 and 2 (CUDA caps axis 1 at 65535); a clamped row keeps loads in bounds
    row_id = tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    row_ok = row_id < B
    row = tl.minimum(row_id, B - 1)
    mask = tl.where(row_ok, mask, False)
    offs = tl.cast(row, tl.int64) * N + cols
    s = tl.load(s_ptr + row)
    if MODE == 0:
        coef = tl.where(s == 0.0, 0.0, -1.0 / tl.where(s == 0.0, 1.0, s * s))
    else:
        coef = 1.0 / (s * s)
    if MEAN:
        coef = coef / N
    coef = coef * tl.load(g_ptr + row)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ga = coef * (a - b)
    tl.store(ga_ptr + offs, ga.to(ga_ptr.dtype.element_ty), mask=mask)
    tl.store(gb_ptr + offs, (-ga).to(gb_ptr.dtype.element_ty), mask=mask)


def gaussian_forward(a, b, s1, s2, mode, mean_reduce):
    """Launch both stages -> fp32 ``[B]``."""
    a, b = contig(a), contig(b)
    bsz, n = rows(a)
    out = torch.empty(bsz, dtype=torch.float32, device=a.device)
    if bsz == 0:
        return out
    nck = max(n_chunks(n), 1)
    # every partial is written when the rows are non-empty; zeros only stand in for empty rows
    partials = (torch.empty if n else torch.zeros)((bsz, nck), dtype=torch.float32, device=a.device)
    if n:
        _sqdiff_partial_kernel[chunk_grid(bsz, n)](
            a, b, partials, bsz, n, nck, CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS
        )
    s1 = scalar_f32(s1)
    s2 = scalar_f32(s2) if s2 is not None else s1
    _gaussian_reduce_kernel[(bsz,)](
        partials,
        s1,
        s2,
        out,
        max(n, 1),
        nck,
        MODE=mode,
        MEAN=mean_reduce,
        LOG_SQRT_2PI=LOG_SQRT_2PI,
        NITER=n_iter(nck),
        PBLOCK=PBLOCK,
        num_warps=NUM_WARPS,
    )
    return out


def gaussian_backward(a, b, g, s, mode, mean_reduce):
    """Launch -> ``(grad_a, grad_b)`` in ``a``'s and ``b``'s dtypes; ``s`` is ``std`` or ``std_q``."""
    a, b = contig(a), contig(b)
    ga, gb = torch.empty_like(a), torch.empty_like(b)
    bsz, n = rows(a)
    if a.numel():
        _gaussian_bwd_kernel[elementwise_grid(bsz, n)](
            a,
            b,
            g.contiguous(),
            scalar_f32(s),
            ga,
            gb,
            bsz,
            n,
            MODE=mode,
            MEAN=mean_reduce,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    return ga, gb


@custom_op(f"{_NS}::gaussian_log_prob")
def gaussian_log_prob_op(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, mean_reduce: bool
) -> torch.Tensor:
    return gaussian_forward(x, mean, std, None, MODE_LOGP, mean_reduce)


@gaussian_log_prob_op.register_fake
def _(x, mean, std, mean_reduce):
    return x.new_empty((x.shape[0],), dtype=torch.float32)


@custom_op(f"{_NS}::gaussian_kl")
def gaussian_kl_op(
    mean_p: torch.Tensor, std_p: torch.Tensor, mean_q: torch.Tensor, std_q: torch.Tensor, mean_reduce: bool
) -> torch.Tensor:
    return gaussian_forward(mean_p, mean_q, std_p, std_q, MODE_KL, mean_reduce)


@gaussian_kl_op.register_fake
def _(mean_p, std_p, mean_q, std_q, mean_reduce):
    return mean_p.new_empty((mean_p.shape[0],), dtype=torch.float32)


@custom_op(f"{_NS}::gaussian_backward")
def gaussian_backward_op(
    a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, s: torch.Tensor, mode: int, mean_reduce: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return gaussian_backward(a, b, g, s, mode, mean_reduce)


@gaussian_backward_op.register_fake
def _(a, b, g, s, mode, mean_reduce):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _log_prob_setup(ctx, inputs, output):
    x, mean, std, mean_reduce = inputs
    ctx.save_for_backward(x, mean, std)
    ctx.mean_reduce = mean_reduce


def _log_prob_backward(ctx, g):
    """``out = -sum((x - m)^2) / (2 s^2) / K - ...``  =>  ``dL/dx = -g (x - m) / (s^2 K)``, ``dL/dm = -dL/dx``
    (``K = N`` for mean reduction, else 1; 0 where ``s == 0``)."""
    x, mean, std = ctx.saved_tensors
    gx, gm = gaussian_backward_op(x, mean, g, std, MODE_LOGP, ctx.mean_reduce)
    return gx, gm, None, None


def _kl_setup(ctx, inputs, output):
    mean_p, std_p, mean_q, std_q, mean_reduce = inputs
    ctx.save_for_backward(mean_p, mean_q, std_q)
    ctx.mean_reduce = mean_reduce


def _kl_backward(ctx, g):
    """``KL = sum((m_p - m_q)^2) / (2 s_q^2) / K + ...``  =>  ``dL/dm_p = g (m_p - m_q) / (s_q^2 K)``,
    ``dL/dm_q = -dL/dm_p``."""
    mean_p, mean_q, std_q = ctx.saved_tensors
    gp, gq = gaussian_backward_op(mean_p, mean_q, g, std_q, MODE_KL, ctx.mean_reduce)
    return gp, None, gq, None, None


gaussian_log_prob_op.register_autograd(_log_prob_backward, setup_context=_log_prob_setup)
gaussian_kl_op.register_autograd(_kl_backward, setup_context=_kl_setup)
