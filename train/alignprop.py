"""AlignProp (arXiv 2310.03739), as math.md §5 defines it.  ``python -m train.alignprop --help``.

Per micro-batch (train.reward_backprop): a truncation point ``b`` is drawn (:func:`truncation_point`:
``b = int(N(mean, std))`` with the reference's mean 42 and std 5 scaled by ``num_steps / 50``, redrawn until
``1 <= b <= num_steps - 1``); steps ``i < b`` run without grad, the contiguous last ``num_steps - b`` steps
with grad (model forwards checkpointed per step); the final sample is decoded and scored;
``loss = loss_coeff mean_b L(R)`` with :func:`alignprop_loss`'s per-reward shape (aesthetic ``|R - 10|``,
HPS ``1 - R``, otherwise ``-R``) and ``loss_coeff`` 0.01 (mihirp1998/AlignProp@b22918af sd_pipeline.py
``pipeline_step_with_grad``, alignprop_trainer.py ``aesthetic_loss_fn`` / ``hps_loss_fn`` / ``step``,
config/alignprop_config.py).  The reference detaches the noise predictions of steps ``i < b`` inside a graph
that spans every step; the parameter gradient is the same as running those steps without grad (nothing
before ``b`` depends on the weights through a kept path), which is what this does.

Flow models: derived (math.md §5): Euler steps on the model's schedule (``--sample.solver flow-sde`` or
``cps`` for stochastic steps, DDIM eta 1's counterparts).
"""

from __future__ import annotations

import math
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

LOSS_FORMS = ("auto", "aesthetic", "hps", "neg")
REFERENCE_STEPS = 50  # the step count the reference's truncation law (mean 42, std 5) is written for


@dataclass
class AlignPropTrainConfig(RBTrainConfig):
    trunc_mean: float = field(default=42.0, metadata={"help": "truncation point mean, at 50 steps"})
    trunc_std: float = field(default=5.0, metadata={"help": "truncation point std, at 50 steps"})
    loss_form: str = field(
        default="auto",
        metadata={"help": "auto (by reward name), aesthetic (|R - target|), hps (1 - R) or neg (-R)"},
    )
    aesthetic_target: float | None = field(
        default=10.0, metadata={"help": "aesthetic loss target (none: -R)"}
    )
    loss_coeff: float = field(default=0.01, metadata={"help": "loss scale (the reference's loss_coeff)"})


@dataclass
class AlignPropConfig(RunConfig):
    sample: RBSampleConfig = field(default_factory=RBSampleConfig)
    train: AlignPropTrainConfig = field(default_factory=AlignPropTrainConfig)


def preset_tiny() -> AlignPropConfig:
    """AlignProp on the embedded default (train.reward_backprop.apply_tiny_settings): 10 Euler steps, so
    the truncation point is ``int(N(8.4, 1))`` and the window 1-3 steps; lr 1e-3 (the reference's)."""
    cfg = apply_tiny_settings(AlignPropConfig())
    cfg.train.lr = 1e-3
    return cfg


def preset_sd15() -> AlignPropConfig:
    """The reference recipe (mihirp1998/AlignProp@b22918af config/alignprop_config.py): DDIM 50 steps, eta 1,
    CFG 5, lr 1e-3, 128 images per update, gradient clip 1 (its ``train_max_grad_norm``), LoRA."""
    cfg = AlignPropConfig(preset="sd1.5", max_iters=1000)
    cfg.models = ModelConfig(dtype="float16", lora_rank=4, lora_alpha=4.0, resolution=512)
    cfg.sample = RBSampleConfig(
        solver="ddim", num_steps=50, eta=1.0, guidance_scale=5.0, prompts_per_iter=128
    )
    cfg.train = AlignPropTrainConfig(lr=1e-3, grad_clip=1.0, batch_size=4, grad_accum=32)
    cfg.eval = EvalConfig(every=20, num_steps=50, cfg_scale=5.0, base_cfg_scale=5.0)
    return cfg


PRESETS = {"tiny": preset_tiny, "sd1.5": preset_sd15}


