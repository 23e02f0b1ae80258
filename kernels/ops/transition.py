"""Gaussian solver transitions ``sde_step`` / ``cps_step`` / ``ddim_step`` (math.md §1), one fused family.

All three are ``mean = A x + C v`` and ``prev = mean + S eps`` with per-row coefficients ``(A, C, S)``
computed in-kernel from ``[B]`` fp32 buffers ``(p0, p1, p2)`` and one float ``level``:

* ``KIND_SDE``  (Flow-GRPO): ``p = (sigma, sigma_next, sigma_max)``, ``level = a``;
  ``std_t = a sqrt(sigma / (1 - (sigma == 1 ? sigma_max : sigma)))``, ``dt = sigma_next - sigma``,
  ``A = 1 + std_t^2 dt / (2 sigma)``, ``C = (1 + std_t^2 (1 - sigma) / (2 sigma)) dt``,
  ``S = std_t sqrt(-dt)``.
* ``KIND_CPS``: ``p = (sigma, sigma_next, -)``, ``level = sin(a pi / 2)``; ``S = sigma_next level``,
  ``k = sqrt(max(sigma_next^2 - S^2, 0))``, ``A = (1 - sigma_next) + k``,
  ``C = -sigma (1 - sigma_next) + (1 - sigma) k`` (``mean = x0_hat (1 - sigma_next) + x1_hat k`` with
  ``x0_hat = x - sigma v``, ``x1_hat = x + (1 - sigma) v``).
* ``KIND_DDIM``: ``p = (ab_t, ab_prev, -)``, ``level = eta``, ``v`` is ``eps_hat``;
  ``S = eta sqrt(max((1 - ab_prev)/(1 - ab_t) (1 - ab_t/ab_prev), 0))``,
  ``dir = sqrt(max(1 - ab_prev - S^2, 0))``,
  ``A = sqrt(ab_prev / ab_t)``, ``C = dir - sqrt(ab_prev) sqrt(1 - ab_t) / sqrt(ab_t)``.

Two modes: *sample* (rollout: ``noise`` given; ``prev = round_to_dtype(mean + S noise)``) and *score*
(training: the stored ``prev_sample`` given).  Either way the log-prob is taken of the state *as stored*,
reduced per row with the fixed two-stage order of ``_common``, so rollout and training give the same bits.
Two log-prob forms (``LOGP``, a ``tl.constexpr``; 0 where ``S == 0``, a point mass, in both):

* ``LOGP_GAUSSIAN``: the Gaussian log-density
  ``mean_dims[-(prev - mean)^2 / (2 S^2)] - log S - log sqrt(2 pi)`` (SDE and DDIM always; CPS on request);
* ``LOGP_SQUARED``: ``-mean_dims (prev - mean)^2``, no variance, no constants: flow_grpo's ``sde_type='cps'``
  log-prob (math.md §1), the default of CPS.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    BLOCK,
    CHUNK,
    LOG_SQRT_2PI,
    MAX_GRID_1,
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
KIND_SDE, KIND_CPS, KIND_DDIM = 0, 1, 2
LOGP_GAUSSIAN, LOGP_SQUARED = 0, 1


@triton.jit
def _coefs(p0_ptr, p1_ptr, p2_ptr, row, level, KIND: tl.constexpr):
    """Per-row ``(A, C, S)`` of the transition (fp32 scalars)."""
    p0 = tl.load(p0_ptr + row)
    p1 = tl.load(p1_ptr + row)
    if KIND == 0:
        s = p0
        sn = p1
        smax = tl.load(p2_ptr + row)
        dt = sn - s
        denom = tl.where(s == 1.0, smax, s)
        std_t = level * tl.sqrt(s / (1.0 - denom))
        var_t = std_t * std_t
        a_coef = 1.0 + var_t / (2.0 * s) * dt
        c_coef = (1.0 + var_t * (1.0 - s) / (2.0 * s)) * dt
        std = std_t * tl.sqrt(-dt)
    elif KIND == 1:
        s = p0
        sn = p1
        std = sn * level
        k = tl.sqrt(tl.maximum(sn * sn - std * std, 0.0))
        a_coef = (1.0 - sn) + k
        c_coef = -s * (1.0 - sn) + (1.0 - s) * k
    else:
        ab = p0
        abp = p1
        var = (1.0 - abp) / (1.0 - ab) * (1.0 - ab / abp)
        std = level * tl.sqrt(tl.maximum(var, 0.0))
        dir_coef = tl.sqrt(tl.maximum(1.0 - abp - std * std, 0.0))
        sqrt_ab = tl.sqrt(ab)
        sqrt_abp = tl.sqrt(abp)
        a_coef = sqrt_abp / sqrt_ab
        c_coef = dir_coef - sqrt_abp * tl.sqrt(1.0 - ab) / sqrt_ab
    return a_coef, c_coef, std


@triton.jit(do_not_specialize=["B"])  # B never changes the code of a row: same bits at any batch
def _transition_fwd_kernel(
    x_ptr,
    v_ptr,
    p0_ptr,
    p1_ptr,
    p2_ptr,
    z_ptr,
    prev_ptr,
    mean_ptr,
    part_ptr,
    B,
    N,
    NCHUNK,
    level,
    KIND: tl.constexpr,
    SAMPLE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Stage 1: program ``(chunk, row)`` writes mean (and the sampled state) and a partial sum of squares."""
    chunk = tl.program_id(0)
    # rows on grid axes 1 and 2 (CUDA caps axis 1 at 65535); a clamped row keeps loads in bounds
    row_id = tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    row_ok = row_id < B
    row = tl.minimum(row_id, B - 1)
    a_coef, c_coef, std = _coefs(p0_ptr, p1_ptr, p2_ptr, row, level, KIND)
    base = tl.cast(row, tl.int64) * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, CHUNK, BLOCK):
        cols = tl.cast(chunk, tl.int64) * CHUNK + j + tl.arange(0, BLOCK)
        mask = tl.where(row_ok, cols < N, False)
        offs = base + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = a_coef * x + c_coef * v
        if SAMPLE:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            # Round to the storage dtype *before* scoring: training will score exactly these bits.
            prev = (mean + std * z).to(prev_ptr.dtype.element_ty)
            tl.store(prev_ptr + offs, prev, mask=mask)
            prev_f = prev.to(tl.float32)
        else:
            prev_f = tl.load(prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(mean_ptr + offs, mean, mask=mask)
        diff = tl.where(mask, prev_f - mean, 0.0)
        acc += diff * diff
    tl.store(part_ptr + tl.cast(row, tl.int64) * NCHUNK + chunk, tl.sum(acc, axis=0), mask=row_ok)


@triton.jit
def _transition_reduce_kernel(
    part_ptr,
    p0_ptr,
    p1_ptr,
    p2_ptr,
    logp_ptr,
    std_ptr,
    N,
    NCHUNK,
    level,
    KIND: tl.constexpr,
    LOGP: tl.constexpr,
    LOG_SQRT_2PI: tl.constexpr,
    NITER: tl.constexpr,
    PBLOCK: tl.constexpr,
):
    """Stage 2: one program per row sums its partials in a fixed order -> log_prob[row], std[row]."""
    row = tl.program_id(0).to(tl.int64)
    _, _, std = _coefs(p0_ptr, p1_ptr, p2_ptr, row, level, KIND)
    sumsq = row_sum(part_ptr + row * NCHUNK, NCHUNK, NITER, PBLOCK)
    point = std == 0.0
    if LOGP == 0:
        s = tl.where(point, 1.0, std)
        logp = -sumsq / (2.0 * s * s * N) - tl.log(s) - LOG_SQRT_2PI
    else:
        logp = -sumsq / N
    tl.store(logp_ptr + row, tl.where(point, 0.0, logp))
    tl.store(std_ptr + row, std)


@triton.jit
def _transition_bwd_kernel(
    prev_ptr,
    mean_ptr,
    gprev_ptr,
    glogp_ptr,
    gmean_ptr,
    p0_ptr,
    p1_ptr,
    p2_ptr,
    gx_ptr,
    gv_ptr,
    gz_ptr,
    B,
    N,
    level,
    KIND: tl.constexpr,
    LOGP: tl.constexpr,
    SAMPLE: tl.constexpr,
    HAS_GPREV: tl.constexpr,
    HAS_GLOGP: tl.constexpr,
    HAS_GMEAN: tl.constexpr,
    NEED_DIFF: tl.constexpr,
    NEED_XV: tl.constexpr,
    NEED_Z: tl.constexpr,
    BLOCK: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    # rows on grid axes 1 and 2 (CUDA caps axis 1 at 65535); a clamped row keeps loads in bounds
    row_id = tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    row_ok = row_id < B
    row = tl.minimum(row_id, B - 1)
    mask = tl.where(row_ok, mask, False)
    offs = tl.cast(row, tl.int64) * N + cols
    a_coef, c_coef, std = _coefs(p0_ptr, p1_ptr, p2_ptr, row, level, KIND)
    g_mean = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_GMEAN:
        g_mean += tl.load(gmean_ptr + offs, mask=mask, other=0.0)
    g_prev = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_GPREV:
        g_prev += tl.load(gprev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # lp_coef = g_logp / (S^2 N) (Gaussian) or 2 g_logp / N (squared): log_prob's gradient is
    # -lp_coef (prev - mean) w.r.t. prev and +lp_coef (prev - mean) w.r.t. mean; a point mass (S == 0) has
    # none.  NEED_DIFF: load prev / mean only where that is used.
    lp_coef = 0.0
    if HAS_GLOGP:
        if LOGP == 0:
            s = tl.where(std == 0.0, 1.0, std)
            lp_coef = tl.where(std == 0.0, 0.0, tl.load(glogp_ptr + row) / (s * s * N))
        else:
            lp_coef = tl.where(std == 0.0, 0.0, 2.0 * tl.load(glogp_ptr + row) / N)
    diff = tl.zeros([BLOCK], dtype=tl.float32)
    if NEED_DIFF:
        prev_f = tl.load(prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + offs, mask=mask, other=0.0)
        diff = prev_f - mean
    if SAMPLE:
        g_total = g_mean + g_prev
        if NEED_Z:
            tl.store(
                gz_ptr + offs,
                (std * g_prev - std * lp_coef * diff).to(gz_ptr.dtype.element_ty),
                mask=mask,
            )
    else:
        g_total = g_mean + lp_coef * diff
        if NEED_Z:
            tl.store(gz_ptr + offs, (-lp_coef * diff).to(gz_ptr.dtype.element_ty), mask=mask)
    if NEED_XV:
        tl.store(gx_ptr + offs, (a_coef * g_total).to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(gv_ptr + offs, (c_coef * g_total).to(gv_ptr.dtype.element_ty), mask=mask)


def transition_forward(x, v, p0, p1, p2, z, prev_sample, kind, level, logp_mode=LOGP_GAUSSIAN):
    """Launch both stages -> ``(prev, log_prob [B], mean fp32, std [B])``; ``prev`` is None in score mode."""
    x, v, z, prev_sample = contig(x), contig(v), contig(z), contig(prev_sample)
    sample = z is not None
    b, n = rows(x)
    mean = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    prev = torch.empty_like(x) if sample else prev_sample
    logp = torch.empty(b, dtype=torch.float32, device=x.device)
    std = torch.empty(b, dtype=torch.float32, device=x.device)
    if b == 0:
        return (prev if sample else None), logp, mean, std
    p0, p1, p2 = scalar_f32(p0), scalar_f32(p1), scalar_f32(p2)
    nck = n_chunks(n)
    partials = torch.empty((b, max(nck, 1)), dtype=torch.float32, device=x.device)
    if n:
        _transition_fwd_kernel[chunk_grid(b, n)](
            x,
            v,
            p0,
            p1,
            p2,
            z if sample else x,
            prev,
            mean,
            partials,
            b,
            n,
            nck,
            float(level),
            KIND=kind,
            SAMPLE=sample,
            CHUNK=CHUNK,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
            # No FMA contraction: ``mean`` must round identically in the sample and the score specialisation,
            # or the rollout's and the training pass's log-probs could differ in the last bit.
            enable_fp_fusion=False,
        )
    else:
        partials.zero_()
    _transition_reduce_kernel[(b,)](
        partials,
        p0,
        p1,
        p2,
        logp,
        std,
        max(n, 1),
        max(nck, 1),
        float(level),
        KIND=kind,
        LOGP=logp_mode,
        LOG_SQRT_2PI=LOG_SQRT_2PI,
        NITER=n_iter(nck),
        PBLOCK=PBLOCK,
        num_warps=NUM_WARPS,
    )
    return (prev if sample else None), logp, mean, std


def transition_backward(
    prev,
    mean,
    g_prev,
    g_logp,
    g_mean,
    p0,
    p1,
    p2,
    kind,
    level,
    logp_mode,
    sample,
    need_xv,
    need_z,
    dtype_x,
    dtype_v,
    dtype_z,
):
    """Launch -> ``(grad_x, grad_v, grad_noise_or_prev_sample)``; grads not needed come back empty ``[0]``."""
    prev, mean, g_prev, g_mean = contig(prev), contig(mean), contig(g_prev), contig(g_mean)
    b, n = rows(mean)
    dev = mean.device
    gx = torch.empty(mean.shape if need_xv else (0,), dtype=dtype_x, device=dev)
    gv = torch.empty(mean.shape if need_xv else (0,), dtype=dtype_v, device=dev)
    gz = torch.empty(mean.shape if need_z else (0,), dtype=dtype_z, device=dev)
    if mean.numel() and (need_xv or need_z):
        _transition_bwd_kernel[elementwise_grid(b, n)](
            prev,
            mean,
            g_prev if g_prev is not None else mean,
            g_logp.contiguous() if g_logp is not None else mean,
            g_mean if g_mean is not None else mean,
            scalar_f32(p0),
            scalar_f32(p1),
            scalar_f32(p2),
            gx if need_xv else mean,
            gv if need_xv else mean,
            gz if need_z else mean,
            b,
            n,
            float(level),
            KIND=kind,
            LOGP=logp_mode,
            SAMPLE=sample,
            HAS_GPREV=g_prev is not None,
            HAS_GLOGP=g_logp is not None,
            # sample mode: log_prob's two paths through mean cancel, (prev - mean) only feeds grad_noise
            NEED_DIFF=g_logp is not None and (need_z or not sample),
            HAS_GMEAN=g_mean is not None,
            NEED_XV=need_xv,
            NEED_Z=need_z,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    return gx, gv, gz


# ----------------------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------------------
@custom_op(f"{_NS}::transition_sample")
def transition_sample_op(
    x: torch.Tensor,
    v: torch.Tensor,
    p0: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    noise: torch.Tensor,
    kind: int,
    level: float,
    logp_mode: int = LOGP_GAUSSIAN,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return transition_forward(x, v, p0, p1, p2, noise, None, kind, level, logp_mode)


@transition_sample_op.register_fake
def _(x, v, p0, p1, p2, noise, kind, level, logp_mode=LOGP_GAUSSIAN):
    b = x.shape[0]
    return (
        x.new_empty(x.shape),
        x.new_empty((b,), dtype=torch.float32),
        x.new_empty(x.shape, dtype=torch.float32),
        x.new_empty((b,), dtype=torch.float32),
    )


@custom_op(f"{_NS}::transition_score")
def transition_score_op(
    x: torch.Tensor,
    v: torch.Tensor,
    p0: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    prev_sample: torch.Tensor,
    kind: int,
    level: float,
    logp_mode: int = LOGP_GAUSSIAN,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, logp, mean, std = transition_forward(x, v, p0, p1, p2, None, prev_sample, kind, level, logp_mode)
    return logp, mean, std


@transition_score_op.register_fake
def _(x, v, p0, p1, p2, prev_sample, kind, level, logp_mode=LOGP_GAUSSIAN):
    b = x.shape[0]
    return (
        x.new_empty((b,), dtype=torch.float32),
        x.new_empty(x.shape, dtype=torch.float32),
        x.new_empty((b,), dtype=torch.float32),
    )


@custom_op(f"{_NS}::transition_backward")
def transition_backward_op(
    prev: torch.Tensor,
    mean: torch.Tensor,
    g_prev: torch.Tensor | None,
    g_logp: torch.Tensor | None,
    g_mean: torch.Tensor | None,
    p0: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    kind: int,
    level: float,
    logp_mode: int,
    sample: bool,
    need_xv: bool,
    need_z: bool,
    dtype_x: torch.dtype,
    dtype_v: torch.dtype,
    dtype_z: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return transition_backward(
        prev,
        mean,
        g_prev,
        g_logp,
        g_mean,
        p0,
        p1,
        p2,
        kind,
        level,
        logp_mode,
        sample,
        need_xv,
        need_z,
        dtype_x,
        dtype_v,
        dtype_z,
    )


@transition_backward_op.register_fake
def _(
    prev,
    mean,
    g_prev,
    g_logp,
    g_mean,
    p0,
    p1,
    p2,
    kind,
    level,
    logp_mode,
    sample,
    need_xv,
    need_z,
    dtype_x,
    dtype_v,
    dtype_z,
):
    shape_xv = mean.shape if need_xv else (0,)
    return (
        mean.new_empty(shape_xv, dtype=dtype_x),
        mean.new_empty(shape_xv, dtype=dtype_v),
        mean.new_empty(mean.shape if need_z else (0,), dtype=dtype_z),
    )


_BACKWARD_DOC = """Hand-derived backward of a Gaussian transition (see the module docstring for A, C, S).

    ``mean = A x + C v``; ``d = prev - mean``; ``log_prob = -sum(d^2) / (2 S^2 N) - log S - log sqrt(2 pi)``
    (Gaussian form; ``k = 1 / (S^2 N)``) or ``-sum(d^2) / N`` (squared form; ``k = 2 / N``),
    so ``d log_prob / d prev = -k d`` and ``d log_prob / d mean = +k d`` (both 0 where S == 0).

    sample mode (``prev = mean + S noise``, rounding to the storage dtype passed straight through):
        ``G = g_mean + g_prev`` (log_prob's two paths through mean cancel),
        ``dL/dnoise = S g_prev - g_logp S k d``.
    score mode (``prev`` is the input ``prev_sample``):
        ``G = g_mean + g_logp k d``, ``dL/dprev_sample = -g_logp k d``.
    Both: ``dL/dx = A G``, ``dL/dv = C G``.  ``std`` depends only on the per-sample scalars (no grad here).
"""


def _sample_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused output's grad stays None: no zero tensor to read
    x, v, p0, p1, p2, noise, kind, level, *mode = inputs
    prev, _, mean, _ = output
    ctx.save_for_backward(prev, mean, p0, p1, p2)
    ctx.meta = (kind, level, mode[0] if mode else LOGP_GAUSSIAN, x.dtype, v.dtype, noise.dtype)


def _sample_backward(ctx, g_prev, g_logp, g_mean, g_std):
    if g_prev is None and g_logp is None and g_mean is None:
        return (None,) * 9
    prev, mean, p0, p1, p2 = ctx.saved_tensors
    kind, level, mode, dx, dv, dz = ctx.meta
    need_xv = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
    need_z = ctx.needs_input_grad[5]
    gx, gv, gz = transition_backward_op(
        prev, mean, g_prev, g_logp, g_mean, p0, p1, p2, kind, level, mode, True, need_xv, need_z, dx, dv, dz
    )
    return (
        gx if need_xv else None,
        gv if need_xv else None,
        None,
        None,
        None,
        gz if need_z else None,
        None,
        None,
        None,
    )


_sample_backward.__doc__ = _BACKWARD_DOC


def _score_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused output's grad stays None: no zero tensor to read
    x, v, p0, p1, p2, prev_sample, kind, level, *mode = inputs
    _, mean, _ = output
    ctx.save_for_backward(prev_sample, mean, p0, p1, p2)
    ctx.meta = (kind, level, mode[0] if mode else LOGP_GAUSSIAN, x.dtype, v.dtype, prev_sample.dtype)


def _score_backward(ctx, g_logp, g_mean, g_std):
    if g_logp is None and g_mean is None:
        return (None,) * 9
    prev, mean, p0, p1, p2 = ctx.saved_tensors
    kind, level, mode, dx, dv, dp = ctx.meta
    need_xv = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
    need_z = ctx.needs_input_grad[5]
    gx, gv, gz = transition_backward_op(
        prev, mean, None, g_logp, g_mean, p0, p1, p2, kind, level, mode, False, need_xv, need_z, dx, dv, dp
    )
    return (
        gx if need_xv else None,
        gv if need_xv else None,
        None,
        None,
        None,
        gz if need_z else None,
        None,
        None,
        None,
    )


_score_backward.__doc__ = _BACKWARD_DOC

transition_sample_op.register_autograd(_sample_backward, setup_context=_sample_setup)
transition_score_op.register_autograd(_score_backward, setup_context=_score_setup)


def cps_level(noise_level: float) -> float:
    """CPS's ``level`` argument: ``sin(a pi / 2)`` (a Python float hyper-parameter, not a per-step scalar)."""
    return math.sin(noise_level * math.pi / 2.0)


__all__ = [
    "KIND_SDE",
    "KIND_CPS",
    "KIND_DDIM",
    "LOGP_GAUSSIAN",
    "LOGP_SQUARED",
    "transition_sample_op",
    "transition_score_op",
    "cps_level",
    "MAX_GRID_1",
]
