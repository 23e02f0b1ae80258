"""bench.sampler_gap: a run's reward on held-out prompts under its evaluation sampler, its rollout sampler and
others, base against trained from the same noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import train.d3po as d3po
from bench import sampler_gap

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    "--models.embedded-dir", str(ROOT / "models" / "embedded" / "stage1"), "--reward", "jpeg_compressibility",
    "--sample.solver", "flow-sde", "--sample.num-steps", "3", "--sample.prompts-per-iter", "2",
    "--sample.images-per-prompt", "2", "--train.batch-size", "2", "--train.grad-accum", "1",
    "--max-iters", "2", "--eval.every", "1", "--eval.num-prompts", "4", "--eval.num-steps", "3",
    "--eval.diversity-prompts", "0", "--log.progress", "false",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gap")
    for name, lr in (("lr0", "0"), ("trained", "3e-2")):
        assert d3po.main(["--run-dir", str(root / name), *RUN, "--train.lr", lr]) == 0
    return root


def _gap(run, tmp_path, *extra) -> dict:
    out = tmp_path / "gap.json"
    assert sampler_gap.main([str(run), "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_zero_adapters_change_nothing_under_any_sampler(runs, tmp_path):
    """At learning rate 0 the LoRA stays zero, so every sampler's trained samples are the base's, exactly."""
    res = _gap(runs / "lr0", tmp_path, "--samplers", "euler:3,cps:3:0.5", "--images", "2")
    assert list(res["rows"]) == ["eval", "rollout", "euler:3", "cps:3:0.5"]
    assert res["images"] == 8
    for row in res["rows"].values():
        assert row["change"] == 0.0 and row["base"] == row["trained"]
    rollout = res["rows"]["rollout"]
    assert (rollout["solver"], rollout["num_steps"], rollout["noise"]) == ("flow-sde", 3, 0.7)


def test_the_eval_row_is_the_runs_own_evaluation(runs, tmp_path, capsys):
    """With the run's prompts and one image each, the ``eval`` row scores what the run's evaluation scored:
    its base mean is the iteration-0 ``eval/reward`` and its trained mean the last one (the eval EMA)."""
    res = _gap(runs / "trained", tmp_path)
    logged = [json.loads(line) for line in (runs / "trained" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["iteration"]: r["eval/reward"] for r in logged if "eval/reward" in r}
    row = res["rows"]["eval"]
    assert res["iteration"] == 2 and res["images"] == 4
    assert row["base"] == pytest.approx(evals[0], abs=1e-5)
    assert row["trained"] == pytest.approx(evals[2], abs=1e-5)
    assert row["trained"] != row["base"]  # the run learned something, so the check can fail
    assert "rollout                flow-sde" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--samplers", "heun:3"], "--samplers: expected SOLVER:STEPS[:NOISE] with SOLVER in dpm2, euler"),
        (["--samplers", "euler:3:0.5"], "--samplers: euler is an ODE and takes no NOISE, got 'euler:3:0.5'"),
        (["--samplers", "euler:0"], "--samplers: expected STEPS >= 1 and a finite NOISE >= 0, got 'euler:0'"),
        (["--samplers", "ddim:3:1"], "--samplers: expected dpm2, euler, flow-sde or cps for this run"),
        (["--images", "0"], "--images: expected an integer >= 1, got 0"),
    ],
)
def test_bad_input_is_refused(runs, capsys, argv, words):
    assert sampler_gap.main([str(runs / "lr0"), *argv]) == 2
    assert words in capsys.readouterr().out


def test_a_folder_without_a_run_is_refused(tmp_path, capsys):
    assert sampler_gap.main([str(tmp_path)]) == 2
    assert "RUN: expected a run directory holding config.json" in capsys.readouterr().out


def test_an_auto_solver_is_read_from_the_runs_metrics(runs):
    """``--sample.solver auto`` resolves per loop and model; the run logs what it resolved at iteration 0."""
    first = json.loads((runs / "lr0" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["protocol/rollout_solver"] == "flow-sde"
    assert sampler_gap.rollout_solver(runs / "lr0") == "flow-sde"
    cfg = json.loads((runs / "lr0" / "config.json").read_text())
    cfg["sample"]["solver"] = "auto"
    assert sampler_gap.run_samplers(cfg, False, "euler")["rollout"]["solver"] == "euler"
    assert sampler_gap.run_samplers(cfg, True, None)["rollout"]["solver"] == "ddim"
    with pytest.raises(ValueError, match="does not say which solver it resolved to"):
        sampler_gap.run_samplers(cfg, False, None)


def test_geneval_mini_rows_give_the_evaluations_task_mean_score(runs, tmp_path, capsys):
    """``--reward geneval_mini_partial`` adds GenEval-mini's partial score as the evaluation logs it (a mean
    over task types, not over images: the run's 4 held-out prompts hold one task type twice): the ``eval``
    row's base and trained values are the run's ``eval/score_partial`` at iterations 0 and 2."""
    res = _gap(runs / "trained", tmp_path, "--reward", "geneval_mini_partial")
    logged = [json.loads(line) for line in (runs / "trained" / "metrics.jsonl").read_text().splitlines()]
    scores = {r["iteration"]: r["eval/score_partial"] for r in logged if "eval/score_partial" in r}
    row = res["rows"]["eval"]
    t = row["task_mean"]
    assert (t["base"], t["trained"]) == pytest.approx((scores[0], scores[2]), abs=1e-6)
    assert t["change"] == pytest.approx(t["trained"] - t["base"], abs=1e-12)
    assert "GenEval-mini score (the mean over task types" in capsys.readouterr().out
