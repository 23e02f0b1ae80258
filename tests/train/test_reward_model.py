"""train.reward_model and the ``geneval_learned`` reward (math.md §8.1): the shipped model loads, its card
matches its base model and its small held-out check recomputes; gradients reach the images; a short
training run from scratch beats an untrained (lr 0) control on held-out prompts; bad options are refused
before any work."""

import json
from pathlib import Path

import pytest
import torch

from train import common, reward_model
from train.rewards.registry import build_reward, require_differentiable


@pytest.fixture(scope="module")
def shipped():
    return reward_model.load_model()


def _prompts(n, seed=0):
    import numpy as np

    return reward_model.draw(reward_model.heldout_pool(), n, np.random.default_rng(seed))


def test_shipped_model_is_small_and_its_card_describes_it(shipped):
    model, card = shipped
    assert reward_model.SHIPPED.stat().st_size < 1_000_000
    from models.embedded import DEFAULT_DIR

    assert card["base_model_sha256"] == common.file_sha256(Path(DEFAULT_DIR) / "default.safetensors")
    assert card["command"].startswith("python -m train.reward_model")
    e = card["heldout"]["engine"]
    assert e["n"] >= 256 and e["acc"] > e["majority"] and e["auc"] > 0.7, e


def test_shipped_check_subset_recomputes_within_tolerance(shipped):
    """The card's fixed check (48 engine samples of held-out prompts, verifier labels) recomputed here:
    the samples may differ in the last bits across machines, so a couple of flipped labels or predictions
    are allowed."""
    from train.spo_scorer import build_embedded

    model, card = shipped
    torch.set_num_threads(1)
    got = reward_model.check_subset(build_embedded(0), model)
    want = card["check"]
    assert got["n"] == want["n"]
    assert abs(got["pass_rate"] - want["pass_rate"]) <= 2 / want["n"] + 1e-6
    assert abs(got["acc"] - want["acc"]) <= 2 / want["n"] + 1e-6
    assert abs(got["auc"] - want["auc"]) <= 0.05
    assert abs(got["corr_strict"] - want["corr_strict"]) <= 0.05


def test_reward_is_differentiable_on_the_images_device(shipped):
    r = build_reward("geneval_learned", device="cpu")
    assert r.differentiable
    require_differentiable(r)
    fn = r.fns["geneval_learned"]
    prompts = _prompts(4)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(4, 3, 32, 32, generator=g) * 1.8 - 0.9).requires_grad_()
    v = fn(x, prompts)
    assert v.dtype == torch.float32 and v.shape == (4,) and v.device == x.device
    assert bool(((v > 0) & (v < 1)).all())
    v.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # prompt texts work as well as Prompt objects, and match the model's own forward
    with torch.no_grad():
        w = fn(x.detach(), [p.text for p in prompts])
        direct = torch.sigmoid(shipped[0](x.detach(), reward_model.prompt_features(prompts))[:, 0])
    torch.testing.assert_close(w, v.detach())
    torch.testing.assert_close(w, direct)
    assert not w.requires_grad
    # the combined reward passes it through unchanged (a single reward)
    total, comps = r(x.detach(), prompts)
    torch.testing.assert_close(total, w)


def test_reward_paths_loads_another_file_and_refuses_a_missing_one(tmp_path):
    model = reward_model.LearnedReward(width=8, hidden=16)
    reward_model.save_model(model, tmp_path / "m.safetensors", {"output": reward_model.OUTPUT})
    r = build_reward("geneval_learned", paths=[f"geneval_learned={tmp_path / 'm.safetensors'}"], device="cpu")
    assert r.fns["geneval_learned"].model.config["width"] == 8
    with pytest.raises(FileNotFoundError, match="--reward-paths geneval_learned: expected a learned reward"):
        build_reward("geneval_learned", paths=[f"geneval_learned={tmp_path / 'none.safetensors'}"])
    (tmp_path / "bad.safetensors").write_bytes(b"x")
    (tmp_path / "bad.json").write_text(json.dumps({"output": "something else", "config": {}}))
    with pytest.raises(ValueError, match="is not a reward model of train.reward_model"):
        build_reward("geneval_learned", paths=[f"geneval_learned={tmp_path / 'bad.safetensors'}"])


