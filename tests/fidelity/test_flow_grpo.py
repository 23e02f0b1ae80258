"""Flow-GRPO against its public reference code, on identical tensors.

Transcribed (our own code, faithful to theirs):

* ``sde_step_with_logprob`` with ``sde_type`` ``'sde'`` and ``'cps'``: yifan123/flow_grpo@54809b5f
  flow_grpo/diffusers_patch/sd3_sde_with_logprob.py (the ``'sde'`` branch is unchanged since
  yifan123/flow_grpo@ac4c86e8, which has no ``'cps'``);
* the KL term and the PPO clip loss: yifan123/flow_grpo@ac4c86e8 scripts/train_sd3.py
  (``kl_loss = ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=(1,2,3), keepdim=True)
  / (2 * std_dev_t ** 2)``; ``torch.mean(torch.maximum(-A ratio, -A clamp(ratio, 1 - eps, 1 + eps)))`` with
  ``A`` clamped to ``[-adv_clip_max, adv_clip_max]``).

The reference draws ``variance_noise`` with ``randn_tensor``; the transcription takes it as an argument so
both sides see the same noise.  The schedule is the one the reference samples on
(``FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(10)``, computed by diffusers), including the first
step from ``sigma == 1`` where ``sigma_max = sigmas[1]`` replaces sigma in ``std_dev_t``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import kernels
import train.grpo as grpo
from train import policy_gradient as pg
from train.config import parse_cli

BACKENDS = ["reference"] + (["triton"] if kernels._dispatch.HAS_TRITON else [])
SHAPE = (3, 4, 8, 8)
NUM_STEPS = 10


def _scheduler(num_steps=NUM_STEPS):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(num_steps)
    return sched


def ref_sde_step_with_logprob(
    self,
    model_output,
    timestep,
    sample,
    noise_level=0.7,
    prev_sample=None,
    variance_noise=None,
    sde_type="sde",
):
    """Transcription of flow_grpo's ``sde_step_with_logprob`` (noise passed in instead of drawn)."""
    model_output = model_output.float()
    sample = sample.float()
    if prev_sample is not None:
        prev_sample = prev_sample.float()

    step_index = [self.index_for_timestep(t) for t in timestep]
    prev_step_index = [step + 1 for step in step_index]
    sigma = self.sigmas[step_index].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_prev = self.sigmas[prev_step_index].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_max = self.sigmas[1].item()
    dt = sigma_prev - sigma

    if sde_type == "sde":
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
        prev_sample_mean = (
            sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
            + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        )
        if prev_sample is None:
            prev_sample = prev_sample_mean + std_dev_t * torch.sqrt(-1 * dt) * variance_noise
        log_prob = (
            -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
            - torch.log(std_dev_t * torch.sqrt(-1 * dt))
            - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
        )
    elif sde_type == "cps":
        std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
        pred_original_sample = sample - sigma * model_output
        noise_estimate = sample + model_output * (1 - sigma)
        prev_sample_mean = pred_original_sample * (1 - sigma_prev) + noise_estimate * torch.sqrt(
            sigma_prev**2 - std_dev_t**2
        )
        if prev_sample is None:
            prev_sample = prev_sample_mean + std_dev_t * variance_noise
        log_prob = -((prev_sample.detach() - prev_sample_mean) ** 2)
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


def ref_kl(prev_sample_mean, prev_sample_mean_ref, std_dev_t):
    """flow_grpo scripts/train_sd3.py's KL term (a scalar)."""
    kl_loss = ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (
        2 * std_dev_t**2
    )
    return torch.mean(kl_loss)


def ref_policy_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max):
    """flow_grpo scripts/train_sd3.py's PPO clip loss of one step (a scalar)."""
    advantages = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.mean(torch.maximum(unclipped_loss, clipped_loss))


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(SHAPE, generator=g) for _ in range(4))


