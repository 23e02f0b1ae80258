"""SPO's step-aware scorer for the embedded default (math.md §6): a small model ``(x0_hat, t, prompt) ->
logit`` of the verifier's eventual score of the clean sample the trajectory through ``x_t`` ends in, where
``x0_hat`` is the policy's one-step clean prediction from ``x_t`` (flow: ``x_t - sigma_t v``; the clean
sample itself at ``t = 0``) and ``t`` its noise level; trained on the engine's own rollouts (every state
along each trajectory, labelled with the final reward: the GenEval-mini score by default; a reward outside
[0, 1] is mapped onto it, :func:`label_map`). ``python -m train.spo_scorer --help``.

SPO (RockeyCoss/SPO@27a86428 spo_training_and_inference/spo/custom_diffusers/multi_sample_pipeline.py)
scores each candidate's decoded ``pred_original_sample`` with a time-conditioned PickScore, conditioned on
the candidate's timestep (the last step: the clean sample, timestep 0); the embedded default has no such
model, so this one is trained here (the engine's own; see docs/math.md §6).  It reads ``x0_hat`` in the
model's latent space (the embedded default decodes by the identity, clamped to [-1, 1]).
``train.spo --scorer PATH`` loads it (a ``.safetensors`` file with
its recipe ``.json`` beside it, or the directory holding ``scorer.safetensors``).

The run directory gets ``scorer.safetensors`` and ``scorer.json`` (architecture, how it was made, held-out
numbers): held-out prompts (the benchmark's test split, new seeds) give the pairwise accuracy (two states
of the same prompt at the same step whose final scores differ: is the higher-scored one ranked higher?) and
the Pearson correlation of ``sigmoid(logit)`` with the final score, over all steps and per step.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import common

__all__ = [
    "StepAwareScorer",
    "load_scorer",
    "save_scorer",
    "collect_states",
    "predict_x0",
    "train_scorer",
    "evaluate",
    "main",
]

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "embedded" / "spo_scorer.safetensors"


INPUT = "x0_hat"  # what the scorer reads (recorded in its .json; older x_t scorers are refused)


class StepAwareScorer(nn.Module):
    """A small CNN on ``x0_hat [B, C, H, W]`` (average-pooled by ``pool``) FiLM-conditioned on the noise level
    ``t [B]`` in [0, 1] and the prompt's token embeddings ``[B, L, D]`` (flattened, projected) -> a logit
    ``[B]``."""

    def __init__(
        self,
        channels: int = 3,
        size: int = 32,
        prompt_len: int = 10,
        prompt_dim: int = 64,
        width: int = 32,
        pool: int = 1,
    ):
        super().__init__()
        self.config = dict(
            channels=channels, size=size, prompt_len=prompt_len, prompt_dim=prompt_dim, width=width, pool=pool
        )
        self.pool = pool
        size = math.ceil(size / pool)
        w = width
        self.prompt = nn.Linear(prompt_len * prompt_dim, 48)
        self.cond = nn.Sequential(nn.Linear(48 + 16, 64), nn.SiLU())
        self.c1 = nn.Conv2d(channels, w, 3, padding=1)
        self.c2 = nn.Conv2d(w, w, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(w, w, 3, stride=2, padding=1)
        self.c4 = nn.Conv2d(w, 8, 1)
        self.film = nn.Linear(64, 6 * w)
        side = math.ceil(math.ceil(size / 2) / 2)
        self.head = nn.Sequential(nn.Linear(8 * side * side + 64, 48), nn.SiLU(), nn.Linear(48, 1))

    @staticmethod
    def t_features(t: torch.Tensor) -> torch.Tensor:
        f = torch.pi * torch.arange(1, 9, device=t.device, dtype=torch.float32)
        a = t.float()[:, None] * f
        return torch.cat([a.sin(), a.cos()], 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        c = self.cond(torch.cat([self.prompt(prompt_embeds.float().flatten(1)), self.t_features(t)], 1))
        s1, b1, s2, b2, s3, b3 = self.film(c)[:, :, None, None].chunk(6, 1)
        x = x.float()
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool, ceil_mode=True)
        h = F.silu(F.group_norm(self.c1(x), 4) * (1 + s1) + b1)
        h = F.silu(F.group_norm(self.c2(h), 4) * (1 + s2) + b2)
        h = F.silu(F.group_norm(self.c3(h), 4) * (1 + s3) + b3)
        h = self.c4(h).flatten(1)
        return self.head(torch.cat([h, c], 1)).squeeze(1)


def save_scorer(model: StepAwareScorer, path: Path, recipe: dict) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    common.atomic_write_text(
        path.with_suffix(".json"), json.dumps({"config": model.config, "input": INPUT, **recipe}, indent=2)
    )


def load_scorer(path, *, option: str = "--scorer") -> StepAwareScorer:
    """A scorer saved by :func:`save_scorer`: the ``.safetensors`` file (its ``.json`` beside it) or a
    directory with ``scorer.safetensors``; errors name ``option``."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / "scorer.safetensors"
    meta = p.with_suffix(".json")
    if not p.is_file() or not meta.is_file():
        raise FileNotFoundError(
            f"{option}: expected a step-aware scorer (a .safetensors file with its .json recipe beside it, "
            f"or a directory holding scorer.safetensors, as python -m train.spo_scorer writes), got {path}"
        )
    try:
        recipe = json.loads(meta.read_text())
        if recipe.get("input") != INPUT:
            raise ValueError(
                f"it reads {recipe.get('input', 'x_t')!r}, expected {INPUT!r}: retrain with python -m "
                "train.spo_scorer"
            )
        cfg = recipe["config"]
        model = StepAwareScorer(**cfg)
        model.load_state_dict(load_file(str(p)))
    except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise ValueError(f"{option}: {p} is not a step-aware scorer of train.spo_scorer ({e})") from None
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------------
# Data: states along engine rollouts, labelled with the final reward
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_x0(policy, sched, x, step: int, cond, uncond) -> torch.Tensor:
    """The policy's one-step clean prediction ``x0_hat`` from states ``x`` entering step ``step`` (math.md §6;
    the active adapter, the sampler's CFG): flow ``x - sigma v``, DDIM ``(x - sqrt(1 - a) eps) / sqrt(a)``;
    ``x`` itself at ``step == N`` (the clean sample)."""
    from engine import guided_prediction

    if step >= sched.num_steps:
        return x
    b = x.shape[0]
    t = sched.timesteps[step].expand(b).contiguous()
    pred = guided_prediction(policy.denoiser, x, t, cond, uncond=uncond, guidance_scale=sched.guidance_scale)
    from .reward_backprop import x0_from_prediction

    kind, p = ("flow", sched.sigmas[step]) if sched.sigmas is not None else ("ddim", sched.alpha_bars[step])
    return x0_from_prediction(kind, x, pred, p).to(x.dtype)


