"""Paired-error preference losses (math.md §6, "The fused paired-error losses"): Diffusion-DPO and MaPO in one
reduction pass forward, one element-wise pass backward (gradient w.r.t. the policy predictions only).

Per sample row ``b``: ``err_* = mean_dims (pred_* - target_*)^2`` for the winner ``w`` and the loser ``l``
(and the reference model's ``ref_*`` for DPO), then

* DPO:  ``Delta = (err_w - err_w_ref) - (err_l - err_l_ref)``, ``term = softplus(temp Delta)``
  (``= -logsigmoid(-temp Delta)``; ``temp = beta / 2`` in the Salesforce convention, ``beta`` in diffusers');
* MaPO: ``f(x) = x / (e^x - 1)``, ``z = T (f(s err_w) - f(s err_l))``, ``term = err_w + beta softplus(-z)``;

and ``loss = mean_b term``.  Stage 1 (program per ``(chunk, row)``) writes two (MaPO) or four (DPO) partial
sums of squares per chunk; stage 2 (one program per row, fixed order) forms the row's errors, its term and
``d term / d err_w``, ``d term / d err_l`` (saved for the backward); stage 3 (one program) averages the terms
in a fixed order.  No atomics: bit-identical run after run, and a row's errors do not depend on its batch.
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
)
from .nft import _batch_mean_kernel

_NS = "nft_kernels"
FORM_DPO = 0
FORM_MAPO = 1
# below this argument MaPO's f and g are evaluated by their Taylor series (no cancellation in e^x - 1)
MAPO_SERIES_BELOW = 0.5


@triton.jit(do_not_specialize=["B"])  # B never changes the code of a row: same bits at any batch
def _pref_partial_kernel(
    pw_ptr,
    pl_ptr,
    tw_ptr,
    tlo_ptr,
    rw_ptr,
    rl_ptr,
    part_ptr,
    B,
    N,
    NCHUNK,
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
    q_w = tl.zeros([BLOCK], dtype=tl.float32)
    q_l = tl.zeros([BLOCK], dtype=tl.float32)
    q_wr = tl.zeros([BLOCK], dtype=tl.float32)
    q_lr = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, CHUNK, BLOCK):
        cols = tl.cast(chunk, tl.int64) * CHUNK + j + tl.arange(0, BLOCK)
        mask = tl.where(row_ok, cols < N, False)
        offs = base + cols
        tw = tl.load(tw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tlo = tl.load(tlo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d_w = tl.load(pw_ptr + offs, mask=mask, other=0.0).to(tl.float32) - tw
        d_l = tl.load(pl_ptr + offs, mask=mask, other=0.0).to(tl.float32) - tlo
        q_w += d_w * d_w
        q_l += d_l * d_l
        if HAS_REF:
            d_wr = tl.load(rw_ptr + offs, mask=mask, other=0.0).to(tl.float32) - tw
            d_lr = tl.load(rl_ptr + offs, mask=mask, other=0.0).to(tl.float32) - tlo
            q_wr += d_wr * d_wr
            q_lr += d_lr * d_lr
    out = part_ptr + tl.cast(row, tl.int64) * NCHUNK + chunk
    tl.store(out, tl.sum(q_w, axis=0), mask=row_ok)
    tl.store(out + plane, tl.sum(q_l, axis=0), mask=row_ok)
    if HAS_REF:
        tl.store(out + 2 * plane, tl.sum(q_wr, axis=0), mask=row_ok)
        tl.store(out + 3 * plane, tl.sum(q_lr, axis=0), mask=row_ok)


@triton.jit
def _log1p_small(e):
    """``log(1 + e)`` for ``e`` in ``[0, 1]`` to a few ulps (Kahan: ``log(u) e / (u - 1)``, ``u = 1 + e``);
    ``tl.math`` has no ``log1p`` the interpreter runs."""
    u = 1.0 + e
    d = u - 1.0
    return tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _softplus(x):
    """``log(1 + e^x) = -logsigmoid(-x)``, without overflow."""
    return tl.maximum(x, 0.0) + _log1p_small(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid_neg(z):
    """``sigmoid(-z)``, without overflow."""
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0.0, e / (1.0 + e), 1.0 / (1.0 + e))


@triton.jit
def _mapo_f_g(x):
    """MaPO's ``f(x) = x / (e^x - 1)`` and ``g(x) = 1 / (1 - e^-x) - 1 / x`` (``f' = -f g``) for ``x >= 0``.

    Below 0.5 by the Bernoulli series (``f = 1 - x/2 + x^2/12 - x^4/720 + x^6/30240``,
    ``g = 1/2 + x/12 - x^3/720 + x^5/30240``, truncation < 2e-8 relative), above it in closed form with
    ``e = e^-x`` (``1 - e >= 0.39``: no cancellation, and no overflow for large ``x``)."""
    small = x < 0.5
    x2 = x * x
    p = 0.08333333333333333 + x2 * (-0.001388888888888889 + x2 * 3.306878306878307e-05)
    f_small = 1.0 + x * (-0.5 + x * p)
    g_small = 0.5 + x * p
    xl = tl.where(small, 1.0, x)
    e = tl.exp(-xl)
    f_large = xl * e / (1.0 - e)
    g_large = 1.0 / (1.0 - e) - 1.0 / xl
    return tl.where(small, f_small, f_large), tl.where(small, g_small, g_large)


@triton.jit
def _pref_row_kernel(
    part_ptr,
    err_ptr,
    term_ptr,
    dterm_ptr,
    B,
    N,
    NCHUNK,
    temp,
    beta,
    snr,
    n_timesteps,
    FORM: tl.constexpr,
    NITER: tl.constexpr,
    PBLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    plane = tl.cast(B, tl.int64) * NCHUNK
    base = part_ptr + row * NCHUNK
    err_w = row_sum(base, NCHUNK, NITER, PBLOCK) / N
    err_l = row_sum(base + plane, NCHUNK, NITER, PBLOCK) / N
    tl.store(err_ptr + row, err_w)
    tl.store(err_ptr + B + row, err_l)
    if FORM == 0:  # Diffusion-DPO
        err_wr = row_sum(base + 2 * plane, NCHUNK, NITER, PBLOCK) / N
        err_lr = row_sum(base + 3 * plane, NCHUNK, NITER, PBLOCK) / N
        tl.store(err_ptr + 2 * B + row, err_wr)
        tl.store(err_ptr + 3 * B + row, err_lr)
        z = -temp * ((err_w - err_wr) - (err_l - err_lr))
        term = _softplus(-z)
        d_w = temp * _sigmoid_neg(z)
        d_l = -d_w
    else:  # MaPO
        f_w, g_w = _mapo_f_g(snr * err_w)
        f_l, g_l = _mapo_f_g(snr * err_l)
        z = n_timesteps * (f_w - f_l)
        term = err_w + beta * _softplus(-z)
        c = beta * _sigmoid_neg(z) * n_timesteps * snr
        d_w = 1.0 + c * f_w * g_w
        d_l = -c * f_l * g_l
    tl.store(term_ptr + row, term)
    tl.store(dterm_ptr + row, d_w)
    tl.store(dterm_ptr + B + row, d_l)


@triton.jit
def _pref_bwd_kernel(
    gloss_ptr,
    gerr_ptr,
    dterm_ptr,
    pw_ptr,
    pl_ptr,
    tw_ptr,
    tlo_ptr,
    gw_ptr,
    gl_ptr,
    B,
    N,
    HAS_GLOSS: tl.constexpr,
    HAS_GERR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # rows on grid axes 1 and 2 (CUDA caps axis 1 at 65535); a clamped row keeps loads in bounds
    row_id = tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    row_ok = row_id < B
    row = tl.minimum(row_id, B - 1)
    mask = tl.where(row_ok, cols < N, False)
    offs = tl.cast(row, tl.int64) * N + cols
    c_w = 0.0
    c_l = 0.0
    if HAS_GLOSS:
        g = tl.load(gloss_ptr) / B
        c_w = g * tl.load(dterm_ptr + row)
        c_l = g * tl.load(dterm_ptr + B + row)
    if HAS_GERR:
        c_w = c_w + tl.load(gerr_ptr + row)
        c_l = c_l + tl.load(gerr_ptr + B + row)
    c_w = c_w * 2.0 / N
    c_l = c_l * 2.0 / N
    d_w = tl.load(pw_ptr + offs, mask=mask, other=0.0).to(tl.float32) - tl.load(
        tw_ptr + offs, mask=mask, other=0.0
    ).to(tl.float32)
    d_l = tl.load(pl_ptr + offs, mask=mask, other=0.0).to(tl.float32) - tl.load(
        tlo_ptr + offs, mask=mask, other=0.0
    ).to(tl.float32)
    tl.store(gw_ptr + offs, (c_w * d_w).to(gw_ptr.dtype.element_ty), mask=mask)
    tl.store(gl_ptr + offs, (c_l * d_l).to(gl_ptr.dtype.element_ty), mask=mask)


def preference_loss_forward(
    pred_w, pred_l, target_w, target_l, ref_w, ref_l, form, temp, beta, snr, n_timesteps
):
    """Launch the three stages -> ``(loss 0-dim fp32, errs [K, B] fp32, dterm [2, B] fp32)``.

    ``errs`` rows: ``err_w, err_l`` (and ``err_w_ref, err_l_ref`` for DPO, ``K = 4``); ``dterm`` rows:
    ``d term_b / d err_w``, ``d term_b / d err_l``."""
    pred_w, pred_l, target_w, target_l = contig(pred_w), contig(pred_l), contig(target_w), contig(target_l)
    ref_w, ref_l = contig(ref_w), contig(ref_l)
    has_ref = form == FORM_DPO
    b, n = rows(pred_w)
    dev = pred_w.device
    k = 4 if has_ref else 2
    f32 = torch.float32
    loss = torch.empty((), dtype=f32, device=dev)
    errs = torch.empty((k, b), dtype=f32, device=dev)
    dterm = torch.empty((2, b), dtype=f32, device=dev)
    terms = torch.empty(b, dtype=f32, device=dev)
    nck = max(n_chunks(n), 1)
    # every partial is written when the rows are non-empty; zeros only stand in for empty rows
    partials = (torch.empty if n else torch.zeros)((k, b, nck), dtype=f32, device=dev)
    if pred_w.numel():
        _pref_partial_kernel[chunk_grid(b, n)](
            pred_w,
            pred_l,
            target_w,
            target_l,
            ref_w if has_ref else pred_w,
            ref_l if has_ref else pred_l,
            partials,
            b,
            n,
            nck,
            HAS_REF=has_ref,
            CHUNK=CHUNK,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    if b:
        _pref_row_kernel[(b,)](
            partials,
            errs,
            terms,
            dterm,
            b,
            max(n, 1),
            nck,
            float(temp),
            float(beta),
            float(snr),
            float(n_timesteps),
            FORM=form,
            NITER=n_iter(nck),
            PBLOCK=PBLOCK,
            num_warps=NUM_WARPS,
        )
    _batch_mean_kernel[(1,)](terms, loss, b, NITER=n_iter(b), PBLOCK=PBLOCK, num_warps=NUM_WARPS)
    return loss, errs, dterm


def preference_loss_backward(g_loss, g_errs, dterm, pred_w, pred_l, target_w, target_l):
    """``(d pred_w, d pred_l)`` in the predictions' dtypes from the upstream grads of ``loss`` and ``errs``
    (either may be None)."""
    pred_w, pred_l, target_w, target_l = contig(pred_w), contig(pred_l), contig(target_w), contig(target_l)
    gw = torch.empty_like(pred_w)
    gl = torch.empty_like(pred_l)
    b, n = rows(pred_w)
    if pred_w.numel():
        has_gloss, has_gerr = g_loss is not None, g_errs is not None
        _pref_bwd_kernel[elementwise_grid(b, n)](
            g_loss.float().contiguous() if has_gloss else dterm,
            g_errs.float().contiguous() if has_gerr else dterm,
            dterm,
            pred_w,
            pred_l,
            target_w,
            target_l,
            gw,
            gl,
            b,
            n,
            HAS_GLOSS=has_gloss,
            HAS_GERR=has_gerr,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    return gw, gl


@custom_op(f"{_NS}::preference_loss")
def preference_loss_op(
    pred_w: torch.Tensor,
    pred_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    ref_w: torch.Tensor | None,
    ref_l: torch.Tensor | None,
    form: int,
    temp: float,
    beta: float,
    snr: float,
    n_timesteps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return preference_loss_forward(
        pred_w, pred_l, target_w, target_l, ref_w, ref_l, form, temp, beta, snr, n_timesteps
    )


@preference_loss_op.register_fake
def _(pred_w, pred_l, target_w, target_l, ref_w, ref_l, form, temp, beta, snr, n_timesteps):
    b = pred_w.shape[0]
    k = 4 if form == FORM_DPO else 2
    f32 = torch.float32
    return (
        pred_w.new_empty((), dtype=f32),
        pred_w.new_empty((k, b), dtype=f32),
        pred_w.new_empty((2, b), dtype=f32),
    )


@custom_op(f"{_NS}::preference_loss_backward")
def preference_loss_backward_op(
    g_loss: torch.Tensor | None,
    g_errs: torch.Tensor | None,
    dterm: torch.Tensor,
    pred_w: torch.Tensor,
    pred_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return preference_loss_backward(g_loss, g_errs, dterm, pred_w, pred_l, target_w, target_l)


@preference_loss_backward_op.register_fake
def _(g_loss, g_errs, dterm, pred_w, pred_l, target_w, target_l):
    return pred_w.new_empty(pred_w.shape), pred_l.new_empty(pred_l.shape)


def _pref_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused output's grad stays None: no zero tensor to read
    pred_w, pred_l, target_w, target_l = inputs[:4]
    _, _, dterm = output
    ctx.mark_non_differentiable(dterm)
    ctx.save_for_backward(pred_w, pred_l, target_w, target_l, dterm)


def _pref_backward(ctx, g_loss, g_errs, g_dterm):
    """Gradient w.r.t. ``pred_w`` and ``pred_l`` only (targets: refused by the API; the reference model's
    predictions and errors are stop-gradients).

    With ``d_* = pred_* - target_*`` (row ``b``, ``N`` elements per row), ``d err_* / d pred_* = 2 d_* / N``
    and ``loss = (1/B) sum_b term_b``:
        ``dL/dpred_w = (2 / N) (g_loss t_w / B + g_err_w) d_w``,
        ``dL/dpred_l = (2 / N) (g_loss t_l / B + g_err_l) d_l``,
    where ``t_* = d term_b / d err_*`` come from the forward's row stage:

    * DPO (``term = softplus(temp Delta)``, ``d softplus(x)/dx = sigmoid(x)``):
      ``t_w = temp sigmoid(temp Delta)``, ``t_l = -t_w``;
    * MaPO (``term = err_w + beta softplus(-z)``, ``z = T (f(s err_w) - f(s err_l))``, ``f' = -f g``):
      ``t_w = 1 + beta sigmoid(-z) T s f(s err_w) g(s err_w)``,
      ``t_l = -beta sigmoid(-z) T s f(s err_l) g(s err_l)``.

    ``g_err_*`` is the upstream gradient of the returned per-sample errors (rows 0 and 1 of ``errs``; the
    reference errors, rows 2 and 3, are returned detached).
    """
    pred_w, pred_l, target_w, target_l, dterm = ctx.saved_tensors
    if g_loss is None and g_errs is None:
        return (None,) * 11
    gw, gl = preference_loss_backward_op(g_loss, g_errs, dterm, pred_w, pred_l, target_w, target_l)
    return (gw, gl) + (None,) * 9


preference_loss_op.register_autograd(_pref_backward, setup_context=_pref_setup)
