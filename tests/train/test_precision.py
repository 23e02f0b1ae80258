"""Mixed precision and non-finite guards (issue 20, item 6).

* On a tiny random SD3 pipeline saved with diffusers: one NFT and one GRPO optimizer step from the same start
  (the same LoRA weights, data, noise), with ``--models.dtype bfloat16`` and ``float32``.  In the bf16 run
  every LoRA entry with a gradient moves (fp32 master weights: a bf16 weight keeps 8 mantissa bits, so an
  Adam step of ``lr = 3e-4`` on an entry above ~0.15 would round away), and the two runs agree to bf16
  forward precision.
* An fp16 SD1.5-style DDPO run (tiny UNet pipeline) trains two iterations with finite, moved weights.
* A NaN rollout stops the run with a message naming it, and no checkpoint is written with NaN weights.
"""

from __future__ import annotations

import pytest
import torch

import train.ddpo as ddpo
import train.grpo as grpo
import train.nft as nft
from tests.models.test_text_vae import _sd3_pipeline
from train import common
from train.config import parse_cli
from train.policy import build_policy
from train.rewards.registry import build_reward

from ._pg_helpers import SMALL as PG_SMALL
from ._pg_helpers import make_tiny_sd_pipeline

# bf16 keeps 8 significant bits: unit roundoff u = 2^-8.  The tiny transformer's forward and backward round
# every activation a few times per layer (2 blocks); a gradient that agrees to a few u (relative norm) is what
# bf16 forwards can give.  Measured: 0.009 (NFT), GRPO below it.
BF16_U = 2.0**-8
GRAD_RTOL = 8 * BF16_U


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3")
    _sd3_pipeline(tmp).save_pretrained(tmp / "pipe")
    (tmp / "prompts.txt").write_text("a red cat\na blue dog\n")
    return tmp


def _args(sd3_dir, dtype):
    return [
        "--preset", "sd3.5-m", "--model", str(sd3_dir / "pipe"), "--prompts", str(sd3_dir / "prompts.txt"),
        "--models.resolution", "16", "--models.lora-rank", "4", "--models.dtype", dtype,
        "--sample.prompts-per-iter", "2", "--sample.images-per-prompt", "2", "--sample.num-steps", "4",
        "--train.batch-size", "4", "--log.progress", "false", "--reward", "jpeg_compressibility",
    ]


