"""train.ddpo (DDPO-SF, DDPO-IS, DPOK; math.md §4): exact ratio before the first update on the flow SDE and
on a UNet's DDIM (eta 1), the REINFORCE / per-step KL formulas by hand, DDPO's per-prompt statistics, the UNet
path end to end on a tiny random SD1.5-style pipeline, resume, and a short run that raises the reward."""

import math
from types import SimpleNamespace

import pytest
import torch

import kernels
import train.ddpo as ddpo
from train import common
from train import policy_gradient as pg
from train.config import parse_cli

from ._pg_helpers import (
    HAVE_CHECKPOINT,
    JPEG_SHORT_RUN,
    SMALL,
    build_trainer,
    make_tiny_sd_pipeline,
    paired_reward_gain,
    use_embedded_default,
)


@pytest.fixture(autouse=True)
def _embedded(monkeypatch):
    use_embedded_default(monkeypatch)


@pytest.fixture(scope="module")
def tiny_sd_pipeline(tmp_path_factory):
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd"))


def _unet_args(pipe, prompts):
    return [
        "--model",
        str(pipe),
        "--prompts",
        str(prompts),
        "--preset",
        "sd1.5",
        "--models.dtype",
        "float32",
        "--models.resolution",
        "16",
        "--models.lora-rank",
        "4",
        "--reward",
        "jpeg_compressibility",
    ]


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("loss", ["is", "sf"])
def test_ratio_is_exactly_one_on_the_flow_sde(tmp_path, loss):
    trainer = build_trainer(
        ddpo,
        tmp_path,
        [
            *SMALL,
            "--reward",
            "jpeg_compressibility",
            "--sample.rollout-batch",
            "8",
            "--train.batch-size",
            "3",
            "--sample.forward-chunk",
            "4",
            "--train.loss",
            loss,
            "--train.kl-beta",
            "0.01",
            "--sample.solver",
            "flow-sde",
        ],
    )
    assert trainer.solver == "flow-sde"
    traj = trainer.rollout_and_reward(1)
    adv, mask, _ = trainer.advantages(traj)
    stats = trainer.train_on(1, traj, adv, mask)
    assert stats["ratio/first_count"] > 0 and stats["ratio/first_abs_dev"] == 0.0
    assert stats["train/kl"] >= 0.0


def test_ratio_is_exactly_one_on_a_unet_ddim(tmp_path, tiny_sd_pipeline):
    pipe, prompts = tiny_sd_pipeline
    trainer = build_trainer(
        ddpo,
        tmp_path,
        [
            *_unet_args(pipe, prompts),
            *SMALL,
            "--sample.rollout-batch",
            "8",
            "--train.batch-size",
            "3",
            "--sample.forward-chunk",
            "4",
            "--sample.guidance-scale",
            "2.0",
            "--train.grad-accum",
            "100",
        ],
    )
    assert trainer.solver == "ddim" and trainer.policy.denoiser.prediction_type == "epsilon"
    traj = trainer.rollout_and_reward(1)
    assert traj.states.shape[-3:] == (4, 8, 8)
    # SD1.5's scheduler (set_alpha_to_one=False): the last DDIM step goes to alphas_cumprod[0] = 0.99915, has
    # noise and is trained, as in ddpo-pytorch; every step is trained (timestep_fraction 1.0, its default)
    assert traj.alpha_bars[-1].item() == pytest.approx(1 - 0.00085) and traj.train_steps == (0, 1, 2, 3)
    assert trainer.cfg.train.timestep_fraction == 1.0
    adv, mask, _ = trainer.advantages(traj)
    stats = trainer.train_on(1, traj, adv, mask)
    assert stats["ratio/first_count"] == len(traj) * 4 and stats["ratio/first_abs_dev"] == 0.0


