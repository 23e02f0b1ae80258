"""Nabla-GFlowNet, residual Nabla-DB (arXiv 2412.07775), as math.md §7 defines it.
``python -m train.nabla_gfn --help``.

Reference: lzzcd001/nabla-gfn@6b74d4ce train_nablagfn.py, lib/diffusion/inference_step.py,
config/default_config.py (SD1.5, DDIM eta 1).  Per iteration:
  1. rollouts with the current ``default`` adapter (DDIM eta on epsilon UNets; the Flow-GRPO SDE step
     ``flow-sde`` on flow models, the embedded default included: a derived port, experimental); the rollout
     adapter is copied into the frozen ``old`` adapter, whose prediction at a stored state is the rollout's
     ``eps_old`` (``v_old``) bit for bit (batch-invariant forwards);
  2. per sample the transition subset: the last step plus one random step from each of
     ``n_blocks = int(num_steps * timestep_fraction)`` equal blocks of the steps (the reference's
     ``low_var_subsampling``), trained last step first, then the blocks from the end;
  3. per transition ``x_t -> x'`` the forward, backward and terminal Nabla-DB terms with the residual log-flow
     network ``phi`` (math.md §7), the regulariser ``reg_scale * mean (eps_theta(x_t) - eps_old)^2``; with
     ``--train.transition-weighting noise`` (the engine's own, not the reference's) the forward and backward
     residuals times the step variance ``std^2``;
  4. AdamW over the LoRA (``--train.lr``, ``--train.weight-decay``) and ``phi`` (``--train.flow-lr``,
     ``--train.flow-wd``), each group's gradient clipped to ``--train.grad-clip`` on its own;
  5. eval EMA, evaluation, sample grid, checkpoint (``phi`` and its optimizer state included).
The reward must be differentiable (``train.rewards.registry.require_differentiable``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from engine import guided_prediction

from . import common
from .config import ConfigError
from .evaluation import EvalConfig
from .policy import ModelConfig
from .policy_gradient import (
    PGRunConfig,
    PGSampleConfig,
    PGTrainConfig,
    PolicyGradientTrainer,
    Trajectories,
    _schedule,
    _transition,
    validate_common,
)
from .policy_gradient import main as pg_main
from .rewards.registry import require_differentiable

__all__ = [
    "NablaGFNConfig",
    "NablaGFNTrainer",
    "ResidualLogFlow",
    "nabla_db_loss",
    "transition_subset",
    "reward_weight",
    "step_score",
    "main",
]


@dataclass
class NablaGFNSampleConfig(PGSampleConfig):
    solver: str = field(
        default="auto",
        metadata={"help": "auto (flow-sde for flow models, ddim for UNets), flow-sde or ddim"},
    )


@dataclass
class NablaGFNTrainConfig(PGTrainConfig):
    """Defaults: the reference's config/default_config.py (lr 1e-3 for LoRA and phi, phi weight decay 1e-2,
    LoRA weight decay 1e-4, grad clip 1.0, reward_scale 1e3, unet_reg_scale 1e3, reverse_loss_scale 1,
    timestep_fraction 0.1, reward_adaptive_mode 'squared', phi 64/128/256/256 with one layer per block,
    train batch 4 x 8 accumulation steps)."""

    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the LoRA"})
    timestep_fraction: float = field(
        default=0.1,
        metadata={"help": "n_blocks = int(num_steps * fraction): the last step + one random step per block"},
    )
    batch_size: int = field(default=4, metadata={"help": "training micro-batch (samples)"})
    grad_accum: int = field(default=8, metadata={"help": "micro-batches per optimizer step"})
    reward_scale: float = field(default=1e3, metadata={"help": "beta: the reward-gradient scale"})
    reward_weighting: str = field(
        default="squared",
        metadata={"help": "g = beta w_t grad R: squared (w = alpha_bar_t) or sqrt (w = sqrt(alpha_bar_t))"},
    )
    reverse_scale: float = field(default=1.0, metadata={"help": "weight of the backward term (0: off)"})
    transition_weighting: str = field(
        default="score",
        metadata={
            "help": "score (the reference's): the squared residual of the step scores; noise (the engine's "
            "own): each transition's residuals times its step std^2, in units of the step's noise"
        },
    )
    reg_scale: float = field(
        default=1e3, metadata={"help": "weight of mean (eps_theta - eps_old)^2 (0: off)"}
    )
    flow_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of phi"})
    flow_wd: float = field(default=1e-2, metadata={"help": "AdamW weight decay of phi"})
    flow_channels: tuple[int, ...] = field(
        default=(64, 128, 256, 256), metadata={"help": "phi's UNet block widths"}
    )
    flow_layers: int = field(default=1, metadata={"help": "phi's layers per block"})
    flow_block_attention: bool = field(
        default=True,
        metadata={
            "help": "phi's cross-attention in its down/up blocks (the reference's); false: mid block only"
        },
    )


@dataclass
class NablaGFNConfig(PGRunConfig):
    sample: NablaGFNSampleConfig = field(default_factory=NablaGFNSampleConfig)
    train: NablaGFNTrainConfig = field(default_factory=NablaGFNTrainConfig)


def preset_tiny() -> NablaGFNConfig:
    """The embedded default on a CPU (a flow model: the derived flow-sde port): 8 prompts x 2 images per
    iteration, 10 SDE steps (noise level 0.7), 2 blocks (3 transitions per sample), one optimizer step of
    16 samples, the differentiable learned GenEval-mini reward ``geneval_learned``, phi a 32/64/64 UNet
    cross-attending in its mid block only (self-attention over 32 x 32 positions would dominate the step
    on a CPU), one torch thread.  With one optimizer step per iteration the regulariser to the rollout
    policy is zero (the step starts from the rollout weights); ``--train.grad-accum 1`` gives two steps, as
    the reference's two per iteration, and a non-zero ``reg`` on the second."""
    cfg = NablaGFNConfig(reward="geneval_learned", threads=1)
    cfg.sample.prompts_per_iter, cfg.sample.images_per_prompt, cfg.sample.num_steps = 8, 2, 10
    cfg.train.timestep_fraction, cfg.train.batch_size, cfg.train.grad_accum = 0.2, 8, 2
    cfg.train.flow_channels, cfg.train.flow_block_attention = (32, 64, 64), False
    cfg.eval.num_steps = 20
    return cfg


