"""The skeleton every online training loop shares (``train.nft``, ``train.grpo``, ``train.ddpo``).

* :class:`RunConfig`: the top-level options (``--preset``, ``--model``, ``--reward``, ``--run-dir``,
  ``--max-minutes``, ``--max-iters``, ``--seed``, ``--resume`` ...) and the ``models`` / ``eval`` / ``log``
  sections; an algorithm's config subclasses it and adds its ``sample`` and ``train`` sections.
* :class:`Trainer`: optimizer, counters, checkpoint state, the iteration loop (stop conditions, reward
  failures, metrics, evaluation, checkpoints, Ctrl-C) and evaluation; an algorithm implements
  :meth:`Trainer.train_iteration` (rollout -> reward -> advantage -> update) and nothing else.
* :func:`main`: the command line: parse, validate before any work, take the run directory, resume, build
  the policy, run.

Exit codes:

* 0: done (``--max-iters`` or ``--max-minutes`` reached);
* 1: training stopped (a reward failure, a non-finite loss, a failed write such as a full disk): the message
  names the cause and, when there is one, the intact checkpoint to resume from;
* 2: bad input, refused before any work (an option, the run directory, a damaged or mismatched checkpoint);
* 3: interrupted by SIGINT (Ctrl-C), SIGTERM or SIGUSR1: the iteration in progress was finished (or, during
  its rollout, abandoned), a checkpoint written, and ``--resume RUN_DIR`` continues bit-identically;
* 4: stopped by a guard (``--guard.*``, train.guards): the summary names the guard, the iteration and the
  numbers; the last checkpoint holds the weights as the guard fired (``stop``) or the best-by-gold weights
  (``rollback``), and ``--resume`` trains on from it;
* 128 + N: aborted by a second signal N (130 for Ctrl-C, 143 for SIGTERM): the previous checkpoint is intact.

``--resume DIR`` continues the run in ``DIR`` (wherever it now lives), from its newest intact checkpoint, or
from the start when it stopped before its first; options given with it are applied when they cannot change
what the run trains (:data:`RESUME_SAFE`: budgets, threads, device, logging, evaluation cadence,
micro-batching, guard thresholds) and refused by name otherwise.  A new run refuses a directory that holds
a run unless ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine import nvtx_range

from . import common
from .config import ConfigError, cli_pairs, from_dict, leaf_values, parse_cli, set_field, to_dict
from .distributed import (
    Dist,
    DistConfig,
    DistributedError,
    IterationPlan,
    as_distributed_error,
    check_world_divides,
    launched_world_size,
    validate_dist,
    wrap_policy,
)
from .evaluation import EvalConfig, Evaluator, validate_eval
from .guards import BEST_CHECKPOINT, GUARD_EXIT, Guard, GuardConfig, validate_guards
from .policy import (
    ModelConfig,
    Policy,
    build_policy,
    check_embedded_dir,
    check_model_options,
    check_model_path,
    check_resolution,
    check_schedule,
    read_prompt_file,
)
from .rewards.registry import RewardError, build_reward

__all__ = [
    "LogConfig",
    "RunConfig",
    "RESUME_SAFE",
    "validate_run",
    "check_at_least_one",
    "resume_config",
    "Trainer",
    "main",
]


def _h(text):
    return field(default=None, metadata={"help": text})


@dataclass
class LogConfig:
    loggers: tuple[str, ...] = field(default=(), metadata={"help": "extra loggers: tensorboard, wandb"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars"})
    checkpoint_every: int = field(default=5, metadata={"help": "iterations between checkpoints"})


@dataclass
class RunConfig:
    """Top-level options shared by every loop; algorithms add ``sample`` and ``train`` sections."""

    preset: str = field(default="tiny", metadata={"help": "named setup (see the preset list above)"})
    model: str | None = _h(
        "local diffusers pipeline directory (SD3/SD3.5/FLUX; SD1.5-style UNet pipelines too, except for "
        "train.nft and train.grpo)"
    )
    prompts: str | None = _h("training prompts for a --model run: a text file, one prompt per line")
    eval_prompts: str | None = _h("held-out prompts for a --model run (default: --prompts)")
    tasks: tuple[str, ...] = field(
        default=(),
        metadata={"help": "embedded default only: GenEval-mini task types to train and evaluate on (all)"},
    )
    reward: str | None = field(
        default=None,
        metadata={
            "help": "reward name(s) or reward-server URLs, comma separated (default on the embedded default: "
            "geneval_mini; geneval_learned for the reward-gradient methods; a --model run names its own)"
        },
    )
    reward_weights: tuple[float, ...] = field(default=(), metadata={"help": "one weight per reward"})
    reward_aggregation: str = field(default="zmean", metadata={"help": "zmean, min or mean_minus_std"})
    reward_clip_path: str | None = _h("local CLIP directory for the clip_score reward")
    reward_paths: tuple[str, ...] = field(
        default=(),
        metadata={"help": "local weights of model rewards, NAME=PATH each (pickscore=/models/PickScore_v1)"},
    )
    reward_device: str = field(
        default="auto", metadata={"help": "model rewards' device: auto (CUDA if present), cpu, cuda, cuda:N"}
    )
    reward_workers: int = field(
        default=0,
        metadata={"help": "processes for the CPU rewards (jpeg_*, geneval_mini*, ocr); 0: in-process"},
    )
    reward_timeout: float = field(
        default=60.0, metadata={"help": "HTTP rewards (http://HOST:PORT/NAME, vlm_judge): s per attempt"}
    )
    reward_retries: int = field(
        default=2, metadata={"help": "HTTP rewards: further attempts after a timeout, lost connection or 5xx"}
    )
    reward_max_in_flight: int = field(
        default=2, metadata={"help": "HTTP rewards: requests open at once (vlm_judge: per image)"}
    )
    reward_vlm_model: str | None = _h("vlm_judge: model name for the endpoint (UnifiedReward-7b-v1.5)")
    run_dir: str | None = _h("run directory (default: runs/<algorithm>-<timestamp>)")
    resume: str | None = _h("continue the run in this directory (from its newest intact checkpoint)")
    overwrite: bool = field(
        default=False,
        metadata={"help": "start over in a --run-dir that holds a run (deletes its checkpoints and metrics)"},
    )
    max_minutes: float | None = _h("stop after this many minutes of this invocation")
    max_iters: int | None = field(default=100, metadata={"help": "stop after this many iterations in total"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    threads: int = field(
        default=0,
        metadata={"help": "torch intra-op CPU threads for the run (0: torch's default; the tiny presets: 1)"},
    )
    train_threads: int = field(
        default=0,
        metadata={
            "help": "torch intra-op CPU threads while the loop trains on an iteration's rollouts, when no "
            "reward is being computed beside it (0: as --threads; train.nft's tiny preset: 2)"
        },
    )
    models: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)


def wait_for_rewards(futures) -> tuple[torch.Tensor, dict]:
    """The results of reward futures (one per rollout micro-batch), concatenated -> ``(rewards [B] fp32,
    {name: [B] fp32})``; a reward's :class:`RewardError` is re-raised here."""
    results = [f.result() for f in futures]
    rewards = torch.cat([r for r, _ in results]).float()
    return rewards, {k: torch.cat([c[k] for _, c in results]).float() for k in results[0][1]}


def check_at_least_one(pairs) -> None:
    """``pairs`` of ``(option, value)``: each value must be an integer >= 1."""
    for name, val in pairs:
        if val < 1:
            raise ConfigError(f"{name}: expected an integer >= 1, got {val}")


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve_reward(cfg: RunConfig, *, embedded: bool) -> None:
    """``--reward``'s default is the embedded default's benchmark (GenEval-mini), which scores its own prompt
    records only: a ``--model`` run must name a reward for its text prompts."""
    geneval = ("geneval_mini", "geneval_mini_partial")
    if cfg.reward is None:
        if not embedded:
            raise ConfigError(
                "--reward: expected a reward for a --model run's prompts (e.g. jpeg_compressibility, or "
                "clip_score with --reward-clip-path), got none (the default, geneval_mini, scores only the "
                "embedded default's GenEval-mini prompts)"
            )
        cfg.reward = "geneval_mini"
    names = [n.strip() for n in cfg.reward.split(",")]
    if not embedded and any(n in geneval for n in names):
        raise ConfigError(
            f"--reward: expected a reward for a --model run's text prompts (e.g. jpeg_compressibility or "
            f"clip_score), got {cfg.reward!r} (GenEval-mini scores only the embedded default's prompts)"
        )
    golds = getattr(getattr(cfg, "eval", None), "rewards", ())  # train.make_pairs has no evaluation
    if not embedded and any(n in geneval for n in golds):
        raise ConfigError(
            f"--eval.rewards: expected gold rewards for a --model run's text prompts (e.g. clip_score), got "
            f"{','.join(golds)} (GenEval-mini scores only the embedded default's prompts)"
        )
    if "ocr" in names or "ocr" in golds:
        check_ocr_prompts(cfg, embedded=embedded, option="--reward" if "ocr" in names else "--eval.rewards",
                          train_prompts="ocr" in names)
    if not getattr(cfg, "_resumed", False):  # a run started before this check keeps its config
        check_reward_options_used(cfg, [*names, *golds])


