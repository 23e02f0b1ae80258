"""Reward backprop (math.md §5) against transcriptions of the reference code, on identical tensors:

* AlignProp, mihirp1998/AlignProp@b22918af sd_pipeline.py ``pipeline_step_with_grad`` (the truncation
  point: ``int(Normal(mean, std).sample())`` redrawn while ``>= num_inference_steps or < 1``; the noise
  predictions of steps ``i < b`` detached) and alignprop_trainer.py ``aesthetic_loss_fn`` / ``hps_loss_fn``
  / ``step`` (``loss.mean() * loss_coeff``), config/alignprop_config.py (mean 42, std 5, loss_coeff 0.01,
  aesthetic_target 10, grad_scale 1);
* ReFL, THUDM/ImageReward@c1392c6d ImageReward/ReFL.py (``set_timesteps(40)``, ``mid_timestep =
  random.randint(30, 39)``, ``F.relu(-rewards + 2).mean() * grad_scale`` with grad_scale 1e-3, the DDPM
  scheduler's ancestral step);
* DRaFT+, NVIDIA/NeMo-Aligner@0339ccd8 nemo_aligner/models/mm/stable_diffusion/megatron_sd_draftp_model.py
  (``calculate_gaussian_kl_penalty_shared_var`` on the stacked window predictions, ``.mean()``,
  ``loss = -rewards.mean() + kl_penalty * kl_coeff``) and examples/mm/stable_diffusion/conf/draftp_sd.yaml.
"""

import random

import pytest
import torch
import torch.nn.functional as F

import kernels
import train.alignprop as alignprop
import train.draft as draft
import train.refl as refl
import train.reward_backprop as rb
from engine.schedules import SD15_SCHEDULER_CONFIG, ddim_alpha_bars


# ------------------------------------------------------------------------------------------------ AlignProp
def ref_backprop_timestep(normal_sample, num_inference_steps, mean=42, std=5):
    """sd_pipeline.py, ``backprop_strategy == 'gaussian'``; ``normal_sample(mean, std)`` stands for
    ``torch.distributions.Normal(mean, std).sample().item()``."""
    backprop_timestep = -1
    while backprop_timestep >= num_inference_steps or backprop_timestep < 1:
        backprop_timestep = int(normal_sample(mean, std))
    return backprop_timestep


def test_alignprop_truncation_point_is_the_references():
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        zs = torch.randn(64, generator=g) * 3  # wide draws: many are redrawn
        it_ref, it_ours = iter(zs.tolist()), iter(zs.tolist())
        ref = ref_backprop_timestep(lambda m, s, it=it_ref: m + s * next(it), 50)
        ours = alignprop.truncation_point(lambda it=it_ours: next(it), 50, 42.0, 5.0)
        assert ours == ref
        # the same number of draws were consumed (redraws included)
        assert len(list(it_ref)) == len(list(it_ours))
    assert alignprop.REFERENCE_STEPS == 50
    tc = alignprop.AlignPropTrainConfig()
    assert (tc.trunc_mean, tc.trunc_std, tc.loss_coeff, tc.aesthetic_target, tc.lr) == (42, 5, 0.01, 10, 1e-3)


def ref_aesthetic_loss(rewards, aesthetic_target=10, grad_scale=1):
    if aesthetic_target is None:
        loss = -1 * rewards
    else:
        loss = abs(rewards - aesthetic_target)
    return loss * grad_scale


def ref_hps_loss(scores):
    return 1.0 - scores


@pytest.mark.parametrize("form", ["aesthetic", "aesthetic-none", "hps", "neg"])
def test_alignprop_losses_are_the_references(form):
    r = torch.randn(16, dtype=torch.float64) * 4 + 6
    loss_coeff = 0.01
    if form == "aesthetic":
        ref, ours = ref_aesthetic_loss(r), alignprop.alignprop_loss(r, "aesthetic", 10.0)
    elif form == "aesthetic-none":
        ref, ours = ref_aesthetic_loss(r, None), alignprop.alignprop_loss(r, "aesthetic", None)
    elif form == "hps":
        ref, ours = ref_hps_loss(r), alignprop.alignprop_loss(r, "hps")
    else:  # another reward: the maximisation the reference applies without a target
        ref, ours = -1 * r, alignprop.alignprop_loss(r, "neg")
    torch.testing.assert_close(loss_coeff * ours.mean(), ref.mean() * loss_coeff, rtol=0, atol=0)
    assert alignprop.resolve_loss_form("auto", ["laion_aesthetic"]) == "aesthetic"
    assert alignprop.resolve_loss_form("auto", ["hpsv2"]) == "hps"
    assert alignprop.resolve_loss_form("auto", ["saturation"]) == "neg"