@torch.no_grad()
def collect_states(policy, sched, prompts: list, seeds: list, reward, *, batch: int = 64):
    """Roll out ``prompts`` (one seed each) with the active adapter on ``sched`` -> ``(x0_hat [B, N+1, ...],
    rewards [B])``: index ``s`` holds :func:`predict_x0` of the state entering step ``s`` (``N``: the clean
    sample; index 0, pure noise, is never scored)."""
    from .d3po import initial_noise, sample_step, step_noise

    states, rewards = [], []
    g = sched.guidance_scale
    for lo in range(0, len(prompts), batch):
        mb = prompts[lo : lo + batch]
        sd = torch.tensor([int(s) for s in seeds[lo : lo + batch]], dtype=torch.int64, device=policy.device)
        cond = policy.encode(mb)
        uncond = policy.encode([""] * len(mb)) if g != 1.0 else None
        x = initial_noise(policy, sd)
        traj = [torch.zeros_like(x)]
        for i in range(sched.num_steps):
            x, _ = sample_step(policy, sched, x, i, cond, uncond, step_noise(policy, sd, i))
            traj.append(predict_x0(policy, sched, x, i + 1, cond, uncond))
        states.append(torch.stack(traj, 1).cpu())
        r, _ = reward(policy.decode(x).cpu(), [policy.prompt_text(p) for p in mb])
        rewards.append(r.float())
    return torch.cat(states), torch.cat(rewards)


