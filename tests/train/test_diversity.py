"""Diversity and drift (train.diversity, math.md §9.2): the formulas against hand computations, the feature
maps' scales, the drift reference (the initial weights = the adapters switched off, from the same noise),
and every loop logging them at each evaluation."""

import math

import pytest
import torch

import train.grpo as grpo
from train import common
from train.diversity import (
    ObjectFeature,
    PaletteGridFeature,
    PixelFeature,
    build_feature,
    group_diversities,
    group_diversity,
    paired_difference,
    paired_distance,
    paired_distances,
    standard_error,
)
from train.evaluation import EvalConfig, Evaluator, paired_score_change, read_record
from train.policy import ModelConfig, build_policy

from ._pg_helpers import SMALL, make_tiny_flow_pipeline, use_embedded_default


def test_group_diversity_by_hand():
    f = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [9.0, 9.0]])
    groups = torch.tensor([0, 0, 1, 1, 1, 2])  # group 2 has one sample: skipped
    # group 0: one pair at distance 5; group 1: three equal points, distance 0
    assert group_diversity(f, groups) == pytest.approx((5.0 + 0.0) / 2)
    f3 = torch.tensor([[0.0], [1.0], [3.0]])  # pairs 1, 3, 2: mean 2
    assert group_diversity(f3, torch.zeros(3, dtype=torch.long)) == pytest.approx(2.0)
    assert math.isnan(group_diversity(f3, torch.arange(3)))
    assert group_diversities(f, groups) == pytest.approx([5.0, 0.0])
    assert standard_error([5.0, 0.0]) == pytest.approx(math.sqrt(12.5) / math.sqrt(2))  # sd sqrt(12.5)
    assert math.isnan(standard_error([1.0]))


def test_paired_distance_by_hand_and_shape_check():
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    assert paired_distance(a, b) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="drift reference: expected features shaped"):
        paired_distance(a, b[:1])
    assert paired_distances(a, b).tolist() == [5.0, 0.0]


def test_paired_difference_by_hand():
    """The mean of the per-prompt differences and their standard error: a shift that every prompt shares has
    no paired noise, however far apart the prompts are."""
    a, b = [1.0, 5.0, 9.0], [0.5, 4.5, 8.5]
    assert paired_difference(a, b) == pytest.approx((0.5, 0.0))
    d, se = paired_difference([1.0, 5.0, 9.0, 2.0], [0.0, 5.0, 8.0, 2.0])  # differences 1, 0, 1, 0
    assert d == pytest.approx(0.5) and se == pytest.approx(math.sqrt(1 / 3) / 2)
    with pytest.raises(ValueError, match="expected values of the same prompts, got 3 and 2"):
        paired_difference(a, b[:2])


def _record(it, strict, tasks, prompts=None):
    n = len(strict)
    return {"iteration": it, "prompts": prompts or [f"p{i}" for i in range(n)], "seeds": list(range(n)),
            "tasks": tasks, "columns": {"strict": strict}}  # fmt: skip


def test_paired_score_change_is_the_task_mean_of_the_paired_differences():
    tasks = ["colors"] * 4 + ["counting"] * 2
    before = _record(0, [0, 0, 1, 1, 0, 1], tasks)
    after = _record(5, [1, 0, 1, 0, 1, 1], tasks)  # colors: +1, 0, 0, -1 (mean 0); counting: +1, 0 (0.5)
    change, se = paired_score_change(before, after)
    assert change == pytest.approx(0.25)  # the GenEval-mini score (mean over tasks) moves 0.5 -> 0.75
    var_colors, var_counting = 2 / 3 / 4, 0.5 / 2  # sample variances over n, per task
    assert se == pytest.approx(math.sqrt(var_colors + var_counting) / 2)
    untasked = {**after, "tasks": None}
    assert paired_score_change({**before, "tasks": None}, untasked)[0] == pytest.approx(1 / 6)  # per image
    with pytest.raises(ValueError, match="expected two evaluations of the same held-out prompts"):
        paired_score_change(before, _record(5, [1] * 6, tasks, prompts=list("abcdef")))
    with pytest.raises(ValueError, match=r"expected a column of both records \(strict\), got 'partial'"):
        paired_score_change(before, after, "partial")