# ---------------------------------------------------------------------------------------------- formulas
def test_reinforce_and_dpok_step_loss_by_hand():
    cfg = parse_cli(
        ddpo.DDPOConfig,
        ["--train.loss", "sf", "--train.kl-beta", "0.1"],
        prog="t",
        description="",
        presets=ddpo.PRESETS,
    )
    logp = torch.tensor([0.3, -0.2])
    adv = torch.tensor([2.0, -1.0])
    mean, mean_ref = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    std = torch.tensor([1.0, 0.5])
    score = pg.StepScore(log_prob=logp, mean=mean, std=std, mean_ref=mean_ref)
    with kernels.use_backend("reference"):
        loss, parts = ddpo.DDPOTrainer.step_loss(SimpleNamespace(cfg=cfg), score, logp - 0.01, adv, n_steps=5)
    policy = -(0.3 * 2.0 + 0.2 * 1.0) / 2
    kl = (1 / 2 + 1 / (2 * 0.25)) / 2  # KL(N(1, s^2) || N(0, s^2)) = 1 / (2 s^2) per element
    assert loss.item() == pytest.approx(policy / 5 + 0.1 * kl, rel=1e-5)
    assert parts["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert torch.allclose(parts["ratio"], torch.full((2,), math.exp(0.01)))
    assert pg.reinforce_loss(logp, adv).item() == pytest.approx(policy)


def test_per_prompt_stat_tracker():
    t = pg.PerPromptStatTracker(buffer_size=4, min_count=3)
    r1 = torch.tensor([1.0, 3.0, 10.0, 20.0])
    a1 = t.update(["a", "a", "b", "b"], r1)  # fewer than 3 per prompt: the batch's statistics
    assert torch.allclose(a1, (r1 - r1.mean()) / (r1.std(unbiased=False) + 1e-6))
    a2 = t.update(["a", "a"], torch.tensor([5.0, 7.0]))  # 'a' buffer [1, 3, 5, 7]
    buf = torch.tensor([1.0, 3.0, 5.0, 7.0])
    assert torch.allclose(a2, (torch.tensor([5.0, 7.0]) - buf.mean()) / (buf.std(unbiased=False) + 1e-6))
    t.update(["a"], torch.tensor([9.0]))  # the buffer keeps the last 4: [3, 5, 7, 9]
    assert list(t.stats["a"]) == [3.0, 5.0, 7.0, 9.0]
    t2 = pg.PerPromptStatTracker(buffer_size=4, min_count=3)
    t2.load_state_dict(t.state_dict())
    assert torch.equal(t2.update(["a"], torch.tensor([1.0])), t.update(["a"], torch.tensor([1.0])))


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--train.loss", "ppo"], "--train.loss: expected is (DDPO-IS) or sf (DDPO-SF)"),
        (["--sample.solver", "auto", "--sample.eta", "0"], "--sample.eta: expected a value > 0"),
        (["--train.kl-beta", "-1"], "--train.kl-beta: expected a value >= 0"),
        (["--preset", "sd1.5"], "--model: expected a local diffusers directory"),
    ],
)
def test_bad_input_fails_before_work(tmp_path, capsys, argv, needle):
    assert ddpo.main(["--run-dir", str(tmp_path / "r"), *argv]) == 2
    assert needle in capsys.readouterr().err


def test_ddim_on_a_flow_model_is_refused(tmp_path, capsys):
    assert (
        ddpo.main(["--run-dir", str(tmp_path / "r"), *SMALL, "--sample.solver", "ddim", "--max-iters", "1"])
        == 2
    )
    assert "--sample.solver: expected flow-sde or cps for a flow model, got 'ddim'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- end to end
def test_unet_ddim_end_to_end_and_resume(tmp_path, tiny_sd_pipeline):
    pipe, prompts = tiny_sd_pipeline
    run = [
        *_unet_args(pipe, prompts),
        *SMALL,
        "--sample.rollout-batch",
        "8",
        "--train.batch-size",
        "4",
        "--sample.forward-chunk",
        "4",
        "--eval.every",
        "1",
        "--log.checkpoint-every",
        "1",
        "--train.kl-beta",
        "0.01",
    ]
    assert ddpo.main(["--run-dir", str(tmp_path / "straight"), *run, "--max-iters", "2"]) == 0
    assert ddpo.main(["--run-dir", str(tmp_path / "split"), *run, "--max-iters", "1"]) == 0
    assert ddpo.main(["--resume", str(tmp_path / "split"), "--max-iters", "2"]) == 0
    timing = ("elapsed_s", "train/iter_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
    straight = strip(common.read_metrics(tmp_path / "straight"))
    assert strip(common.read_metrics(tmp_path / "split")) == straight  # incl. the stat tracker's baseline
    rows = [r for r in straight if "ratio/first_abs_dev" in r]
    assert len(rows) == 2 and all(r["ratio/first_abs_dev"] == 0.0 and r["train/kl"] >= 0 for r in rows)
    assert (
        "eval/base_cfg/score" in straight[0]
        and (tmp_path / "straight" / "samples" / "iter_000002.png").exists()
    )


NEEDS_CHECKPOINT = "needs the stage-1 embedded checkpoint (models/embedded/stage1/default.safetensors)"


@pytest.mark.skipif(not HAVE_CHECKPOINT, reason=NEEDS_CHECKPOINT)
def test_short_run_raises_the_reward(tmp_path):
    """DDPO-IS on the embedded default with JPEG compressibility (DDPO's dense reward): over the last 5 of 20
    iterations the training reward beats an lr-0 control run on the same prompts and seeds by a clear margin
    (calibrated on the stage-1 embedded checkpoint: gain 0.10 with 6 steps on the old ``shift(1 - i/N)``
    schedule).  10 SDE steps on the diffusers schedule (math.md §0), as train.grpo's test: with 6 steps
    (``..., 0.432, 0.0089, 0``) the gain fell to 0.036; with 10 it was 0.087 (seed 0, a random 99% of the
    steps, a 32-reward buffer: the settings pinned here).  With ddpo-pytorch's defaults (every step, a
    16-reward buffer; the preset's since 2026-12-03) this 20-iteration run is not a reliable signal: on the
    old 6-step schedule 0.020/0.082/-0.051 on seeds 0/1/2, and on the 10-step diffusers schedule it missed
    the 0.04 margin on seed 0."""
    argv = [*JPEG_SHORT_RUN, "--sample.num-steps", "10", "--train.timestep-fraction", "0.99"]
    argv += ["--train.stat-buffer", "32"]
    gain = paired_reward_gain(ddpo, tmp_path, argv, iters=20, last=5)
    print(f"ddpo gain {gain:+.4f}")
    assert gain > 0.04, gain
