"""Fused ops for diffusion / flow-matching RL and preference training (formulas: docs/math.md §0-§2, §6).

Importable on its own, with no dependency on the rest of the project; the only side effect of importing it
is the registration of its ``nft_kernels::*`` ops with ``torch.library`` (where triton is installed).

Every op takes ``x``-like tensors shaped ``[B, ...]`` (rank >= 2) stored in fp32, fp16 or bf16 and
per-sample scalars as Python floats, 0-dim tensors, ``[B]`` or ``[B, 1, ..., 1]`` tensors.  Math and
reductions are fp32; losses and log-probs come back fp32 ``[B]`` (or a 0-dim loss).

Backends (``kernels._dispatch``): CUDA tensors run the fused Triton kernels (``kernels.ops``), CPU tensors
the PyTorch references (``kernels.reference``), or the Triton kernels in Triton's interpreter when
``TRITON_INTERPRET=1``.  ``use_backend("reference" | "triton" | "auto")`` / ``set_backend`` override that;
``active_backend(tensor)`` says which runs.  Reductions are per row in a fixed order on both backends: a
row's log-prob does not depend on the batch it is computed in, and the log-prob of a transition sampled at
rollout (``noise=``) equals, bit for bit, the one scored at training (``prev_sample=``).

Gradients flow to every tensor argument the math depends on (``x``, ``v`` / ``eps``, ``noise``,
``prev_sample``, ``mean``, ``x0``, ``x0_prev`` ...).  The Triton backend does not differentiate w.r.t. the
per-sample scalars (``sigma``, ``t``, ``std``, ``alpha_bar`` ...): passing one that requires grad raises
``NotImplementedError`` there (detach it, or use the reference backend).
"""

from __future__ import annotations

import math

import torch

from . import _dispatch, reference
from ._checks import (
    check_like,
    check_noise_xor_prev,
    check_nonneg_number,
    check_positive_number,
    check_range,
    check_reduce,
    check_sigma_order,
    check_tensor,
    host_values_known,
    per_sample,
)
from ._dispatch import active_backend, get_backend, set_backend, use_backend

if _dispatch.HAS_TRITON:
    from . import ops as _ops
else:  # pragma: no cover - machines without triton: every op runs the reference
    _ops = None

__all__ = [
    "interpolate",
    "paired_interpolate",
    "randn",
    "euler_step",
    "sde_step",
    "cps_step",
    "CPS_LOG_PROB_FORMS",
    "ddim_step",
    "dpm2_step",
    "gaussian_log_prob",
    "gaussian_kl",
    "nft_loss",
    "preference_loss",
    "PreferenceLoss",
    "PREFERENCE_FORMS",
    "DPO_CONVENTIONS",
    "reference",
    "use_backend",
    "set_backend",
    "get_backend",
    "active_backend",
]


def _triton(x: torch.Tensor) -> bool:
    return active_backend(x) == "triton"


def _no_grad_to(**tensors) -> None:
    """The Triton backward computes no gradient for these arguments: refuse, never return a wrong zero."""
    if not torch.is_grad_enabled():
        return
    for name, s in tensors.items():
        if isinstance(s, torch.Tensor) and s.requires_grad:
            raise NotImplementedError(
                f"{name}: the Triton kernels do not differentiate w.r.t. {name}, but it requires grad; "
                f"detach it, or run this op under kernels.use_backend('reference')"
            )


def interpolate(x0, noise, t):
    """math.md §0: ``x_t = (1 - t) x0 + t noise``; output in ``x0``'s dtype."""
    check_tensor("x0", x0)
    check_like("noise", noise, "x0", x0)
    t = per_sample("t", t, x0.shape[0], x0.device)
    if _triton(x0):
        _no_grad_to(t=t)
        return _ops.interpolate_op(x0, noise, t)
    return reference.interpolate(x0, noise, t)


