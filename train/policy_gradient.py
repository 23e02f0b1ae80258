"""What the policy-gradient loops share: Flow-GRPO (math.md §3, ``train.grpo``) and DDPO / DPOK (math.md §4,
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
optimisation pass of an iteration, before any parameter changes: math.md §3 requires it to be exactly 0.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

import kernels
from engine import BatchInvariantDenoiser, guided_prediction, nvtx_range, rollout

from . import common
from .config import ConfigError
from .evaluation import Evaluator
from .loop import LogConfig, RunConfig, Trainer, validate_run, wait_for_rewards
from .loop import main as loop_main
from .policy import Policy, resolve_solver

__all__ = [
    "PGRunConfig",
    "PGSampleConfig",
    "PGTrainConfig",
    "LogConfig",
    "Trajectories",
    "GroupBatch",
    "StepScore",
    "collect_rollouts",
    "score_steps",
    "score_transitions",
    "ppo_clip_loss",
    "reinforce_loss",
    "flow_grpo_kl",
    "gaussian_step_kl",
    "PerPromptStatTracker",
    "PolicyGradientTrainer",
    "apply_tiny_settings",
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
    shift: float | None = field(
        default=None,
        metadata={
            "help": "sigma-schedule shift; none: the model's diffusers scheduler config (SD3/SD3.5 and the "
            "embedded default: 3.0); a value overrides the config's static shift (not under dynamic shifting)"
        },
    )
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level a (flow-sde / cps)"})
    cps_log_prob: str = field(
        default="reference",
        metadata={
            "help": "cps log-prob: reference (flow_grpo's -mean (x' - mean)^2) or gaussian (Gaussian density)"
        },
    )
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


PGRunConfig = RunConfig  # the top-level options every loop shares (train.loop)


def apply_tiny_settings(cfg):
    """The embedded-default settings train.grpo and train.ddpo share in their ``tiny`` presets: 16 prompts
    x 8 images per iteration, 10 ``cps`` SDE steps, two optimizer steps of 64 samples, lr 1e-3, clip 1e-3,
    20 ODE steps for evaluation (``cps`` rather than ``flow-sde``: see train.grpo's preset), one torch thread
    (as train.nft's tiny preset)."""
    cfg.threads = 1
    cfg.sample.solver, cfg.sample.prompts_per_iter, cfg.sample.images_per_prompt = "cps", 16, 8
    cfg.train.lr, cfg.train.clip_range, cfg.train.batch_size, cfg.train.grad_accum = 1e-3, 1e-3, 16, 4
    cfg.eval.num_steps = 20
    return cfg


def validate_common(cfg, *, embedded_presets=("tiny",), unet_ok: bool = False) -> None:
    """Checks every policy-gradient config shares (the algorithm adds its own); presets other than
    ``embedded_presets`` (which run the embedded default) need ``--model`` (a UNet only where ``unet_ok``)."""
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
    if sc.cps_log_prob not in kernels.CPS_LOG_PROB_FORMS:
        raise ConfigError(f"--sample.cps-log-prob: expected reference or gaussian, got {sc.cps_log_prob!r}")
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
    validate_run(cfg, embedded_presets=embedded_presets, unet_ok=unet_ok)


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
    plan: object = None  # the IterationPlan these (local) rollouts belong to (train.distributed)
    cps_log_prob: str = "reference"  # the cps log-prob form of ``log_probs`` (kernels.cps_step)

    def __len__(self) -> int:
        return self.states.shape[0]


@dataclass
class GroupBatch:
    """The global view of one iteration's rewards (every rank's, all-gathered): what advantages need."""

    prompts: list
    group_ids: torch.Tensor
    rewards: torch.Tensor
    reward_components: dict

    def __len__(self) -> int:
        return len(self.prompts)


def _transition(
    solver, x, pred, p0, p1, *, noise_level, eta, sigma_max, prev_sample, cps_log_prob="reference"
):
    """The rollout's SDE step (math.md §1) re-scored at ``prev_sample`` -> ``(_, log_prob, mean, std)``."""
    if solver == "flow-sde":
        return kernels.sde_step(
            x, pred, p0, p1, noise_level=noise_level, sigma_max=sigma_max, prev_sample=prev_sample
        )
    if solver == "cps":
        return kernels.cps_step(
            x, pred, p0, p1, noise_level=noise_level, prev_sample=prev_sample, log_prob_form=cps_log_prob
        )
    return kernels.ddim_step(x, pred, p0, p1, eta=eta, prev_sample=prev_sample)


def reference_std_dev_t(solver, p0, p1, *, noise_level, sigma_max=None, std=None):
    """flow_grpo's ``std_dev_t`` of a step ``[b]`` (yifan123/flow_grpo@54809b5f
    flow_grpo/diffusers_patch/sd3_sde_with_logprob.py): flow-sde ``a sqrt(sigma / (1 - sigma'))`` with
    ``sigma' = sigma_max`` where ``sigma == 1``, WITHOUT the step's ``sqrt(-dt)`` (math.md §3); cps
    ``sigma_next sin(a pi / 2)``, the transition's own std (``std``, as ddim's)."""
    if solver == "flow-sde":
        smax = sigma_max if sigma_max is not None else torch.zeros_like(p0)
        return kernels.reference.sde_std(p0.float(), p1.float(), float(noise_level), smax.float())
    return std


def _schedule(traj_or_batch, steps: torch.Tensor):
    if traj_or_batch.solver == "ddim":
        return traj_or_batch.alpha_bars[steps], traj_or_batch.alpha_bars[steps + 1]
    return traj_or_batch.sigmas[steps], traj_or_batch.sigmas[steps + 1]


def _stochastic_steps(batch, sde_steps) -> tuple[int, ...]:
    """The SDE steps whose transition std is > 0 (CPS's last step to ``sigma_next = 0``, and DDIM's last step
    where the scheduler's ``final_alpha_cumprod`` is 1, are deterministic: no density, no gradient; SD1.x's
    DDIM last step, to ``alphas_cumprod[0]``, is stochastic and trained, as in ddpo-pytorch)."""
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
    await_rewards=None,
) -> Trajectories:
    """Roll out ``prompts`` (one Philox seed each) with the active adapter in micro-batches of
    ``sc.rollout_batch``, keeping trajectory and per-step log-probs; rewards run on ``pool`` while the next
    micro-batch samples.  ``await_rewards(futures) -> (rewards, components)`` collects them (default: here,
    re-raising a reward's error)."""
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
                sigmas=policy.sigmas(sc.num_steps, sc.shift) if solver != "ddim" else None,
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
                scheduler_config=getattr(policy, "scheduler_config", None) if solver == "ddim" else None,
                cps_log_prob=sc.cps_log_prob,
            )
            states.append(last.trajectory)
            log_probs.append(last.log_probs)
            images = policy.decode(last.x0)
            futures.append(pool.submit(reward, images.cpu(), [policy.prompt_text(p) for p in mb]))
    with nvtx_range("reward"):
        rewards, components = (await_rewards or wait_for_rewards)(futures)
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
        rewards=rewards,
        reward_components=components,
        cps_log_prob=sc.cps_log_prob,
    )


