"""train.grpo (Flow-GRPO, math.md §3): the ratio is exactly 1 before the first update whatever the micro-batch
(fp32, bf16 autocast, CFG, the Fast window, cps), the PPO clip and KL formulas against hand computations,
equal-reward groups masked, bad input fails fast, resume is exact, and a short run raises the reward."""

import math
from types import SimpleNamespace

import pytest
import torch

import kernels
import train.grpo as grpo
from engine import guided_prediction
from train import common
from train import policy_gradient as pg
from train.config import parse_cli

from ._pg_helpers import (
    HAVE_CHECKPOINT,
    JPEG_SHORT_RUN,
    SMALL,
    bf16_autocast_ok,
    build_trainer,
    paired_reward_gain,
    use_embedded_default,
)


@pytest.fixture(autouse=True)
def _embedded(monkeypatch):
    use_embedded_default(monkeypatch)


# ---------------------------------------------------------------------------------------------- exactness
EXACT_CASES = {
    "fp32": [],
    "bf16-autocast": ["--train.autocast", "bfloat16"],
    "cfg": ["--sample.guidance-scale", "3.0"],
    "fast-window": ["--sample.sde-window", "1,3"],
    "cps": ["--sample.solver", "cps"],
    "cps-gaussian": ["--sample.solver", "cps", "--sample.cps-log-prob", "gaussian"],
}


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_ratio_is_exactly_one_before_the_first_update(tmp_path, case):
    if case == "bf16-autocast" and not bf16_autocast_ok():
        pytest.skip("no bf16 autocast on this CPU")
    # rollout micro-batch 8, training micro-batch 3, canonical forward chunk 4: three different batchings.
    trainer = build_trainer(
        grpo,
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
            "--train.grad-accum",
            "100",
            *EXACT_CASES[case],
        ],
    )
    traj = trainer.rollout_and_reward(1)
    adv, mask, _ = trainer.advantages(traj)
    mask[:] = True
    stats = trainer.train_on(1, traj, adv, mask)
    n_train = max(1, int(0.99 * len(traj.train_steps)))
    assert stats["ratio/first_count"] == len(traj) * n_train  # every log-prob of the first pass
    assert stats["ratio/first_abs_dev"] == 0.0
    assert trainer.opt_step == 1 and stats["train/trained_samples"] == len(traj)
    if case == "fast-window":
        assert traj.train_steps == (1, 2)
        assert torch.all(traj.log_probs[:, [0, 3]] == 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("autocast", ["none", "bfloat16"])
def test_ratio_is_exactly_one_on_cuda(tmp_path, autocast):
    """The same guarantee on the GPU: Triton kernels, CUDA-graph rollouts, eager training re-scoring."""
    with kernels.use_backend("auto"):
        argv = [
            *SMALL,
            "--reward",
            "jpeg_compressibility",
            "--sample.rollout-batch",
            "8",
            "--train.batch-size",
            "3",
            "--sample.forward-chunk",
            "4",
            "--train.grad-accum",
            "100",
            "--train.autocast",
            autocast,
            "--sample.guidance-scale",
            "2.0",
        ]
        trainer = build_trainer(grpo, tmp_path, argv, device="cuda")
        traj = trainer.rollout_and_reward(1)
        adv, mask, _ = trainer.advantages(traj)
        mask[:] = True
        stats = trainer.train_on(1, traj, adv, mask)
    assert stats["ratio/first_count"] > 0 and stats["ratio/first_abs_dev"] == 0.0


def test_unchunked_forward_is_not_batch_invariant_here(tmp_path):
    """The control: re-scoring one sample at a time with the plain denoiser does not reproduce the rollout's
    log-probs on this machine (batch-1 GEMMs take another path), which is why the chunked forward exists."""
    trainer = build_trainer(
        grpo,
        tmp_path,
        [
            *SMALL,
            "--reward",
            "jpeg_compressibility",
            "--sample.rollout-batch",
            "8",
            "--sample.forward-chunk",
            "8",
        ],
    )
    traj = trainer.rollout_and_reward(1)
    plain = trainer.policy.denoiser.inner
    devs = []
    with torch.no_grad():
        for r in range(len(traj)):
            for s in traj.train_steps:
                x = traj.states[r : r + 1, s]
                v = guided_prediction(
                    plain, x, traj.timesteps[s : s + 1], trainer.policy.encode([traj.prompts[r]])
                )
                sig = traj.sigmas
                _, lp, _, _ = kernels.sde_step(
                    x,
                    v,
                    sig[s],
                    sig[s + 1],
                    noise_level=0.7,
                    sigma_max=sig[1] if s == 0 else None,
                    prev_sample=traj.states[r : r + 1, s + 1],
                )
                devs.append(float((lp[0] - traj.log_probs[r, s]).abs()))
    if max(devs) == 0.0:
        pytest.skip("this CPU's kernels happen to be batch invariant at batch 1")
    assert max(devs) > 0.0


# ---------------------------------------------------------------------------------------------- formulas
def test_ppo_clip_loss_by_hand():
    logp = torch.tensor([0.0, 1e-3, -2e-3, 5e-5])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, 0.5])
    eps = 1e-4
    loss, ratio = pg.ppo_clip_loss(logp, old, adv, eps)
    terms = []
    for lp, a in zip(logp.tolist(), adv.tolist(), strict=True):
        r = math.exp(lp)
        terms.append(max(-a * r, -a * min(max(r, 1 - eps), 1 + eps)))
    assert loss.item() == pytest.approx(sum(terms) / 4, rel=1e-6)
    assert torch.allclose(ratio, logp.exp())
    # the clip stops the gradient where it binds: A > 0 with ratio > 1 + eps, A < 0 with ratio < 1 - eps
    lp = logp.clone().requires_grad_(True)
    pg.ppo_clip_loss(lp, old, adv, eps)[0].backward()
    assert lp.grad[0] == pytest.approx(-1.0 / 4) and lp.grad[3] == pytest.approx(-0.5 * math.exp(5e-5) / 4)
    assert lp.grad[1] == 0 and lp.grad[2] == 0