def paired_interpolate(x0_w, x0_l, noise, t):
    """math.md §6: ``(x_t_w, x_t_l)`` from the same ``noise`` and ``t`` in one pass."""
    check_tensor("x0_w", x0_w)
    check_like("x0_l", x0_l, "x0_w", x0_w)
    check_like("noise", noise, "x0_w", x0_w)
    t = per_sample("t", t, x0_w.shape[0], x0_w.device)
    if _triton(x0_w):
        _no_grad_to(t=t)
        return _ops.paired_interpolate_op(x0_w, x0_l, noise, t)
    return reference.paired_interpolate(x0_w, x0_l, noise, t)


def _check_counter(name: str, c):
    if isinstance(c, bool) or not isinstance(c, (int, torch.Tensor)):
        raise TypeError(f"{name}: expected an int or an int64 0-dim tensor, got {type(c).__name__}")
    if isinstance(c, torch.Tensor):
        if c.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name}: expected an int64 (or int32) tensor, got dtype {c.dtype}")
        if c.numel() != 1:
            raise ValueError(f"{name}: expected a 0-dim tensor, got shape {tuple(c.shape)}")
    elif not -(2**63) <= c < 2**63:
        raise ValueError(f"{name}: expected a value that fits in int64, got {c}")


def _counter_args(name: str, c, device: torch.device):
    """``(tensor or None, int)`` for the randn kernel: device tensors are read in-kernel (graph replay)."""
    if not isinstance(c, torch.Tensor):
        return None, int(c)
    if c.device == device:
        return c.reshape(()).to(torch.int64), 0
    if c.device.type == "cpu":  # host memory: reading it costs no device sync
        return None, int(c)
    raise ValueError(
        f"{name}: expected a tensor on {device} (that of the output) or on the CPU, got {c.device}"
    )


def randn(shape, seed, offset=0, *, device=None, dtype=torch.float32):
    """Philox normal noise: element ``i`` (flat index) depends only on ``(seed, offset, i)``.

    Element ``i`` of the flat output is ``tl.randn(seed, offset + i)`` (Philox4x32-10 keyed by the 64-bit
    ``seed``, counter ``offset + i``, Box-Muller) on both backends.  ``seed`` / ``offset`` are Python ints or
    int64 0-dim tensors; a tensor on the output device is read in-kernel, so a captured CUDA graph replays
    with the value the tensor holds at replay time.  ``device`` defaults to the seed tensor's device.
    """
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape: expected a sequence of ints, got {type(shape).__name__}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"shape: expected non-negative sizes, got {shape}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    _check_counter("seed", seed)
    _check_counter("offset", offset)
    if device is None:
        tensors = [c for c in (seed, offset) if isinstance(c, torch.Tensor)]
        device = tensors[0].device if tensors else torch.get_default_device()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if _dispatch.backend_for_device(device) == "triton":
        seed_t, seed_i = _counter_args("seed", seed, device)
        offset_t, offset_i = _counter_args("offset", offset, device)
        return _ops.randn_op(list(shape), seed_t, seed_i, offset_t, offset_i, dtype, device)
    return reference.randn(shape, seed, offset, device=device, dtype=dtype)


def _solver_common(x, v, sigma, sigma_next, v_name="v"):
    check_tensor("x", x)
    check_like(v_name, v, "x", x)
    b = x.shape[0]
    sigma = per_sample("sigma", sigma, b, x.device)
    sigma_next = per_sample("sigma_next", sigma_next, b, x.device)
    check_sigma_order(sigma, sigma_next)
    check_range("sigma", sigma, 0.0, 1.0, lo_open=True)
    check_range("sigma_next", sigma_next, 0.0, 1.0)
    return sigma, sigma_next


def euler_step(x, v, sigma, sigma_next):
    """math.md §1 Euler ODE step: ``x' = x + (sigma_next - sigma) v``."""
    sigma, sigma_next = _solver_common(x, v, sigma, sigma_next)
    if _triton(x):
        _no_grad_to(sigma=sigma, sigma_next=sigma_next)
        return _ops.euler_step_op(x, v, sigma, sigma_next)
    return reference.euler_step(x, v, sigma, sigma_next)


