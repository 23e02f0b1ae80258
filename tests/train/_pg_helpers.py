"""Helpers of the policy-gradient tests (train.grpo, train.ddpo): the embedded model they are calibrated on
(the 4-block stage-1 checkpoint in ``models/embedded/stage1``, or a seeded random EmbeddedDefault without
it), trainers built through the public pieces, and a tiny
random SD1.5-style pipeline (UNet, CLIP text encoder with a written vocabulary, VAE) saved to disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

import models.embedded as embedded
from train.config import parse_cli
from train.evaluation import Evaluator
from train.policy import build_policy
from train.rewards.registry import build_reward

# EMBEDDED_DIR (a directory with default.safetensors + default.json, e.g. a pretraining snapshot) replaces
# the checkpoint the tests use. The learning tests were calibrated on the 4-block stage-1 checkpoint (the
# shipped default until 2026-11-22). On the first 8-block checkpoint (commit 9dedc51, 30% mismatched
# captions through its stage 2), 10 iterations of these short runs barely moved the held-out score (64
# prompts; README, "Policy-gradient training").
_OVERRIDE = os.environ.get("EMBEDDED_DIR") or str(Path(embedded.DEFAULT_DIR) / "stage1")
HAVE_CHECKPOINT = (Path(_OVERRIDE) / "default.safetensors").exists()

# The learning tests' seed: 0 in CI, where their margins were calibrated; ``NFT_LEARNING_SEED=S`` reruns them
# on another seed (the prompt draws, rollout noise and evaluation seeds) to see how far a margin holds.  It
# goes first in the argument list, so a test that names its own ``--seed`` keeps it.
LEARN_SEED = os.environ.get("NFT_LEARNING_SEED", "0")


def seeded(argv: list) -> list:
    return ["--seed", LEARN_SEED, *argv]


# 2 prompts x 4 images, 4 sampler steps, 4 held-out prompts: the small run the PG tests share
SMALL = [
    "--sample.prompts-per-iter",
    "2",
    "--sample.images-per-prompt",
    "4",
    "--sample.num-steps",
    "4",
    "--eval.num-prompts",
    "4",
    "--eval.num-steps",
    "4",
    "--log.progress",
    "false",
]


STAGE3 = Path(embedded.DEFAULT_DIR) / "stage3"  # the 8-block model, the shipped default until 2026-12-05


def use_checkpoint(monkeypatch, directory) -> None:
    """``models.embedded.load_default`` loads the checkpoint in ``directory`` instead of the shipped one."""
    def load(device=None, dtype=None):
        return embedded.EmbeddedDefault.from_pretrained(directory, device=device, dtype=dtype)

    monkeypatch.setattr(embedded, "load_default", load)


def use_embedded_default(monkeypatch) -> None:
    """The stage-1 embedded checkpoint (or ``EMBEDDED_DIR``), or a seeded random model without it."""
    if HAVE_CHECKPOINT:
        monkeypatch.setattr(
            embedded,
            "load_default",
            lambda device=None, dtype=None: embedded.EmbeddedDefault.from_pretrained(
                _OVERRIDE, device=device, dtype=dtype
            ),
        )
        return

    def random_default(device=None, dtype=None):
        state = torch.random.get_rng_state()
        torch.manual_seed(1234)
        model = embedded.EmbeddedDefault().to(device=device, dtype=dtype).eval().requires_grad_(False)
        torch.random.set_rng_state(state)
        return model

    monkeypatch.setattr(embedded, "load_default", random_default)


def build_trainer(module, tmp_path, argv, device="cpu"):
    """``module``'s trainer on the embedded default (or a ``--model`` directory), as ``main`` does."""
    cfg = parse_cli(
        module.PRESETS["tiny"]().__class__, list(argv), prog="test", description="", presets=module.PRESETS
    )
    module.validate(cfg)
    reward = build_reward(cfg.reward)
    policy = build_policy(
        cfg.models,
        preset=cfg.preset,
        model_path=cfg.model,
        device=torch.device(device),
        seed=cfg.seed,
        prompts=cfg.prompts,
        eval_prompts=cfg.eval_prompts,
        tasks=cfg.tasks,
    )
    trainer_cls = next(
        getattr(module, n)
        for n in (
            "SPOTrainer", "D3POTrainer", "GRPOTrainer", "DDPOTrainer", "NFTTrainer", "DraftTrainer",
            "AlignPropTrainer", "ReFLTrainer", "NablaGFNTrainer",
        )  # spo has both
        if hasattr(module, n)
    )
    return trainer_cls(cfg, tmp_path, policy, reward, Evaluator(cfg.eval, seed=cfg.seed, reward=reward))