def test_flow_grpo_kl_by_hand_and_equals_gaussian_kl():
    g = torch.Generator().manual_seed(0)
    mean, mean_ref = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = torch.tensor([0.5, 0.2, 1.3])
    kl = pg.flow_grpo_kl(mean, mean_ref, std)
    for b in range(3):
        hand = sum(d * d for d in (mean[b] - mean_ref[b]).flatten().tolist()) / 32 / (2 * std[b].item() ** 2)
        assert kl[b].item() == pytest.approx(hand, rel=1e-5)
    with kernels.use_backend("reference"):
        assert torch.allclose(pg.gaussian_step_kl(mean, mean_ref, std), kl, rtol=1e-4, atol=1e-6)
    assert torch.all(pg.flow_grpo_kl(mean, mean, std) == 0)


@pytest.mark.parametrize("form", ["reference", "gaussian"])
def test_grpo_step_loss_combines_policy_and_kl(form):
    """``--train.kl-form reference`` (the default) divides by flow_grpo's ``2 std_dev_t^2``, ``gaussian`` by
    the step's variance ``2 std^2``."""
    argv = ["--train.kl-beta", "0.5"] + (["--train.kl-form", form] if form != "reference" else [])
    cfg = parse_cli(grpo.GRPOConfig, argv, prog="t", description="", presets=grpo.PRESETS)
    trainer = SimpleNamespace(cfg=cfg)
    mean, mean_ref = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    std, std_dev_t = torch.tensor([1.0, 2.0]), torch.tensor([4.0, 0.5])
    score = pg.StepScore(
        log_prob=torch.tensor([0.0, 0.0]), mean=mean, std=std, mean_ref=mean_ref, std_dev_t=std_dev_t
    )
    loss, parts = grpo.GRPOTrainer.step_loss(
        trainer, score, torch.zeros(2), torch.tensor([1.0, -3.0]), n_steps=4
    )
    policy = (-1.0 + 3.0) / 2
    s = std_dev_t if form == "reference" else std
    kl = (1 / (2 * s[0].item() ** 2) + 1 / (2 * s[1].item() ** 2)) / 2
    assert loss.item() == pytest.approx((policy + 0.5 * kl) / 4)
    assert parts["kl"].item() == pytest.approx(kl)


