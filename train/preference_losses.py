"""The preference losses of math.md §6 on per-sample errors: Diffusion-DPO, Diffusion-KTO and MaPO.

Every loss takes ``err = mean_dims (pred - target)^2`` per sample (fp32 ``[B]``; :func:`per_sample_error`),
target ``noise`` (epsilon models) or ``noise - x0`` (flow models), and returns ``(loss, stats)``: the scalar
loss and a dict of detached per-batch statistics (implicit reward accuracy and margins).

``paired_loss`` is the one call train.dpo makes for the paired methods (DPO, MaPO): from the predictions and
targets to the loss and the per-sample errors (DPO through the fused ``kernels.preference_loss``);
``dpo_loss`` and ``mapo_loss`` are the losses on per-sample errors given by the caller.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

import kernels

__all__ = [
    "per_sample_error",
    "dpo_loss",
    "kto_loss",
    "mapo_loss",
    "paired_loss",
    "BETA_CONVENTION",
]

# The convention train.dpo's --train.beta uses (SalesforceAIResearch/DiffusionDPO@5233e759 train.py
# ``scale_term = -0.5 * args.beta_dpo``; yifan123/flow_grpo@ac4c86e8 scripts/train_sd3_dpo.py the same): the
# diffusers port's beta' (huggingface/diffusers@071190da examples/research_projects/diffusion_dpo/
# train_diffusion_dpo.py, ``-logsigmoid(-beta' delta)``) is beta / 2.
BETA_CONVENTION = "loss = -logsigmoid(-0.5 beta delta) (Diffusion-DPO's beta_dpo; diffusers' port: beta/2)"


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """math.md §6: ``err = mean over every non-batch dim of (pred - target)^2`` in fp32 -> ``[B]``."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def dpo_loss(
    err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, *, beta: float
) -> tuple[torch.Tensor, dict]:
    """math.md §6 Diffusion-DPO (eps and flow alike):

    ``delta = (err_w - ref_w) - (err_l - ref_l)``, ``inside = -0.5 beta delta``,
    ``loss = mean_b -logsigmoid(inside)``.

    Stats: ``implicit_acc = mean_b [inside > 0]``, ``margin = mean_b inside`` (the implicit reward margin),
    ``w_diff`` / ``l_diff`` (``mean err - ref``).  As SalesforceAIResearch/DiffusionDPO@5233e759 train.py and
    yifan123/flow_grpo@ac4c86e8 scripts/train_sd3_dpo.py (``inside_term``, ``implicit_acc``)."""
    w_diff = err_w - ref_w.detach()
    l_diff = err_l - ref_l.detach()
    inside = -0.5 * beta * (w_diff - l_diff)
    loss = -F.logsigmoid(inside).mean()
    d = inside.detach()
    stats = {
        "implicit_acc": (d > 0).float().mean(),
        "margin": d.mean(),
        "w_diff": w_diff.detach().mean(),
        "l_diff": l_diff.detach().mean(),
        "err_w": err_w.detach().mean(),
        "err_l": err_l.detach().mean(),
    }
    return loss, stats


def kto_loss(
    err: torch.Tensor,
    ref_err: torch.Tensor,
    desirable: torch.Tensor,
    *,
    beta: float,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    global_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict]:
    """math.md §6 Diffusion-KTO (unpaired; each image its own noise and t):

    ``g = err_ref - err``; ``z0 = sg(max(0, mean g))`` over the GLOBAL batch (``global_mean``: the mean of
    every process's batch mean, all-reduced under torchrun, as the reference's ``accelerator.reduce(kl,
    "mean")``; None: this batch); ``u = beta (g - z0)``; desirable ``lambda_d (1 - sigmoid(u))``,
    undesirable ``lambda_u (1 - sigmoid(-u))``; ``loss = mean_b``.

    As jacklishufan/diffusion-kto@226bbd02 train_kto_sd_v1.5.py (``--loss kto --halo sigmoid``,
    ``--bce_offset none``: ``kl = reduce(g.mean()).clamp(min=0)``; beta ``--beta_dpo`` without the 0.5).
    Stats: ``implicit_acc = mean_b [sign u > 0]`` (the reference's ``acc``), ``z0``, ``g_pos`` / ``g_neg``."""
    desirable = desirable.bool()
    g = ref_err.detach() - err
    kl = g.detach().mean()
    if global_mean is not None:
        kl = global_mean(kl)
    z0 = kl.clamp(min=0)
    sgn = desirable.float() * 2 - 1
    signed = sgn * beta * (g - z0)
    h = torch.sigmoid(signed)
    w = torch.where(desirable, torch.full_like(h, lambda_d), torch.full_like(h, lambda_u))
    loss = (w * (1 - h)).mean()
    gd = g.detach()
    npos, nneg = desirable.sum(), (~desirable).sum()
    stats = {
        "implicit_acc": (signed.detach() > 0).float().mean(),
        "z0": z0,
        "g_pos": (gd * desirable).sum() / (npos + 1e-6),
        "g_neg": (gd * ~desirable).sum() / (nneg + 1e-6),
        "err": err.detach().mean(),
    }
    return loss, stats