def rollout_reward_mean(trainer, it: int) -> float:
    """The mean reward of ``trainer``'s iteration-``it`` rollouts over all ranks, without training on them:
    what ``train/reward_mean`` logs, for every loop (NFT, the PG loops, D3PO's pairs, SPO's chains)."""
    if hasattr(trainer, "rollout_tuples"):  # SPO (a D3POTrainer too): the chains' final samples
        plan, _, rewards, _ = trainer.rollout_tuples(it)
        return float(trainer.to_global(plan, rewards.float()).mean())
    if hasattr(trainer, "rollout_pairs"):  # D3PO
        pairs = trainer.rollout_pairs(it)
        return float(trainer.to_global(pairs.plan, pairs.rewards).float().mean())
    got = trainer.rollout_and_reward(it)
    rewards = got[2] if isinstance(got, tuple) else trainer.global_batch(got).rewards  # NFT / the PG loops
    return float(rewards.mean())


def lr0_control_reward_means(module, run_dir: Path, argv: list, iterations, heldout_at=None):
    """``train/reward_mean`` at ``iterations`` of ``module``'s run ``argv`` with ``--train.lr 0``, without
    running its other iterations.  At rate 0, AdamW neither steps nor decays the weights, so every adapter
    stays at its start (LoRA B = 0; NFT's old adapter, an average of it, with it, and the eval EMA), and
    iteration k's rewards are the starting policy's on iteration k's prompts and seeds, which the loop draws
    from the seed and k alone.  So only those rollouts run, with the run's thread count.  With ``heldout_at``
    it returns ``(means, evaluation)``, the evaluation being the lr-0 run's held-out one after that iteration
    (:func:`heldout_eval`: the same starting weights).  ``tests/train/test_lr0_control.py`` checks both
    against whole lr-0 runs of each loop, value for value."""
    tr = build_trainer(module, run_dir, [*argv, "--train.lr", "0"])
    threads = torch.get_num_threads()
    if tr.cfg.threads:
        torch.set_num_threads(tr.cfg.threads)
    try:
        means = [rollout_reward_mean(tr, it) for it in iterations]
        if heldout_at is None:
            return means
        return means, heldout_eval(tr, run_dir, heldout_at)
    finally:
        torch.set_num_threads(threads)


def trained_vs_lr0(module, trainer, tmp_path: Path, argv: list, lr: str, *, iters: int = 12, last: int = 5):
    """``iters`` iterations of ``trainer`` (built by ``trainer(run_dir, argv)``) at rate ``lr`` against the
    lr-0 control on the same prompts and seeds -> ``(means, heldout)``: per run (``"trained"``,
    ``"control"``) the mean ``train/reward_mean`` of the last ``last`` iterations and the held-out reward
    after the run (:func:`heldout_eval`; the control's from :func:`lr0_control_reward_means`)."""
    argv = seeded(argv)
    tr = trainer(tmp_path / "trained", [*argv, "--train.lr", lr])
    rewards = [float(tr.train_iteration(it)[0]["train/reward_mean"]) for it in range(1, iters + 1)]
    means = {"trained": sum(rewards[-last:]) / last}
    heldout = {"trained": heldout_eval(tr, tmp_path / "trained", iters)["reward"]}
    control, evaluation = lr0_control_reward_means(
        module, tmp_path / "control", argv, range(iters - last + 1, iters + 1), iters
    )
    means["control"], heldout["control"] = sum(control) / last, evaluation["reward"]
    return means, heldout