def validate(cfg: AlignPropConfig) -> None:
    tc = cfg.train
    if cfg.sample.num_steps < 2:
        raise ConfigError(
            f"--sample.num-steps: AlignProp truncates within the steps, expected >= 2, "
            f"got {cfg.sample.num_steps}"
        )
    if not tc.trunc_std >= 0:
        raise ConfigError(f"--train.trunc-std: expected a value >= 0, got {tc.trunc_std}")
    lo, hi = 1, cfg.sample.num_steps - 1
    m = tc.trunc_mean * cfg.sample.num_steps / REFERENCE_STEPS
    if tc.trunc_std == 0 and not lo <= int(m) <= hi:
        raise ConfigError(
            f"--train.trunc-mean: with --train.trunc-std 0 the point int({m:g}) must lie in [{lo}, {hi}], "
            f"got --train.trunc-mean {tc.trunc_mean}"
        )
    p = truncation_acceptance(cfg.sample.num_steps, tc.trunc_mean, tc.trunc_std)
    if tc.trunc_std > 0 and p < MIN_ACCEPTANCE:
        raise ConfigError(
            f"--train.trunc-mean/--train.trunc-std: expected a law that draws a truncation point in "
            f"[{lo}, {hi}] at least once in {1 / MIN_ACCEPTANCE:.0f} draws, got mean {tc.trunc_mean:g} and "
            f"std {tc.trunc_std:g} (at 50 steps), which does with probability {p:.1e}"
        )
    if tc.loss_form not in LOSS_FORMS:
        raise ConfigError(f"--train.loss-form: expected one of {', '.join(LOSS_FORMS)}, got {tc.loss_form!r}")
    if not tc.loss_coeff > 0:
        raise ConfigError(f"--train.loss-coeff: expected a value > 0, got {tc.loss_coeff}")
    validate_common(cfg)


MIN_ACCEPTANCE = 1e-4  # below it :func:`truncation_point`'s 100000 redraws fail with probability > e^-10


def truncation_acceptance(num_steps: int, mean: float, std: float) -> float:
    """The probability that one draw of :func:`truncation_point` is kept: ``int(x)`` lies in
    ``[1, num_steps - 1]`` exactly when ``x = mean' + std' z`` lies in ``[1, num_steps)`` (``int`` truncates
    toward zero), with ``mean'``, ``std'`` scaled by ``num_steps / 50``."""
    scale = num_steps / REFERENCE_STEPS
    m, s = mean * scale, std * scale
    if s == 0:
        return float(1 <= m < num_steps)
    cdf = lambda x: 0.5 * math.erfc(-(x - m) / (s * math.sqrt(2)))
    return max(cdf(num_steps) - cdf(1), 0.0)


def truncation_point(draw, num_steps: int, mean: float = 42.0, std: float = 5.0) -> int:
    """mihirp1998/AlignProp@b22918af sd_pipeline.py: ``b = int(Normal(mean, std).sample())`` redrawn while
    ``b >= num_steps or b < 1``, with mean and std scaled by ``num_steps / 50``; ``draw()`` returns a
    standard normal (``mean + std * draw()`` is the Normal sample).  Steps ``i >= b`` carry the gradient."""
    scale = num_steps / REFERENCE_STEPS
    b = -1
    for _ in range(100_000):
        b = int(mean * scale + std * scale * float(draw()))
        if 1 <= b < num_steps:
            return b
    raise ValueError(
        f"--train.trunc-mean/--train.trunc-std: no truncation point in [1, {num_steps - 1}] "
        f"after 100000 draws"
    )


def resolve_loss_form(form: str, reward_names) -> str:
    """``auto``: ``aesthetic`` or ``hps`` when the (single) reward's name says so, else ``neg``."""
    if form != "auto":
        return form
    names = [n.lower() for n in reward_names]
    if len(names) == 1 and "aesthetic" in names[0]:
        return "aesthetic"
    if len(names) == 1 and "hps" in names[0]:
        return "hps"
    return "neg"


def alignprop_loss(r: torch.Tensor, form: str, aesthetic_target: float | None = 10.0) -> torch.Tensor:
    """Per-sample loss (alignprop_trainer.py): aesthetic ``|R - target|`` (``-R`` when the target is None),
    hps ``1 - R``, neg ``-R`` (the reference's ``grad_scale`` is 1)."""
    if form == "aesthetic":
        return -r if aesthetic_target is None else (r - aesthetic_target).abs()
    if form == "hps":
        return 1.0 - r
    return -r


class AlignPropTrainer(RewardBackpropTrainer):
    algo = "alignprop"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_form = resolve_loss_form(self.cfg.train.loss_form, list(self.reward.fns))

    def describe(self) -> str:
        return f"AlignProp, loss {self.loss_form} | {super().describe()}"

    def forward_backward(self, prompts, seeds, weight, gen):
        tc, sc, sched = self.cfg.train, self.cfg.sample, self.sched
        n = sched.num_steps
        b = truncation_point(lambda: torch.randn((), generator=gen), n, tc.trunc_mean, tc.trunc_std)
        ws = sample_with_grad(
            self.policy, prompts, seeds, sched, sc, grad_from=b, use_checkpoint=tc.checkpoint
        )
        r = self.reward_of(ws.x, prompts)
        loss = tc.loss_coeff * alignprop_loss(r, self.loss_form, tc.aesthetic_target).mean()
        (loss * weight).backward()
        return {"reward": r.mean(), "loss": loss, "window": n - b}


def main(argv=None) -> int:
    return rb_main(
        argv,
        config_cls=AlignPropConfig,
        presets=PRESETS,
        trainer_cls=AlignPropTrainer,
        validate=validate,
        doc=__doc__,
    )


if __name__ == "__main__":
    sys.exit(main())