# ``--reward-paths`` entries that belong to another reward: the processor of PickScore, the head of aesthetic
_PATH_OWNERS = {"pickscore_processor": "pickscore", "aesthetic_head": "aesthetic"}


def check_reward_options_used(cfg, used: list[str]) -> None:
    """A reward option given for a reward the run does not use would be ignored without a word (a typo in
    ``--reward``, or a leftover from another command): refused by name before any work."""
    from .rewards.registry import parse_reward_paths

    shown = ", ".join(used)
    if getattr(cfg, "reward_clip_path", None) and "clip_score" not in used:
        raise ConfigError(
            f"--reward-clip-path: the CLIP of the clip_score reward; expected it with clip_score in --reward "
            f"or --eval.rewards, got it with {shown}"
        )
    if getattr(cfg, "reward_vlm_model", None) and "vlm_judge" not in used:
        raise ConfigError(
            f"--reward-vlm-model: the model of the vlm_judge reward; expected it with vlm_judge in --reward "
            f"or --eval.rewards, got it with {shown}"
        )
    for name in parse_reward_paths(getattr(cfg, "reward_paths", ()) or ()):
        if name not in used and _PATH_OWNERS.get(name) not in used:
            raise ConfigError(
                f"--reward-paths: expected entries for the rewards this run uses ({shown}), got {name}= for "
                f"{_PATH_OWNERS.get(name, name)}, which it does not use"
            )


def check_ocr_prompts(cfg, *, embedded: bool, option: str, train_prompts: bool) -> None:
    """The ocr reward scores the text between a prompt's first two double quotes (flow_grpo's rule): every
    prompt it will score must have some, checked before any work (it raised at the first evaluation).  The
    training reward scores the training and the held-out prompts, a gold reward the held-out ones."""
    if embedded:
        raise ConfigError(
            f'{option}: expected prompts with "quoted text" for the ocr reward, got the embedded default\'s '
            f"GenEval-mini prompts, which have none (a --model run with --prompts)"
        )
    from .rewards.ocr import quoted_text

    files = []
    if train_prompts and getattr(cfg, "prompts", None):
        files.append(("--prompts", cfg.prompts))
    if hasattr(cfg, "eval_prompts") and (cfg.eval_prompts or cfg.prompts):
        files.append(("--eval-prompts" if cfg.eval_prompts else "--prompts", cfg.eval_prompts or cfg.prompts))
    for opt, path in dict.fromkeys(files):
        for i, prompt in enumerate(read_prompt_file(path, opt), 1):
            try:
                quoted_text(prompt)
            except ValueError:
                raise ConfigError(
                    f'{opt}: expected every prompt to hold "quoted text" for the ocr reward ({option} ocr), '
                    f"got prompt {i} of {path}: {prompt!r}"
                ) from None


def check_no_prompt_files(cfg) -> None:
    """Prompt files are a ``--model`` run's: the embedded default trains and evaluates on GenEval-mini's own
    prompts, and a file given to it would be ignored without a word."""
    for option, path in (("--prompts", cfg.prompts), ("--eval-prompts", getattr(cfg, "eval_prompts", None))):
        if path:
            raise ConfigError(
                f"{option}: a --model run's prompt file; the embedded default uses "
                f"GenEval-mini's own prompts (--tasks picks task types), expected none, got {path!r}"
            )


# the rollout samplers each ``--sample`` option acts on; the others ignore it
_SAMPLER_OPTIONS = {"noise_level": ("flow-sde", "cps"), "eta": ("ddim",), "cps_log_prob": ("cps",)}


def check_sampler_options_used(sc, base, *, prefix: str = "--sample.") -> None:
    """A sampler option (``noise_level``, ``eta``, ``cps_log_prob`` of ``sc``, a loop's ``sample`` section
    or train.make_pairs' config) that the chosen rollout sampler does not read would change nothing:
    refused by name (``prefix`` + the option) when it differs from the preset's (``base``).  ``solver auto``
    picks by the model, so it is not checked."""
    solver = getattr(sc, "solver", "auto")
    if sc is None or base is None or solver == "auto":
        return
    for name, solvers in _SAMPLER_OPTIONS.items():
        if not hasattr(sc, name) or solver in solvers or getattr(sc, name) == getattr(base, name, None):
            continue
        raise ConfigError(
            f"{prefix}{name.replace('_', '-')}: acts on the {' and '.join(solvers)} rollouts; with "
            f"{prefix}solver {solver} it changes nothing, expected it unset, got {getattr(sc, name)}"
        )


def check_finite(cfg) -> None:
    """Every float option finite: first in :func:`main`, before the method's own checks compute with them."""
    for name, val in leaf_values(cfg).items():
        for v in val if isinstance(val, (tuple, list)) else (val,):
            if isinstance(v, float) and not math.isfinite(v):
                shown = ",".join(map(str, val)) if isinstance(val, (tuple, list)) else val
                raise ConfigError(f"{_opt(name)}: expected a finite number, got {shown}")


