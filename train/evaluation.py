"""Held-out evaluation: a deterministic ODE sampler on fixed seeds, with the eval-EMA weights.

The protocol is ``--eval.solver`` (dpm2 or euler; epsilon models: DDIM eta 0), ``--eval.num-steps`` and
``--eval.cfg-scale`` (1: CFG-free) on the model's own sigma schedule; it is logged with the metrics
(``protocol/eval``, and ``protocol/base_cfg`` for the one-off base-model evaluation with
``--eval.base-cfg-scale``).  The papers' protocols are the real-model presets' defaults: Flow-GRPO evaluates
with a 40-step Euler ODE at CFG 4.5, DiffusionNFT with a 40-step Euler ODE CFG-free.

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
    solver: str = field(
        default="dpm2",
        metadata={"help": "deterministic ODE solver: dpm2 or euler (epsilon models: DDIM eta 0)"},
    )
    num_steps: int = field(default=10, metadata={"help": "sampler steps at evaluation"})
    cfg_scale: float = field(
        default=1.0,
        metadata={"help": "CFG scale of the held-out evaluation of the policy (1: CFG-free)"},
    )
    base_cfg_scale: float = field(
        default=4.5,
        metadata={"help": "CFG scale of the one-off evaluation of the base model at iteration 0"},
    )
    batch: int = field(default=128, metadata={"help": "images per evaluation micro-batch"})
    grid_images: int = field(default=32, metadata={"help": "images in the sample grid"})


def validate_eval(cfg: EvalConfig) -> None:
    """The evaluation protocol's checks, run before any work."""
    if cfg.solver not in ("dpm2", "euler"):
        raise ValueError(
            f"--eval.solver: expected a deterministic ODE solver (dpm2 or euler), got {cfg.solver!r}"
        )
    if isinstance(cfg.num_steps, bool) or not isinstance(cfg.num_steps, int) or cfg.num_steps < 1:
        raise ValueError(f"--eval.num-steps: expected an integer >= 1, got {cfg.num_steps!r}")
    for option, val in (("--eval.cfg-scale", cfg.cfg_scale), ("--eval.base-cfg-scale", cfg.base_cfg_scale)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 <= val < float("inf"):
            raise ValueError(f"{option}: expected a finite value >= 0 (1: CFG-free), got {val!r}")


class Evaluator:
    def __init__(self, cfg: EvalConfig, *, seed: int, reward):
        validate_eval(cfg)
        self.cfg, self.seed, self.reward = cfg, seed, reward

    def protocol(self, policy, *, base_cfg: bool = False) -> str:
        """The sampler of an evaluation in words, e.g. ``euler 40 steps, CFG 4.5``, logged with its scores."""
        c = self.cfg
        epsilon = getattr(policy.denoiser, "prediction_type", "flow") == "epsilon"
        scale = float(c.base_cfg_scale if base_cfg else c.cfg_scale)
        solver = "ddim eta 0" if epsilon else c.solver
        return f"{solver} {c.num_steps} steps, " + ("CFG-free" if scale == 1.0 else f"CFG {scale:g}")

    def _prompts(self, policy) -> list:
        prompts = list(policy.test_prompts)
        if self.cfg.num_prompts:
            g = torch.Generator().manual_seed(common.derive_seed(self.seed, "eval-prompts"))
            idx = torch.randperm(len(prompts), generator=g)[: self.cfg.num_prompts].sort().values
            prompts = [prompts[i] for i in idx.tolist()]
        return [p for p in prompts for _ in range(self.cfg.images_per_prompt)]

    @torch.no_grad()
    def sample(
        self, policy, prompts: list, *, base_cfg: bool, shift: float | None = None, index=None
    ) -> torch.Tensor:
        """Decoded samples of ``prompts`` (the policy's eval-EMA weights at ``--eval.cfg-scale``, or with
        ``base_cfg`` the base model at ``--eval.base-cfg-scale``); ``index`` (default ``0..len-1``) are their
        positions in the held-out list, which key the per-image seeds (so a sharded evaluation draws what a
        single process draws).  ``shift`` (None: the model's scheduler's) as ``--sample.shift``."""
        c = self.cfg
        index = range(len(prompts)) if index is None else index
        seeds = [common.derive_seed(self.seed, "eval", int(i)) for i in index]
        out = []
        # Epsilon models (SD1.5-style UNets, DDPO) have no flow ODE: the deterministic sampler is DDIM eta 0.
        epsilon = getattr(policy.denoiser, "prediction_type", "flow") == "epsilon"
        kw = dict(solver="ddim", eta=0.0) if epsilon else dict(solver=c.solver)
        kw.update(num_steps=c.num_steps, shift=shift)
        for lo in range(0, len(prompts), c.batch):
            if base_cfg:
                with policy.adapters_disabled():
                    x0 = policy.sample(
                        prompts[lo : lo + c.batch],
                        seeds[lo : lo + c.batch],
                        guidance_scale=c.base_cfg_scale,
                        **kw,
                    )
            else:
                with policy.adapter("default"), policy.eval_weights():
                    x0 = policy.sample(
                        prompts[lo : lo + c.batch], seeds[lo : lo + c.batch], guidance_scale=c.cfg_scale, **kw
                    )
            out.append(policy.decode(x0).cpu())
        return torch.cat(out)

    def run(
        self,
        policy,
        iteration: int,
        run_dir: Path,
        *,
        base_cfg: bool = False,
        shift: float | None = None,
        dist=None,
    ) -> dict:
        """Evaluate and (rank 0) write the grid.  Under ``dist`` each rank samples an equal contiguous share
        of the held-out list (padded by repeating the last prompt, so every rank runs the same forwards) and
        the per-image scores are all-gathered: every rank returns the same numbers."""
        prompts = self._prompts(policy)
        n = len(prompts)
        rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
        share = -(-n // world)
        index = [min(i, n - 1) for i in range(rank * share, (rank + 1) * share)]
        mine = [prompts[i] for i in index]
        images = self.sample(policy, mine, base_cfg=base_cfg, shift=shift, index=index)
        texts = [policy.prompt_text(p) for p in prompts]
        geneval = hasattr(prompts[0], "task")
        if geneval:
            from .rewards.geneval_mini import GenEvalMini

            scorer = GenEvalMini()
            sc = scorer.score(images, mine)
            local = torch.stack([sc["strict"].float(), sc["partial"].float()], 1)
        else:
            reward, _ = self.reward(images, [policy.prompt_text(p) for p in mine])
            local = reward.float()[:, None]
        # the grid spreads over the whole held-out list, so every task type shows up
        g = min(self.cfg.grid_images, n)
        pick = torch.linspace(0, n - 1, g).round().long().tolist()
        grid_local = {i: images[i - rank * share] for i in pick if rank * share <= i < (rank + 1) * share}
        if dist is not None and dist.enabled:
            scores = dist.all_gather(local).flatten(0, 1)[:n]
            grid = {k: v for part in dist.all_gather_object(grid_local) for k, v in part.items()}
        else:
            scores, grid = local[:n], grid_local
        if geneval:
            res = scorer.summarize(scores[:, 0], prompts)
            res["score_partial"] = scorer.summarize(scores[:, 1], prompts)["score"]
        else:
            res = {"score": float(scores[:, 0].mean())}
        if dist is None or dist.is_main:
            name = "base_cfg.png" if base_cfg else f"iter_{iteration:06d}.png"
            save_grid(
                torch.stack([grid[i] for i in pick]),
                [texts[i] for i in pick],
                Path(run_dir) / "samples" / name,
                scores=[float(scores[i, 0]) for i in pick],
            )
        return {k: float(v) for k, v in res.items()}
