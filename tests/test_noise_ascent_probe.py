"""bench.noise_ascent_probe: the walks on the starting noise keep |z| and share their first row, and the
gradient taken through the whole sampler is the learned reward's derivative."""

import json

import numpy as np
import pytest
import torch

from bench import noise_ascent_probe as probe
from engine import per_sample_randn
from train import reward_model as rm
from train.reward_backprop import RBSampleConfig, make_schedule
from train.spo_scorer import build_embedded


def test_on_sphere_and_angle():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 3, 4, 4, generator=g)
    r = torch.tensor([1.0, 2.0, 5.0])
    moved = probe.on_sphere(z + 0.1, r)
    assert torch.allclose(moved.flatten(1).norm(dim=1), r)
    assert probe.angle(z, 2 * z).abs().max() < 1e-6
    a, b = torch.zeros(1, 2), torch.zeros(1, 2)
    a[0, 0], b[0, 1] = 1.0, 3.0
    assert probe.angle(a, b).item() == pytest.approx(torch.pi / 2)


def test_gradient_through_the_sampler_matches_a_central_difference():
    """d logit / d z along the gradient's own direction equals |gradient| (fp32: the slack covers the logit's
    rounding over a 2e-3 step)."""
    reward, policy = rm.GenEvalLearned(), build_embedded(0)
    prompts = rm.draw(rm.heldout_pool(), 2, np.random.default_rng(0))
    seeds = [11, 12]
    sc = RBSampleConfig(solver="euler", num_steps=10)
    sched = make_schedule(policy, sc, "euler")
    z = per_sample_randn(tuple(policy.latent_shape), torch.tensor(seeds), 0)
    _, g = probe.reward_grad(policy, sched, sc, reward, prompts, seeds, z)
    norm, u, eps = g.flatten(1).norm(dim=1), probe._unit(g), 1e-3
    def logit_at(zz):
        with torch.no_grad():
            x = probe.images_from(policy, sched, sc, prompts, seeds, zz, grad=False)
            return reward.logits(x, prompts)

    hi, lo = logit_at(z + eps * u), logit_at(z - eps * u)
    fd = (hi - lo) / (2 * eps)
    assert (norm > 0).all()
    assert ((fd - norm).abs() <= 0.2 * norm + 2e-3).all(), (fd, norm)


def test_both_walks_keep_the_norm_and_share_their_start(tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert probe.main(["--n", "3", "--steps", "1", "--step", "0.5", "--batch", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    asc, rnd = res["ascent"], res["random"]
    assert asc[0] == rnd[0] and asc[0]["angle"] == 0.0  # the unmoved samples, the same in both walks
    assert asc[0]["fail_to_pass"] == asc[0]["pass_to_fail"] == 0
    failing = round(3 * (1 - asc[0]["pass_rate"]))
    # one move of length 0.5 back onto a sphere of radius ~55 (3x32x32 Gaussian): the same small angle
    for walk in (asc, rnd):
        assert walk[1]["angle"] == pytest.approx(0.5 / 55.4, rel=0.05)
        assert walk[1]["fail_to_pass"] <= failing and walk[1]["pass_to_fail"] <= 3 - failing
    assert "ascent 1" in capsys.readouterr().out


def test_lora_walk_restores_the_adapter():
    """The LoRA walk trains the adapter and puts it back: the noise walks after it are those of a run without
    it, bit for bit (same process)."""
    reward, policy = rm.GenEvalLearned(), build_embedded(0)
    prompts = rm.draw(rm.heldout_pool(), 2, np.random.default_rng(1))
    kw = dict(steps=1, step=0.5, batch=2, seed=0, say=lambda *a, **k: None)
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    with_lora = probe.run(policy, reward, prompts, [21, 22], lora_steps=1, lora_lr=1e-2, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, policy.trainable_parameters(), strict=True))
    plain = probe.run(policy, reward, prompts, [21, 22], **kw)
    assert with_lora["ascent"] == plain["ascent"] and with_lora["random"] == plain["random"]
    lora, fresh = with_lora["lora"], with_lora["lora_fresh"]
    assert len(lora) == len(fresh) == 2 and lora[0] == plain["ascent"][0]
    assert lora[1]["learned"] != lora[0]["learned"]  # the step moved the weights


def test_per_sample_gradient_is_the_mean_of_unit_gradients():
    """One sample: the step direction is minus its gradient scaled to norm 1; two: the mean of the two."""
    reward, policy = rm.GenEvalLearned(), build_embedded(0)
    prompts = rm.draw(rm.heldout_pool(), 2, np.random.default_rng(2))
    seeds = [31, 32]
    sc = RBSampleConfig(solver="euler", num_steps=10)
    sched = make_schedule(policy, sc, "euler")
    z = probe.start_noise(policy, seeds)
    params = policy.trainable_parameters()

    def flat(args):
        probe.per_sample_unit_grad(policy, sched, sc, reward, *args, params)
        return torch.cat([p.grad.flatten() for p in params])

    one = [flat((prompts[i : i + 1], seeds[i : i + 1], z[i : i + 1])) for i in range(2)]
    both = flat((prompts, seeds, z))
    for g in one:
        assert g.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(both, (one[0] + one[1]) / 2, atol=1e-6)
    for p in params:
        p.grad = None


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--n", "0"], "--n: expected an integer >= 1, got 0"),
        (["--step", "nan"], "--step: expected a finite L2 length > 0, got nan"),
        (["--steps", "0"], "--steps, --lora-steps: expected at least one walk"),
        (["--lora-lr", "0"], "--lora-lr: expected a finite learning rate > 0, got 0.0"),
    ],
)
def test_bad_input_is_refused_before_work(argv, needle, capsys):
    assert probe.main(argv) == 2
    assert needle in capsys.readouterr().err
