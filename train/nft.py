"""DiffusionNFT (arXiv 2509.16117), exactly as SPEC §2 defines it.  ``python -m train.nft --help``.

Per iteration:
  1. rollout with the ``old`` adapter through the engine (any solver; default DPM-Solver++ 2M, 10 steps,
     CFG-free), keeping only clean samples, conditioning and the sampler's sigmas; rewards are computed on
     a worker thread while the next rollout micro-batch runs;
  2. per-prompt advantages with the global std;  3. clip and map to ``r``;
  4. for every sample a random ``int(0.99 N)`` of its sampler timesteps, fresh noise, ``v_old`` (old adapter),
     ``v`` (trainable ``default`` adapter), ``v_ref`` (adapters disabled) when ``kl_coef > 0``;
  5-6. the fused ``kernels.nft_loss`` (positive / implicit-negative blend, adaptive weighting);
  gradient accumulation, clipping, AdamW;  7. old-adapter EMA; eval EMA; evaluation; checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

import kernels
from engine.profiling import nvtx_range
from models.lora import old_adapter_decay

from . import common
from .advantages import group_advantages, nft_optimality
from .config import ConfigError, from_dict, parse_cli, to_dict
from .evaluation import EvalConfig, Evaluator
from .policy import ModelConfig, Policy, build_policy, check_model_path, read_prompt_file
from .rewards.registry import RewardError, build_reward


def _h(text):
    return field(default=None, metadata={"help": text})


@dataclass
class SampleConfig:
    solver: str = field(default="dpm2", metadata={"help": "rollout solver: dpm2, euler, flow-sde, cps"})
    num_steps: int = field(default=10, metadata={"help": "sampler steps per rollout"})
    shift: float = field(default=3.0, metadata={"help": "SD3 sigma-schedule shift"})
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level (flow-sde / cps solvers)"})
    guidance_scale: float = field(default=1.0, metadata={"help": "CFG scale at rollout (1 = CFG-free)"})
    prompts_per_iter: int = field(default=16, metadata={"help": "distinct prompts per iteration"})
    images_per_prompt: int = field(default=8, metadata={"help": "group size K: images per prompt"})
    rollout_batch: int = field(default=64, metadata={"help": "images per rollout micro-batch"})


@dataclass
class TrainConfig:
    beta: float = field(default=1.0, metadata={"help": "NFT beta (implicit-policy strength)"})
    adv_clip_max: float = field(default=5.0, metadata={"help": "advantage clip m"})
    adv_std: str = field(default="global", metadata={"help": "advantage std: global or group"})
    timestep_fraction: float = field(default=0.99, metadata={"help": "fraction of sampler timesteps trained"})
    weighting: str = field(default="adaptive", metadata={"help": "loss weighting: adaptive or none"})
    kl_coef: float = field(default=1e-4, metadata={"help": "KL-to-reference coefficient (0: no v_ref pass)"})
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    batch_size: int = field(default=32, metadata={"help": "training micro-batch (images)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    old_flat: int = field(default=0, metadata={"help": "old-adapter EMA: steps before decay starts"})
    old_uprate: float = field(default=1e-3, metadata={"help": "old-adapter EMA: decay growth per step"})
    old_uphold: float = field(default=0.5, metadata={"help": "old-adapter EMA: maximum decay"})


@dataclass
class LogConfig:
    loggers: tuple[str, ...] = field(default=(), metadata={"help": "extra loggers: tensorboard, wandb"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars"})
    checkpoint_every: int = field(default=5, metadata={"help": "iterations between checkpoints"})


@dataclass
class NFTConfig:
    preset: str = field(default="tiny", metadata={"help": "named setup: tiny (embedded default) or sd3.5-m"})
    model: str | None = _h("local diffusers directory (SD3/SD3.5/FLUX pipeline or transformer)")
    prompts: str | None = _h("training prompts for a --model run: a text file, one prompt per line")
    eval_prompts: str | None = _h("held-out prompts for a --model run (default: --prompts)")
    reward: str = field(default="geneval_mini", metadata={"help": "reward name(s), comma separated"})
    reward_weights: tuple[float, ...] = field(default=(), metadata={"help": "one weight per reward"})
    reward_aggregation: str = field(default="zmean", metadata={"help": "zmean, min or mean_minus_std"})
    reward_clip_path: str | None = _h("local CLIP directory for the clip_score reward")
    run_dir: str | None = _h("run directory (default: runs/nft-<timestamp>)")
    resume: str | None = _h("resume the run in this directory")
    max_minutes: float | None = _h("stop after this many minutes of this invocation")
    max_iters: int | None = field(default=100, metadata={"help": "stop after this many iterations in total"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    models: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


def preset_tiny() -> NFTConfig:
    """The embedded default on a CPU (see README: tuned so the held-out score climbs within minutes)."""
    cfg = NFTConfig()
    cfg.train.kl_coef = 0.0
    return cfg


def preset_sd35m() -> NFTConfig:
    """SPEC §2.8 reference recipe for SD3.5-M at 512 px (pass the local directory with --model)."""
    cfg = NFTConfig(preset="sd3.5-m", reward="clip_score", max_iters=1000)
    cfg.models = ModelConfig(dtype="bfloat16", lora_rank=32, lora_alpha=64.0)
    cfg.sample = SampleConfig(
        solver="dpm2", num_steps=10, shift=3.0, prompts_per_iter=48, images_per_prompt=24, rollout_batch=16
    )
    cfg.train = TrainConfig(kl_coef=1e-4, lr=3e-4, batch_size=8, grad_accum=12)
    cfg.eval = EvalConfig(every=50, num_steps=40, cfg_scale=4.5)
    return cfg


PRESETS = {"tiny": preset_tiny, "sd3.5-m": preset_sd35m}


# ------------------------------------------------------------------------------------------------------------
def validate(cfg: NFTConfig) -> None:
    """Every check that can fail fast runs before any work starts."""
    if cfg.sample.solver not in ("dpm2", "euler", "flow-sde", "cps"):
        raise ConfigError(
            f"--sample.solver: expected dpm2, euler, flow-sde or cps, got {cfg.sample.solver!r}"
        )
    for name, val in (
        ("--sample.num-steps", cfg.sample.num_steps),
        ("--sample.prompts-per-iter", cfg.sample.prompts_per_iter),
        ("--sample.images-per-prompt", cfg.sample.images_per_prompt),
        ("--sample.rollout-batch", cfg.sample.rollout_batch),
        ("--train.batch-size", cfg.train.batch_size),
        ("--train.grad-accum", cfg.train.grad_accum),
    ):
        if val < 1:
            raise ConfigError(f"{name}: expected an integer >= 1, got {val}")
    if cfg.train.beta <= 0:
        raise ConfigError(f"--train.beta: expected a value > 0, got {cfg.train.beta}")
    if cfg.train.weighting not in ("adaptive", "none"):
        raise ConfigError(f"--train.weighting: expected adaptive or none, got {cfg.train.weighting!r}")
    if cfg.train.adv_std not in ("global", "group"):
        raise ConfigError(f"--train.adv-std: expected global or group, got {cfg.train.adv_std!r}")
    if not 0 < cfg.train.timestep_fraction <= 1:
        raise ConfigError(
            f"--train.timestep-fraction: expected a value in (0, 1], got {cfg.train.timestep_fraction}"
        )
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: expected auto, cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: expected a machine with CUDA for 'cuda', found none")
    if cfg.preset != "tiny" or cfg.model:
        check_model_path(cfg.model, preset=cfg.preset)
        read_prompt_file(cfg.prompts, "--prompts")
        read_prompt_file(cfg.eval_prompts or cfg.prompts, "--eval-prompts")


def old_decay(step: int, tc: TrainConfig) -> float:
    """SPEC §2 step 7: ``d = min(max(step - flat, 0) * uprate, uphold)``, ``step`` = optimizer steps so far."""
    return old_adapter_decay(step, flat=tc.old_flat, uprate=tc.old_uprate, uphold=tc.old_uphold)


# ------------------------------------------------------------------------------------------------------------
class NFTTrainer:
    def __init__(self, cfg: NFTConfig, run_dir, policy: Policy, reward, evaluator: Evaluator):
        self.cfg, self.run_dir, self.policy, self.reward, self.evaluator = (
            cfg,
            run_dir,
            policy,
            reward,
            evaluator,
        )
        tc = cfg.train
        self.params = policy.trainable_parameters()
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
        self.iteration = 0  # iterations completed
        self.opt_step = 0
        self.elapsed_offset = 0.0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    # --- state -----------------------------------------------------------------------------------------------
    def state_dict(self, elapsed: float) -> dict:
        return {
            "iteration": self.iteration,
            "opt_step": self.opt_step,
            "elapsed_s": elapsed,
            "policy": self.policy.adapter_state(),
            "optimizer": self.opt.state_dict(),
            "rng": common.rng_state(),
            "config": to_dict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.opt_step = state["iteration"], state["opt_step"]
        self.elapsed_offset = state["elapsed_s"]
        self.policy.load_adapter_state(state["policy"])
        self.opt.load_state_dict(state["optimizer"])
        common.set_rng_state(state["rng"])

    # --- one iteration ---------------------------------------------------------------------------------------
    def rollout_and_reward(self, it: int):
        """Steps 1-3: rollouts with the old adapter; rewards overlap the next rollout micro-batch."""
        cfg, sc = self.cfg, self.cfg.sample
        prompts = self.policy.sample_train_prompts(
            sc.prompts_per_iter, common.derive_seed(cfg.seed, it, "prompts")
        )
        group_ids = torch.arange(len(prompts)).repeat_interleave(sc.images_per_prompt)
        batch_prompts = [prompts[i] for i in group_ids.tolist()]
        seeds = torch.tensor(
            [common.derive_seed(cfg.seed, it, "rollout", i) for i in range(len(batch_prompts))]
        )
        x0s, futures = [], []
        with nvtx_range("rollout"), self.policy.adapter("old"), torch.no_grad():
            for lo in self.progress(range(0, len(batch_prompts), sc.rollout_batch), "rollout"):
                mb = batch_prompts[lo : lo + sc.rollout_batch]
                x0 = self.policy.sample(
                    mb,
                    seeds[lo : lo + sc.rollout_batch],
                    solver=sc.solver,
                    num_steps=sc.num_steps,
                    shift=sc.shift,
                    noise_level=sc.noise_level,
                    guidance_scale=sc.guidance_scale,
                )
                x0s.append(x0)
                images = self.policy.decode(x0)
                futures.append(self.pool.submit(self.reward, images.cpu(), mb))
        with nvtx_range("reward"):
            results = [f.result() for f in futures]  # re-raises a RewardError from the worker
        rewards = torch.cat([r for r, _ in results])
        comps = {k: torch.cat([c[k] for _, c in results]) for k in results[0][1]}
        return batch_prompts, group_ids, torch.cat(x0s), rewards, comps

    def train_on(self, it: int, prompts, x0: torch.Tensor, r: torch.Tensor) -> dict:
        """Steps 4-6 over every sample, then the optimizer; returns loss/kl means."""
        cfg, tc, sc = self.cfg, self.cfg.train, self.cfg.sample
        dev = x0.device
        n = x0.shape[0]
        sigmas = self.policy.sigmas(sc.num_steps, sc.shift).to(dev)  # [N+1], last 0
        n_train = max(1, int(tc.timestep_fraction * sc.num_steps))
        g = common.iteration_generator(cfg.seed, it, "train")
        perm = torch.randperm(n, generator=g)  # shuffled sample order
        t_idx = torch.stack(
            [torch.randperm(sc.num_steps, generator=g)[:n_train] for _ in range(n)]
        )  # [n, n_train]
        g_noise = common.iteration_generator(cfg.seed, it, "train-noise", device=dev)
        loss_sum, kl_sum, kl_count, micro = 0.0, 0.0, 0, 0
        batches = [perm[lo : lo + tc.batch_size] for lo in range(0, n, tc.batch_size)]
        self.opt.zero_grad(set_to_none=True)
        for bi, idx in enumerate(self.progress(batches, "train")):
            cond = self.policy.encode([prompts[i] for i in idx.tolist()])
            xb, rb = x0[idx], r[idx].to(dev)
            for j in range(n_train):
                t = sigmas[t_idx[idx, j].to(dev)]
                noise = torch.randn(xb.shape, generator=g_noise, device=dev, dtype=torch.float32).to(xb.dtype)
                x_t = kernels.interpolate(xb, noise, t)
                ts = 1000.0 * t
                with torch.no_grad():
                    with self.policy.adapter("old"):
                        v_old = self.policy.denoiser(x_t, ts, cond)
                    want_ref = tc.kl_coef > 0 or (bi == 0 and j == 0)
                    v_ref = None
                    if want_ref:
                        with self.policy.adapters_disabled():
                            v_ref = self.policy.denoiser(x_t, ts, cond)
                with self.policy.adapter("default"):
                    v = self.policy.denoiser(x_t, ts, cond)
                loss = kernels.nft_loss(
                    v,
                    v_old,
                    xb,
                    noise,
                    t,
                    rb,
                    beta=tc.beta,
                    adv_clip_max=tc.adv_clip_max,
                    weighting=tc.weighting,
                    v_ref=v_ref if tc.kl_coef > 0 else None,
                    kl_coef=tc.kl_coef,
                )
                (loss / (n_train * tc.grad_accum)).backward()
                loss_sum += float(loss.detach())
                if v_ref is not None:
                    kl_sum += float(((v.detach().float() - v_ref.float()) ** 2).mean())
                    kl_count += 1
                micro += 1
            if (bi + 1) % tc.grad_accum == 0 or bi + 1 == len(batches):
                self.optimizer_step()
        return {"train/loss": loss_sum / max(micro, 1), "train/kl": kl_sum / max(kl_count, 1)}

    def optimizer_step(self) -> None:
        tc = self.cfg.train
        gn = torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip)
        if not torch.isfinite(gn):
            raise common.TrainingStopped(
                f"non-finite gradient norm ({float(gn)}) at optimizer step {self.opt_step}"
            )
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.opt_step += 1
        self.policy.update_eval_ema(self.opt_step)

    def progress(self, it, desc):
        if not self.cfg.log.progress:
            return it
        from tqdm.auto import tqdm

        return tqdm(it, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)

    # --- the loop --------------------------------------------------------------------------------------------
    def run(self, metrics: common.MetricsLogger) -> None:
        cfg = self.cfg
        clock = common.Stopwatch(self.elapsed_offset)
        t_start = time.perf_counter()
        iter_times = []
        if self.iteration == 0:
            self.evaluate(0, clock, metrics, base=True)
        with common.GracefulInterrupt() as interrupt:
            while cfg.max_iters is None or self.iteration < cfg.max_iters:
                if cfg.max_minutes is not None and (time.perf_counter() - t_start) / 60 >= cfg.max_minutes:
                    print(f"stopping: --max-minutes {cfg.max_minutes} reached", flush=True)
                    break
                it = self.iteration + 1
                t0 = time.perf_counter()
                try:
                    prompts, group_ids, x0, rewards, comps = self.rollout_and_reward(it)
                except RewardError as e:
                    common.save_checkpoint(self.run_dir, self.iteration, self.state_dict(clock()))
                    raise common.TrainingStopped(
                        f"{e}. Checkpoint of iteration {self.iteration} written to "
                        f"{self.run_dir / 'checkpoints'}; resume with --resume {self.run_dir}"
                    )
                adv = group_advantages(rewards, group_ids, std=cfg.train.adv_std)
                r = nft_optimality(adv, cfg.train.adv_clip_max)
                with nvtx_range("train"):
                    stats = self.train_on(it, prompts, x0, r)
                if not math.isfinite(stats["train/loss"]):
                    common.save_checkpoint(self.run_dir, self.iteration, self.state_dict(clock()))
                    raise common.TrainingStopped(f"non-finite loss at iteration {it}")
                with torch.no_grad():
                    self.policy.ema_old(old_decay(self.opt_step, cfg.train))
                self.iteration = it
                iter_times.append(time.perf_counter() - t0)
                vals = {
                    "train/reward_mean": rewards.mean(),
                    "train/reward_std": rewards.std(unbiased=False),
                    **stats,
                    "train/r_mean": r.mean(),
                    "train/old_decay": old_decay(self.opt_step, cfg.train),
                    "train/iter_s": iter_times[-1],
                }
                if len(comps) > 1:
                    vals.update({f"train/reward/{k}": v.mean() for k, v in comps.items()})
                metrics.log(it, clock(), vals)
                print(
                    f"iter {it:4d} | reward {float(rewards.mean()):.3f} | loss {stats['train/loss']:.4f} | "
                    f"kl {stats['train/kl']:.2e} | {iter_times[-1]:.1f}s | {clock() / 60:.1f} min",
                    flush=True,
                )
                if it % cfg.eval.every == 0:
                    self.evaluate(it, clock, metrics)
                if it % cfg.log.checkpoint_every == 0 or interrupt.requested:
                    common.save_checkpoint(self.run_dir, it, self.state_dict(clock()))
                if interrupt.requested:
                    print(
                        f"interrupted: checkpoint of iteration {it} written; resume with --resume {self.run_dir}"
                    )
                    break
        if self.iteration % cfg.eval.every != 0:
            self.evaluate(self.iteration, clock, metrics)
        common.save_checkpoint(self.run_dir, self.iteration, self.state_dict(clock()))
        self.pool.shutdown()
        dev = self.policy.device
        mean_it = sum(iter_times) / len(iter_times) if iter_times else float("nan")
        print(
            f"done: {self.iteration} iterations, {clock() / 60:.1f} min, {mean_it:.2f} s/iteration, "
            f"peak memory {common.peak_memory_mb(dev):.0f} MB ({'CUDA allocator' if dev.type == 'cuda' else 'RSS'})",
            flush=True,
        )

    def evaluate(self, it, clock, metrics, base=False):
        with nvtx_range("eval"), torch.no_grad():
            res = self.evaluator.run(self.policy, it, self.run_dir, shift=self.cfg.sample.shift)
            vals = {f"eval/{k}": v for k, v in res.items()}
            if base:
                base_res = self.evaluator.run(
                    self.policy, it, self.run_dir, base_cfg=True, shift=self.cfg.sample.shift
                )
                vals.update({f"eval/base_cfg/{k}": v for k, v in base_res.items()})
        metrics.log(it, clock(), vals)
        extra = f" | base CFG {vals['eval/base_cfg/score']:.3f}" if base else ""
        print(
            f"eval {it:4d} | score {vals['eval/score']:.3f} | partial {vals.get('eval/score_partial', float('nan')):.3f}"
            f"{extra}",
            flush=True,
        )


# ------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    try:
        cfg = parse_cli(
            NFTConfig, argv, prog="train.nft", description=__doc__.split("\n")[0], presets=PRESETS
        )
        if cfg.resume:
            saved = (
                json.loads((common.Path(cfg.resume) / "config.json").read_text())
                if (common.Path(cfg.resume) / "config.json").exists()
                else None
            )
            if saved is None:
                raise ConfigError(f"--resume: expected {cfg.resume}/config.json, found none")
            overrides = {"max_iters": cfg.max_iters, "max_minutes": cfg.max_minutes}
            cfg = from_dict(NFTConfig, saved)
            cfg.resume = saved.get("resume") or None
            cfg = dataclasses.replace(cfg, **overrides)
            resume_dir = common.Path(cfg.run_dir)
        else:
            resume_dir = None
        validate(cfg)
        reward = build_reward(
            cfg.reward,
            weights=cfg.reward_weights,
            aggregation=cfg.reward_aggregation,
            clip_path=cfg.reward_clip_path,
        )
        run_dir = common.prepare_run_dir(
            cfg.run_dir, algo="nft", resume=str(resume_dir) if resume_dir else None
        )
    except (ConfigError, ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg.run_dir = str(run_dir)
    common.atomic_write_text(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    policy = build_policy(
        cfg.models,
        preset=cfg.preset,
        model_path=cfg.model,
        device=device,
        seed=cfg.seed,
        prompts=cfg.prompts,
        eval_prompts=cfg.eval_prompts,
    )
    evaluator = Evaluator(cfg.eval, seed=cfg.seed, reward=reward)
    trainer = NFTTrainer(cfg, run_dir, policy, reward, evaluator)
    resume_iter = None
    if resume_dir is not None:
        trainer.load_state_dict(common.load_checkpoint(run_dir))
        resume_iter = trainer.iteration
        print(f"resumed {run_dir} at iteration {trainer.iteration}", flush=True)
    metrics = common.MetricsLogger(
        run_dir, loggers=cfg.log.loggers, config=to_dict(cfg), resume_iteration=resume_iter
    )
    print(f"run dir: {run_dir} | device {device} | preset {cfg.preset} | reward {cfg.reward}", flush=True)
    try:
        trainer.run(metrics)
    except common.TrainingStopped as e:
        print(f"error: training stopped: {e}", file=sys.stderr)
        return 1
    finally:
        metrics.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
