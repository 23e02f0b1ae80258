"""Element-wise ops: ``interpolate``, ``paired_interpolate``, ``euler_step``, ``dpm2_step`` (math.md §0, §1,
§6).

Four layers per op (CONVENTIONS.md): ``@triton.jit`` kernels, ``<op>_forward`` / ``<op>_backward`` launchers,
a ``torch.library.custom_op`` with ``register_fake`` and ``register_autograd`` (the hand-derived backward is
written in the docstring of its ``_<op>_backward`` function), and the functional API in ``kernels/__init__``.
Per-sample scalars are ``[B]`` fp32 device buffers read with ``tl.load``; all math is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import BLOCK, NUM_WARPS, contig, custom_op, elementwise_grid, rows, scalar_f32

_NS = "nft_kernels"


# ----------------------------------------------------------------------------------------------------------
# interpolate / paired_interpolate: x_t = (1 - t) x0 + t noise
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _interpolate_fwd_kernel(
    x0_ptr, x0l_ptr, noise_ptr, t_ptr, out_ptr, outl_ptr, B, N, PAIRED: tl.constexpr, BLOCK: tl.constexpr
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    # rows on grid axes 1 and 2 (CUDA caps axis 1 at 65535); a clamped row keeps loads in bounds
    row_id = tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    row_ok = row_id < B
    row = tl.minimum(row_id, B - 1)
    mask = tl.where(row_ok, mask, False)
    offs = tl.cast(row, tl.int64) * N + cols
    t = tl.load(t_ptr + row)
    noise = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, ((1.0 - t) * x0 + t * noise).to(out_ptr.dtype.element_ty), mask=mask)
    if PAIRED:
        x0l = tl.load(x0l_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(outl_ptr + offs, ((1.0 - t) * x0l + t * noise).to(outl_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _interpolate_bwd_kernel(
    g_ptr, gl_ptr, t_ptr, gx0_ptr, gx0l_ptr, gnoise_ptr, B, N, PAIRED: tl.constexpr, BLOCK: tl.constexpr
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    # rows on grid axes 1 and 2 (CUDA caps axis 1 at 65535); a clamped row keeps loads in bounds
    row_id = tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    row_ok = row_id < B
    row = tl.minimum(row_id, B - 1)
    mask = tl.where(row_ok, mask, False)
    offs = tl.cast(row, tl.int64) * N + cols
    t = tl.load(t_ptr + row)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(gx0_ptr + offs, ((1.0 - t) * g).to(gx0_ptr.dtype.element_ty), mask=mask)
    if PAIRED:
        gl = tl.load(gl_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(gx0l_ptr + offs, ((1.0 - t) * gl).to(gx0l_ptr.dtype.element_ty), mask=mask)
        g = g + gl
    tl.store(gnoise_ptr + offs, (t * g).to(gnoise_ptr.dtype.element_ty), mask=mask)


def interpolate_forward(x0, x0_l, noise, t):
    """Launch: ``(x_t, x_t_l)``; ``x0_l`` may be None (then ``x_t_l`` is None)."""
    x0, x0_l, noise = contig(x0), contig(x0_l), contig(noise)
    out = torch.empty_like(x0)
    out_l = torch.empty_like(x0_l) if x0_l is not None else None
    b, n = rows(x0)
    if x0.numel():
        _interpolate_fwd_kernel[elementwise_grid(b, n)](
            x0,
            x0_l if x0_l is not None else x0,
            noise,
            scalar_f32(t),
            out,
            out_l if out_l is not None else out,
            b,
            n,
            PAIRED=x0_l is not None,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    return out, out_l


def interpolate_backward(g, g_l, t, dtype_x0, dtype_x0l, dtype_noise):
    """Launch: ``(grad_x0, grad_x0_l, grad_noise)`` from the output grads (``g_l`` None when not paired)."""
    g, g_l = contig(g), contig(g_l)
    gx0 = torch.empty(g.shape, dtype=dtype_x0, device=g.device)
    gx0l = torch.empty(g.shape, dtype=dtype_x0l, device=g.device) if g_l is not None else None
    gnoise = torch.empty(g.shape, dtype=dtype_noise, device=g.device)
    b, n = rows(g)
    if g.numel():
        _interpolate_bwd_kernel[elementwise_grid(b, n)](
            g,
            g_l if g_l is not None else g,
            scalar_f32(t),
            gx0,
            gx0l if gx0l is not None else gx0,
            gnoise,
            b,
            n,
            PAIRED=g_l is not None,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    return gx0, gx0l, gnoise


def _no_scalar_grad(ctx, names, needs):
    pass


@custom_op(f"{_NS}::interpolate")
def interpolate_op(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return interpolate_forward(x0, None, noise, t)[0]


@interpolate_op.register_fake
def _(x0, noise, t):
    return x0.new_empty(x0.shape)


@custom_op(f"{_NS}::interpolate_backward")
def interpolate_backward_op(
    g: torch.Tensor, t: torch.Tensor, dtype_x0: torch.dtype, dtype_noise: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    gx0, _, gnoise = interpolate_backward(g, None, t, dtype_x0, dtype_x0, dtype_noise)
    return gx0, gnoise


@interpolate_backward_op.register_fake
def _(g, t, dtype_x0, dtype_noise):
    return g.new_empty(g.shape, dtype=dtype_x0), g.new_empty(g.shape, dtype=dtype_noise)


def _interpolate_setup(ctx, inputs, output):
    x0, noise, t = inputs
    ctx.save_for_backward(t)
    ctx.dtypes = (x0.dtype, noise.dtype)


def _interpolate_backward(ctx, g):
    """``x_t = (1 - t) x0 + t noise``  =>  ``dL/dx0 = (1 - t) g``, ``dL/dnoise = t g`` (``t`` per row)."""
    (t,) = ctx.saved_tensors
    gx0, gnoise = interpolate_backward_op(g, t, *ctx.dtypes)
    return gx0, gnoise, None


interpolate_op.register_autograd(_interpolate_backward, setup_context=_interpolate_setup)


@custom_op(f"{_NS}::paired_interpolate")
def paired_interpolate_op(
    x0_w: torch.Tensor, x0_l: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return interpolate_forward(x0_w, x0_l, noise, t)


@paired_interpolate_op.register_fake
def _(x0_w, x0_l, noise, t):
    return x0_w.new_empty(x0_w.shape), x0_l.new_empty(x0_l.shape)


@custom_op(f"{_NS}::paired_interpolate_backward")
def paired_interpolate_backward_op(
    g_w: torch.Tensor,
    g_l: torch.Tensor,
    t: torch.Tensor,
    dtype_w: torch.dtype,
    dtype_l: torch.dtype,
    dtype_noise: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return interpolate_backward(g_w, g_l, t, dtype_w, dtype_l, dtype_noise)


@paired_interpolate_backward_op.register_fake
def _(g_w, g_l, t, dtype_w, dtype_l, dtype_noise):
    return (
        g_w.new_empty(g_w.shape, dtype=dtype_w),
        g_w.new_empty(g_w.shape, dtype=dtype_l),
        g_w.new_empty(g_w.shape, dtype=dtype_noise),
    )


def _paired_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused output's grad stays None: no zero tensor to read
    x0_w, x0_l, noise, t = inputs
    ctx.save_for_backward(t)
    ctx.dtypes = (x0_w.dtype, x0_l.dtype, noise.dtype)


def _paired_backward(ctx, g_w, g_l):
    """``x_t_w = (1 - t) x0_w + t noise``, ``x_t_l = (1 - t) x0_l + t noise``  =>
    ``dL/dx0_w = (1 - t) g_w``, ``dL/dx0_l = (1 - t) g_l``, ``dL/dnoise = t (g_w + g_l)``."""
    (t,) = ctx.saved_tensors
    if g_w is None:
        g_w = torch.zeros_like(g_l)
    if g_l is None:
        g_l = torch.zeros_like(g_w)
    gw, gl, gn = paired_interpolate_backward_op(g_w, g_l, t, *ctx.dtypes)
    return gw, gl, gn, None


paired_interpolate_op.register_autograd(_paired_backward, setup_context=_paired_setup)


# ----------------------------------------------------------------------------------------------------------
# euler_step: x' = x + (sigma_next - sigma) v
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _euler_fwd_kernel(x_ptr, v_ptr, s_ptr, sn_ptr, out_ptr, B, N, BLOCK: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    # rows on grid axes 1 and 2 (CUDA caps axis 1 at 65535); a clamped row keeps loads in bounds
    row_id = tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    row_ok = row_id < B
    row = tl.minimum(row_id, B - 1)
    mask = tl.where(row_ok, mask, False)
    offs = tl.cast(row, tl.int64) * N + cols
    dt = tl.load(sn_ptr + row) - tl.load(s_ptr + row)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x + dt * v).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _euler_bwd_kernel(g_ptr, s_ptr, sn_ptr, gx_ptr, gv_ptr, B, N, BLOCK: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    # rows on grid axes 1 and 2 (CUDA caps axis 1 at 65535); a clamped row keeps loads in bounds
    row_id = tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    row_ok = row_id < B
    row = tl.minimum(row_id, B - 1)
    mask = tl.where(row_ok, mask, False)
    offs = tl.cast(row, tl.int64) * N + cols
    dt = tl.load(sn_ptr + row) - tl.load(s_ptr + row)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(gx_ptr + offs, g.to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(gv_ptr + offs, (dt * g).to(gv_ptr.dtype.element_ty), mask=mask)


def euler_step_forward(x, v, sigma, sigma_next):
    x, v = contig(x), contig(v)
    out = torch.empty_like(x)
    b, n = rows(x)
    if x.numel():
        _euler_fwd_kernel[elementwise_grid(b, n)](
            x, v, scalar_f32(sigma), scalar_f32(sigma_next), out, b, n, BLOCK=BLOCK, num_warps=NUM_WARPS
        )
    return out


def euler_step_backward(g, sigma, sigma_next, dtype_x, dtype_v):
    g = contig(g)
    gx = torch.empty(g.shape, dtype=dtype_x, device=g.device)
    gv = torch.empty(g.shape, dtype=dtype_v, device=g.device)
    b, n = rows(g)
    if g.numel():
        _euler_bwd_kernel[elementwise_grid(b, n)](
            g, scalar_f32(sigma), scalar_f32(sigma_next), gx, gv, b, n, BLOCK=BLOCK, num_warps=NUM_WARPS
        )
    return gx, gv


@custom_op(f"{_NS}::euler_step")
def euler_step_op(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    return euler_step_forward(x, v, sigma, sigma_next)


@euler_step_op.register_fake
def _(x, v, sigma, sigma_next):
    return x.new_empty(x.shape)


@custom_op(f"{_NS}::euler_step_backward")
def euler_step_backward_op(
    g: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, dtype_x: torch.dtype, dtype_v: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    return euler_step_backward(g, sigma, sigma_next, dtype_x, dtype_v)


@euler_step_backward_op.register_fake
def _(g, sigma, sigma_next, dtype_x, dtype_v):
    return g.new_empty(g.shape, dtype=dtype_x), g.new_empty(g.shape, dtype=dtype_v)


def _euler_setup(ctx, inputs, output):
    x, v, sigma, sigma_next = inputs
    ctx.save_for_backward(sigma, sigma_next)
    ctx.dtypes = (x.dtype, v.dtype)


def _euler_backward(ctx, g):
    """``x' = x + dt v`` with ``dt = sigma_next - sigma`` per row  =>  ``dL/dx = g``, ``dL/dv = dt g``."""
    sigma, sigma_next = ctx.saved_tensors
    gx, gv = euler_step_backward_op(g, sigma, sigma_next, *ctx.dtypes)
    return gx, gv, None, None