def _engine_step(sde_type, x, v, sigma, sigma_next, sigma_max, **kw):
    if sde_type == "sde":
        return kernels.sde_step(x, v, sigma, sigma_next, noise_level=0.7, sigma_max=sigma_max, **kw)
    return kernels.cps_step(x, v, sigma, sigma_next, noise_level=0.7, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_step_and_log_prob_match_the_reference(backend, sde_type):
    """Every step of the 10-step schedule (the first from sigma == 1): the sampled state, the mean and the
    log-prob (sampled and re-scored) agree with flow_grpo's; for cps the log-prob is ``-mean (x' - mean)^2``
    (no variance, no constants), for sde the Gaussian one (mean over dims)."""
    sched = _scheduler()
    sigmas = sched.sigmas
    assert float(sigmas[0]) == 1.0
    b = SHAPE[0]
    for i in range(NUM_STEPS):
        x, v, z, other = _tensors(i)
        t = sched.timesteps[i].repeat(b)
        prev_r, lp_r, mean_r, std_dev_t = ref_sde_step_with_logprob(
            sched, v, t, x, noise_level=0.7, variance_noise=z, sde_type=sde_type
        )
        sigma, sigma_next = sigmas[i].repeat(b), sigmas[i + 1].repeat(b)
        smax = torch.full((b,), float(sigmas[1]))
        with kernels.use_backend(backend):
            prev, lp, mean, std = _engine_step(sde_type, x, v, sigma, sigma_next, smax, noise=z)
            # re-scored at a state that is not the sample, so the log-prob is not trivially the same
            other = prev + 0.3 * other
            _, lp_o, _, _ = _engine_step(sde_type, x, v, sigma, sigma_next, smax, prev_sample=other)
        _, lp_or, _, _ = ref_sde_step_with_logprob(
            sched, v, t, x, noise_level=0.7, prev_sample=other, sde_type=sde_type
        )
        what = f"{sde_type} step {i} (sigma {float(sigmas[i]):.4f} -> {float(sigmas[i + 1]):.4f})"
        torch.testing.assert_close(prev, prev_r, rtol=1e-5, atol=1e-5, msg=f"{what} prev")
        torch.testing.assert_close(mean, mean_r, rtol=1e-5, atol=1e-5, msg=f"{what} mean")
        if sde_type == "cps" and float(sigmas[i + 1]) == 0.0:
            # the last cps step is a point mass (std 0): the reference's -(prev - mean)^2 is 0 at its own
            # sample; the engine gives 0 there and calls a point mass's density 0 at any other state too
            # (no gradient)
            assert float(lp.abs().max()) == 0.0 and float(lp_r.abs().max()) == 0.0
            assert float(std.abs().max()) == 0.0
            continue
        scale = max(1.0, float(lp_r.abs().max()))
        torch.testing.assert_close(lp, lp_r, rtol=1e-5, atol=1e-5 * scale, msg=f"{what} logp")
        scale = max(1.0, float(lp_or.abs().max()))
        torch.testing.assert_close(
            lp_o, lp_or, rtol=1e-5, atol=1e-5 * scale, msg=f"{what} re-scored logp"
        )
        dt = sigmas[i + 1] - sigmas[i]
        step_std = std_dev_t.flatten() * (torch.sqrt(-dt) if sde_type == "sde" else 1.0)
        torch.testing.assert_close(std, step_std.expand(b), rtol=1e-6, atol=0)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_kl_matches_the_reference(sde_type):
    """Flow-GRPO's KL (default ``--train.kl-form reference``): the engine's step loss with lr-free policy part
    zero gives the reference's ``kl_loss`` on every step, i.e. ``/ (2 std_dev_t^2)`` without the step's
    ``sqrt(-dt)`` (for sde the exact step KL is 1/(-dt) times larger: 3.7x-112x on this schedule)."""
    argv = ["--train.kl-beta", "1.0"]
    cfg = parse_cli(grpo.GRPOConfig, argv, prog="t", description="", presets=grpo.PRESETS)
    assert cfg.train.kl_form == "reference"
    sched = _scheduler()
    sigmas, b = sched.sigmas, SHAPE[0]
    n_checked = 0
    for i in range(NUM_STEPS):
        if sde_type == "cps" and float(sigmas[i + 1]) == 0.0:
            continue  # std_dev_t 0: the reference divides by 0 there (never trained: no density)
        x, v, z, dv = _tensors(100 + i)
        v_ref = v + 0.05 * dv
        t = sched.timesteps[i].repeat(b)
        prev, lp_old, mean_r, std_dev_t = ref_sde_step_with_logprob(
            sched, v, t, x, noise_level=0.7, variance_noise=z, sde_type=sde_type
        )
        _, _, mean_ref_r, _ = ref_sde_step_with_logprob(
            sched, v_ref, t, x, noise_level=0.7, prev_sample=prev, sde_type=sde_type
        )
        expected = ref_kl(mean_r, mean_ref_r, std_dev_t)

        sigma, sigma_next = sigmas[i].repeat(b), sigmas[i + 1].repeat(b)
        smax = torch.full((b,), float(sigmas[1]))
        solver = "flow-sde" if sde_type == "sde" else "cps"
        kw = dict(noise_level=0.7, eta=0.0, sigma_max=smax, prev_sample=prev)
        with kernels.use_backend("reference"):
            _, lp, mean, std = pg._transition(solver, x, v, sigma, sigma_next, **kw)
            _, _, mean_ref, _ = pg._transition(solver, x, v_ref, sigma, sigma_next, **kw)
        std_dev_t = pg.reference_std_dev_t(
            solver, sigma, sigma_next, noise_level=0.7, sigma_max=smax, std=std
        )
        score = pg.StepScore(log_prob=lp, mean=mean, std=std, mean_ref=mean_ref, std_dev_t=std_dev_t)
        adv = torch.zeros(b)  # no policy term: the loss is kl_beta * KL / n_steps
        loss, parts = grpo.GRPOTrainer.step_loss(SimpleNamespace(cfg=cfg), score, lp_old, adv, n_steps=1)
        torch.testing.assert_close(parts["kl"], expected, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)
        n_checked += 1
    assert n_checked == (NUM_STEPS if sde_type == "sde" else NUM_STEPS - 1)


def test_ppo_clip_loss_matches_the_reference():
    """The PPO clip loss (with the advantage clip) of flow_grpo's train_sd3.py, ratios inside and outside the
    clip range, both advantage signs, advantages beyond adv_clip_max."""
    g = torch.Generator().manual_seed(7)
    old = torch.randn(64, generator=g)
    adv = 4.0 * torch.randn(64, generator=g)
    for clip_range in (1e-4, 1e-3):
        log_prob = old + 2 * clip_range * torch.randn(64, generator=g)
        expected = ref_policy_loss(log_prob, old, adv, clip_range, adv_clip_max=5.0)
        loss, ratio = pg.ppo_clip_loss(log_prob, old, adv.clamp(-5.0, 5.0), clip_range)
        assert ((ratio - 1).abs() > clip_range).any() and ((ratio - 1).abs() < clip_range).any()
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