def test_palette_grid_feature_scale():
    feat = PaletteGridFeature()
    black = -torch.ones(1, 3, 32, 32)
    red = black.clone()
    red[0, 0, :8, :8] = 1.0  # one of the 16 cells of 8 x 8 px turns red
    fb, fr = feat(black), feat(red)
    assert fb.shape == (1, 5 * 16)
    # that cell's colour distribution moves from background to red: squared distance 2, over 16 cells
    assert float((fb - fr).norm()) == pytest.approx(math.sqrt(2 / 16))
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    f = feat(x)
    assert torch.allclose((f * 4).view(6, 16, 5).sum(-1), torch.ones(6, 16))  # shares sum to 1 per cell
    assert float(torch.cdist(f, f).max()) <= math.sqrt(2) + 1e-6


def _square(color: int, x0: int, y0: int, size: int = 8, image=None):
    """A square of palette colour ``color`` (0 red, 1 green, 2 blue) on black, in [-1, 1]."""
    x = -torch.ones(1, 3, 32, 32) if image is None else image.clone()
    x[0, :, y0 : y0 + size, x0 : x0 + size] = -1.0
    x[0, color, y0 : y0 + size, x0 : x0 + size] = 1.0
    return x


def test_object_feature_scale_and_texture_blindness():
    """One unit bump per detected object in its (colour, shape) channel, over sqrt 2: a different colour at
    the same place is at distance 1, the same object moved by one cell (4 px) about half that and a far move
    almost 1; a second object adds its own unit; specks below the verifier's object size move nothing, where
    the palette grid sees them."""
    feat, grid = ObjectFeature(), PaletteGridFeature()
    red = _square(0, 4, 4)
    assert feat.verifier.detect(red)[0][0][:2] == ("square", "red")
    f = lambda x: feat(x)[0]  # noqa: E731
    assert feat(red).shape == (1, 17 * 64)
    assert float(f(red).norm()) == pytest.approx(1 / math.sqrt(2))
    assert float((f(red) - f(_square(2, 4, 4))).norm()) == pytest.approx(1.0)
    near = float((f(red) - f(_square(0, 8, 4))).norm())
    far = float((f(red) - f(_square(0, 20, 20))).norm())
    assert 0.3 < near < 0.6 and 0.95 < far <= 1.0
    two = _square(2, 20, 20, image=red)
    assert float((f(red) - f(two)).norm()) == pytest.approx(1 / math.sqrt(2))
    specks = red.clone()
    for k in range(12):  # 12 isolated one-pixel specks of green on the background (fewer than 64 pixels)
        specks[0, :, 24, 2 * k] = -1.0
        specks[0, 1, 24, 2 * k] = 1.0
    assert [o.shape for o in feat.verifier.detect(specks)[0]] == ["square"]
    assert torch.equal(feat(specks), feat(red))
    # three cells of the grid's bottom row turn 4 of their 64 pixels green: 2 (4/64)^2 each, over 16 cells
    assert float((grid(specks) - grid(red)).norm()) == pytest.approx(math.sqrt(3 * 2 * (4 / 64) ** 2 / 16))
    assert torch.equal(feat(-torch.ones(2, 3, 32, 32)), torch.zeros(2, 17 * 64))


def test_feature_option_choices_and_errors():
    assert build_feature(geneval=True, name="geneval_objects").name == "geneval_objects"
    assert build_feature(geneval=True).name == "geneval_palette_grid4"
    assert build_feature(geneval=False).name == "pixels16"
    assert build_feature(geneval=True, name="pixels16").name == "pixels16"
    with pytest.raises(ValueError, match="--eval.feature: geneval_objects reads GenEval-mini"):
        build_feature(geneval=False, name="geneval_objects")


