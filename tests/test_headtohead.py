"""bench.headtohead: the curve / time-to-target / ratio arithmetic on synthetic metrics, the PNG writer, the
argument errors, and one end-to-end ``--quick`` run of the three loops (JSON schema, PNG, budget stop)."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from bench import headtohead as h2h

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def synthetic_rows(scores, iter_s, *, every=1, base_cfg=0.25):
    """metrics.jsonl rows as the loops write them: iteration 0's evaluation (with the base model's CFG score),
    then per iteration a training line and, every ``every`` iterations, an evaluation line."""
    rows, elapsed = [], 1.0

    def eval_row(it, score):
        row = {"iteration": it, "elapsed_s": elapsed, "eval/score": score, "eval/score_partial": score + 0.1}
        row.update({f"eval/{t}": score for t in TASKS})
        return row

    first = eval_row(0, scores[0])
    first.update({"eval/base_cfg/score": base_cfg, "eval/base_cfg/score_partial": base_cfg + 0.1})
    first.update({f"eval/base_cfg/{t}": base_cfg for t in TASKS})
    rows.append(first)
    evals = iter(scores[1:])
    for it in range(1, len(iter_s) + 1):
        elapsed += iter_s[it - 1]
        rows.append(
            {"iteration": it, "elapsed_s": elapsed, "train/loss": 1.0, "train/iter_s": iter_s[it - 1]}
        )
        if it % every == 0:
            elapsed += 2.0  # evaluation time: not training time
            rows.append(eval_row(it, next(evals)))
    return rows


def test_curve_sums_training_seconds_and_excludes_evaluation():
    rows = synthetic_rows([0.2, 0.22, 0.3], [1.0, 2.0, 3.0, 4.0], every=2)
    curve = h2h.curve_from_metrics(rows)
    assert [p["iteration"] for p in curve] == [0, 2, 4]
    assert [p["train_s"] for p in curve] == [0.0, 3.0, 10.0]
    # elapsed counts evaluations (2 s each), train_s does not
    assert [p["elapsed_s"] for p in curve] == [1.0, 6.0, 15.0]
    assert [p["score"] for p in curve] == [0.2, 0.22, 0.3]
    assert curve[1]["score_partial"] == pytest.approx(0.32)
    assert set(curve[1]["tasks"]) == set(TASKS)  # base_cfg keys and the overall scores are not tasks
    base = h2h.base_cfg_from_metrics(rows)
    assert base["score"] == 0.25 and set(base["tasks"]) == set(TASKS)
    assert h2h.base_cfg_from_metrics(rows[1:]) is None


def test_time_to_target_is_the_first_crossing_or_none():
    curve = h2h.curve_from_metrics(synthetic_rows([0.2, 0.24, 0.31, 0.29, 0.4], [5.0] * 4))
    hit = h2h.time_to_target(curve, 0.3)
    assert hit == {"train_s": 10.0, "elapsed_s": 15.0, "iteration": 2, "score": 0.31}
    assert h2h.time_to_target(curve, 0.4)["iteration"] == 4  # ">=": the target itself counts
    assert h2h.time_to_target(curve, 0.41) is None
    assert h2h.time_to_target(curve, 0.2)["train_s"] == 0.0  # the base model already there


def test_time_ratio():
    a, b = {"train_s": 30.0, "iteration": 30}, {"train_s": 10.0, "iteration": 3}
    assert h2h.time_ratio(a, b) == 3.0
    assert h2h.time_ratio(a, b, "iteration") == 10.0
    assert h2h.time_ratio(None, b) is None and h2h.time_ratio(a, None) is None
    assert h2h.time_ratio(a, {"train_s": 0.0}) is None  # reached before training: no ratio


def _runs():
    # NFT: slow iterations, reaches 0.3 after 20 s; GRPO: fast iterations, reaches 0.3 after 60 s, never 0.35
    nft = synthetic_rows([0.2, 0.25, 0.3, 0.36], [10.0] * 3)
    sde = synthetic_rows([0.2, 0.22, 0.24, 0.26], [10.0] * 3)
    grpo = synthetic_rows([0.2, 0.21, 0.26, 0.3, 0.31], [3.0] * 24, every=6)
    return {
        name: {
            "label": name,
            "curve": h2h.curve_from_metrics(rows),
            "base_cfg": h2h.base_cfg_from_metrics(rows),
        }
        for name, rows in ((h2h.NFT, nft), (h2h.NFT_SDE, sde), (h2h.GRPO, grpo))
    }


def test_summarize_targets_ratios_and_cfg_comparison():
    runs = _runs()
    s = h2h.summarize(runs, target=0.35, relative_delta=0.1)
    # slower_best: the lower of GRPO's (0.31) and NFT's (0.36) best, the paper's measure
    assert s["targets"] == {"absolute": 0.35, "relative": pytest.approx(0.3), "slower_best": 0.31}
    assert s["base"]["cfg_free_score"] == 0.2 and s["base"]["cfg_score"] == 0.25
    nft_t = s["runs"][h2h.NFT]["time_to_target_train_s"]
    grpo_t = s["runs"][h2h.GRPO]["time_to_target_train_s"]
    assert nft_t == {"absolute": 30.0, "relative": 20.0, "slower_best": 30.0}
    assert grpo_t == {"absolute": None, "relative": 54.0, "slower_best": 72.0}
    assert s["runs"][h2h.NFT_SDE]["time_to_target_train_s"] == dict.fromkeys(s["targets"])
    g = s["grpo_vs_nft"]["time_to_target"]
    assert g["slower_best"]["ratio_train_s"] == pytest.approx(72.0 / 30.0)
    assert g["relative"]["ratio_train_s"] == pytest.approx(54.0 / 20.0)
    assert g["relative"]["ratio_iterations"] == pytest.approx(18 / 2)
    assert g["absolute"]["ratio_train_s"] is None  # GRPO did not get there
    assert g["absolute"]["train_s"] == {h2h.GRPO: None, h2h.NFT: 30.0}
    assert s["grpo_vs_nft"]["final_score"] == {h2h.GRPO: 0.31, h2h.NFT: 0.36}
    assert s["nft_flow_sde_vs_dpm2"]["time_to_target"]["relative"]["ratio_train_s"] is None
    assert s["cfg_free_vs_base_cfg"][h2h.NFT]["final_minus_base_cfg"] == pytest.approx(0.11)
    assert s["cfg_free_vs_base_cfg"][h2h.NFT_SDE]["best_minus_base_cfg"] == pytest.approx(0.01)
    assert runs[h2h.GRPO]["summary"]["iterations"] == 24
    assert runs[h2h.GRPO]["summary"]["s_per_iter"] == pytest.approx(3.0)
    assert runs[h2h.NFT]["summary"]["best"]["iteration"] == 3


def _rec(it, strict, partial, prompts=("a", "b", "c", "d")):
    return {"iteration": it, "prompts": list(prompts), "seeds": [1, 2, 3, 4],
            "tasks": ["colors", "colors", "counting", "counting"],
            "columns": {"strict": strict, "partial": partial}}  # fmt: skip


def test_paired_summary_changes_and_differences_image_by_image(capsys):
    """Each run's final score against its iteration 0, and the runs' finals against each other, as the mean
    over task types of each type's mean paired difference (math.md §9.2), with its standard error."""
    first = _rec(0, [0, 1, 0, 0], [0.5, 1, 0.5, 0.5])
    records = {
        h2h.NFT: {"first": first, "final": _rec(9, [1, 1, 1, 0], [1, 1, 1, 0.5])},
        h2h.GRPO: {"first": first, "final": _rec(30, [0, 1, 0, 1], [0.5, 1, 0.5, 1])},
        h2h.NFT_SDE: {"first": None, "final": None},  # a run without records is left out
    }
    p = h2h.paired_summary(records)
    assert set(p["change_from_iteration_0"]) == {h2h.NFT, h2h.GRPO}
    nft = p["change_from_iteration_0"][h2h.NFT]["strict"]  # colors 0.5 -> 1, counting 0 -> 0.5
    assert nft["mean"] == pytest.approx(0.5) and nft["se"] == pytest.approx(math.sqrt(0.5 / 2 + 0.5 / 2) / 2)
    grpo = p["change_from_iteration_0"][h2h.GRPO]["partial"]  # colors +0, counting +0.25
    assert grpo["mean"] == pytest.approx(0.125) and grpo["se"] == pytest.approx(math.sqrt(0.125 / 2) / 2)
    (pair,) = p["final_difference"]
    assert pair == f"{h2h.NFT} - {h2h.GRPO}"
    d = p["final_difference"][pair]["strict"]  # colors 1 - 0.5, counting 0.5 - 0.5
    assert d["mean"] == pytest.approx(0.25) and d["se"] == pytest.approx(math.sqrt(0.5 / 2 + 2 / 2) / 2)
    assert h2h.paired_summary({h2h.NFT: {"first": None, "final": None}}) is None
    other = {h2h.GRPO: {"first": None, "final": _rec(3, [0] * 4, [0] * 4, prompts=("w", "x", "y", "z"))}}
    with pytest.raises(ValueError, match="same held-out prompts"):
        h2h.paired_summary({h2h.NFT: records[h2h.NFT], **other})
    runs = _runs()
    s = h2h.summarize(runs, target=0.35, relative_delta=0.1, records=records)
    assert s["paired"] == p
    assert "paired on the same held-out prompts" not in h2h.report(_doc(_runs()))
    doc = _doc(runs)
    doc["summary"] = s
    text = h2h.report(doc)
    assert f"{h2h.NFT}: final - iteration 0 +0.500 (0.354)" in text
    assert f"final, {h2h.NFT} - {h2h.GRPO}: +0.250 (0.559)" in text


