"""DRaFT-K, DRaFT+ and DRaFT-LV (arXiv 2309.17400), as math.md §5 defines them.  ``python -m train.draft
--help``.

Per micro-batch (train.reward_backprop):

* DRaFT-K (``--train.k K``, default 1): sample ``N`` steps, the first ``N - K`` without grad, the last ``K``
  with grad (model forwards checkpointed per step); decode the last step's ``x0_hat`` (NVIDIA/NeMo-Aligner@
  0339ccd8 nemo_aligner/models/mm/stable_diffusion/megatron_sd_draftp_model.py decodes ``pred_x0`` of the
  last step; on a flow model's last step to sigma 0 it is the sample itself);
  ``loss = -mean_b R + kl_coeff mean_{K,b,dims}(pred_theta - pred_init)^2`` (DRaFT+ with
  ``--train.kl-coeff > 0``; the init model is the transformer with its adapters off, at the same states);
* DRaFT-LV (``--train.lv n``): K = 1; the sample's ``x0`` without grad, then ``n`` times: re-noise it to
  the last step's level (``noise_to``: flow ``(1 - t) x0 + t eps``, epsilon ``sqrt(ab) x0 + sqrt(1 - ab)
  eps``), one step with grad, ``-R`` of its ``x0_hat``; the ``n`` gradients add up (paper, Alg. 2).

Flow models: derived (math.md §5): Euler steps on the model's schedule (DDIM eta 0's counterpart).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from .config import ConfigError
from .evaluation import EvalConfig
from .loop import RunConfig
from .policy import ModelConfig
from .reward_backprop import (
    RBSampleConfig,
    RBTrainConfig,
    RewardBackpropTrainer,
    apply_tiny_settings,
    check_counts,
    noise_to,
    sample_with_grad,
    validate_common,
)
from .reward_backprop import main as rb_main


@dataclass
class DraftTrainConfig(RBTrainConfig):
    k: int = field(default=1, metadata={"help": "DRaFT-K: gradient through the last K sampler steps"})
    lv: int = field(
        default=0, metadata={"help": "DRaFT-LV: re-noisings of the last step per sample (0: plain DRaFT-K)"}
    )
    kl_coeff: float = field(
        default=0.0, metadata={"help": "DRaFT+: coefficient of mean (pred - pred_init)^2 (0: DRaFT)"}
    )


@dataclass
class DraftConfig(RunConfig):
    sample: RBSampleConfig = field(default_factory=RBSampleConfig)
    train: DraftTrainConfig = field(default_factory=DraftTrainConfig)


def preset_tiny() -> DraftConfig:
    """DRaFT-1 on the embedded default (train.reward_backprop.apply_tiny_settings), lr 1e-3 (the
    reference's 1e-4 is for SD1.5's LoRA; 1e-3 moved the tiny model's reward within 10 iterations)."""
    cfg = apply_tiny_settings(DraftConfig())
    cfg.train.lr = 1e-3
    return cfg


def preset_sd15() -> DraftConfig:
    """DRaFT+ on SD1.5 (NVIDIA/NeMo-Aligner@0339ccd8 examples/mm/stable_diffusion/conf/draftp_sd.yaml): DDIM
    50 steps, eta 0, CFG 7.5, K = 1, kl_coeff 1.0, lr 1e-4, gradient clip 10, 512 px.  Pass the pipeline
    with --model and a differentiable --reward."""
    cfg = DraftConfig(preset="sd1.5", max_iters=1000)
    cfg.models = ModelConfig(dtype="bfloat16", lora_rank=8, lora_alpha=8.0, resolution=512)
    cfg.sample = RBSampleConfig(solver="ddim", num_steps=50, eta=0.0, guidance_scale=7.5, prompts_per_iter=8)
    cfg.train = DraftTrainConfig(lr=1e-4, grad_clip=10.0, batch_size=1, grad_accum=8, k=1, kl_coeff=1.0)
    cfg.eval = EvalConfig(every=50, num_steps=50, base_cfg_scale=7.5, cfg_scale=7.5)
    return cfg


def preset_sd35m() -> DraftConfig:
    """DRaFT-1 on SD3.5-M (derived: Euler 28 steps on the model's schedule, CFG 4.5), otherwise the DRaFT+
    SD1.5 settings without the KL term."""
    cfg = DraftConfig(preset="sd3.5-m", max_iters=1000)
    cfg.models = ModelConfig(dtype="bfloat16", lora_rank=32, lora_alpha=64.0, resolution=512)
    cfg.sample = RBSampleConfig(solver="euler", num_steps=28, guidance_scale=4.5, prompts_per_iter=8)
    cfg.train = DraftTrainConfig(lr=1e-4, grad_clip=10.0, batch_size=1, grad_accum=8, k=1)
    cfg.eval = EvalConfig(every=50, solver="euler", num_steps=28, cfg_scale=4.5)
    return cfg


PRESETS = {"tiny": preset_tiny, "sd1.5": preset_sd15, "sd3.5-m": preset_sd35m}


def validate(cfg: DraftConfig) -> None:
    check_counts(cfg)
    tc, n = cfg.train, cfg.sample.num_steps
    if not 1 <= tc.k <= n:
        raise ConfigError(f"--train.k: expected an integer in [1, --sample.num-steps = {n}], got {tc.k}")
    if tc.lv < 0:
        raise ConfigError(f"--train.lv: expected an integer >= 0 (0: DRaFT-K), got {tc.lv}")
    if tc.lv > 0 and tc.k != 1:
        raise ConfigError(f"--train.k: DRaFT-LV (--train.lv {tc.lv}) is K = 1, expected 1, got {tc.k}")
    if tc.kl_coeff < 0:
        raise ConfigError(f"--train.kl-coeff: expected a value >= 0 (0: DRaFT), got {tc.kl_coeff}")
    validate_common(cfg)


def kl_penalty(preds: list, refs: list) -> torch.Tensor:
    """DRaFT+ (NeMo-Aligner ``calculate_gaussian_kl_penalty_shared_var`` then ``.mean()``):
    ``mean_K [sum_{b,dims}(pred - ref)^2 / numel(pred)]`` = ``mean_{K,b,dims}(pred - ref)^2`` (fp32)."""
    diff = torch.stack([p.float() for p in preds]) - torch.stack([r.float() for r in refs])
    per_step = (diff**2).flatten(1).sum(1) / diff[0].numel()
    return per_step.mean()


class DraftTrainer(RewardBackpropTrainer):
    algo = "draft"

    def describe(self) -> str:
        tc = self.cfg.train
        what = f"DRaFT-LV n={tc.lv}" if tc.lv else f"DRaFT-{tc.k}"
        if tc.kl_coeff > 0:
            what += f" + KL {tc.kl_coeff:g}"
        return f"{what} | {super().describe()}"

    def forward_backward(self, prompts, seeds, weight, gen):
        tc, sc, sched = self.cfg.train, self.cfg.sample, self.sched
        n = sched.num_steps
        with_ref = tc.kl_coeff > 0
        if tc.lv == 0:
            ws = sample_with_grad(
                self.policy, prompts, seeds, sched, sc, grad_from=n - tc.k, use_checkpoint=tc.checkpoint,
                with_ref=with_ref,
            )  # fmt: skip
            r = self.reward_of(ws.x0_hat, prompts)
            loss = -r.mean()
            stats = {"reward": r.mean()}
            if with_ref:
                kl = kl_penalty(ws.preds, ws.ref_preds)
                loss = loss + tc.kl_coeff * kl
                stats["kl"] = kl
            (loss * weight).backward()
            stats["loss"] = loss
            return stats
        with torch.no_grad():  # DRaFT-LV: x0 without grad
            x0 = sample_with_grad(self.policy, prompts, seeds, sched, sc, grad_from=n).x0_hat
        p_last = sched.p[n - 1]
        stats = {"reward": 0.0, "loss": 0.0, "reward_x0": 0.0}
        with torch.no_grad():
            stats["reward_x0"] = self.reward_of(x0, prompts).mean()
        for _ in range(tc.lv):
            eps = torch.randn(x0.shape, generator=gen).to(x0.device)
            x1 = noise_to(sched.kind, x0, eps, p_last.expand(x0.shape[0]))
            ws = sample_with_grad(
                self.policy, prompts, seeds, sched, sc, grad_from=n - 1, use_checkpoint=tc.checkpoint,
                with_ref=with_ref, x_start=x1, start=n - 1,
            )  # fmt: skip
            r = self.reward_of(ws.x0_hat, prompts)
            loss = -r.mean()
            if with_ref:
                kl = kl_penalty(ws.preds, ws.ref_preds)
                loss = loss + tc.kl_coeff * kl
                stats["kl"] = stats.get("kl", 0.0) + kl.detach() / tc.lv
            (loss * weight).backward()  # the n gradients add up (DRaFT-LV, Alg. 2)
            stats["reward"] = stats["reward"] + r.mean().detach() / tc.lv
            stats["loss"] = stats["loss"] + loss.detach()
        return stats


def main(argv=None) -> int:
    return rb_main(
        argv,
        config_cls=DraftConfig,
        presets=PRESETS,
        trainer_cls=DraftTrainer,
        validate=validate,
        doc=__doc__,
    )


if __name__ == "__main__":
    sys.exit(main())
