"""The reward interface's differentiable flag (train/rewards/registry.py): a differentiable reward keeps the
graph to the images, a mix with a non-differentiable one is refused by name before any work."""

import pytest
import torch

from train.rewards.registry import build_reward, require_differentiable


def test_saturation_is_differentiable_and_matches_its_formula():
    r = build_reward("saturation")
    assert r.differentiable
    x = (torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_()
    v, comps = r(x, ["p"] * 4)
    u = (x.detach() + 1) / 2
    want = (u.amax(1) - u.amin(1)).flatten(1).mean(1)
    torch.testing.assert_close(v.detach(), want)
    v.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # a grey image has zero saturation
    grey = torch.zeros(1, 3, 4, 4)
    assert float(r(grey, ["p"])[0]) == 0.0


def test_non_differentiable_reward_is_refused_by_name():
    r = build_reward("saturation,jpeg_compressibility")
    assert not r.differentiable
    with pytest.raises(ValueError, match="--reward: expected differentiable.*'jpeg_compressibility'"):
        require_differentiable(r)
