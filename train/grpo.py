"""Flow-GRPO (arXiv 2505.05470), exactly as math.md §3 defines it.  ``python -m train.grpo --help``.

Per iteration:
  1. rollouts with the current ``default`` adapter through the engine's SDE solver (``flow-sde``, noise level
     0.7, or ``cps``), K images per prompt, few steps ("denoising reduction"; evaluation uses more, with the
     ODE), optional CFG; the trajectory and the per-step log-probs are stored: they are PPO's old log-probs;
     ``--sample.sde-window start,end`` is Flow-GRPO-Fast: noise only in those steps, ODE elsewhere, and only
     they are trained;
  2. rewards (on a worker thread, overlapped with the next rollout micro-batch);
  3. ``A = (R - mean_prompt R) / (std + 1e-4)`` (global or per-group std), clipped to ``[-m, m]``;
     groups whose rewards are all equal carry no signal and are masked out;
  4. for each sample a random ``timestep_fraction`` of its SDE steps, re-scored with the trainable adapter:
     ``ratio = exp(logp - logp_old)``, ``policy = mean_b max(-A ratio, -A clamp(ratio, 1 - eps, 1 + eps))``,
     ``KL = mean_b[mean_dims (mean_theta - mean_ref)^2 / (2 std_t^2)]`` (reference = adapters disabled) with
     ``std_t`` flow_grpo's ``std_dev_t`` (flow-sde: ``a sqrt(sigma / (1 - sigma))``, without the step's
     ``sqrt(-dt)``; cps: ``sigma_next sin(a pi / 2)``), so ``kl_beta`` means what it means in flow_grpo
     (``--train.kl-form gaussian``: the exact KL of the two step Gaussians instead);
     ``loss = policy + kl_beta KL`` per step, averaged over the trained steps; AdamW with gradient clipping;
     cps log-probs are flow_grpo's ``-mean_dims (x' - mean)^2`` (``--sample.cps-log-prob gaussian``: the
     Gaussian log-density), the scale its clip range is tuned for;
  5. eval EMA, evaluation (ODE, more steps), sample grid, checkpoint.
``ratio/first_abs_dev`` (``max |ratio - 1|`` before the first update) is 0 exactly: rollout and training
evaluate the denoiser in the same fixed-size chunks (``engine.BatchInvariantDenoiser``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .advantages import equal_reward_groups, group_advantages
from .config import ConfigError
from .evaluation import EvalConfig
from .policy import ModelConfig
from .policy_gradient import (
    PGRunConfig,
    PGSampleConfig,
    PGTrainConfig,
    PolicyGradientTrainer,
    StepScore,
    Trajectories,
    apply_tiny_settings,
    flow_grpo_kl,
    ppo_clip_loss,
    validate_common,
)
from .policy_gradient import (
    main as pg_main,
)


@dataclass
class GRPOTrainConfig(PGTrainConfig):
    kl_beta: float = field(
        default=0.04, metadata={"help": "KL-to-reference coefficient (0.04 GenEval/OCR, 0.01 PickScore)"}
    )
    kl_form: str = field(
        default="reference",
        metadata={
            "help": "KL scale: reference (flow_grpo: / 2 std_dev_t^2, no sqrt(-dt)) or gaussian (step KL)"
        },
    )


@dataclass
class GRPOSampleConfig(PGSampleConfig):
    solver: str = field(
        default="flow-sde", metadata={"help": "rollout SDE: flow-sde or cps (Flow-GRPO runs flow models)"}
    )


@dataclass
class GRPOConfig(PGRunConfig):
    sample: GRPOSampleConfig = field(default_factory=GRPOSampleConfig)
    train: GRPOTrainConfig = field(default_factory=GRPOTrainConfig)


def preset_tiny() -> GRPOConfig:
    """The embedded default on a CPU: 16 prompts x 8 images per iteration, 10 ``cps`` SDE steps for training,
    20 ODE steps for evaluation; two optimizer steps of 64 samples per iteration, lr 1e-3, clip 1e-3.

    ``cps`` rather than ``flow-sde`` rollouts: in 7 to 9-minute runs on the shipped checkpoint (lr 1e-3 to
    3e-3, noise level 0.7 or 0.4, with and without the Fast window) flow-sde's training reward rose but the
    held-out ODE score did not (0.505 at iteration 0, at most 0.521 after); with cps this preset took it to
    0.552 at iteration 30 (seed 0) and from 0.469 to 0.542 at iteration 20 (seed 1).  ``--sample.solver
    flow-sde`` gives Flow-GRPO's original SDE."""
    return apply_tiny_settings(GRPOConfig())


