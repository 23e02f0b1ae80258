"""bench.nabla_gfn_grad_share: the slots are named from the steps they hold, the probe records every
transition call's LoRA gradient without changing the training, and the terminal slot's gradient at the start
is the reward term's alone (non-zero)."""

import json

import torch

import train.nabla_gfn as ngfn
from bench import nabla_gfn_grad_share as share
from train import common

SMALL = [
    "--reward", "saturation", "--max-iters", "2", "--sample.prompts-per-iter", "2",
    "--sample.images-per-prompt", "2", "--sample.num-steps", "4", "--train.timestep-fraction", "0.5",
    "--train.batch-size", "4", "--train.grad-accum", "1", "--train.flow-channels", "32,32", "--eval.every",
    "100", "--eval.num-prompts", "2", "--eval.num-steps", "2", "--threads", "1",
]  # fmt: skip


def test_slot_names():
    assert share.slot_name(torch.tensor([9, 9, 9]), 10, 2) == "terminal"
    assert share.slot_name(torch.tensor([5, 9, 7]), 10, 2) == "block 1"
    assert share.slot_name(torch.tensor([0, 4, 3]), 10, 2) == "block 0"


def _train_rows(run):
    drop = ("elapsed_s", "train/iter_s")
    rows = [r for r in common.read_metrics(run) if "train/loss" in r]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def test_probe_records_every_call_and_leaves_training_unchanged(tmp_path):
    out = tmp_path / "share.json"
    before = ngfn.NablaGFNTrainer.transition_loss
    assert share.main(["--run-dir", str(tmp_path / "probe"), "--json", str(out), *SMALL]) == 0
    assert ngfn.NablaGFNTrainer.transition_loss is before  # the wrapper is taken off again
    got = json.loads(out.read_text())
    # 2 iterations x one micro-batch of 4 samples x (terminal + 2 blocks)
    assert [c["slot"] for c in got["calls"]] == ["terminal", "block 1", "block 0"] * 2
    assert set(got["summary"]) == {"terminal", "block 0", "block 1"}
    assert all(c["lora_grad_norm"] >= 0 for c in got["calls"]) and got["calls"][0]["lora_grad_norm"] > 0
    assert ngfn.main(["--run-dir", str(tmp_path / "plain"), "--log.progress", "false", *SMALL]) == 0
    assert _train_rows(tmp_path / "probe") == _train_rows(tmp_path / "plain")