@dataclass
class StepScore:
    """A re-scored transition: ``log_prob [b]`` (differentiable), ``mean`` fp32 ``[b, ...]``, ``std [b]`` (the
    transition's), ``std_dev_t [b]`` (flow_grpo's, :func:`reference_std_dev_t`) and ``mean_ref`` /
    ``log_prob_ref`` (adapters disabled, no grad) when asked for."""

    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    mean_ref: torch.Tensor | None = None
    std_dev_t: torch.Tensor | None = None
    log_prob_ref: torch.Tensor | None = None


def score_steps(
    policy: Policy, traj: Trajectories, rows: torch.Tensor, steps: torch.Tensor, *, with_ref: bool = False
) -> StepScore:
    """Log-prob of the stored transition ``states[r, s] -> states[r, s+1]`` for each ``(r, s)`` pair under the
    active adapter: the rollout's prediction (same batch-invariant denoiser, timestep floats, cached
    conditioning, CFG arithmetic and dtype) and the same fused step, scored at the stored ``prev_sample``."""
    dev = traj.states.device
    rows, steps = rows.to(dev), steps.to(dev)
    prompts = [traj.prompts[i] for i in rows.tolist()]
    x = traj.states[rows, steps]
    prev = traj.states[rows, steps + 1]
    return score_transitions(policy, traj, prompts, x, prev, steps, with_ref=with_ref)


