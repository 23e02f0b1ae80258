"""DiffusionNFT (arXiv 2509.16117), exactly as math.md §2 defines it.  ``python -m train.nft --help``.

Per iteration:
  1. rollout with the ``old`` adapter through the engine (any solver; default DPM-Solver++ 2M, 10 steps,
     CFG-free), keeping only clean samples, conditioning and the sampler's sigmas; rewards are computed on
     a worker thread while the next rollout micro-batch runs;
  2. per-prompt advantages with the global std;  3. clip and map to ``r``;
  4. for every sample a random ``int(0.99 N)`` of its sampler timesteps, fresh noise, ``v_old`` (old adapter),
     ``v`` (trainable ``default`` adapter), ``v_ref`` (adapters disabled) when ``kl_coef > 0``;
  5-6. the fused ``kernels.nft_loss`` (positive / implicit-negative blend, adaptive weighting);
  gradient accumulation, clipping, AdamW;  7. old-adapter EMA; eval EMA; evaluation; checkpoint.

Optimizer steps per iteration (``--train.steps-per-iter``, default 1, as the reference): the iteration's
samples (in the global training order) are split into that many equal steps; every sample and trained
timestep of a step accumulates into it, in micro-batches of ``--train.batch-size`` per process, and the
accumulated gradient is the mean over the step's samples and timesteps, whatever the world size.  The
old-adapter decay and the eval EMA count these steps (NVlabs/DiffusionNFT@24af5554 scripts/train_nft_sd3.py:
``effective_grad_accum_steps = gradient_accumulation_steps * num_train_timesteps``, with
``gradient_accumulation_steps`` sized by config/nft.py so that an epoch takes ``gradient_step_per_epoch``
steps: 1, or 2 for OCR).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

import kernels
from engine.profiling import nvtx_range
from models.lora import old_adapter_decay

from . import common
from .advantages import group_advantages, nft_optimality
from .config import ConfigError
from .distributed import launched_world_size
from .evaluation import EvalConfig
from .loop import RunConfig, Trainer, check_at_least_one, validate_run
from .loop import main as loop_main
from .policy import ModelConfig


@dataclass
class SampleConfig:
    solver: str = field(default="dpm2", metadata={"help": "rollout solver: dpm2, euler, flow-sde, cps"})
    num_steps: int = field(default=10, metadata={"help": "sampler steps per rollout"})
    shift: float | None = field(
        default=None,
        metadata={
            "help": "sigma-schedule shift; none: the model's diffusers scheduler config (SD3/SD3.5 and the "
            "embedded default: 3.0); a value overrides the config's static shift (not under dynamic shifting)"
        },
    )
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
    batch_size: int = field(
        default=32, metadata={"help": "training micro-batch per process (images; memory, not the step size)"}
    )
    steps_per_iter: int = field(
        default=1,
        metadata={
            "help": "optimizer steps per iteration: the iteration's images split evenly into this many "
            "gradient-accumulated steps, whatever --train.batch-size and the world size (reference: 1; "
            "its OCR recipe: 2); must divide the images per iteration / world size"
        },
    )
    timesteps_per_forward: int = field(
        default=1,
        metadata={
            "help": "trained timesteps stacked into one forward and backward (1: one at a time, as the "
            "reference; 0: all of a micro-batch's); the same gradient in another float order, for speed "
            "where the model's ops are small (the tiny preset: 0), at that many times the activation memory"
        },
    )
    old_flat: int = field(default=0, metadata={"help": "old-adapter EMA: steps before decay starts"})
    old_uprate: float = field(default=1e-3, metadata={"help": "old-adapter EMA: decay growth per step"})
    old_uphold: float = field(default=0.5, metadata={"help": "old-adapter EMA: maximum decay"})


@dataclass
class NFTConfig(RunConfig):
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def preset_tiny() -> NFTConfig:
    """The embedded default on a CPU: 16 prompts x 8 images per iteration, 10 dpm2 steps, LoRA rank 32 on a
    64-wide model (nearly full rank), a higher learning rate than SD3.5-M's (1.5e-3: in 14-minute runs 3e-3
    peaked lower on an earlier checkpoint and 6e-3 lost score on its stage-1 weights), no KL term (it costs a
    third forward per sample-timestep); evaluation on 192 held-out prompts every 10 iterations.  Threads: one
    for the rollouts, beside the reward worker on the other core (two there made the 8-block model's
    iteration 21.2 s instead of 12.9 s), two for training (``--train-threads 2``: the worker is idle then),
    with a micro-batch's 9 trained timesteps stacked into one forward (``--train.timesteps-per-forward 0``:
    the same gradient in another float order).  On the 12-block default that makes an iteration 15 s instead
    of 27-28 s with one thread and one timestep per forward, at 1.8 GB peak memory instead of 0.8 (2-core
    machine, 2026-12-05; docs/results.md).

    Deliberate difference from the reference recipe: 8 optimizer steps of 16 images per iteration
    (``--train.steps-per-iter 8``), not one.  The default run's learning rate and its 15-minute target were
    calibrated with these 8 steps (the loop took one step per 16-image micro-batch until 2026-12-03); one
    step per iteration would give the ~60 iterations that fit in its budget 60 updates instead of ~500.  The
    reference takes one step per iteration over 1152 images (48 prompts x 24), as ``sd3.5-m`` does.

    A 13-minute budget (``--max-minutes``; ``--max-iters`` 100 stays the cap) makes the bare command end with
    its verdict within 15 minutes on two cores: the budget is checked before each iteration and covers the
    first evaluation (192 held-out prompts, and once more with the base model and CFG: 19 s); past it come
    at most one iteration (15-28 s) with its periodic evaluation, the final evaluation (11 s), the checkpoint
    and the LoRA export, and the start-up before the clock (10-20 s): measured on a loaded two-core machine.
    """
    cfg = NFTConfig()
    cfg.threads = 1
    cfg.max_minutes = 13.0
    cfg.models.lora_rank, cfg.models.lora_alpha = 32, 32.0
    cfg.train.lr, cfg.train.batch_size, cfg.train.kl_coef = 1.5e-3, 16, 0.0
    cfg.train.steps_per_iter = 8
    cfg.train.timesteps_per_forward = 0
    cfg.train_threads = 2
    cfg.eval.every = 10
    return cfg


def preset_sd35m() -> NFTConfig:
    """math.md §2.8 reference recipe for SD3.5-M at 512 px (pass the local directory with --model): one
    optimizer step per iteration over its 48 x 24 = 1152 images and 9 trained timesteps each, on one process
    or on any world size dividing 1152 (NVlabs/DiffusionNFT@24af5554 config/nft.py, ``gradient_step_per_epoch
    = 1``; its OCR recipe: ``--train.steps-per-iter 2 --train.old-flat 75 --train.old-uprate 0.0075
    --train.old-uphold 0.999 --train.beta 0.1``).  ``--train.batch-size 8`` is the micro-batch per process.
    Evaluation as the reference's: a 40-step Euler ODE, CFG-free (NVlabs/DiffusionNFT@24af5554
    scripts/train_nft_sd3.py ``eval_fn``: ``pipeline_with_logprob(..., deterministic=True, solver="flow")``
    with ``num_inference_steps=config.sample.eval_num_steps`` and ``config.sample.guidance_scale``, whose
    "flow" step at eta 0 is Euler (flow_grpo/diffusers_patch/solver.py ``flow_grpo_step``); config/nft.py:
    eval_num_steps 40, guidance_scale 1.0)."""
    cfg = NFTConfig(preset="sd3.5-m", reward="clip_score", max_iters=1000)
    cfg.models = ModelConfig(dtype="bfloat16", lora_rank=32, lora_alpha=64.0)
    cfg.sample = SampleConfig(
        solver="dpm2", num_steps=10, prompts_per_iter=48, images_per_prompt=24, rollout_batch=16
    )
    cfg.train = TrainConfig(kl_coef=1e-4, lr=3e-4, batch_size=8, steps_per_iter=1)
    cfg.eval = EvalConfig(every=50, solver="euler", num_steps=40, cfg_scale=1.0)
    return cfg


PRESETS = {"tiny": preset_tiny, "sd3.5-m": preset_sd35m}


# ------------------------------------------------------------------------------------------------------------
def validate(cfg: NFTConfig) -> None:
    """Every check that can fail fast runs before any work starts."""
    sc, tc = cfg.sample, cfg.train
    if sc.solver not in ("dpm2", "euler", "flow-sde", "cps"):
        raise ConfigError(f"--sample.solver: expected dpm2, euler, flow-sde or cps, got {sc.solver!r}")
    check_at_least_one(
        [
            ("--sample.num-steps", sc.num_steps),
            ("--sample.prompts-per-iter", sc.prompts_per_iter),
            ("--sample.images-per-prompt", sc.images_per_prompt),
            ("--sample.rollout-batch", sc.rollout_batch),
            ("--train.batch-size", tc.batch_size),
            ("--train.steps-per-iter", tc.steps_per_iter),
        ]
    )
    if sc.images_per_prompt < 2:
        raise ConfigError(
            f"--sample.images-per-prompt: expected an integer >= 2 (advantages are centred within each "
            f"prompt's group: with one image every advantage is 0), got {sc.images_per_prompt}"
        )
    check_steps_per_iter(cfg, launched_world_size())
    if tc.beta <= 0:
        raise ConfigError(f"--train.beta: expected a value > 0, got {tc.beta}")
    if tc.adv_clip_max <= 0:
        raise ConfigError(f"--train.adv-clip-max: expected a value > 0, got {tc.adv_clip_max}")
    if tc.kl_coef < 0:
        raise ConfigError(f"--train.kl-coef: expected a value >= 0, got {tc.kl_coef}")
    if tc.weighting not in ("adaptive", "none"):
        raise ConfigError(f"--train.weighting: expected adaptive or none, got {tc.weighting!r}")
    if tc.adv_std not in ("global", "group"):
        raise ConfigError(f"--train.adv-std: expected global or group, got {tc.adv_std!r}")
    if tc.timesteps_per_forward < 0:
        raise ConfigError(
            f"--train.timesteps-per-forward: expected an integer >= 0 (0: all trained timesteps in one "
            f"forward), got {tc.timesteps_per_forward}"
        )
    if not 0 < tc.timestep_fraction <= 1:
        raise ConfigError(
            f"--train.timestep-fraction: expected a value in (0, 1], got {tc.timestep_fraction}"
        )
    if tc.old_flat < 0:
        raise ConfigError(f"--train.old-flat: expected an integer >= 0, got {tc.old_flat}")
    if tc.old_uprate < 0:
        raise ConfigError(f"--train.old-uprate: expected a value >= 0, got {tc.old_uprate}")
    if not 0 <= tc.old_uphold <= 1:  # the old adapter's EMA decay: 1 keeps it at the initial weights
        raise ConfigError(f"--train.old-uphold: expected a value in [0, 1], got {tc.old_uphold}")
    validate_run(cfg)


def check_steps_per_iter(cfg: NFTConfig, world: int) -> None:
    """Every optimizer step takes the same number of images on every process: ``--train.steps-per-iter``
    must divide the images per iteration per process."""
    n = cfg.sample.prompts_per_iter * cfg.sample.images_per_prompt
    s = cfg.train.steps_per_iter
    if n % world == 0 and (n // world) % s:
        ranks = f" / {world} processes" if world > 1 else ""
        raise ConfigError(
            f"--train.steps-per-iter: expected a divisor of the images per iteration{ranks} "
            f"(--sample.prompts-per-iter x --sample.images-per-prompt = {n}"
            f"{f'{ranks} = {n // world}' if world > 1 else ''}), got {s}"
        )


def old_decay(step: int, tc: TrainConfig) -> float:
    """math.md §2 step 7: ``d = min(max(step - flat, 0) * uprate, uphold)``, ``step`` = optimizer steps so
    far."""
    return old_adapter_decay(step, flat=tc.old_flat, uprate=tc.old_uprate, uphold=tc.old_uphold)


# ------------------------------------------------------------------------------------------------------------
class NFTTrainer(Trainer):
    algo = "nft"

    @classmethod
    def logs_kl(cls, cfg) -> bool:
        """``train/kl`` every iteration (measured on the first micro-batch even at ``--train.kl-coef 0``)."""
        return True

    def per_rank_step(self, n: int) -> int:
        """``n / (steps_per_iter * world)``: ``--train.steps-per-iter`` steps per iteration on any world
        size."""
        return n // (self.cfg.train.steps_per_iter * self.dist.world)

    def train_iteration(self, it: int) -> tuple[dict, str]:
        cfg = self.cfg
        plan, x0, rewards, comps = self.rollout_and_reward(it)
        adv = group_advantages(rewards, plan.group_ids, std=cfg.train.adv_std)  # step 2, over whole groups
        r = nft_optimality(adv, cfg.train.adv_clip_max)  # step 3
        with self.train_phase():
            stats = self.train_on(it, plan, x0, r[plan.local])  # steps 4-6 on this rank's samples
        decay = old_decay(self.opt_step, cfg.train)
        self.policy.ema_old(decay)  # step 7
        vals = {
            "train/reward_mean": rewards.mean(),
            "train/reward_std": rewards.std(unbiased=False),
            **stats,
            "train/r_mean": r.mean(),
            "train/old_decay": decay,
        }
        if len(comps) > 1:
            vals.update({f"train/reward/{k}": v.mean() for k, v in comps.items()})
        summary = (
            f"reward {float(rewards.mean()):.3f} | loss {stats['train/loss']:.4f} | "
            f"kl {stats['train/kl']:.2e}"
        )
        return vals, summary

    def rollout_and_reward(self, it: int):
        """Steps 1-3: this rank's rollouts with the old adapter (its share of the global batch, in training
        order); rewards overlap the next rollout micro-batch and are all-gathered over whole groups.
        -> ``(plan, local x0, global rewards, global reward components)``."""
        sc = self.cfg.sample
        plan = self.iteration_plan(it)
        prompts, seeds = plan.local_prompts(), plan.local_seeds()
        x0s, futures = [], []
        with nvtx_range("rollout"), self.policy.adapter("old"), torch.no_grad():
            for lo in self.progress(range(0, len(prompts), sc.rollout_batch), "rollout"):
                mb = prompts[lo : lo + sc.rollout_batch]
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
            rewards, comps = self.await_rewards(futures)  # re-raises a RewardError from any rank
            rewards = self.to_global(plan, rewards)  # whole groups: advantages see every image of a prompt
            comps = {k: self.to_global(plan, v) for k, v in comps.items()}
        return plan, torch.cat(x0s), rewards, comps

    def train_on(self, it: int, plan, x0: torch.Tensor, r: torch.Tensor) -> dict:
        """Steps 4-6 over this rank's samples (``x0`` / ``r`` in the plan's local order): ``--train.steps-per-
        iter`` optimizer steps, each over an equal chunk of the global training order, in micro-batches of
        ``--train.batch-size``; each micro-batch's loss is weighted by ``mb.weight / n_train`` so that the
        accumulated gradient is the mean over the step's samples and trained timesteps (the reference divides
        by ``gradient_accumulation_steps * num_train_timesteps``; DDP averages over ranks).  Returns loss/kl
        means.  Trained timesteps and noise are keyed by the global sample index, so any world size draws
        the same.  ``x0``, the noise and ``x_t`` stay fp32 (the reference's ``x_t`` is fp32 too); the
        forwards run in the policy's precision."""
        cfg, tc, sc = self.cfg, self.cfg.train, self.cfg.sample
        dev = x0.device
        n = len(plan.prompts)
        sigmas = self.policy.sigmas(sc.num_steps, sc.shift).to(dev)  # [N+1], last 0
        n_train = max(1, int(tc.timestep_fraction * sc.num_steps))
        g = common.iteration_generator(cfg.seed, it, "train")
        t_idx = torch.stack(
            [torch.randperm(sc.num_steps, generator=g)[:n_train] for _ in range(n)]
        )  # [n, n_train] per global sample
        # without a KL term the KL is still measured, on the first min(batch size, step size) samples of the
        # training order at their first trained timestep: the same samples whatever the world size.  v_ref
        # runs on every rank's first micro-batch of the first step (they hold those samples; under FSDP every
        # forward is a collective, so each rank runs the same ones)
        measured = torch.zeros(n, dtype=torch.bool)
        measured[plan.order[: min(tc.batch_size, n // tc.steps_per_iter)]] = True
        # sums stay on the device: one host read per iteration, not one per forward
        loss_sum = torch.zeros((), device=dev)
        kl_sum = torch.zeros((), device=dev)
        kl_count = torch.zeros((), device=dev)
        micro = 0
        steps = plan.steps(tc.batch_size)
        self.opt.zero_grad(set_to_none=True)
        for si, mbs in enumerate(self.progress(steps, "train")):
            for mi, mb in enumerate(mbs):
                idx = mb.rows.to(dev)
                cond = self.policy.encode([plan.prompts[i] for i in mb.gidx.tolist()])
                xb, rb = x0[idx].float(), r[mb.rows].to(dev)
                # every trained timestep's noise, [b, n_train, ...], from a generator per sample keyed by its
                # global index: the same numbers whatever the batch split or the world size
                shape = (n_train, *xb.shape[1:])
                gens = [common.iteration_generator(cfg.seed, it, f"noise/{i}", dev) for i in mb.gidx.tolist()]
                noises = torch.stack([torch.randn(shape, generator=g, device=dev) for g in gens])
                keep = torch.ones(len(idx), dtype=torch.bool) if tc.kl_coef > 0 else measured[mb.gidx]
                keep = keep & (not mb.dummy)
                # trained timesteps in chunks of k, stacked timestep-major into one forward: rows c*b to
                # (c+1)*b-1 are the chunk's c-th timestep.  The loss is the mean over the chunk's rows, the
                # mean of its timesteps' losses, so weighting it by k / n_train sums to the reference's
                # per-timestep backward of loss_j / n_train
                k = tc.timesteps_per_forward or n_train
                for j0 in range(0, n_train, k):
                    nj, b = min(k, n_train - j0), len(idx)
                    t = sigmas[t_idx[mb.gidx][:, j0 : j0 + nj].T.reshape(-1).to(dev)]
                    noise = noises[:, j0 : j0 + nj].transpose(0, 1).reshape(nj * b, *xb.shape[1:])
                    xr = xb.repeat(nj, *([1] * (xb.dim() - 1))) if nj > 1 else xb
                    cr = cond.repeat(nj) if nj > 1 else cond
                    x_t = kernels.interpolate(xr, noise, t)
                    ts = 1000.0 * t
                    last = mi == len(mbs) - 1 and j0 + nj == n_train
                    # v_ref: on every row under a KL term, else on the first timestep's rows of the first
                    # micro-batch of the first step (the KL measurement)
                    measure = si == 0 and mi == 0 and j0 == 0
                    ref_rows = nj * b if tc.kl_coef > 0 else (b if measure else 0)
                    with torch.no_grad():
                        with self.policy.adapter("old"):
                            v_old = self.policy.denoiser(x_t, ts, cr)
                        v_ref = None
                        if ref_rows:
                            with self.policy.adapters_disabled():
                                v_ref = self.policy.denoiser(x_t[:ref_rows], ts[:ref_rows], cr[:ref_rows])
                    with self.dist.grad_sync(last), self.policy.adapter("default"):
                        v = self.policy.train_denoiser(x_t, ts, cr)
                        loss = kernels.nft_loss(
                            v,
                            v_old,
                            xr,
                            noise,
                            t,
                            rb.repeat(nj),
                            beta=tc.beta,
                            adv_clip_max=tc.adv_clip_max,
                            weighting=tc.weighting,
                            v_ref=v_ref if tc.kl_coef > 0 else None,
                            kl_coef=tc.kl_coef,
                        )
                        (loss * (mb.weight * nj / n_train)).backward()
                    if not mb.dummy:
                        loss_sum += loss.detach() * nj
                        micro += nj
                    if v_ref is not None:
                        per_sample = ((v[:ref_rows].detach().float() - v_ref.float()) ** 2).flatten(1).mean(1)
                        kr = keep.repeat(ref_rows // b).to(dev)
                        kl_sum += (per_sample * kr).sum()
                        kl_count += kr.sum()
            self.optimizer_step()
        kl_sum, kl_count = self.dist.all_gather(torch.stack([kl_sum, kl_count])).sum(0)
        return {
            "train/loss": float(loss_sum) / max(micro, 1),
            "train/kl": float(kl_sum) / max(float(kl_count), 1.0),
        }


def main(argv=None) -> int:
    return loop_main(
        argv, config_cls=NFTConfig, presets=PRESETS, trainer_cls=NFTTrainer, validate=validate, doc=__doc__
    )


if __name__ == "__main__":
    sys.exit(main())
