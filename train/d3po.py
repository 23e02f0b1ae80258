"""D3PO (arXiv 2311.13231): online trajectory-level DPO without a reward model's gradient, as math.md §6
defines it.  ``python -m train.d3po --help``.

Per iteration:
  1. ``--sample.prompts-per-iter`` prompts, ``--sample.images-per-prompt`` PAIRS per prompt; the two
     trajectories of a pair are sampled with the current ``default`` adapter from the same initial noise
     ``x_T`` (different step noise), storing every state;
  2. rewards of both final images; the higher reward wins, a tie carries no preference (yk7333/d3po@40d31758
     scripts/rm/train_d3po.py ``compare``: a zero preference gives a constant loss) and is not trained;
  3. for every stochastic step ``j`` (shuffled per pair, the same ``j`` for winner and loser; a random
     ``--train.timestep-fraction`` of them): ``logp`` of the stored next state under the trainable adapter and
     under the frozen pretrained model (adapters disabled), ``q = log clamp(exp(logp - logp_ref), 1 - eps,
     1 + eps)``, ``loss_j = -log sigmoid(beta (q_w - q_l))``; the optimizer step's loss is the mean over
     its pairs and trained steps (the reference accumulates the per-step losses of a batch into one step);
  4. eval EMA, evaluation, sample grid, checkpoint (train.loop).

Log-probs: DDIM with ``eta > 0`` on epsilon UNets (SD1.5: the Gaussian log-density averaged over dims, CFG
noise prediction, as the reference); on flow models the engine's SDE step's log-prob (``flow-sde``:
Flow-GRPO's Gaussian, averaged over dims; ``cps``) -- the engine's own derivation, not in the reference.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import kernels
from engine import ddim_alpha_bars, guided_prediction, nvtx_range, per_sample_randn, timesteps_from_sigmas

from . import common
from .config import ConfigError
from .evaluation import EvalConfig
from .loop import check_at_least_one, validate_run
from .loop import main as loop_main
from .policy import ModelConfig
from .policy_gradient import (
    PGRunConfig,
    PGSampleConfig,
    PolicyGradientTrainer,
    _stochastic_steps,
    score_transitions,
)

__all__ = [
    "D3POConfig",
    "D3POTrainer",
    "StepSchedule",
    "build_schedule",
    "sample_step",
    "d3po_q",
    "d3po_loss",
    "d3po_preference",
    "main",
]


# ------------------------------------------------------------------------------------------------------------
# Losses (math.md §6)
# ------------------------------------------------------------------------------------------------------------
def d3po_q(log_prob, log_prob_ref, eps: float):
    """math.md §6 ``q = log clamp(exp(logp - logp_ref), 1 - eps, 1 + eps)`` per sample, computed as
    ``clamp(logp - logp_ref, log(1 - eps), log(1 + eps))``: the same values and the same gradient (1 inside
    the range, 0 outside, as ``torch.clamp`` in the reference), without the reference's ``0 * exp(large) =
    NaN`` gradient when a ratio overflows."""
    return torch.clamp(log_prob - log_prob_ref, math.log1p(-eps), math.log1p(eps))


def d3po_loss(lp_w, lp_ref_w, lp_l, lp_ref_l, *, beta: float, eps: float):
    """math.md §6 per-step loss ``mean_b -log sigmoid(beta (q_w - q_l))`` -> ``(loss, q_w, q_l)``."""
    q_w, q_l = d3po_q(lp_w, lp_ref_w, eps), d3po_q(lp_l, lp_ref_l, eps)
    return -F.logsigmoid(beta * (q_w - q_l)).mean(), q_w, q_l


def d3po_preference(r0: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """Which trajectory of a pair wins -> ``[B]`` long: 0 or 1, -1 for a tie (no preference).  The reference's
    ``compare`` on one reward: the higher reward wins."""
    out = torch.full(r0.shape, -1, dtype=torch.long)
    out[r0 > r1] = 0
    out[r1 > r0] = 1
    return out


# ------------------------------------------------------------------------------------------------------------
# A step-by-step sampler on the rollout's arithmetic (shared x_T, branching: train.spo)
# ------------------------------------------------------------------------------------------------------------
@dataclass
class StepSchedule:
    """The schedule and sampler settings of a run (duck-types :class:`train.policy_gradient.Trajectories` for
    :func:`train.policy_gradient.score_transitions`)."""

    solver: str
    timesteps: torch.Tensor  # [N] the model's timestep input
    sigmas: torch.Tensor | None  # [N+1] flow
    alpha_bars: torch.Tensor | None  # [N+1] ddim
    sigma_max: float | None
    noise_level: float
    eta: float
    guidance_scale: float
    cps_log_prob: str
    train_steps: tuple = ()

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def x0_time(self, step: int) -> float:
        """The noise level in [0, 1] of the state entering step ``step`` (``sigma``, or
        ``sqrt(1 - alpha_bar)`` for DDIM; 0 at the clean sample ``step == N``)."""
        if self.sigmas is not None:
            return float(self.sigmas[step])
        return float(torch.sqrt(1.0 - self.alpha_bars[step])) if step < self.num_steps else 0.0


def build_schedule(policy, sc, solver: str) -> StepSchedule:
    """The schedule :func:`engine.rollout` uses for ``sc`` (the model's scheduler config, math.md §0/§1)."""
    dev = policy.device
    if solver == "ddim":
        ts, alpha_bars = ddim_alpha_bars(
            sc.num_steps, scheduler_config=getattr(policy, "scheduler_config", None)
        )
        timesteps, sigmas = ts.to(torch.float32), None
    else:
        sigmas = policy.sigmas(sc.num_steps, sc.shift).to(torch.float32)
        timesteps, alpha_bars = timesteps_from_sigmas(sigmas[:-1]), None
    sigma_max = None
    if solver == "flow-sde" and float(sigmas[0]) == 1.0:
        sigma_max = float(sigmas[1])
    sched = StepSchedule(
        solver=solver,
        timesteps=timesteps.to(dev),
        sigmas=sigmas.to(dev) if sigmas is not None else None,
        alpha_bars=alpha_bars.to(dev) if alpha_bars is not None else None,
        sigma_max=sigma_max,
        noise_level=float(sc.noise_level),
        eta=float(sc.eta),
        guidance_scale=float(sc.guidance_scale),
        cps_log_prob=sc.cps_log_prob,
    )

    class _Probe:  # _stochastic_steps reads a RolloutBatch's fields
        x0 = torch.zeros(1, device=dev)

    probe = _Probe()
    for k in ("solver", "sigmas", "alpha_bars", "noise_level", "eta"):
        setattr(probe, k, getattr(sched, k))
    sched.train_steps = _stochastic_steps(probe, range(sched.num_steps))
    return sched


def sample_step(policy, sched: StepSchedule, x, step: int, cond, uncond, noise):
    """One rollout step ``x -> x'`` at schedule step ``step`` with the active adapter (the batch-invariant
    denoiser, CFG arithmetic and fused kernel of :func:`engine.rollout`), given the step's ``noise`` -> ``(x',
    log_prob [B])``."""
    b = x.shape[0]
    t = sched.timesteps[step].expand(b).contiguous()
    pred = guided_prediction(policy.denoiser, x, t, cond, uncond=uncond, guidance_scale=sched.guidance_scale)
    if sched.solver == "ddim":
        p0, p1 = sched.alpha_bars[step].expand(b), sched.alpha_bars[step + 1].expand(b)
        out = kernels.ddim_step(x, pred, p0, p1, eta=sched.eta, noise=noise)
    else:
        p0, p1 = sched.sigmas[step].expand(b), sched.sigmas[step + 1].expand(b)
        if sched.solver == "flow-sde":
            smax = torch.full((b,), sched.sigma_max, device=x.device) if sched.sigma_max else None
            out = kernels.sde_step(
                x, pred, p0, p1, noise_level=sched.noise_level, sigma_max=smax, noise=noise
            )
        else:
            out = kernels.cps_step(
                x, pred, p0, p1, noise_level=sched.noise_level, noise=noise, log_prob_form=sched.cps_log_prob
            )
    return out[0], out[1]


def step_noise(policy, seeds: torch.Tensor, step: int) -> torch.Tensor:
    """The Philox noise of step ``step`` for per-sample ``seeds`` (the engine's stream layout: ``x_T`` at
    offset 0, step ``i`` at ``(i + 1) numel``)."""
    numel = math.prod(policy.latent_shape)
    return per_sample_randn(policy.latent_shape, seeds, (step + 1) * numel).to(policy.dtype)


def initial_noise(policy, seeds: torch.Tensor) -> torch.Tensor:
    return per_sample_randn(policy.latent_shape, seeds, 0).to(policy.dtype)


def member_seeds(seeds: list, member: int) -> torch.Tensor:
    """Step-noise seeds of pair member ``member`` (0/1) from the pairs' seeds (``x_T`` uses the pair seed)."""
    return torch.tensor([common.derive_seed(int(s), "member", member) for s in seeds], dtype=torch.int64)


# ------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------
@dataclass
class D3POSampleConfig(PGSampleConfig):
    solver: str = field(
        default="auto",
        metadata={"help": "auto (flow-sde for flow models, ddim for UNets), flow-sde, cps, ddim"},
    )
    images_per_prompt: int = field(
        default=4, metadata={"help": "PAIRS per prompt (two trajectories from one x_T each)"}
    )
    rollout_batch: int = field(default=16, metadata={"help": "pairs per rollout micro-batch"})


@dataclass
class D3POTrainConfig:
    """Defaults: yk7333/d3po@40d31758 config/base.py (beta 0.1, eps 0.1, lr 3e-5, every step trained, AdamW wd
    1e-4, grad clip 1.0, one pair per optimizer step)."""

    beta: float = field(default=0.1, metadata={"help": "beta of -log sigmoid(beta (q_w - q_l))"})
    eps: float = field(default=0.1, metadata={"help": "ratio clamp: q = log clamp(ratio, 1 - eps, 1 + eps)"})
    timestep_fraction: float = field(
        default=1.0, metadata={"help": "fraction of the stochastic steps trained per pair (reference: all)"}
    )
    lr: float = field(default=3e-5, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    batch_size: int = field(default=1, metadata={"help": "training micro-batch (pairs)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    autocast: str = field(
        default="none", metadata={"help": "mixed precision of every forward: none, bfloat16, float16"}
    )


@dataclass
class D3POConfig(PGRunConfig):
    sample: D3POSampleConfig = field(default_factory=D3POSampleConfig)
    train: D3POTrainConfig = field(default_factory=D3POTrainConfig)


def preset_tiny() -> D3POConfig:
    """The embedded default on a CPU: 16 prompts x 4 pairs per iteration, 10 ``cps`` steps (flow_grpo's cps
    log-prob, ``-mean_dims (x' - mean)^2``), every stochastic step trained, two optimizer steps of 32 pairs,
    lr 1e-3 (the reference's 3e-5 is too small for a CPU budget), beta 0.1 and eps 0.1 (the reference's);
    pairs judged by the GenEval-mini verifier's partial score (the strict score tied 40-77% of the pairs,
    which are not trained); 20 ODE steps for evaluation; one torch thread.

    In 13-minute runs (docs/results.md, 2026-12-04) this setup took the held-out score 0.359 -> 0.464; with
    ``flow-sde`` rollouts 0.401, and with ``flow-sde`` and the strict score (the preset until then) 0.380.
    (In 12-iteration JPEG runs at lr 1e-2, tests/train/test_d3po.py, ``cps`` fell behind the lr-0 control:
    the step size, not the log-prob's direction, docs/math.md §6.)"""
    cfg = D3POConfig(reward="geneval_mini_partial")
    cfg.threads = 1
    sc, tc = cfg.sample, cfg.train
    sc.solver, sc.cps_log_prob, sc.num_steps = "cps", "reference", 10
    sc.prompts_per_iter, sc.images_per_prompt = 16, 4
    tc.lr, tc.batch_size, tc.grad_accum = 1e-3, 8, 4
    cfg.eval.num_steps = 20
    return cfg


def preset_sd15() -> D3POConfig:
    """D3PO's SD1.5 recipe (yk7333/d3po@40d31758 config/base.py; pass an SD1.5-style directory with --model):
    DDIM 20 steps, eta 1, CFG 5 at rollout and training, 2 x 10 pairs per iteration (the reference samples
    ``batch_size`` 10 x ``num_batches_per_epoch`` 2), one pair per optimizer step, every step trained,
    lr 3e-5, beta 0.1, eps 0.1, LoRA r 4, 512 px."""
    cfg = D3POConfig(preset="sd1.5", reward="jpeg_compressibility", max_iters=400)
    cfg.models = ModelConfig(dtype="float16", lora_rank=4, lora_alpha=4.0, resolution=512)
    cfg.sample = D3POSampleConfig(
        solver="ddim",
        num_steps=20,
        eta=1.0,
        guidance_scale=5.0,
        prompts_per_iter=20,
        images_per_prompt=1,
        rollout_batch=10,
        forward_chunk=8,
    )
    cfg.train = D3POTrainConfig(lr=3e-5, batch_size=1, grad_accum=1)
    cfg.eval = EvalConfig(every=10, num_steps=20, base_cfg_scale=5.0)
    return cfg


PRESETS = {"tiny": preset_tiny, "sd1.5": preset_sd15}


def validate_pref(cfg) -> None:
    """The checks D3PO and SPO share (before any work)."""
    tc, sc = cfg.train, cfg.sample
    if not tc.beta > 0:
        raise ConfigError(f"--train.beta: expected a value > 0, got {tc.beta}")
    if not 0 < tc.eps < 1:
        raise ConfigError(f"--train.eps: expected a value in (0, 1), got {tc.eps}")
    if not 0 < tc.timestep_fraction <= 1:
        raise ConfigError(
            f"--train.timestep-fraction: expected a value in (0, 1], got {tc.timestep_fraction}"
        )
    if sc.sde_window:
        raise ConfigError(
            f"--sample.sde-window: expected none (every step of a preference trajectory is stochastic), "
            f"got {','.join(map(str, sc.sde_window))}"
        )
    if tc.autocast not in ("none", "bfloat16", "float16"):
        raise ConfigError(f"--train.autocast: expected none, bfloat16 or float16, got {tc.autocast!r}")


def validate_sampler(cfg, *, embedded_presets=("tiny",), unet_ok: bool = True) -> None:
    """The sampler checks of train.policy_gradient's that a preference loop needs, then train.loop's."""
    sc, tc = cfg.sample, cfg.train
    if sc.solver not in ("auto", "flow-sde", "cps", "ddim"):
        raise ConfigError(f"--sample.solver: expected auto, flow-sde, cps or ddim, got {sc.solver!r}")
    check_at_least_one(
        [
            ("--sample.num-steps", sc.num_steps),
            ("--sample.prompts-per-iter", sc.prompts_per_iter),
            ("--sample.images-per-prompt", sc.images_per_prompt),
            ("--sample.rollout-batch", sc.rollout_batch),
            ("--sample.forward-chunk", sc.forward_chunk),
            ("--train.batch-size", tc.batch_size),
            ("--train.grad-accum", tc.grad_accum),
        ]
    )
    if sc.cps_log_prob not in kernels.CPS_LOG_PROB_FORMS:
        raise ConfigError(f"--sample.cps-log-prob: expected reference or gaussian, got {sc.cps_log_prob!r}")
    if sc.noise_level <= 0 and sc.solver in ("flow-sde", "cps", "auto"):
        raise ConfigError(f"--sample.noise-level: expected a value > 0 (an SDE), got {sc.noise_level}")
    if sc.eta <= 0 and sc.solver in ("ddim", "auto"):
        raise ConfigError(f"--sample.eta: expected a value > 0 (eta 0 has no density), got {sc.eta}")
    validate_pref(cfg)
    validate_run(cfg, embedded_presets=embedded_presets, unet_ok=unet_ok)


def validate(cfg: D3POConfig) -> None:
    validate_sampler(cfg)


# ------------------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------------------
@dataclass
class PairRollouts:
    """One iteration's pairs (this rank's): ``states [P, 2, N+1, ...]`` (both members from one ``x_T``),
    ``rewards [P, 2]``, ``winner [P]`` (0/1, -1 a tie)."""

    prompts: list
    states: torch.Tensor
    rewards: torch.Tensor
    winner: torch.Tensor
    plan: object


class D3POTrainer(PolicyGradientTrainer):
    """Rollouts of trajectory pairs and the D3PO loss on the shared loop; the plan's unit is a pair."""

    algo = "d3po"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sched = build_schedule(self.policy, self.cfg.sample, self.solver)
        if not self.sched.train_steps:
            raise ConfigError(
                f"--sample.num-steps: expected at least one stochastic step, got none with solver "
                f"{self.solver} and {self.cfg.sample.num_steps} steps"
            )

    def describe(self) -> str:
        return f"solver {self.solver} | {len(self.sched.train_steps)} stochastic steps"

    def rollout_pairs(self, it: int) -> PairRollouts:
        sc, policy = self.cfg.sample, self.policy
        plan = self.iteration_plan(it)
        prompts, seeds = plan.local_prompts(), plan.local_seeds()
        states, futures = [], []
        dev = policy.device
        g = self.sched.guidance_scale
        with nvtx_range("rollout"), policy.adapter("default"), torch.no_grad():
            for lo in self.progress(range(0, len(prompts), sc.rollout_batch), "rollout"):
                mb, sd = prompts[lo : lo + sc.rollout_batch], seeds[lo : lo + sc.rollout_batch]
                both = mb + mb
                cond = policy.encode(both)
                uncond = policy.encode([""] * len(both)) if g != 1.0 else None
                x_t = initial_noise(policy, torch.tensor([int(s) for s in sd], dtype=torch.int64)).to(dev)
                x = torch.cat([x_t, x_t])
                nseeds = torch.cat([member_seeds(sd, 0), member_seeds(sd, 1)]).to(dev)
                traj = [x]
                for i in range(self.sched.num_steps):
                    x, _ = sample_step(policy, self.sched, x, i, cond, uncond, step_noise(policy, nseeds, i))
                    traj.append(x)
                traj = torch.stack(traj, 1)  # [2b, N+1, ...]
                b = len(mb)
                states.append(torch.stack([traj[:b], traj[b:]], 1))
                images = policy.decode(x)
                futures.append(
                    self.pool.submit(self.reward, images.cpu(), [policy.prompt_text(p) for p in both])
                )
        with nvtx_range("reward"):
            res, _ = self.await_rewards(futures)  # micro-batch after micro-batch, each [members 0; members 1]
        rewards, pos = [], 0
        for s in states:
            b = s.shape[0]
            rewards.append(torch.stack([res[pos : pos + b], res[pos + b : pos + 2 * b]], 1))
            pos += 2 * b
        rewards = torch.cat(rewards).float()
        return PairRollouts(
            prompts=prompts,
            states=torch.cat(states),
            rewards=rewards,
            winner=d3po_preference(rewards[:, 0], rewards[:, 1]),
            plan=plan,
        )

    def pair_loss(self, pairs: PairRollouts, rows: torch.Tensor, steps: torch.Tensor):
        """math.md §6 at one trained step per pair (``steps [b]``) -> ``(loss, q_w, q_l)``."""
        tc = self.cfg.train
        dev = pairs.states.device
        rows = rows.to(dev)
        w = pairs.winner.to(dev)[rows]
        idx = torch.arange(len(rows), device=dev)
        st = pairs.states[rows]  # [b, 2, N+1, ...]
        steps = steps.to(dev)
        x = torch.cat([st[idx, w, steps], st[idx, 1 - w, steps]])
        prev = torch.cat([st[idx, w, steps + 1], st[idx, 1 - w, steps + 1]])
        prompts = [pairs.prompts[i] for i in rows.tolist()] * 2
        score = score_transitions(
            self.policy, self.sched, prompts, x, prev, torch.cat([steps, steps]), with_ref=True
        )
        b = len(rows)
        return d3po_loss(
            score.log_prob[:b],
            score.log_prob_ref[:b],
            score.log_prob[b:],
            score.log_prob_ref[b:],
            beta=tc.beta,
            eps=tc.eps,
        )

    def train_iteration(self, it: int) -> tuple[dict, str]:
        cfg, tc = self.cfg, self.cfg.train
        pairs = self.rollout_pairs(it)
        plan = pairs.plan
        rewards_g = self.to_global(plan, pairs.rewards)
        winner_g = self.to_global(plan, pairs.winner)
        trainable = winner_g >= 0
        steps_all = torch.tensor(self.sched.train_steps, dtype=torch.long)
        n_train = max(1, int(tc.timestep_fraction * len(steps_all)))
        n = len(plan.prompts)
        g = common.iteration_generator(cfg.seed, it, "train")
        t_idx = torch.stack(
            [steps_all[torch.randperm(len(steps_all), generator=g)[:n_train]] for _ in range(n)]
        )
        loss_sum, count, acc, clamped, qw_sum = 0.0, 0, 0.0, 0.0, 0.0
        with self.train_phase():
            self.opt.zero_grad(set_to_none=True)
            for mbs in self.progress(plan.steps(tc.batch_size, trainable=trainable), "train"):
                for mi, mb in enumerate(mbs):
                    steps = t_idx[mb.gidx]
                    for j in range(n_train):
                        last = mi == len(mbs) - 1 and j == n_train - 1
                        with self.dist.grad_sync(last):
                            loss, q_w, q_l = self.pair_loss(pairs, mb.rows, steps[:, j])
                            (loss / n_train * mb.weight).backward()
                        if mb.dummy:
                            continue
                        loss_sum += float(loss.detach())
                        acc += float((q_w > q_l).float().mean())
                        q = torch.cat([q_w, q_l]).detach()
                        clamped += float((q.abs() >= math.log1p(tc.eps) - 1e-7).float().mean())
                        qw_sum += float((q_w - q_l).detach().mean())
                        count += 1
                self.optimizer_step()
        r = rewards_g.float()
        vals = {
            "train/reward_mean": r.mean(),
            "train/reward_std": r.std(unbiased=False),
            "train/tie_frac": (~trainable).float().mean(),
            "train/trained_pairs": int(trainable.sum()),
            "train/loss": loss_sum / max(count, 1),
            "train/implicit_acc": acc / max(count, 1),
            "train/q_margin": qw_sum / max(count, 1),
            "train/clamp_frac": clamped / max(count, 1),
        }
        if count:
            summary = (
                f"reward {float(r.mean()):.3f} | ties {float((~trainable).float().mean()):.2f} | "
                f"loss {vals['train/loss']:.5f} | q margin {vals['train/q_margin']:.2e}"
            )
        else:
            summary = f"reward {float(r.mean()):.3f} | every pair tied: no update"
        return vals, summary


def main(argv=None) -> int:
    return loop_main(
        argv, config_cls=D3POConfig, presets=PRESETS, trainer_cls=D3POTrainer, validate=validate, doc=__doc__
    )


if __name__ == "__main__":
    sys.exit(main())