def _start(policy):
    """The same start for both dtypes: LoRA A ~ N(0, 1/r) rounded to bf16 (so both hold the same values), B
    random too (B = 0 would leave A without a gradient at the first step), ``old`` = ``default``."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p, q in zip(policy.trainable_parameters(), policy.old_parameters(), strict=True):
            std = 0.25 if p.shape[1] > p.shape[0] else 0.05  # lora_A [r, in] / lora_B [out, r]
            val = (torch.randn(p.shape, generator=g) * std).to(torch.bfloat16).float()
            p.copy_(val)
            q.copy_(val)


def _build(module, cfg_cls, argv, tmp_path):
    cfg = parse_cli(cfg_cls, argv, prog="test", description="", presets=module.PRESETS)
    module.validate(cfg)
    policy = build_policy(
        cfg.models, preset=cfg.preset, model_path=cfg.model, device=torch.device("cpu"), seed=0,
        prompts=cfg.prompts, eval_prompts=cfg.prompts,
    )
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters() + policy.old_parameters())
    assert policy.transformer.pos_embed.proj.weight.dtype == policy.dtype  # frozen weights: the model dtype
    _start(policy)
    return cfg, policy


def _one_step(trainer, *args):
    """``trainer.train_on(*args)`` (one optimizer step) -> (gradient seen by the optimizer, update, weights
    before)."""
    grads = []
    trainer.opt.register_step_pre_hook(
        lambda opt, args, kwargs: grads.append(torch.cat([p.grad.flatten() for p in trainer.params]))
    )
    before = torch.cat([p.detach().flatten() for p in trainer.params])
    trainer.train_on(*args)
    assert trainer.opt_step == 1 and len(grads) == 1
    return grads[0], torch.cat([p.detach().flatten() for p in trainer.params]) - before, before


def _check_agreement(runs, lr):
    (g16, d16, w16), (g32, d32, w32) = runs["bfloat16"], runs["float32"]
    assert torch.equal(w16, w32)
    moving = g16 != 0
    assert moving.float().mean() > 0.9  # B random: every entry has a gradient
    # fp32 masters: no entry with a gradient is left unchanged in the bf16 run (bf16 weights lose those
    # whose |w| is above ~2^8 * lr / 2)
    stuck = moving & (d16 == 0)
    assert int(stuck.sum()) == 0, f"{int(stuck.sum())} of {int(moving.sum())} entries did not move"
    assert int(((w16.abs() > 2**8 * lr) & moving).sum()) > 100  # there are entries bf16 weights would lose
    rel = float((g16 - g32).norm() / g32.norm())
    assert rel < GRAD_RTOL, rel
    # Adam's first step is -lr * g / (|g| + eps) (eps 1e-8; clipping scales g, not the ratio) plus the same
    # weight decay: where the gradient's sign is sure (well above its bf16 error) the updates differ by at
    # most ~lr * eps / |g| and the rounding of the new fp32 weight (2^-24 |w|, twice)
    robust = g32.abs() > 4 * (g16 - g32).abs()
    assert robust.float().mean() > 0.8
    bound = 4 * lr * 1e-8 / g32.abs() + 2.0**-22 * (w32.abs() + lr)
    excess = ((d16 - d32).abs() - bound)[robust]
    assert float(excess.max()) <= 0, float(excess.max())


def test_nft_step_bf16_matches_fp32(sd3_dir, tmp_path):
    runs = {}
    g = torch.Generator().manual_seed(1)
    for dtype in ("bfloat16", "float32"):
        cfg, policy = _build(nft, nft.NFTConfig, _args(sd3_dir, dtype), tmp_path)
        trainer = nft.NFTTrainer(cfg, tmp_path / dtype, policy, None, None)
        plan = trainer.iteration_plan(1)
        if not runs:
            n = len(plan.prompts)
            x0 = torch.randn(n, *policy.latent_shape, generator=g)
            r = torch.rand(n, generator=g)
        runs[dtype] = _one_step(trainer, 1, plan, x0[plan.local], r[plan.local])
    _check_agreement(runs, cfg.train.lr)


def test_grpo_step_bf16_matches_fp32(sd3_dir, tmp_path):
    """The same trajectories (rolled out in fp32) re-scored and trained in both precisions; the clip range is
    opened so that the bf16 log-prob's rounding (a ratio a few u from 1) is not clipped away."""
    runs, traj = {}, None
    for dtype in ("float32", "bfloat16"):
        argv = [*_args(sd3_dir, dtype), "--sample.guidance-scale", "1", "--train.clip-range", "1e6",
                "--train.kl-beta", "0.04", "--sample.forward-chunk", "4"]
        cfg, policy = _build(grpo, grpo.GRPOConfig, argv, tmp_path)
        trainer = grpo.GRPOTrainer(cfg, tmp_path / dtype, policy, build_reward(cfg.reward), None)
        if traj is None:
            traj = trainer.rollout_and_reward(1)
            traj.rewards = torch.arange(len(traj), dtype=torch.float32)  # distinct: every sample trains
            adv, mask, _ = trainer.advantages(trainer.global_batch(traj))
        runs[dtype] = _one_step(trainer, 1, traj, adv, mask)
    _check_agreement(runs, cfg.train.lr)


