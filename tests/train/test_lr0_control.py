"""The learning tests' lr-0 control (``_pg_helpers.lr0_control_reward_means``) equals a whole
``--train.lr 0`` run of each loop, iteration by iteration, and so does its held-out evaluation: at rate 0 no
adapter moves, so only the control's rollouts matter."""

from __future__ import annotations

import pytest

import train.d3po as d3po
import train.ddpo as ddpo
import train.grpo as grpo
import train.nft as nft
import train.spo as spo
from train import common

from ._pg_helpers import SMALL, lr0_control_reward_means

ITERS = 3
EXTRA = {
    nft: ["--train.batch-size", "4"],
    d3po: ["--sample.solver", "flow-sde", "--train.batch-size", "4", "--train.grad-accum", "1"],
    spo: ["--scorer", "reward", "--sample.solver", "flow-sde", "--train.divert-start", "1"],
}


@pytest.mark.parametrize(
    "module", [grpo, ddpo, nft, d3po, spo], ids=["grpo", "ddpo", "nft", "d3po", "spo"]
)
def test_the_control_shortcut_equals_a_whole_lr0_run(tmp_path, module):
    argv = [
        *SMALL,
        "--reward",
        "jpeg_compressibility",
        "--eval.every",
        str(ITERS),
        "--log.checkpoint-every",
        "100",
        *EXTRA.get(module, []),
    ]
    run = tmp_path / "lr0"
    assert module.main(["--run-dir", str(run), *argv, "--train.lr", "0", "--max-iters", str(ITERS)]) == 0
    rows = common.read_metrics(run)
    train_rows = [r for r in rows if "train/reward_mean" in r]
    assert [r["iteration"] for r in train_rows] == list(range(1, ITERS + 1))
    whole = [r["train/reward_mean"] for r in train_rows]
    assert len(set(whole)) == ITERS  # the iterations draw other prompts and seeds: a real comparison
    last_eval = [r for r in rows if "eval/reward" in r and r["iteration"] == ITERS]
    assert len(last_eval) == 1
    means, evaluation = lr0_control_reward_means(module, tmp_path / "short", argv, range(1, ITERS + 1), ITERS)
    assert means == whole
    assert evaluation["reward"] == last_eval[0]["eval/reward"]
    assert evaluation["score"] == last_eval[0]["eval/score"]