euler_step_op.register_autograd(_euler_backward, setup_context=_euler_setup)


# ----------------------------------------------------------------------------------------------------------
# dpm2_step: DPM-Solver++(2M) on rectified flow, x' = a x + b ((1 + c) D_s - c D_prev), D_s = x - sigma v
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _dpm2_coefs(s, sn, sp, HAS_PREV: tl.constexpr):
    """Per-row ``(a, b, c)`` of ``reference.dpm2_coefficients`` (fp32 scalars, no infinities)."""
    alpha = 1.0 - s
    alpha_n = 1.0 - sn
    a = sn / s
    b = alpha_n * (1.0 - sn * alpha / (alpha_n * s))
    c = a * 0.0
    if HAS_PREV:
        second = (sp > 0.0) & (sp < 1.0) & (sn > 0.0)
        safe_n = tl.where(second, sn, 0.5)
        safe_p = tl.where(second, sp, 0.25)
        safe_s = tl.where(second, s, 0.375)
        lam_n = tl.log(1.0 - safe_n) - tl.log(safe_n)
        lam_s = tl.log(1.0 - safe_s) - tl.log(safe_s)
        lam_p = tl.log(1.0 - safe_p) - tl.log(safe_p)
        c = tl.where(second, (lam_n - lam_s) / (2.0 * (lam_s - lam_p)), 0.0)
    return a, b, c


