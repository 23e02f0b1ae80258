"""What the reward-backpropagation loops share (math.md §5): ``train.draft`` (DRaFT-K, DRaFT+, DRaFT-LV),
``train.alignprop`` and ``train.refl``.

The gradient of a differentiable reward ``R(decode(x))`` runs back through the sampler itself:

* :func:`sample_with_grad` walks the sampler (math.md §1 steps through the fused ``kernels`` ops, which have
  a backward) from the same per-sample Philox noise as ``engine.rollout``; the steps before the gradient
  window run under ``torch.no_grad``; inside it every model forward is wrapped in
  ``torch.utils.checkpoint`` (activation memory grows with the window ``K``, not with the step count), and
  the solver steps, ``x0_hat`` and the decoder keep the graph;
* :class:`RewardBackpropTrainer` is the loop (``train.loop``): per micro-batch sample with grad, decode,
  reward, the method's loss (:meth:`RewardBackpropTrainer.forward_backward`), backward; gradient
  accumulation, clipping and AdamW as in ``train.loop``; the reward must be differentiable
  (:func:`train.rewards.registry.require_differentiable`, checked before any work).

Flow models (SD3, SD3.5, FLUX, the embedded default) have no public reference for these methods: their
versions are derived (math.md §5): the §1 steps on the model's schedule and ``x0_hat = x_t - t v``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

import kernels
import models
from engine import ddim_alpha_bars, guided_prediction, per_sample_randn, timesteps_from_sigmas
from engine.profiling import nvtx_range

from . import common
from .config import ConfigError
from .loop import Trainer, check_at_least_one, validate_run
from .loop import main as loop_main
from .policy import resolve_solver
from .rewards.registry import require_differentiable

__all__ = [
    "RBSampleConfig",
    "RBTrainConfig",
    "Schedule",
    "WindowSample",
    "make_schedule",
    "solver_for",
    "sample_with_grad",
    "x0_from_prediction",
    "noise_to",
    "default_reward",
    "apply_tiny_settings",
    "validate_common",
    "RewardBackpropTrainer",
    "main",
]

SOLVERS = ("auto", "euler", "flow-sde", "cps", "ddim")


def default_reward() -> str:
    """The embedded default's training reward: the learned, differentiable GenEval-mini reward
    ``geneval_learned`` (train.reward_model); the GenEval-mini verifier itself is not differentiable and
    stays the held-out gold score."""
    return "geneval_learned"


@dataclass
class RBSampleConfig:
    solver: str = field(
        default="auto",
        metadata={
            "help": "sampler: auto (euler for flow models, ddim for UNets), euler, flow-sde, cps, ddim"
        },
    )
    num_steps: int = field(default=10, metadata={"help": "sampler steps per rollout"})
    shift: float | None = field(
        default=None,
        metadata={"help": "sigma-schedule shift; none: the model's diffusers scheduler config"},
    )
    eta: float = field(default=0.0, metadata={"help": "DDIM eta (UNets; 0: deterministic)"})
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level (flow-sde / cps)"})
    guidance_scale: float = field(default=1.0, metadata={"help": "CFG scale while sampling (1: none)"})
    prompts_per_iter: int = field(default=16, metadata={"help": "distinct prompts per iteration"})
    images_per_prompt: int = field(default=1, metadata={"help": "images per prompt"})


@dataclass
class RBTrainConfig:
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=10.0, metadata={"help": "gradient-norm clip"})
    batch_size: int = field(default=8, metadata={"help": "images per micro-batch (sampled with grad)"})
    grad_accum: int = field(default=2, metadata={"help": "micro-batches per optimizer step"})
    checkpoint: bool = field(
        default=True, metadata={"help": "gradient checkpointing of every model forward in the window"}
    )
    unit_sample_grads: bool = field(
        default=False,
        metadata={
            "help": "the engine's own option, no reference has it (math.md §5): step on the mean of each "
            "sample's LoRA gradient scaled to unit norm instead of the mean gradient"
        },
    )


# ------------------------------------------------------------------------------------------------------------
# The sampler with a gradient window
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Schedule:
    """``kind`` ``flow`` (``p`` = sigmas ``[N+1]``, last 0) or ``ddim`` (``p`` = alpha_bars ``[N+1]``, the
    last the scheduler's final one); ``timesteps [N]`` the model's timestep input."""

    kind: str
    solver: str
    p: torch.Tensor
    timesteps: torch.Tensor
    sigma_max: float | None

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


def solver_for(solver: str, prediction: str) -> str:
    """``auto``: Euler for flow models (the deterministic sampler DRaFT's DDIM eta 0 corresponds to), DDIM
    for epsilon UNets; an explicit solver must fit the model."""
    return resolve_solver(solver, prediction, flow_auto="euler", flow_fits="euler, flow-sde or cps")


def make_schedule(policy, sc: RBSampleConfig, solver: str) -> Schedule:
    """The model's own schedule (math.md §0; DDIM: its scheduler config's "leading" timesteps, §1)."""
    dev = policy.device
    if solver == "ddim":
        ts, ab = ddim_alpha_bars(sc.num_steps, scheduler_config=policy.scheduler_config)
        return Schedule("ddim", solver, ab.to(dev, torch.float32), ts.to(dev, torch.float32), None)
    sig = policy.sigmas(sc.num_steps, sc.shift).to(torch.float32)
    smax = float(sig[1]) if solver == "flow-sde" and float(sig[0]) == 1.0 else None
    return Schedule("flow", solver, sig.to(dev), timesteps_from_sigmas(sig[:-1]).to(dev), smax)


def x0_from_prediction(kind: str, x: torch.Tensor, pred: torch.Tensor, p0) -> torch.Tensor:
    """math.md §0 / §1: flow ``x0_hat = x - sigma v``; epsilon ``(x - sqrt(1 - ab) eps) / sqrt(ab)``
    (fp32; ``p0`` the step's sigma or alpha_bar, a float or ``[B]``)."""
    p = torch.as_tensor(p0, dtype=torch.float32, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
    if kind == "flow":
        return x.float() - p * pred.float()
    return (x.float() - torch.sqrt(1.0 - p) * pred.float()) / torch.sqrt(p)


def noise_to(kind: str, x0: torch.Tensor, noise: torch.Tensor, p) -> torch.Tensor:
    """``x0`` noised to level ``p``: flow ``(1 - t) x0 + t noise`` (``kernels.interpolate``); epsilon
    ``sqrt(ab) x0 + sqrt(1 - ab) noise`` (DRaFT-LV's re-noising, math.md §5)."""
    if kind == "flow":
        return kernels.interpolate(x0, noise, p)
    ab = torch.as_tensor(p, dtype=torch.float32, device=x0.device).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.sqrt(ab) * x0.float() + torch.sqrt(1.0 - ab) * noise.float()


def _solver_step(sched: Schedule, sc, x, pred, i: int, noise):
    p0, p1 = sched.p[i], sched.p[i + 1]
    b = x.shape[0]
    p0, p1 = p0.expand(b), p1.expand(b)
    if sched.solver == "euler":
        return kernels.euler_step(x, pred, p0, p1)
    if sched.solver == "flow-sde":
        return kernels.sde_step(
            x, pred, p0, p1, noise_level=sc.noise_level, sigma_max=sched.sigma_max, noise=noise
        )[0]
    if sched.solver == "cps":
        return kernels.cps_step(x, pred, p0, p1, noise_level=sc.noise_level, noise=noise)[0]
    return kernels.ddim_step(x, pred, p0, p1, eta=sc.eta, noise=noise)[0]


@dataclass
class WindowSample:
    """What :func:`sample_with_grad` returns: ``x`` the last state reached (the clean sample after the last
    step, or the input of the stop step), ``x0_hat`` the model's clean estimate at the last step taken
    (fp32), ``preds`` / ``ref_preds`` the (CFG-combined) predictions of the window's steps under the trained
    and the reference (adapters off) weights, ``grad_forwards`` the model forwards run with grad."""

    x: torch.Tensor
    x0_hat: torch.Tensor
    preds: list
    ref_preds: list
    grad_forwards: int


def sample_with_grad(
    policy,
    prompts: list,
    seeds,
    sched: Schedule,
    sc: RBSampleConfig,
    *,
    grad_from: int,
    stop_at: int | None = None,
    use_checkpoint: bool = True,
    with_ref: bool = False,
    x_start: torch.Tensor | None = None,
    start: int = 0,
) -> WindowSample:
    """Sample ``prompts`` (one Philox seed each, the noise ``engine.rollout`` draws: step ``i`` at offset
    ``(i + 1) numel``) from step ``start`` (``x_start``; default: pure noise at step 0) with the active
    adapter; steps ``i < grad_from`` under ``no_grad``, steps ``i >= grad_from`` with grad through the model
    (checkpointed per step when ``use_checkpoint``), the solver step and ``x0_hat``.  ``stop_at`` = j: stop
    at step j after its model call, before its solver step (ReFL), ``x0_hat`` being step j's.  ``with_ref``
    also runs the reference model (adapters disabled, no grad) at every window step (DRaFT+'s KL)."""
    den = policy.train_denoiser
    cond = policy.encode(prompts)
    g = float(sc.guidance_scale)
    uncond = policy.encode([""] * len(prompts)) if g != 1.0 else None
    dev, dtype = policy.device, policy.dtype
    seeds_t = torch.tensor([int(s) for s in seeds], dtype=torch.int64, device=dev)
    shape = tuple(policy.latent_shape)
    numel = math.prod(shape)
    b = len(prompts)
    stochastic = sched.solver in ("flow-sde", "cps") or (sched.solver == "ddim" and sc.eta > 0)
    if x_start is None:
        x = per_sample_randn(shape, seeds_t, 0).to(dtype)
    else:
        x = x_start.to(dtype)
    last = sched.num_steps if stop_at is None else stop_at + 1
    preds, refs, x0_hat, forwards = [], [], None, 0

    def predict(xx, tt):
        return guided_prediction(den, xx, tt, cond, uncond=uncond, guidance_scale=g)

    for i in range(start, last):
        t = sched.timesteps[i].expand(b)
        if i < grad_from:
            with torch.no_grad():
                pred = predict(x, t)
        else:
            with nvtx_range(f"rbp/grad step {i}"):
                if use_checkpoint and torch.is_grad_enabled():
                    pred = checkpoint(predict, x, t, use_reentrant=False)
                else:
                    pred = predict(x, t)
            forwards += 1
            preds.append(pred)
            if with_ref:
                with torch.no_grad(), policy.adapters_disabled():
                    refs.append(predict(x.detach(), t))
        if i == last - 1:
            x0_hat = x0_from_prediction(sched.kind, x, pred, sched.p[i])
        if stop_at is not None and i == stop_at:
            break
        noise = per_sample_randn(shape, seeds_t, (i + 1) * numel, dtype=dtype) if stochastic else None
        if noise is None:
            noise = torch.zeros_like(x) if sched.solver == "ddim" else None
        if i < grad_from:
            with torch.no_grad():
                x = _solver_step(sched, sc, x, pred, i, noise)
        else:
            x = _solver_step(sched, sc, x, pred, i, noise)
    return WindowSample(x, x0_hat, preds, refs, forwards)


def apply_tiny_settings(cfg):
    """The embedded default on a CPU, shared by the three ``tiny`` presets: 10 steps on the shipped SD3
    schedule, CFG-free, 16 images per iteration in one optimizer step of two micro-batches of 8, LoRA rank
    32 (as train.nft's tiny preset), one torch thread, a 13-minute budget, evaluation every 10 iterations
    (GenEval-mini's verifier on the held-out prompts: the gold score next to the training reward)."""
    cfg.threads = 1
    cfg.max_minutes = 13.0
    cfg.models.lora_rank, cfg.models.lora_alpha = 32, 32.0
    cfg.sample.num_steps, cfg.sample.prompts_per_iter, cfg.sample.images_per_prompt = 10, 16, 1
    cfg.train.batch_size, cfg.train.grad_accum = 8, 2
    cfg.eval.every = 10
    return cfg


# ------------------------------------------------------------------------------------------------------------
# Config checks and the trainer
# ------------------------------------------------------------------------------------------------------------
def check_counts(cfg) -> None:
    """The step, prompt, image and batch counts must be >= 1: checked first by the methods whose own
    checks use them (a zero step count is then named as such, not as a window that does not fit)."""
    sc, tc = cfg.sample, cfg.train
    check_at_least_one(
        [
            ("--sample.num-steps", sc.num_steps),
            ("--sample.prompts-per-iter", sc.prompts_per_iter),
            ("--sample.images-per-prompt", sc.images_per_prompt),
            ("--train.batch-size", tc.batch_size),
            ("--train.grad-accum", tc.grad_accum),
        ]
    )


def validate_common(cfg, *, embedded_presets=("tiny",)) -> None:
    """The checks every reward-backprop config shares, before any work; the embedded default's reward
    defaults to :func:`default_reward`."""
    sc = cfg.sample
    if sc.solver not in SOLVERS:
        raise ConfigError(f"--sample.solver: expected one of {', '.join(SOLVERS)}, got {sc.solver!r}")
    check_counts(cfg)  # negative eta, noise level and guidance scale: validate_run, as for every loop
    embedded = cfg.preset in embedded_presets and not cfg.model
    if embedded and cfg.reward is None:
        cfg.reward = default_reward()
    validate_run(cfg, embedded_presets=embedded_presets, unet_ok=True)
    if embedded:
        pred = "flow"
    else:
        from models.loader import resolve_model_dir

        pred = "epsilon" if resolve_model_dir(cfg.model)[1] == "UNet2DConditionModel" else "flow"
    solver_for(sc.solver, pred)


class RewardBackpropTrainer(Trainer):
    """The shared loop; a method implements :meth:`forward_backward` on one micro-batch."""

    algo = "rbp"

    @classmethod
    def check_reward(cls, reward) -> None:
        """Called by ``train.loop.main`` before any work: the reward must keep its graph to the images."""
        require_differentiable(reward, option="--reward")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.check_reward(self.reward)
        pred = getattr(self.policy.denoiser, "prediction_type", "flow")
        self.solver = solver_for(self.cfg.sample.solver, pred)
        self.sched = make_schedule(self.policy, self.cfg.sample, self.solver)

    def describe(self) -> str:
        sc = self.cfg.sample
        return f"{self.solver} {sc.num_steps} steps, CFG {sc.guidance_scale:g}"

    def reward_of(self, x: torch.Tensor, prompts: list) -> torch.Tensor:
        """The reward of clean latents ``x``, decoded with grad -> ``[b]`` fp32 on the policy's device."""
        images = self.policy.decode(x)
        r, _ = self.reward(images, prompts)
        return r.to(x.device)

    def forward_backward(self, prompts, seeds, weight: float, gen: torch.Generator) -> dict:
        """Sample, reward, loss and ``(loss * weight).backward()`` for one micro-batch -> per-micro-batch
        stats (floats or 0-d tensors: ``reward``, ``loss`` and the method's own)."""
        raise NotImplementedError

    def _per_sample(self, batch: int):
        """:func:`models.per_sample_lora_grads` on the trained adapter with ``--train.unit-sample-grads``, a
        no-op context otherwise."""
        if not self.cfg.train.unit_sample_grads:
            return contextlib.nullcontext(None)
        return models.per_sample_lora_grads(self.policy.transformer, batch, "default")

    def _add_unit_grads(self, acc: dict, ps, weight: float) -> torch.Tensor:
        """``acc[p] += weight * mean_n g_n / |g_n|`` over the micro-batch's samples ``n`` (``|g_n|`` the norm
        of sample ``n``'s gradient over every LoRA weight, math.md §5) -> the mean ``|g_n|``."""
        units, norms = ps.unit_sum()
        for p, u in zip(ps.params, units, strict=True):
            acc[p].add_(u, alpha=weight / norms.shape[0])
        return norms.mean()

    def _set_unit_grads(self, acc: dict) -> None:
        """The accumulated unit gradients become the parameters' gradients (averaged over ranks, as DDP
        averages the plain ones; times the fp16 gradient scaler's scale, which the step divides out)."""
        grads = self.dist.all_reduce_mean([acc[p] for p in self.params])
        scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        for p, g in zip(self.params, grads, strict=True):
            p.grad = (g.mul_(scale) if scale != 1.0 else g).to(p.dtype)

    def train_iteration(self, it: int) -> tuple[dict, str]:
        """Every step of the iteration samples, scores and backpropagates in this thread (no reward worker
        runs beside it), so all of it is the training phase (``--train-threads``)."""
        with self.train_phase():
            return self._train_steps(it)

    def _train_steps(self, it: int) -> tuple[dict, str]:
        cfg, tc = self.cfg, self.cfg.train
        plan = self.iteration_plan(it)
        sums: dict[str, torch.Tensor | float] = {}
        count = 0
        for si, mbs in enumerate(self.progress(plan.steps(tc.batch_size), "train")):
            self.opt.zero_grad(set_to_none=True)
            acc = None  # --train.unit-sample-grads: the step's unit gradients, reduced over ranks by hand
            if tc.unit_sample_grads:
                acc = {p: torch.zeros_like(p, dtype=torch.float32) for p in self.params}
            for mi, mb in enumerate(mbs):
                gidx = mb.gidx.tolist()
                prompts = [plan.prompts[i] for i in gidx]
                seeds = [plan.seeds[i] for i in gidx]
                gen = common.iteration_generator(cfg.seed, it, f"rbp/{si}/{mi}")
                with (
                    self.dist.grad_sync(mi == len(mbs) - 1 and acc is None),
                    self.policy.adapter("default"),
                    self._per_sample(len(prompts)) as ps,
                ):
                    stats = self.forward_backward(prompts, seeds, mb.weight, gen)
                if ps is not None:
                    stats["sample_grad_norm"] = self._add_unit_grads(acc, ps, mb.weight)
                if mb.dummy:
                    continue
                count += 1
                for k, v in stats.items():
                    v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                    sums[k] = sums.get(k, 0.0) + v
            if acc is not None:
                self._set_unit_grads(acc)
            self.check_finite_rollouts()
            self.optimizer_step()
        vals = {f"train/{k}": float(v) / max(count, 1) for k, v in sums.items()}
        vals["train/reward_mean"] = vals.pop("train/reward", 0.0)
        summary = f"reward {vals['train/reward_mean']:.4f} | loss {vals.get('train/loss', 0.0):.4e}"
        if "train/kl" in vals:
            summary += f" | kl {vals['train/kl']:.2e}"
        return vals, summary


main = loop_main
