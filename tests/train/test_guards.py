"""Guards against reward hacking (train.guards, math.md §9.3) on the embedded default.

The hackable run: train.nft on the ``saturation`` reward (vivid colour whatever the prompt asks) at a high
learning rate.  Measured on the shipped checkpoint (seed 0, 2 prompts x 4 images per iteration, 12 held-out
prompts, the reference kernels): at lr 3e-2 the held-out saturation rises 0.124 -> 0.147 -> 0.238 -> 0.557
over iterations 0-3 while the gold GenEval-mini verifier falls 0.417 -> 0.333 -> 0.250 -> 0.000, so
``--guard.gold-drop 0.3`` fires at iteration 3 (its best is the base, iteration 0).  At lr 1e-2 (the rollback
test, so that the best is a trained state) the gold first rises to 0.500 at iteration 1 (saturation 0.130),
then falls to 0.000 at iteration 5 while saturation reaches 0.320: the guard fires at 5 and the run rolls
back to iteration 1.  The lr-0 control run keeps its weights, so neither number moves and the guard never
fires: the test can fail.
"""

import pytest
import torch

import kernels
import train.grpo as grpo
import train.nft as nft
from train import common
from train.guards import BEST_CHECKPOINT, GUARD_EXIT, Guard, GuardConfig

from .._shared import shared

HACK = [
    "--reward",
    "saturation",
    "--eval.rewards",
    "geneval_mini",
    "--sample.prompts-per-iter",
    "2",
    "--sample.images-per-prompt",
    "4",
    "--train.batch-size",
    "8",
    "--train.steps-per-iter",
    "1",
    "--eval.num-prompts",
    "12",
    "--eval.diversity-prompts",
    "2",
    "--eval.diversity-images",
    "2",
    "--eval.every",
    "1",
    "--log.progress",
    "false",
    "--log.checkpoint-every",
    "100",
    "--guard.gold-drop",
    "0.3",
]
LR = ["--train.lr", "3e-2"]  # hacks by iteration 3


def _policy(path):
    return torch.load(path, map_location="cpu", weights_only=False)["policy"]


def _evals(run_dir):
    return [r for r in common.read_metrics(run_dir) if "eval/score" in r]


@pytest.fixture(scope="module")
def rolled_back(tmp_path_factory):
    """The rollback run, once per session (its tests only read it)."""

    def build(folder):
        run = folder / "rollback"
        lr = ["--train.lr", "1e-2"]  # hacks by iteration 5, after a better iteration 1: a trained best
        argv = ["--run-dir", str(run), *HACK, *lr, "--guard.action", "rollback", "--max-iters", "8"]
        with kernels.use_backend("reference"):  # a module fixture runs outside the conftest's per-test one
            code = nft.main(argv)
        return run, code

    return shared(tmp_path_factory, "guards-rolled-back", build)