def preset_sd15() -> NablaGFNConfig:
    """The reference's SD1.5 recipe (pass an SD1.5-style directory with --model and a differentiable
    --reward): DDIM 50 steps, eta 1, CFG 5 at rollout and training, 64 samples per iteration (one per prompt
    draw), 2 optimizer steps of 4 x 8, LoRA r 8 / alpha 8 (gaussian init), bf16 frozen weights, 512 px,
    5 blocks (6 transitions per sample), phi 64/128/256/256."""
    cfg = NablaGFNConfig(preset="sd1.5", max_iters=100)
    cfg.models = ModelConfig(dtype="bfloat16", lora_rank=8, lora_alpha=8.0, resolution=512)
    cfg.sample = NablaGFNSampleConfig(
        solver="ddim",
        num_steps=50,
        eta=1.0,
        guidance_scale=5.0,
        prompts_per_iter=64,
        images_per_prompt=1,
        rollout_batch=16,
        forward_chunk=8,
    )
    cfg.eval = EvalConfig(every=10, num_steps=50, base_cfg_scale=5.0)
    return cfg


def preset_sd3() -> NablaGFNConfig:
    """EXPERIMENTAL flow port (SD3/SD3.5/FLUX with --model; no reference): the Flow-GRPO SDE step, 10 steps
    (noise level 0.7), CFG 4.5, 2 blocks, the reference's optimizer and loss weights, bf16, 512 px."""
    cfg = NablaGFNConfig(preset="sd3", max_iters=100)
    cfg.models = ModelConfig(dtype="bfloat16", lora_rank=8, lora_alpha=8.0, resolution=512)
    cfg.sample = NablaGFNSampleConfig(
        solver="flow-sde",
        num_steps=10,
        noise_level=0.7,
        guidance_scale=4.5,
        prompts_per_iter=64,
        images_per_prompt=1,
        rollout_batch=16,
        forward_chunk=8,
    )
    cfg.train.timestep_fraction = 0.2
    cfg.eval = EvalConfig(every=10, solver="euler", num_steps=40, cfg_scale=4.5)
    return cfg


PRESETS = {"tiny": preset_tiny, "sd1.5": preset_sd15, "sd3": preset_sd3}


def n_blocks(num_steps: int, fraction: float) -> int:
    return int(num_steps * fraction)


