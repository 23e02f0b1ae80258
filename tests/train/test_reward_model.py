"""train.reward_model and the ``geneval_learned`` reward (math.md §8.5): the shipped model loads, its card
names the checkpoints it was trained and checked on and its small held-out check recomputes; ``--base``;
gradients reach the images; a short training run from scratch beats an untrained (lr 0) control on held-out
prompts; bad options are refused before any work."""

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

    # its check was taken on the shipped default; its data were sampled from a checkpoint that ships too
    assert card["check"]["base_model_sha256"] == common.file_sha256(Path(DEFAULT_DIR) / "default.safetensors")
    base = Path(DEFAULT_DIR).parent.parent / card["base_model"]
    assert card["base_model_sha256"] == common.file_sha256(base / "default.safetensors")
    assert card["command"].startswith("python -m train.reward_model")
    e = card["heldout"]["engine"]
    assert e["n"] >= 256 and e["acc"] > e["majority"] and e["auc"] > 0.7, e
    if card["base_model_sha256"] != card["check"]["base_model_sha256"]:  # the shipped default's samples
        e = card["heldout"]["engine_shipped_default"]
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


def test_attack_raises_the_learned_reward_within_its_budget(shipped):
    """math.md §8.5: the card's attack follows the model's gradient, so the prediction rises, and it stays
    within the max-norm budget and [-1, 1]."""
    model, _ = shipped
    prompts = _prompts(8, seed=1)
    from train.data.geneval_mini import render_batch

    x = render_batch(_prompts(8, seed=2), 0)  # renders of other prompts: mostly failing for ``prompts``
    f = reward_model.prompt_features(prompts)
    adv = reward_model.attack(model, x, f, eps=0.1, steps=4)
    assert float((adv - x).abs().max()) <= 0.1 + 1e-6 and float(adv.abs().max()) <= 1.0
    before, after = reward_model.predict(model, x, f), reward_model.predict(model, adv, f)
    assert float(after.mean()) > float(before.mean()) + 0.01, (before, after)


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


def test_pgd_l2_stays_in_its_ball_and_raises_the_loss(shipped):
    """The robust fit's inner attack: every image moves at most ``eps`` in L2 and stays in [-1, 1], and the
    loss it ascends is higher after it than before (and the parameters get no gradient from it)."""
    model, _ = shipped
    model = reward_model.LearnedReward(**model.config)
    model.load_state_dict(reward_model.load_model()[0].state_dict())
    prompts = _prompts(16, seed=4)
    from train.data.geneval_mini import render_batch

    x = render_batch(_prompts(16, seed=5), 0)
    f = reward_model.prompt_features(prompts)
    ys, yp = torch.zeros(16), torch.zeros(16)
    loss = lambda im: reward_model._fit_loss(model(im, f), ys, yp, 0.5)
    adv = reward_model.pgd_l2(loss, x, eps=2.0, steps=3)
    assert float((adv - x).flatten(1).norm(dim=1).max()) <= 2.0 + 1e-4 and float(adv.abs().max()) <= 1.0
    assert float((adv - x).flatten(1).norm(dim=1).mean()) > 1.0  # it used its budget
    with torch.no_grad():
        assert float(loss(adv)) > float(loss(x)) + 0.05
    assert all(p.grad is None for p in model.parameters())


def test_ascent_metrics_follow_the_gradient_within_each_radius(shipped):
    """The card's ascent check (math.md §8.5): the predicted pass probability rises with the radius, each
    image moves at most the radius, and the verifier's numbers are those of the moved images."""
    model, _ = shipped
    prompts = _prompts(12, seed=6)
    from train.data.geneval_mini import render_batch

    x = render_batch(_prompts(12, seed=7), 0)
    data = {"images": x, "feats": reward_model.prompt_features(prompts), "prompts": prompts,
            "source": torch.zeros(12, dtype=torch.long)}
    rows = reward_model.ascent_metrics(model, data, radii=(1.0, 4.0), steps=5)
    assert [r["l2"] for r in rows][0] == 0.0 and rows[1]["l2"] <= 1.0 + 1e-3 and rows[2]["l2"] <= 4.0 + 1e-3
    assert rows[0]["p"] < rows[1]["p"] < rows[2]["p"], rows
    strict, partial = reward_model.label(x, prompts)
    assert rows[0]["strict"] == round(float(strict.mean()), 4)
    assert rows[0]["partial"] == round(float(partial.mean()), 4)


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
        (["--adversarial", "-1"], "--adversarial: expected an integer >= 0, got -1"),
        (["--adversarial-eps", "3"], r"--adversarial-eps: expected a value in \(0, 2\], got 3"),
        (["--robust-eps", "-1"], r"--robust-eps: expected a value in \[0, 64\], got -1"),
        (["--robust-steps", "0"], "--robust-steps: expected an integer >= 1, got 0"),
        (["--robust-epochs", "0"], "--robust-epochs: expected an integer >= 1, got 0"),
        (["--base", "nowhere"], "--base: expected an embedded checkpoint directory with default.safetensors, "
                                "got 'nowhere'"),
    ],
)
def test_bad_options_are_refused_before_work(argv, msg, capsys, tmp_path):
    assert reward_model.main(argv + ["--out", str(tmp_path / "o")]) == 2
    import re

    assert re.search(msg, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_base_samples_another_checkpoint_and_the_card_says_so(tmp_path, capsys):
    """--base: the data come from another embedded checkpoint (here the 4-block stage 1, for speed); the card
    names it and its SHA-256, and scores held-out samples of the shipped default beside its own; the check
    subset is the shipped default's."""
    from models.embedded import DEFAULT_DIR

    stage1 = Path(DEFAULT_DIR) / "stage1"
    argv = ["--preset", "smoke", "--seen-engine", "0", "--heldout-renders", "0", "--base", str(stage1),
            "--out", str(tmp_path), "--threads", "1"]
    assert reward_model.main(argv) == 0
    card = json.loads((tmp_path / "reward_model.json").read_text())
    assert card["base_model"] == str(stage1)
    assert card["base_model_sha256"] == common.file_sha256(stage1 / "default.safetensors")
    assert card["check"]["base_model_sha256"] == common.file_sha256(Path(DEFAULT_DIR) / "default.safetensors")
    held, shipped = card["heldout"]["engine"], card["heldout"]["engine_shipped_default"]
    assert held["n"] == shipped["n"] == 48 and card["check"]["n"] == 48
    assert held["pass_rate"] != shipped["pass_rate"]  # two models' samples of the same prompts and noise


def test_existing_model_is_not_overwritten_without_the_flag(tmp_path, capsys):
    (tmp_path / "reward_model.safetensors").write_bytes(b"x")
    assert reward_model.main(["--out", str(tmp_path)]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert (tmp_path / "reward_model.safetensors").read_bytes() == b"x"


@pytest.mark.parametrize("option", ["--out", "--cache"])
def test_a_file_given_as_a_directory_is_refused_before_any_work(tmp_path, capsys, option):
    path = tmp_path / "a_file"
    path.write_text("x")
    assert reward_model.main([option, str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{option}: expected a directory (new or existing), got the file" in err and str(path) in err
    assert path.read_text() == "x"