def score_transitions(
    policy: Policy,
    traj,
    prompts: list,
    x: torch.Tensor,
    prev: torch.Tensor,
    steps: torch.Tensor,
    *,
    with_ref: bool = False,
) -> StepScore:
    """:func:`score_steps` for explicit transitions ``x -> prev`` at schedule steps ``steps`` (``traj``
    supplies the schedule and the sampler settings: a :class:`Trajectories` or any object with its schedule
    fields), e.g. the branched candidates of train.spo."""
    dev = x.device
    steps = steps.to(dev)
    cond = policy.encode(prompts)
    uncond = policy.encode([""] * len(prompts)) if traj.guidance_scale != 1.0 else None
    timestep = traj.timesteps[steps]
    p0, p1 = _schedule(traj, steps)
    sigma_max = (
        torch.full((len(prompts),), traj.sigma_max, dtype=torch.float32, device=dev)
        if traj.sigma_max
        else None
    )
    kw = dict(
        noise_level=traj.noise_level,
        eta=traj.eta,
        sigma_max=sigma_max,
        prev_sample=prev,
        cps_log_prob=traj.cps_log_prob,
    )

    def predict(denoiser):
        return guided_prediction(
            denoiser, x, timestep, cond, uncond=uncond, guidance_scale=traj.guidance_scale
        )

    # the gradient-carrying forward goes through policy.train_denoiser (DDP under torchrun): same module,
    # same numbers
    train_denoiser = getattr(policy, "train_denoiser", policy.denoiser)
    _, log_prob, mean, std = _transition(traj.solver, x, predict(train_denoiser), p0, p1, **kw)
    mean_ref = log_prob_ref = None
    if with_ref:
        with torch.no_grad(), policy.adapters_disabled():
            _, log_prob_ref, mean_ref, _ = _transition(traj.solver, x, predict(policy.denoiser), p0, p1, **kw)
    std_dev_t = reference_std_dev_t(
        traj.solver, p0, p1, noise_level=traj.noise_level, sigma_max=sigma_max, std=std
    )
    return StepScore(
        log_prob=log_prob,
        mean=mean,
        std=std,
        mean_ref=mean_ref,
        std_dev_t=std_dev_t,
        log_prob_ref=log_prob_ref,
    )


# ------------------------------------------------------------------------------------------------------------
# Losses (per trained step; every reduction over the batch is a mean)
# ------------------------------------------------------------------------------------------------------------
def ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range: float):
    """math.md §3 / §4 (DDPO-IS) PPO clip of one step -> ``(loss, ratio)``:
    ``ratio = exp(logp - logp_old)``, ``loss = mean_b max(-A ratio, -A clamp(ratio, 1 - eps, 1 + eps))``."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


def reinforce_loss(log_prob, advantages):
    """math.md §4 DDPO-SF (score function, REINFORCE) for one step: ``-mean_b(logp_t A)``."""
    return -(log_prob * advantages).mean()


def flow_grpo_kl(mean, mean_ref, std):
    """math.md §3 KL term per sample ``[b]``: ``mean_dims (mean_theta - mean_ref)^2 / (2 std^2)``.

    With ``std`` flow_grpo's ``std_dev_t`` (:attr:`StepScore.std_dev_t`; yifan123/flow_grpo@ac4c86e8
    scripts/train_sd3.py: ``((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=(1,2,3), keepdim=True)
    / (2 * std_dev_t ** 2)``) it is the reference's KL, on the scale its ``kl_beta`` values are tuned for;
    with the transition's std (:attr:`StepScore.std`, ``std_t sqrt(-dt)`` for flow-sde) it is the exact KL of
    the two step Gaussians (``--train.kl-form gaussian``).  For cps both stds are ``sigma_next sin(a pi/2)``.
    """
    diff = (mean.float() - mean_ref.float()).flatten(1)
    return (diff**2).mean(1) / (2.0 * std.float() ** 2)


def gaussian_step_kl(mean, mean_ref, std):
    """math.md §4 DPOK: ``KL(p_theta(.|x_t) || p_ref(.|x_t))`` per sample ``[b]`` with the closed form of
    math.md §1
    (``kernels.gaussian_kl``, averaged over dims like the log-probs); both transitions share the
    schedule's ``std``."""
    return kernels.gaussian_kl(mean, std, mean_ref, std, reduce="mean")