def validate(cfg: NablaGFNConfig) -> None:
    sc, tc = cfg.sample, cfg.train
    if sc.solver not in ("auto", "flow-sde", "ddim"):
        raise ConfigError(
            f"--sample.solver: expected auto, flow-sde or ddim (a stochastic last step), got {sc.solver!r}"
        )
    if sc.sde_window:
        raise ConfigError(
            f"--sample.sde-window: expected none (Nabla-DB trains on every step), got "
            f"{','.join(map(str, sc.sde_window))}"
        )
    if sc.num_steps < 1:
        raise ConfigError(f"--sample.num-steps: expected an integer >= 1, got {sc.num_steps}")
    nb = n_blocks(sc.num_steps, tc.timestep_fraction)
    if nb < 1 or sc.num_steps % nb:
        raise ConfigError(
            f"--train.timestep-fraction: expected int(--sample.num-steps x fraction) >= 1 blocks dividing "
            f"--sample.num-steps ({sc.num_steps}), got {tc.timestep_fraction} ({nb} blocks)"
        )
    if tc.transition_weighting not in ("score", "noise"):
        raise ConfigError(
            f"--train.transition-weighting: expected score or noise, got {tc.transition_weighting!r}"
        )
    if tc.reward_weighting not in ("squared", "sqrt"):
        raise ConfigError(f"--train.reward-weighting: expected squared or sqrt, got {tc.reward_weighting!r}")
    for name, val in (
        ("--train.reward-scale", tc.reward_scale),
        ("--train.reverse-scale", tc.reverse_scale),
        ("--train.reg-scale", tc.reg_scale),
        ("--train.flow-lr", tc.flow_lr),
        ("--train.flow-wd", tc.flow_wd),
    ):
        if val < 0:
            raise ConfigError(f"{name}: expected a value >= 0, got {val}")
    if not tc.flow_channels or any(c < 1 or c % 32 for c in tc.flow_channels) or tc.flow_layers < 1:
        raise ConfigError(
            f"--train.flow-channels / --train.flow-layers: expected multiples of 32 (GroupNorm of 32 groups) "
            f"and >= 1 layer, got {','.join(map(str, tc.flow_channels))} / {tc.flow_layers}"
        )
    if cfg.models.dtype == "float16":
        raise ConfigError(
            "--models.dtype: expected float32 or bfloat16 (phi's gradients are not under the fp16 gradient "
            "scaler), got float16"
        )
    if cfg.dist.strategy != "ddp":
        raise ConfigError(f"--dist.strategy: expected ddp for nabla_gfn, got {cfg.dist.strategy!r}")
    validate_common(cfg, embedded_presets=("tiny",), unet_ok=True)


# ------------------------------------------------------------------------------------------------------------
# The math (math.md §7)
# ------------------------------------------------------------------------------------------------------------
class ResidualLogFlow(torch.nn.Module):
    """``phi(x, t, c)``: the residual log-flow score, a small ``diffusers.UNet2DConditionModel`` on the
    latent shape, cross-attending to the prompt embeddings, its ``conv_out`` bias zeroed (the reference's
    "zero initialisation"; lzzcd001/nabla-gfn@6b74d4ce train_nablagfn.py).  On SD1.5 the reference's
    64/128/256/256; the embedded default's tiny preset 32/64/64 with cross-attention in the mid block only
    (``block_attention=False``).  Always fp32."""

    def __init__(
        self, channels: int, cross_dim: int, widths=(64, 128, 256, 256), layers: int = 1, block_attention=True
    ):
        super().__init__()
        from diffusers import UNet2DConditionModel

        n = len(widths)
        down, up = ("DownBlock2D",) * n, ("UpBlock2D",) * n
        if block_attention:  # diffusers' default layout, the reference's
            down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
            up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
        self.unet = UNet2DConditionModel(
            in_channels=channels,
            out_channels=channels,
            block_out_channels=tuple(widths),
            layers_per_block=layers,
            down_block_types=down,
            up_block_types=up,
            cross_attention_dim=cross_dim,
        )
        with torch.no_grad():
            self.unet.conv_out.bias.zero_()

    def forward(self, x, timestep, embeds):
        return self.unet(x.float(), timestep.float(), embeds.float()).sample


