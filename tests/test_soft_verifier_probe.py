"""bench.soft_verifier_probe: the soft component count is the verifier's object count on binary masks (the
renders), the features carry a gradient to the pixels, and the command refuses a missing data file."""

from __future__ import annotations

import torch

from bench import soft_verifier_probe as probe
from train.data.geneval_mini import all_prompts, render_batch
from train.reward_model import prompt_features
from train.rewards.geneval_mini import GenEvalMini


def test_soft_euler_counts_components_minus_holes_on_binary_masks():
    m = torch.zeros(3, 8, 8)
    m[0, 1:3, 1:3] = 1  # one square
    m[1, 1:3, 1:3] = m[1, 5:7, 5:7] = 1  # two
    m[1, 3, 3] = 1  # touches the first diagonally only: 4-connectivity keeps it apart
    m[2, 1:6, 1:6] = 1
    m[2, 3, 3] = 0  # a ring: one component, one hole
    assert probe.soft_euler4(m).tolist() == [1.0, 3.0, 0.0]


def test_count_equals_the_verifier_on_renders_and_the_score_has_a_gradient():
    prompts = [p for ps in all_prompts().values() for p in ps[:40:5]]
    images = render_batch(prompts, 0)
    model = probe.SoftVerifier("hand")
    feats = prompt_features(prompts)
    count = model.features(images, feats)[:, :4].sum(1)
    detected = torch.tensor([float(len(o)) for o in GenEvalMini().detect(images)])
    assert torch.allclose(count, detected, atol=1e-4)
    x = images.clone().requires_grad_(True)
    model(x, feats)[:, 0].sum().backward()
    assert x.grad.abs().sum() < 1e-6  # the sharp default saturates on clean renders: next to no gradient
    x.grad = None
    wide = probe.SoftVerifier("hand", tau=0.3, lo=0.2, width=0.6)
    wide(x, feats)[:, 0].sum().backward()
    assert x.grad.abs().sum() > 1e-2 and torch.isfinite(x.grad).all()


def test_missing_data_is_refused(tmp_path, capsys):
    assert probe.main(["--data", str(tmp_path / "none.pt")]) == 2
    assert "--data: expected the reward model's cached collection" in capsys.readouterr().err
