"""Plain-PyTorch references for every fused op (the math is ``docs/math.md``; sections cited per op).

These are the ground truth the Triton kernels are tested against and the path CPU tensors take
outside the Triton interpreter.  Conventions shared by every function here:

* ``x`` is ``[B, ...]`` (rank >= 2).  Per-sample scalars (``t``, ``sigma``, ``r``, ``std`` ...) arrive
  already normalised by the caller to fp32 tensors of shape ``[B]`` (see ``kernels._checks``).
* All math is fp32: inputs are upcast after loading; sampled states are rounded to the storage dtype
  of ``x`` *before* any log-prob is taken of them, so the log-prob of a stored transition is the same
  number at rollout and at training time.
* Reductions are per sample row over every non-batch dim, returned as fp32 ``[B]``.
* A transition whose standard deviation is 0 (``noise_level == 0``, ``eta == 0``, or the last CPS step)
  is a point mass: it has no density, and its log-prob is reported as 0 by convention.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

__all__ = [
    "interpolate",
    "paired_interpolate",
    "randn",
    "euler_step",
    "sde_step",
    "cps_step",
    "ddim_step",
    "dpm2_step",
    "gaussian_log_prob",
    "gaussian_kl",
    "nft_loss",
    "nft_row_losses",
    "PreferenceLoss",
    "paired_errors",
    "mapo_f",
    "preference_loss",
]


def _col(s: torch.Tensor, ndim: int) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` for broadcasting against a rank-``ndim`` tensor."""
    return s.reshape(s.shape[0], *([1] * (ndim - 1)))


def _reduce_rows(x: torch.Tensor, reduce: str) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1)
    return flat.mean(dim=1) if reduce == "mean" else flat.sum(dim=1)


# ----------------------------------------------------------------------------------------------------------
# math.md §0: forward process
# ----------------------------------------------------------------------------------------------------------
def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """math.md §0: ``x_t = (1 - t) * x0 + t * noise`` (fp32 math, output in ``x0``'s dtype)."""
    tc = _col(t, x0.ndim)
    return ((1.0 - tc) * x0.float() + tc * noise.float()).to(x0.dtype)


def paired_interpolate(x0_w, x0_l, noise, t):
    """math.md §6 paired noise: the same ``noise`` and ``t`` noise the winner and the loser."""
    return interpolate(x0_w, noise, t), interpolate(x0_l, noise, t)


# ----------------------------------------------------------------------------------------------------------
# Philox4x32-10 normal noise, bit-compatible with ``tl.randn(seed, offset)``.
# ----------------------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57


def _umulhi32(a: int, b: torch.Tensor) -> torch.Tensor:
    # a < 2^32 and b < 2^32: split b to keep every product inside int64.
    b_lo, b_hi = b & 0xFFFF, b >> 16
    lo = a * b_lo
    hi = a * b_hi + (lo >> 16)
    return (hi >> 16) & _M32


def _philox(seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, n_rounds: int = 10):
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(n_rounds):
        _c0, _c2 = c0, c2
        c0 = _umulhi32(_PHILOX_ROUND_B, _c2) ^ c1 ^ k0
        c2 = _umulhi32(_PHILOX_ROUND_A, _c0) ^ c3 ^ k1
        c1 = (_PHILOX_ROUND_B * _c2) & _M32
        c3 = (_PHILOX_ROUND_A * _c0) & _M32
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    # Same map as triton.language.random.uint_to_uniform_float for 32-bit integers.
    x = torch.where(x >= 2**31, x - 2**32, x)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * 4.6566127342e-10