def test_reward_refuses_bad_inputs(shipped):
    fn = reward_model.GenEvalLearned()
    with pytest.raises(ValueError, match="images: expected 32x32"):
        fn(torch.zeros(1, 3, 16, 16), _prompts(1))
    with pytest.raises(ValueError, match="prompts: expected 2 prompts"):
        fn(torch.zeros(2, 3, 32, 32), _prompts(1))
    with pytest.raises(ValueError, match="expected a GenEval-mini prompt"):
        fn(torch.zeros(1, 3, 32, 32), ["a photo of a cat"])


def test_heldout_prompts_are_never_training_prompts():
    held = {p.text for ps in reward_model.heldout_pool().values() for p in ps}
    train = {p.text for ps in reward_model.reward_train_pool().values() for p in ps}
    assert held and train and not held & train
    assert all(reward_model.heldout_pool()[t] for t in reward_model.heldout_pool())
    assert all(reward_model.reward_train_pool()[t] for t in reward_model.reward_train_pool())


def test_short_training_beats_an_untrained_control():
    """A tiny split of renders (no sampler): colour prompts of the reward-train pool, each render shown
    with its own prompt (pass) or another colour prompt's (mostly fail); twelve epochs, then scored on new
    renders (other seeds) against the same recipe at lr 0."""
    torch.set_num_threads(1)
    pool = {"colors": reward_model.reward_train_pool()["colors"]}
    kw = dict(engine=0, noisy=0, samplers=None, seed=3)
    train = reward_model.collect(None, pool, renders=192, tag="t-train", **kw)
    held = reward_model.collect(None, pool, renders=64, tag="t-held", **kw)
    assert 0.3 < float(train["strict"].mean()) < 0.7
    fit = dict(epochs=12, batch=32, seed=0, width=8, hidden=32, say=lambda *a, **k: None)
    trained = reward_model.evaluate(reward_model.train_model(train, lr=3e-3, **fit), held)
    control = reward_model.evaluate(reward_model.train_model(train, lr=0.0, **fit), held)
    assert trained["auc"] > control["auc"] + 0.15 and trained["auc"] > 0.75, (trained, control)
    assert trained["acc"] > max(control["acc"], trained["majority"]) + 0.05, (trained, control)


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--epochs", "0"], "--epochs: expected an integer >= 1, got 0"),
        (["--lr", "-1"], "--lr: expected a finite value > 0, got -1"),
        (["--renders", "-2"], "--renders: expected an integer >= 0, got -2"),
        (["--width", "30"], "--width: expected a multiple of 4"),
        (["--samplers", "ddim:1"], "--samplers: expected SOLVER:CFG entries .* got 'ddim:1'"),
        (["--samplers", "euler:0.5"], "--samplers: expected SOLVER:CFG entries .* got 'euler:0.5'"),
        (["--bogus", "1"], "--bogus"),
        (["--preset", "huge"], "--preset: expected one of tiny, smoke"),
        (["--head", "mlp"], "--head: expected pool or flat, got 'mlp'"),
        (["--palette-tau", "-1"], "--palette-tau: expected a finite value >= 0"),
    ],
)
def test_bad_options_are_refused_before_work(argv, msg, capsys, tmp_path):
    assert reward_model.main(argv + ["--out", str(tmp_path / "o")]) == 2
    import re

    assert re.search(msg, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_existing_model_is_not_overwritten_without_the_flag(tmp_path, capsys):
    (tmp_path / "reward_model.safetensors").write_bytes(b"x")
    assert reward_model.main(["--out", str(tmp_path)]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert (tmp_path / "reward_model.safetensors").read_bytes() == b"x"