def bf16_autocast_ok() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
        return True
    except (RuntimeError, AssertionError):
        return False


def make_tiny_sd_pipeline(root: Path):
    """A random SD1.5-style pipeline (UNet2DConditionModel, CLIPTextModel + CLIPTokenizer from a written
    letter vocabulary, AutoencoderKL with factor 2, a DDIM scheduler with SD1.5's config) and a prompt
    file."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=8)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=60,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        layers_per_block=1,
    )
    # SD1.5's: set_alpha_to_one=False, the last DDIM step goes to alphas_cumprod[0]
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        steps_offset=1,
        clip_sample=False,
    )
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(root / "pipe")
    (root / "prompts.txt").write_text("a red cat\na blue dog\na green bird\nan apple\n")
    return root / "pipe", root / "prompts.txt"


def paired_reward_gain(module, run_root: Path, argv: list, *, iters: int, last: int) -> float:
    """Mean training reward over the last ``last`` iterations of a run minus that of the same run with
    ``--train.lr 0``: both draw the same prompts and rollout seeds each iteration (derived from the seed and
    the iteration), so the difference is the effect of the updates, not of the prompt draw.  The control's
    last ``last`` iterations come from :func:`lr0_control_reward_means`."""
    from train import common

    run = run_root / "trained"
    argv = seeded(argv)
    assert module.main(["--run-dir", str(run), *argv, "--max-iters", str(iters)]) == 0
    rows = [r for r in common.read_metrics(run) if "train/reward_mean" in r]
    assert [r["iteration"] for r in rows] == list(range(1, iters + 1))
    assert all(r["ratio/first_abs_dev"] == 0.0 for r in rows if r.get("train/trained_samples"))
    trained = sum(r["train/reward_mean"] for r in rows[-last:]) / last
    control = lr0_control_reward_means(module, run_root / "control", argv, range(iters - last + 1, iters + 1))
    return trained - sum(control) / last


# The paired learning tests of Flow-GRPO and DDPO-IS (JPEG compressibility, small batches, few steps).
JPEG_SHORT_RUN = [
    "--reward",
    "jpeg_compressibility",
    "--sample.solver",
    "flow-sde",
    "--train.grad-accum",
    "1",
    "--sample.num-steps",
    "6",
    "--sample.prompts-per-iter",
    "2",
    "--sample.images-per-prompt",
    "8",
    "--sample.rollout-batch",
    "16",
    "--train.batch-size",
    "4",
    "--sample.forward-chunk",
    "8",
    "--train.lr",
    "1e-2",
    "--train.clip-range",
    "1e-2",
    "--eval.num-prompts",
    "2",
    "--eval.every",
    "100",
    "--eval.num-steps",
    "4",
    "--log.progress",
    "false",
]


def heldout_eval(trainer, run_dir: Path, iteration: int) -> dict:
    """The loop's evaluation of ``trainer`` now (eval-EMA weights, held-out prompts, the same seeds in every
    run): ``{"score", "reward", ...}``."""
    trainer.iteration = iteration
    (Path(run_dir) / "samples").mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        return trainer.evaluator.run(trainer.policy, iteration, Path(run_dir), shift=None, dist=trainer.dist)


def make_tiny_flow_pipeline(root: Path, family: str):
    """A random tiny diffusers SD3 or FLUX pipeline (tests/models/test_text_vae.py's) saved under ``root`` and
    a two-prompt file -> ``(pipeline folder, prompts file)``."""
    from tests.models.test_text_vae import _flux_pipeline, _sd3_pipeline

    pipe = _sd3_pipeline(root) if family == "sd3" else _flux_pipeline(root)
    pipe.save_pretrained(root / "pipe")
    (root / "prompts.txt").write_text("a red cat\na blue dog\n")
    return root / "pipe", root / "prompts.txt"
