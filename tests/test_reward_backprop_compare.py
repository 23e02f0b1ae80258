"""bench.reward_backprop_compare: the equal-reward reading, the per-method options, the parallel runs and the
merge of earlier outputs."""

from __future__ import annotations

import json

import pytest

from bench import reward_backprop_compare as rbc


def _evals(rewards, diversities, every=5):
    return [
        {"iteration": i * every, "eval/reward": r, "eval/score": 0.5, "eval/diversity": d,
         "eval/drift": 0.01 * i}  # fmt: skip
        for i, (r, d) in enumerate(zip(rewards, diversities, strict=True))
    ]


def test_crossing_interpolates_between_the_evaluations_around_the_first_crossing():
    ev = _evals([0.10, 0.12, 0.20, 0.15, 0.30], [0.50, 0.48, 0.40, 0.45, 0.30])
    c = rbc.crossing(ev, 0.16)  # first reached between iterations 5 (0.12) and 10 (0.20), halfway
    assert c["iteration"] == pytest.approx(7.5)
    assert c["eval/reward"] == pytest.approx(0.16)
    assert c["eval/diversity"] == pytest.approx(0.44)
    assert c["eval/drift"] == pytest.approx(0.015)
    assert rbc.crossing(ev, 0.31) is None


def test_equal_reward_takes_the_highest_level_every_method_of_a_seed_reaches():
    fast = {"method": "draft", "seed": 0, "evals": _evals([0.10, 0.20, 0.30], [0.5, 0.4, 0.3])}
    slow = {"method": "nabla_gfn", "seed": 0, "evals": _evals([0.10, 0.12, 0.14], [0.5, 0.5, 0.5])}
    flat = {"method": "refl", "seed": 1, "evals": _evals([0.10, 0.09, 0.10], [0.5, 0.5, 0.5])}
    only_start = {"method": "alignprop", "seed": 0, "evals": _evals([0.10], [0.5])}
    text = rbc.at_equal_reward([fast, slow, flat, only_start])
    lines = text.splitlines()
    assert lines[0].startswith("- seed 0, training reward 0.1200:") and lines[1].startswith(
        "- seed 0, training reward 0.1400:"
    )
    # at 0.14 DRaFT is 40% of the way from iteration 0 to 5 (diversity 0.5 -> 0.4), Nabla-GFN at iteration 10
    assert "draft (it 2.0): gold 0.500, diversity 0.460" in lines[1]
    assert "nabla_gfn (it 10.0): gold 0.500, diversity 0.500" in lines[1]
    assert lines[1].endswith("; alignprop: not reached")
    assert lines[2] == "- seed 1: no reward above the start (0.100) that every method reaches"


def test_equal_reward_pairs_the_diversity_prompt_by_prompt_against_draft():
    """Each method's per-prompt diversity at the crossing, interpolated like the means, minus DRaFT's on the
    same prompts: the paired standard error leaves out the spread between prompts that both share."""
    fast = {"method": "draft", "seed": 0, "evals": _evals([0.10, 0.20, 0.30], [0.5, 0.4, 0.3])}
    slow = {"method": "nabla_gfn", "seed": 0, "evals": _evals([0.10, 0.12, 0.14], [0.5, 0.5, 0.5])}
    per_prompt = {"draft": [[0.2, 0.8], [0.1, 0.7], [0.0, 0.6]],
                  "nabla_gfn": [[0.2, 0.8], [0.3, 0.9], [0.1, 0.9]]}  # fmt: skip
    for r in (fast, slow):
        for e, d in zip(r["evals"], per_prompt[r["method"]], strict=True):
            e["record"] = {"diversity": d, "diversity_prompts": ["a circle", "two squares"]}
    lines = rbc.at_equal_reward([fast, slow]).splitlines()
    # at 0.14 DRaFT is 40% of the way from iteration 0 to 5: prompts 0.16, 0.76; Nabla-GFN at 10: 0.1, 0.9
    assert lines[-1] == "  - diversity, nabla_gfn - draft: +0.0400 (paired se 0.1000, 2 prompts)"
    # a second seed with the same runs: pooled per fraction, the standard error of a mean of two seeds
    again = [{**r, "seed": 1} for r in (fast, slow)]
    lines = rbc.at_equal_reward([fast, slow, *again]).splitlines()
    assert lines[-1] == (
        "- 2 seeds at 1 of the common gain: diversity, nabla_gfn - draft: +0.0400 (se 0.0707 from the paired "
        "evaluations, 0.0000 from the spread over the seeds)"
    )
    for e in slow["evals"]:
        e["record"]["diversity_prompts"] = ["a circle", "three squares"]
    with pytest.raises(SystemExit, match="expected nabla_gfn and draft of one seed to share the diversity"):
        rbc.at_equal_reward([fast, slow])


