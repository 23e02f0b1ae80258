"""bench.paired_eval: two evaluations' records compared image by image and prompt by prompt."""

from __future__ import annotations

import json
import math

import pytest

from bench import paired_eval


def _write(run, it, strict, reward, diversity, drift, prompts=("a", "b", "c", "d")):
    (run / "samples").mkdir(parents=True, exist_ok=True)
    rec = {"iteration": it, "prompts": list(prompts), "seeds": [1, 2, 3, 4],
           "tasks": ["colors", "colors", "counting", "counting"],
           "columns": {"strict": strict, "reward/geneval_learned": reward},
           "diversity": diversity, "diversity_prompts": ["a", "c"], "drift": drift}  # fmt: skip
    (run / "samples" / f"iter_{it:06d}.json").write_text(json.dumps(rec))


def test_one_run_from_iteration_0_to_the_last(tmp_path, capsys):
    run = tmp_path / "r"
    _write(run, 0, [0, 1, 0, 0], [0.2, 0.4, 0.1, 0.3], [0.5, 0.7], [0, 0, 0, 0])
    _write(run, 5, [1, 1, 0, 0], [0.2, 0.4, 0.1, 0.3], [0.5, 0.7], [0.1, 0.1, 0.1, 0.1])
    _write(run, 10, [1, 1, 1, 0], [0.3, 0.5, 0.2, 0.4], [0.6, 0.9], [0.1, 0.2, 0.3, 0.4])
    out = tmp_path / "o.json"
    assert paired_eval.main([str(run), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["before"] == [str(run), 0] and res["after"] == [str(run), 10]
    s = res["columns"]["strict"]  # colors 0.5 -> 1, counting 0 -> 0.5: the task means
    assert (s["before"], s["after"], s["change"]) == pytest.approx((0.25, 0.75, 0.5))
    assert s["se"] == pytest.approx(math.sqrt(0.5 / 2 + 0.5 / 2) / 2)
    r = res["columns"]["reward/geneval_learned"]  # a mean over images, +0.1 on every one: no paired noise
    assert (r["change"], r["se"]) == pytest.approx((0.1, 0.0), abs=1e-12)
    assert res["diversity"]["change"] == pytest.approx(0.15) and res["drift"]["after"] == pytest.approx(0.25)
    assert (res["fail_to_pass"], res["pass_to_fail"]) == (2, 0)
    text = capsys.readouterr().out
    assert "| strict | 0.2500 | 0.7500 | +0.5000 |" in text
    assert "2 images failing -> passing, 0 passing -> failing" in text
    assert paired_eval.main([str(run), "--from", "5", "--to", "10"]) == 0
    assert "| strict | 0.5000 | 0.7500 | +0.2500 |" in capsys.readouterr().out


def test_two_runs_of_one_seed_and_the_errors(tmp_path, capsys):
    a, b, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for run, strict in ((a, [0, 1, 0, 0]), (b, [1, 1, 0, 1])):
        _write(run, 0, [0, 1, 0, 0], [0.1] * 4, [0.5, 0.7], [0] * 4)
        _write(run, 20, strict, [0.1] * 4, [0.5, 0.7], [0] * 4)
    assert paired_eval.main([str(a), str(b)]) == 0
    assert f"{a} at iteration 20 -> {b} at iteration 20" in capsys.readouterr().out
    _write(other, 20, [0] * 4, [0.1] * 4, [0.5, 0.7], [0] * 4, prompts=("w", "x", "y", "z"))
    with pytest.raises(SystemExit, match="expected two evaluations of the same held-out prompts"):
        paired_eval.main([str(a), str(other)])
    with pytest.raises(SystemExit, match=r"--from/--to: expected an evaluated iteration .* \(0, 20\), got 7"):
        paired_eval.main([str(a), "--to", "7"])
    with pytest.raises(SystemExit, match="--from: expected with one run only"):
        paired_eval.main([str(a), str(b), "--from", "0"])
    with pytest.raises(SystemExit, match="expected evaluation records"):
        paired_eval.main([str(tmp_path / "empty")])
