"""The skeleton every online training loop shares (``train.nft``, ``train.grpo``, ``train.ddpo``).

* :class:`RunConfig`: the top-level options (``--preset``, ``--model``, ``--reward``, ``--run-dir``,
  ``--max-minutes``, ``--max-iters``, ``--seed``, ``--resume`` ...) and the ``models`` / ``eval`` / ``log``
  sections; an algorithm's config subclasses it and adds its ``sample`` and ``train`` sections.
* :class:`Trainer`: optimizer, counters, checkpoint state, the iteration loop (stop conditions, reward
  failures, metrics, evaluation, checkpoints, Ctrl-C) and evaluation; an algorithm implements
  :meth:`Trainer.train_iteration` (rollout -> reward -> advantage -> update) and nothing else.
* :func:`main`: the command line: parse, validate before any work, build the policy, resume, run.
  Exit codes: 0 done, 1 training stopped (reward failure, non-finite loss), 2 bad input.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from engine import nvtx_range

from . import common
from .config import ConfigError, from_dict, parse_cli, to_dict
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
from .policy import ModelConfig, Policy, build_policy, check_model_path, check_schedule, read_prompt_file
from .rewards.registry import RewardError, build_reward

__all__ = ["LogConfig", "RunConfig", "validate_run", "check_at_least_one", "Trainer", "main"]


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
        "local diffusers directory (SD3/SD3.5/FLUX pipeline or transformer; UNet for DDPO)"
    )
    prompts: str | None = _h("training prompts for a --model run: a text file, one prompt per line")
    eval_prompts: str | None = _h("held-out prompts for a --model run (default: --prompts)")
    tasks: tuple[str, ...] = field(
        default=(),
        metadata={"help": "embedded default only: GenEval-mini task types to train and evaluate on (all)"},
    )
    reward: str = field(default="geneval_mini", metadata={"help": "reward name(s), comma separated"})
    reward_weights: tuple[float, ...] = field(default=(), metadata={"help": "one weight per reward"})
    reward_aggregation: str = field(default="zmean", metadata={"help": "zmean, min or mean_minus_std"})
    reward_clip_path: str | None = _h("local CLIP directory for the clip_score reward")
    run_dir: str | None = _h("run directory (default: runs/<algorithm>-<timestamp>)")
    resume: str | None = _h("resume the run in this directory")
    max_minutes: float | None = _h("stop after this many minutes of this invocation")
    max_iters: int | None = field(default=100, metadata={"help": "stop after this many iterations in total"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    threads: int = field(
        default=0,
        metadata={"help": "torch intra-op CPU threads for the run (0: torch's default; the tiny presets: 1)"},
    )
    models: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)


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


def validate_run(cfg: RunConfig, *, embedded_presets=("tiny",)) -> None:
    """The checks every loop shares, run before any work: device, and for a ``--model`` run (or a preset other
    than ``embedded_presets``, which run the embedded default) the model directory and the prompt files."""
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: expected auto, cpu or cuda, got {cfg.device!r}")
    if cfg.threads < 0:
        raise ConfigError(f"--threads: expected an integer >= 0 (0: torch's default), got {cfg.threads}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: expected a machine with CUDA for 'cuda', found none")
    check_at_least_one(
        [("--eval.every", cfg.eval.every), ("--log.checkpoint-every", cfg.log.checkpoint_every)]
    )
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
    if not embedded:
        check_model_path(cfg.model, preset=cfg.preset)
        read_prompt_file(cfg.prompts, "--prompts")
        read_prompt_file(cfg.eval_prompts or cfg.prompts, "--eval-prompts")
    validate_eval(cfg.eval)
    check_schedule(None if embedded else cfg.model, cfg.sample.shift)  # the model's scheduler config


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
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
        self.iteration = 0  # iterations completed
        self.opt_step = 0
        self.elapsed_offset = 0.0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    # --- what an algorithm provides -------------------------------------------------------------------------
    def train_iteration(self, it: int) -> tuple[dict, str]:
        """Run iteration ``it`` (rollout, reward, advantage, update) -> ``(metrics, one-line summary)``.
        A reward failure surfaces as :class:`RewardError` before any parameter changes."""
        raise NotImplementedError

    def describe(self) -> str:
        """Extra words for the run header line."""
        return ""

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
        }
        if full:
            state["policy"] = self.policy.adapter_state()
            state["optimizer"] = self.opt.state_dict()
        else:
            state["eval_ema_updates"] = self.policy.eval_ema.num_updates
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
        self.iteration, self.opt_step = state["iteration"], state["opt_step"]
        self.elapsed_offset = state["elapsed_s"]
        common.set_rng_state(state["rng"])
        if "eval_ema_updates" in state:
            self.policy.eval_ema.num_updates = int(state["eval_ema_updates"])
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
        whole."""
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
            return
        state = self.state_dict(elapsed)
        if self.dist.is_main:
            common.save_checkpoint(self.run_dir, iteration, state)
        self.dist.barrier()

    def say(self, *args, **kwargs) -> None:
        """``print`` on rank 0 only."""
        if self.dist.is_main:
            print(*args, **kwargs)

    # --- shared steps ---------------------------------------------------------------------------------------
    def iteration_plan(self, it: int) -> IterationPlan:
        """Iteration ``it``'s global batch (its prompts, ``images_per_prompt`` images each, one rollout seed
        per image, the training order) and this rank's share; drawn from ``(seed, it)`` alone, so a resumed
        run and a run on another world size draw the same (see :mod:`train.distributed`)."""
        sc, tc, seed = self.cfg.sample, self.cfg.train, self.cfg.seed
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
            per_rank_step=tc.batch_size * tc.grad_accum,
            rank=self.dist.rank,
            world=self.dist.world,
        )

    def await_rewards(self, futures) -> tuple[torch.Tensor, dict]:
        """This rank's ``(rewards, components)`` from its reward futures.  A reward failure on any rank raises
        :class:`RewardError` on every rank (never a hang, never a silent zero)."""
        err, out = None, None
        try:
            out = wait_for_rewards(futures)
        except RewardError as e:
            err = str(e)
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
        step, so the parameters never take a NaN."""
        tc = self.cfg.train
        gn = torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip)
        if hasattr(gn, "full_tensor"):  # FSDP2: a replicated DTensor
            gn = gn.full_tensor()
        if not torch.isfinite(gn):
            raise common.TrainingStopped(
                f"non-finite gradient norm ({float(gn)}) at optimizer step {self.opt_step}; "
                f"the last checkpoint "
                f"under {self.run_dir / 'checkpoints'} is intact (resume with --resume {self.run_dir})"
            )
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.opt_step += 1
        self.policy.update_eval_ema(self.opt_step)

    def progress(self, it, desc):
        if not self.cfg.log.progress or not self.dist.is_main:
            return it
        from tqdm.auto import tqdm

        return tqdm(it, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)

    def evaluate(self, it, clock, metrics, base=False) -> None:
        """Held-out evaluation (eval-EMA weights, ``--eval.cfg-scale``); with ``base`` also the base model at
        ``--eval.base-cfg-scale``.  The protocol is logged beside the scores (``protocol/eval``)."""
        shift = self.cfg.sample.shift
        with nvtx_range("eval"), torch.no_grad():
            res = self.evaluator.run(self.policy, it, self.run_dir, shift=shift, dist=self.dist)
            vals = {f"eval/{k}": v for k, v in res.items()}
            vals["protocol/eval"] = self.evaluator.protocol(self.policy)
            if base:
                base_res = self.evaluator.run(
                    self.policy, it, self.run_dir, base_cfg=True, shift=shift, dist=self.dist
                )
                vals.update({f"eval/base_cfg/{k}": v for k, v in base_res.items()})
                vals["protocol/base_cfg"] = self.evaluator.protocol(self.policy, base_cfg=True)
        metrics.log(it, clock(), vals)
        partial = f" | partial {vals['eval/score_partial']:.3f}" if "eval/score_partial" in vals else ""
        extra = f" | base CFG {vals['eval/base_cfg/score']:.3f}" if base else ""
        self.say(
            f"eval {it:4d} | score {vals['eval/score']:.3f}{partial}{extra} | {vals['protocol/eval']}",
            flush=True,
        )

    # --- the loop -------------------------------------------------------------------------------------------
    def run(self, metrics: common.MetricsLogger) -> None:
        cfg, dist = self.cfg, self.dist
        clock = common.Stopwatch(self.elapsed_offset)
        t_start = time.perf_counter()
        iter_times = []
        if self.iteration == 0:
            self.evaluate(0, clock, metrics, base=True)
        with common.GracefulInterrupt() as interrupt:
            while cfg.max_iters is None or self.iteration < cfg.max_iters:
                out_of_time = (
                    cfg.max_minutes is not None and (time.perf_counter() - t_start) / 60 >= cfg.max_minutes
                )
                if dist.any(out_of_time):  # every rank stops at the same iteration
                    self.say(f"stopping: --max-minutes {cfg.max_minutes} reached", flush=True)
                    break
                it = self.iteration + 1
                t0 = time.perf_counter()
                try:
                    vals, summary = self.train_iteration(it)
                except RewardError as e:  # raised before any update: the state is still iteration it - 1
                    self.save_checkpoint(self.iteration, clock())
                    raise common.TrainingStopped(
                        f"{e}. Checkpoint of iteration {self.iteration} written to "
                        f"{self.run_dir / 'checkpoints'}; resume with --resume {self.run_dir}"
                    ) from None
                vals = dist.reduce_metrics(vals)
                if not math.isfinite(vals.get("train/loss", 0.0)):
                    raise common.TrainingStopped(
                        f"non-finite loss at iteration {it}; the last checkpoint under "
                        f"{self.run_dir / 'checkpoints'} is intact"
                    )
                self.iteration = it
                iter_times.append(time.perf_counter() - t0)
                vals["train/iter_s"] = iter_times[-1]
                metrics.log(it, clock(), vals)
                self.say(
                    f"iter {it:4d} | {summary} | {iter_times[-1]:.1f}s | {clock() / 60:.1f} min", flush=True
                )
                if it % cfg.eval.every == 0:
                    self.evaluate(it, clock, metrics)
                stop = dist.any(interrupt.requested)
                if it % cfg.log.checkpoint_every == 0 or stop:
                    self.save_checkpoint(it, clock())
                if stop:
                    self.say(
                        f"interrupted: checkpoint of iteration {it} written; "
                        f"resume with --resume {self.run_dir}"
                    )
                    break
            # still under the Ctrl-C handler: a SIGINT here only asks for what happens anyway
            if self.iteration % cfg.eval.every != 0:
                self.evaluate(self.iteration, clock, metrics)
            self.save_checkpoint(self.iteration, clock())
        self.pool.shutdown()
        dev = self.policy.device
        mean_it = sum(iter_times) / len(iter_times) if iter_times else float("nan")
        world = f" x {dist.world} processes" if dist.enabled else ""
        self.say(
            f"done: {self.iteration} iterations, {clock() / 60:.1f} min, {mean_it:.2f} s/iteration{world}, "
            f"peak memory {common.peak_memory_mb(dev):.0f} MB "
            f"({'CUDA allocator' if dev.type == 'cuda' else 'RSS'})",
            flush=True,
        )


def main(argv, *, config_cls, presets: dict, trainer_cls, validate, doc: str) -> int:
    """The command line of a training module: 0 done, 1 training stopped, 2 bad input (before any work)."""
    algo = trainer_cls.algo
    try:
        cfg = parse_cli(
            config_cls, argv, prog=f"train.{algo}", description=doc.split("\n")[0], presets=presets
        )
        resume_dir = None
        if cfg.resume:
            cfg_file = common.Path(cfg.resume) / "config.json"
            if not cfg_file.exists():
                raise ConfigError(f"--resume: expected {cfg_file}, found none")
            overrides = {"max_iters": cfg.max_iters, "max_minutes": cfg.max_minutes}
            cfg = dataclasses.replace(from_dict(config_cls, json.loads(cfg_file.read_text())), **overrides)
            cfg.resume = None
            resume_dir = common.Path(cfg.run_dir)
        validate(cfg)
        validate_dist(cfg.dist, algo=algo)
        check_world_divides(cfg.sample.prompts_per_iter * cfg.sample.images_per_prompt, launched_world_size())
        reward = build_reward(
            cfg.reward,
            weights=cfg.reward_weights,
            aggregation=cfg.reward_aggregation,
            clip_path=cfg.reward_clip_path,
        )
    except (ConfigError, ValueError, FileNotFoundError, PermissionError) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    dist = Dist.from_env(cfg.dist, cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, dist, reward, algo=algo, resume_dir=resume_dir, trainer_cls=trainer_cls)
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
    the run, then continue as they would have (up to float reduction order)."""
    if saved_world == world:
        return False
    tc = cfg.train
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