# ------------------------------------------------------------------------------------------------ ReFL
def test_refl_stop_steps_and_timesteps_are_the_references():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    sched.set_timesteps(40)
    ts, _ = ddim_alpha_bars(40, scheduler_config=SD15_SCHEDULER_CONFIG)
    assert ts.tolist() == sched.timesteps.tolist()  # 976 .. 1, "leading"
    lo, hi = refl.stop_range(40)
    rng = random.Random(0)
    draws = {rng.randint(30, 39) for _ in range(500)}
    assert (lo, hi) == (min(draws), max(draws)) == (30, 39)
    assert int(ts[lo]) == 226  # the grad call is at t' <= 226
    tc = refl.ReFLTrainConfig()
    assert (tc.hinge_target, tc.loss_scale) == (2.0, 1e-3) and refl.preset_sd15().train.lr == 1e-5


def test_refl_hinge_is_the_references():
    rewards = torch.randn(32) * 2 + 1.5  # on both sides of the hinge
    ref = F.relu(-rewards + 2).mean() * 1e-3
    torch.testing.assert_close(refl.refl_loss(rewards, 2.0, 1e-3), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("j", [0, 17, 30, 38])
def test_refl_ddpm_ancestral_step_is_ddim_eta_1(j):
    """The reference's no-grad steps are DDPMScheduler.step (fixed_small variance) on the 40 "leading"
    timesteps; train.refl's SD1.5 preset runs DDIM eta 1 on the same timesteps (math.md §1): the same
    transition, given the same noise."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    sched.set_timesteps(40)
    ts, ab = ddim_alpha_bars(40, scheduler_config=SD15_SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(j)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    gen = torch.Generator().manual_seed(100 + j)
    out = sched.step(eps, sched.timesteps[j], x, generator=gen)
    noise = torch.randn(eps.shape, generator=torch.Generator().manual_seed(100 + j), dtype=eps.dtype)
    with kernels.use_backend("reference"):
        ours, _, _, _ = kernels.ddim_step(
            x.float(), eps.float(), ab[j].expand(2), ab[j + 1].expand(2), eta=1.0, noise=noise.float()
        )
    torch.testing.assert_close(ours, out.prev_sample.float(), rtol=1e-4, atol=1e-5)
    x0 = rb.x0_from_prediction("ddim", x.float(), eps.float(), ab[j])
    torch.testing.assert_close(x0, out.pred_original_sample.float(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ DRaFT+
def ref_calculate_gaussian_kl_penalty_shared_var(curr_eps, init_eps):
    diff = curr_eps - init_eps
    kl = torch.sum(diff**2, dim=(1, 2, 3, 4), keepdim=True).flatten()
    dimensionality = torch.numel(curr_eps[0])
    kl /= dimensionality
    return kl


@pytest.mark.parametrize("k", [1, 3])
def test_draft_plus_kl_and_loss_are_the_references(k):
    g = torch.Generator().manual_seed(k)
    preds = [torch.randn(4, 3, 5, 5, generator=g) for _ in range(k)]
    inits = [torch.randn(4, 3, 5, 5, generator=g) for _ in range(k)]
    rewards = torch.rand(4, generator=g)
    kl_coeff = 1.0  # draftp_sd.yaml
    kl_ref = ref_calculate_gaussian_kl_penalty_shared_var(torch.stack(preds), torch.stack(inits)).mean()
    kl = draft.kl_penalty(preds, inits)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(-rewards.mean() + kl * kl_coeff, -rewards.mean() + kl_ref * kl_coeff)
    sd = draft.preset_sd15()
    assert (sd.sample.num_steps, sd.sample.eta, sd.sample.guidance_scale) == (50, 0.0, 7.5)
    assert (sd.train.k, sd.train.kl_coeff, sd.train.lr, sd.train.grad_clip) == (1, 1.0, 1e-4, 10.0)
