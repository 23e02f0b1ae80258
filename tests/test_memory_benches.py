"""bench.bench_preference_memory and bench.bench_reward_backprop_memory end to end on the embedded default
with tiny batches: each configuration runs in its own process and comes back as a row (the numbers
themselves are the benchmarks' business, not a test's)."""

import json
import math

import pytest

from bench import bench_preference_memory, bench_reward_backprop_memory


def test_preference_memory_rows(tmp_path):
    out = tmp_path / "rows.json"
    assert bench_preference_memory.main(["--model", "embedded", "--batch", "2", "--json", str(out)]) == 0
    rows = {r["loss"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"dpo", "mapo"}
    assert rows["dpo"]["ref_forwards"] == 4 and rows["mapo"]["ref_forwards"] == 0  # 4 steps, 1 draw each
    assert all(math.isfinite(r["peak_mb"]) and r["step_s"] > 0 for r in rows.values())


def test_reward_backprop_memory_rows(tmp_path):
    out = tmp_path / "rows.json"
    argv = ["--model", "embedded", "--batch", "2", "--ks", "2", "--steps", "3", "--json", str(out)]
    assert bench_reward_backprop_memory.main(argv) == 0
    rows = json.loads(out.read_text())
    assert sorted((r["k"], r["checkpoint"]) for r in rows) == [(2, 0), (2, 1)]
    assert all(math.isfinite(r["peak_mb"]) for r in rows)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--ks", "0"], "--ks: expected windows K in 1..10 (--steps), comma separated, got 0"),
        (["--ks", "2", "--steps", "1"], "--ks: expected windows K in 1..1 (--steps), comma separated, got 2"),
        (["--steps", "0"], "--steps: expected an integer >= 1, got 0"),
        (["--batch", "-1"], "--batch: expected an integer >= 0 (0: the model's default), got -1"),
    ],
)
def test_reward_backprop_memory_refuses_bad_windows_first(capsys, argv, needle):
    """A window the sampler cannot have (K = 0 raised a backward error in the measured subprocess)."""
    assert bench_reward_backprop_memory.main(argv) == 2
    assert needle in capsys.readouterr().err
