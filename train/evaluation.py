"""Held-out evaluation: a deterministic ODE sampler, CFG-free, on fixed seeds, with the eval-EMA weights.

On the embedded default the score is GenEval-mini's (strict, overall = mean over task types, plus the partial
score and one number per task); for other prompt sets it is the training reward's mean.  Each evaluation
writes a PNG grid of held-out prompts and samples to ``<run>/samples/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import common
from .grid import save_grid

__all__ = ["EvalConfig", "Evaluator"]


@dataclass
class EvalConfig:
    every: int = field(default=5, metadata={"help": "iterations between evaluations"})
    num_prompts: int = field(default=0, metadata={"help": "held-out prompts to evaluate (0: all)"})
    images_per_prompt: int = field(default=1, metadata={"help": "samples per held-out prompt"})
    solver: str = field(default="dpm2", metadata={"help": "deterministic ODE solver: dpm2 or euler"})
    num_steps: int = field(default=10, metadata={"help": "sampler steps at evaluation"})
    cfg_scale: float = field(
        default=4.5, metadata={"help": "CFG scale of the one-off base-model CFG evaluation"}
    )
    batch: int = field(default=128, metadata={"help": "images per evaluation micro-batch"})
    grid_images: int = field(default=32, metadata={"help": "images in the sample grid"})


class Evaluator:
    def __init__(self, cfg: EvalConfig, *, seed: int, reward):
        if cfg.solver not in ("dpm2", "euler"):
            raise ValueError(
                f"--eval.solver: expected a deterministic ODE solver (dpm2 or euler), got {cfg.solver!r}"
            )
        self.cfg, self.seed, self.reward = cfg, seed, reward

    def _prompts(self, policy) -> list:
        prompts = list(policy.test_prompts)
        if self.cfg.num_prompts:
            g = torch.Generator().manual_seed(common.derive_seed(self.seed, "eval-prompts"))
            idx = torch.randperm(len(prompts), generator=g)[: self.cfg.num_prompts].sort().values
            prompts = [prompts[i] for i in idx.tolist()]
        return [p for p in prompts for _ in range(self.cfg.images_per_prompt)]

    @torch.no_grad()
    def sample(self, policy, prompts: list, *, base_cfg: bool, shift: float) -> torch.Tensor:
        c = self.cfg
        seeds = [common.derive_seed(self.seed, "eval", i) for i in range(len(prompts))]
        out = []
        # Epsilon models (SD1.5-style UNets, DDPO) have no flow ODE: the deterministic sampler is DDIM eta 0.
        epsilon = getattr(policy.denoiser, "prediction_type", "flow") == "epsilon"
        kw = dict(solver="ddim", eta=0.0) if epsilon else dict(solver=c.solver)
        kw.update(num_steps=c.num_steps, shift=shift)
        for lo in range(0, len(prompts), c.batch):
            if base_cfg:
                with policy.adapters_disabled():
                    x0 = policy.sample(
                        prompts[lo : lo + c.batch], seeds[lo : lo + c.batch], guidance_scale=c.cfg_scale, **kw
                    )
            else:
                with policy.adapter("default"), policy.eval_weights():
                    x0 = policy.sample(prompts[lo : lo + c.batch], seeds[lo : lo + c.batch], **kw)
            out.append(policy.decode(x0).cpu())
        return torch.cat(out)

    def run(
        self, policy, iteration: int, run_dir: Path, *, base_cfg: bool = False, shift: float = 3.0
    ) -> dict:
        prompts = self._prompts(policy)
        images = self.sample(policy, prompts, base_cfg=base_cfg, shift=shift)
        texts = [policy.prompt_text(p) for p in prompts]
        if hasattr(prompts[0], "task"):
            from .rewards.geneval_mini import GenEvalMini

            scorer = GenEvalMini()
            sc = scorer.score(images, prompts)
            res = scorer.summarize(sc["strict"], prompts)
            res["score_partial"] = scorer.summarize(sc["partial"], prompts)["score"]
            shown = sc["strict"]
        else:
            reward, _ = self.reward(images, texts)
            res = {"score": float(reward.mean())}
            shown = reward
        # spread the grid over the whole held-out list, so every task type shows up
        n = min(self.cfg.grid_images, len(prompts))
        pick = torch.linspace(0, len(prompts) - 1, n).round().long().tolist()
        name = "base_cfg.png" if base_cfg else f"iter_{iteration:06d}.png"
        save_grid(images[pick], [texts[i] for i in pick], Path(run_dir) / "samples" / name,
                  scores=[float(shown[i]) for i in pick])
        return {k: float(v) for k, v in res.items()}