def test_the_table_gives_the_paired_gold_change_from_iteration_0():
    r = {"method": "refl", "seed": 0, "wall_s": 1.0, "evals": _evals([0.1, 0.2], [0.5, 0.4])}
    tasks = ["colors"] * 2 + ["counting"] * 2
    common = {"prompts": ["a", "b", "c", "d"], "seeds": [1, 2, 3, 4], "tasks": tasks}
    r["evals"][0]["record"] = {**common, "iteration": 0, "columns": {"strict": [0, 1, 0, 0]}}
    r["evals"][1]["record"] = {**common, "iteration": 5, "columns": {"strict": [1, 1, 1, 0]}}
    row = rbc.table([r]).splitlines()[2]
    # colors +0.5, counting +0.5: +0.5; per task var 0.5 over 2 -> se sqrt(0.25 + 0.25) / 2
    assert row.endswith(f"| +0.500 (se {0.5 ** 0.5 / 2:.3f}) |")
    del r["evals"][0]["record"]  # results collected before evaluations wrote records
    assert rbc.table([r]).splitlines()[2].endswith("| n/a |")


def test_bad_options_are_refused_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--method-extra: expected METHOD=OPTIONS"):
        rbc.main(["--out", str(tmp_path / "o"), "--method-extra", "dpo=--train.lr 1"])
    with pytest.raises(SystemExit, match="--methods: expected names"):
        rbc.main(["--out", str(tmp_path / "o"), "--methods", "draft,ddpo"])
    with pytest.raises(SystemExit, match="--methods: expected each method once"):
        rbc.main(["--out", str(tmp_path / "o"), "--methods", "draft,refl,draft"])
    with pytest.raises(SystemExit, match="--jobs: expected an integer >= 1, got 0"):
        rbc.main(["--out", str(tmp_path / "o"), "--jobs", "0"])
    with pytest.raises(SystemExit, match="--iters: expected an integer >= 1, got 0"):
        rbc.main(["--out", str(tmp_path / "o"), "--iters", "0"])
    with pytest.raises(SystemExit, match=r"--eval-prompts: expected an integer >= 0 \(0: all\), got -5"):
        rbc.main(["--out", str(tmp_path / "o"), "--eval-prompts", "-5"])
    with pytest.raises(SystemExit, match="results.json"):
        rbc.main(["--out", str(tmp_path / "o"), "--merge", str(tmp_path / "missing")])
    assert not (tmp_path / "o").exists()


def test_the_table_names_the_feature_and_mixed_features_are_refused(tmp_path):
    a = {"method": "draft", "seed": 0, "wall_s": 1.0, "evals": _evals([0.1, 0.2], [0.5, 0.4])}
    b = {"method": "refl", "seed": 0, "wall_s": 1.0, "evals": _evals([0.1, 0.2], [0.5, 0.4])}
    for e in a["evals"] + b["evals"]:
        e["eval/feature"] = "geneval_objects"
    a["evals"][-1]["eval/diversity_se"] = 0.05
    lines = rbc.table([a, b]).splitlines()
    assert "diversity (geneval_objects) (it 0 -> last)" in lines[0]
    assert "| 0.500 -> 0.400 (se 0.050) |" in lines[2] and "| 0.500 -> 0.400 |" in lines[3]
    b["evals"][1]["eval/feature"] = "geneval_palette_grid4"
    for i, r in enumerate((a, b)):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps([r]))
    with pytest.raises(SystemExit, match="one feature space .*geneval_objects, geneval_palette_grid4"):
        rbc.main(["--out", str(tmp_path / "o"), "--merge", str(tmp_path / "0"), str(tmp_path / "1")])


FAST = (
    "--sample.prompts-per-iter 2 --sample.num-steps 2 --train.batch-size 2 --train.grad-accum 1 "
    "--eval.diversity-prompts 1 --eval.diversity-images 2 --threads 1"
)


@pytest.mark.slow
def test_two_methods_at_once_then_merged(tmp_path):
    """Two CLIs run side by side with the shared options, one with its own; then ``--merge`` rebuilds the
    summaries from the output without training."""
    out = tmp_path / "cmp"
    argv = ["--out", str(out), "--iters", "1", "--every", "1", "--eval-prompts", "2", "--methods",
            "draft,refl", "--reward", "saturation", "--extra", FAST, "--method-extra", "refl=--train.lr 0",
            "--jobs", "2"]  # fmt: skip
    assert rbc.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results] == ["draft", "refl"]
    assert all([e["iteration"] for e in r["evals"]] == [0, 1] for r in results)
    assert "--reward saturation" in results[0]["cmd"] and "--train.lr 0" in results[1]["cmd"]
    assert "--train.lr 0" not in results[0]["cmd"]
    # the same start on the same seed: one base model, one held-out protocol (two processes: a tolerance)
    start = [r["evals"][0]["eval/reward"] for r in results]
    assert start[0] == pytest.approx(start[1], rel=1e-5)
    # each evaluation's record came along; one seed gives both methods the same held-out prompts and noise
    recs = [[e["record"] for e in r["evals"]] for r in results]
    assert recs[0][0]["seeds"] == recs[1][1]["seeds"] and len(recs[0][0]["diversity"]) == 1
    first = (out / "table.md").read_text()
    assert "| refl | 0 |" in first and "| +0.000 (se " in first.split("| refl | 0 |")[1]  # lr 0: no change
    merged = tmp_path / "merged"
    assert rbc.main(["--out", str(merged), "--merge", str(out)]) == 0
    assert (merged / "table.md").read_text() == first and (merged / "curves.png").is_file()