def mapo_loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    *,
    beta: float = 0.1,
    snr: float = 0.5,
    num_train_timesteps: int = 1000,
) -> tuple[torch.Tensor, dict]:
    """math.md §6 MaPO (no reference model):

    ``f(e) = s e / (exp(s e) - 1)``; ``ratio = logsigmoid(T (f(err_w) - f(err_l)))``;
    ``loss = mean_b err_w - beta mean_b ratio`` with ``s`` = ``snr`` (0.5), ``T`` = the scheduler's
    ``num_train_timesteps`` (1000), ``beta`` 0.1.

    As mapo-t2i/mapo@374b3d3d utils.py ``compute_loss`` (``args.snr_value``, ``args.beta_mapo``,
    ``noise_scheduler.config.num_train_timesteps``).  Stats: ``implicit_acc = mean_b [f(err_w) > f(err_l)]``
    (the winner's log-odds above the loser's, i.e. ``err_w < err_l``), ``margin = mean_b T (f_w - f_l)``."""
    fw = snr * err_w / (torch.exp(snr * err_w) - 1)
    fl = snr * err_l / (torch.exp(snr * err_l) - 1)
    log_odds = fw - fl
    ratio = F.logsigmoid(log_odds * num_train_timesteps)
    loss = err_w.mean() - (beta * ratio).mean()
    d = log_odds.detach()
    stats = {
        "implicit_acc": (d > 0).float().mean(),
        "margin": (d * num_train_timesteps).mean(),
        "ratio": ratio.detach().mean(),
        "err_w": err_w.detach().mean(),
        "err_l": err_l.detach().mean(),
    }
    return loss, stats


def paired_loss(
    pred_w: torch.Tensor,
    pred_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    *,
    ref_w: torch.Tensor | None = None,
    ref_l: torch.Tensor | None = None,
    form: str = "dpo",
    beta: float,
    snr: float = 0.5,
    num_train_timesteps: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """DPO (``form="dpo"``, needs the reference predictions ``ref_w``/``ref_l``) or MaPO (``form="mapo"``,
    refuses them) from predictions -> ``(loss, err_w, err_l, stats)``.  DPO goes through the fused
    ``kernels.preference_loss`` (the Triton kernel on CUDA, its PyTorch reference on the CPU), with
    :func:`dpo_loss`'s statistics from the kernel's detached per-sample errors; MaPO through
    :func:`mapo_loss`."""
    if form == "mapo":
        if ref_w is not None or ref_l is not None:
            raise ValueError("paired_loss: form 'mapo' has no reference model, got reference predictions")
        # Not the fused kernel: its f(x) = x / (e^x - 1) avoids the fp32 cancellation the reference code has
        # (mapo-t2i/mapo@374b3d3d utils.py), so at errors near 0.05 the two losses differ by ~0.7%; training
        # follows the reference's arithmetic.
        err_w, err_l = per_sample_error(pred_w, target_w), per_sample_error(pred_l, target_l)
        loss, stats = mapo_loss(err_w, err_l, beta=beta, snr=snr, num_train_timesteps=num_train_timesteps)
        return loss, err_w.detach(), err_l.detach(), stats
    if form != "dpo":
        raise ValueError(f"paired_loss: expected form 'dpo' or 'mapo', got {form!r}")
    if ref_w is None or ref_l is None:
        raise ValueError("paired_loss: form 'dpo' expected the reference predictions ref_w and ref_l")
    out = kernels.preference_loss(
        pred_w, pred_l, target_w, target_l, form="dpo", ref_w=ref_w, ref_l=ref_l, beta=beta
    )
    err_w, err_l = out.err_w.detach(), out.err_l.detach()
    w_diff, l_diff = err_w - out.err_w_ref, err_l - out.err_l_ref
    inside = -0.5 * beta * (w_diff - l_diff)
    stats = {
        "implicit_acc": (inside > 0).float().mean(),
        "margin": inside.mean(),
        "w_diff": w_diff.mean(),
        "l_diff": l_diff.mean(),
        "err_w": err_w.mean(),
        "err_l": err_l.mean(),
    }
    return out.loss, err_w, err_l, stats
