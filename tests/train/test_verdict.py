"""The main command ends with its verdict (held-out score before -> after, the base model with CFG, minutes,
s/iteration, peak memory, the sample grids and the exported LoRA), and a log file gets one line per iteration
and no progress bars."""

from __future__ import annotations

import re

import train.nft as nft
from train import common


def test_run_ends_with_its_verdict_and_logs_without_progress_bars(tmp_path, capsys):
    run = tmp_path / "run"
    argv = [
        "--run-dir", str(run), "--max-iters", "2", "--eval.every", "2", "--eval.num-prompts", "6",
        "--sample.prompts-per-iter", "2", "--sample.images-per-prompt", "4", "--train.batch-size", "8",
        "--log.progress", "true",
    ]  # fmt: skip
    assert nft.main(argv) == 0
    cap = capsys.readouterr()
    # captured stderr is not a terminal: no tqdm bars, no carriage returns
    assert "\r" not in cap.err and "\r" not in cap.out and "rollout:" not in cap.err
    assert [ln.split("|")[0].strip() for ln in cap.out.splitlines() if ln.startswith("iter ")] == [
        "iter    1",
        "iter    2",
    ]
    evals = [m for m in common.read_metrics(run) if "eval/score" in m]
    before, after, base = evals[0]["eval/score"], evals[-1]["eval/score"], evals[0]["eval/base_cfg/score"]
    lines = cap.out.splitlines()
    done = next(ln for ln in lines if ln.startswith("done: "))
    assert re.match(r"done: 2 iterations, [\d.]+ min, [\d.]+ s/iteration, peak memory \d+ MB \(RSS\)$", done)
    score = next(ln for ln in lines if ln.startswith("held-out score"))
    assert score == (
        f"held-out score (GenEval-mini, eval EMA, dpm2 10 steps, CFG-free): {before:.3f} at iteration 0 -> "
        f"{after:.3f} at iteration 2 ({after - before:+.3f}); base model with CFG 4.5: {base:.3f}"
    )
    samples = next(ln for ln in lines if ln.startswith("samples: "))
    grids = [run / "samples" / n for n in ("iter_000000.png", "iter_000002.png", "base_cfg.png")]
    for g in grids:
        assert str(g) in samples and g.is_file()
    lora = next(ln for ln in lines if ln.startswith("LoRA: "))
    for sub in ("lora", "lora_ema"):
        assert str(run / sub) in lora and (run / sub / "pytorch_lora_weights.safetensors").is_file()
    assert lines[-1] == lora  # the verdict is the last thing the run prints

    # a resume with nothing left to train reports the run's own s/iteration, not nan
    assert nft.main(["--resume", str(run), "--max-iters", "2"]) == 0
    done = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("done: "))
    iter_s = [m["train/iter_s"] for m in common.read_metrics(run) if "train/iter_s" in m]
    assert f"{sum(iter_s) / len(iter_s):.2f} s/iteration" in done, done


def test_tiny_preset_has_a_time_budget():
    """The bare command stops after --max-minutes (13) so that, with the final evaluation, it ends in 15."""
    cfg = nft.preset_tiny()
    assert cfg.max_minutes == 13.0 and cfg.max_iters == 100