def label_map(rewards: torch.Tensor) -> dict:
    """How final rewards become the cross-entropy's labels: as they are when they lie in [0, 1] (the
    GenEval-mini scores, a probability-like score), else mapped linearly onto [0, 1] by the training rewards'
    minimum and maximum (e.g. JPEG compressibility, a negative size in kB).  Only the ranking and the logit
    gaps of the scorer matter to SPO; the map keeps the labels valid probabilities."""
    lo, hi = float(rewards.min()), float(rewards.max())
    if lo >= 0.0 and hi <= 1.0:
        return {"map": "identity"}
    return {"map": "min-max", "min": lo, "max": hi}


def to_labels(rewards: torch.Tensor, labels: dict) -> torch.Tensor:
    if labels["map"] == "identity":
        return rewards
    span = labels["max"] - labels["min"]
    return ((rewards - labels["min"]) / span).clamp(0.0, 1.0) if span > 0 else torch.full_like(rewards, 0.5)


def _flatten(policy, sched, prompts, states, rewards, steps):
    """Training rows ``(x, t, prompt index, label, step)`` for the given state indices."""
    n = states.shape[0]
    xs = states[:, steps].flatten(0, 1)
    t = torch.tensor([sched.x0_time(s) for s in steps]).repeat(n)
    pidx = torch.arange(n).repeat_interleave(len(steps))
    y = rewards.repeat_interleave(len(steps))
    st = torch.tensor(steps).repeat(n)
    return xs, t, pidx, y, st


def scorer_logits(model, policy, prompts, x, t, batch: int = 512) -> torch.Tensor:
    out = []
    for lo in range(0, len(x), batch):
        emb = policy.encode(prompts[lo : lo + batch]).prompt_embeds.cpu()
        out.append(model(x[lo : lo + batch], t[lo : lo + batch], emb))
    return torch.cat(out)


@torch.no_grad()
def evaluate(model, policy, sched, prompts, states, rewards, group: int) -> dict:
    """Held-out numbers: pairwise accuracy and Pearson correlation, over steps ``1..N`` and per step.  Rows
    ``[p group, (p + 1) group)`` share a prompt."""
    model.eval()
    steps = list(range(1, sched.num_steps + 1))
    n = states.shape[0]
    per_step, accs, cors = {}, [], []
    for s in steps:
        x = states[:, s]
        t = torch.full((n,), sched.x0_time(s))
        logit = scorer_logits(model, policy, [prompts[i] for i in range(n)], x, t)
        p = torch.sigmoid(logit)
        right = total = 0
        for g0 in range(0, n, group):
            r, lg = rewards[g0 : g0 + group], logit[g0 : g0 + group]
            d_r = r[:, None] - r[None, :]
            d_l = lg[:, None] - lg[None, :]
            mask = d_r > 0
            right += int((d_l[mask] > 0).sum())
            total += int(mask.sum())
        acc = right / max(total, 1)
        varies = rewards.std() > 0 and p.std() > 0
        cor = float(torch.corrcoef(torch.stack([p, rewards]))[0, 1]) if varies else 0.0
        per_step[s] = {"pair_acc": round(acc, 4), "corr": round(cor, 4), "pairs": total}
        accs.append(acc)
        cors.append(cor)
    return {"pair_acc": sum(accs) / len(accs), "corr": sum(cors) / len(cors), "per_step": per_step}


