"""bf16 LoRA training loses no update: with the base weights in bf16 (``--models.dtype bfloat16``, the SD3.5-M
presets' setting), every LoRA entry whose gradient is non-zero at an optimizer step has changed after it.

AdamW moves an entry by about ``lr`` per step.  A bf16 number ``w`` is stored with 8 significant bits, so a
change smaller than half its spacing (about ``|w| * 2^-9``) rounds back to ``w``: LoRA weights kept in bf16
silently drop their updates once ``|w|`` exceeds about ``2^8 lr`` (0.08 at lr 3e-4, the SD3.5-M recipes'
rate; peft's gaussian init draws A with std 1/r, 0.03 at rank 32, and B grows from 0).  The first step cannot
show it (B = 0 gives A a zero gradient, and B's entries are 0), so each case takes several optimizer steps.
The control test shows the counter finds such losses.  An entry counts as lost only where AdamW's own update
(from its state after the step) is at least ``2^-16 |w|``: fp32 always represents that change, while a bf16
weight drops anything under ``2^-9 |w|``.  A smaller update is AdamW's, not a rounding loss: the first moment
can pass through zero when a gradient changes sign (one entry of 122880 did so on the first H200 run).
Checked on CUDA by ``bench.gpu_check``; the CPU case runs the same check without a GPU.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import kernels
import train.grpo as grpo
import train.nft as nft
from train.config import parse_cli
from train.evaluation import Evaluator
from train.policy import build_policy
from train.rewards.registry import build_reward

from ._pg_helpers import use_embedded_default

SMALL = [
    "--sample.prompts-per-iter",
    "2",
    "--sample.images-per-prompt",
    "2",
    "--sample.num-steps",
    "2",
    "--eval.num-prompts",
    "2",
    "--log.progress",
    "false",
    "--reward",
    "jpeg_compressibility",
    # the SD3.5-M recipes' precision, LoRA and learning rate
    "--models.dtype",
    "bfloat16",
    "--models.lora-rank",
    "32",
    "--models.lora-alpha",
    "64",
    "--train.lr",
    "3e-4",
]
ALGOS = {
    "nft": (nft, nft.NFTTrainer, ["--train.batch-size", "1", "--train.steps-per-iter", "4"]),
    # grad-accum 1: an optimizer step per micro-batch (the tiny preset accumulates the whole iteration)
    "grpo": (
        grpo,
        grpo.GRPOTrainer,
        ["--train.batch-size", "1", "--train.grad-accum", "1", "--train.autocast", "bfloat16"],
    ),
}


class UpdateRecorder:
    """Per AdamW step: how many entries had a non-zero gradient, and how many of those did not change although
    AdamW's update for them was at least ``2^-16 |w|`` (a change fp32 always represents)."""

    RESOLVED = 2.0**-16

    def __init__(self, opt: torch.optim.Optimizer, params: list[torch.Tensor]):
        self.opt, self.params, self.steps, self._before = opt, params, [], None
        opt.register_step_pre_hook(self._pre)
        opt.register_step_post_hook(self._post)

    def _pre(self, opt, args, kwargs):
        self._before = [
            (p.detach().clone(), None if p.grad is None else p.grad.detach().clone()) for p in self.params
        ]

    def _update(self, p: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """AdamW's step for ``p`` (decoupled decay included), from the optimizer's state after the step."""
        group = next(g for g in self.opt.param_groups if any(q is p for q in g["params"]))
        state = self.opt.state[p]
        t = float(state["step"])
        beta1, beta2 = group["betas"]
        m_hat = state["exp_avg"].float() / (1 - beta1**t)
        v_hat = state["exp_avg_sq"].float() / (1 - beta2**t)
        lr = group["lr"]
        return lr * m_hat / (v_hat.sqrt() + group["eps"]) + lr * group["weight_decay"] * before.float()

    def _post(self, opt, args, kwargs):
        nonzero = lost = 0
        for p, (before, grad) in zip(self.params, self._before, strict=True):
            if grad is None:
                continue
            moved = grad != 0
            resolved = self._update(p, before).abs() >= self.RESOLVED * before.float().abs()
            nonzero += int(moved.sum())
            lost += int((moved & resolved & (p.detach() == before)).sum())
        self.steps.append({"nonzero_grad": nonzero, "unchanged": lost})


def test_counter_detects_updates_lost_to_bf16_rounding():
    """Control: plain AdamW (lr 1e-4) on weights of magnitude ~1 loses nearly every update in bf16, none in
    fp32; so a zero count on the trainers below means the updates landed."""
    counts = {}
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter((torch.randn(64, 64, generator=g) + 2.0).to(dtype))
        opt = torch.optim.AdamW([w], lr=1e-4)
        rec = UpdateRecorder(opt, [w])
        for _ in range(3):
            (w.float() ** 2).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        counts[dtype] = rec.steps
    assert all(s["nonzero_grad"] == 64 * 64 for s in counts[torch.float32])
    assert all(s["unchanged"] == 0 for s in counts[torch.float32])
    assert all(s["unchanged"] > 0.9 * s["nonzero_grad"] for s in counts[torch.bfloat16])


def _trainer(algo, tmp_path, device):
    module, trainer_cls, extra = ALGOS[algo]
    cfg = parse_cli(
        module.PRESETS["tiny"]().__class__,
        [*SMALL, *extra],
        prog="test",
        description="",
        presets=module.PRESETS,
    )
    module.validate(cfg)
    reward = build_reward(cfg.reward)
    policy = build_policy(cfg.models, preset=cfg.preset, model_path=None, device=torch.device(device), seed=0)
    return trainer_cls(cfg, tmp_path, policy, reward, Evaluator(cfg.eval, seed=cfg.seed, reward=reward))


def _check_no_update_lost(tmp_path, monkeypatch, device, algo):
    use_embedded_default(monkeypatch)
    trainer = _trainer(algo, tmp_path, device)
    assert any(p.dtype == torch.bfloat16 for p in trainer.policy.transformer.parameters())
    rec = UpdateRecorder(trainer.opt, trainer.params)
    # CUDA: the Triton kernels and CUDA-graph rollouts; CPU: the reference ops (tests/train/conftest.py)
    with kernels.use_backend("auto") if device == "cuda" else contextlib.nullcontext():
        trainer.train_iteration(1)  # 4 images, micro-batch 1: 4 optimizer steps
    assert len(rec.steps) >= 3, f"expected several optimizer steps, got {len(rec.steps)}"
    assert all(s["nonzero_grad"] > 0 for s in rec.steps[1:]), rec.steps
    lost = [s for s in rec.steps if s["unchanged"]]
    assert not lost, f"LoRA entries with a non-zero gradient left unchanged by the optimizer: {rec.steps}"


@pytest.mark.gpu
@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("device", ["cuda"])
def test_bf16_lora_training_loses_no_update(tmp_path, monkeypatch, device, algo):
    _check_no_update_lost(tmp_path, monkeypatch, device, algo)


@pytest.mark.parametrize("algo", list(ALGOS))
def test_bf16_lora_training_loses_no_update_on_cpu(tmp_path, monkeypatch, algo):
    _check_no_update_lost(tmp_path, monkeypatch, "cpu", algo)