def test_pixel_feature_scale():
    feat = PixelFeature()
    lo, hi = -torch.ones(1, 3, 64, 64), torch.ones(1, 3, 64, 64)
    assert feat(lo).shape == (1, 3 * 16 * 16)
    assert float((feat(lo) - feat(hi)).norm()) == pytest.approx(1.0)
    assert feat(torch.zeros(2, 3, 4, 4)).shape == (2, 3 * 4 * 4)  # small images are not upsampled


def test_clip_feature_is_the_unit_image_embedding(tmp_path):
    """--eval.feature-clip-path: a local CLIP's L2-normalised image embedding, preprocessed as the CLIP
    rewards' tensor path (same embedding as the model on those pixel values); a directory without the
    processor config is refused by option name."""
    from train.diversity import ClipFeature, check_clip_path
    from train.rewards.clip_models import _pooled, tensor_preprocess

    from ._clip_helpers import images, write_clip

    write_clip(tmp_path / "clip")
    feat = ClipFeature(str(tmp_path / "clip"))
    x = images(3, 40, 48)
    f = feat(x)
    assert feat.name == "clip:clip" and f.shape == (3, 8)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(3))
    with torch.no_grad():
        want = _pooled(feat.model.get_image_features(pixel_values=tensor_preprocess(x, feat.spec)))
    torch.testing.assert_close(f, want / want.norm(dim=1, keepdim=True))
    write_clip(tmp_path / "bare", processor=False)
    with pytest.raises(ValueError, match="--eval.feature-clip-path: .*missing preprocessor_config.json"):
        check_clip_path(str(tmp_path / "bare"))


def test_drift_reference_is_the_base_from_the_same_noise(tmp_path, monkeypatch):
    """A fresh policy (LoRA ``B = 0``) sampled with its adapters on is the base model: the reference taken
    from its iteration-0 samples equals the one sampled with the adapters off, bit for bit; moving the
    adapters moves the samples away from it, and diversity is a positive spread of same-prompt samples."""
    use_embedded_default(monkeypatch)
    policy = build_policy(ModelConfig(), preset="tiny", model_path=None, device=torch.device("cpu"), seed=0)
    cfg = EvalConfig(num_prompts=4, num_steps=4, diversity_prompts=2, diversity_images=3)
    reward = lambda images, prompts: (images.mean((1, 2, 3)), {})  # noqa: E731
    (tmp_path / "samples").mkdir()
    initial = Evaluator(cfg, seed=0, reward=reward)
    res = initial.run(policy, 0, tmp_path, extras=True, initial=True)
    assert res["drift"] == 0.0 and res["diversity"] > 0
    assert initial.feature_name() == "geneval_palette_grid4"
    sampled = Evaluator(cfg, seed=0, reward=reward)
    again = sampled.run(policy, 0, tmp_path, extras=True, initial=False)  # reference: adapters off
    assert torch.equal(sampled.reference, initial.reference)
    assert again["drift"] == 0.0 and again["diversity"] == res["diversity"]
    with torch.no_grad():
        for p, s in zip(policy.trainable_parameters(), policy.eval_ema.shadow, strict=True):
            p.add_(torch.randn_like(p) * 0.05)
            s.copy_(p)  # the evaluation samples the eval EMA
    moved = initial.run(policy, 1, tmp_path, extras=True)
    assert moved["drift"] > 0


