"""--reward-workers: the rule-based CPU rewards computed in worker processes give exactly the in-process
values (JPEG sizes from the same uint8 bytes, GenEval-mini from the same float images)."""

import numpy as np
import pytest
import torch

from train.data import render_batch, sample_prompts
from train.rewards.registry import build_reward
from train.rewards.workers import ProcessPoolReward


def test_worker_processes_equal_in_process():
    prompts = sample_prompts(6, np.random.default_rng(0), "train")
    g = torch.Generator().manual_seed(0)
    images = render_batch(prompts, 0)  # the verifier's ground truth, half of it noisy: values that differ
    images[3:] = (images[3:] + 0.6 * torch.randn(images[3:].shape, generator=g)).clamp(-1, 1)
    names = "jpeg_incompressibility,geneval_mini_partial"
    want_total, want = build_reward(names)(images, prompts)
    pooled = build_reward(names, workers=2)
    try:
        assert all(isinstance(f, ProcessPoolReward) for f in pooled.fns.values())
        got_total, got = pooled(images, prompts)
        got_total2, _ = pooled(images, prompts)  # the workers keep their reward between calls
    finally:
        pooled.close()
    assert (
        want["geneval_mini_partial"].unique().numel() > 1
        and want["jpeg_incompressibility"].unique().numel() > 1
    )
    for n in want:
        assert torch.equal(got[n], want[n]), n
    assert torch.equal(got_total, want_total) and torch.equal(got_total2, want_total)


def test_workers_are_for_cpu_rewards_only():
    with pytest.raises(ValueError, match="--reward-workers: expected an integer >= 0, got -1"):
        build_reward("jpeg_compressibility", workers=-1)
    with pytest.raises(
        ValueError, match="--reward-workers: expected rule-based CPU rewards .* got 'saturation'"
    ):
        ProcessPoolReward("saturation", {}, 2)
    # a differentiable reward stays in the process when workers are asked for
    assert not isinstance(build_reward("saturation", workers=2).fns["saturation"], ProcessPoolReward)