def validate_run(
    cfg: RunConfig, *, embedded_presets=("tiny",), unet_ok: bool = False, prompts_from_data: bool = False
) -> None:
    """The checks every loop shares, run before any work: every number finite, budgets, threads, device, the
    evaluation, logging and LoRA sections, the optimizer's and the sampler's common fields, the reward, and
    for a ``--model`` run (or a preset other than ``embedded_presets``, which run the embedded default) the
    model directory (a UNet only where ``unet_ok``) and the prompt files (``--eval-prompts`` alone where
    ``prompts_from_data``: an offline run trains on its data's prompts)."""
    check_finite(cfg)
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: expected auto, cpu or cuda, got {cfg.device!r}")
    cores = os.cpu_count() or 1
    for opt, n, zero in (
        ("--threads", cfg.threads, "torch's default"),
        ("--train-threads", cfg.train_threads, "as --threads"),
    ):
        if n < 0:
            raise ConfigError(f"{opt}: expected an integer >= 0 (0: {zero}), got {n}")
        if n > 4 * cores:
            raise ConfigError(
                f"{opt}: expected at most {4 * cores} (4 x the {cores} CPU cores; 0: {zero}), got {n}"
            )
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: expected a machine with CUDA for 'cuda', found none")
    if cfg.max_iters is not None and cfg.max_iters < 1:
        raise ConfigError(f"--max-iters: expected an integer >= 1 (or none: no limit), got {cfg.max_iters}")
    if cfg.max_minutes is not None and not cfg.max_minutes > 0:
        raise ConfigError(f"--max-minutes: expected a value > 0 (or none: no limit), got {cfg.max_minutes}")
    ev = cfg.eval
    check_at_least_one(
        [
            ("--eval.every", ev.every),
            ("--log.checkpoint-every", cfg.log.checkpoint_every),
            ("--eval.images-per-prompt", ev.images_per_prompt),
            ("--eval.num-steps", ev.num_steps),
            ("--eval.batch", ev.batch),
        ]
    )
    for name, val, zero in (("--eval.num-prompts", ev.num_prompts, "all"),
                            ("--eval.grid-images", ev.grid_images, "no grid")):
        if val < 0:
            raise ConfigError(f"{name}: expected an integer >= 0 (0: {zero}), got {val}")
    if ev.solver not in ("dpm2", "euler"):
        raise ConfigError(
            f"--eval.solver: expected a deterministic ODE solver (dpm2 or euler), got {ev.solver!r}"
        )
    for name in cfg.log.loggers:
        if name not in ("tensorboard", "wandb"):
            raise ConfigError(f"--log.loggers: expected tensorboard and/or wandb, got {name!r}")
        if importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"--log.loggers {name}: expected {name} installed (pip install '.[log]'), found none"
            )
    mc = cfg.models
    check_model_options(mc)
    check_at_least_one([("--models.lora-rank", mc.lora_rank), ("--models.resolution", mc.resolution)])
    if not mc.lora_alpha > 0:
        raise ConfigError(f"--models.lora-alpha: expected a value > 0, got {mc.lora_alpha}")
    tc, sc = getattr(cfg, "train", None), getattr(cfg, "sample", None)
    if tc is not None:
        if tc.lr < 0:  # 0 is allowed: the learning-rate-0 control run of a learning comparison
            raise ConfigError(f"--train.lr: expected a value >= 0 (0: a control run), got {tc.lr}")
        if not tc.grad_clip > 0:
            raise ConfigError(f"--train.grad-clip: expected a value > 0, got {tc.grad_clip}")
        if tc.weight_decay < 0:
            raise ConfigError(f"--train.weight-decay: expected a value >= 0, got {tc.weight_decay}")
    if sc is not None and sc.shift is not None and not sc.shift > 0:
        raise ConfigError(f"--sample.shift: expected a value > 0, got {sc.shift}")
    for name, what in (("noise_level", ""), ("eta", ""), ("guidance_scale", " (1: none)")):
        val = getattr(sc, name, None)
        if val is not None and val < 0:  # the solvers' own refusal comes only after the base evaluation
            raise ConfigError(f"--sample.{name.replace('_', '-')}: expected a value >= 0{what}, got {val}")
    embedded = cfg.preset in embedded_presets and not cfg.model
    if cfg.tasks:
        from .data import TASKS

        if not embedded:
            raise ConfigError(
                f"--tasks: selects GenEval-mini task types of the embedded default; a --model run takes "
                f"--prompts/--eval-prompts instead, got --tasks {','.join(cfg.tasks)}"
            )
        unknown = [t for t in cfg.tasks if t not in TASKS]
        if unknown or len(set(cfg.tasks)) != len(cfg.tasks):
            raise ConfigError(
                f"--tasks: expected distinct task types among {', '.join(TASKS)}, got {','.join(cfg.tasks)}"
            )
    check_embedded_dir(mc.embedded_dir, embedded=embedded)
    if embedded:
        if not getattr(cfg, "_resumed", False):  # options it ignores: a run started before the checks goes on
            check_no_prompt_files(cfg)
            check_resolution(None, mc.resolution, embedded=True)
    else:
        check_model_path(cfg.model, preset=cfg.preset, unet_ok=unet_ok)
        check_resolution(cfg.model, mc.resolution, embedded=False)
        if prompts_from_data and not cfg.prompts:
            if not cfg.eval_prompts:
                raise ConfigError(
                    "--eval-prompts: a --data run trains on its data's prompts and evaluates on these; "
                    "expected a text file with one prompt per line (or --prompts), got none"
                )
        else:
            read_prompt_file(cfg.prompts, "--prompts")
        read_prompt_file(cfg.eval_prompts or cfg.prompts, "--eval-prompts")
    validate_eval(cfg.eval)
    if cfg.eval.feature.startswith("geneval_") and not embedded:
        raise ConfigError(
            f"--eval.feature: expected auto or pixels16 for a --model run ({cfg.eval.feature} reads the "
            f"embedded default's GenEval-mini images), got {cfg.eval.feature}"
        )
    check_schedule(None if embedded else cfg.model, cfg.sample.shift)  # the model's scheduler config
    resolve_reward(cfg, embedded=embedded)


