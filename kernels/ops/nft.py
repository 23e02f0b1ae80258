"""DiffusionNFT loss (math.md §2 steps 5-6): one fused pass forward, one element-wise pass backward
(gradient w.r.t. ``v`` only).

With ``u = noise - x0``, ``v_pos = beta v + (1 - beta) v_old``, ``v_neg = (1 + beta) v_old - beta v``:

* adaptive: ``d_* = t (u - v_*)``, ``w_* = max(mean|d_*|, 1e-5)`` (no grad), ``L_* = mean(d_*^2) / w_*``;
* none:     ``L_* = mean((v_* - u)^2)``;
* ``loss = (1/B) sum_b [ m (r L_pos + (1 - r) L_neg) / beta + kl_coef mean_dims (v - v_ref)^2 ]``.

Stage 1 (program per ``(chunk, row)``) writes five partial sums per chunk
(``sum|d_pos|, sum d_pos^2, sum|d_neg|, sum d_neg^2, sum (v - v_ref)^2``); stage 2 (one program per row,
fixed order) forms the row's term and its weights; stage 3 (one program) averages the row terms in a fixed
order.  No atomics: the loss is bit-identical run after run, and each row's weights do not depend on the
batch it is in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    BLOCK,
    CHUNK,
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
_N_PARTIALS = 5


@triton.jit(do_not_specialize=["B"])  # B never changes the code of a row: same bits at any batch
def _nft_partial_kernel(
    v_ptr,
    vo_ptr,
    x0_ptr,
    z_ptr,
    vr_ptr,
    t_ptr,
    part_ptr,
    B,
    N,
    NCHUNK,
    beta,
    ADAPTIVE: tl.constexpr,
    HAS_REF: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    plane = tl.cast(B, tl.int64) * NCHUNK
    # rows on grid axes 1 and 2 (CUDA caps axis 1 at 65535); a clamped row keeps loads in bounds
    row_id = tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    row_ok = row_id < B
    row = tl.minimum(row_id, B - 1)
    base = tl.cast(row, tl.int64) * N
    t = tl.load(t_ptr + row)
    a_pos = tl.zeros([BLOCK], dtype=tl.float32)
    q_pos = tl.zeros([BLOCK], dtype=tl.float32)
    a_neg = tl.zeros([BLOCK], dtype=tl.float32)
    q_neg = tl.zeros([BLOCK], dtype=tl.float32)
    q_kl = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, CHUNK, BLOCK):
        cols = tl.cast(chunk, tl.int64) * CHUNK + j + tl.arange(0, BLOCK)
        mask = tl.where(row_ok, cols < N, False)
        offs = base + cols
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vo = tl.load(vo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32) - tl.load(
            x0_ptr + offs, mask=mask, other=0.0
        ).to(tl.float32)
        v_pos = beta * v + (1.0 - beta) * vo
        v_neg = (1.0 + beta) * vo - beta * v
        if ADAPTIVE:
            d_pos = t * (u - v_pos)
            d_neg = t * (u - v_neg)
        else:
            d_pos = v_pos - u
            d_neg = v_neg - u
        d_pos = tl.where(mask, d_pos, 0.0)
        d_neg = tl.where(mask, d_neg, 0.0)
        a_pos += tl.abs(d_pos)
        q_pos += d_pos * d_pos
        a_neg += tl.abs(d_neg)
        q_neg += d_neg * d_neg
        if HAS_REF:
            dk = tl.where(mask, v - tl.load(vr_ptr + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
            q_kl += dk * dk
    out = part_ptr + tl.cast(row, tl.int64) * NCHUNK + chunk
    tl.store(out, tl.sum(a_pos, axis=0), mask=row_ok)
    tl.store(out + plane, tl.sum(q_pos, axis=0), mask=row_ok)
    tl.store(out + 2 * plane, tl.sum(a_neg, axis=0), mask=row_ok)
    tl.store(out + 3 * plane, tl.sum(q_neg, axis=0), mask=row_ok)
    tl.store(out + 4 * plane, tl.sum(q_kl, axis=0), mask=row_ok)


@triton.jit
def _nft_row_kernel(
    part_ptr,
    r_ptr,
    row_ptr,
    wpos_ptr,
    wneg_ptr,
    B,
    N,
    NCHUNK,
    beta,
    clip,
    kl_coef,
    ADAPTIVE: tl.constexpr,
    HAS_REF: tl.constexpr,
    NITER: tl.constexpr,
    PBLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    plane = tl.cast(B, tl.int64) * NCHUNK
    base = part_ptr + row * NCHUNK
    q_pos = row_sum(base + plane, NCHUNK, NITER, PBLOCK) / N
    q_neg = row_sum(base + 3 * plane, NCHUNK, NITER, PBLOCK) / N
    if ADAPTIVE:
        w_pos = tl.maximum(row_sum(base, NCHUNK, NITER, PBLOCK) / N, 1e-5)
        w_neg = tl.maximum(row_sum(base + 2 * plane, NCHUNK, NITER, PBLOCK) / N, 1e-5)
    else:
        w_pos = q_pos * 0.0 + 1.0
        w_neg = q_neg * 0.0 + 1.0
    r = tl.load(r_ptr + row)
    term = clip * (r * (q_pos / w_pos) + (1.0 - r) * (q_neg / w_neg)) / beta
    if HAS_REF:
        term += kl_coef * (row_sum(base + 4 * plane, NCHUNK, NITER, PBLOCK) / N)
    tl.store(row_ptr + row, term)
    tl.store(wpos_ptr + row, w_pos)
    tl.store(wneg_ptr + row, w_neg)


@triton.jit
def _batch_mean_kernel(row_ptr, out_ptr, B, NITER: tl.constexpr, PBLOCK: tl.constexpr):
    tl.store(out_ptr, row_sum(row_ptr, B, NITER, PBLOCK) / B)


@triton.jit
def _nft_bwd_kernel(
    g_ptr,
    v_ptr,
    vo_ptr,
    x0_ptr,
    z_ptr,
    vr_ptr,
    t_ptr,
    r_ptr,
    wpos_ptr,
    wneg_ptr,
    gv_ptr,
    B,
    N,
    beta,
    clip,
    kl_coef,
    ADAPTIVE: tl.constexpr,
    HAS_REF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    scale = tl.load(g_ptr) * 2.0 / (N * B)
    # rows on grid axes 1 and 2 (CUDA caps axis 1 at 65535); a clamped row keeps loads in bounds
    row_id = tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    row_ok = row_id < B
    row = tl.minimum(row_id, B - 1)
    mask = tl.where(row_ok, mask, False)
    offs = tl.cast(row, tl.int64) * N + cols
    t = tl.load(t_ptr + row)
    r = tl.load(r_ptr + row)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    vo = tl.load(vo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32) - tl.load(
        x0_ptr + offs, mask=mask, other=0.0
    ).to(tl.float32)
    v_pos = beta * v + (1.0 - beta) * vo
    v_neg = (1.0 + beta) * vo - beta * v
    if ADAPTIVE:
        w_pos = tl.load(wpos_ptr + row)
        w_neg = tl.load(wneg_ptr + row)
        gv = clip * t * ((1.0 - r) * (t * (u - v_neg)) / w_neg - r * (t * (u - v_pos)) / w_pos)
    else:
        gv = clip * (r * (v_pos - u) - (1.0 - r) * (v_neg - u))
    if HAS_REF:
        gv += kl_coef * (v - tl.load(vr_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    tl.store(gv_ptr + offs, (scale * gv).to(gv_ptr.dtype.element_ty), mask=mask)


def nft_loss_forward(v, v_old, x0, noise, t, r, v_ref, beta, clip, adaptive, kl_coef):
    """Launch the three stages -> ``(loss 0-dim fp32, w_pos [B], w_neg [B])``."""
    v, v_old, x0, noise, v_ref = contig(v), contig(v_old), contig(x0), contig(noise), contig(v_ref)
    has_ref = v_ref is not None
    b, n = rows(v)
    dev = v.device
    loss = torch.empty((), dtype=torch.float32, device=dev)
    w_pos = torch.empty(b, dtype=torch.float32, device=dev)
    w_neg = torch.empty(b, dtype=torch.float32, device=dev)
    row_terms = torch.empty(b, dtype=torch.float32, device=dev)
    nck = max(n_chunks(n), 1)
    # every partial is written when the rows are non-empty; zeros only stand in for empty rows
    partials = (torch.empty if n else torch.zeros)((_N_PARTIALS, b, nck), dtype=torch.float32, device=dev)
    if v.numel():
        _nft_partial_kernel[chunk_grid(b, n)](
            v,
            v_old,
            x0,
            noise,
            v_ref if has_ref else v,
            scalar_f32(t),
            partials,
            b,
            n,
            nck,
            float(beta),
            ADAPTIVE=adaptive,
            HAS_REF=has_ref,
            CHUNK=CHUNK,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    if b:
        _nft_row_kernel[(b,)](
            partials,
            scalar_f32(r),
            row_terms,
            w_pos,
            w_neg,
            b,
            max(n, 1),
            nck,
            float(beta),
            float(clip),
            float(kl_coef),
            ADAPTIVE=adaptive,
            HAS_REF=has_ref,
            NITER=n_iter(nck),
            PBLOCK=PBLOCK,
            num_warps=NUM_WARPS,
        )
    _batch_mean_kernel[(1,)](row_terms, loss, b, NITER=n_iter(b), PBLOCK=PBLOCK, num_warps=NUM_WARPS)
    return loss, w_pos, w_neg


def nft_loss_backward(g, v, v_old, x0, noise, t, r, v_ref, w_pos, w_neg, beta, clip, adaptive, kl_coef):
    v, v_old, x0, noise, v_ref = contig(v), contig(v_old), contig(x0), contig(noise), contig(v_ref)
    has_ref = v_ref is not None
    gv = torch.empty_like(v)
    b, n = rows(v)
    if v.numel():
        _nft_bwd_kernel[elementwise_grid(b, n)](
            g.contiguous(),
            v,
            v_old,
            x0,
            noise,
            v_ref if has_ref else v,
            scalar_f32(t),
            scalar_f32(r),
            w_pos,
            w_neg,
            gv,
            b,
            n,
            float(beta),
            float(clip),
            float(kl_coef),
            ADAPTIVE=adaptive,
            HAS_REF=has_ref,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    return gv


@custom_op(f"{_NS}::nft_loss")
def nft_loss_op(
    v: torch.Tensor,
    v_old: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    v_ref: torch.Tensor | None,
    beta: float,
    clip: float,
    adaptive: bool,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return nft_loss_forward(v, v_old, x0, noise, t, r, v_ref, beta, clip, adaptive, kl_coef)


@nft_loss_op.register_fake
def _(v, v_old, x0, noise, t, r, v_ref, beta, clip, adaptive, kl_coef):
    b = v.shape[0]
    f32 = torch.float32
    return v.new_empty((), dtype=f32), v.new_empty((b,), dtype=f32), v.new_empty((b,), dtype=f32)


@custom_op(f"{_NS}::nft_loss_backward")
def nft_loss_backward_op(
    g: torch.Tensor,
    v: torch.Tensor,
    v_old: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    v_ref: torch.Tensor | None,
    w_pos: torch.Tensor,
    w_neg: torch.Tensor,
    beta: float,
    clip: float,
    adaptive: bool,
    kl_coef: float,
) -> torch.Tensor:
    return nft_loss_backward(g, v, v_old, x0, noise, t, r, v_ref, w_pos, w_neg, beta, clip, adaptive, kl_coef)


@nft_loss_backward_op.register_fake
def _(g, v, v_old, x0, noise, t, r, v_ref, w_pos, w_neg, beta, clip, adaptive, kl_coef):
    return v.new_empty(v.shape)


def _nft_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused output's grad stays None: no zero tensor to read
    v, v_old, x0, noise, t, r, v_ref, beta, clip, adaptive, kl_coef = inputs
    _, w_pos, w_neg = output
    ctx.save_for_backward(v, v_old, x0, noise, t, r, v_ref, w_pos, w_neg)
    ctx.hyper = (beta, clip, adaptive, kl_coef)


def _nft_backward(ctx, g_loss, g_wpos, g_wneg):
    """Gradient w.r.t. ``v`` only (``v_old``, ``v_ref`` and the weights are stop-gradients).

    ``d v_pos / d v = beta``, ``d v_neg / d v = -beta``.  adaptive (``d_* = t (u - v_*)``):
        ``dL/dv = g 2 / (N B) [ m t ((1 - r) d_neg / w_neg - r d_pos / w_pos) + kl (v - v_ref) ]``;
    none: ``dL/dv = g 2 / (N B) [ m (r (v_pos - u) - (1 - r) (v_neg - u)) + kl (v - v_ref) ]``
    (the ``1/beta`` of the loss cancels the ``beta`` of ``d v_* / d v``).
    """
    v, v_old, x0, noise, t, r, v_ref, w_pos, w_neg = ctx.saved_tensors
    if g_loss is None:
        return (None,) * 11
    gv = nft_loss_backward_op(g_loss, v, v_old, x0, noise, t, r, v_ref, w_pos, w_neg, *ctx.hyper)
    return (gv,) + (None,) * 10


nft_loss_op.register_autograd(_nft_backward, setup_context=_nft_setup)
