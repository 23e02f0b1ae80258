"""ReFL (ImageReward, arXiv 2304.05977), as math.md §5 defines it.  ``python -m train.refl --help``.

Per micro-batch (train.reward_backprop): a stop step ``j`` is drawn uniformly from ``[lo, N - 1]``
(:func:`stop_range`: THUDM/ImageReward@c1392c6d ImageReward/ReFL.py ``mid_timestep = random.randint(30, 39)``
of 40 steps; at ``N`` steps ``lo = int(0.75 N)``, which is 30 at 40); steps ``i < j`` run without grad, then
one model call with grad at step ``j``, whose ``x0_hat`` is decoded and scored;
``loss = loss_scale mean_b relu(target - R)``, with ImageReward's target 2 and scale 1e-3.

The hinge target of another reward (``--train.hinge-target``, default 2): the loss is zero for samples whose
reward is above the target, so with a reward bounded below 2 (``saturation``, ``geneval_learned``,
probabilities, CLIP cosines) every sample is trained and ReFL is plain ``-R`` maximisation; set the target
inside the reward's range to stop pushing samples that already pass it.

SD1.5: the reference's ancestral DDPM steps (40, "leading" timesteps 976 .. 1) are DDIM steps with eta 1 on
the same timesteps (the DDPM posterior with the "fixed_small" variance is DDIM's eta = 1 step), which is
what the ``sd1.5`` preset runs.  Flow models: derived (math.md §5): Euler steps on the model's schedule,
``x0_hat = x_t - t v``, ``j`` in the last quarter of the steps.
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
    sample_with_grad,
    validate_common,
)
from .reward_backprop import main as rb_main


@dataclass
class ReFLTrainConfig(RBTrainConfig):
    stop_fraction: float = field(
        default=0.75, metadata={"help": "stop step j drawn from [int(f N), N - 1] (reference: 30..39 of 40)"}
    )
    hinge_target: float = field(default=2.0, metadata={"help": "loss relu(target - R) (ImageReward: 2)"})
    loss_scale: float = field(default=1e-3, metadata={"help": "loss scale (the reference's grad_scale)"})


@dataclass
class ReFLConfig(RunConfig):
    sample: RBSampleConfig = field(default_factory=RBSampleConfig)
    train: ReFLTrainConfig = field(default_factory=ReFLTrainConfig)


def preset_tiny() -> ReFLConfig:
    """ReFL on the embedded default (train.reward_backprop.apply_tiny_settings): 10 Euler steps, j in 7..9,
    lr 1e-3 (the reference's 1e-5 is for a full SD1.5 UNet)."""
    cfg = apply_tiny_settings(ReFLConfig())
    cfg.train.lr = 1e-3
    return cfg


def preset_sd15() -> ReFLConfig:
    """The reference recipe (THUDM/ImageReward@c1392c6d ImageReward/ReFL.py, scripts/train_refl.sh): 40
    ancestral steps (DDIM eta 1), no CFG, j ~ U{30..39}, hinge 2, scale 1e-3, lr 1e-5, clip 1, 512 px, 64
    images per update (8 processes x 2 x 4 accumulation); LoRA here (the reference trains the whole UNet)."""
    cfg = ReFLConfig(preset="sd1.5", reward="imagereward", max_iters=100)
    cfg.models = ModelConfig(dtype="float16", lora_rank=8, lora_alpha=8.0, resolution=512)
    cfg.sample = RBSampleConfig(solver="ddim", num_steps=40, eta=1.0, guidance_scale=1.0, prompts_per_iter=64)
    cfg.train = ReFLTrainConfig(lr=1e-5, grad_clip=1.0, batch_size=2, grad_accum=32)
    cfg.eval = EvalConfig(every=10, num_steps=40)
    return cfg


PRESETS = {"tiny": preset_tiny, "sd1.5": preset_sd15}


def stop_range(num_steps: int, fraction: float = 0.75) -> tuple[int, int]:
    """``(lo, hi)``, inclusive: ``(int(fraction N), N - 1)``; ``(30, 39)`` at the reference's 40 steps."""
    return min(int(fraction * num_steps), num_steps - 1), num_steps - 1


def refl_loss(r: torch.Tensor, target: float = 2.0, scale: float = 1e-3) -> torch.Tensor:
    """THUDM/ImageReward@c1392c6d ImageReward/ReFL.py: ``relu(target - R).mean() * grad_scale``."""
    return scale * torch.relu(target - r).mean()


def validate(cfg: ReFLConfig) -> None:
    tc = cfg.train
    if not 0 <= tc.stop_fraction < 1:
        raise ConfigError(f"--train.stop-fraction: expected a value in [0, 1), got {tc.stop_fraction}")
    if not tc.loss_scale > 0:
        raise ConfigError(f"--train.loss-scale: expected a value > 0, got {tc.loss_scale}")
    validate_common(cfg)


class ReFLTrainer(RewardBackpropTrainer):
    algo = "refl"

    def describe(self) -> str:
        lo, hi = stop_range(self.sched.num_steps, self.cfg.train.stop_fraction)
        return f"ReFL, stop step {lo}..{hi}, hinge {self.cfg.train.hinge_target:g} | {super().describe()}"

    def forward_backward(self, prompts, seeds, weight, gen):
        tc, sc, sched = self.cfg.train, self.cfg.sample, self.sched
        lo, hi = stop_range(sched.num_steps, tc.stop_fraction)
        j = int(torch.randint(lo, hi + 1, (), generator=gen))
        ws = sample_with_grad(
            self.policy, prompts, seeds, sched, sc, grad_from=j, stop_at=j, use_checkpoint=tc.checkpoint
        )
        r = self.reward_of(ws.x0_hat, prompts)
        loss = refl_loss(r, tc.hinge_target, tc.loss_scale)
        (loss * weight).backward()
        return {"reward": r.mean(), "loss": loss, "stop_step": j}


def main(argv=None) -> int:
    return rb_main(
        argv, config_cls=ReFLConfig, presets=PRESETS, trainer_cls=ReFLTrainer, validate=validate, doc=__doc__
    )


if __name__ == "__main__":
    sys.exit(main())
