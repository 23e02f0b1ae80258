"""The CLIP-score reward loads a local CLIP directory (a tiny random one written here) and scores images."""

import math

import pytest
import torch

from ._clip_helpers import write_clip


def test_clip_score_reward_from_local_dir(tmp_path):
    from train.rewards.registry import build_reward

    write_clip(tmp_path)
    reward = build_reward("clip_score", clip_path=str(tmp_path))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    prompts = ["a red circle", "two squares", "a blue triangle"]
    score, comps = reward(images, prompts)
    assert score.shape == (3,) and torch.isfinite(score).all()
    # flow_grpo's scale: logit_scale.exp() * cosine / 30, the tiny checkpoint's logit scale is ln(100)
    assert (score.abs() <= math.exp(4.6052) / 30 + 1e-4).all()
    again, _ = reward(images, prompts)
    torch.testing.assert_close(score, again)
    # the score depends on the image and on the text
    other, _ = reward(images.flip(0), prompts)
    assert not torch.allclose(score, other)


def test_clip_score_missing_dir(tmp_path):
    from train.rewards.registry import build_reward

    with pytest.raises(FileNotFoundError, match="--reward-clip-path"):
        build_reward("clip_score", clip_path=str(tmp_path / "nothing"))
