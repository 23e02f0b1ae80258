"""Guards against reward hacking (math.md §9.3): stop the run, or roll it back to its best checkpoint by a
gold reward, when

* ``--guard.gold-drop D``: a gold reward (``--eval.rewards``, scored on the held-out samples at each
  evaluation) lies more than ``D`` below its best so far while the training reward on the same held-out
  samples (``eval/reward``) lies above its value at that best evaluation: the policy is learning what the
  training reward pays for and not what it stands for;
* ``--guard.max-kl K``: the KL to the reference that the loop logs (``train/kl``: train.nft, train.grpo with
  ``--train.kl-beta > 0``) exceeds ``K`` after an iteration;
* ``--guard.min-diversity V``: the held-out samples' diversity (``eval/diversity``, train.diversity) falls
  below ``V`` (mode collapse).

``--guard.action stop`` ends the run with a checkpoint of the weights as they were when the guard fired;
``rollback`` first restores the adapters (trained, old, eval EMA) and the optimizer from
``checkpoints/best.pt``, the weights of the evaluation with the highest first gold reward (written
atomically at each new best, never with non-finite weights), evaluates them again, checkpoints and stops.
Either way the run exits with :data:`GUARD_EXIT` and its summary names the guard, the iteration and the
numbers.  The guard's state (bests, the firing) is in every checkpoint: ``--resume`` keeps it and re-arms the
guard (the thresholds may be changed on resume; the action may not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import ConfigError

__all__ = ["GuardConfig", "Guard", "GUARD_EXIT", "validate_guards", "BEST_CHECKPOINT"]

GUARD_EXIT = 4  # the run was stopped (or rolled back and stopped) by a --guard.* condition
BEST_CHECKPOINT = "best.pt"  # under <run>/checkpoints/, beside the iter_XXXXXX.pt files (never pruned)


@dataclass
class GuardConfig:
    action: str = field(
        default="stop",
        metadata={"help": "when a guard fires: stop, or rollback to the best checkpoint by the gold reward"},
    )
    gold_drop: float | None = field(
        default=None,
        metadata={
            "help": "fire when a gold reward (--eval.rewards) falls this far below its best while the "
            "training reward on the held-out samples rises (none: off)"
        },
    )
    max_kl: float | None = field(
        default=None, metadata={"help": "fire when the logged KL to the reference (train/kl) exceeds this"}
    )
    min_diversity: float | None = field(
        default=None, metadata={"help": "fire when eval/diversity falls below this (none: off)"}
    )


def _num(v) -> float:
    return float(v.detach().float().item()) if hasattr(v, "detach") else float(v)


def validate_guards(cfg, trainer_cls=None) -> None:
    """The guard and gold-reward checks, before any work: ``cfg`` is a RunConfig (``cfg.guard``,
    ``cfg.eval``); ``trainer_cls`` tells whether the loop logs a KL (:meth:`Trainer.logs_kl`)."""
    gc, ev = cfg.guard, cfg.eval
    if gc.action not in ("stop", "rollback"):
        raise ConfigError(f"--guard.action: expected stop or rollback, got {gc.action!r}")
    for option, val in (("--guard.gold-drop", gc.gold_drop), ("--guard.max-kl", gc.max_kl)):
        if val is not None and not (math.isfinite(val) and val > 0):
            raise ConfigError(f"{option}: expected a finite value > 0 (or none: off), got {val}")
    if gc.min_diversity is not None and not (math.isfinite(gc.min_diversity) and gc.min_diversity >= 0):
        raise ConfigError(
            f"--guard.min-diversity: expected a finite value >= 0 (or none: off), got {gc.min_diversity}"
        )
    train_names = [n.strip() for n in (cfg.reward or "").split(",") if n.strip()]
    both = [n for n in ev.rewards if n in train_names]
    if both:
        raise ConfigError(
            f"--eval.rewards: expected gold rewards the run does not train on, got {','.join(both)} (also in "
            f"--reward {cfg.reward})"
        )
    if gc.gold_drop is not None and not ev.rewards:
        raise ConfigError(
            f"--guard.gold-drop: expected a gold reward to watch (--eval.rewards NAME, e.g. geneval_mini on "
            f"the embedded default), got --guard.gold-drop {gc.gold_drop} without --eval.rewards"
        )
    if gc.action == "rollback":
        if not ev.rewards:
            raise ConfigError(
                "--guard.action: rollback restores the best checkpoint by a gold reward; expected "
                "--eval.rewards NAME, got rollback without it"
            )
        if getattr(getattr(cfg, "dist", None), "strategy", "ddp") == "fsdp":
            raise ConfigError(
                "--guard.action: expected stop with --dist.strategy fsdp (the best checkpoint is a "
                "replicated one), got rollback"
            )
    if gc.min_diversity is not None and ev.diversity_prompts == 0:
        raise ConfigError(
            "--guard.min-diversity: expected eval/diversity to watch (--eval.diversity-prompts >= 1), got "
            "--eval.diversity-prompts 0"
        )
    if gc.max_kl is not None and trainer_cls is not None and not trainer_cls.logs_kl(cfg):
        raise ConfigError(
            f"--guard.max-kl: expected a loop that logs the KL to the reference (train/kl: train.nft, "
            f"train.grpo with --train.kl-beta > 0), got train.{trainer_cls.algo} with this config, which "
            f"logs none"
        )


class Guard:
    """The guard's state and checks; every rank holds the same (it reads all-reduced metrics)."""

    def __init__(self, cfg: GuardConfig, gold_names=()):
        self.cfg = cfg
        self.gold_names = tuple(gold_names)
        self.best: dict[str, dict] = {}  # gold name -> {"value", "iteration", "reward"} at its best eval
        self.fired: dict | None = None  # this invocation's firing
        self.history: list[dict] = []  # firings of earlier invocations (kept across --resume)

    @property
    def enabled(self) -> bool:
        c = self.cfg
        return any(v is not None for v in (c.gold_drop, c.max_kl, c.min_diversity))

    @property
    def key(self) -> str | None:
        """The gold reward whose best evaluation is the rollback target: the first of ``--eval.rewards``."""
        return self.gold_names[0] if self.gold_names else None

    # --- checks -----------------------------------------------------------------------------------------
    def observe_eval(self, it: int, vals: dict) -> bool:
        """An evaluation's ``eval/*`` metrics -> whether the first gold reward reached a new best (strictly
        above the previous); sets :attr:`fired` when a guard fires (the first firing is kept)."""
        reward = _num(vals["eval/reward"]) if "eval/reward" in vals else float("nan")
        new_best = False
        drops = []
        for name in self.gold_names:
            v = _num(vals[f"eval/gold/{name}"])
            b = self.best.get(name)
            if b is None or v > b["value"]:
                self.best[name] = {"value": v, "iteration": it, "reward": reward}
                new_best = new_best or name == self.key
            elif self.cfg.gold_drop is not None and b["value"] - v > self.cfg.gold_drop:
                if reward > b["reward"]:  # the training reward rose meanwhile
                    drops.append((name, v, b))
        if self.fired is not None or not self.enabled:
            return new_best
        if drops:
            name, v, b = drops[0]
            self._fire(
                "gold_drop",
                it,
                f"gold reward {name} fell {b['value']:.4f} -> {v:.4f} (best at iteration {b['iteration']}; "
                f"drop {b['value'] - v:.4f} > --guard.gold-drop {self.cfg.gold_drop:g}) while the training "
                f"reward on the held-out samples rose {b['reward']:.4f} -> {reward:.4f}",
                gold=name,
                value=v,
                best=b["value"],
                best_iteration=b["iteration"],
                reward=reward,
                reward_at_best=b["reward"],
            )
        elif self.cfg.min_diversity is not None and "eval/diversity" in vals:
            d = _num(vals["eval/diversity"])
            if d < self.cfg.min_diversity:
                self._fire(
                    "min_diversity",
                    it,
                    f"eval/diversity {d:.4f} < --guard.min-diversity {self.cfg.min_diversity:g}",
                    value=d,
                )
        return new_best

    def observe_iteration(self, it: int, vals: dict) -> None:
        """An iteration's metrics: the KL guard."""
        if self.fired is not None or self.cfg.max_kl is None or "train/kl" not in vals:
            return
        kl = _num(vals["train/kl"])
        if not kl <= self.cfg.max_kl:  # a NaN KL fires too
            self._fire("max_kl", it, f"train/kl {kl:.4g} > --guard.max-kl {self.cfg.max_kl:g}", value=kl)

    def _fire(self, guard: str, it: int, text: str, **numbers) -> None:
        self.fired = {"guard": guard, "iteration": it, "text": text, **numbers}

    def metrics(self) -> dict:
        """The firing as metric values (logged in the row of the iteration it fired at)."""
        f = self.fired
        out = {"guard/fired": f["guard"], "guard/iteration": f["iteration"]}
        nums = {k: v for k, v in f.items() if isinstance(v, (int, float)) and k != "iteration"}
        out.update({f"guard/{k}": v for k, v in nums.items()})
        return out

    def describe(self) -> str:
        """The end-of-run line: which guard fired, at which iteration, with the numbers and the action."""
        f = self.fired
        line = f"guard {f['guard']} fired at iteration {f['iteration']}: {f['text']}"
        if f.get("rolled_back_to") is not None:
            where = f"iteration {f['rolled_back_to']}, {f['checkpoint']}"
            line += f"; rolled back to the best checkpoint ({where})"
            if f.get("gold_after") is not None:
                line += f", whose {self.key} re-evaluates to {f['gold_after']:.4f}"
        line += "; stopped"
        return line

    # --- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        history = self.history + ([self.fired] if self.fired is not None else [])
        return {"best": {k: dict(v) for k, v in self.best.items()}, "history": [dict(h) for h in history]}

    def load_state_dict(self, state: dict) -> None:
        """Bests and past firings come back; the guard is re-armed (a resumed run trains on)."""
        self.best = {k: dict(v) for k, v in state.get("best", {}).items() if k in self.gold_names}
        self.history = [dict(h) for h in state.get("history", [])]
        self.fired = None