class Trainer:
    """Owns the optimizer over the policy's trainable LoRA parameters, the counters and the loop."""

    algo = "base"

    def __init__(self, cfg, run_dir, policy: Policy, reward, evaluator: Evaluator, dist: Dist | None = None):
        self.cfg, self.run_dir, self.policy, self.reward, self.evaluator = (
            cfg,
            run_dir,
            policy,
            reward,
            evaluator,
        )
        self.dist = dist if dist is not None else Dist()
        tc = cfg.train
        self.params = policy.trainable_parameters()
        low = sorted({str(p.dtype) for p in self.params if p.dtype != torch.float32})
        if low:  # models.lora keeps adapters fp32: the optimizer updates fp32 master weights, state in fp32
            raise ValueError(f"policy: expected fp32 trainable LoRA parameters, got {', '.join(low)}")
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
        # fp16 forwards: a gradient scaler (its scale enters at the denoiser's output, train.policy)
        self.scaler = None
        if policy.dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(policy.device.type)
            self.scaler.scale(torch.zeros((), device=policy.device))  # creates its scale tensor
            self._publish_grad_scale()
        self.iteration = 0  # iterations completed
        self.opt_step = 0
        self.elapsed_offset = 0.0
        self.last_eval = None  # iteration of the last evaluation logged (checkpointed: never repeated)
        self.saved_iteration = None  # iteration of the checkpoint on disk that this process wrote or loaded
        self.interrupt = common.GracefulInterrupt()  # main() installs a live one around the run
        self.metrics = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self.guard = Guard(getattr(cfg, "guard", GuardConfig()), cfg.eval.rewards)

    # --- what an algorithm provides -------------------------------------------------------------------------
    @classmethod
    def check_reward(cls, reward) -> None:
        """Refuse, before any work, a reward this algorithm cannot use (a ValueError naming the option)."""

    def train_iteration(self, it: int) -> tuple[dict, str]:
        """Run iteration ``it`` (rollout, reward, advantage, update) -> ``(metrics, one-line summary)``.
        A reward failure surfaces as :class:`RewardError` before any parameter changes."""
        raise NotImplementedError

    def describe(self) -> str:
        """Extra words for the run header line."""
        return ""

    @classmethod
    def logs_kl(cls, cfg) -> bool:
        """Whether the loop logs ``train/kl``, the KL to the reference that ``--guard.max-kl`` watches."""
        return False

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # --- state ----------------------------------------------------------------------------------------------
    def state_dict(self, elapsed: float, *, full: bool = True) -> dict:
        """Counters, RNG, config and the algorithm's extra state; with ``full`` also the adapters and the
        optimizer (FSDP2 checkpoints store those sharded instead)."""
        state = {
            "iteration": self.iteration,
            "opt_step": self.opt_step,
            "elapsed_s": elapsed,
            "rng": common.rng_state(),
            "config": to_dict(self.cfg),
            "extra": self.extra_state(),
            "world_size": self.dist.world,
            "last_eval": self.last_eval,
            "guard": self.guard.state_dict(),
            "eval_reference": self.evaluator.reference,
        }
        if full:
            state["policy"] = self.policy.adapter_state()
            state["optimizer"] = self.opt.state_dict()
        else:
            state["eval_ema_updates"] = self.policy.eval_ema.num_updates
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "dcp_path" in state:  # an FSDP2 checkpoint: sharded tensors through torch.distributed.checkpoint
            if self.dist.fsdp_root is None:
                raise ValueError(
                    f"--resume: {state['dcp_path']} is an FSDP checkpoint; expected --dist.strategy fsdp"
                )
            self._load_sharded(state["dcp_path"])
            state = state["meta"]
        elif self.dist.fsdp_root is not None:
            raise ValueError(
                "--resume: expected an FSDP (.dcp) checkpoint for --dist.strategy fsdp, got a .pt one"
            )
        else:
            self.policy.load_adapter_state(state["policy"])
            self.opt.load_state_dict(state["optimizer"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
            self._publish_grad_scale()
        self.iteration, self.opt_step = state["iteration"], state["opt_step"]
        self.elapsed_offset = state["elapsed_s"]
        # older checkpoints do not record it: a checkpoint is always written after its iteration's evaluation
        self.last_eval = state.get("last_eval", state["iteration"])
        self.saved_iteration = state["iteration"]
        common.set_rng_state(state["rng"])
        if "eval_ema_updates" in state:
            self.policy.eval_ema.num_updates = int(state["eval_ema_updates"])
        self.guard.load_state_dict(state.get("guard", {}))
        if state.get("eval_reference") is not None:  # older checkpoints: the base is sampled at the next eval
            self.evaluator.reference = state["eval_reference"]
        self.load_extra_state(state.get("extra", {}))

    def _sharded_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        pol = self.policy
        return {
            "default": {str(i): p for i, p in enumerate(pol.trainable_parameters())},
            "old": {str(i): p for i, p in enumerate(pol.old_parameters())},
            "eval_ema": {str(i): s for i, s in enumerate(pol.eval_ema.shadow)},
            "optimizer": get_optimizer_state_dict(pol.transformer, self.opt),
        }

    def _load_sharded(self, path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = self._sharded_state()
        with torch.no_grad():
            dcp.load(state, checkpoint_id=str(path))
        set_optimizer_state_dict(self.policy.transformer, self.opt, state["optimizer"])

    def save_checkpoint(self, iteration: int, elapsed: float) -> None:
        """Rank 0 writes the replicated (DDP / single-process) state atomically; under FSDP2 every rank writes
        its shards through ``torch.distributed.checkpoint``.  Every rank returns once the checkpoint is
        whole.  The metrics logged so far are fsynced first (a resume keeps the rows the checkpoint covers);
        a failed write (:class:`common.WriteError`) raises on every rank.  Weights holding a NaN/inf are
        never written (:func:`check_finite_weights`)."""
        check_finite_weights(self.policy, self.dist, iteration, self.run_dir)
        if self.metrics is not None and self.dist.is_main:
            self.metrics.sync()
        if self.dist.fsdp_root is not None:
            meta = self.state_dict(elapsed, full=False)
            common.save_sharded_checkpoint(
                self.run_dir,
                iteration,
                self._sharded_state(),
                meta,
                is_main=self.dist.is_main,
                barrier=self.dist.barrier,
            )
            self.saved_iteration = iteration
            self.export_adapters()  # every rank: the shards are gathered
            return
        state = self.state_dict(elapsed)
        err = None
        if self.dist.is_main:
            try:
                common.save_checkpoint(self.run_dir, iteration, state)
            except common.WriteError as e:
                err = e
        failed = self.dist.all_gather_object(str(err) if err is not None else None)[0]  # also the barrier
        if err is not None:
            raise err
        if failed:
            raise common.TrainingStopped(f"rank 0: {failed}")
        self.saved_iteration = iteration
        if self.dist.is_main:
            self.export_adapters()

    def export_adapters(self) -> None:
        """The trained adapter and its evaluation EMA in diffusers' LoRA format, ``<run>/lora/`` and
        ``<run>/lora_ema/`` (``pytorch_lora_weights.safetensors``; ``pipe.load_lora_weights(dir)``)."""
        from .export import LORA_DIR, LORA_EMA_DIR, export_adapters

        export_adapters(
            self.policy, self.run_dir / LORA_DIR, self.run_dir / LORA_EMA_DIR, write=self.dist.is_main
        )

    def say(self, *args, **kwargs) -> None:
        """``print`` on rank 0 only."""
        if self.dist.is_main:
            print(*args, **kwargs)

    # --- shared steps ---------------------------------------------------------------------------------------
    def iteration_plan(self, it: int) -> IterationPlan:
        """Iteration ``it``'s global batch (its prompts, ``images_per_prompt`` images each, one rollout seed
        per image, the training order) and this rank's share; drawn from ``(seed, it)`` alone, so a resumed
        run and a run on another world size draw the same (see :mod:`train.distributed`)."""
        sc, seed = self.cfg.sample, self.cfg.seed
        prompts = self.policy.sample_train_prompts(
            sc.prompts_per_iter, common.derive_seed(seed, it, "prompts")
        )
        group_ids = torch.arange(len(prompts)).repeat_interleave(sc.images_per_prompt)
        batch_prompts = [prompts[i] for i in group_ids.tolist()]
        seeds = [common.derive_seed(seed, it, "rollout", i) for i in range(len(batch_prompts))]
        order = torch.randperm(len(batch_prompts), generator=common.iteration_generator(seed, it, "order"))
        return IterationPlan.build(
            batch_prompts,
            group_ids,
            seeds,
            order=order,
            per_rank_step=self.per_rank_step(len(batch_prompts)),
            rank=self.dist.rank,
            world=self.dist.world,
        )

    def per_rank_step(self, n: int) -> int:
        """Samples per optimizer step per rank, for an iteration of ``n`` samples: ``batch_size *
        grad_accum`` (an algorithm may size it from the iteration instead, as train.nft does)."""
        tc = self.cfg.train
        return tc.batch_size * tc.grad_accum

    def await_rewards(self, futures) -> tuple[torch.Tensor, dict]:
        """This rank's ``(rewards, components)`` from its reward futures.  A reward failure on any rank raises
        :class:`RewardError` on every rank (never a hang, never a silent zero)."""
        err, out = None, None
        try:
            out = wait_for_rewards(futures)
        except RewardError as e:
            err = str(e)
        self.check_finite_rollouts()
        failed = [(r, e) for r, e in enumerate(self.dist.all_gather_object(err)) if e is not None]
        if failed:
            r, e = failed[0]
            raise RewardError(e if not self.dist.enabled else f"rank {r}: {e}")
        return out

    def to_global(self, plan: IterationPlan, local: torch.Tensor) -> torch.Tensor:
        """Every rank's ``local`` array (the plan's local order) all-gathered into the global order ``[n,
        ...]``."""
        return plan.to_global(self.dist.all_gather(local))

    def optimizer_step(self) -> None:
        """Clip, step, zero, count, and update the eval EMA; a non-finite gradient stops the run before the
        step, so the parameters never take a NaN.  With a gradient scaler (fp16) the gradients are unscaled
        before clipping and a step with an inf/NaN gradient is skipped (the scale backs off), as
        ``torch.amp.GradScaler`` and the reference (NVlabs/DiffusionNFT@24af5554 scripts/train_nft_sd3.py)
        do; it still counts as a step there, and here."""
        tc = self.cfg.train
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        gn = torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip)
        if hasattr(gn, "full_tensor"):  # FSDP2: a replicated DTensor
            gn = gn.full_tensor()
        if self.scaler is not None:
            self.scaler.step(self.opt)  # skipped when the unscaled gradients hold an inf/NaN
            self.scaler.update()
            self._publish_grad_scale()
        elif not torch.isfinite(gn):
            raise common.TrainingStopped(
                f"non-finite gradient norm ({float(gn)}) at optimizer step {self.opt_step}; "
                f"{common.intact_note(self.run_dir)}"
            )
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.opt_step += 1
        self.policy.update_eval_ema(self.opt_step)

    def _publish_grad_scale(self) -> None:
        """The scaler's current scale to the policy's forward (one host read per optimizer step)."""
        den = self.policy.denoiser
        while den is not None and not hasattr(den, "set_grad_scale"):
            den = getattr(den, "inner", None)
        if den is None:
            raise ValueError("policy: an fp16 policy needs its AutocastDenoiser (train.policy.build_policy)")
        den.set_grad_scale(self.scaler.get_scale())

    def check_finite_rollouts(self) -> None:
        """Stop the run (on every rank) when a rollout since the iteration began produced a NaN/inf latent or
        image, before its rewards are used: like a non-finite reward, but no checkpoint is written (the
        weights that produced it may be the cause)."""
        lat, img, total = self.policy.take_nonfinite()
        counts = self.dist.all_gather_object((lat, img, total))
        bad = [(r, c) for r, c in enumerate(counts) if c[0] or c[1]]
        if bad:
            lat, img, total = (sum(c[i] for c in counts) for i in range(3))
            where = f" (ranks {[r for r, _ in bad]})" if self.dist.enabled else ""
            raise common.TrainingStopped(
                f"non-finite rollout at iteration {self.iteration + 1}: {lat} of {total} latents and {img} "
                f"decoded images hold NaN/inf{where} (with --models.dtype float16/bfloat16 try float32); "
                f"{common.intact_note(self.run_dir)}"
            )

    @contextlib.contextmanager
    def train_phase(self):
        """An iteration's training on its rollouts: under ``nvtx_range("train")``, with ``--train-threads``
        torch threads when set.  Every reward of the iteration has been awaited by then, so the core the
        reward worker held during the rollouts is free (``train.nft``'s tiny preset rolls out on one thread
        beside the worker and trains on two).  Thread counts change only the order of float reductions.
        Never more than this process's share of the cores (``cores // LOCAL_WORLD_SIZE`` under torchrun):
        several ranks on one CPU machine would otherwise oversubscribe it."""
        n, before = self.cfg.train_threads, torch.get_num_threads()
        if n:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
            n = min(n, max(1, cores // max(1, local)))
            torch.set_num_threads(n)
        try:
            with nvtx_range("train"):
                yield
        finally:
            if n:
                torch.set_num_threads(before)

    def progress(self, it, desc):
        """tqdm bars on rank 0 when stderr is a terminal; a log file gets the one line per iteration only."""
        if not self.cfg.log.progress or not self.dist.is_main or not sys.stderr.isatty():
            return self._stop_points(it, desc)
        from tqdm.auto import tqdm

        return self._stop_points(tqdm(it, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr), desc)

    def _stop_points(self, iterable, desc):
        """A rollout's micro-batch boundaries are where a stop signal abandons the iteration: nothing has been
        updated yet (the loop then checkpoints the previous iteration's state).  Single process only: ranks
        would have to agree on the boundary, so under torchrun the iteration is finished instead."""
        if desc != "rollout" or self.dist.enabled:
            return iterable

        def checked():
            for item in iterable:
                if self.interrupt.requested:
                    raise common.IterationAbandoned
                yield item

        return checked()

    def evaluate(self, it, clock, metrics, base=False, note=None) -> dict:
        """Held-out evaluation (eval-EMA weights, ``--eval.cfg-scale``); with ``base`` (a fresh run's
        iteration 0) also the base model at ``--eval.base-cfg-scale``.  Logged: the scores, the protocol
        (``protocol/eval``; at iteration 0 also the resolved rollout solver, ``protocol/rollout_solver``), the
        training reward on the held-out samples (``eval/reward``), the gold rewards
        (``eval/gold/NAME``), ``eval/diversity`` and ``eval/drift`` in ``eval/feature``'s space (math.md
        §9.2; a fresh run's iteration-0 samples, its initial weights, are the drift reference).  The guards
        read the row (train.guards); a new best by the first gold reward is kept as ``checkpoints/best.pt``
        when ``--guard.action rollback``.  ``note``: more values for the row.  Returns the logged values."""
        shift = self.cfg.sample.shift
        with nvtx_range("eval"), torch.no_grad():
            res = self.evaluator.run(
                self.policy, it, self.run_dir, shift=shift, dist=self.dist, extras=True, initial=base
            )
            vals = {f"eval/{k}": v for k, v in res.items()}
            vals["protocol/eval"] = self.evaluator.protocol(self.policy)
            if base:  # the rollout solver as resolved (--sample.solver auto depends on the loop and model)
                vals["protocol/rollout_solver"] = getattr(self, "solver", self.cfg.sample.solver)
            if self.evaluator.feature_name():
                vals["eval/feature"] = self.evaluator.feature_name()
            if base:
                base_res = self.evaluator.run(
                    self.policy, it, self.run_dir, base_cfg=True, shift=shift, dist=self.dist
                )
                vals.update({f"eval/base_cfg/{k}": v for k, v in base_res.items()})
                vals["protocol/base_cfg"] = self.evaluator.protocol(self.policy, base_cfg=True)
        armed = self.guard.fired is None
        new_best = self.guard.observe_eval(it, vals)
        if armed and self.guard.fired is not None:
            vals.update(self.guard.metrics())
        vals.update(note or {})
        metrics.log(it, clock(), vals)
        self.last_eval = it
        partial = f" | partial {vals['eval/score_partial']:.3f}" if "eval/score_partial" in vals else ""
        extra = f" | base CFG {vals['eval/base_cfg/score']:.3f}" if base else ""
        more = "".join(f" | {k[10:]} {v:.3f}" for k, v in vals.items() if k.startswith("eval/gold/"))
        more += f" | reward {vals['eval/reward']:.3f}" if "eval/reward" in vals else ""
        for k in ("diversity", "drift"):
            more += f" | {k} {vals[f'eval/{k}']:.3f}" if f"eval/{k}" in vals else ""
        self.say(
            f"eval {it:4d} | score {vals['eval/score']:.3f}{partial}{extra}{more} | {vals['protocol/eval']}",
            flush=True,
        )
        if new_best and self.cfg.guard.action == "rollback":
            self.save_best(it, clock())
        return vals

    # --- guards (train.guards) ------------------------------------------------------------------------------
    def save_best(self, iteration: int, elapsed: float) -> None:
        """``checkpoints/best.pt``: the full state at the best evaluation by the first gold reward, written
        atomically with its checksum by rank 0 (never with non-finite weights: the run stops instead)."""
        check_finite_weights(self.policy, self.dist, iteration, self.run_dir)
        err = None
        if self.dist.is_main:
            state = self.state_dict(elapsed)
            state["best"] = {"gold": self.guard.key, **self.guard.best[self.guard.key]}
            try:
                ckdir = self.run_dir / "checkpoints"
                ckdir.mkdir(parents=True, exist_ok=True)
                common.atomic_save(state, ckdir / BEST_CHECKPOINT, checksum=True)
            except common.WriteError as e:
                err = e
        failed = self.dist.all_gather_object(str(err) if err is not None else None)[0]  # also the barrier
        if err is not None:
            raise err
        if failed:
            raise common.TrainingStopped(f"rank 0: {failed}")

    def rollback(self) -> int:
        """Restore the adapters (trained, old, eval EMA), the optimizer and the grad scaler from
        ``checkpoints/best.pt`` (every rank reads it) -> the iteration it was taken at.  The counters stay:
        the run's next checkpoint holds the restored weights under the current iteration."""
        path = self.run_dir / "checkpoints" / BEST_CHECKPOINT
        problem = common.verify_checkpoint(path) if path.exists() else "it does not exist"
        if problem:
            raise common.TrainingStopped(
                f"guard {self.guard.fired['guard']}: cannot roll back to {path}: {problem}; "
                f"{common.intact_note(self.run_dir)}"
            )
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.policy.load_adapter_state(state["policy"])
        self.opt.load_state_dict(state["optimizer"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
            self._publish_grad_scale()
        self.saved_iteration = None  # the weights changed: the end of the run checkpoints them
        self.guard.fired.update(rolled_back_to=state["best"]["iteration"], checkpoint=str(path))
        return state["best"]["iteration"]

    def on_guard(self, clock, metrics) -> None:
        """A guard fired: with ``--guard.action rollback`` restore the best checkpoint and evaluate it again
        (the grid and record of the weights the guard caught are kept as ``iter_XXXXXX_guard.png`` and
        ``.json``); the caller stops."""
        fired = self.guard.fired
        self.say(f"guard {fired['guard']} fired at iteration {fired['iteration']}: {fired['text']}",
                 flush=True)
        if self.cfg.guard.action != "rollback":
            return
        best = self.rollback()
        for ext in ("png", "json"):  # the grid and the record of the caught weights' evaluation
            path = self.run_dir / "samples" / f"iter_{self.iteration:06d}.{ext}"
            if self.dist.is_main and self.last_eval == self.iteration and path.exists():
                os.replace(path, path.with_name(f"iter_{self.iteration:06d}_guard.{ext}"))
        self.say(f"guard: rolled back to the best checkpoint (iteration {best}); evaluating it", flush=True)
        vals = self.evaluate(self.iteration, clock, metrics, note={"guard/rolled_back_to": best})
        fired["gold_after"] = vals.get(f"eval/gold/{self.guard.key}")

    # --- stopping -------------------------------------------------------------------------------------------
    def checkpoint_now(self, clock):
        """A checkpoint of the current iteration (unless this process already wrote or loaded it) -> its path
        (its directory under FSDP2)."""
        if self.saved_iteration != self.iteration:
            self.save_checkpoint(self.iteration, clock())
        ext = "dcp" if self.dist.fsdp_root is not None else "pt"
        return self.run_dir / "checkpoints" / f"iter_{self.iteration:06d}.{ext}"

    def stop_on_signal(self, clock):
        """Checkpoint the completed iteration, end the run with :class:`common.Interrupted` (exit code 3)."""
        path = self.checkpoint_now(clock)
        raise common.Interrupted(
            f"interrupted: checkpoint of iteration {self.iteration} written to {path} "
            f"({self.interrupt.signame or 'stop signal'}); continue with --resume {self.run_dir}"
        )

    # --- the loop -------------------------------------------------------------------------------------------
    def run(self, metrics: common.MetricsLogger) -> None:
        """Iterate until ``--max-iters`` / ``--max-minutes``, evaluating and checkpointing on schedule.  A
        stop signal (see :class:`common.GracefulInterrupt`) ends the run at the next iteration boundary with a
        checkpoint and :class:`common.Interrupted`; no off-schedule evaluation is added."""
        cfg, dist = self.cfg, self.dist
        self.metrics = metrics
        clock = common.Stopwatch(self.elapsed_offset)
        t_start = time.perf_counter()
        iter_times = []

        def evaluate(it, **kw):
            """An evaluation whose reward fails stops the run like a training reward does: nothing was
            updated, so the checkpoint holds the weights evaluated."""
            try:
                return self.evaluate(it, clock, metrics, **kw)
            except RewardError as e:
                path = self.checkpoint_now(clock)
                raise common.TrainingStopped(
                    f"{e} (evaluating iteration {it}). Checkpoint of iteration {self.iteration} written to "
                    f"{path}; resume with --resume {self.run_dir}"
                ) from None

        if self.iteration == 0 and self.last_eval is None:
            evaluate(0, base=True)
            if self.guard.fired is not None:  # e.g. the base model's diversity already below the bound
                self.on_guard(clock, metrics)
        while self.guard.fired is None:
            if dist.any(self.interrupt.requested):  # every rank stops at the same iteration
                self.stop_on_signal(clock)
            if cfg.max_iters is not None and self.iteration >= cfg.max_iters:
                break
            out_of_time = (
                cfg.max_minutes is not None and (time.perf_counter() - t_start) / 60 >= cfg.max_minutes
            )
            if dist.any(out_of_time):
                self.say(f"stopping: --max-minutes {cfg.max_minutes} reached", flush=True)
                break
            it = self.iteration + 1
            t0 = time.perf_counter()
            self.policy.take_nonfinite()  # count this iteration's rollouts only (not the evaluation's)
            try:
                vals, summary = self.train_iteration(it)
            except common.IterationAbandoned:  # a stop signal during the rollout: nothing was updated
                self.say(f"{self.interrupt.signame}: iteration {it}'s rollout abandoned", flush=True)
                continue
            except RewardError as e:  # raised before any update: the state is still iteration it - 1
                path = self.checkpoint_now(clock)
                raise common.TrainingStopped(
                    f"{e}. Checkpoint of iteration {self.iteration} written to {path}; "
                    f"resume with --resume {self.run_dir}"
                ) from None
            vals = dist.reduce_metrics(vals)
            if not math.isfinite(vals.get("train/loss", 0.0)):
                raise common.TrainingStopped(
                    f"non-finite loss at iteration {it}; {common.intact_note(self.run_dir)}"
                )
            self.iteration = it
            iter_times.append(time.perf_counter() - t0)
            vals["train/iter_s"] = iter_times[-1]
            self.guard.observe_iteration(it, vals)
            if self.guard.fired is not None:
                vals.update(self.guard.metrics())
            metrics.log(it, clock(), vals)
            self.say(
                f"iter {it:4d} | {summary} | {iter_times[-1]:.1f}s | {clock() / 60:.1f} min", flush=True
            )
            if self.guard.fired is None and it % cfg.eval.every == 0:
                evaluate(it)
            if self.guard.fired is not None:
                self.on_guard(clock, metrics)
                break
            if it % cfg.log.checkpoint_every == 0:
                self.save_checkpoint(it, clock())
        # the run's end: a last evaluation unless this iteration has one, and a checkpoint that records it
        if self.last_eval != self.iteration:
            evaluate(self.iteration)
            self.save_checkpoint(self.iteration, clock())
        else:
            self.checkpoint_now(clock)
        if dist.any(self.interrupt.requested):  # a signal during the last evaluation: the run is whole anyway
            self.stop_on_signal(clock)
        self.pool.shutdown()
        if dist.is_main:
            print(summarise_run(self, metrics_path=metrics.path, minutes=clock() / 60, iter_times=iter_times),
                  flush=True)


def summarise_run(trainer: Trainer, *, metrics_path, minutes: float, iter_times: list[float]) -> str:
    """The verdict a run ends with: the held-out score before -> after (eval-EMA weights, CFG-free), the base
    model with CFG, minutes, seconds per iteration, peak memory, and where the sample grids and the exported
    LoRA are.  Scores come from ``metrics.jsonl`` (a resumed run reports from its first evaluation)."""
    from .export import LORA_DIR, LORA_EMA_DIR

    run_dir, dist, dev = trainer.run_dir, trainer.dist, trainer.policy.device
    rows = []
    if metrics_path is not None and Path(metrics_path).exists():
        rows = common.read_metrics(Path(metrics_path).parent)
    evals = [m for m in rows if m.get("eval/score") is not None]
    if not iter_times:  # a resume that only evaluates: the run's own iterations, from its metrics
        iter_times = [float(m["train/iter_s"]) for m in rows if m.get("train/iter_s") is not None]
    mean_it = sum(iter_times) / len(iter_times) if iter_times else float("nan")
    world = f" x {dist.world} processes" if dist.enabled else ""
    mem = f"{common.peak_memory_mb(dev):.0f} MB ({'CUDA allocator' if dev.type == 'cuda' else 'RSS'})"
    lines = [
        f"done: {trainer.iteration} iterations, {minutes:.1f} min, {mean_it:.2f} s/iteration{world}, "
        f"peak memory {mem}"
    ]
    samples = run_dir / "samples"
    if evals:
        first, last = evals[0], evals[-1]
        what = "GenEval-mini" if "eval/score_partial" in last else f"reward {trainer.cfg.reward}"
        a, b = first["eval/score"], last["eval/score"]
        protocol = first.get("protocol/eval", "CFG-free")
        line = (
            f"held-out score ({what}, eval EMA, {protocol}): {a:.3f} at iteration {first['iteration']} -> "
            f"{b:.3f} at iteration {last['iteration']} ({b - a:+.3f})"
        )
        bases = [m["eval/base_cfg/score"] for m in evals if m.get("eval/base_cfg/score") is not None]
        base = bases[0] if bases else None
        if base is not None:
            line += f"; base model with CFG {trainer.cfg.eval.base_cfg_scale:g}: {base:.3f}"
        lines.append(line)
        grids = [samples / f"iter_{m['iteration']:06d}.png" for m in (first, last)]
        grids = [str(g) for g in dict.fromkeys(grids) if g.exists()]
        if (samples / "base_cfg.png").exists():
            grids.append(f"{samples / 'base_cfg.png'} (base with CFG)")
        lines += _watch_lines(trainer, evals)
        lines.append(f"samples: {', '.join(grids) or samples}")
    else:
        lines.append(f"held-out score: none measured in this run; samples: {samples}")
    if trainer.guard.fired is not None:
        lines.append(trainer.guard.describe())
    lines.append(
        f"LoRA: {run_dir / LORA_DIR} (trained), {run_dir / LORA_EMA_DIR} (eval EMA, the scored weights); "
        f"load with pipe.load_lora_weights(DIR)"
    )
    return "\n".join(lines)


def _watch_lines(trainer: Trainer, evals: list[dict]) -> list[str]:
    """The summary's lines on the training reward against the gold rewards on the held-out samples, and on
    diversity and drift (train.guards, train.diversity): first -> last evaluation, and each gold's best."""

    def span(key, fmt=".4f"):
        rows = [m for m in evals if m.get(key) is not None]
        if not rows:
            return None
        a, b = rows[0], rows[-1]
        return (
            f"{a[key]:{fmt}} at iteration {a['iteration']} -> {b[key]:{fmt}} at iteration {b['iteration']} "
            f"({b[key] - a[key]:+{fmt}})"
        )

    lines = []
    golds = list(trainer.cfg.eval.rewards)
    if golds and span("eval/reward"):
        lines.append(f"training reward {trainer.cfg.reward} on the held-out samples: {span('eval/reward')}")
        for g in golds:
            key = f"eval/gold/{g}"
            rows = [m for m in evals if m.get(key) is not None]
            if rows:
                best = max(rows, key=lambda m: m[key])  # the first of equal values
                lines.append(
                    f"gold reward {g}: {span(key)}; best {best[key]:.4f} at iteration {best['iteration']}"
                )
    div, drift = span("eval/diversity"), span("eval/drift")
    if div or drift:
        feature = next((m["eval/feature"] for m in evals[::-1] if m.get("eval/feature")), "?")
        lines.append(f"diversity ({feature}): {div or 'not measured'}; drift from the base: {drift}")
    return lines


def check_finite_weights(policy: Policy, dist: Dist, iteration: int, run_dir) -> None:
    """Refuse to write a checkpoint whose LoRA weights (``default``, ``old``, eval EMA) hold a NaN/inf: stop
    the run on every rank with a message; the previous checkpoint stays the latest."""
    tensors = {
        "default": policy.trainable_parameters(),
        "old": policy.old_parameters(),
        "eval_ema": policy.eval_ema.shadow,
    }
    bad = []
    for name, ts in tensors.items():
        local = [t.to_local() if hasattr(t, "to_local") else t for t in ts]  # FSDP2 shards
        n = sum(int(not torch.isfinite(t.detach()).all()) for t in local)
        if n:
            bad.append(f"{n} {name}")
    if dist.any(bool(bad)):
        what = ", ".join(bad) if bad else "another rank's shards"
        raise common.TrainingStopped(
            f"refusing to write the checkpoint of iteration {iteration}: LoRA tensors hold NaN/inf ({what}); "
            f"{common.intact_note(common.Path(run_dir))}"
        )


# Options --resume applies: they change how the run is carried out (budgets, threads, device, logging, the
# evaluation and checkpoint cadence, memory-bound micro-batching), not what it trains.  Every other option is
# refused by name when it differs from the run's config.json; config.json itself must match the checkpoint in
# every other field (an edited LoRA rank would not fit the saved tensors).
RESUME_SAFE = frozenset(
    {
        "max_iters",
        "max_minutes",
        "threads",
        "train_threads",
        "device",
        "log.progress",
        "log.loggers",
        "log.checkpoint_every",
        "eval.every",
        "eval.batch",
        "eval.grid_images",
        "sample.rollout_batch",
        "sample.forward_chunk",
        "train.timesteps_per_forward",
        "dist.timeout_s",
        "dist.fsdp_reshard",
        "guard.gold_drop",
        "guard.max_kl",
        "guard.min_diversity",
    }
)
# Recorded but not compared with the checkpoint: where the run lives, and grad_accum, which a resume on
# another world size rescales (see rescale_accumulation).
_NOT_COMPARED = frozenset({"run_dir", "resume", "overwrite", "train.grad_accum"})


def _say_main(*args) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


def resume_config(config_cls, argv: list[str], resume: str, *, say=_say_main):
    """The config of the run in ``resume`` (its ``config.json``) with the options of ``argv`` applied where
    :data:`RESUME_SAFE` allows (each said) -> ``(config, run directory)``.  An option that would change what
    the run trains is refused by name; the run continues in ``resume`` wherever the directory now lives."""
    run_dir = common.Path(resume)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"--resume: expected an existing run directory, got {resume!r} (not a directory)"
        )
    cfg_file = run_dir / "config.json"
    if not cfg_file.exists():
        raise ConfigError(f"--resume: expected {cfg_file} (the run's config), found none")
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{cfg_file}: expected the run's JSON config, got bytes that are not UTF-8 ({e})"
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{cfg_file}: expected the run's JSON config, got invalid JSON ({e.msg} at line {e.lineno}, "
            f"column {e.colno})"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{cfg_file}: expected a JSON object (the run's config), got {type(data).__name__}")
    try:
        cfg = from_dict(config_cls, data)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{cfg_file}: {e}") from None
    recorded = cfg.run_dir
    cfg.resume, cfg.run_dir, cfg.overwrite = None, str(run_dir), False
    flags = {n for n, v in leaf_values(cfg).items() if isinstance(v, bool)}
    applied = []
    for key, raw in cli_pairs(argv, flags=flags):
        name = key.lstrip("-").replace("-", "_")
        if name == "resume":
            continue
        if name == "run_dir":
            if common.Path(raw).resolve() != run_dir.resolve():
                raise ConfigError(
                    f"--run-dir: a resumed run continues in its own directory {run_dir}, got --run-dir {raw}"
                )
            continue
        if name == "overwrite":
            if raw.lower() in ("1", "true", "yes", "on"):
                raise ConfigError("--overwrite: starts a new run; expected it without --resume, got both")
            continue
        if name == "preset":
            if raw != cfg.preset:
                raise ConfigError(
                    f"--preset: cannot change on --resume (the run in {run_dir} uses {cfg.preset!r}, "
                    f"got {raw!r})"
                )
            continue
        before = leaf_values(cfg).get(name)
        set_field(cfg, key, raw)
        after = leaf_values(cfg)[name]
        if after == before:
            continue
        if name not in RESUME_SAFE:
            safe = ", ".join(_opt(n) for n in sorted(RESUME_SAFE & set(leaf_values(cfg))))
            raise ConfigError(
                f"{_opt(name)}: cannot change on --resume: it changes what the run trains (the run in "
                f"{run_dir} has {before!r}, got {after!r}); start a new run for it. --resume applies {safe}"
            )
        applied.append(f"{_opt(name)} {before} -> {after}")
    if recorded and common.Path(recorded).resolve() != run_dir.resolve():
        say(f"resume: {cfg_file} was written in {recorded}; the run continues in {run_dir}")
    if applied:
        say(f"resume: applying {', '.join(applied)}")
    # validate_run's checks of options a new run would ignore pass over a run that started before them
    cfg._resumed = True
    return cfg, run_dir


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def check_resumable(cfg, state: dict, path) -> None:
    """``config.json`` (``cfg``) must be the config the checkpoint at ``path`` was trained with in every
    field that shapes the run (an edited LoRA rank would not fit the saved tensors), and ``--max-iters`` must
    not lie behind it."""
    meta = state.get("meta", state)
    saved = meta.get("config")
    if isinstance(saved, dict):
        then, now = _flat(saved), _flat(to_dict(cfg))
        compared = [n for n in now if n in then and n not in RESUME_SAFE and n not in _NOT_COMPARED]
        diffs = [
            f"{name} is {now[name]!r} there but {then[name]!r} in the checkpoint"
            for name in compared
            if now[name] != then[name]
        ]
        if diffs:
            raise ConfigError(
                f"{common.Path(cfg.run_dir) / 'config.json'}: expected the config the checkpoint {path} was "
                f"trained with, got a different one: {'; '.join(diffs)} (restore it, or start a new run)"
            )
    if cfg.max_iters is not None and cfg.max_iters < meta["iteration"]:
        raise ConfigError(
            f"--max-iters: expected at least the resumed iteration {meta['iteration']} ({path}), "
            f"got {cfg.max_iters}"
        )


def main(argv, *, config_cls, presets: dict, trainer_cls, validate, doc: str) -> int:
    """The command line of a training module; returns the exit code (see the module docstring)."""
    algo = trainer_cls.algo
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_cli(
            config_cls, argv, prog=f"train.{algo}", description=doc.split("\n")[0], presets=presets
        )
        resume_dir = None
        if cfg.resume:
            cfg, resume_dir = resume_config(config_cls, argv, cfg.resume)
        check_finite(cfg)
        validate(cfg)
        if resume_dir is None:  # a resumed run keeps the config it started with
            preset_sample = getattr(presets[cfg.preset](), "sample", None)
            check_sampler_options_used(getattr(cfg, "sample", None), preset_sample)
        validate_guards(cfg, trainer_cls)
        validate_dist(cfg.dist, algo=algo)
        check_world_divides(cfg.sample.prompts_per_iter * cfg.sample.images_per_prompt, launched_world_size())
        if resume_dir is None and cfg.run_dir:
            common.check_new_run_dir(cfg.run_dir, overwrite=cfg.overwrite)
        reward = build_reward(
            cfg.reward,
            weights=cfg.reward_weights,
            aggregation=cfg.reward_aggregation,
            clip_path=cfg.reward_clip_path,
            paths=cfg.reward_paths,
            device=cfg.reward_device,
            workers=cfg.reward_workers,
            timeout=cfg.reward_timeout,
            retries=cfg.reward_retries,
            max_in_flight=cfg.reward_max_in_flight,
            vlm_model=cfg.reward_vlm_model,
        )
        trainer_cls.check_reward(reward)  # e.g. a reward-gradient method refuses a non-differentiable one
        gold = None
        if cfg.eval.rewards:
            gold = build_reward(
                cfg.eval.rewards,
                clip_path=cfg.reward_clip_path,
                paths=cfg.reward_paths,
                device=cfg.reward_device,
                timeout=cfg.reward_timeout,
                retries=cfg.reward_retries,
                max_in_flight=cfg.reward_max_in_flight,
                vlm_model=cfg.reward_vlm_model,
            )
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    dist = Dist.from_env(cfg.dist, cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, dist, reward, algo=algo, resume_dir=resume_dir, trainer_cls=trainer_cls, gold=gold)
    except KeyboardInterrupt:  # Ctrl-C before the loop installed its handler: nothing was trained
        if dist.is_main:
            print("\ninterrupted before training started", file=sys.stderr, flush=True)
        return 130
    except DistributedError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as e:
        err = as_distributed_error(e, dist.rank, dist.world) if dist.enabled else None
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        torch.set_num_threads(threads)
        dist.close()


def rescale_accumulation(cfg, saved_world: int, world: int, say=print) -> bool:
    """Resuming on another world size keeps the global samples per optimizer step
    (``batch_size * grad_accum * world``) by rescaling ``grad_accum`` when it divides; the step sets, and so
    the run, then continue as they would have (up to float reduction order).  train.nft has no
    ``grad_accum``: its ``--train.steps-per-iter`` fixes the step sets whatever the world size."""
    if saved_world == world:
        return False
    tc = cfg.train
    if not hasattr(tc, "grad_accum"):  # train.nft: --train.steps-per-iter does not depend on the world size
        say(
            f"resume: world size {saved_world} -> {world}; "
            f"{tc.steps_per_iter} optimizer step(s) per iteration, as before",
            flush=True,
        )
        return False
    total = tc.grad_accum * saved_world
    if total % world == 0:
        say(
            f"resume: world size {saved_world} -> {world}; "
            f"--train.grad-accum {tc.grad_accum} -> {total // world} "
            f"keeps {tc.batch_size * total} samples per optimizer step",
            flush=True,
        )
        tc.grad_accum = total // world
        return True
    else:
        say(
            f"resume: world size {saved_world} -> {world}; "
            f"{tc.batch_size * total} samples per optimizer step "
            f"cannot be kept (grad_accum {tc.grad_accum} x {saved_world} is not a multiple of {world}): now "
            f"{tc.batch_size * tc.grad_accum * world}",
            flush=True,
        )
        return False


def _no_library_progress_bars() -> None:
    """diffusers' and transformers' loading bars (``Loading pipeline components...``) write carriage returns:
    off when the output is a log file, like the loop's own bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _run(cfg, dist: Dist, reward, *, algo: str, resume_dir, trainer_cls, gold=None) -> int:
    """Everything after the argument checks, on every rank; rank 0 owns the run directory (its lock, held
    until this returns) and the metrics."""
    report = (lambda msg: print(msg, file=sys.stderr, flush=True)) if dist.is_main else (lambda msg: None)
    err, run_dir, lock = None, None, None
    if dist.is_main:
        try:
            run_dir, lock = common.open_run_dir(
                cfg.run_dir, algo=algo, resume=resume_dir, overwrite=cfg.overwrite, report=report
            )
        except (FileNotFoundError, FileExistsError, PermissionError, common.RunDirBusy) as e:
            err = str(e)
    err, run_dir = dist.all_gather_object((err, str(run_dir) if run_dir else None))[0]
    if err:
        report(f"error: {err}")
        return 2
    try:
        return _run_owned(cfg, dist, reward, common.Path(run_dir), resume_dir, trainer_cls, report, gold)
    finally:
        if lock is not None:
            lock.release()


def _run_owned(cfg, dist: Dist, reward, run_dir, resume_dir, trainer_cls, report, gold=None) -> int:
    cfg.run_dir = str(run_dir)
    found = None
    if resume_dir is not None:
        try:
            found = common.find_checkpoint(run_dir, report=report)
            if found is not None:
                check_resumable(cfg, found[1], found[0])
        except (common.CheckpointError, ConfigError) as e:
            report(f"error: {e}")
            return 2
        if found is None:
            report(
                f"resume: no checkpoint under {run_dir / 'checkpoints'} (the run stopped before its first): "
                f"starting it over"
            )
    try:
        if dist.is_main:
            common.atomic_write_text(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
    except common.WriteError as e:
        report(f"error: {e}")
        return 1
    torch.manual_seed(cfg.seed)
    if not sys.stderr.isatty():
        _no_library_progress_bars()
    device = dist.device(cfg.device)
    try:
        policy = build_policy(
            cfg.models,
            preset=cfg.preset,
            model_path=cfg.model,
            device=device,
            seed=cfg.seed,
            prompts=cfg.prompts,
            eval_prompts=cfg.eval_prompts,
            tasks=cfg.tasks,
        )
        wrap_policy(policy, dist, cfg.dist)
        evaluator = Evaluator(cfg.eval, seed=cfg.seed, reward=reward, gold=gold)
        trainer = trainer_cls(cfg, run_dir, policy, reward, evaluator, dist=dist)
    except (ConfigError, ValueError) as e:
        report(f"error: {e}")
        if resume_dir is None and dist.is_main:  # nothing ran: the same directory takes the fixed command
            common.discard_unstarted_run(run_dir)
        return 2
    resume_iter = None
    if found is not None:
        path, state = found
        try:
            trainer.load_state_dict(state)
        except ValueError as e:
            report(f"error: {e}")
            return 2
        except RuntimeError as e:  # tensors that do not fit the model (a distributed failure is re-raised)
            if dist.enabled:
                raise
            report(f"error: --resume: {path} does not fit the model of {run_dir / 'config.json'}: {e}")
            return 2
        if rescale_accumulation(cfg, state.get("meta", state).get("world_size", 1), dist.world, trainer.say):
            if dist.is_main:  # a later --resume reads the rescaled value with this world size
                common.atomic_write_text(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
        resume_iter = trainer.iteration
        trainer.say(f"resumed {run_dir} at iteration {trainer.iteration} ({path.name})", flush=True)
    elif resume_dir is not None:
        resume_iter = -1  # from the start: every row is logged again
    try:
        if dist.is_main:
            metrics = common.MetricsLogger(
                run_dir,
                loggers=cfg.log.loggers,
                config=to_dict(cfg),
                resume_iteration=resume_iter,
                report=report,
            )
        else:
            metrics = common.NullMetricsLogger()
    except common.WriteError as e:
        report(f"error: {e}")
        return 1
    extra = trainer.describe()
    model = f" ({cfg.models.embedded_dir})" if cfg.models.embedded_dir else ""
    procs = f" | {dist.world} processes ({cfg.dist.strategy})" if dist.enabled else ""
    try:
        with common.GracefulInterrupt(verbose=dist.is_main) as interrupt:
            trainer.interrupt = interrupt
            trainer.say(
                f"run dir: {run_dir} | device {device} | preset {cfg.preset}{model} | reward {cfg.reward}"
                f"{' | ' + extra if extra else ''}{procs}",
                flush=True,
            )
            trainer.run(metrics)
    except common.TrainingStopped as e:
        report(f"error: training stopped: {e}")
        return 1
    except common.Interrupted as e:
        trainer.say(str(e), flush=True)
        return common.INTERRUPTED_EXIT
    except OSError as e:  # a failed write (disk full, I/O error): WriteError names the file, others do too
        report(f"error: {e}; {common.intact_note(run_dir)}")
        return 1
    except KeyboardInterrupt as e:  # a second stop signal
        code = e.exit_code if isinstance(e, common.Aborted) else 130
        name = e.args[0] if isinstance(e, common.Aborted) else "SIGINT"
        report(f"\naborted by a second {name}: {common.intact_note(run_dir)}")
        return code
    finally:
        metrics.close()
        trainer.pool.shutdown(wait=False, cancel_futures=True)
        for r in (reward, gold):
            if hasattr(r, "close"):  # --reward-workers' processes, HTTP clients
                r.close()
    return GUARD_EXIT if trainer.guard.fired is not None else 0
