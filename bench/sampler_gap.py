"""Does what a run learned on its rollout sampler hold on the evaluation sampler?  (math.md §9.2)

The policy-gradient and online preference loops (Flow-GRPO, DDPO, D3PO, SPO) train on stochastic rollouts
(the flow SDE, CPS, DDIM with eta), while the held-out evaluation samples with a deterministic ODE.  This
scores the held-out prompts with the run's training reward under several samplers, for the base model (the
adapters off) and for the run's weights, from the same noise, and prints each sampler's paired change:

    python -m bench.sampler_gap RUN                    # the evaluation's and the rollouts' sampler
    python -m bench.sampler_gap RUN --samplers euler:6,flow-sde:6:0.7 --prompts 64 --images 2

A sampler is ``SOLVER:STEPS[:NOISE]``: ``dpm2``/``euler`` (ODE), ``flow-sde``/``cps`` (NOISE: the noise
level), ``ddim`` for an epsilon UNet (NOISE: eta).  The two default rows are the run's own protocols:
``eval`` (its ``--eval.solver``/``--eval.num-steps``/``--eval.cfg-scale``) and ``rollout`` (its
``--sample.solver``, ``--sample.num-steps``, ``--sample.noise-level`` or eta and ``--sample.guidance-scale``);
``--samplers`` rows use the evaluation's CFG scale.  The held-out prompts and the seeds of an image are the
evaluation's (``--eval.num-prompts`` prompts x ``--images``), so the ``eval`` row's trained mean with
``--images 1`` is the run's ``eval/reward`` at that checkpoint.  ``--weights trained`` scores the trained
adapter instead of the eval EMA.  With ``--reward geneval_mini`` (or ``geneval_mini_partial``) on the embedded
default each row also gives GenEval-mini's score as the evaluation logs it, a mean over task types.  ``--json
FILE`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from bench._common import check_json_path
from train import common
from train.config import from_dict
from train.diversity import paired_difference
from train.evaluation import EvalConfig, Evaluator, paired_score_change, record_mean

ODE = ("dpm2", "euler")
SOLVERS = (*ODE, "flow-sde", "cps", "ddim")


def parse_sampler(spec: str) -> dict:
    """``SOLVER:STEPS[:NOISE]`` -> ``{"solver", "num_steps", "noise"}`` (noise None for an ODE)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in SOLVERS:
        raise ValueError(
            f"--samplers: expected SOLVER:STEPS[:NOISE] with SOLVER in {', '.join(SOLVERS)}, got {spec!r}"
        )
    try:
        steps = int(parts[1])
        noise = float(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise ValueError(f"--samplers: expected an integer STEPS and a number NOISE, got {spec!r}") from None
    if steps < 1 or (noise is not None and not (math.isfinite(noise) and noise >= 0)):
        raise ValueError(f"--samplers: expected STEPS >= 1 and a finite NOISE >= 0, got {spec!r}")
    if parts[0] in ODE and noise is not None:
        raise ValueError(f"--samplers: {parts[0]} is an ODE and takes no NOISE, got {spec!r}")
    return {"solver": parts[0], "num_steps": steps, "noise": noise}


def rollout_solver(run: Path) -> str | None:
    """The rollout solver the run resolved (``protocol/rollout_solver``, its first metrics row), if logged."""
    if not (run / "metrics.jsonl").is_file():
        return None
    key = "protocol/rollout_solver"
    return next((r[key] for r in common.read_metrics(run) if key in r), None)


def run_samplers(cfg: dict, epsilon: bool, resolved: str | None = None) -> dict[str, dict]:
    """The run's ``eval`` and ``rollout`` protocols as sampler rows (with their CFG scales); ``resolved`` is
    the solver a ``--sample.solver auto`` run rolled out with."""
    ev, sc = cfg["eval"], cfg["sample"]
    rows = {
        "eval": {"solver": "ddim", "num_steps": ev["num_steps"], "noise": 0.0} if epsilon
        else {"solver": ev["solver"], "num_steps": ev["num_steps"], "noise": None},
    }  # fmt: skip
    solver = sc.get("solver", "dpm2")
    if solver == "auto":
        solver = "ddim" if epsilon else resolved
        if solver is None:
            raise ValueError(
                "RUN: --sample.solver auto, and its metrics.jsonl does not say which solver it resolved to "
                "(protocol/rollout_solver, logged since 2026-12-06); name the rollout sampler in --samplers"
            )
    noise = None
    if solver == "ddim":
        noise = sc.get("eta", 1.0)
    elif solver in ("flow-sde", "cps"):
        noise = sc["noise_level"]
    rows["rollout"] = {"solver": solver, "num_steps": sc["num_steps"], "noise": noise,
                       "cfg": sc.get("guidance_scale", 1.0)}  # fmt: skip
    rows["eval"]["cfg"] = ev["cfg_scale"]
    return rows


def sample(policy, prompts, seeds, row: dict, *, shift, batch: int, weights: str | None) -> torch.Tensor:
    """Decoded samples of ``prompts`` under ``row``'s sampler: ``weights`` None is the base model (adapters
    off), ``"ema"`` the eval EMA, ``"trained"`` the trained adapter."""
    ddim = row["solver"] == "ddim"
    kw = dict(solver=row["solver"], num_steps=row["num_steps"], shift=None if ddim else shift,
              guidance_scale=row["cfg"])  # fmt: skip
    if ddim:
        kw["eta"] = row["noise"]
    elif row["noise"] is not None:
        kw["noise_level"] = row["noise"]
    out = []
    for lo in range(0, len(prompts), batch):
        p, s = prompts[lo : lo + batch], seeds[lo : lo + batch]
        if weights is None:
            with policy.adapters_disabled():
                x0 = policy.sample(p, s, **kw)
        elif weights == "ema":
            with policy.adapter("default"), policy.eval_weights():
                x0 = policy.sample(p, s, **kw)
        else:
            with policy.adapter("default"):
                x0 = policy.sample(p, s, **kw)
        out.append(policy.decode(x0).cpu())
    return torch.cat(out)


# GenEval-mini's rewards whose benchmark score is a mean over task types (train.evaluation's record columns)
TASK_MEAN = {"geneval_mini": "strict", "geneval_mini_partial": "partial"}


def task_mean(vals: dict, held: list, seeds: list, column: str) -> dict:
    """GenEval-mini's score as the evaluation logs it (the mean over task types of each type's mean) for the
    base and trained samples, and its paired change and standard error (evaluation.paired_score_change)."""
    records = {
        which: {"iteration": which, "prompts": [p.text for p in held], "seeds": list(seeds),
                "tasks": [p.task for p in held], "columns": {column: v}}
        for which, v in vals.items()
    }  # fmt: skip
    change, se = paired_score_change(records["base"], records["trained"], column)
    means = {which: record_mean(r, column) for which, r in records.items()}
    return {**means, "change": change, "se": se}


def measure(run: Path, *, iteration=None, samplers=(), prompts: int | None = None, images: int = 1,
            weights: str = "ema", batch: int = 64, reward_name: str | None = None) -> dict:  # fmt: skip
    """Every sampler row's base and trained mean reward on the held-out prompts and their paired change."""
    from train.export import load_policy
    from train.rewards.registry import build_reward

    cfg = json.loads((run / "config.json").read_text())
    policy, it = load_policy(run, iteration=iteration)
    epsilon = getattr(policy.denoiser, "prediction_type", "flow") == "epsilon"
    rows = run_samplers(cfg, epsilon, rollout_solver(run))
    for spec in samplers:
        row = parse_sampler(spec)
        if (row["solver"] == "ddim") != epsilon:
            fits = "ddim" if epsilon else "dpm2, euler, flow-sde or cps"
            raise ValueError(f"--samplers: expected {fits} for this run's model, got {spec!r}")
        rows[spec] = {**row, "cfg": cfg["eval"]["cfg_scale"]}
    ev = from_dict(EvalConfig, cfg["eval"])
    ev = replace(ev, images_per_prompt=images, num_prompts=ev.num_prompts if prompts is None else prompts)
    evaluator = Evaluator(ev, seed=cfg["seed"], reward=None)
    held = evaluator._prompts(policy)
    seeds = [common.derive_seed(cfg["seed"], "eval", i) for i in range(len(held))]
    texts = [policy.prompt_text(p) for p in held]
    name = reward_name or cfg["reward"]
    reward = build_reward(
        name, weights=() if reward_name else tuple(cfg.get("reward_weights") or ()),
        aggregation=cfg["reward_aggregation"], clip_path=cfg.get("reward_clip_path"),
        paths=cfg.get("reward_paths") or (), device=cfg.get("reward_device", "auto"),
        timeout=cfg.get("reward_timeout", 60.0), retries=cfg.get("reward_retries", 2),
        vlm_model=cfg.get("reward_vlm_model"),
    )  # fmt: skip
    shift = cfg["sample"].get("shift")
    out = {"run": str(run), "iteration": it, "weights": weights, "reward": name, "images": len(held)}
    out["rows"] = {}
    done = {}  # a row repeating an earlier row's sampler (NFT rolls out as it evaluates) is not resampled
    try:
        for key, row in rows.items():
            same = (row["solver"], row["num_steps"], row["noise"], row["cfg"])
            if same in done:
                out["rows"][key] = {**out["rows"][done[same]], **row}
                continue
            done[same] = key
            vals = {}
            for which, w in (("base", None), ("trained", weights)):
                with torch.no_grad():
                    imgs = sample(policy, held, seeds, row, shift=shift, batch=batch, weights=w)
                    vals[which] = reward(imgs, texts)[0].double().tolist()
            change, se = paired_difference(vals["trained"], vals["base"])
            out["rows"][key] = {
                **row,
                "base": sum(vals["base"]) / len(held),
                "trained": sum(vals["trained"]) / len(held),
                "change": change,
                "se": se,
            }
            if name in TASK_MEAN and hasattr(held[0], "task"):
                out["rows"][key]["task_mean"] = task_mean(vals, held, seeds, TASK_MEAN[name])
    finally:
        if hasattr(reward, "close"):
            reward.close()
    return out


def report(res: dict) -> str:
    lines = [
        f"{res['run']} at iteration {res['iteration']} ({res['weights']} weights), reward {res['reward']}, "
        f"{res['images']} held-out images; the change is paired image by image (standard error in brackets)",
        f"{'sampler':<22} {'solver':<9} {'steps':>5} {'noise':>6} {'cfg':>5} {'base':>9} {'trained':>9} "
        f"{'change':>9} {'(se)':>8}",
    ]
    for key, r in res["rows"].items():
        noise = "-" if r["noise"] is None else f"{r['noise']:g}"
        lines.append(
            f"{key:<22} {r['solver']:<9} {r['num_steps']:>5} {noise:>6} {r['cfg']:>5g} {r['base']:>9.4f} "
            f"{r['trained']:>9.4f} {r['change']:>+9.4f} ({r['se']:.4f})"
        )
    if any("task_mean" in r for r in res["rows"].values()):
        lines.append("GenEval-mini score (the mean over task types, as the evaluation logs it):")
        for key, r in res["rows"].items():
            t = r["task_mean"]
            lines.append(
                f"{key:<22} {'':<9} {'':>5} {'':>6} {'':>5} {t['base']:>9.4f} {t['trained']:>9.4f} "
                f"{t['change']:>+9.4f} ({t['se']:.4f})"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench.sampler_gap", description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a run directory (config.json and checkpoints/)")
    ap.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the latest)")
    ap.add_argument("--samplers", default="", help="more rows, comma-separated SOLVER:STEPS[:NOISE]")
    ap.add_argument("--prompts", type=int, default=None, help="held-out prompts (default: the run's; 0: all)")
    ap.add_argument("--images", type=int, default=1, help="images per held-out prompt")
    ap.add_argument("--weights", choices=("ema", "trained"), default="ema", help="eval EMA or trained LoRA")
    ap.add_argument("--reward", default=None, help="score with this reward instead of the run's")
    ap.add_argument("--batch", type=int, default=64, help="images per sampling batch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = ap.parse_args(argv)
    check_json_path(args.json)
    try:
        specs = [s for s in args.samplers.split(",") if s]
        for s in specs:
            parse_sampler(s)
        if not (args.run / "config.json").is_file():
            raise ValueError(f"RUN: expected a run directory holding config.json, got {str(args.run)!r}")
        for option, val, low in (("--images", args.images, 1), ("--batch", args.batch, 1),
                                 ("--prompts", args.prompts, 0), ("--threads", args.threads, 0)):  # fmt: skip
            if val is not None and val < low:
                raise ValueError(f"{option}: expected an integer >= {low}, got {val}")
    except ValueError as e:
        print(f"error: {e}", flush=True)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        res = measure(
            args.run, iteration=args.iteration, samplers=specs, prompts=args.prompts, images=args.images,
            weights=args.weights, batch=args.batch, reward_name=args.reward,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", flush=True)
        return 2
    print(report(res), flush=True)
    if args.json:
        common.atomic_write_text(args.json, json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
