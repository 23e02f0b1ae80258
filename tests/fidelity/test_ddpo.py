"""DDPO against its public reference code, on identical tensors.

Transcribed (our own code, faithful to theirs), from kvablack/ddpo-pytorch@1958463f:

* ``ddim_step_with_logprob``, ``_left_broadcast`` and ``_get_variance``
  (ddpo_pytorch/diffusers_patch/ddim_with_logprob.py), on the ``DDIMScheduler`` ddpo-pytorch builds
  (``DDIMScheduler.from_config(pipeline.scheduler.config)``, scripts/train.py) from SD1.5's scheduler config;
* ``PerPromptStatTracker`` (ddpo_pytorch/stat_tracking.py);
* the defaults of config/base.py (and config/dgx.py ``compressibility`` for the SD1.5 recipe).

The reference draws the step noise with ``randn_tensor``; the transcription takes it as an argument.
"""

from __future__ import annotations

import json
import math
from collections import deque

import numpy as np
import pytest
import torch

import kernels
import train.ddpo as ddpo
from engine.schedules import SD15_SCHEDULER_CONFIG, ddim_alpha_bars
from train import policy_gradient as pg

BACKENDS = ["reference"] + (["triton"] if kernels._dispatch.HAS_TRITON else [])
SHAPE = (2, 4, 8, 8)


# ------------------------------------------------------------------------------------------ transcriptions
def _left_broadcast(t, shape):
    assert t.ndim <= len(shape)
    return t.reshape(t.shape + (1,) * (len(shape) - t.ndim)).broadcast_to(shape)


def _get_variance(self, timestep, prev_timestep):
    alpha_prod_t = torch.gather(self.alphas_cumprod, 0, timestep.cpu()).to(timestep.device)
    alpha_prod_t_prev = torch.where(
        prev_timestep.cpu() >= 0, self.alphas_cumprod.gather(0, prev_timestep.cpu()), self.final_alpha_cumprod
    ).to(timestep.device)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    return (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)


def ref_ddim_step_with_logprob(self, model_output, timestep, sample, eta=0.0, prev_sample=None, noise=None):
    """ddpo-pytorch's ``ddim_step_with_logprob`` (epsilon prediction, no clipping: SD1.5's config), with the
    step noise passed in."""
    prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
    prev_timestep = torch.clamp(prev_timestep, 0, self.config.num_train_timesteps - 1)
    alpha_prod_t = self.alphas_cumprod.gather(0, timestep.cpu())
    alpha_prod_t_prev = torch.where(
        prev_timestep.cpu() >= 0, self.alphas_cumprod.gather(0, prev_timestep.cpu()), self.final_alpha_cumprod
    )
    alpha_prod_t = _left_broadcast(alpha_prod_t, sample.shape).to(sample.device)
    alpha_prod_t_prev = _left_broadcast(alpha_prod_t_prev, sample.shape).to(sample.device)
    beta_prod_t = 1 - alpha_prod_t
    assert self.config.prediction_type == "epsilon" and not self.config.clip_sample
    pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    pred_epsilon = model_output
    variance = _get_variance(self, timestep, prev_timestep)
    std_dev_t = eta * variance ** (0.5)
    std_dev_t = _left_broadcast(std_dev_t, sample.shape).to(sample.device)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    if prev_sample is None:
        prev_sample = prev_sample_mean + std_dev_t * noise
    log_prob = (
        -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * (std_dev_t**2))
        - torch.log(std_dev_t)
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample.type(sample.dtype), log_prob


class RefPerPromptStatTracker:
    """ddpo-pytorch's ``PerPromptStatTracker``."""

    def __init__(self, buffer_size, min_count):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats = {}

    def update(self, prompts, rewards):
        prompts = np.array(prompts)
        rewards = np.array(rewards)
        unique = np.unique(prompts)
        advantages = np.empty_like(rewards)
        for prompt in unique:
            prompt_rewards = rewards[prompts == prompt]
            if prompt not in self.stats:
                self.stats[prompt] = deque(maxlen=self.buffer_size)
            self.stats[prompt].extend(prompt_rewards)
            if len(self.stats[prompt]) < self.min_count:
                mean = np.mean(rewards)
                std = np.std(rewards) + 1e-6
            else:
                mean = np.mean(self.stats[prompt])
                std = np.std(self.stats[prompt]) + 1e-6
            advantages[prompts == prompt] = (prompt_rewards - mean) / std
        return advantages


# ---------------------------------------------------------------------------------------------- schedule
def _ref_scheduler(config, num_steps):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(num_steps)
    return sched