def sde_step(x, v, sigma, sigma_next, *, noise_level, sigma_max=None, noise=None, prev_sample=None):
    """math.md §1 Flow-GRPO SDE step -> ``(prev_sample, log_prob [B] fp32, mean fp32, std [B] fp32)``.

    Rollout passes ``noise``; training passes the stored ``prev_sample`` and gets its log-prob.  The sampled
    state is rounded to ``x``'s dtype before it is scored, so both give the same log-prob bit for bit.
    ``sigma_max`` (the schedule's second sigma) is required where ``sigma == 1``.
    """
    sigma, sigma_next = _solver_common(x, v, sigma, sigma_next)
    a = check_nonneg_number("noise_level", noise_level)
    check_noise_xor_prev(noise, prev_sample, x)
    if sigma_max is None:
        if host_values_known(sigma) and bool((sigma == 1.0).any()):
            raise ValueError("sigma_max: expected a value < 1 because sigma == 1 for some samples, got None")
        sigma_max_t = torch.zeros_like(sigma)
    else:
        sigma_max_t = per_sample("sigma_max", sigma_max, x.shape[0], x.device)
        check_range("sigma_max", sigma_max_t, 0.0, 1.0, lo_open=True, hi_open=True)
    if _triton(x):
        _no_grad_to(sigma=sigma, sigma_next=sigma_next, sigma_max=sigma_max_t)
        return _transition(x, v, sigma, sigma_next, sigma_max_t, noise, prev_sample, _ops.KIND_SDE, a)
    return reference.sde_step(
        x, v, sigma, sigma_next, noise_level=a, sigma_max=sigma_max_t, noise=noise, prev_sample=prev_sample
    )


def _transition(x, v, p0, p1, p2, noise, prev_sample, kind, level, logp_mode=0):
    if noise is not None:
        return _ops.transition_sample_op(x, v, p0, p1, p2, noise, kind, level, logp_mode)
    log_prob, mean, std = _ops.transition_score_op(x, v, p0, p1, p2, prev_sample, kind, level, logp_mode)
    return prev_sample, log_prob, mean, std


