"""train.preference_losses against transcriptions of the public reference losses, on identical tensors.

* Diffusion-DPO, eps: SalesforceAIResearch/DiffusionDPO@5233e759 train.py (lines 1118-1146, "START LOSS
  COMPUTATION"): ``scale_term = -0.5 * args.beta_dpo``, default 5000.
* Diffusion-DPO, flow: yifan123/flow_grpo@ac4c86e8 scripts/train_sd3_dpo.py (lines 924-946): the same loss,
  ``config.train.beta`` 100 (config/dpo.py); and its timestep law (lines 890-903) with diffusers'
  ``compute_density_for_timestep_sampling('logit_normal', 0, 1)`` and the scheduler's training sigmas.
* Diffusion-KTO: jacklishufan/diffusion-kto@226bbd02 train_kto_sd_v1.5.py (lines 1451-1514): ``--loss kto
  --halo sigmoid --bce_offset none``, beta ``--beta_dpo`` 1000, lambda_d = lambda_u = 1.
* MaPO: mapo-t2i/mapo@374b3d3d utils.py ``compute_loss`` (``snr_value`` 0.5, ``beta_mapo`` 0.1,
  ``num_train_timesteps`` 1000).
The transcriptions are this project's own code, faithful to those lines.
"""

import pytest
import torch
import torch.nn.functional as F

from train.preference_losses import dpo_loss, kto_loss, mapo_loss, paired_loss, per_sample_error


# --- transcriptions ---
def ref_diffusion_dpo(model_pred, ref_pred, target, beta_dpo):
    """DiffusionDPO train.py: winners first, losers second along the batch."""
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    loss = -1 * F.logsigmoid(inside_term).mean()
    return loss, implicit_acc