def preset_sd35m() -> GRPOConfig:
    """Flow-GRPO's GenEval recipe for SD3.5-M at 512 px (pass the local directory with --model): 10 SDE steps
    (noise level 0.7) with CFG 4.5 for training; evaluation as the reference's: a 40-step Euler ODE at CFG 4.5
    (yifan123/flow_grpo@ac4c86e8 scripts/train_sd3.py ``eval``: ``pipeline_with_logprob(...,
    num_inference_steps=config.sample.eval_num_steps, guidance_scale=config.sample.guidance_scale,
    noise_level=0)``, the SDE step at noise level 0 being Euler; config/grpo.py: 40 and 4.5); LoRA r 32 /
    alpha 64."""
    cfg = GRPOConfig(preset="sd3.5-m", reward="clip_score", max_iters=1000)
    cfg.models = ModelConfig(dtype="bfloat16", lora_rank=32, lora_alpha=64.0)
    cfg.sample = GRPOSampleConfig(
        solver="flow-sde",
        num_steps=10,
        noise_level=0.7,
        guidance_scale=4.5,
        prompts_per_iter=48,
        images_per_prompt=24,
        rollout_batch=16,
        forward_chunk=8,
    )
    cfg.train = GRPOTrainConfig(kl_beta=0.04, lr=3e-4, batch_size=8, grad_accum=72, clip_range=1e-4)
    cfg.eval = EvalConfig(every=50, solver="euler", num_steps=40, cfg_scale=4.5)
    return cfg


def preset_sd35m_fast() -> GRPOConfig:
    """Flow-GRPO-Fast: the SD3.5-M recipe with SDE noise (and training) in the first 2 of 10 steps only."""
    cfg = preset_sd35m()
    cfg.preset = "sd3.5-m-fast"
    cfg.sample.sde_window = (0, 2)
    return cfg


PRESETS = {"tiny": preset_tiny, "sd3.5-m": preset_sd35m, "sd3.5-m-fast": preset_sd35m_fast}


def validate(cfg: GRPOConfig) -> None:
    if cfg.sample.solver not in ("flow-sde", "cps"):
        raise ConfigError(f"--sample.solver: expected flow-sde or cps (Flow-GRPO), got {cfg.sample.solver!r}")
    if cfg.train.kl_form not in ("reference", "gaussian"):
        raise ConfigError(f"--train.kl-form: expected reference or gaussian, got {cfg.train.kl_form!r}")
    if cfg.sample.images_per_prompt < 2:
        raise ConfigError(
            f"--sample.images-per-prompt: expected an integer >= 2 (group-relative advantages: with one "
            f"image per prompt every advantage is 0), got {cfg.sample.images_per_prompt}"
        )
    validate_common(cfg)


class GRPOTrainer(PolicyGradientTrainer):
    algo = "grpo"

    def advantages(self, traj: Trajectories):
        """math.md §3: per-prompt centring, global or group std, clip to ``[-m, m]``; all-equal groups
        masked."""
        tc = self.cfg.train
        adv = group_advantages(traj.rewards, traj.group_ids, std=tc.adv_std)
        adv = adv.clamp(-tc.adv_clip_max, tc.adv_clip_max)
        equal = equal_reward_groups(traj.rewards, traj.group_ids)
        return (
            adv,
            ~equal,
            {"train/adv_abs_mean": adv.abs().mean(), "train/masked_frac": equal.float().mean()},
        )

    def step_loss(self, score: StepScore, old_log_prob, adv, n_steps: int):
        """math.md §3 per trained step: ``(policy + kl_beta KL) / n_steps``; the KL divides by flow_grpo's
        ``2 std_dev_t^2`` (``--train.kl-form reference``) or the step's variance (``gaussian``)."""
        tc = self.cfg.train
        policy, ratio = ppo_clip_loss(score.log_prob, old_log_prob, adv, tc.clip_range)
        loss = policy
        parts = {"ratio": ratio.detach(), "policy": policy.detach()}
        if tc.kl_beta > 0:
            std = score.std_dev_t if tc.kl_form == "reference" else score.std
            kl = flow_grpo_kl(score.mean, score.mean_ref, std).mean()
            loss = loss + tc.kl_beta * kl
            parts["kl"] = kl.detach()
        return loss / n_steps, parts


def main(argv=None) -> int:
    return pg_main(
        argv, config_cls=GRPOConfig, presets=PRESETS, trainer_cls=GRPOTrainer, validate=validate, doc=__doc__
    )


if __name__ == "__main__":
    sys.exit(main())