def test_diversity_standard_error_is_over_the_prompts(tmp_path, monkeypatch):
    """With two or more diversity prompts the evaluation logs ``diversity_se``: the standard error of the
    per-prompt spreads, recomputed here from the same samples (same process: exact); with one, none."""
    use_embedded_default(monkeypatch)
    policy = build_policy(ModelConfig(), preset="tiny", model_path=None, device=torch.device("cpu"), seed=0)
    reward = lambda images, prompts: (images.mean((1, 2, 3)), {})  # noqa: E731
    (tmp_path / "samples").mkdir()
    cfg = EvalConfig(num_prompts=24, num_steps=6, diversity_prompts=3, diversity_images=3)
    ev = Evaluator(cfg, seed=0, reward=reward)
    res = ev.run(policy, 0, tmp_path, extras=True, initial=True)
    prompts, seeds, groups = ev.diversity_set(policy)
    assert len(set(groups.tolist())) == 3
    with torch.no_grad():
        images = ev.sample(policy, prompts, base_cfg=False, shift=None, seeds=seeds)
    per = group_diversities(ev.feature(images), groups)
    assert res["diversity"] == pytest.approx(sum(per) / 3, rel=1e-12)
    assert res["diversity_se"] == pytest.approx(standard_error(per), rel=1e-12) and res["diversity_se"] > 0
    cfg = EvalConfig(num_prompts=8, num_steps=2, diversity_prompts=1, diversity_images=2)
    one = Evaluator(cfg, seed=0, reward=reward)
    assert "diversity_se" not in one.run(policy, 0, tmp_path, extras=True, initial=True)


@pytest.mark.parametrize("feature", ["auto", "geneval_objects"])
def test_every_loop_logs_reward_gold_diversity_and_drift(tmp_path, monkeypatch, feature):
    """train.grpo (the policy-gradient family) gets the metrics from the shared loop, with no code of its
    own: the training reward and a gold reward beside it, diversity and drift in the named feature space
    (``--eval.feature``: auto is the palette grid on the embedded default)."""
    use_embedded_default(monkeypatch)
    argv = ["--run-dir", str(tmp_path / "r"), *SMALL, "--max-iters", "1", "--reward", "jpeg_compressibility"]
    argv += ["--eval.rewards", "geneval_mini,saturation", "--eval.diversity-prompts", "2"]
    argv += ["--eval.diversity-images", "2", "--eval.feature", feature]
    assert grpo.main(argv) == 0
    rows = [r for r in common.read_metrics(tmp_path / "r") if "eval/score" in r]
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        assert r["eval/feature"] == {"auto": "geneval_palette_grid4"}.get(feature, feature)
        assert r["eval/diversity"] > 0 and r["eval/drift"] >= 0
        assert 0 <= r["eval/gold/geneval_mini"] <= 1 and 0 <= r["eval/gold/saturation"] <= 1
        assert r["eval/reward"] < 0  # minus the JPEG size in kB
    assert rows[0]["eval/drift"] == 0.0
    assert "eval/base_cfg/gold/geneval_mini" in rows[0]
    # each evaluation's record holds the per-image and per-prompt values whose means were logged
    first, last = (read_record(tmp_path / "r", it) for it in (0, 1))
    for r, rec in zip(rows, (first, last), strict=True):
        assert rec["feature"] == r["eval/feature"] and len(rec["diversity"]) == len(rec["diversity_prompts"])
        assert sum(rec["diversity"]) / len(rec["diversity"]) == pytest.approx(r["eval/diversity"], rel=1e-12)
        assert sum(rec["drift"]) / len(rec["drift"]) == pytest.approx(r["eval/drift"], rel=1e-12)
        gold = rec["columns"]["gold/geneval_mini"]
        assert sum(gold) / len(gold) == pytest.approx(r["eval/gold/geneval_mini"], rel=1e-6)
    # the logged means are float32 of rewards of a few kB: their difference carries ~1e-6 of rounding
    assert paired_score_change(first, last, "reward/jpeg_compressibility")[0] == pytest.approx(
        rows[1]["eval/reward"] - rows[0]["eval/reward"], abs=1e-5)  # fmt: skip
    assert (tmp_path / "r" / "samples" / "base_cfg.json").exists()


def test_geneval_features_are_refused_for_a_model_run(tmp_path, capsys):
    pipe, prompts = make_tiny_flow_pipeline(tmp_path, "sd3")
    argv = ["--run-dir", str(tmp_path / "r"), "--model", str(pipe), "--prompts", str(prompts), "--preset"]
    assert grpo.main([*argv, "sd3.5-m", "--eval.feature", "geneval_objects"]) == 2
    assert "--eval.feature: expected auto or pixels16 for a --model run" in capsys.readouterr().err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
