"""DiT fast-path ops: the memory-bound chains of an SD3 / FLUX transformer block, forward and backward.

* ``ada_layer_norm``: ``LayerNorm(x) * (1 + scale) + shift`` (LayerNorm without affine, adaLN modulation with
  per-sample ``[B, C]`` scale / shift broadcast over tokens); one pass over ``x`` instead of four.
* ``gated_residual``: ``x + gate * y`` with a per-sample ``[B, C]`` gate broadcast over tokens.
* ``rms_norm``: ``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim (the QK norm of SD3.5 / FLUX).
* ``rotary_emb``: FLUX's rotary embedding on interleaved pairs (diffusers ``apply_rotary_emb`` with
  ``use_real=True, use_real_unbind_dim=-1``).

Four layers per op (CONVENTIONS.md): ``@triton.jit`` kernels, launchers, a ``torch.library.custom_op`` with
``register_fake`` / ``register_autograd`` (hand-derived backward in the docstring of ``_<op>_backward``),
and the functional API in ``kernels/__init__``.  Math in fp32; per-channel reductions over tokens (the
gradients of scale / shift / gate / weight) are two-stage: fp32 partials per token block, then a
fixed-order sum -- no atomics, the same numbers run after run.  No host reads: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import contig, custom_op

_NS = "nft_kernels"
MAX_TOKENS_PER_PROGRAM = 64  # tokens one backward program walks through (its share of the per-channel sums)
TARGET_PROGRAMS = 1024  # enough backward programs to keep every SM of an H100 / H200 streaming
ROWS_PER_PROGRAM = 16  # rows of a head-dim-wide op (rms_norm, rotary_emb) per program


def empty_grad(device) -> torch.Tensor:
    """Stands in for a gradient that is not computed (custom ops return tensors, not None)."""
    return torch.empty(0, device=device)


def tokens_per_program(b: int, seq: int) -> int:
    """A power of two in [4, 64]: about ``TARGET_PROGRAMS`` backward programs over the ``b * seq`` token rows
    (a ``constexpr``: a handful of values, each compiled once)."""
    want = max(1, (b * seq) // TARGET_PROGRAMS)
    return max(4, min(MAX_TOKENS_PER_PROGRAM, 1 << (want.bit_length() - 1)))


def _warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


# ----------------------------------------------------------------------------------------------------------
# ada_layer_norm: y = LN(x) (1 + scale[b]) + shift[b]
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _ada_ln_fwd_kernel(
    x_ptr, scale_ptr, shift_ptr, y_ptr, mean_ptr, rstd_ptr, L, C, eps, BLOCK_C: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)  # token row in [0, B * L)
    b = row // L
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(x_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    s = tl.load(scale_ptr + b * C + cols, mask=mask, other=0.0).to(tl.float32)
    sh = tl.load(shift_ptr + b * C + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * (1.0 + s) + sh
    tl.store(y_ptr + row * C + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _ada_ln_bwd_kernel(
    g_ptr,
    x_ptr,
    scale_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dpart_ptr,
    L,
    C,
    NBLK,
    MOD_GRAD: tl.constexpr,
    TOK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    s1 = 1.0 + tl.load(scale_ptr + b * C + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_s = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(TOK):
        tok = blk * TOK + i
        row = b * L + tl.minimum(tok, L - 1)
        mask = tl.where(tok < L, cmask, False)
        g = tl.load(g_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        n = tl.where(mask, (x - mean) * rstd, 0.0)
        dn = g * s1
        c1 = tl.sum(dn, axis=0) / C
        c2 = tl.sum(dn * n, axis=0) / C
        dx = rstd * (dn - c1 - n * c2)
        tl.store(dx_ptr + row * C + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if MOD_GRAD:
            acc_s += g * n
            acc_b += g
    if MOD_GRAD:
        base = (b * NBLK + blk) * C
        tl.store(dpart_ptr + base + cols, acc_s, mask=cmask)
        tl.store(dpart_ptr + tl.num_programs(1).to(tl.int64) * NBLK * C + base + cols, acc_b, mask=cmask)


def ada_layer_norm_forward(x, scale, shift, eps):
    """Launch -> ``(y [B, L, C] x.dtype, mean [B*L] fp32, rstd [B*L] fp32)``."""
    x, scale, shift = contig(x), contig(scale), contig(shift)
    b, seq, c = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(b * seq, dtype=torch.float32, device=x.device)
    rstd = torch.empty(b * seq, dtype=torch.float32, device=x.device)
    if x.numel():
        block_c = triton.next_power_of_2(c)
        _ada_ln_fwd_kernel[(b * seq,)](
            x, scale, shift, y, mean, rstd, seq, c, float(eps), BLOCK_C=block_c, num_warps=_warps(block_c)
        )
    return y, mean, rstd


def ada_layer_norm_backward(g, x, scale, mean, rstd, mod_grad, dtype_scale, dtype_shift):
    """Launch -> ``(dx, dscale [B, C] or empty, dshift [B, C] or empty)``."""
    g, x, scale = contig(g), contig(x), contig(scale)
    b, seq, c = x.shape
    dx = torch.empty_like(x)
    tok = tokens_per_program(b, seq)
    nblk = triton.cdiv(seq, tok) if seq else 0
    parts = torch.empty((2, b, max(nblk, 1), c) if mod_grad else (0,), dtype=torch.float32, device=x.device)
    if x.numel():
        block_c = triton.next_power_of_2(c)
        _ada_ln_bwd_kernel[(nblk, b)](
            g,
            x,
            scale,
            mean,
            rstd,
            dx,
            parts,
            seq,
            c,
            nblk,
            MOD_GRAD=mod_grad,
            TOK=tok,
            BLOCK_C=block_c,
            num_warps=_warps(block_c),
        )
    if not mod_grad:
        return dx, empty_grad(x.device), empty_grad(x.device)
    if not x.numel():
        parts.zero_()
    # fixed-order sums over the token blocks (two separate tensors: custom-op outputs must not alias)
    return dx, parts[0].sum(dim=1).to(dtype_scale), parts[1].sum(dim=1).to(dtype_shift)


@custom_op(f"{_NS}::ada_layer_norm")
def ada_layer_norm_op(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ada_layer_norm_forward(x, scale, shift, eps)


@ada_layer_norm_op.register_fake
def _(x, scale, shift, eps):
    rows = x.shape[0] * x.shape[1]
    return (
        x.new_empty(x.shape),
        x.new_empty((rows,), dtype=torch.float32),
        x.new_empty((rows,), dtype=torch.float32),
    )


@custom_op(f"{_NS}::ada_layer_norm_backward")
def ada_layer_norm_backward_op(
    g: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    mod_grad: bool,
    dtype_scale: torch.dtype,
    dtype_shift: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ada_layer_norm_backward(g, x, scale, mean, rstd, mod_grad, dtype_scale, dtype_shift)


@ada_layer_norm_backward_op.register_fake
def _(g, x, scale, mean, rstd, mod_grad, dtype_scale, dtype_shift):
    if not mod_grad:
        return x.new_empty(x.shape), g.new_empty(0), g.new_empty(0)
    shp = (x.shape[0], x.shape[2])
    return x.new_empty(x.shape), g.new_empty(shp, dtype=dtype_scale), g.new_empty(shp, dtype=dtype_shift)


def _ada_ln_setup(ctx, inputs, output):
    x, scale, shift, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.dtypes = (scale.dtype, shift.dtype)


def _ada_ln_backward(ctx, g, _g_mean, _g_rstd):
    """``n = (x - mu) rstd``, ``y = n (1 + s) + sh`` per token row of ``C`` channels =>
    ``dn = g (1 + s)``, ``dx = rstd (dn - mean_C(dn) - n mean_C(dn n))``,
    ``ds[b] = sum_tokens g n``, ``dsh[b] = sum_tokens g`` (mean / rstd are not differentiable outputs)."""
    x, scale, mean, rstd = ctx.saved_tensors
    mod_grad = bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
    dx, ds, dsh = ada_layer_norm_backward_op(g, x, scale, mean, rstd, mod_grad, *ctx.dtypes)
    if not mod_grad:
        return dx, None, None, None
    return (dx, ds if ctx.needs_input_grad[1] else None, dsh if ctx.needs_input_grad[2] else None, None)


ada_layer_norm_op.register_autograd(_ada_ln_backward, setup_context=_ada_ln_setup)


# ----------------------------------------------------------------------------------------------------------
# gated_residual: out = x + gate[b] * y
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _gated_fwd_kernel(x_ptr, y_ptr, gate_ptr, out_ptr, LC, C, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < LC
    offs = b * LC + idx
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * C + idx % C, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x + gate * y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(
    g_ptr,
    y_ptr,
    gate_ptr,
    dy_ptr,
    dpart_ptr,
    L,
    C,
    NBLK,
    GATE_GRAD: tl.constexpr,
    Y_GRAD: tl.constexpr,
    TOK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    gate = tl.load(gate_ptr + b * C + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(TOK):
        tok = blk * TOK + i
        row = b * L + tl.minimum(tok, L - 1)
        mask = tl.where(tok < L, cmask, False)
        g = tl.load(g_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        if Y_GRAD:
            tl.store(dy_ptr + row * C + cols, (g * gate).to(dy_ptr.dtype.element_ty), mask=mask)
        if GATE_GRAD:
            y = tl.load(y_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
            acc += g * y
    if GATE_GRAD:
        tl.store(dpart_ptr + (b * NBLK + blk) * C + cols, acc, mask=cmask)


def _out_dtype(*tensors) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def gated_residual_forward(x, y, gate):
    x, y, gate = contig(x), contig(y), contig(gate)
    b, seq, c = x.shape
    out = torch.empty(x.shape, dtype=_out_dtype(x, y, gate), device=x.device)
    if x.numel():
        block = 1024
        _gated_fwd_kernel[(triton.cdiv(seq * c, block), b)](
            x, y, gate, out, seq * c, c, BLOCK=block, num_warps=4
        )
    return out


def gated_residual_backward(g, y, gate, y_grad, gate_grad, dtype_y, dtype_gate):
    """Launch -> ``(dy or empty, dgate [B, C] or empty)``; ``dx = g`` needs no kernel."""
    g, y, gate = contig(g), contig(y), contig(gate)
    b, seq, c = y.shape
    dy = torch.empty(y.shape, dtype=dtype_y, device=y.device) if y_grad else empty_grad(y.device)
    tok = tokens_per_program(b, seq)
    nblk = triton.cdiv(seq, tok) if seq else 0
    parts = torch.empty((b, max(nblk, 1), c) if gate_grad else (0,), dtype=torch.float32, device=y.device)
    if y.numel() and (y_grad or gate_grad):
        block_c = triton.next_power_of_2(c)
        _gated_bwd_kernel[(nblk, b)](
            g,
            y,
            gate,
            dy if y_grad else g,
            parts,
            seq,
            c,
            nblk,
            GATE_GRAD=gate_grad,
            Y_GRAD=y_grad,
            TOK=tok,
            BLOCK_C=block_c,
            num_warps=_warps(block_c),
        )
    if not gate_grad:
        return dy, empty_grad(y.device)
    if not y.numel():
        parts.zero_()
    return dy, parts.sum(dim=1).to(dtype_gate)


@custom_op(f"{_NS}::gated_residual")
def gated_residual_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return gated_residual_forward(x, y, gate)


@gated_residual_op.register_fake
def _(x, y, gate):
    return x.new_empty(x.shape, dtype=_out_dtype(x, y, gate))


@custom_op(f"{_NS}::gated_residual_backward")
def gated_residual_backward_op(
    g: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    y_grad: bool,
    gate_grad: bool,
    dtype_y: torch.dtype,
    dtype_gate: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_backward(g, y, gate, y_grad, gate_grad, dtype_y, dtype_gate)


@gated_residual_backward_op.register_fake
def _(g, y, gate, y_grad, gate_grad, dtype_y, dtype_gate):
    dy = y.new_empty(y.shape, dtype=dtype_y) if y_grad else y.new_empty(0)
    dgate = y.new_empty((y.shape[0], y.shape[2]), dtype=dtype_gate) if gate_grad else y.new_empty(0)
    return dy, dgate


def _gated_setup(ctx, inputs, output):
    x, y, gate = inputs
    ctx.save_for_backward(y, gate)
    ctx.dtypes = (x.dtype, y.dtype, gate.dtype)


def _gated_backward(ctx, g):
    """``out = x + gate[b] y`` => ``dx = g``, ``dy = gate[b] g``, ``dgate[b] = sum_tokens g y``."""
    y, gate = ctx.saved_tensors
    dtype_x, dtype_y, dtype_gate = ctx.dtypes
    _, need_y, need_gate = ctx.needs_input_grad
    dx = g.to(dtype_x) if ctx.needs_input_grad[0] else None
    if not (need_y or need_gate):
        return dx, None, None
    dy, dgate = gated_residual_backward_op(g, y, gate, need_y, need_gate, dtype_y, dtype_gate)
    return dx, dy if need_y else None, dgate if need_gate else None


gated_residual_op.register_autograd(_gated_backward, setup_context=_gated_setup)


# ----------------------------------------------------------------------------------------------------------
# rms_norm: y = x rsqrt(mean_D(x^2) + eps) w   over the last dim D
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _rms_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, R, D, eps, HAS_W: tl.constexpr, RB: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = tl.program_id(0).to(tl.int64) * RB + tl.arange(0, RB)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    mask = rmask[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * rstd[:, None]
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        y = y * w[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _rms_bwd_kernel(
    g_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dwpart_ptr,
    R,
    D,
    HAS_W: tl.constexpr,
    W_GRAD: tl.constexpr,
    RB: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * RB + tl.arange(0, RB)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < R)[:, None] & cmask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=rows < R, other=0.0)
    xhat = x * rstd[:, None]
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dxhat = g * w[None, :]
    else:
        dxhat = g
    c = tl.sum(dxhat * xhat, axis=1) / D
    dx = rstd[:, None] * (dxhat - xhat * c[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if W_GRAD:
        tl.store(dwpart_ptr + pid * D + cols, tl.sum(g * xhat, axis=0), mask=cmask)


def rms_norm_forward(x, weight, eps, out_dtype):
    x = contig(x)
    d = x.shape[-1]
    r = x.numel() // d if d else 0
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(r, dtype=torch.float32, device=x.device)
    if x.numel():
        block_d = triton.next_power_of_2(d)
        _rms_fwd_kernel[(triton.cdiv(r, ROWS_PER_PROGRAM),)](
            x,
            contig(weight) if weight is not None else x,
            y,
            rstd,
            r,
            d,
            float(eps),
            HAS_W=weight is not None,
            RB=ROWS_PER_PROGRAM,
            BLOCK_D=block_d,
            num_warps=4,
        )
    return y, rstd


def rms_norm_backward(g, x, weight, rstd, w_grad, dtype_x):
    g, x = contig(g), contig(x)
    d = x.shape[-1]
    r = x.numel() // d if d else 0
    dx = torch.empty(x.shape, dtype=dtype_x, device=x.device)
    nprog = triton.cdiv(r, ROWS_PER_PROGRAM)
    parts = torch.empty((max(nprog, 1), d) if w_grad else (0,), dtype=torch.float32, device=x.device)
    if x.numel():
        block_d = triton.next_power_of_2(d)
        _rms_bwd_kernel[(nprog,)](
            g,
            x,
            contig(weight) if weight is not None else x,
            rstd,
            dx,
            parts,
            r,
            d,
            HAS_W=weight is not None,
            W_GRAD=w_grad,
            RB=ROWS_PER_PROGRAM,
            BLOCK_D=block_d,
            num_warps=4,
        )
    if not w_grad:
        return dx, empty_grad(x.device)
    if not x.numel():
        parts.zero_()
    return dx, parts.sum(dim=0).to(weight.dtype)


@custom_op(f"{_NS}::rms_norm")
def rms_norm_op(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_forward(x, weight, eps, out_dtype)


@rms_norm_op.register_fake
def _(x, weight, eps, out_dtype):
    d = x.shape[-1]
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty((x.numel() // d,), dtype=torch.float32)


@custom_op(f"{_NS}::rms_norm_backward")
def rms_norm_backward_op(
    g: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    w_grad: bool,
    dtype_x: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_backward(g, x, weight, rstd, w_grad, dtype_x)


@rms_norm_backward_op.register_fake
def _(g, x, weight, rstd, w_grad, dtype_x):
    dw = x.new_empty(weight.shape, dtype=weight.dtype) if w_grad else x.new_empty(0)
    return x.new_empty(x.shape, dtype=dtype_x), dw


def _rms_setup(ctx, inputs, output):
    x, weight, eps, out_dtype = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.dtype_x = x.dtype


def _rms_backward(ctx, g, _g_rstd):
    """``xh = x rstd``, ``y = xh w`` per row of ``D`` =>
    ``dxh = g w``, ``dx = rstd (dxh - xh mean_D(dxh xh))``, ``dw = sum_rows g xh``."""
    x, weight, rstd = ctx.saved_tensors
    w_grad = weight is not None and bool(ctx.needs_input_grad[1])
    dx, dw = rms_norm_backward_op(g, x, weight, rstd, w_grad, ctx.dtype_x)
    return dx, dw if w_grad else None, None, None


rms_norm_op.register_autograd(_rms_backward, setup_context=_rms_setup)


# ----------------------------------------------------------------------------------------------------------
# rotary_emb (interleaved pairs): out[2i] = x[2i] c[2i] - x[2i+1] s[2i],
#                                 out[2i+1] = x[2i+1] c[2i+1] + x[2i] s[2i+1]
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _rope_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    R,
    S,
    INNER,
    D,
    HALF: tl.constexpr,
    BACKWARD: tl.constexpr,
    RB: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * RB + tl.arange(0, RB)
    j = tl.arange(0, BLOCK_H)
    mask = (rows < R)[:, None] & (j < HALF)[None, :]
    pos = (rows // INNER) % S  # sequence position of each row
    xo = rows[:, None] * D + 2 * j[None, :]
    co = pos[:, None] * D + 2 * j[None, :]
    xe = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
    xd = tl.load(x_ptr + xo + 1, mask=mask, other=0.0).to(tl.float32)
    ce = tl.load(cos_ptr + co, mask=mask, other=0.0).to(tl.float32)
    cd = tl.load(cos_ptr + co + 1, mask=mask, other=0.0).to(tl.float32)
    se = tl.load(sin_ptr + co, mask=mask, other=0.0).to(tl.float32)
    sd = tl.load(sin_ptr + co + 1, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose of the forward's 2x2 block per pair
        oe = xe * ce + xd * sd
        od = xd * cd - xe * se
    else:
        oe = xe * ce - xd * se
        od = xd * cd + xe * sd
    tl.store(out_ptr + xo, oe.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + xo + 1, od.to(out_ptr.dtype.element_ty), mask=mask)


def rotary_emb_launch(x, cos, sin, sequence_dim, backward):
    x, cos, sin = contig(x), contig(cos), contig(sin)
    d = x.shape[-1]
    seq = x.shape[sequence_dim]
    inner = x.shape[2] if sequence_dim == 1 else 1
    r = x.numel() // d if d else 0
    out = torch.empty_like(x)
    if x.numel():
        half = d // 2
        _rope_kernel[(triton.cdiv(r, ROWS_PER_PROGRAM),)](
            x,
            cos,
            sin,
            out,
            r,
            seq,
            inner,
            d,
            HALF=half,
            BACKWARD=backward,
            RB=ROWS_PER_PROGRAM,
            BLOCK_H=triton.next_power_of_2(half),
            num_warps=4,
        )
    return out


@custom_op(f"{_NS}::rotary_emb")
def rotary_emb_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sequence_dim: int) -> torch.Tensor:
    return rotary_emb_launch(x, cos, sin, sequence_dim, False)


@rotary_emb_op.register_fake
def _(x, cos, sin, sequence_dim):
    return x.new_empty(x.shape)


@custom_op(f"{_NS}::rotary_emb_backward")
def rotary_emb_backward_op(
    g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sequence_dim: int, dtype_x: torch.dtype
) -> torch.Tensor:
    return rotary_emb_launch(g.to(dtype_x), cos, sin, sequence_dim, True)


@rotary_emb_backward_op.register_fake
def _(g, cos, sin, sequence_dim, dtype_x):
    return g.new_empty(g.shape, dtype=dtype_x)


def _rope_setup(ctx, inputs, output):
    x, cos, sin, sequence_dim = inputs
    ctx.save_for_backward(cos, sin)
    ctx.sequence_dim = sequence_dim
    ctx.dtype_x = x.dtype


def _rope_backward(ctx, g):
    """Per pair ``(e, d)``: ``[oe, od] = [[ce, -se], [sd, cd]] [xe, xd]`` => the transpose:
    ``dxe = ce ge + sd gd``, ``dxd = cd gd - se ge`` (no gradient to the fixed ``cos`` / ``sin``)."""
    cos, sin = ctx.saved_tensors
    return rotary_emb_backward_op(g, cos, sin, ctx.sequence_dim, ctx.dtype_x), None, None, None


rotary_emb_op.register_autograd(_rope_backward, setup_context=_rope_setup)