def test_nice_ticks_cover_the_range_with_round_steps():
    for lo, hi in ((0.0, 547.3), (0.18, 0.26), (0.0, 1.0), (0.2, 0.2)):
        ticks = h2h.nice_ticks(lo, hi)
        assert ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 12
        steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:], strict=False)}
        assert len(steps) == 1
        mantissa = f"{steps.pop():e}"[0]
        assert mantissa in "125"


def _doc(runs):
    return {
        "device": "cpu",
        "threads": 1,
        "date": "2026-01-01T00:00:00+00:00",
        "quick": False,
        "environment": {"git_commit": "0" * 40},
        "budget": {"train_minutes_per_run": 1.0},
        "settings": {"seed": 0, "eval": {"num_steps": 10}},
        "summary": h2h.summarize(runs, target=0.7, relative_delta=0.05),
        "runs": runs,
    }


def test_plot_draws_every_run_and_the_base_line(tmp_path):
    runs = _runs()
    path = h2h.write_plot(_doc(runs), tmp_path / "plot.png")
    img = Image.open(path).convert("RGB")
    assert img.size == (1500, 720)
    colors = {c for _, c in img.getcolors(maxcolors=1 << 20)}
    for name in runs:
        assert h2h.COLORS[name] in colors, name
    assert (90, 90, 90) in colors  # base model with CFG, dashed
    # the curves are drawn in both panels: the GRPO colour appears left and right of the middle
    left = img.crop((90, 80, 720, 540)).getcolors(maxcolors=1 << 20)
    right = img.crop((840, 80, 1470, 540)).getcolors(maxcolors=1 << 20)
    for part in (left, right):
        assert any(c == h2h.COLORS[h2h.GRPO] for _, c in part)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--minutes", "0"], "--minutes: expected a number > 0, got '0'"),
        (["--minutes", "abc"], "--minutes: expected a number > 0, got 'abc'"),
        (["--threads", "0"], "--threads: expected an integer >= 1, got '0'"),
        (["--device", "tpu"], "--device: expected auto, cpu or cuda, got 'tpu'"),
        (["--runs", "nft-dpm2,ppo"], "--runs: expected names from nft-dpm2, nft-flow-sde, grpo, got"),
        (["--target", "nan"], "--target: expected a number, got 'nan'"),
    ],
)
def test_bad_arguments_name_the_option(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        h2h.parse_args(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_out_dir_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(SystemExit):
        h2h.parse_args(["--out-dir", str(f)])
    assert "--out-dir: expected a directory" in capsys.readouterr().err


def test_quick_run_end_to_end(tmp_path, monkeypatch, capsys):
    """The three loops for real (tiny batches), with a budget small enough that the harness must stop each
    run with SIGINT after its first iteration (max-iters is 2)."""
    # the runs take the CPU reference path, as the benchmark does outside pytest (not Triton's interpreter)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "out"
    argv = ["--quick", "--threads", "1", "--minutes", "0.0001", "--out-dir", str(out)]
    rc = h2h.main([*argv, "--keep-runs", str(tmp_path)])
    assert rc == 0
    doc = json.loads((out / "headtohead-cpu-quick.json").read_text())
    for key in ("date", "git_commit", "device", "threads", "environment", "budget", "settings", "command"):
        assert key in doc, key
    assert doc["environment"]["torch"] and "triton" in doc["environment"]
    assert doc["threads"] == 1 and doc["quick"] is True
    assert set(doc["runs"]) == {h2h.NFT, h2h.NFT_SDE, h2h.GRPO}
    for name, run in doc["runs"].items():
        assert run["stop_reason"] == "budget", name
        assert run["command"].startswith("OMP_NUM_THREADS=1 ")
        assert ("train.grpo" if name == h2h.GRPO else "train.nft") in run["command"]
        assert "--eval.num-steps 10" in run["command"] and "--seed 0" in run["command"]
        assert "--threads 1" in run["command"] and "--train-threads 1" in run["command"]
        curve = run["curve"]
        assert [p["iteration"] for p in curve] == [0, 1]  # stopped after one iteration, then evaluated
        assert curve[0]["train_s"] == 0 and curve[1]["train_s"] > 0
        assert curve[1]["elapsed_s"] > curve[1]["train_s"]
        for p in curve:
            assert 0.0 <= p["score"] <= 1.0 and len(p["tasks"]) == 6
        assert 0.0 <= run["base_cfg"]["score"] <= 1.0
        assert (tmp_path / name / "metrics.jsonl").exists() and run["log"]
    assert "--sample.solver flow-sde" in doc["runs"][h2h.NFT_SDE]["command"]
    s = doc["summary"]
    # the same base model, seed and prompts: iteration 0 is the same evaluation in every run
    assert len(set(s["base"]["cfg_free_score_per_run"].values())) == 1
    assert s["targets"]["relative"] == pytest.approx(s["base"]["cfg_free_score"] + 0.05, abs=1e-6)  # rounded
    for key in ("grpo_vs_nft", "nft_flow_sde_vs_dpm2", "cfg_free_vs_base_cfg"):
        assert key in s
    # the evaluations' records, paired image by image: every run against its iteration 0, and each pair
    assert set(s["paired"]["change_from_iteration_0"]) == set(doc["runs"])
    assert len(s["paired"]["final_difference"]) == 3
    for c in [*s["paired"]["change_from_iteration_0"].values(), *s["paired"]["final_difference"].values()]:
        # 12 prompts: a task type with one image has no variance, so no standard error
        assert -1 <= c["strict"]["mean"] <= 1 and (c["strict"]["se"] is None or c["strict"]["se"] >= 0)
    assert "paired on the same held-out prompts" in capsys.readouterr().out
    assert Image.open(out / "headtohead-cpu-quick.png").size == (1500, 720)


def test_replot_redraws_the_png_of_a_results_file(tmp_path, capsys):
    src = tmp_path / "headtohead-cpu.json"
    src.write_text(json.dumps(_doc(_runs())))
    assert h2h.main(["--replot", str(src)]) == 0
    assert Image.open(tmp_path / "headtohead-cpu.png").size == (1500, 720)
    assert "grpo" in capsys.readouterr().out
    assert h2h.main(["--replot", str(tmp_path / "missing.json")]) == 2
    assert "--replot: expected a results JSON file" in capsys.readouterr().err