@pytest.mark.parametrize("num_steps", [50, 10])
def test_ddim_schedule_is_the_schedulers_with_final_alpha_cumprod(tmp_path, num_steps):
    """The engine's DDIM schedule from SD1.5's scheduler config (given, read from a saved pipeline's
    ``scheduler/scheduler_config.json``, and the default): the reference's timesteps, ``alphas_cumprod`` at
    each, and the last step's ``alpha_prod_t_prev = alphas_cumprod[0] = 0.99915`` (not 1)."""
    from diffusers import DDIMScheduler

    ref = _ref_scheduler(SD15_SCHEDULER_CONFIG, num_steps)
    DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG).save_pretrained(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    for config in (SD15_SCHEDULER_CONFIG, saved, None):
        ts, ab = ddim_alpha_bars(num_steps, scheduler_config=config)
        assert torch.equal(ts, ref.timesteps.to(torch.int64))
        prev = torch.clamp(ts - 1000 // num_steps, 0, 999)  # ddpo-pytorch's prev_timestep
        assert torch.equal(ab[:-1], ref.alphas_cumprod[ts])
        assert torch.equal(ab[1:], ref.alphas_cumprod[prev])
        assert float(ab[-1]) == pytest.approx(0.99915, abs=1e-6) == float(ref.final_alpha_cumprod)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_ddim_step_matches_the_reference_incl_the_last(backend):
    """All 50 steps of SD1.5's DDIM schedule, eta 1: the sampled state and its log-prob (sampled and
    re-scored) agree with ddpo-pytorch's ``ddim_step_with_logprob``; the last step (timestep 1 ->
    ``alphas_cumprod[0]``) has noise (std > 0) and a finite log-prob like every other."""
    num_steps, b = 50, SHAPE[0]
    ref = _ref_scheduler(SD15_SCHEDULER_CONFIG, num_steps)
    ts, ab = ddim_alpha_bars(num_steps)
    g = torch.Generator().manual_seed(0)
    for i in range(num_steps):
        x, eps, z, other = (torch.randn(SHAPE, generator=g) for _ in range(4))
        t = ts[i].repeat(b)
        prev_r, lp_r = ref_ddim_step_with_logprob(ref, eps, t, x, eta=1.0, noise=z)
        with kernels.use_backend(backend):
            a, a_prev = ab[i].repeat(b), ab[i + 1].repeat(b)
            prev, lp, _, std = kernels.ddim_step(x, eps, a, a_prev, eta=1.0, noise=z)
            other = prev + 0.3 * std.view(-1, 1, 1, 1) * other
            _, lp_o, _, _ = kernels.ddim_step(x, eps, a, a_prev, eta=1.0, prev_sample=other)
        _, lp_or = ref_ddim_step_with_logprob(ref, eps, t, x, eta=1.0, prev_sample=other)
        what = f"step {i} (timestep {int(ts[i])})"
        assert float(std.min()) > 0, what
        torch.testing.assert_close(prev, prev_r, rtol=1e-5, atol=1e-5, msg=f"{what} prev")
        torch.testing.assert_close(lp, lp_r, rtol=1e-5, atol=1e-4, msg=f"{what} logp")
        torch.testing.assert_close(lp_o, lp_or, rtol=1e-5, atol=1e-4, msg=f"{what} re-scored logp")


# ------------------------------------------------------------------------------------------- statistics
def test_per_prompt_stat_tracker_with_the_default_config_matches_the_reference():
    """The engine's tracker, built as train.ddpo builds it from its default config, against ddpo-pytorch's
    with config/base.py's ``buffer_size=16, min_count=16``, over 6 batches of 4 prompts x 8 images (a
    prompt's buffer passes min_count at its second batch and wraps from the third)."""
    tc = ddpo.DDPOTrainConfig()
    mine = pg.PerPromptStatTracker(tc.stat_buffer, tc.stat_min_count)
    ref = RefPerPromptStatTracker(buffer_size=16, min_count=16)
    g = torch.Generator().manual_seed(3)
    names = ["a cat", "a dog", "two birds", "an apple"]
    for it in range(6):
        prompts = [names[(k + it) % 4] for k in range(4) for _ in range(8)]
        rewards = torch.rand(32, generator=g) + torch.tensor([names.index(p) * 0.3 for p in prompts])
        got = mine.update(prompts, rewards)
        expected = ref.update(prompts, rewards.numpy())
        torch.testing.assert_close(got, torch.from_numpy(expected).float(), rtol=1e-5, atol=1e-5)
    state = mine.state_dict()
    assert sorted(state) == sorted(ref.stats)
    for p, buf in ref.stats.items():
        assert len(buf) == 16 and np.allclose(np.array(buf), np.array(state[p]), rtol=1e-6)


def test_defaults_are_the_reference_config():
    """train.ddpo's defaults against ddpo-pytorch's config/base.py: every timestep trained, PPO clip 1e-4,
    advantages clipped to 5, the statistics buffer, AdamW; the sd1.5 preset against base.py's sampling
    (DDIM 50 steps, eta 1, CFG 5) and dgx.py ``compressibility``'s 256 samples in 4 optimizer steps."""
    tc = ddpo.DDPOTrainConfig()
    assert (tc.timestep_fraction, tc.clip_range, tc.adv_clip_max) == (1.0, 1e-4, 5)
    assert (tc.stat_buffer, tc.stat_min_count, tc.per_prompt_stats) == (16, 16, True)
    assert (tc.lr, tc.weight_decay, tc.grad_clip, tc.inner_epochs) == (3e-4, 1e-4, 1.0, 1)
    cfg = ddpo.preset_sd15()
    sc, tc = cfg.sample, cfg.train
    assert (sc.solver, sc.num_steps, sc.eta, sc.guidance_scale) == ("ddim", 50, 1.0, 5.0)
    assert (tc.timestep_fraction, tc.stat_buffer, tc.stat_min_count) == (1.0, 16, 16)
    per_iter = sc.prompts_per_iter * sc.images_per_prompt
    assert per_iter == 256 and per_iter // (tc.batch_size * tc.grad_accum) == 4