# ------------------------------------------------------------------------------------------------------------
# DDPO's per-prompt reward statistics
# ------------------------------------------------------------------------------------------------------------
class PerPromptStatTracker:
    """DDPO's baseline (math.md §4): a running buffer of the last ``buffer_size`` rewards per prompt;
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
class PolicyGradientTrainer(Trainer):
    """Rollout (current ``default`` adapter; its log-probs are PPO's "old" ones) -> reward -> advantage ->
    per-step policy-gradient updates -> eval EMA -> evaluation -> checkpoint.  Subclasses define
    :meth:`advantages` and :meth:`step_loss` (and may add state with :meth:`extra_state`)."""

    algo = "pg"

    @classmethod
    def logs_kl(cls, cfg) -> bool:
        """``train/kl`` is the KL to the reference only with ``--train.kl-beta > 0`` (else no reference
        pass: it reads 0)."""
        return getattr(cfg.train, "kl_beta", 0.0) > 0

    def __init__(self, cfg, run_dir, policy: Policy, reward, evaluator: Evaluator, dist=None):
        super().__init__(cfg, run_dir, policy, reward, evaluator, dist=dist)
        pred = getattr(policy.denoiser, "prediction_type", "flow")
        self.solver = resolve_solver(
            cfg.sample.solver, pred, flow_auto="flow-sde", flow_fits="flow-sde or cps"
        )
        if not isinstance(policy.denoiser, BatchInvariantDenoiser):
            same = policy.train_denoiser is policy.denoiser
            chunk, autocast = cfg.sample.forward_chunk, cfg.train.autocast
            policy.denoiser = BatchInvariantDenoiser(policy.denoiser, chunk, autocast=autocast)
            if same:
                policy.train_denoiser = policy.denoiser
            else:  # DDP: the same chunked forward around the wrapper, so training re-scores bit for bit
                policy.train_denoiser = BatchInvariantDenoiser(
                    policy.train_denoiser, chunk, autocast=autocast
                )
                policy.train_denoiser.prediction_type = policy.denoiser.prediction_type

    def describe(self) -> str:
        return f"solver {self.solver}"

    # --- algorithm hooks ------------------------------------------------------------------------------------
    def advantages(self, traj: Trajectories) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """-> ``(advantages [B], train mask [B] bool, metrics)``."""
        raise NotImplementedError

    def step_loss(self, score: StepScore, old_log_prob, adv, n_steps: int) -> tuple[torch.Tensor, dict]:
        """-> ``(loss of this step, already scaled as it enters the iteration's objective, parts)``;
        ``parts``        holds detached tensors: ``ratio`` [b] and any of ``policy``, ``kl`` (scalars)."""
        raise NotImplementedError

    # --- one iteration --------------------------------------------------------------------------------------
    def rollout_and_reward(self, it: int) -> Trajectories:
        """This rank's share of iteration ``it``'s rollouts (see :class:`train.distributed.IterationPlan`),
        with this rank's rewards; ``traj.plan`` maps them to the global batch."""
        sc = self.cfg.sample
        plan = self.iteration_plan(it)
        with nvtx_range("rollout"), self.policy.adapter("default"):
            traj = collect_rollouts(
                self.policy,
                plan.local_prompts(),
                plan.group_ids[plan.local],
                plan.local_seeds(),
                sc,
                solver=self.solver,
                reward=self.reward,
                pool=self.pool,
                progress=self.progress,
                await_rewards=self.await_rewards,
            )
        traj.plan = plan
        return traj

    def global_batch(self, traj: Trajectories) -> GroupBatch:
        """Every rank's rewards all-gathered into the global order: advantages see whole prompt groups."""
        plan = traj.plan
        return GroupBatch(
            prompts=plan.prompts,
            group_ids=plan.group_ids,
            rewards=self.to_global(plan, traj.rewards.float()),
            reward_components={k: self.to_global(plan, v.float()) for k, v in traj.reward_components.items()},
        )

    def train_on(self, it: int, traj: Trajectories, adv: torch.Tensor, mask: torch.Tensor) -> dict:
        """Per-step updates over the samples in ``mask`` (``adv`` / ``mask`` in ``traj``'s local order): each
        sample trains on a random ``timestep_fraction`` of its SDE steps (keyed by its global index); an
        optimizer step covers one chunk of the global training order (see
        :class:`train.distributed.IterationPlan`);
        ``ratio/first_abs_dev`` covers every log-prob computed before the iteration's first optimizer step
        (first pass, unchanged parameters)."""
        cfg, tc = self.cfg, self.cfg.train
        plan = traj.plan
        dev = traj.states.device
        mask_g = self.to_global(plan, mask.to(torch.uint8)).bool().cpu()
        n = len(plan.prompts)
        steps_all = torch.tensor(traj.train_steps, dtype=torch.long)
        n_train = max(1, int(tc.timestep_fraction * len(steps_all)))
        stats = {"policy": 0.0, "kl": 0.0, "clip_frac": 0.0, "approx_kl": 0.0}
        count, micro, loss_sum, first_dev, first_n, max_dev = 0, 0, 0.0, 0.0, 0, 0.0
        if int(mask_g.sum()) == 0 or len(steps_all) == 0:
            # nothing to optimise (every group had equal rewards): no ratio was computed, none deviated
            return {"train/trained_samples": 0, "ratio/first_abs_dev": 0.0, "ratio/first_count": 0}
        start_step = self.opt_step
        g = common.iteration_generator(cfg.seed, it, "train")
        adv = adv.to(dev)
        for epoch in range(tc.inner_epochs):
            order = plan.order if epoch == 0 else torch.randperm(n, generator=g)
            t_idx = torch.stack(
                [steps_all[torch.randperm(len(steps_all), generator=g)[:n_train]] for _ in range(n)]
            )  # [n, n_train]: per-sample trained steps (global index), in random order
            self.opt.zero_grad(set_to_none=True)
            for mbs in self.progress(
                plan.steps(tc.batch_size, trainable=mask_g, order=order), f"train {epoch + 1}"
            ):
                first_pass = epoch == 0 and self.opt_step == start_step
                for mi, mb in enumerate(mbs):
                    rows, steps = mb.rows, t_idx[mb.gidx]
                    for j in range(n_train):
                        last = mi == len(mbs) - 1 and j == n_train - 1
                        with self.dist.grad_sync(last):
                            score = score_steps(self.policy, traj, rows, steps[:, j], with_ref=tc.kl_beta > 0)
                            old = traj.log_probs[rows.to(dev), steps[:, j].to(dev)]
                            loss, parts = self.step_loss(score, old, adv[rows.to(dev)], n_train)
                            (loss * mb.weight).backward()
                        if mb.dummy:
                            continue
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
                    micro += 0 if mb.dummy else 1
                self.optimizer_step()
        trained = int((mask.bool()).sum())
        out = {f"train/{k}": v / max(count, 1) for k, v in stats.items()}
        out.update(
            {
                "train/loss": loss_sum / max(micro, 1),
                "train/trained_samples": trained,
                "train/trained_steps": n_train,
                "ratio/first_abs_dev": first_dev,
                "ratio/first_count": first_n,
                "ratio/max_abs_dev": max_dev,
            }
        )
        return out

    def train_iteration(self, it: int) -> tuple[dict, str]:
        traj = self.rollout_and_reward(it)
        batch = self.global_batch(traj)
        adv_g, mask_g, adv_stats = self.advantages(batch)  # over whole groups, identical on every rank
        local = traj.plan.local
        with self.train_phase():
            stats = self.train_on(it, traj, adv_g[local], mask_g[local])
        vals = {
            "train/reward_mean": batch.rewards.mean(),
            "train/reward_std": batch.rewards.std(unbiased=False),
            **adv_stats,
            **stats,
        }
        if len(batch.reward_components) > 1:
            vals.update({f"train/reward/{k}": v.mean() for k, v in batch.reward_components.items()})
        if stats["train/trained_samples"]:
            summary = (
                f"reward {float(batch.rewards.mean()):.3f} | loss {stats['train/loss']:.3e} | "
                f"kl {stats.get('train/kl', 0.0):.2e} | ratio dev {stats['ratio/first_abs_dev']:.1e}"
            )
        else:
            summary = f"reward {float(batch.rewards.mean()):.3f} | every group has equal rewards: no update"
        return vals, summary


main = loop_main