def ref_flow_grpo_dpo(model_pred, model_pred_ref, target, beta):
    """flow_grpo scripts/train_sd3_dpo.py."""
    bsz = target.shape[0] // 2
    theta_mse = ((model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)
    ref_mse = ((model_pred_ref.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)
    w_diff = theta_mse[:bsz] - ref_mse[:bsz]
    l_diff = theta_mse[bsz:] - ref_mse[bsz:]
    inside_term = -0.5 * beta * (w_diff - l_diff)
    loss = torch.mean(-F.logsigmoid(inside_term))
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    return loss, implicit_acc


def ref_kto(model_pred, ref_preds, target, labels, beta_dpo, lambda_d=1.0, lambda_u=1.0, world_kl=None):
    """diffusion-kto train_kto_sd_v1.5.py; ``world_kl`` stands for ``accelerator.reduce(kl_gpu, "mean")``."""
    model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    ref_loss = F.mse_loss(ref_preds.float(), target.float(), reduction="none")
    ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
    policy_KL_logps = -model_losses
    reference_KL_logps = -ref_loss
    g_term = policy_KL_logps - reference_KL_logps
    scale_term = beta_dpo
    label_sgn = 2 * labels - 1
    labels_binary = labels == 1
    kl_gpu = g_term.mean().detach()
    kl = kl_gpu if world_kl is None else world_kl(kl_gpu)
    kl = kl.clamp(min=0).detach()
    g_term = g_term - kl
    label_scale_g = label_sgn * scale_term * g_term
    h = torch.sigmoid(label_scale_g)
    w_y = lambda_d * labels_binary + lambda_u * ~labels_binary
    l_kto = w_y * (1 - h)
    acc = (label_scale_g > 0).sum().detach() / len(label_scale_g)
    return l_kto.mean(), acc, kl


def ref_mapo(model_pred, target, snr_value=0.5, beta_mapo=0.1, num_train_timesteps=1000):
    """mapo utils.py compute_loss."""
    model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    log_odds = (snr_value * model_losses_w) / (torch.exp(snr_value * model_losses_w) - 1) - (
        snr_value * model_losses_l
    ) / (torch.exp(snr_value * model_losses_l) - 1)
    ratio = F.logsigmoid(log_odds * num_train_timesteps)
    ratio_losses = beta_mapo * ratio
    loss = model_losses_w.mean() - ratio_losses.mean()
    return loss, model_losses_w, model_losses_l


# --- tensors ---
def _tensors(b=6, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(2 * b, 4, 8, 8, generator=g)
    # predictions near the target so the errors are small, as a trained model's (and beta 5000 not saturated)
    model = target + scale * torch.randn(2 * b, 4, 8, 8, generator=g)
    ref = target + scale * torch.randn(2 * b, 4, 8, 8, generator=g)
    return model.requires_grad_(True), ref, target


def _grad(loss, x):
    (gx,) = torch.autograd.grad(loss, x, retain_graph=True)
    return gx


@pytest.mark.parametrize("beta", [5000.0, 100.0, 2500.0])
def test_dpo_matches_both_references(beta):
    model, ref, target = _tensors()
    b = target.shape[0] // 2
    loss, ew, el, stats = paired_loss(
        model[:b], model[b:], target[:b], target[b:], ref_w=ref[:b], ref_l=ref[b:], form="dpo", beta=beta
    )
    for fn in (ref_diffusion_dpo, ref_flow_grpo_dpo):
        r_loss, r_acc = fn(model, ref, target, beta)
        torch.testing.assert_close(loss, r_loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(_grad(loss, model), _grad(r_loss, model), rtol=1e-5, atol=1e-9)
        assert float(stats["implicit_acc"]) == float(r_acc)
    torch.testing.assert_close(ew, per_sample_error(model[:b], target[:b]))


def test_beta_convention_diffusers_port():
    """diffusers' port writes ``-logsigmoid(-beta' delta)``: our beta 5000 is its beta' 2500."""
    model, ref, target = _tensors()
    b = target.shape[0] // 2
    e = per_sample_error(model, target).detach()
    r = per_sample_error(ref, target)
    ours, _ = dpo_loss(e[:b], e[b:], r[:b], r[b:], beta=5000.0)
    delta = (e[:b] - r[:b]) - (e[b:] - r[b:])
    port = -F.logsigmoid(-2500.0 * delta).mean()
    torch.testing.assert_close(ours, port)


@pytest.mark.parametrize("ndesirable", [0, 2, 5, 8])
def test_kto_matches_reference(ndesirable):
    model, ref, target = _tensors(b=4, seed=1, scale=0.03)
    labels = torch.zeros(8, dtype=torch.long)
    labels[:ndesirable] = 1
    e, r = per_sample_error(model, target), per_sample_error(ref, target)
    loss, stats = kto_loss(e, r, labels.bool(), beta=1000.0)
    r_loss, r_acc, r_kl = ref_kto(model, ref, target, labels, 1000)
    torch.testing.assert_close(loss, r_loss)
    torch.testing.assert_close(_grad(loss, model), _grad(r_loss, model), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(stats["z0"], r_kl)
    assert float(stats["implicit_acc"]) == float(r_acc)


def test_kto_z0_clamp_and_global_mean():
    """z0 = max(0, mean g): a policy worse than the reference on average (g < 0) gives z0 = 0, and under
    torchrun the mean is the all-reduced mean of the ranks' means (here a stand-in reduce)."""
    model, ref, target = _tensors(b=4, seed=2, scale=0.03)
    labels = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0])
    e, r = per_sample_error(model, target), per_sample_error(ref, target)
    worse = e.detach() + 1.0  # err > err_ref everywhere: g < 0
    _, stats = kto_loss(worse, r, labels.bool(), beta=1000.0)
    assert float(stats["z0"]) == 0.0
    other_rank = torch.tensor(0.5)
    fake_reduce = lambda x: (x + other_rank) / 2  # noqa: E731
    loss, stats = kto_loss(e, r, labels.bool(), beta=1000.0, global_mean=fake_reduce)
    r_loss, _, r_kl = ref_kto(model, ref, target, labels, 1000, world_kl=fake_reduce)
    torch.testing.assert_close(loss, r_loss)
    torch.testing.assert_close(stats["z0"], r_kl)
    assert float(stats["z0"]) > 0.2  # the other rank's 0.5 entered


@pytest.mark.parametrize("scale", [0.05, 0.5, 1.5])
def test_mapo_matches_reference(scale):
    model, _, target = _tensors(seed=3, scale=scale)
    b = target.shape[0] // 2
    loss, ew, el, stats = paired_loss(model[:b], model[b:], target[:b], target[b:], form="mapo", beta=0.1)
    r_loss, r_w, r_l = ref_mapo(model, target)
    torch.testing.assert_close(loss, r_loss)
    torch.testing.assert_close(_grad(loss, model), _grad(r_loss, model), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ew, r_w.detach())
    torch.testing.assert_close(el, r_l.detach())
    # MaPO's constants are the reference's defaults
    direct, _ = mapo_loss(r_w.detach(), r_l.detach())
    torch.testing.assert_close(direct, r_loss.detach())


def test_mapo_refuses_a_reference_and_dpo_needs_one():
    model, ref, target = _tensors(b=2)
    with pytest.raises(ValueError, match="no reference"):
        paired_loss(
            model[:2], model[2:], target[:2], target[2:], ref_w=ref[:2], ref_l=ref[2:], form="mapo", beta=0.1
        )
    with pytest.raises(ValueError, match="expected the reference"):
        paired_loss(model[:2], model[2:], target[:2], target[2:], form="dpo", beta=100.0)


def test_flow_timestep_law_matches_flow_grpo():
    """flow_grpo's law: ``u = compute_density_for_timestep_sampling('logit_normal', logit_mean=0,
    logit_std=1)``, ``indices = (u * 1000).long()``, ``sigma = noise_scheduler.sigmas[indices]`` of the
    model's FlowMatchEulerDiscreteScheduler (from its config, no set_timesteps), timestep = 1000 sigma."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from train.dpo import flow_train_sigmas, sample_flow_sigma

    config = {"num_train_timesteps": 1000, "shift": 3.0}
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    torch.manual_seed(7)
    u = compute_density_for_timestep_sampling(
        weighting_scheme="logit_normal", batch_size=64, logit_mean=0, logit_std=1, mode_scale=1.29
    )
    idx = (u * sched.config.num_train_timesteps).long()
    ref_sigma = sched.sigmas[idx]
    ref_timestep = sched.timesteps[idx]
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    normal = torch.normal(mean=0.0, std=1.0, size=(64,))
    sig_table = flow_train_sigmas(config)
    ours = sample_flow_sigma(sig_table, normal)
    torch.testing.assert_close(ours, ref_sigma.float())
    torch.testing.assert_close(1000.0 * ours, ref_timestep.float(), rtol=1e-6, atol=1e-3)
    # shift(1 - i/1000)
    i = idx.float()
    s = 1 - i / 1000
    torch.testing.assert_close(ours, 3 * s / (1 + 2 * s))
    del g