def randn(shape, seed, offset=0, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise; element ``i`` (flat, row-major) is ``tl.randn(seed, offset + i)``.

    Philox4x32-10 keyed by the 64-bit ``seed`` with counter ``offset + i``, then Box-Muller on the first
    two 32-bit words.  ``seed`` and ``offset`` may be Python ints or int64 tensors (0-dim).
    """
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    seed_t = torch.as_tensor(seed, dtype=torch.int64, device=device).reshape(())
    off_t = torch.as_tensor(offset, dtype=torch.int64, device=device).reshape(())
    idx = torch.arange(n, dtype=torch.int64, device=device) + off_t
    c0 = idx & _M32
    c1 = (idx >> 32) & _M32
    seed_u = seed_t & 0xFFFFFFFFFFFFFFFF
    i1, i2, _, _ = _philox(seed_u, c0, c1)
    u1 = torch.clamp_min(_uint32_to_uniform(i1), 1.0e-7)
    u2 = _uint32_to_uniform(i2)
    out = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)
    return out.reshape(shape).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# math.md §1: solver steps.  ``sigma``/``sigma_next`` are [B] fp32; dt = sigma_next - sigma < 0.
# ----------------------------------------------------------------------------------------------------------
def euler_step(x, v, sigma, sigma_next):
    """math.md §1 Euler ODE: ``x' = x + (sigma_next - sigma) * v``."""
    dt = _col(sigma_next - sigma, x.ndim)
    return (x.float() + dt * v.float()).to(x.dtype)


def _transition(x, mean, std, noise, prev_sample, log_prob_form="gaussian"):
    """Sample (or take the given) next state, round it to storage, and score it: under N(mean, std^2)
    (``"gaussian"``) or as ``-mean_dims (prev - mean)^2`` (``"reference"``, flow_grpo's CPS log-prob); both 0
    where ``std == 0`` (a point mass)."""
    stdc = _col(std, x.ndim)
    if prev_sample is None:
        prev = (mean + stdc * noise.float()).to(x.dtype)
    else:
        prev = prev_sample
    if log_prob_form == "gaussian":
        log_prob = gaussian_log_prob(prev, mean, std, reduce="mean")
    else:
        sq = -_reduce_rows((prev.float() - mean) ** 2, "mean")
        log_prob = torch.where(std == 0, torch.zeros_like(sq), sq)
    return prev, log_prob, mean, std


def sde_std(sigma, sigma_next, noise_level, sigma_max):
    """math.md §1 Flow-GRPO: ``std_t = a sqrt(sigma / (1 - (sigma == 1 ? sigma_max : sigma)))``."""
    denom_sigma = torch.where(sigma == 1.0, sigma_max, sigma)
    return noise_level * torch.sqrt(sigma / (1.0 - denom_sigma))


def sde_step(x, v, sigma, sigma_next, *, noise_level, sigma_max, noise=None, prev_sample=None):
    """math.md §1 Flow-GRPO SDE step -> ``(prev_sample, log_prob [B], mean (fp32), std [B])``.

    ``std_t = a sqrt(sigma / (1 - sigma'))`` with ``sigma' = sigma_max`` where ``sigma == 1``;
    ``mean = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt``;
    the transition's std is ``std_t sqrt(-dt)``; ``log_prob`` is the Gaussian log-density averaged over dims.
    """
    nd = x.ndim
    dt = sigma_next - sigma
    std_t = sde_std(sigma, sigma_next, noise_level, sigma_max)
    s, dtc, stc = _col(sigma, nd), _col(dt, nd), _col(std_t, nd)
    mean = (
        x.float() * (1.0 + stc**2 / (2.0 * s) * dtc)
        + v.float() * (1.0 + stc**2 * (1.0 - s) / (2.0 * s)) * dtc
    )
    std = std_t * torch.sqrt(-dt)
    return _transition(x, mean, std, noise, prev_sample)


def cps_step(
    x,
    v,
    sigma,
    sigma_next,
    *,
    noise_level,
    sigma_max=None,
    noise=None,
    prev_sample=None,
    log_prob_form="reference",
):
    """math.md §1 coefficient-preserving SDE step -> ``(prev_sample, log_prob, mean, std)``.

    ``std = sigma_next sin(a pi / 2)``; ``x0_hat = x - sigma v``; ``x1_hat = x + (1 - sigma) v``;
    ``mean = x0_hat (1 - sigma_next) + x1_hat sqrt(sigma_next^2 - std^2)``.  ``sigma_max`` is unused.
    ``log_prob_form``: ``"reference"`` ``-mean_dims (prev - mean)^2`` (flow_grpo's ``sde_type='cps'``) or
    ``"gaussian"`` (the Gaussian log-density).
    """
    nd = x.ndim
    std = sigma_next * math.sin(noise_level * math.pi / 2.0)
    s, sn = _col(sigma, nd), _col(sigma_next, nd)
    xf, vf = x.float(), v.float()
    x0_hat = xf - s * vf
    x1_hat = xf + (1.0 - s) * vf
    coef = torch.sqrt(torch.clamp_min(sigma_next**2 - std**2, 0.0))
    mean = x0_hat * (1.0 - sn) + x1_hat * _col(coef, nd)
    return _transition(x, mean, std, noise, prev_sample, log_prob_form)


def ddim_step(x, eps, alpha_bar, alpha_bar_prev, *, eta, noise=None, prev_sample=None):
    """math.md §1 DDIM with eta (epsilon models) -> ``(prev_sample, log_prob, mean, std)``.

    ``x0_hat = (x - sqrt(1 - ab_t) eps) / sqrt(ab_t)``; ``var = (1 - ab_prev)/(1 - ab_t) (1 - ab_t/ab_prev)``;
    ``std = eta sqrt(var)``; ``mean = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - std^2) eps``.
    """
    nd = x.ndim
    ab, abp = alpha_bar, alpha_bar_prev
    var = (1.0 - abp) / (1.0 - ab) * (1.0 - ab / abp)
    std = eta * torch.sqrt(torch.clamp_min(var, 0.0))
    ef = eps.float()
    x0_hat = (x.float() - _col(torch.sqrt(1.0 - ab), nd) * ef) / _col(torch.sqrt(ab), nd)
    dir_coef = torch.sqrt(torch.clamp_min(1.0 - abp - std**2, 0.0))
    mean = _col(torch.sqrt(abp), nd) * x0_hat + _col(dir_coef, nd) * ef
    return _transition(x, mean, std, noise, prev_sample)


def dpm2_coefficients(sigma, sigma_next, sigma_prev):
    """math.md §1 DPM-Solver++(2M) on rectified flow, per sample, written without infinities.

    With ``alpha = 1 - sigma``, ``lambda = log(alpha / sigma)``, ``h = lambda_next - lambda``:
    ``x' = (sigma_next / sigma) x + alpha_next (1 - e^{-h}) D`` with
    ``e^{-h} = sigma_next alpha / (alpha_next sigma)``,
    and ``D = (1 + c) D_s - c D_prev`` with ``c = h / (2 h_last)``, ``h_last = lambda - lambda_prev``.
    ``c = 0`` (first order) on the first step (``sigma_prev`` < 0 marks "none"), where ``sigma_prev == 1``
    (``h_last`` infinite) and on the last step (``sigma_next == 0``).
    Returns ``(a, b, c)`` so that ``x' = a x + b ((1 + c) D_s - c D_prev)``.
    """
    alpha, alpha_next = 1.0 - sigma, 1.0 - sigma_next
    a = sigma_next / sigma
    exp_neg_h = sigma_next * alpha / (alpha_next * sigma)
    b = alpha_next * (1.0 - exp_neg_h)
    second = (sigma_prev > 0) & (sigma_prev < 1.0) & (sigma_next > 0)
    safe_next = torch.where(second, sigma_next, torch.full_like(sigma_next, 0.5))
    safe_prev = torch.where(second, sigma_prev, torch.full_like(sigma_prev, 0.25))
    safe_sigma = torch.where(second, sigma, torch.full_like(sigma, 0.375))
    lam = lambda s: torch.log(1.0 - s) - torch.log(s)
    h = lam(safe_next) - lam(safe_sigma)
    h_last = lam(safe_sigma) - lam(safe_prev)
    c = torch.where(second, h / (2.0 * h_last), torch.zeros_like(sigma))
    return a, b, c


def dpm2_step(x, v, sigma, sigma_next, x0_prev=None, sigma_prev=None):
    """math.md §1 DPM-Solver++(2M) step for a velocity model -> ``(x_next, x0_pred)``.

    ``x0_pred = x - sigma v`` is this step's data prediction ``D_s``; pass it back as ``x0_prev`` (with this
    step's ``sigma`` as ``sigma_prev``) on the next call.  ``sigma_prev`` is ``[B]``; ``x0_prev=None`` means
    first order.
    """
    nd = x.ndim
    if sigma_prev is None or x0_prev is None:
        sigma_prev = torch.full_like(sigma, -1.0)
        x0_prev = x
    a, b, c = dpm2_coefficients(sigma, sigma_next, sigma_prev)
    xf = x.float()
    d_s = xf - _col(sigma, nd) * v.float()
    cc = _col(c, nd)
    d = (1.0 + cc) * d_s - cc * x0_prev.float()
    x_next = _col(a, nd) * xf + _col(b, nd) * d
    return x_next.to(x.dtype), d_s.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# math.md §1: Gaussian log-prob and KL
# ----------------------------------------------------------------------------------------------------------
def gaussian_log_prob(x, mean, std, reduce="mean"):
    """math.md §1: ``log N(x; m, s^2) = -(x - m)^2 / (2 s^2) - log s - log sqrt(2 pi)``, reduced per row.

    ``std`` is ``[B]``.  Rows with ``std == 0`` are point masses: log-prob 0 by convention.
    """
    nd = x.ndim
    point = std == 0
    s = torch.where(point, torch.ones_like(std), std)
    sc = _col(s, nd)
    diff = x.float() - mean.float()
    elem = -(diff**2) / (2.0 * sc**2) - torch.log(sc) - LOG_SQRT_2PI
    out = _reduce_rows(elem, reduce)
    return torch.where(point, torch.zeros_like(out), out)


def gaussian_kl(mean_p, std_p, mean_q, std_q, reduce="mean"):
    """math.md §1: ``KL(p||q) = log(s_q/s_p) + (s_p^2 + (m_p - m_q)^2) / (2 s_q^2) - 1/2`` per element."""
    nd = mean_p.ndim
    sp, sq = _col(std_p, nd), _col(std_q, nd)
    diff = mean_p.float() - mean_q.float()
    elem = torch.log(sq) - torch.log(sp) + (sp**2 + diff**2) / (2.0 * sq**2) - 0.5
    return _reduce_rows(elem, reduce)


# ----------------------------------------------------------------------------------------------------------
# math.md §2 step 5-6: DiffusionNFT loss
# ----------------------------------------------------------------------------------------------------------
def nft_row_losses(v, v_old, x0, noise, t, *, beta, weighting="adaptive"):
    """Per-row ``(L_pos, L_neg)`` of math.md §2 step 6 (gradient flows through ``v`` only).

    ``v_pos = beta v + (1 - beta) v_old``; ``v_neg = (1 + beta) v_old - beta v``; target ``u = noise - x0``.
    adaptive: ``d = t (u - v_*)``, ``L = mean d^2 / stopgrad(mean |d|).clamp_min(1e-5)``.
    none: ``L = mean (v_* - u)^2``.
    """
    nd = v.ndim
    vf, vo = v.float(), v_old.float().detach()
    u = noise.float() - x0.float()
    v_pos = beta * vf + (1.0 - beta) * vo
    v_neg = (1.0 + beta) * vo - beta * vf
    if weighting == "adaptive":
        tc = _col(t, nd)
        d_pos, d_neg = tc * (u - v_pos), tc * (u - v_neg)
        w_pos = _reduce_rows(d_pos.abs(), "mean").detach().clamp_min(1e-5)
        w_neg = _reduce_rows(d_neg.abs(), "mean").detach().clamp_min(1e-5)
        return _reduce_rows(d_pos**2, "mean") / w_pos, _reduce_rows(d_neg**2, "mean") / w_neg
    return _reduce_rows((v_pos - u) ** 2, "mean"), _reduce_rows((v_neg - u) ** 2, "mean")


def nft_loss(
    v, v_old, x0, noise, t, r, *, beta, adv_clip_max=5.0, weighting="adaptive", v_ref=None, kl_coef=0.0
):
    """math.md §2 step 6: ``mean_b[m (r L_pos + (1 - r) L_neg) / beta]``
    ``+ kl_coef mean_b mean_dims (v - v_ref)^2``."""
    l_pos, l_neg = nft_row_losses(v, v_old, x0, noise, t, beta=beta, weighting=weighting)
    loss = (adv_clip_max * (r * l_pos + (1.0 - r) * l_neg) / beta).mean()
    if v_ref is not None and kl_coef != 0.0:
        loss = loss + kl_coef * _reduce_rows((v.float() - v_ref.float().detach()) ** 2, "mean").mean()
    return loss


# ----------------------------------------------------------------------------------------------------------
# math.md §6: paired-error preference losses (Diffusion-DPO, MaPO)
# ----------------------------------------------------------------------------------------------------------
class PreferenceLoss(NamedTuple):
    """``kernels.preference_loss``'s result: the scalar loss and the per-sample errors (fp32 ``[B]``).

    ``err_w_ref`` / ``err_l_ref`` are the reference model's errors (DPO; None for MaPO), detached."""

    loss: torch.Tensor
    err_w: torch.Tensor
    err_l: torch.Tensor
    err_w_ref: torch.Tensor | None = None
    err_l_ref: torch.Tensor | None = None


def _at_least_f32(x):
    return x if x.dtype == torch.float64 else x.float()


def paired_errors(pred, target):
    """math.md §6: ``err = mean_dims (pred - target)^2`` per row, fp32 ``[B]`` (float64 stays float64, so the
    reference can be gradchecked)."""
    return _reduce_rows((_at_least_f32(pred) - _at_least_f32(target)) ** 2, "mean")


_MAPO_SERIES_BELOW = 0.5


def mapo_f(x):
    """MaPO's ``f(x) = x / (e^x - 1)`` for ``x >= 0`` (``f(0) = 1``), accurate in fp32 everywhere.

    Below 0.5 the Bernoulli series ``1 - x/2 + x^2/12 - x^4/720 + x^6/30240`` (truncation < 5e-9 relative:
    the closed form loses ``eps / x`` there to the cancellation in ``e^x - 1``); above it
    ``x e^-x / (1 - e^-x)``, which neither cancels nor overflows.  Differentiable, with a finite gradient
    (``f'(0) = -1/2``) everywhere."""
    small = x < _MAPO_SERIES_BELOW
    x2 = x * x
    f_small = 1.0 + x * (-0.5 + x * (1.0 / 12.0 + x2 * (-1.0 / 720.0 + x2 / 30240.0)))
    xl = torch.where(small, torch.ones_like(x), x)
    f_large = xl * torch.exp(-xl) / -torch.expm1(-xl)
    return torch.where(small, f_small, f_large)


def preference_loss(
    pred_w,
    pred_l,
    target_w,
    target_l,
    *,
    form,
    beta,
    ref_w=None,
    ref_l=None,
    dpo_convention="salesforce",
    snr_value=0.5,
    num_train_timesteps=1000.0,
):
    """math.md §6 paired-error losses -> ``PreferenceLoss``; every argument already validated.

    DPO: ``Delta = (err_w - err_w_ref) - (err_l - err_l_ref)``,
    ``loss = mean_b -logsigmoid(-temp Delta)``, ``temp = beta / 2`` (``"salesforce"``) or ``beta``
    (``"diffusers"``); the reference errors carry no gradient.
    MaPO: ``loss = mean_b err_w - beta mean_b logsigmoid(T (f(s err_w) - f(s err_l)))`` with
    ``s = snr_value``, ``T = num_train_timesteps``.
    """
    err_w, err_l = paired_errors(pred_w, target_w), paired_errors(pred_l, target_l)
    if form == "dpo":
        err_w_ref = paired_errors(ref_w.detach(), target_w.detach()).detach()
        err_l_ref = paired_errors(ref_l.detach(), target_l.detach()).detach()
        temp = 0.5 * beta if dpo_convention == "salesforce" else beta
        delta = (err_w - err_w_ref) - (err_l - err_l_ref)
        loss = -F.logsigmoid(-temp * delta).mean()
        return PreferenceLoss(loss, err_w, err_l, err_w_ref, err_l_ref)
    ratio = F.logsigmoid(num_train_timesteps * (mapo_f(snr_value * err_w) - mapo_f(snr_value * err_l)))
    loss = err_w.mean() - beta * ratio.mean()
    return PreferenceLoss(loss, err_w, err_l)


# ----------------------------------------------------------------------------------------------------------
# DiT fast path (issue #6): the memory-bound chains of an SD3 / FLUX transformer block
# ----------------------------------------------------------------------------------------------------------
__all__ += ["ada_layer_norm", "gated_residual", "rms_norm", "rotary_emb"]


def ada_layer_norm(x, scale, shift, eps=1e-6):
    """``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]``: ``x`` ``[B, L, C]``, ``scale`` / ``shift``
    ``[B, C]``; LayerNorm over ``C`` without affine (diffusers' AdaLayerNormZero / AdaLayerNormContinuous);
    fp32 math, output in ``x``'s dtype."""
    n = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (n * (1.0 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


def gated_residual(x, y, gate):
    """``x + gate[:, None] * y``: ``x`` / ``y`` ``[B, L, C]``, ``gate`` ``[B, C]``; fp32 math, output in the
    promoted dtype of the three."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), gate.dtype)
    return (x.float() + gate.float()[:, None] * y.float()).to(dtype)


def rms_norm(x, weight=None, eps=1e-6, out_dtype=None):
    """``x * rsqrt(mean(x^2, -1) + eps) * weight`` over the last dim; fp32 math, output in ``out_dtype``
    (default ``x``'s dtype)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(out_dtype or x.dtype)


def rotary_emb(x, cos, sin, sequence_dim=1):
    """diffusers ``apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1)`` (FLUX):
    interleaved pairs ``(x[2i], x[2i+1])`` rotated; ``x`` ``[B, S, H, D]`` (``sequence_dim=1``) or
    ``[B, H, S, D]`` (``sequence_dim=2``), ``cos`` / ``sin`` ``[S, D]``; fp32 math, output in ``x``'s
    dtype."""
    shape = (1, -1, 1, x.shape[-1]) if sequence_dim == 1 else (1, 1, -1, x.shape[-1])
    c, s = cos.float().reshape(shape), sin.float().reshape(shape)
    x_real, x_imag = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rot = torch.stack([-x_imag, x_real], dim=-1).flatten(-2)
    return (x.float() * c + x_rot * s).to(x.dtype)