def test_fp16_ddpo_trains_two_iterations_with_finite_weights(tmp_path):
    """``train.ddpo --preset sd1.5`` (fp16) on a tiny random UNet pipeline: fp32 LoRA and AdamW state, fp16
    forwards with a gradient scaler; two iterations, finite weights that moved."""
    pipe, prompts = make_tiny_sd_pipeline(tmp_path)
    run = tmp_path / "run"
    argv = [
        "--model", str(pipe), "--prompts", str(prompts), "--preset", "sd1.5", "--models.resolution", "16",
        "--models.lora-rank", "4", "--reward", "jpeg_compressibility", *PG_SMALL, "--sample.rollout-batch",
        "8", "--train.batch-size", "4", "--sample.forward-chunk", "4", "--max-iters", "2",
        "--run-dir", str(run), "--log.checkpoint-every", "1", "--train.lr", "1e-2",
    ]
    assert ddpo.preset_sd15().models.dtype == "float16"
    assert ddpo.main(argv) == 0
    state = common.load_checkpoint(run)
    assert state["iteration"] == 2 and state["opt_step"] >= 2 and "grad_scaler" in state
    default = state["policy"]["default"]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in default)
    assert max(float(t.abs().max()) for t in default[1::2]) > 0  # lora_B started at 0: it moved
    for s in state["optimizer"]["state"].values():
        assert s["exp_avg"].dtype == torch.float32 and torch.isfinite(s["exp_avg_sq"]).all()
    # the scaler's state resumes with the run
    assert ddpo.main(["--resume", str(run), "--max-iters", "3"]) == 0
    state = common.load_checkpoint(run)
    assert state["iteration"] == 3 and state["grad_scaler"]["scale"] > 0
    assert all(torch.isfinite(t).all() for t in state["policy"]["default"])


NFT_SMALL = [
    "--sample.prompts-per-iter", "2", "--sample.images-per-prompt", "4", "--sample.num-steps", "4",
    "--train.batch-size", "8", "--train.steps-per-iter", "1", "--eval.num-prompts", "2", "--eval.num-steps",
    "2", "--log.progress", "false", "--log.checkpoint-every", "1",
]


def test_nan_rollout_stops_the_run_without_a_nan_checkpoint(tmp_path, monkeypatch, capsys):
    """The old adapter (the rollout policy) turns NaN before iteration 2's rollout: the run stops with a
    message naming the non-finite rollout, and the latest checkpoint is iteration 1's, finite."""
    real = nft.NFTTrainer.train_iteration

    def poisoned(self, it):
        if it == 2:
            with torch.no_grad():
                for p in self.policy.old_parameters():
                    p.fill_(float("nan"))
        return real(self, it)

    monkeypatch.setattr(nft.NFTTrainer, "train_iteration", poisoned)
    run = tmp_path / "r"
    assert nft.main(["--run-dir", str(run), *NFT_SMALL, "--max-iters", "3"]) == 1
    err = capsys.readouterr().err
    assert "non-finite rollout at iteration 2: 8 of 8 latents" in err, err
    state = common.load_checkpoint(run)
    assert state["iteration"] == 1
    tensors = state["policy"]["default"] + state["policy"]["old"] + state["policy"]["eval_ema"]["shadow"]
    assert all(torch.isfinite(t).all() for t in tensors)


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path, monkeypatch, capsys):
    """Weights that turned NaN without a non-finite gradient (here: set by hand after iteration 1's step) are
    never written: the save refuses and stops the run; the previous checkpoint stays the latest."""
    real = nft.NFTTrainer.train_iteration

    def poisoned(self, it):
        out = real(self, it)
        if it == 2:
            with torch.no_grad():
                self.policy.trainable_parameters()[0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(nft.NFTTrainer, "train_iteration", poisoned)
    run = tmp_path / "r"
    assert nft.main(["--run-dir", str(run), *NFT_SMALL, "--max-iters", "3"]) == 1
    err = capsys.readouterr().err
    assert "refusing to write the checkpoint of iteration 2" in err and "1 default" in err, err
    assert common.load_checkpoint(run)["iteration"] == 1
    assert not (run / "checkpoints" / "iter_000002.pt").exists()
