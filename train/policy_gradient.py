"""What the policy-gradient loops share: Flow-GRPO (SPEC §3, ``train.grpo``) and DDPO / DPOK (SPEC §4,
``train.ddpo``).

* config sections (:class:`PGSampleConfig`, :class:`PGTrainConfig`) and the CLI entry point (:func:`main`);
* rollouts that keep the trajectory and the per-step log-probs (:func:`collect_rollouts` ->
  :class:`Trajectories`), through a batch-invariant denoiser (``engine.BatchInvariantDenoiser``) so that
  re-scoring a stored transition
  at training reproduces its rollout log-prob bit for bit whatever the micro-batch (:func:`score_steps`);
* the losses: PPO clip per step, REINFORCE, Flow-GRPO's mean KL and DPOK's closed-form Gaussian KL;
* DDPO's per-prompt reward statistics (:class:`PerPromptStatTracker`);
* :class:`PolicyGradientTrainer`: the loop (rollout, reward, advantage, update, eval EMA, eval, checkpoint),
  with the algorithm's advantage and per-step loss supplied by the subclass.

The headline metric ``ratio/first_abs_dev`` is ``max |exp(logp_new - logp_old) - 1|`` over the first
optimisation pass of an iteration, before any parameter changes: SPEC §3 requires it to be exactly 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

import kernels
from engine import BatchInvariantDenoiser, guided_prediction, nvtx_range, rollout

from . import common
from .config import ConfigError, from_dict, parse_cli, to_dict
from .evaluation import EvalConfig, Evaluator
from .policy import ModelConfig, Policy, build_policy, check_model_path, read_prompt_file
from .rewards.registry import RewardError, build_reward

__all__ = [
    "PGRunConfig",
    "PGSampleConfig",
    "PGTrainConfig",
    "LogConfig",
    "Trajectories",
    "StepScore",
    "collect_rollouts",
    "score_steps",
    "ppo_clip_loss",
    "reinforce_loss",
    "flow_grpo_kl",
    "gaussian_step_kl",
    "PerPromptStatTracker",
    "PolicyGradientTrainer",
    "main",
]

FLOW_SOLVERS = ("flow-sde", "cps")


@dataclass
class PGSampleConfig:
    solver: str = field(
        default="flow-sde",
        metadata={"help": "rollout SDE: flow-sde or cps (flow models), ddim (epsilon UNets); auto picks"},
    )
    num_steps: int = field(default=10, metadata={"help": "sampler steps per training rollout"})
    shift: float = field(default=3.0, metadata={"help": "SD3 sigma-schedule shift"})
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level a (flow-sde / cps)"})
    eta: float = field(default=1.0, metadata={"help": "DDIM eta (ddim solver; 0 has no policy gradient)"})
    guidance_scale: float = field(
        default=1.0, metadata={"help": "CFG scale at rollout and training (1: none)"}
    )
    sde_window: tuple[int, ...] = field(
        default=(),
        metadata={"help": "Flow-GRPO-Fast: start,end of the SDE steps (ODE elsewhere; only these train)"},
    )
    prompts_per_iter: int = field(default=4, metadata={"help": "distinct prompts per iteration"})
    images_per_prompt: int = field(default=8, metadata={"help": "group size K: images per prompt"})
    rollout_batch: int = field(default=16, metadata={"help": "images per rollout micro-batch"})
    forward_chunk: int = field(
        default=8,
        metadata={"help": "canonical micro-batch of every denoiser forward (rollout and training alike)"},
    )


@dataclass
class PGTrainConfig:
    adv_std: str = field(default="global", metadata={"help": "advantage std: global or group"})
    adv_clip_max: float = field(default=5.0, metadata={"help": "advantages clipped to [-m, m]"})
    clip_range: float = field(default=1e-4, metadata={"help": "PPO clip eps (mean-reduced log-probs)"})
    kl_beta: float = field(
        default=0.0, metadata={"help": "KL-to-reference coefficient (0: no reference pass)"}
    )
    timestep_fraction: float = field(
        default=0.99, metadata={"help": "fraction of the SDE steps trained per sample (at least one)"}
    )
    inner_epochs: int = field(default=1, metadata={"help": "optimisation passes over each iteration's data"})
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    batch_size: int = field(default=16, metadata={"help": "training micro-batch (images)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    autocast: str = field(
        default="none", metadata={"help": "mixed precision of every forward: none, bfloat16, float16"}
    )


@dataclass
class LogConfig:
    loggers: tuple[str, ...] = field(default=(), metadata={"help": "extra loggers: tensorboard, wandb"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars"})
    checkpoint_every: int = field(default=5, metadata={"help": "iterations between checkpoints"})


def _h(text):
    return field(default=None, metadata={"help": text})


@dataclass
class PGRunConfig:
    """Top-level options shared with ``train.nft``; algorithms add ``sample`` and ``train`` sections."""

    preset: str = field(default="tiny", metadata={"help": "named setup (see --help's preset list)"})
    model: str | None = _h(
        "local diffusers directory (SD3/SD3.5/FLUX pipeline, or SD1.5-style UNet for DDPO)"
    )
    prompts: str | None = _h("training prompts for a --model run: a text file, one prompt per line")
    eval_prompts: str | None = _h("held-out prompts for a --model run (default: --prompts)")
    reward: str = field(default="geneval_mini", metadata={"help": "reward name(s), comma separated"})
    reward_weights: tuple[float, ...] = field(default=(), metadata={"help": "one weight per reward"})
    reward_aggregation: str = field(default="zmean", metadata={"help": "zmean, min or mean_minus_std"})
    reward_clip_path: str | None = _h("local CLIP directory for the clip_score reward")
    run_dir: str | None = _h("run directory (default: runs/<algo>-<timestamp>)")
    resume: str | None = _h("resume the run in this directory")
    max_minutes: float | None = _h("stop after this many minutes of this invocation")
    max_iters: int | None = field(default=100, metadata={"help": "stop after this many iterations in total"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    models: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


def validate_common(cfg, *, embedded_presets=("tiny",)) -> None:
    """Checks every policy-gradient config shares (the algorithm adds its own); presets other than
    ``embedded_presets`` (which run the embedded default) need ``--model``."""
    sc, tc = cfg.sample, cfg.train
    if sc.solver not in ("auto", "flow-sde", "cps", "ddim"):
        raise ConfigError(f"--sample.solver: expected auto, flow-sde, cps or ddim, got {sc.solver!r}")
    for name, val in (
        ("--sample.num-steps", sc.num_steps),
        ("--sample.prompts-per-iter", sc.prompts_per_iter),
        ("--sample.images-per-prompt", sc.images_per_prompt),
        ("--sample.rollout-batch", sc.rollout_batch),
        ("--sample.forward-chunk", sc.forward_chunk),
        ("--train.batch-size", tc.batch_size),
        ("--train.grad-accum", tc.grad_accum),
        ("--train.inner-epochs", tc.inner_epochs),
    ):
        if val < 1:
            raise ConfigError(f"{name}: expected an integer >= 1, got {val}")
    if sc.sde_window:
        if len(sc.sde_window) != 2 or not 0 <= sc.sde_window[0] < sc.sde_window[1] <= sc.num_steps:
            raise ConfigError(
                f"--sample.sde-window: expected start,end with 0 <= start < end <= --sample.num-steps "
                f"({sc.num_steps}), got {','.join(map(str, sc.sde_window))}"
            )
    if sc.noise_level <= 0 and sc.solver in FLOW_SOLVERS:
        raise ConfigError(f"--sample.noise-level: expected a value > 0 (an SDE), got {sc.noise_level}")
    if sc.eta <= 0 and sc.solver in ("ddim", "auto"):
        raise ConfigError(f"--sample.eta: expected a value > 0 (eta 0 has no policy gradient), got {sc.eta}")
    if tc.adv_std not in ("global", "group"):
        raise ConfigError(f"--train.adv-std: expected global or group, got {tc.adv_std!r}")
    for name, val in (("--train.adv-clip-max", tc.adv_clip_max), ("--train.clip-range", tc.clip_range)):
        if not val > 0:
            raise ConfigError(f"{name}: expected a value > 0, got {val}")
    if tc.kl_beta < 0:
        raise ConfigError(f"--train.kl-beta: expected a value >= 0, got {tc.kl_beta}")
    if not 0 < tc.timestep_fraction <= 1:
        raise ConfigError(
            f"--train.timestep-fraction: expected a value in (0, 1], got {tc.timestep_fraction}"
        )
    if tc.autocast not in ("none", "bfloat16", "float16"):
        raise ConfigError(f"--train.autocast: expected none, bfloat16 or float16, got {tc.autocast!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: expected auto, cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: expected a machine with CUDA for 'cuda', found none")
    if cfg.preset not in embedded_presets or cfg.model:
        check_model_path(cfg.model, preset=cfg.preset)
        read_prompt_file(cfg.prompts, "--prompts")
        read_prompt_file(cfg.eval_prompts or cfg.prompts, "--eval-prompts")


def resolve_solver(solver: str, denoiser) -> str:
    """``auto``: flow-sde for flow models, ddim for epsilon UNets; an explicit solver must fit the model."""
    pred = getattr(denoiser, "prediction_type", "flow")
    if solver == "auto":
        return "ddim" if pred == "epsilon" else "flow-sde"
    if (solver == "ddim") != (pred == "epsilon"):
        fits = "ddim" if pred == "epsilon" else "flow-sde or cps"
        raise ConfigError(f"--sample.solver: expected {fits} for a {pred} model, got {solver!r}")
    return solver


# ------------------------------------------------------------------------------------------------------------
# Trajectories
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Trajectories:
    """One iteration's rollouts.  ``states [B, N+1, ...]`` (storage dtype; ``states[:, i]`` enters step
    ``i``),
    ``log_probs [B, N]`` fp32 (the rollout policy's, the PPO "old" log-probs), ``timesteps [N]`` the model's
    timestep input (``1000 sigma`` floats / DDPM steps), ``sigmas`` / ``alpha_bars [N+1]`` the schedule,
    ``train_steps`` the steps with a non-degenerate Gaussian transition (``std > 0``): those a policy
    gradient can train."""

    prompts: list
    group_ids: torch.Tensor
    states: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor | None
    alpha_bars: torch.Tensor | None
    sigma_max: float | None
    solver: str
    noise_level: float
    eta: float
    guidance_scale: float
    train_steps: tuple[int, ...]
    rewards: torch.Tensor
    reward_components: dict

    def __len__(self) -> int:
        return self.states.shape[0]


def _transition(solver, x, pred, p0, p1, *, noise_level, eta, sigma_max, prev_sample):
    """The rollout's SDE step (SPEC §1) re-scored at ``prev_sample`` -> ``(_, log_prob, mean, std)``."""
    if solver == "flow-sde":
        return kernels.sde_step(
            x, pred, p0, p1, noise_level=noise_level, sigma_max=sigma_max, prev_sample=prev_sample
        )
    if solver == "cps":
        return kernels.cps_step(x, pred, p0, p1, noise_level=noise_level, prev_sample=prev_sample)
    return kernels.ddim_step(x, pred, p0, p1, eta=eta, prev_sample=prev_sample)


def _schedule(traj_or_batch, steps: torch.Tensor):
    if traj_or_batch.solver == "ddim":
        return traj_or_batch.alpha_bars[steps], traj_or_batch.alpha_bars[steps + 1]
    return traj_or_batch.sigmas[steps], traj_or_batch.sigmas[steps + 1]


def _stochastic_steps(batch, sde_steps) -> tuple[int, ...]:
    """The SDE steps whose transition std is > 0 (DDIM's last step to ``ab_prev = 1`` and CPS's last step to
    ``sigma_next = 0`` are deterministic: no density, no gradient)."""
    keep = []
    for i in sde_steps:
        step = torch.tensor([i], device=batch.x0.device)
        p0, p1 = _schedule(batch, step)
        z = torch.zeros(1, 1, dtype=torch.float32, device=batch.x0.device)
        sigma_max = batch.sigmas[1] if batch.solver == "flow-sde" else None
        _, _, _, std = _transition(
            batch.solver,
            z,
            z,
            p0,
            p1,
            noise_level=batch.noise_level or 0.0,
            eta=batch.eta or 0.0,
            sigma_max=sigma_max,
            prev_sample=z,
        )
        if float(std[0]) > 0:
            keep.append(i)
    return tuple(keep)


def collect_rollouts(
    policy: Policy,
    prompts: list,
    group_ids,
    seeds,
    sc: PGSampleConfig,
    *,
    solver: str,
    reward,
    pool,
    progress,
) -> Trajectories:
    """Roll out ``prompts`` (one Philox seed each) with the active adapter in micro-batches of
    ``sc.rollout_batch``, keeping trajectory and per-step log-probs; rewards run on ``pool`` while the next
    micro-batch samples."""
    states, log_probs, futures, last = [], [], [], None
    g = float(sc.guidance_scale)
    window = tuple(sc.sde_window) if sc.sde_window else None
    with torch.no_grad():
        for lo in progress(range(0, len(prompts), sc.rollout_batch), "rollout"):
            mb = prompts[lo : lo + sc.rollout_batch]
            cond = policy.encode(mb)
            uncond = policy.encode([""] * len(mb)) if g != 1.0 else None
            last = rollout(
                policy.denoiser,
                cond,
                num_steps=sc.num_steps,
                latent_shape=policy.latent_shape,
                solver=solver,
                shift=sc.shift,
                noise_level=sc.noise_level,
                eta=sc.eta,
                guidance_scale=g,
                uncond=uncond,
                seed=[int(s) for s in seeds[lo : lo + sc.rollout_batch]],
                dtype=policy.dtype,
                device=policy.device,
                return_trajectory=True,
                return_log_probs=True,
                sde_window=window,
            )
            states.append(last.trajectory)
            log_probs.append(last.log_probs)
            images = policy.decode(last.x0)
            futures.append(pool.submit(reward, images.cpu(), [policy.prompt_text(p) for p in mb]))
    with nvtx_range("reward"):
        results = [f.result() for f in futures]  # re-raises a RewardError from the worker
    sigma_max = None
    if solver == "flow-sde" and float(last.sigmas[0]) == 1.0 and 0 in last.sde_steps:
        sigma_max = float(last.sigmas[1])
    return Trajectories(
        prompts=list(prompts),
        group_ids=group_ids,
        states=torch.cat(states),
        log_probs=torch.cat(log_probs),
        timesteps=last.timesteps,
        sigmas=last.sigmas,
        alpha_bars=last.alpha_bars,
        sigma_max=sigma_max,
        solver=solver,
        noise_level=float(sc.noise_level),
        eta=float(sc.eta),
        guidance_scale=g,
        train_steps=_stochastic_steps(last, last.sde_steps),
        rewards=torch.cat([r for r, _ in results]),
        reward_components={k: torch.cat([c[k] for _, c in results]) for k in results[0][1]},
    )


@dataclass
class StepScore:
    """A re-scored transition: ``log_prob [b]`` (differentiable), ``mean`` fp32 ``[b, ...]``, ``std [b]``,
    and ``mean_ref`` (adapters disabled, no grad) when asked for."""

    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    mean_ref: torch.Tensor | None = None


def score_steps(
    policy: Policy, traj: Trajectories, rows: torch.Tensor, steps: torch.Tensor, *, with_ref: bool = False
) -> StepScore:
    """Log-prob of the stored transition ``states[r, s] -> states[r, s+1]`` for each ``(r, s)`` pair under the
    active adapter: the rollout's prediction (same batch-invariant denoiser, timestep floats, cached
    conditioning, CFG arithmetic and dtype) and the same fused step, scored at the stored ``prev_sample``."""
    dev = traj.states.device
    rows, steps = rows.to(dev), steps.to(dev)
    prompts = [traj.prompts[i] for i in rows.tolist()]
    cond = policy.encode(prompts)
    uncond = policy.encode([""] * len(prompts)) if traj.guidance_scale != 1.0 else None
    x = traj.states[rows, steps]
    prev = traj.states[rows, steps + 1]
    timestep = traj.timesteps[steps]
    p0, p1 = _schedule(traj, steps)
    sigma_max = (
        torch.full((len(rows),), traj.sigma_max, dtype=torch.float32, device=dev) if traj.sigma_max else None
    )
    kw = dict(noise_level=traj.noise_level, eta=traj.eta, sigma_max=sigma_max, prev_sample=prev)

    def predict():
        return guided_prediction(
            policy.denoiser, x, timestep, cond, uncond=uncond, guidance_scale=traj.guidance_scale
        )

    _, log_prob, mean, std = _transition(traj.solver, x, predict(), p0, p1, **kw)
    mean_ref = None
    if with_ref:
        with torch.no_grad(), policy.adapters_disabled():
            _, _, mean_ref, _ = _transition(traj.solver, x, predict(), p0, p1, **kw)
    return StepScore(log_prob=log_prob, mean=mean, std=std, mean_ref=mean_ref)


# ------------------------------------------------------------------------------------------------------------
# Losses (per trained step; every reduction over the batch is a mean)
# ------------------------------------------------------------------------------------------------------------
def ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range: float):
    """SPEC §3 / §4 (DDPO-IS) PPO clip of one step -> ``(loss, ratio)``:
    ``ratio = exp(logp - logp_old)``, ``loss = mean_b max(-A ratio, -A clamp(ratio, 1 - eps, 1 + eps))``."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


def reinforce_loss(log_prob, advantages):
    """SPEC §4 DDPO-SF (score function, REINFORCE) for one step: ``-mean_b(logp_t A)``."""
    return -(log_prob * advantages).mean()


def flow_grpo_kl(mean, mean_ref, std):
    """SPEC §3 closed-form KL of two SDE transitions with the same std, per sample ``[b]``:
    ``mean_dims (mean_theta - mean_ref)^2 / (2 std_t^2)`` (``std_t`` the transition's std)."""
    diff = (mean.float() - mean_ref.float()).flatten(1)
    return (diff**2).mean(1) / (2.0 * std.float() ** 2)


def gaussian_step_kl(mean, mean_ref, std):
    """SPEC §4 DPOK: ``KL(p_theta(.|x_t) || p_ref(.|x_t))`` per sample ``[b]`` with the closed form of SPEC §1
    (``kernels.gaussian_kl``, averaged over dims like the log-probs); both transitions share the
    schedule's ``std``."""
    return kernels.gaussian_kl(mean, std, mean_ref, std, reduce="mean")


# ------------------------------------------------------------------------------------------------------------
# DDPO's per-prompt reward statistics
# ------------------------------------------------------------------------------------------------------------
class PerPromptStatTracker:
    """DDPO's baseline (SPEC §4): a running buffer of the last ``buffer_size`` rewards per prompt;
    ``A = (R - mean_prompt) / (std_prompt + 1e-6)`` from the buffer, or from the whole batch while the prompt
    has fewer than ``min_count`` rewards (population std)."""

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size / min_count: expected ints >= 1, got {buffer_size} / {min_count}")
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        rewards = rewards.detach().double().cpu()
        adv = torch.empty_like(rewards)
        for p in dict.fromkeys(prompts):
            idx = torch.tensor([i for i, q in enumerate(prompts) if q == p])
            buf = self.stats.setdefault(p, deque(maxlen=self.buffer_size))
            buf.extend(rewards[idx].tolist())
            ref = torch.tensor(list(buf), dtype=torch.float64) if len(buf) >= self.min_count else rewards
            adv[idx] = (rewards[idx] - ref.mean()) / (ref.std(unbiased=False) + 1e-6)
        return adv.float()

    def state_dict(self) -> dict:
        return {p: list(b) for p, b in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {p: deque(v, maxlen=self.buffer_size) for p, v in state.items()}


# ------------------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------------------
class PolicyGradientTrainer:
    """Rollout (current ``default`` adapter; its log-probs are PPO's "old" ones) -> reward -> advantage ->
    per-step policy-gradient updates -> eval EMA -> evaluation -> checkpoint.  Subclasses define
    :meth:`advantages` and :meth:`step_loss` (and may add state with :meth:`extra_state`)."""

    algo = "pg"

    def __init__(self, cfg, run_dir, policy: Policy, reward, evaluator: Evaluator):
        self.cfg, self.run_dir, self.policy, self.reward, self.evaluator = (
            cfg,
            run_dir,
            policy,
            reward,
            evaluator,
        )
        tc = cfg.train
        self.solver = resolve_solver(cfg.sample.solver, policy.denoiser)
        if not isinstance(policy.denoiser, BatchInvariantDenoiser):
            policy.denoiser = BatchInvariantDenoiser(
                policy.denoiser, cfg.sample.forward_chunk, autocast=tc.autocast
            )
        self.params = policy.trainable_parameters()
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
        self.iteration = 0
        self.opt_step = 0
        self.elapsed_offset = 0.0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    # --- algorithm hooks ------------------------------------------------------------------------------------
    def advantages(self, traj: Trajectories) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """-> ``(advantages [B], train mask [B] bool, metrics)``."""
        raise NotImplementedError

    def step_loss(self, score: StepScore, old_log_prob, adv, n_steps: int) -> tuple[torch.Tensor, dict]:
        """-> ``(loss of this step, already scaled as it enters the iteration's objective, parts)``;
        ``parts``        holds detached tensors: ``ratio`` [b] and any of ``policy``, ``kl`` (scalars)."""
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # --- state ----------------------------------------------------------------------------------------------
    def state_dict(self, elapsed: float) -> dict:
        return {
            "iteration": self.iteration,
            "opt_step": self.opt_step,
            "elapsed_s": elapsed,
            "policy": self.policy.adapter_state(),
            "optimizer": self.opt.state_dict(),
            "rng": common.rng_state(),
            "config": to_dict(self.cfg),
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.opt_step = state["iteration"], state["opt_step"]
        self.elapsed_offset = state["elapsed_s"]
        self.policy.load_adapter_state(state["policy"])
        self.opt.load_state_dict(state["optimizer"])
        common.set_rng_state(state["rng"])
        self.load_extra_state(state.get("extra", {}))

    # --- one iteration --------------------------------------------------------------------------------------
    def rollout_and_reward(self, it: int) -> Trajectories:
        cfg, sc = self.cfg, self.cfg.sample
        prompts = self.policy.sample_train_prompts(
            sc.prompts_per_iter, common.derive_seed(cfg.seed, it, "prompts")
        )
        group_ids = torch.arange(len(prompts)).repeat_interleave(sc.images_per_prompt)
        batch_prompts = [prompts[i] for i in group_ids.tolist()]
        seeds = [common.derive_seed(cfg.seed, it, "rollout", i) for i in range(len(batch_prompts))]
        with nvtx_range("rollout"), self.policy.adapter("default"):
            return collect_rollouts(
                self.policy,
                batch_prompts,
                group_ids,
                seeds,
                sc,
                solver=self.solver,
                reward=self.reward,
                pool=self.pool,
                progress=self.progress,
            )

    def train_on(self, it: int, traj: Trajectories, adv: torch.Tensor, mask: torch.Tensor) -> dict:
        """Per-step updates over the samples in ``mask``: each sample trains on a random
        ``timestep_fraction`` of its SDE steps; ``ratio/first_abs_dev`` covers every log-prob computed
        before the iteration's first optimizer step (first pass, unchanged parameters)."""
        cfg, tc = self.cfg, self.cfg.train
        dev = traj.states.device
        keep = torch.nonzero(mask).flatten()
        steps_all = torch.tensor(traj.train_steps, dtype=torch.long)
        n_train = max(1, int(tc.timestep_fraction * len(steps_all)))
        stats = {"policy": 0.0, "kl": 0.0, "clip_frac": 0.0, "approx_kl": 0.0}
        count, micro, loss_sum, first_dev, first_n, max_dev = 0, 0, 0.0, 0.0, 0, 0.0
        if keep.numel() == 0 or len(steps_all) == 0:
            return {"train/trained_samples": 0, "ratio/first_abs_dev": float("nan")}
        start_step = self.opt_step
        g = common.iteration_generator(cfg.seed, it, "train")
        adv = adv.to(dev)
        for epoch in range(tc.inner_epochs):
            order = keep[torch.randperm(keep.numel(), generator=g)]
            t_idx = torch.stack(
                [
                    steps_all[torch.randperm(len(steps_all), generator=g)[:n_train]]
                    for _ in range(keep.numel())
                ]
            )  # [n, n_train]: per-sample trained steps, in random order
            batches = [
                (order[lo : lo + tc.batch_size], t_idx[lo : lo + tc.batch_size])
                for lo in range(0, keep.numel(), tc.batch_size)
            ]
            self.opt.zero_grad(set_to_none=True)
            for bi, (rows, steps) in enumerate(self.progress(batches, f"train {epoch + 1}")):
                first_pass = epoch == 0 and self.opt_step == start_step
                for j in range(n_train):
                    score = score_steps(self.policy, traj, rows, steps[:, j], with_ref=tc.kl_beta > 0)
                    old = traj.log_probs[rows.to(dev), steps[:, j].to(dev)]
                    loss, parts = self.step_loss(score, old, adv[rows.to(dev)], n_train)
                    (loss / tc.grad_accum).backward()
                    dev_abs = float((parts["ratio"].double() - 1.0).abs().max())
                    max_dev = max(max_dev, dev_abs)
                    if first_pass:
                        first_dev, first_n = max(first_dev, dev_abs), first_n + parts["ratio"].numel()
                    loss_sum += float(loss.detach())
                    stats["policy"] += float(parts.get("policy", 0.0))
                    stats["kl"] += float(parts.get("kl", 0.0))
                    r = parts["ratio"]
                    stats["clip_frac"] += float(((r - 1.0).abs() > tc.clip_range).float().mean())
                    stats["approx_kl"] += float(0.5 * ((score.log_prob.detach() - old) ** 2).mean())
                    count += 1
                micro += 1
                if (bi + 1) % tc.grad_accum == 0 or bi + 1 == len(batches):
                    self.optimizer_step()
        out = {f"train/{k}": v / count for k, v in stats.items()}
        out.update(
            {
                "train/loss": loss_sum / micro,
                "train/trained_samples": int(keep.numel()),
                "train/trained_steps": n_train,
                "ratio/first_abs_dev": first_dev,
                "ratio/first_count": first_n,
                "ratio/max_abs_dev": max_dev,
            }
        )
        return out

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

    # --- the loop -------------------------------------------------------------------------------------------
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
                    traj = self.rollout_and_reward(it)
                except RewardError as e:
                    common.save_checkpoint(self.run_dir, self.iteration, self.state_dict(clock()))
                    raise common.TrainingStopped(
                        f"{e}. Checkpoint of iteration {self.iteration} written to "
                        f"{self.run_dir / 'checkpoints'}; resume with --resume {self.run_dir}"
                    ) from None
                adv, mask, adv_stats = self.advantages(traj)
                with nvtx_range("train"):
                    stats = self.train_on(it, traj, adv, mask)
                if not math.isfinite(stats.get("train/loss", 0.0)):
                    common.save_checkpoint(self.run_dir, self.iteration, self.state_dict(clock()))
                    raise common.TrainingStopped(f"non-finite loss at iteration {it}")
                self.iteration = it
                iter_times.append(time.perf_counter() - t0)
                vals = {
                    "train/reward_mean": traj.rewards.mean(),
                    "train/reward_std": traj.rewards.std(unbiased=False),
                    **adv_stats,
                    **stats,
                    "train/iter_s": iter_times[-1],
                }
                if len(traj.reward_components) > 1:
                    vals.update({f"train/reward/{k}": v.mean() for k, v in traj.reward_components.items()})
                metrics.log(it, clock(), vals)
                print(
                    f"iter {it:4d} | reward {float(traj.rewards.mean()):.3f} | "
                    f"loss {stats.get('train/loss', float('nan')):.3e} | "
                    f"kl {stats.get('train/kl', 0.0):.2e} | ratio dev {stats['ratio/first_abs_dev']:.1e} | "
                    f"{iter_times[-1]:.1f}s | {clock() / 60:.1f} min",
                    flush=True,
                )
                if it % cfg.eval.every == 0:
                    self.evaluate(it, clock, metrics)
                if it % cfg.log.checkpoint_every == 0 or interrupt.requested:
                    common.save_checkpoint(self.run_dir, it, self.state_dict(clock()))
                if interrupt.requested:
                    print(
                        f"interrupted: checkpoint of iteration {it} written; "
                        f"resume with --resume {self.run_dir}"
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
            f"peak memory {common.peak_memory_mb(dev):.0f} MB "
            f"({'CUDA allocator' if dev.type == 'cuda' else 'RSS'})",
            flush=True,
        )

    def evaluate(self, it, clock, metrics, base=False):
        shift = self.cfg.sample.shift
        with nvtx_range("eval"), torch.no_grad():
            res = self.evaluator.run(self.policy, it, self.run_dir, shift=shift)
            vals = {f"eval/{k}": v for k, v in res.items()}
            if base:
                base_res = self.evaluator.run(self.policy, it, self.run_dir, base_cfg=True, shift=shift)
                vals.update({f"eval/base_cfg/{k}": v for k, v in base_res.items()})
        metrics.log(it, clock(), vals)
        extra = f" | base CFG {vals['eval/base_cfg/score']:.3f}" if base else ""
        print(f"eval {it:4d} | score {vals['eval/score']:.3f}{extra}", flush=True)


# ------------------------------------------------------------------------------------------------------------
def main(argv, *, config_cls, presets: dict, trainer_cls, validate, doc: str) -> int:
    """The CLI of a policy-gradient module (same options, run directory, resume and exit codes as train.nft):
    0 done, 1 training stopped (reward failure, NaN), 2 bad input (before any work)."""
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
            saved = json.loads(cfg_file.read_text())
            cfg = dataclasses.replace(from_dict(config_cls, saved), **overrides)
            cfg.resume = None
            resume_dir = common.Path(cfg.run_dir)
        validate(cfg)
        reward = build_reward(
            cfg.reward,
            weights=cfg.reward_weights,
            aggregation=cfg.reward_aggregation,
            clip_path=cfg.reward_clip_path,
        )
        run_dir = common.prepare_run_dir(
            cfg.run_dir, algo=algo, resume=str(resume_dir) if resume_dir else None
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
    try:
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
        trainer = trainer_cls(cfg, run_dir, policy, reward, evaluator)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    resume_iter = None
    if resume_dir is not None:
        trainer.load_state_dict(common.load_checkpoint(run_dir))
        resume_iter = trainer.iteration
        print(f"resumed {run_dir} at iteration {trainer.iteration}", flush=True)
    metrics = common.MetricsLogger(
        run_dir, loggers=cfg.log.loggers, config=to_dict(cfg), resume_iteration=resume_iter
    )
    print(
        f"run dir: {run_dir} | device {device} | preset {cfg.preset} | reward {cfg.reward} | "
        f"solver {trainer.solver}",
        flush=True,
    )
    try:
        trainer.run(metrics)
    except common.TrainingStopped as e:
        print(f"error: training stopped: {e}", file=sys.stderr)
        return 1
    finally:
        metrics.close()
    return 0
