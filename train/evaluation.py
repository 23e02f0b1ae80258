"""Held-out evaluation: a deterministic ODE sampler on fixed seeds, with the eval-EMA weights.

The protocol is ``--eval.solver`` (dpm2 or euler; epsilon models: DDIM eta 0), ``--eval.num-steps`` and
``--eval.cfg-scale`` (1: CFG-free) on the model's own sigma schedule; it is logged with the metrics
(``protocol/eval``, and ``protocol/base_cfg`` for the one-off base-model evaluation with
``--eval.base-cfg-scale``).  The papers' protocols are the real-model presets' defaults: Flow-GRPO evaluates
with a 40-step Euler ODE at CFG 4.5, DiffusionNFT with a 40-step Euler ODE CFG-free.

On the embedded default the score is GenEval-mini's (strict, overall = mean over task types, plus the partial
score and one number per task); for other prompt sets it is the training reward's mean.  Each evaluation
writes a PNG grid of held-out prompts and samples to ``<run>/samples/`` and beside it a JSON record of every
held-out image's scores (and drift) and every diversity prompt's diversity: runs of one seed share the
prompts and noise, so two runs' records compare sample by sample (``bench.paired_eval``).

Beside the score every evaluation logs the training reward on the held-out samples (``reward``: one reward's
mean, or the ``--reward-weights``-weighted mean of the parts' means, each also as ``reward/NAME``), the gold
rewards of ``--eval.rewards`` that the run does not train on (``gold/NAME``: their means), and, for the
policy (not the one-off base-CFG evaluation), ``diversity`` (and ``diversity_se``, its standard error over
the prompts) and ``drift`` (train.diversity, math.md §9.2):
``--eval.diversity-prompts`` held-out prompts (at most an eighth of them) sampled ``--eval.diversity-images``
times each on their own fixed seeds, and the held-out samples against the base model's from the same seeds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import common
from .grid import save_grid

__all__ = ["EvalConfig", "Evaluator", "read_record", "record_mean", "paired_score_change"]


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
    grid_images: int = field(default=32, metadata={"help": "images in the sample grid (0: no grid)"})
    rewards: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "gold rewards the run does not train on, scored on the held-out samples at each "
            "evaluation (embedded default: geneval_mini); --guard.gold-drop watches them"
        },
    )
    diversity_prompts: int = field(
        default=8,
        metadata={
            "help": "held-out prompts whose samples' spread is eval/diversity, at most an eighth of the "
            "held-out prompts (at least 1; 0: none)"
        },
    )
    diversity_images: int = field(default=4, metadata={"help": "samples per diversity prompt (>= 2)"})
    feature: str = field(
        default="auto",
        metadata={
            "help": "feature of eval/diversity and eval/drift: auto (a --eval.feature-clip-path CLIP, else "
            "geneval_palette_grid4 on the embedded default, else pixels16), geneval_palette_grid4, "
            "geneval_objects (the verifier's detected objects: texture-blind) or pixels16"
        },
    )
    feature_clip_path: str | None = field(
        default=None,
        metadata={
            "help": "local CLIP directory: its image embedding is the feature of eval/diversity and "
            "eval/drift (default: the GenEval-mini palette grid on the embedded default, else 16x16 pixels)"
        },
    )


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
    if cfg.diversity_prompts < 0:
        raise ValueError(
            f"--eval.diversity-prompts: expected an integer >= 0 (0: none), got {cfg.diversity_prompts}"
        )
    if cfg.diversity_images < 2:
        raise ValueError(
            f"--eval.diversity-images: expected an integer >= 2 (a spread needs two samples), got "
            f"{cfg.diversity_images}"
        )
    from .diversity import FEATURES, check_clip_path

    if cfg.feature not in FEATURES:
        raise ValueError(f"--eval.feature: expected one of {', '.join(FEATURES)}, got {cfg.feature!r}")
    if cfg.feature_clip_path:
        if cfg.feature != "auto":
            raise ValueError(
                f"--eval.feature: expected auto with --eval.feature-clip-path (the CLIP is the feature), "
                f"got {cfg.feature!r}"
            )
        check_clip_path(cfg.feature_clip_path)
    if cfg.rewards:
        from .rewards.registry import HTTP_PREFIXES, REWARD_NAMES

        unknown = [n for n in cfg.rewards if n not in REWARD_NAMES and not n.startswith(HTTP_PREFIXES)]
        if unknown or len(set(cfg.rewards)) != len(cfg.rewards):
            raise ValueError(
                f"--eval.rewards: expected distinct names from {', '.join(REWARD_NAMES)} or "
                f"http://HOST:PORT/NAME, got {','.join(cfg.rewards)}"
            )


class Evaluator:
    """``reward``: the training reward (a :class:`~train.rewards.registry.CombinedReward`, or any callable
    returning ``(reward [B], {name: [B]})``); ``gold``: the ``--eval.rewards`` ones, or None."""

    def __init__(self, cfg: EvalConfig, *, seed: int, reward, gold=None):
        validate_eval(cfg)
        self.cfg, self.seed, self.reward, self.gold = cfg, seed, reward, gold
        self.feature = None  # train.diversity feature, built at the first evaluation that needs it
        self.reference = None  # [n, D] features of the base model's held-out samples (the drift reference)

    def protocol(self, policy, *, base_cfg: bool = False) -> str:
        """The sampler of an evaluation in words, e.g. ``euler 40 steps, CFG 4.5``, logged with its scores."""
        c = self.cfg
        epsilon = getattr(policy.denoiser, "prediction_type", "flow") == "epsilon"
        scale = float(c.base_cfg_scale if base_cfg else c.cfg_scale)
        solver = "ddim eta 0" if epsilon else c.solver
        return f"{solver} {c.num_steps} steps, " + ("CFG-free" if scale == 1.0 else f"CFG {scale:g}")

    def _distinct(self, policy) -> list:
        prompts = list(policy.test_prompts)
        if self.cfg.num_prompts:
            g = torch.Generator().manual_seed(common.derive_seed(self.seed, "eval-prompts"))
            idx = torch.randperm(len(prompts), generator=g)[: self.cfg.num_prompts].sort().values
            prompts = [prompts[i] for i in idx.tolist()]
        return prompts

    def _prompts(self, policy) -> list:
        return [p for p in self._distinct(policy) for _ in range(self.cfg.images_per_prompt)]

    def diversity_set(self, policy) -> tuple[list, list, torch.Tensor]:
        """``--eval.diversity-prompts`` held-out prompts (at most an eighth of them, at least one, so the
        extra sampling stays small beside the evaluation's) spread evenly over the list, each
        ``--eval.diversity-images`` times -> ``(prompts, seeds, group ids)``; the seeds are their own, fixed
        for the run."""
        distinct = self._distinct(policy)
        p = min(self.cfg.diversity_prompts, -(-len(distinct) // 8))
        if p == 0:
            return [], [], torch.zeros(0, dtype=torch.long)
        pick = torch.linspace(0, len(distinct) - 1, p).round().long().tolist()
        k = self.cfg.diversity_images
        prompts = [distinct[i] for i in pick for _ in range(k)]
        seeds = [common.derive_seed(self.seed, "eval-diversity", j, m) for j in range(p) for m in range(k)]
        return prompts, seeds, torch.arange(p).repeat_interleave(k)

    @torch.no_grad()
    def sample(
        self,
        policy,
        prompts: list,
        *,
        base_cfg: bool,
        shift: float | None = None,
        index=None,
        seeds=None,
        base: bool = False,
    ) -> torch.Tensor:
        """Decoded samples of ``prompts`` (the policy's eval-EMA weights at ``--eval.cfg-scale``, or with
        ``base_cfg`` the base model at ``--eval.base-cfg-scale``, or with ``base`` the base model at
        ``--eval.cfg-scale``: the drift reference); ``index`` (default ``0..len-1``) are their positions in
        the held-out list, which key the per-image seeds (so a sharded evaluation draws what a single process
        draws), unless ``seeds`` gives them.  ``shift`` (None: the model's scheduler's) as
        ``--sample.shift``."""
        c = self.cfg
        if seeds is None:
            index = range(len(prompts)) if index is None else index
            seeds = [common.derive_seed(self.seed, "eval", int(i)) for i in index]
        out = []
        # Epsilon models (SD1.5-style UNets, DDPO) have no flow ODE: the deterministic sampler is DDIM eta 0.
        epsilon = getattr(policy.denoiser, "prediction_type", "flow") == "epsilon"
        kw = dict(solver="ddim", eta=0.0) if epsilon else dict(solver=c.solver)
        kw.update(num_steps=c.num_steps, shift=shift)
        for lo in range(0, len(prompts), c.batch):
            if base_cfg or base:
                with policy.adapters_disabled():
                    x0 = policy.sample(
                        prompts[lo : lo + c.batch],
                        seeds[lo : lo + c.batch],
                        guidance_scale=c.base_cfg_scale if base_cfg else c.cfg_scale,
                        **kw,
                    )
            else:
                with policy.adapter("default"), policy.eval_weights():
                    x0 = policy.sample(
                        prompts[lo : lo + c.batch], seeds[lo : lo + c.batch], guidance_scale=c.cfg_scale, **kw
                    )
            out.append(policy.decode(x0).cpu())
        return torch.cat(out)

    def _columns(self, policy, images, prompts, geneval: bool) -> tuple[torch.Tensor, list[str]]:
        """Per image: the score column(s), the training reward's parts and the gold rewards -> ``([B, C],
        column names)``."""
        texts = [policy.prompt_text(p) for p in prompts]
        cols, names = [], []
        verifier = {}
        if geneval:
            from .rewards.geneval_mini import GenEvalMini

            sc = GenEvalMini().score(images, prompts)
            cols += [sc["strict"].float(), sc["partial"].float()]
            names += ["strict", "partial"]
            verifier = {"geneval_mini": sc["strict"].float(), "geneval_mini_partial": sc["partial"].float()}
        fns = getattr(self.reward, "fns", None)
        if self.reward is not None or not geneval:  # train.pretrain evaluates GenEval-mini without one
            if geneval and fns and set(fns) <= set(verifier):
                # a training reward made of the verifier (the default): its parts are the scores just taken
                reward, comps = None, {n: verifier[n] for n in fns}
            else:
                reward, comps = self.reward(images, texts)
            if not geneval:
                cols.append(reward.float())
                names.append("score")
            for n, v in (comps or {"": reward}).items():
                cols.append(v.float().cpu())
                names.append(f"reward/{n}" if n else "reward")
        if self.gold is not None:
            _, gold = self.gold(images, texts)
            for n, v in gold.items():
                cols.append(v.float().cpu())
                names.append(f"gold/{n}")
        return torch.stack([c.reshape(-1).cpu() for c in cols], 1), names

    def _shard(self, n: int, dist) -> list[int]:
        """This rank's equal contiguous share of ``0..n-1``, padded by repeating the last position (so every
        rank runs the same forwards)."""
        rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
        share = -(-n // world)
        return [min(i, n - 1) for i in range(rank * share, (rank + 1) * share)]

    @staticmethod
    def _gather(local: torch.Tensor, n: int, dist) -> torch.Tensor:
        if dist is not None and dist.enabled:
            return dist.all_gather(local).flatten(0, 1)[:n]
        return local[:n]

    def feature_name(self) -> str | None:
        return None if self.feature is None else self.feature.name

    def run(
        self,
        policy,
        iteration: int,
        run_dir: Path,
        *,
        base_cfg: bool = False,
        shift: float | None = None,
        dist=None,
        extras: bool = False,
        initial: bool = False,
    ) -> dict:
        """Evaluate and (rank 0) write the grid and the record (``samples/iter_XXXXXX.json``, or
        ``base_cfg.json``: each held-out image's prompt, seed, task and score columns, and with ``extras`` its
        drift and each diversity prompt's diversity, for paired comparisons between runs, which share the
        prompts and noise of a seed).  Under ``dist`` each rank samples an equal contiguous share
        of the held-out list (padded by repeating the last prompt, so every rank runs the same forwards) and
        the per-image scores are all-gathered: every rank returns the same numbers.  With ``extras`` also
        ``diversity`` and ``drift`` (the drift reference: these samples when ``initial``, i.e. the initial
        weights of a fresh run, else the base model sampled once with the adapters off)."""
        prompts = self._prompts(policy)
        n = len(prompts)
        seeds = [common.derive_seed(self.seed, "eval", i) for i in range(n)]
        div_prompts, div_seeds, groups = self.diversity_set(policy) if extras else ([], [], None)
        everything, seeds = prompts + div_prompts, seeds + div_seeds
        total = len(everything)
        index = self._shard(total, dist)
        mine = [everything[i] for i in index]
        images = self.sample(policy, mine, base_cfg=base_cfg, shift=shift, seeds=[seeds[i] for i in index])
        texts = [policy.prompt_text(p) for p in prompts]
        geneval = hasattr(prompts[0], "task")
        held = [j for j, i in enumerate(index) if i < n]
        if held:
            cols, names = self._columns(policy, images[held], [mine[j] for j in held], geneval)
            local = torch.zeros(len(index), cols.shape[1])
            local[held] = cols
        else:  # this rank's share holds only diversity samples: score one to learn the columns, send zeros
            cols, names = self._columns(policy, images[:1], [prompts[0]], geneval)
            local = torch.zeros(len(index), cols.shape[1])
        scores = self._gather(local, total, dist)[:n]
        # the grid spreads over the whole held-out list, so every task type shows up
        share = len(index)
        rank = dist.rank if dist is not None else 0
        g = min(self.cfg.grid_images, n)
        pick = torch.linspace(0, n - 1, g).round().long().tolist() if g > 0 else []  # 0: no grid
        grid_local = {i: images[i - rank * share] for i in pick if rank * share <= i < (rank + 1) * share}
        if dist is not None and dist.enabled:
            grid = {k: v for part in dist.all_gather_object(grid_local) for k, v in part.items()}
        else:
            grid = grid_local
        col = {name: scores[:, c] for c, name in enumerate(names)}
        if geneval:
            from .rewards.geneval_mini import GenEvalMini

            res = GenEvalMini.summarize(col["strict"], prompts)
            res["score_partial"] = GenEvalMini.summarize(col["partial"], prompts)["score"]
        else:
            res = {"score": float(col["score"].mean())}
        parts = {k[len("reward/") :]: float(v.mean()) for k, v in col.items() if k.startswith("reward/")}
        if parts:
            w = getattr(self.reward, "weights", None) or {k: 1.0 for k in parts}
            res["reward"] = sum(w[k] * v for k, v in parts.items()) / sum(w[k] for k in parts)
            if len(parts) > 1:
                res.update({f"reward/{k}": v for k, v in parts.items()})
        elif "reward" in col:
            res["reward"] = float(col["reward"].mean())
        res.update({k: float(v.mean()) for k, v in col.items() if k.startswith("gold/")})
        detail = {}
        if extras:
            res.update(
                self._spread(policy, images, index, n, total, groups, initial, shift, dist, geneval, detail)
            )
        if dist is None or dist.is_main:
            name = "base_cfg" if base_cfg else f"iter_{iteration:06d}"
            if pick:
                save_grid(
                    torch.stack([grid[i] for i in pick]),
                    [texts[i] for i in pick],
                    Path(run_dir) / "samples" / f"{name}.png",
                    scores=[float(scores[i, 0]) for i in pick],
                )
            record = {
                "iteration": iteration,
                "prompts": texts,
                "seeds": seeds[:n],
                **({"tasks": [p.task for p in prompts]} if geneval else {}),
                "columns": {k: v.tolist() for k, v in col.items()},
                **detail,
            }
            if div_prompts:
                k = self.cfg.diversity_images
                record["diversity_prompts"] = [policy.prompt_text(p) for p in div_prompts[::k]]
            common.atomic_write_text(Path(run_dir) / "samples" / f"{name}.json", json.dumps(record))
        return {k: float(v) for k, v in res.items()}

    def _spread(self, policy, images, index, n, total, groups, initial, shift, dist, geneval, detail) -> dict:
        """``diversity`` and ``drift`` (math.md §9.2) from this rank's ``images`` (positions ``index`` of the
        held-out + diversity list); ``detail`` gets their per-prompt and per-image values (the evaluation's
        record, for paired comparisons between runs)."""
        from .diversity import build_feature, group_diversities, mean_and_se, paired_distances

        if self.feature is None:
            self.feature = build_feature(geneval=geneval, clip_path=self.cfg.feature_clip_path,
                                         name=self.cfg.feature)
        feats = self._gather(self.feature(images), total, dist)
        out = {}
        detail["feature"] = self.feature.name
        if len(groups):
            per_prompt = group_diversities(feats[n:], groups)
            out["diversity"], se = mean_and_se(per_prompt)
            if not math.isnan(se):  # two or more prompts: the standard error over them, the spread's noise
                out["diversity_se"] = se
            detail["diversity"] = per_prompt
        if self.reference is None:
            if initial:
                self.reference = feats[:n].clone()
            else:  # the base model (adapters off) at the evaluation's protocol, from the same seeds
                prompts = self._prompts(policy)
                ix = self._shard(n, dist)
                mine = [prompts[i] for i in ix]
                base = self.sample(policy, mine, base_cfg=False, base=True, shift=shift, index=ix)
                self.reference = self._gather(self.feature(base), n, dist).clone()
        drift = paired_distances(feats[:n], self.reference)
        out["drift"] = float(drift.mean())
        detail["drift"] = drift.tolist()
        return out


def read_record(run_dir: str | Path, iteration: int) -> dict:
    """The record that :meth:`Evaluator.run` wrote for the evaluation at ``iteration`` of the run in
    ``run_dir``."""
    path = Path(run_dir) / "samples" / f"iter_{iteration:06d}.json"
    if not path.is_file():
        raise FileNotFoundError(f"evaluation record: expected {path} (each evaluation writes one), not found")
    return json.loads(path.read_text())


def _column_tasks(record: dict, column: str) -> list[str]:
    """The groups whose means a column's logged value averages: GenEval-mini's ``strict`` and ``partial`` are
    means over task types of each type's mean (``eval/score``); every other column is a mean over images."""
    n = len(record["columns"][column])
    return record["tasks"] if column in ("strict", "partial") and record.get("tasks") else ["all"] * n