def transition_subset(num_steps: int, blocks: int, n: int, generator) -> torch.Tensor:
    """``[n, 1 + blocks]`` step indices per sample: the last step, then one uniform step from each of the
    ``blocks`` equal blocks, from the last block to the first (the reference's ``low_var_subsampling``, of
    which it trains the first ``1 + blocks`` entries)."""
    size = num_steps // blocks
    picks = torch.randint(0, size, (n, blocks), generator=generator)
    starts = torch.arange(blocks - 1, -1, -1) * size
    return torch.cat([torch.full((n, 1), num_steps - 1, dtype=torch.long), starts + picks], dim=1)


def reward_weight(solver: str, p: torch.Tensor, weighting: str) -> torch.Tensor:
    """``w_t`` of ``g = beta w_t grad R``: on DDIM ``alpha_bar_t`` (``squared``) or its square root, the
    reference's; on a flow model (DERIVED, no reference) the signal coefficient ``1 - sigma`` plays
    ``sqrt(alpha_bar)``: ``(1 - sigma)^2`` or ``1 - sigma``.  ``p`` is the schedule value of the state
    (alpha_bar, or sigma)."""
    p = p.float()
    alpha = p.sqrt() if solver == "ddim" else 1.0 - p
    return alpha**2 if weighting == "squared" else alpha