CPS_LOG_PROB_FORMS = ("reference", "gaussian")


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

    ``log_prob_form="reference"`` (default): flow_grpo's ``sde_type='cps'`` log-prob
    ``-mean_dims (prev - mean)^2`` (no variance, no constants), the scale CPS recipes tune their PPO clip
    range for; ``"gaussian"``: the true Gaussian log-density ``mean_dims log N(prev; mean, std^2)``.  Either
    form is 0 on a point mass (``std == 0``, the step to ``sigma_next == 0``).
    """
    sigma, sigma_next = _solver_common(x, v, sigma, sigma_next)
    a = check_nonneg_number("noise_level", noise_level)
    check_noise_xor_prev(noise, prev_sample, x)
    if log_prob_form not in CPS_LOG_PROB_FORMS:
        raise ValueError(f"log_prob_form: expected 'reference' or 'gaussian', got {log_prob_form!r}")
    if _triton(x):
        _no_grad_to(sigma=sigma, sigma_next=sigma_next)
        mode = _ops.LOGP_SQUARED if log_prob_form == "reference" else _ops.LOGP_GAUSSIAN
        return _transition(
            x, v, sigma, sigma_next, sigma, noise, prev_sample, _ops.KIND_CPS, _ops.cps_level(a), mode
        )
    return reference.cps_step(
        x,
        v,
        sigma,
        sigma_next,
        noise_level=a,
        noise=noise,
        prev_sample=prev_sample,
        log_prob_form=log_prob_form,
    )


def ddim_step(x, eps, alpha_bar, alpha_bar_prev, *, eta, noise=None, prev_sample=None):
    """math.md §1 DDIM step with ``eta`` for epsilon models -> ``(prev_sample, log_prob, mean, std)``."""
    check_tensor("x", x)
    check_like("eps", eps, "x", x)
    b = x.shape[0]
    ab = per_sample("alpha_bar", alpha_bar, b, x.device)
    abp = per_sample("alpha_bar_prev", alpha_bar_prev, b, x.device)
    check_range("alpha_bar", ab, 0.0, 1.0, lo_open=True, hi_open=True)
    check_range("alpha_bar_prev", abp, 0.0, 1.0, lo_open=True)
    if host_values_known(ab, abp) and bool((abp <= ab).any()):
        i = int((abp <= ab).nonzero()[0, 0])
        raise ValueError(
            "alpha_bar_prev: expected alpha_bar_prev > alpha_bar (a step goes towards the data), got "
            f"alpha_bar_prev={float(abp[i])} <= alpha_bar={float(ab[i])} at sample {i}"
        )
    e = check_nonneg_number("eta", eta)
    check_noise_xor_prev(noise, prev_sample, x)
    if _triton(x):
        _no_grad_to(alpha_bar=ab, alpha_bar_prev=abp)
        return _transition(x, eps, ab, abp, ab, noise, prev_sample, _ops.KIND_DDIM, e)
    return reference.ddim_step(x, eps, ab, abp, eta=e, noise=noise, prev_sample=prev_sample)


def dpm2_step(x, v, sigma, sigma_next, *, x0_prev=None, sigma_prev=None):
    """math.md §1 DPM-Solver++(2M) step -> ``(x_next, x0_pred)``.

    ``x0_pred = x - sigma v``: pass it as ``x0_prev`` (and this ``sigma`` as ``sigma_prev``) to the next step.
    The first step (``x0_prev=None``), a step from ``sigma_prev == 1`` and the last step (``sigma_next == 0``)
    are first order.
    """
    sigma, sigma_next = _solver_common(x, v, sigma, sigma_next)
    if (x0_prev is None) != (sigma_prev is None):
        given = "x0_prev only" if x0_prev is not None else "sigma_prev only"
        raise ValueError(
            f"x0_prev / sigma_prev: expected both (second order) or neither (first order), got {given}"
        )
    if x0_prev is not None:
        check_like("x0_prev", x0_prev, "x", x)
        sigma_prev = per_sample("sigma_prev", sigma_prev, x.shape[0], x.device)
        check_sigma_order(sigma_prev, sigma, names=("sigma_prev", "sigma"))
    if _triton(x):
        _no_grad_to(sigma=sigma, sigma_next=sigma_next, sigma_prev=sigma_prev)
        return _ops.dpm2_step_op(x, v, sigma, sigma_next, x0_prev, sigma_prev)
    return reference.dpm2_step(x, v, sigma, sigma_next, x0_prev, sigma_prev)


def gaussian_log_prob(x, mean, std, reduce="mean"):
    """math.md §1 Gaussian log-density of ``x`` under ``N(mean, std^2)`` reduced per row -> fp32 ``[B]``."""
    check_tensor("x", x)
    check_like("mean", mean, "x", x)
    std = per_sample("std", std, x.shape[0], x.device)
    check_range("std", std, 0.0, math.inf)
    reduce = check_reduce(reduce)
    if _triton(x):
        _no_grad_to(std=std)
        return _ops.gaussian_log_prob_op(x, mean, std, reduce == "mean")
    return reference.gaussian_log_prob(x, mean, std, reduce)


def gaussian_kl(mean_p, std_p, mean_q, std_q, reduce="mean"):
    """math.md §1 closed-form ``KL(N(mean_p, std_p^2) || N(mean_q, std_q^2))`` per row -> fp32 ``[B]``."""
    check_tensor("mean_p", mean_p)
    check_like("mean_q", mean_q, "mean_p", mean_p)
    b = mean_p.shape[0]
    std_p = per_sample("std_p", std_p, b, mean_p.device)
    std_q = per_sample("std_q", std_q, b, mean_p.device)
    check_range("std_p", std_p, 0.0, math.inf, lo_open=True)
    check_range("std_q", std_q, 0.0, math.inf, lo_open=True)
    reduce = check_reduce(reduce)
    if _triton(mean_p):
        _no_grad_to(std_p=std_p, std_q=std_q)
        return _ops.gaussian_kl_op(mean_p, std_p, mean_q, std_q, reduce == "mean")
    return reference.gaussian_kl(mean_p, std_p, mean_q, std_q, reduce)


def nft_loss(
    v, v_old, x0, noise, t, r, *, beta, adv_clip_max=5.0, weighting="adaptive", v_ref=None, kl_coef=0.0
):
    """math.md §2 step 6 DiffusionNFT loss (scalar fp32), differentiable in ``v`` only.

    ``v_pos = beta v + (1 - beta) v_old``, ``v_neg = (1 + beta) v_old - beta v``; adaptive weighting divides
    each row's squared x0-error by its detached mean absolute error; ``weighting="none"`` is the paper's plain
    velocity form.  ``loss = mean_b[m (r L_pos + (1 - r) L_neg) / beta] + kl_coef mean (v - v_ref)^2``.
    """
    check_tensor("v", v)
    for name, y in (("v_old", v_old), ("x0", x0), ("noise", noise)):
        check_like(name, y, "v", v)
    b = v.shape[0]
    t = per_sample("t", t, b, v.device)
    r = per_sample("r", r, b, v.device)
    check_range("t", t, 0.0, 1.0)
    check_range("r", r, 0.0, 1.0)
    beta = check_positive_number("beta", beta)
    m = check_positive_number("adv_clip_max", adv_clip_max)
    if weighting not in ("adaptive", "none"):
        raise ValueError(f"weighting: expected 'adaptive' or 'none', got {weighting!r}")
    kl_coef = check_nonneg_number("kl_coef", kl_coef)
    if v_ref is not None:
        check_like("v_ref", v_ref, "v", v)
    elif kl_coef > 0:
        raise ValueError(f"v_ref: expected a tensor because kl_coef={kl_coef} > 0, got None")
    if _triton(v):
        # v_old and v_ref are stop-gradients (as in the reference); x0 / noise / t / r get no gradient here.
        _no_grad_to(x0=x0, noise=noise, t=t, r=r)
        loss, _, _ = _ops.nft_loss_op(
            v,
            v_old.detach(),
            x0,
            noise,
            t,
            r,
            v_ref.detach() if (v_ref is not None and kl_coef != 0.0) else None,
            beta,
            m,
            weighting == "adaptive",
            kl_coef,
        )
        return loss
    return reference.nft_loss(
        v,
        v_old,
        x0,
        noise,
        t,
        r,
        beta=beta,
        adv_clip_max=m,
        weighting=weighting,
        v_ref=v_ref,
        kl_coef=kl_coef,
    )


PREFERENCE_FORMS = ("dpo", "mapo")
DPO_CONVENTIONS = ("salesforce", "diffusers")
PreferenceLoss = reference.PreferenceLoss
# the reference implementations' defaults: SalesforceAIResearch/DiffusionDPO@5233e759 train.py --beta_dpo
# 5000; huggingface/diffusers@071190da examples/research_projects/diffusion_dpo/train_diffusion_dpo.py
# --beta_dpo 2500 (the same loss); mapo-t2i/mapo@374b3d3d args.py --beta_mapo 0.1, --snr_value 0.5, and
# utils.py compute_loss's noise_scheduler.config.num_train_timesteps (1000 for SDXL).
_DPO_BETA = {"salesforce": 5000.0, "diffusers": 2500.0}
_MAPO_DEFAULTS = {"beta": 0.1, "snr_value": 0.5, "num_train_timesteps": 1000.0}


def preference_loss(
    pred_w,
    pred_l,
    target_w,
    target_l,
    *,
    form="dpo",
    ref_w=None,
    ref_l=None,
    beta=None,
    dpo_convention=None,
    snr_value=None,
    num_train_timesteps=None,
):
    """math.md §6 paired-error losses in one fused pass -> ``PreferenceLoss(loss, err_w, err_l, err_w_ref,
    err_l_ref)``; differentiable in ``pred_w`` and ``pred_l``.

    ``err_* = mean_dims (pred_* - target_*)^2`` per sample (fp32 ``[B]``).  The target is the caller's:
    ``noise`` for epsilon models, ``noise - x0`` for flow models (winner and loser share ``noise`` and ``t``,
    see ``paired_interpolate``, but their targets differ where ``x0`` enters).

    * ``form="dpo"`` (Diffusion-DPO; needs ``ref_w``, ``ref_l``, the frozen reference model's predictions):
      ``Delta = (err_w - err_w_ref) - (err_l - err_l_ref)``, ``loss = mean_b -logsigmoid(-temp Delta)``.
      ``dpo_convention="salesforce"`` (default; SalesforceAIResearch/DiffusionDPO train.py, flow_grpo's
      scripts/train_sd3_dpo.py): ``temp = beta / 2``, default ``beta`` 5000 (SD1.5; flow_grpo's SD3 recipe
      uses 100).  ``"diffusers"`` (diffusers' train_diffusion_dpo.py): ``temp = beta``, default ``beta``
      2500 -- the same loss.  Implicit reward accuracy: the fraction of samples with ``Delta < 0``.
    * ``form="mapo"`` (MaPO, no reference model): ``f(x) = x / (e^x - 1)`` (``f(0) = 1``),
      ``loss = mean_b err_w - beta mean_b logsigmoid(T (f(s err_w) - f(s err_l)))`` with the reference's
      defaults ``beta`` 0.1, ``s = snr_value`` 0.5, ``T = num_train_timesteps`` 1000.  ``f`` is evaluated
      without the cancellation of ``e^x - 1`` (math.md §6).

    Inputs: tensors of one shape ``[B, ...]`` (rank >= 2, ``B >= 1``) on one device, fp32 / fp16 / bf16
    storage (math in fp32).  ``loss`` is 0-dim fp32; the errors are fp32 ``[B]``; the reference errors are
    detached (None for MaPO).  The reference model's predictions are stop-gradients on every backend; the
    Triton backend refuses a gradient request for the targets (detach them, or use the reference backend).
    """
    check_tensor("pred_w", pred_w)
    for name, y in (("pred_l", pred_l), ("target_w", target_w), ("target_l", target_l)):
        check_like(name, y, "pred_w", pred_w)
    if pred_w.numel() == 0:
        raise ValueError(
            f"pred_w: expected at least one sample and one element, got shape {tuple(pred_w.shape)}"
        )
    if form not in PREFERENCE_FORMS:
        raise ValueError(f"form: expected one of {PREFERENCE_FORMS}, got {form!r}")
    if form == "dpo":
        if ref_w is None or ref_l is None:
            given = "ref_w only" if ref_w is not None else ("ref_l only" if ref_l is not None else "neither")
            raise ValueError(
                "ref_w / ref_l: expected both (the frozen reference model's predictions) for form='dpo', "
                f"got {given}"
            )
        check_like("ref_w", ref_w, "pred_w", pred_w)
        check_like("ref_l", ref_l, "pred_w", pred_w)
        for name, val in (("snr_value", snr_value), ("num_train_timesteps", num_train_timesteps)):
            if val is not None:
                raise ValueError(f"{name}: a MaPO option; expected None for form='dpo', got {val!r}")
        dpo_convention = "salesforce" if dpo_convention is None else dpo_convention
        if dpo_convention not in DPO_CONVENTIONS:
            raise ValueError(f"dpo_convention: expected one of {DPO_CONVENTIONS}, got {dpo_convention!r}")
        beta = check_positive_number("beta", _DPO_BETA[dpo_convention] if beta is None else beta)
        temp = 0.5 * beta if dpo_convention == "salesforce" else beta
        snr_value, num_train_timesteps = _MAPO_DEFAULTS["snr_value"], _MAPO_DEFAULTS["num_train_timesteps"]
    else:
        for name, val in (("ref_w", ref_w), ("ref_l", ref_l), ("dpo_convention", dpo_convention)):
            if val is not None:
                raise ValueError(f"{name}: MaPO uses no reference model; expected None for form='mapo'")
        beta = check_positive_number("beta", _MAPO_DEFAULTS["beta"] if beta is None else beta)
        snr_value = check_positive_number(
            "snr_value", _MAPO_DEFAULTS["snr_value"] if snr_value is None else snr_value
        )
        num_train_timesteps = check_positive_number(
            "num_train_timesteps",
            _MAPO_DEFAULTS["num_train_timesteps"] if num_train_timesteps is None else num_train_timesteps,
        )
        temp = 0.0
    if _triton(pred_w):
        _no_grad_to(target_w=target_w, target_l=target_l)
        has_ref = form == "dpo"
        loss, errs, _ = _ops.preference_loss_op(
            pred_w,
            pred_l,
            target_w,
            target_l,
            ref_w.detach() if has_ref else None,
            ref_l.detach() if has_ref else None,
            _ops.FORM_DPO if has_ref else _ops.FORM_MAPO,
            temp,
            beta,
            snr_value,
            num_train_timesteps,
        )
        if has_ref:
            return PreferenceLoss(loss, errs[0], errs[1], errs[2].detach(), errs[3].detach())
        return PreferenceLoss(loss, errs[0], errs[1])
    return reference.preference_loss(
        pred_w,
        pred_l,
        target_w,
        target_l,
        form=form,
        beta=beta,
        ref_w=ref_w,
        ref_l=ref_l,
        dpo_convention=dpo_convention or "salesforce",
        snr_value=snr_value,
        num_train_timesteps=num_train_timesteps,
    )


# ----------------------------------------------------------------------------------------------------------
# DiT fast path (issue #6): LayerNorm + adaLN modulation, gated residual, QK RMSNorm, FLUX rotary embedding.
# Used by models/patch.py; any diffusers-style DiT can call them directly.
# ----------------------------------------------------------------------------------------------------------
if _dispatch.HAS_TRITON:
    from .ops import dit as _dit
else:  # pragma: no cover
    _dit = None

__all__ += ["ada_layer_norm", "gated_residual", "rms_norm", "rotary_emb"]


def _check_tokens(name: str, x) -> None:
    check_tensor(name, x, min_ndim=3)
    if x.ndim != 3:
        raise ValueError(f"{name}: expected a tensor shaped [B, L, C], got shape {tuple(x.shape)}")


def _check_per_channel(name: str, s, x, x_name: str) -> None:
    check_tensor(name, s, min_ndim=1)
    if tuple(s.shape) != (x.shape[0], x.shape[2]):
        raise ValueError(
            f"{name}: expected shape {(x.shape[0], x.shape[2])} ([B, C] of {x_name}), got {tuple(s.shape)}"
        )
    if s.device != x.device:
        raise ValueError(f"{name}: expected a tensor on {x.device} (that of {x_name}), got one on {s.device}")


def ada_layer_norm(x, scale, shift, eps=1e-6):
    """``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]`` in one pass (adaLN modulation).

    ``x`` ``[B, L, C]``; ``scale``, ``shift`` ``[B, C]`` (per sample, broadcast over the ``L`` tokens); the
    LayerNorm has no affine (diffusers' AdaLayerNormZero / AdaLayerNormContinuous, eps 1e-6).  fp32 math;
    output in ``x``'s dtype.  Differentiable in ``x``, ``scale`` and ``shift``.
    """
    _check_tokens("x", x)
    _check_per_channel("scale", scale, x, "x")
    _check_per_channel("shift", shift, x, "x")
    eps = check_positive_number("eps", eps)
    if _triton(x):
        return _dit.ada_layer_norm_op(x, scale, shift, eps)[0]
    return reference.ada_layer_norm(x, scale, shift, eps)


def gated_residual(x, y, gate):
    """``x + gate[:, None] * y`` in one pass (the adaLN-Zero gated residual of a DiT block).

    ``x``, ``y`` ``[B, L, C]``; ``gate`` ``[B, C]``.  fp32 math; output in the promoted dtype of the three.
    Differentiable in all three (``d gate`` sums over tokens in a fixed order).
    """
    _check_tokens("x", x)
    check_like("y", y, "x", x)
    _check_per_channel("gate", gate, x, "x")
    if _triton(x):
        return _dit.gated_residual_op(x, y, gate)
    return reference.gated_residual(x, y, gate)


def rms_norm(x, weight=None, eps=1e-6, *, out_dtype=None):
    """``x * rsqrt(mean(x^2 over the last dim) + eps) * weight`` (the QK RMSNorm of SD3.5 / FLUX).

    ``x`` ``[..., D]`` (e.g. ``[B, S, H, D]`` after the head split: a view, so no separate split kernel is
    needed); ``weight`` ``[D]`` or None.  fp32 math; output in ``out_dtype`` (default ``x``'s dtype).
    Differentiable in ``x`` and ``weight``.
    """
    check_tensor("x", x, min_ndim=1)
    if weight is not None:
        check_tensor("weight", weight, min_ndim=1)
        if tuple(weight.shape) != (x.shape[-1],):
            raise ValueError(
                f"weight: expected shape {(x.shape[-1],)} (the last dim of x), got {tuple(weight.shape)}"
            )
        if weight.device != x.device:
            raise ValueError(
                f"weight: expected a tensor on {x.device} (that of x), got one on {weight.device}"
            )
    eps = check_positive_number("eps", eps)
    out_dtype = out_dtype or x.dtype
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"out_dtype: expected float32, float16 or bfloat16, got {out_dtype}")
    if _triton(x):
        return _dit.rms_norm_op(x, weight, eps, out_dtype)[0]
    return reference.rms_norm(x, weight, eps, out_dtype)


def rotary_emb(x, cos, sin, sequence_dim=1):
    """FLUX rotary embedding: diffusers ``apply_rotary_emb(x, (cos, sin), use_real=True,
    use_real_unbind_dim=-1, sequence_dim=...)``, i.e. per interleaved pair ``(x[2i], x[2i+1])``:
    ``out[2i] = x[2i] cos[2i] - x[2i+1] sin[2i]``, ``out[2i+1] = x[2i+1] cos[2i+1] + x[2i] sin[2i+1]``.

    ``x`` ``[B, S, H, D]`` (``sequence_dim=1``) or ``[B, H, S, D]`` (``sequence_dim=2``), ``D`` even;
    ``cos``, ``sin`` ``[S, D]``.  fp32 math; output in ``x``'s dtype.  Differentiable in ``x`` only.
    """
    check_tensor("x", x, min_ndim=4)
    if x.ndim != 4:
        raise ValueError(f"x: expected a tensor shaped [B, S, H, D] or [B, H, S, D], got {tuple(x.shape)}")
    if sequence_dim not in (1, 2):
        raise ValueError(f"sequence_dim: expected 1 or 2, got {sequence_dim!r}")
    if x.shape[-1] % 2:
        raise ValueError(f"x: expected an even last dim (pairs), got {x.shape[-1]}")
    want = (x.shape[sequence_dim], x.shape[-1])
    for name, c in (("cos", cos), ("sin", sin)):
        check_tensor(name, c)
        if tuple(c.shape) != want:
            raise ValueError(f"{name}: expected shape {want} ([S, D] of x), got {tuple(c.shape)}")
        if c.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (that of x), got one on {c.device}")
    if _triton(x):
        _no_grad_to(cos=cos, sin=sin)
        return _dit.rotary_emb_op(x, cos, sin, int(sequence_dim))
    return reference.rotary_emb(x, cos, sin, sequence_dim)