def test_hacked_gold_falls_while_training_reward_rises_and_rollback_restores_the_best(rolled_back):
    run, code = rolled_back
    assert code == GUARD_EXIT
    rows = _evals(run)
    fired = [r for r in rows if "guard/fired" in r]
    assert len(fired) == 1 and fired[0]["guard/fired"] == "gold_drop"
    it = int(fired[0]["guard/iteration"])
    assert it < 8  # stopped before --max-iters
    before = [r for r in rows if r["iteration"] <= it and "guard/rolled_back_to" not in r][: it + 1]
    best = max(before, key=lambda r: r["eval/gold/geneval_mini"])
    now = [r for r in before if r["iteration"] == it][0]
    # the hack: the gold verifier fell by more than the margin while the training reward rose
    assert best["eval/gold/geneval_mini"] - now["eval/gold/geneval_mini"] > 0.3
    assert now["eval/reward"] > best["eval/reward"]
    assert fired[0]["guard/best_iteration"] == best["iteration"]
    # rolled back: the run's last checkpoint holds exactly best.pt's weights (adapters, old, eval EMA)
    ck = run / "checkpoints"
    saved, last = _policy(ck / BEST_CHECKPOINT), _policy(common.latest_checkpoint(run))
    assert common.latest_checkpoint(run).name == f"iter_{it:06d}.pt"
    for a, b in zip(saved["default"] + saved["old"], last["default"] + last["old"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(saved["eval_ema"]["shadow"], last["eval_ema"]["shadow"], strict=True):
        assert torch.equal(a, b)
    best_state = torch.load(ck / BEST_CHECKPOINT, map_location="cpu", weights_only=False)
    last_state = torch.load(common.latest_checkpoint(run), map_location="cpu", weights_only=False)
    opt_best, opt_last = best_state["optimizer"]["state"], last_state["optimizer"]["state"]
    assert opt_best.keys() == opt_last.keys()
    for k in opt_best:  # AdamW's moments and step count: restored too
        for name, t in opt_best[k].items():
            assert torch.equal(t, opt_last[k][name])
    assert best_state["best"]["iteration"] == best_state["iteration"] == best["iteration"]
    # the re-evaluation of the restored weights gives the best evaluation's numbers again (same process)
    after = rows[-1]
    assert after["guard/rolled_back_to"] == best["iteration"] and after["iteration"] == it
    assert after["eval/gold/geneval_mini"] == best["eval/gold/geneval_mini"]
    assert after["eval/reward"] == best["eval/reward"]
    assert (run / "samples" / f"iter_{it:06d}_guard.png").exists()
    assert (run / "samples" / f"iter_{it:06d}_guard.json").exists()  # the caught weights' record, kept too


def test_summary_names_the_guard_iteration_and_numbers(rolled_back, capsys):
    run, _ = rolled_back
    fired = [r for r in _evals(run) if "guard/fired" in r][0]
    # the summary is printed by the run: re-read the guard state the last checkpoint keeps
    state = torch.load(common.latest_checkpoint(run), map_location="cpu", weights_only=False)
    (record,) = state["guard"]["history"]
    assert record["guard"] == "gold_drop" and record["iteration"] == fired["guard/iteration"]
    assert "geneval_mini fell" in record["text"] and "--guard.gold-drop 0.3" in record["text"]
    assert record["rolled_back_to"] == fired["guard/best_iteration"]


def test_lr0_control_never_fires(tmp_path, capsys):
    """Same run at learning rate 0: the weights stay, so gold and training reward stay, and no guard fires."""
    code = nft.main(["--run-dir", str(tmp_path / "r"), *HACK, "--train.lr", "0", "--max-iters", "2"])
    assert code == 0
    rows = _evals(tmp_path / "r")
    assert not any("guard/fired" in r for r in rows)
    assert len({r["eval/gold/geneval_mini"] for r in rows}) == 1
    assert all(r["eval/drift"] == 0.0 for r in rows)
    out = capsys.readouterr().out
    assert "gold reward geneval_mini:" in out and "guard" not in out.split("done:")[1]


def test_stop_keeps_the_guard_state_across_resume(tmp_path, capsys):
    """``stop``: exit 4 at the firing iteration; ``--resume`` re-arms the guard with the kept best, so the
    next evaluation (gold still far below the kept best, training reward above it) fires again."""
    run = tmp_path / "stop"
    assert nft.main(["--run-dir", str(run), *HACK, *LR, "--max-iters", "6"]) == GUARD_EXIT
    out = capsys.readouterr().out
    it = int([r for r in _evals(run) if "guard/fired" in r][0]["guard/iteration"])
    assert f"guard gold_drop fired at iteration {it}" in out.split("done:")[1]
    state = torch.load(common.latest_checkpoint(run), map_location="cpu", weights_only=False)
    assert state["iteration"] == it and state["guard"]["best"]["geneval_mini"]["iteration"] < it
    assert nft.main(["--resume", str(run), "--max-iters", str(it + 1)]) == GUARD_EXIT
    again = [r for r in _evals(run) if "guard/fired" in r]
    assert [r["iteration"] for r in again] == [it, it + 1]
    state = torch.load(common.latest_checkpoint(run), map_location="cpu", weights_only=False)
    assert [h["iteration"] for h in state["guard"]["history"]] == [it, it + 1]


@pytest.mark.parametrize(
    "module, argv, needle",
    [
        (nft, ["--guard.action", "undo"], "--guard.action: expected stop or rollback, got 'undo'"),
        (nft, ["--guard.gold-drop", "0"], "--guard.gold-drop: expected a finite value > 0"),
        (nft, ["--guard.gold-drop", "0.1"], "--guard.gold-drop: expected a gold reward to watch"),
        (nft, ["--guard.action", "rollback"], "--guard.action: rollback restores the best checkpoint"),
        (nft, ["--guard.max-kl", "-1"], "--guard.max-kl: expected a finite value > 0 (or none: off), got -1"),
        (nft, ["--guard.min-diversity", "-0.5"], "--guard.min-diversity: expected a finite value >= 0"),
        (
            nft,
            ["--guard.min-diversity", "0.1", "--eval.diversity-prompts", "0"],
            "--guard.min-diversity: expected eval/diversity to watch",
        ),
        (nft, ["--reward", "saturation", "--eval.rewards", "saturation"], "--eval.rewards: expected gold"),
        (nft, ["--eval.rewards", "nope"], "--eval.rewards: expected distinct names from"),
        (nft, ["--eval.diversity-images", "1"], "--eval.diversity-images: expected an integer >= 2"),
        (nft, ["--eval.feature-clip-path", "/nowhere"], "--eval.feature-clip-path: expected a local CLIP"),
        (nft, ["--eval.feature", "clip"], "--eval.feature: expected one of auto, geneval_palette_grid4, "),
        (
            nft,
            ["--eval.feature", "pixels16", "--eval.feature-clip-path", "/nowhere"],
            "--eval.feature: expected auto with --eval.feature-clip-path",
        ),
        (
            grpo,
            ["--guard.max-kl", "0.1", "--train.kl-beta", "0"],
            "--guard.max-kl: expected a loop that logs the KL to the reference",
        ),
    ],
)
def test_bad_guard_options_fail_before_work(tmp_path, capsys, module, argv, needle):
    assert module.main(["--run-dir", str(tmp_path / "r"), *argv]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def _row(it, gold, reward, **extra):
    return {"eval/gold/g": gold, "eval/reward": reward, **extra}


def test_gold_drop_needs_the_training_reward_to_rise():
    g = Guard(GuardConfig(gold_drop=0.2), ["g"])
    assert g.observe_eval(0, _row(0, 0.5, 0.1)) is True  # the first evaluation is the first best
    assert g.observe_eval(1, _row(1, 0.6, 0.2)) is True
    g.observe_eval(2, _row(2, 0.3, 0.1))  # fell by 0.3, but the training reward fell too: not hacking
    assert g.fired is None
    g.observe_eval(3, _row(3, 0.45, 0.9))  # rose, but fell only 0.15 from the best
    assert g.fired is None
    g.observe_eval(4, _row(4, 0.35, 0.25))
    assert g.fired["guard"] == "gold_drop" and g.fired["iteration"] == 4 and g.fired["best_iteration"] == 1
    assert g.fired["value"] == 0.35 and g.fired["best"] == 0.6 and g.fired["reward_at_best"] == 0.2


def test_kl_and_diversity_guards():
    g = Guard(GuardConfig(max_kl=0.1), [])
    g.observe_iteration(1, {"train/kl": torch.tensor(0.05)})
    assert g.fired is None
    g.observe_iteration(2, {"train/kl": 0.2})
    assert g.fired["guard"] == "max_kl" and g.fired["value"] == pytest.approx(0.2)
    g = Guard(GuardConfig(max_kl=0.1), [])
    g.observe_iteration(1, {"train/kl": float("nan")})
    assert g.fired["guard"] == "max_kl"
    g = Guard(GuardConfig(min_diversity=0.3), [])
    g.observe_eval(1, {"eval/diversity": 0.31})
    assert g.fired is None
    g.observe_eval(2, {"eval/diversity": 0.29})
    assert g.fired["guard"] == "min_diversity" and g.fired["iteration"] == 2
    assert "eval/diversity 0.2900 < --guard.min-diversity 0.3" in g.describe()


def test_guard_state_round_trips_and_rearms():
    g = Guard(GuardConfig(gold_drop=0.1), ["g"])
    g.observe_eval(0, _row(0, 0.5, 0.1))
    g.observe_eval(1, _row(1, 0.2, 0.3))
    assert g.fired is not None
    h = Guard(GuardConfig(gold_drop=0.1), ["g"])
    h.load_state_dict(g.state_dict())
    assert h.fired is None and h.best == g.best and h.history[0]["iteration"] == 1
    h.observe_eval(2, _row(2, 0.2, 0.3))  # the kept best (0.5 at iteration 0) makes it fire again
    assert h.fired["iteration"] == 2 and h.fired["best_iteration"] == 0