def step_score(prev: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """math.md §7 ``s = grad_{x'} log p(x' | x_t) = -(x' - mean) / std^2`` (fp32), differentiable in
    ``mean``."""
    stdc = std.float().reshape(-1, *([1] * (mean.ndim - 1)))
    return -(prev.float() - mean.float()) / stdc**2


def nabla_db_loss(
    s_theta,
    s_ref,
    phi_next,
    g_next,
    terminal,
    *,
    s_theta_rev=None,
    s_ref_rev=None,
    phi_cur=None,
    g_cur=None,
    reverse_scale: float = 1.0,
    pred=None,
    pred_old=None,
    reg_scale: float = 0.0,
    weight=None,
):
    """math.md §7 residual Nabla-DB for a batch of transitions -> ``(loss, parts)``:

    ``L_fwd = (s_theta - s_ref - phi(x', t') - g')^2`` with the target ``sg(s_ref + g')`` at the terminal
    transition (phi not detached elsewhere); ``L_bwd = (s_theta_rev - s_ref_rev + phi(x_t, t) + g)^2``
    with the target 0 at the terminal transition (trains phi only: the reverse scores carry no graph);
    ``L_term = sum_b terminal_b mean_dims phi(x', t')^2 / (sum_b terminal_b + 1e-6)``;
    ``loss = mean_{b,dims}(L_fwd + reverse_scale L_bwd + L_term) + reg_scale mean_b mean_dims (pred -
    pred_old)^2`` (lzzcd001/nabla-gfn@6b74d4ce train_nablagfn.py).  ``weight`` ``[b]`` (the engine's own
    ``noise`` transition weighting passes ``std^2``; None is the reference's) multiplies ``L_fwd`` and
    ``L_bwd`` per transition."""
    col = terminal.reshape(-1, *([1] * (s_theta.ndim - 1)))
    target = torch.where(col, (s_ref + g_next).detach(), s_ref + phi_next + g_next)
    fwd = (s_theta - target) ** 2
    w = None
    if weight is not None:
        w = weight.float().reshape(-1, *([1] * (s_theta.ndim - 1)))
        fwd = fwd * w
    mask = terminal.float()
    term = (phi_next.pow(2).flatten(1).mean(1) * mask).sum() / (mask.sum() + 1e-6)
    total = fwd
    bwd = torch.zeros((), device=fwd.device)
    if reverse_scale > 0:
        rtarget = torch.where(col, torch.zeros_like(s_ref_rev), s_ref_rev - phi_cur - g_cur.detach())
        bwd_el = (s_theta_rev - rtarget) ** 2
        if w is not None:
            bwd_el = bwd_el * w
        total = total + reverse_scale * bwd_el
        bwd = bwd_el.mean()
    loss = (total + term).mean()
    reg = torch.zeros((), device=fwd.device)
    if reg_scale > 0:
        reg = (pred.float() - pred_old.float()).pow(2).flatten(1).mean(1).mean()
        loss = loss + reg_scale * reg
    parts = {"fwd": fwd.mean().detach(), "bwd": bwd.detach(), "term": term.detach(), "reg": reg.detach()}
    return loss, parts


# ------------------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------------------
class NablaGFNTrainer(PolicyGradientTrainer):
    """Rollout (current ``default`` adapter, copied to ``old``) -> reward (logged) -> residual Nabla-DB on the
    transition subset with reward gradients at ``x0_hat`` -> eval EMA -> evaluation -> checkpoint."""

    algo = "nabla_gfn"

    @classmethod
    def check_reward(cls, reward) -> None:
        require_differentiable(reward)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.solver not in ("flow-sde", "ddim"):
            raise ConfigError(f"--sample.solver: expected flow-sde or ddim, got {self.solver!r}")
        tc, pol = self.cfg.train, self.policy
        if self.solver == "ddim":
            from engine.schedules import ddim_alpha_bars

            _, ab = ddim_alpha_bars(self.cfg.sample.num_steps, scheduler_config=pol.scheduler_config)
            if float(ab[-1]) >= 1.0:
                raise ConfigError(
                    "--model: expected a DDIM schedule whose last step is stochastic (set_alpha_to_one "
                    "false, as SD1.5's): the terminal transition needs a density, got final_alpha_cumprod 1"
                )
        with torch.no_grad():
            cross = pol.encode([pol.prompt_text(pol.train_prompts[0])]).prompt_embeds.shape[-1]
        state = torch.random.get_rng_state()
        torch.manual_seed(common.derive_seed(self.cfg.seed, 0, "phi"))
        self.phi = ResidualLogFlow(
            pol.latent_shape[0], cross, tc.flow_channels, tc.flow_layers, tc.flow_block_attention
        )
        torch.random.set_rng_state(state)
        self.phi.to(pol.device)
        self.phi_params = [p for p in self.phi.parameters() if p.requires_grad]
        self.opt.add_param_group({"params": self.phi_params, "lr": tc.flow_lr, "weight_decay": tc.flow_wd})

    def describe(self) -> str:
        nb = n_blocks(self.cfg.sample.num_steps, self.cfg.train.timestep_fraction)
        flow = " (derived flow port, experimental)" if self.solver != "ddim" else ""
        return f"solver {self.solver}{flow}, {nb + 1} transitions per sample"

    def extra_state(self) -> dict:
        return {"phi": {k: v.detach().cpu().clone() for k, v in self.phi.state_dict().items()}}

    def load_extra_state(self, state: dict) -> None:
        if "phi" not in state:
            raise ValueError("--resume: expected phi's weights in the checkpoint, found none")
        self.phi.load_state_dict(state["phi"])

    def optimizer_step(self) -> None:
        """phi's gradient (averaged over ranks under torchrun: phi is not DDP-wrapped) clipped on its own, as
        the reference clips each parameter group; then the shared step (LoRA clip, step, zero, eval EMA)."""
        tc = self.cfg.train
        if self.dist.enabled:
            for p in self.phi_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.dist.all_reduce_mean([p.grad for p in self.phi_params])
        gn = torch.nn.utils.clip_grad_norm_(self.phi_params, tc.grad_clip)
        if not torch.isfinite(gn):
            raise common.TrainingStopped(
                f"non-finite phi gradient norm ({float(gn)}) at optimizer step {self.opt_step}; "
                f"{common.intact_note(self.run_dir)}"
            )
        super().optimizer_step()

    # --- per transition ------------------------------------------------------------------------------
    def _reward_grad(self, x0_hat, x, prompts) -> torch.Tensor:
        """``grad_x R(decode(x0_hat(x)))`` (no graph kept)."""
        images = self.policy.decode(x0_hat)
        r = self.reward(images, prompts)[0]
        return torch.autograd.grad(r.sum(), x, retain_graph=True)[0].detach().float()

    def _x0_hat(self, traj, x, pred, steps, at_next: bool):
        """``x0_hat`` of state ``x`` at step index ``steps`` (``x'`` of step ``s`` is at ``s + 1``); the last
        state (``t' = 0``) is its own ``x0_hat``, as the reference's ``predict_clean`` with ``alpha = 1``."""
        from .reward_backprop import x0_from_prediction

        idx = steps + 1 if at_next else steps
        end = idx == len(traj.timesteps)
        if traj.solver == "ddim":
            kind, p = "epsilon", torch.where(end, 1.0, traj.alpha_bars[idx].float())
        else:
            kind, p = "flow", traj.sigmas[idx].float()
        out = x0_from_prediction(kind, x, pred, p)
        return torch.where(end.reshape(-1, *([1] * (x.ndim - 1))), x.float(), out)

    def transition_loss(self, traj: Trajectories, rows, steps, first: bool):
        """Nabla-DB loss of the transitions ``states[rows, steps] -> states[rows, steps + 1]``, math.md §7."""
        tc, pol = self.cfg.train, self.policy
        dev = traj.states.device
        rows, steps = rows.to(dev), steps.to(dev)
        prompts = [traj.prompts[i] for i in rows.tolist()]
        texts = [pol.prompt_text(p) for p in prompts]
        n_steps = len(traj.timesteps)
        x_st, xn_st = traj.states[rows, steps], traj.states[rows, steps + 1]
        terminal = steps == n_steps - 1
        cond = pol.encode(prompts)
        g = traj.guidance_scale
        uncond = pol.encode([""] * len(prompts)) if g != 1.0 else None
        t = traj.timesteps[steps]
        nxt = torch.clamp(steps + 1, max=n_steps - 1)
        t_next = torch.where(terminal, torch.zeros_like(t), traj.timesteps[nxt])
        p0, p1 = _schedule(traj, steps)
        sigma_max = (
            torch.full((len(rows),), traj.sigma_max, dtype=torch.float32, device=dev)
            if traj.sigma_max
            else None
        )
        kw = dict(noise_level=traj.noise_level, eta=traj.eta, sigma_max=sigma_max, prev_sample=xn_st)
        rev = tc.reverse_scale > 0
        w_cur = reward_weight(traj.solver, p0, tc.reward_weighting)
        # at t' = 0: DDIM's last alpha_bar (SD1.5: alphas_cumprod[0], the reference's gather at 0); flow: 1
        w_next = reward_weight(traj.solver, p1, tc.reward_weighting)

        def predict(denoiser, x, tt):
            return guided_prediction(denoiser, x, tt, cond, uncond=uncond, guidance_scale=g)

        def col(v):
            return v.float().reshape(-1, *([1] * (x_st.ndim - 1)))

        # reference (adapters off, no parameter gradient): s_ref, and s_ref_rev = grad_{x_t} log p_ref(x'|x_t)
        x_ref = x_st.detach().clone().requires_grad_(rev)
        with torch.set_grad_enabled(rev), pol.adapters_disabled():
            _, _, mean_ref, std = _transition(
                traj.solver, x_ref, predict(pol.denoiser, x_ref, t), p0, p1, **kw
            )
        s_ref = step_score(xn_st, mean_ref.detach(), std).detach()
        s_ref_rev = None
        if rev:
            sq = ((xn_st.float() - mean_ref) ** 2).sum()
            s_ref_rev = (-torch.autograd.grad(sq, x_ref)[0].float() / (2 * col(std) ** 2)).detach()
        # the rollout policy's prediction (frozen copy of the rollout adapter)
        pred_old = None
        if tc.reg_scale > 0:
            with torch.no_grad(), pol.adapter("old"):
                pred_old = predict(pol.denoiser, x_st, t)
        # the policy at x_t: s_theta (graph to the LoRA), s_theta_rev and g (no graph)
        x_cur = x_st.detach().clone().requires_grad_(rev)
        train_denoiser = getattr(pol, "train_denoiser", pol.denoiser)
        pred = predict(train_denoiser, x_cur, t)
        _, _, mean, std = _transition(traj.solver, x_cur, pred, p0, p1, **kw)
        s_theta = step_score(xn_st, mean, std)
        s_theta_rev = g_cur = None
        if rev:
            sq = ((xn_st.float() - mean) ** 2).sum()
            s_theta_rev = -torch.autograd.grad(sq, x_cur, retain_graph=True)[0].float() / (2 * col(std) ** 2)
            s_theta_rev = s_theta_rev.detach()
            x0 = self._x0_hat(traj, x_cur, pred, steps, at_next=False)
            g_cur = tc.reward_scale * col(w_cur) * self._reward_grad(x0, x_cur, texts)
        # the policy at x': g' = beta w_t' sg(grad_{x'} R(x0_hat(x', t')))
        x_next = xn_st.detach().clone().requires_grad_(True)
        if bool(terminal.all()):
            x0n = x_next.float()
        else:
            pred_next = predict(pol.denoiser, x_next, t_next)
            x0n = self._x0_hat(traj, x_next, pred_next, steps, at_next=True)
        g_next = tc.reward_scale * col(w_next) * self._reward_grad(x0n, x_next, texts)
        # phi at x' and x_t
        embeds = cond.prompt_embeds.float()
        phi_next = self.phi(xn_st, t_next, embeds)
        phi_cur = self.phi(x_st, t, embeds) if rev else None
        loss, parts = nabla_db_loss(
            s_theta,
            s_ref,
            phi_next,
            g_next,
            terminal,
            s_theta_rev=s_theta_rev,
            s_ref_rev=s_ref_rev,
            phi_cur=phi_cur,
            g_cur=g_cur,
            reverse_scale=tc.reverse_scale,
            pred=pred,
            pred_old=pred_old,
            reg_scale=tc.reg_scale,
            weight=std.float().reshape(-1) ** 2 if tc.transition_weighting == "noise" else None,
        )
        if first and pred_old is not None:
            parts["first_dev"] = (pred.detach().float() - pred_old.float()).abs().max()
        parts["g_norm"] = g_next.flatten(1).norm(dim=1).mean()
        parts["phi_norm"] = phi_next.detach().flatten(1).norm(dim=1).mean()
        return loss, parts

    # --- one iteration -----------------------------------------------------------------------------------
    def train_nabla(self, it: int, traj: Trajectories) -> dict:
        cfg, tc = self.cfg, self.cfg.train
        plan = traj.plan
        n = len(plan.prompts)
        nb = n_blocks(len(traj.timesteps), tc.timestep_fraction)
        g = common.iteration_generator(cfg.seed, it, "train")
        keys = ("fwd", "bwd", "term", "reg", "g_norm", "phi_norm")
        sums = dict.fromkeys(keys, 0.0)
        count, loss_sum, first_dev, start = 0, 0.0, 0.0, self.opt_step
        for epoch in range(tc.inner_epochs):
            order = plan.order if epoch == 0 else torch.randperm(n, generator=g)
            t_idx = transition_subset(len(traj.timesteps), nb, n, g)  # [n, 1 + nb] by global index
            self.opt.zero_grad(set_to_none=True)
            for mbs in self.progress(plan.steps(tc.batch_size, order=order), f"train {epoch + 1}"):
                for mi, mb in enumerate(mbs):
                    steps = t_idx[mb.gidx]
                    for j in range(nb + 1):
                        last = mi == len(mbs) - 1 and j == nb
                        with self.dist.grad_sync(last):
                            first = epoch == 0 and self.opt_step == start
                            loss, parts = self.transition_loss(traj, mb.rows, steps[:, j], first)
                            (loss * mb.weight / (nb + 1)).backward()
                        if mb.dummy:
                            continue
                        if "first_dev" in parts:
                            first_dev = max(first_dev, float(parts["first_dev"]))
                        loss_sum += float(loss.detach())
                        for k in keys:
                            sums[k] += float(parts[k])
                        count += 1
                self.optimizer_step()
        out = {f"train/{k}": v / max(count, 1) for k, v in sums.items()}
        out.update(
            {
                "train/loss": loss_sum / max(count, 1),
                "train/trained_samples": len(traj),
                "train/trained_steps": nb + 1,
                "reg/first_abs_dev": first_dev,
            }
        )
        return out

    def train_iteration(self, it: int) -> tuple[dict, str]:
        self.policy.ema_old(0.0)  # old <- default: the rollout policy, for eps_old
        traj = self.rollout_and_reward(it)
        batch = self.global_batch(traj)
        with self.train_phase():
            stats = self.train_nabla(it, traj)
        vals = {
            "train/reward_mean": batch.rewards.mean(),
            "train/reward_std": batch.rewards.std(unbiased=False),
            **stats,
        }
        if len(batch.reward_components) > 1:
            vals.update({f"train/reward/{k}": v.mean() for k, v in batch.reward_components.items()})
        summary = (
            f"reward {float(batch.rewards.mean()):.3f} | loss {stats['train/loss']:.3e} | "
            f"fwd {stats['train/fwd']:.2e} bwd {stats['train/bwd']:.2e} term {stats['train/term']:.2e} "
            f"reg {stats['train/reg']:.2e}"
        )
        return vals, summary


def main(argv=None) -> int:
    return pg_main(
        argv,
        config_cls=NablaGFNConfig,
        presets=PRESETS,
        trainer_cls=NablaGFNTrainer,
        validate=validate,
        doc=__doc__,
    )


if __name__ == "__main__":
    sys.exit(main())