def record_mean(record: dict, column: str = "strict") -> float:
    """The value that the evaluation of ``record`` logged for ``column`` (``strict``: ``eval/score``)."""
    per = {}
    for v, t in zip(record["columns"][column], _column_tasks(record, column), strict=True):
        per.setdefault(t, []).append(v)
    return sum(sum(v) / len(v) for v in per.values()) / len(per)


def paired_score_change(before: dict, after: dict, column: str = "strict") -> tuple[float, float]:
    """math.md §9.2: the change of the held-out score from record ``before`` to ``after`` (two evaluations of
    the same prompts on the same noise: one run's iterations, or two runs of one seed) and its paired standard
    error.  ``column``: ``strict`` (the score) or another of the records' columns (``partial``,
    ``reward/NAME``, ``gold/NAME``).  GenEval-mini's ``strict`` and ``partial`` are means over task types of
    each type's mean (``eval/score``), so their change is the mean over types of each type's mean paired
    difference, and its variance the sum of the types' ``var(difference) / n`` over ``types^2``; every other
    column is logged as a mean over images, and so is its change."""
    for key in ("prompts", "seeds"):
        if before[key] != after[key]:
            raise ValueError(
                f"paired score change: expected two evaluations of the same held-out {key}, got "
                f"iterations {before['iteration']} and {after['iteration']} on different ones"
            )
    if column not in before["columns"] or column not in after["columns"]:
        have = ", ".join(sorted(set(before["columns"]) & set(after["columns"])))
        raise ValueError(f"paired score change: expected a column of both records ({have}), got {column!r}")
    diff = torch.tensor(after["columns"][column], dtype=torch.float64) - torch.tensor(
        before["columns"][column], dtype=torch.float64
    )
    tasks = _column_tasks(before, column)
    means, variances = [], []
    for task in dict.fromkeys(tasks):
        d = diff[[i for i, t in enumerate(tasks) if t == task]]
        means.append(float(d.mean()))
        variances.append(float(d.var()) / len(d) if len(d) > 1 else float("nan"))
    return sum(means) / len(means), math.sqrt(sum(variances)) / len(means)