def train_scorer(
    policy,
    sched,
    reward,
    *,
    num_prompts: int,
    images_per_prompt: int,
    heldout_prompts: int,
    epochs: int,
    lr: float,
    seed: int,
    width: int = 32,
    pool: int = 1,
    say=print,
) -> tuple[StepAwareScorer, dict]:
    """Roll out the current policy, fit a scorer to the final rewards, measure it on held-out prompts."""
    t0 = time.perf_counter()
    train_p = policy.sample_train_prompts(num_prompts, common.derive_seed(seed, "scorer", "prompts"))
    train_p = [p for p in train_p for _ in range(images_per_prompt)]
    seeds = [common.derive_seed(seed, "scorer", "rollout", i) for i in range(len(train_p))]
    test_pool = list(policy.test_prompts)
    g = torch.Generator().manual_seed(common.derive_seed(seed, "scorer", "heldout"))
    test_idx = torch.randperm(len(test_pool), generator=g)[:heldout_prompts].tolist()
    test_p = [test_pool[i] for i in test_idx for _ in range(images_per_prompt)]
    test_seeds = [common.derive_seed(seed, "scorer", "heldout-rollout", i) for i in range(len(test_p))]
    with policy.adapter("default"):
        s_tr, r_tr = collect_states(policy, sched, train_p, seeds, reward)
        s_te, r_te = collect_states(policy, sched, test_p, test_seeds, reward)
    say(
        f"scorer data: {len(train_p)} train / {len(test_p)} held-out trajectories, mean final score "
        f"{float(r_tr.mean()):.3f} / {float(r_te.mean()):.3f} ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    emb = policy.encode(train_p[:1]).prompt_embeds
    torch.manual_seed(common.derive_seed(seed, "scorer", "init") % (2**31))
    model = StepAwareScorer(s_tr.shape[2], s_tr.shape[-1], emb.shape[1], emb.shape[2], width=width, pool=pool)
    steps = list(range(1, sched.num_steps + 1))
    labels = label_map(r_tr)
    if labels["map"] == "min-max":
        say(
            f"scorer labels: the rewards span [{labels['min']:.4g}, {labels['max']:.4g}], outside [0, 1]: "
            "mapped linearly onto [0, 1] for the cross-entropy",
            flush=True,
        )
    xs, t, pidx, y, _ = _flatten(policy, sched, train_p, s_tr, to_labels(r_tr, labels), steps)
    all_emb = policy.encode(train_p).prompt_embeds.cpu()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(common.derive_seed(seed, "scorer", "order"))
    bs = 256
    total = epochs * math.ceil(len(xs) / bs)
    sched_lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(len(xs), generator=gen)
        tot = 0.0
        for lo in range(0, len(xs), bs):
            i = perm[lo : lo + bs]
            loss = F.binary_cross_entropy_with_logits(model(xs[i], t[i], all_emb[pidx[i]]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched_lr.step()
            tot += float(loss.detach()) * len(i)
        say(f"scorer epoch {ep + 1}/{epochs} | train bce {tot / len(xs):.4f}", flush=True)
    metrics = evaluate(model, policy, sched, test_p, s_te, r_te, images_per_prompt)
    metrics["train_trajectories"], metrics["heldout_trajectories"] = len(train_p), len(test_p)
    metrics["labels"] = labels
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    say(
        f"scorer held-out: pairwise accuracy {metrics['pair_acc']:.3f}, correlation {metrics['corr']:.3f} "
        f"(mean over steps 1..{sched.num_steps}; {metrics['seconds']:.0f}s)",
        flush=True,
    )
    return model.eval().requires_grad_(False), metrics


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m train.spo_scorer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default=None, help="output directory (default: runs/spo_scorer-<timestamp>)")
    ap.add_argument("--overwrite", action="store_true", help="replace a scorer already in --run-dir")
    ap.add_argument("--num-prompts", type=int, default=192, help="training prompts (embedded default)")
    ap.add_argument("--images-per-prompt", type=int, default=4, help="trajectories per prompt")
    ap.add_argument("--heldout-prompts", type=int, default=48, help="held-out (test-split) prompts")
    ap.add_argument("--epochs", type=int, default=6, help="passes over the training states")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (one-cycle)")
    ap.add_argument("--width", type=int, default=24, help="conv channels")
    ap.add_argument("--pool", type=int, default=2, help="average-pool the state by this factor first")
    ap.add_argument("--solver", default="cps", help="rollout SDE: cps or flow-sde (train.spo's)")
    ap.add_argument("--num-steps", type=int, default=10, help="sampler steps (train.spo's)")
    ap.add_argument("--noise-level", type=float, default=0.7, help="SDE noise level (train.spo's)")
    ap.add_argument("--reward", default="geneval_mini", help="the verifier whose final score is the label")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    return ap


def _check(args) -> None:
    for name in (
        "num_prompts",
        "images_per_prompt",
        "heldout_prompts",
        "epochs",
        "num_steps",
        "width",
        "pool",
    ):
        v = getattr(args, name)
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {v}")
    if args.images_per_prompt < 2:
        raise ValueError(
            f"--images-per-prompt: expected an integer >= 2 (held-out pairs share a prompt), "
            f"got {args.images_per_prompt}"
        )
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"--lr: expected a finite value > 0, got {args.lr}")
    if args.solver not in ("cps", "flow-sde"):
        raise ValueError(
            f"--solver: expected cps or flow-sde (the embedded default is a flow model), got {args.solver!r}"
        )
    if not args.noise_level > 0:
        raise ValueError(f"--noise-level: expected a value > 0, got {args.noise_level}")
    if args.reward not in ("geneval_mini", "geneval_mini_partial"):
        raise ValueError(f"--reward: expected geneval_mini or geneval_mini_partial, got {args.reward!r}")
    if args.threads < 0:
        raise ValueError(f"--threads: expected an integer >= 0, got {args.threads}")


def build_embedded(seed: int, directory: str | None = None):
    """The embedded default's policy (``directory``: another embedded checkpoint in its place)."""
    from .policy import ModelConfig, build_policy

    return build_policy(ModelConfig(), preset="tiny", model_path=None, device=torch.device("cpu"), seed=seed,
                        embedded_dir=directory)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check(args)
        run_dir = Path(args.run_dir or f"runs/spo_scorer-{time.strftime('%Y%m%d-%H%M%S')}")
        out = run_dir / "scorer.safetensors"
        if out.exists() and not args.overwrite:
            raise FileExistsError(
                f"--run-dir: {run_dir} already holds a scorer (pass --overwrite to replace it)"
            )
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from types import SimpleNamespace

    from .d3po import build_schedule
    from .rewards.registry import build_reward

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        policy = build_embedded(args.seed)
        sc = SimpleNamespace(
            num_steps=args.num_steps,
            shift=None,
            noise_level=args.noise_level,
            eta=1.0,
            guidance_scale=1.0,
            cps_log_prob="gaussian",
        )
        sched = build_schedule(policy, sc, args.solver)
        reward = build_reward(args.reward)
        model, metrics = train_scorer(
            policy,
            sched,
            reward,
            num_prompts=args.num_prompts,
            images_per_prompt=args.images_per_prompt,
            heldout_prompts=args.heldout_prompts,
            epochs=args.epochs,
            lr=args.lr,
            seed=args.seed,
            width=args.width,
            pool=args.pool,
        )
        cmd = "python -m train.spo_scorer " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        recipe = {
            "command": cmd,
            "args": vars(args),
            "heldout": metrics,
            "sampler": {"solver": args.solver, "num_steps": args.num_steps, "noise_level": args.noise_level},
        }
        save_scorer(model, out, recipe)
        print(f"scorer: {out} ({out.stat().st_size // 1024} KB), recipe {out.with_suffix('.json')}")
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