def test_score_steps_gives_flow_grpos_std_dev_t(tmp_path):
    """The re-scored step carries flow_grpo's std_dev_t: ``a sqrt(sigma / (1 - sigma))`` (sigma_max where
    sigma == 1) for flow-sde, without the step's sqrt(-dt) that the transition's std has."""
    argv = [*SMALL, "--reward", "jpeg_compressibility", "--sample.solver", "flow-sde"]
    trainer = build_trainer(grpo, tmp_path, argv)
    traj = trainer.rollout_and_reward(1)
    assert traj.solver == "flow-sde"
    rows, steps = torch.arange(4), torch.tensor([0, 1, 2, 3])
    score = pg.score_steps(trainer.policy, traj, rows, steps)
    sig, nxt, smax = traj.sigmas[steps].double(), traj.sigmas[steps + 1].double(), traj.sigmas[1].double()
    denom = torch.where(sig == 1.0, smax, sig)
    std_dev_t = 0.7 * torch.sqrt(sig / (1 - denom))
    torch.testing.assert_close(score.std_dev_t.double(), std_dev_t, rtol=1e-6, atol=0)
    torch.testing.assert_close(score.std.double(), std_dev_t * torch.sqrt(sig - nxt), rtol=1e-5, atol=0)


def test_equal_reward_groups_are_masked_out(tmp_path):
    cfg = parse_cli(grpo.GRPOConfig, [], prog="t", description="", presets=grpo.PRESETS)
    traj = SimpleNamespace(
        rewards=torch.tensor([0.5, 0.5, 0.5, 0.0, 1.0, 0.0]), group_ids=torch.tensor([0, 0, 0, 1, 1, 1])
    )
    adv, mask, stats = grpo.GRPOTrainer.advantages(SimpleNamespace(cfg=cfg), traj)
    assert mask.tolist() == [False, False, False, True, True, True]
    assert torch.all(adv[:3] == 0) and stats["train/masked_frac"] == pytest.approx(0.5)
    # the loop trains on the unmasked samples only
    trainer = build_trainer(grpo, tmp_path, [*SMALL, "--reward", "jpeg_compressibility"])
    traj = trainer.rollout_and_reward(1)
    adv, mask, _ = trainer.advantages(traj)
    mask[:4] = False
    assert trainer.train_on(1, traj, adv, mask)["train/trained_samples"] == 4
    out = trainer.train_on(2, traj, adv, torch.zeros_like(mask))
    assert out["train/trained_samples"] == 0 and out["ratio/first_count"] == 0
    assert out["ratio/first_abs_dev"] == 0.0


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--sample.solver", "ddim"], "--sample.solver: expected flow-sde or cps"),
        (["--sample.sde-window", "3,2"], "--sample.sde-window: expected start,end"),
        (["--train.autocast", "fp8"], "--train.autocast: expected none, bfloat16 or float16"),
        (["--train.clip-range", "0"], "--train.clip-range: expected a value > 0"),
        (["--train.kl-form", "exact"], "--train.kl-form: expected reference or gaussian, got 'exact'"),
        (["--sample.cps-log-prob", "x"], "--sample.cps-log-prob: expected reference or gaussian, got 'x'"),
        (["--preset", "sd3.5-m"], "--model: expected a local diffusers directory"),
    ],
)
def test_bad_input_fails_before_work(tmp_path, capsys, argv, needle):
    assert grpo.main(["--run-dir", str(tmp_path / "r"), *argv]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------- end to end
RUN = [
    *SMALL,
    "--reward",
    "jpeg_compressibility",
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
]


def test_resume_matches_uninterrupted_run(tmp_path):
    timing = ("elapsed_s", "train/iter_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
    assert grpo.main(["--run-dir", str(tmp_path / "straight"), *RUN, "--max-iters", "2"]) == 0
    assert grpo.main(["--run-dir", str(tmp_path / "split"), *RUN, "--max-iters", "1"]) == 0
    assert grpo.main(["--resume", str(tmp_path / "split"), "--max-iters", "2"]) == 0
    straight = strip(common.read_metrics(tmp_path / "straight"))
    split = strip(common.read_metrics(tmp_path / "split"))
    assert split == straight
    assert all(r["ratio/first_abs_dev"] == 0.0 for r in straight if "ratio/first_abs_dev" in r)
    assert (tmp_path / "split" / "samples" / "iter_000002.png").exists()


NEEDS_CHECKPOINT = "needs the stage-1 embedded checkpoint (models/embedded/stage1/default.safetensors)"


@pytest.mark.skipif(not HAVE_CHECKPOINT, reason=NEEDS_CHECKPOINT)
def test_short_run_raises_the_reward(tmp_path):
    """Flow-GRPO on the embedded default, JPEG compressibility (DDPO's dense reward): over the last 5 of 20
    iterations the training reward beats an lr-0 control run on the same prompts and seeds by a clear margin.

    10 SDE steps (Flow-GRPO's training count), not the shared 6: on the diffusers schedule (math.md §0) 6
    steps
    end ``0.432, 0.0089, 0``, so the penultimate SDE step injects noise of std ~0.4 that the last one cannot
    remove, and the gain fell to 0.006 (seed 0).  4 prompts x 8 images an iteration: with 2 (the DDPO test's)
    the gain on ``NFT_LEARNING_SEED`` 0-3 was +0.106, +0.014, +0.065, -0.004 (30 iterations: +0.131, +0.124,
    +0.019, +0.068); with 4, +0.141, +0.119, +0.118, +0.092 (stage-1 checkpoint, 2026-12-06)."""
    argv = [*JPEG_SHORT_RUN, "--train.kl-beta", "0", "--sample.num-steps", "10"]
    argv += ["--sample.prompts-per-iter", "4"]
    gain = paired_reward_gain(grpo, tmp_path, argv, iters=20, last=5)
    print(f"grpo gain {gain:+.4f}")
    assert gain > 0.04, gain


@pytest.mark.skipif(not HAVE_CHECKPOINT, reason=NEEDS_CHECKPOINT)
def test_cps_score_function_direction_raises_the_expected_reward(tmp_path):
    """The policy-gradient direction from the engine's ``cps`` log-probs (flow_grpo's form: the rollouts
    re-scored, ``sum_steps A grad log p``) against a central finite difference of the sampler's expected
    reward along it, with common random numbers (the same prompts and seeds): the reward must rise along the
    ascent direction, so the sampler and the log-prob are one distribution and the gradient flows the right
    way.  Measured (stage-1 checkpoint, 128 samples, a small random LoRA start, h 0.01): saturation 0.10344
    against 0.10222 (+0.061 per unit step); with JPEG compressibility +0.21.  (The D3PO, SPO and 1e-2 GRPO
    runs that fall with ``cps`` fall from their step size: GRPO gains +0.030 at lr 1e-3, docs/math.md §6.)"""
    argv = ["--reward", "saturation", "--sample.solver", "cps", "--sample.num-steps", "10",
            "--sample.rollout-batch", "64", "--log.progress", "false"]  # fmt: skip
    tr = build_trainer(grpo, tmp_path, argv)
    pol, n = tr.policy, 128
    prompts, seeds = pol.sample_train_prompts(n, 0), list(range(1000, 1000 + n))

    def mean_reward():
        with pol.adapter("default"):
            traj = pg.collect_rollouts(pol, prompts, list(range(n)), seeds, tr.cfg.sample, solver=tr.solver,
                                       reward=tr.reward, pool=tr.pool, progress=tr.progress)  # fmt: skip
        return traj

    params = list(pol.trainable_parameters())
    g0 = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at 0, which zeroes A's gradient: start from a small random adapter
        for p in params:
            p.add_(1e-2 * torch.randn(p.shape, generator=g0))
    traj = mean_reward()
    adv = traj.rewards.float() - traj.rewards.float().mean()
    with pol.adapter("default"):
        for s in traj.train_steps:
            score = pg.score_steps(pol, traj, torch.arange(n), torch.full((n,), s))
            (adv.to(score.log_prob) * score.log_prob).mean().backward()
    ascent = [p.grad.detach().clone() for p in params]
    norm = torch.sqrt(sum((d**2).sum() for d in ascent))
    assert float(norm) > 0
    h, out = 1e-2, []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, d in zip(params, ascent, strict=True):
                p.add_(sign * h * d / norm)
        out.append(float(mean_reward().rewards.float().mean()))
        with torch.no_grad():
            for p, d in zip(params, ascent, strict=True):
                p.sub_(sign * h * d / norm)
    assert out[0] > out[1], out