def _run(cfg, dist: Dist, reward, *, algo: str, resume_dir, trainer_cls) -> int:
    """Everything after the argument checks, on every rank; rank 0 owns the run directory and the metrics."""
    err, run_dir = None, None
    if dist.is_main:
        try:
            run_dir = common.prepare_run_dir(
                cfg.run_dir, algo=algo, resume=str(resume_dir) if resume_dir else None
            )
        except (FileNotFoundError, PermissionError) as e:
            err = str(e)
    err, run_dir = dist.all_gather_object((err, str(run_dir) if run_dir else None))[0]
    if err:
        if dist.is_main:
            print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir = common.Path(run_dir)
    cfg.run_dir = str(run_dir)
    if dist.is_main:
        common.atomic_write_text(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
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
        evaluator = Evaluator(cfg.eval, seed=cfg.seed, reward=reward)
        trainer = trainer_cls(cfg, run_dir, policy, reward, evaluator, dist=dist)
    except (ConfigError, ValueError) as e:
        if dist.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    resume_iter = None
    if resume_dir is not None:
        try:
            state = common.load_checkpoint(run_dir)
            trainer.load_state_dict(state)
        except ValueError as e:
            if dist.is_main:
                print(f"error: {e}", file=sys.stderr)
            return 2
        if rescale_accumulation(cfg, state.get("meta", state).get("world_size", 1), dist.world, trainer.say):
            if dist.is_main:  # a later --resume reads the rescaled value with this world size
                common.atomic_write_text(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
        resume_iter = trainer.iteration
        trainer.say(f"resumed {run_dir} at iteration {trainer.iteration}", flush=True)
    if dist.is_main:
        metrics = common.MetricsLogger(
            run_dir, loggers=cfg.log.loggers, config=to_dict(cfg), resume_iteration=resume_iter
        )
    else:
        metrics = common.NullMetricsLogger()
    extra = trainer.describe()
    procs = f" | {dist.world} processes ({cfg.dist.strategy})" if dist.enabled else ""
    trainer.say(
        f"run dir: {run_dir} | device {device} | preset {cfg.preset} | reward {cfg.reward}"
        f"{' | ' + extra if extra else ''}{procs}",
        flush=True,
    )
    try:
        trainer.run(metrics)
    except common.TrainingStopped as e:
        if dist.is_main:
            print(f"error: training stopped: {e}", file=sys.stderr)
        return 1
    finally:
        metrics.close()
    return 0
