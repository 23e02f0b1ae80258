"""The learning tests' lr-0 control (``_pg_helpers.lr0_control_reward_means``) equals a whole
``--train.lr 0`` run of each loop, iteration by iteration: at rate 0 no adapter moves, so only the control's
rollouts matter."""

from __future__ import annotations

import pytest

import train.ddpo as ddpo
import train.grpo as grpo
import train.nft as nft
from train import common

from ._pg_helpers import SMALL, lr0_control_reward_means

ITERS = 3


@pytest.mark.parametrize("module", [grpo, ddpo, nft], ids=["grpo", "ddpo", "nft"])
def test_the_control_shortcut_equals_a_whole_lr0_run(tmp_path, module):
    argv = [
        *SMALL,
        "--reward",
        "jpeg_compressibility",
        "--eval.every",
        "100",
        "--log.checkpoint-every",
        "100",
    ]
    if module is nft:
        argv += ["--train.batch-size", "4"]
    run = tmp_path / "lr0"
    assert module.main(["--run-dir", str(run), *argv, "--train.lr", "0", "--max-iters", str(ITERS)]) == 0
    rows = [r for r in common.read_metrics(run) if "train/reward_mean" in r]
    assert [r["iteration"] for r in rows] == list(range(1, ITERS + 1))
    whole = [r["train/reward_mean"] for r in rows]
    assert len(set(whole)) == ITERS  # the iterations draw other prompts and seeds: a real comparison
    assert lr0_control_reward_means(module, tmp_path / "short", argv, range(1, ITERS + 1)) == whole