@triton.jit
def _dpm2_fwd_kernel(
    x_ptr,
    v_ptr,
    xp_ptr,
    s_ptr,
    sn_ptr,
    sp_ptr,
    out_ptr,
    d_ptr,
    B,
    N,
    HAS_PREV: tl.constexpr,
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
    s = tl.load(s_ptr + row)
    sn = tl.load(sn_ptr + row)
    sp = s
    if HAS_PREV:
        sp = tl.load(sp_ptr + row)
    a, b, c = _dpm2_coefs(s, sn, sp, HAS_PREV)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d_s = x - s * v
    d = d_s
    if HAS_PREV:
        xp = tl.load(xp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = (1.0 + c) * d_s - c * xp
    tl.store(out_ptr + offs, (a * x + b * d).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(d_ptr + offs, d_s.to(d_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dpm2_bwd_kernel(
    gxn_ptr,
    gd_ptr,
    s_ptr,
    sn_ptr,
    sp_ptr,
    gx_ptr,
    gv_ptr,
    gxp_ptr,
    B,
    N,
    HAS_PREV: tl.constexpr,
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
    s = tl.load(s_ptr + row)
    sn = tl.load(sn_ptr + row)
    sp = s
    if HAS_PREV:
        sp = tl.load(sp_ptr + row)
    a, b, c = _dpm2_coefs(s, sn, sp, HAS_PREV)
    gxn = tl.load(gxn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gd = tl.load(gd_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g_ds = b * (1.0 + c) * gxn + gd
    tl.store(gx_ptr + offs, (a * gxn + g_ds).to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(gv_ptr + offs, (-s * g_ds).to(gv_ptr.dtype.element_ty), mask=mask)
    if HAS_PREV:
        tl.store(gxp_ptr + offs, (-b * c * gxn).to(gxp_ptr.dtype.element_ty), mask=mask)


def dpm2_step_forward(x, v, sigma, sigma_next, x0_prev, sigma_prev):
    x, v, x0_prev = contig(x), contig(v), contig(x0_prev)
    has_prev = x0_prev is not None
    out, d_s = torch.empty_like(x), torch.empty_like(x)
    b, n = rows(x)
    if x.numel():
        s = scalar_f32(sigma)
        _dpm2_fwd_kernel[elementwise_grid(b, n)](
            x,
            v,
            x0_prev if has_prev else x,
            s,
            scalar_f32(sigma_next),
            scalar_f32(sigma_prev) if has_prev else s,
            out,
            d_s,
            b,
            n,
            HAS_PREV=has_prev,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    return out, d_s


def dpm2_step_backward(g_xn, g_d, sigma, sigma_next, sigma_prev, dtype_x, dtype_v, dtype_xp):
    g_xn, g_d = contig(g_xn), contig(g_d)
    has_prev = sigma_prev is not None
    gx = torch.empty(g_xn.shape, dtype=dtype_x, device=g_xn.device)
    gv = torch.empty(g_xn.shape, dtype=dtype_v, device=g_xn.device)
    gxp = torch.empty(g_xn.shape if has_prev else (0,), dtype=dtype_xp, device=g_xn.device)
    b, n = rows(g_xn)
    if g_xn.numel():
        s = scalar_f32(sigma)
        _dpm2_bwd_kernel[elementwise_grid(b, n)](
            g_xn,
            g_d,
            s,
            scalar_f32(sigma_next),
            scalar_f32(sigma_prev) if has_prev else s,
            gx,
            gv,
            gxp if has_prev else gx,
            b,
            n,
            HAS_PREV=has_prev,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    return gx, gv, gxp


@custom_op(f"{_NS}::dpm2_step")
def dpm2_step_op(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    x0_prev: torch.Tensor | None,
    sigma_prev: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return dpm2_step_forward(x, v, sigma, sigma_next, x0_prev, sigma_prev)


@dpm2_step_op.register_fake
def _(x, v, sigma, sigma_next, x0_prev, sigma_prev):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@custom_op(f"{_NS}::dpm2_step_backward")
def dpm2_step_backward_op(
    g_xn: torch.Tensor,
    g_d: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sigma_prev: torch.Tensor | None,
    dtype_x: torch.dtype,
    dtype_v: torch.dtype,
    dtype_xp: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dpm2_step_backward(g_xn, g_d, sigma, sigma_next, sigma_prev, dtype_x, dtype_v, dtype_xp)


@dpm2_step_backward_op.register_fake
def _(g_xn, g_d, sigma, sigma_next, sigma_prev, dtype_x, dtype_v, dtype_xp):
    gxp_shape = g_xn.shape if sigma_prev is not None else (0,)
    return (
        g_xn.new_empty(g_xn.shape, dtype=dtype_x),
        g_xn.new_empty(g_xn.shape, dtype=dtype_v),
        g_xn.new_empty(gxp_shape, dtype=dtype_xp),
    )


def _dpm2_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused output's grad stays None: no zero tensor to read
    x, v, sigma, sigma_next, x0_prev, sigma_prev = inputs
    ctx.has_prev = x0_prev is not None
    ctx.save_for_backward(sigma, sigma_next, sigma_prev if ctx.has_prev else None)
    ctx.dtypes = (x.dtype, v.dtype, x0_prev.dtype if ctx.has_prev else x.dtype)


def _dpm2_backward(ctx, g_xn, g_d):
    """``D_s = x - sigma v``, ``x' = a x + b ((1 + c) D_s - c D_prev)``
    (``a, b, c`` per row; ``c = 0`` first order)
    =>  with ``g_D = b (1 + c) g_x' + g_{D_s}``:  ``dL/dx = a g_x' + g_D``, ``dL/dv = -sigma g_D``,
    ``dL/dx0_prev = -b c g_x'``.
    """
    sigma, sigma_next, sigma_prev = ctx.saved_tensors
    if g_xn is None:
        g_xn = torch.zeros_like(g_d)
    if g_d is None:
        g_d = torch.zeros_like(g_xn)
    gx, gv, gxp = dpm2_step_backward_op(g_xn, g_d, sigma, sigma_next, sigma_prev, *ctx.dtypes)
    return gx, gv, None, None, (gxp if ctx.has_prev else None), None


dpm2_step_op.register_autograd(_dpm2_backward, setup_context=_dpm2_setup)
