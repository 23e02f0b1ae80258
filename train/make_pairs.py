"""Preference pairs from the engine's own rollouts: ``python -m train.make_pairs --help``.

For each prompt, ``--k`` samples (the engine's sampler through the policy, on the model's own schedule; one
seed each), scored by ``--reward``; the best and the worst make a pair (winner, loser), and a prompt whose
``k`` rewards are all equal (best == worst) gives none (a tie; math.md §6.1).  The pairs are written in the
preference JSONL format (docs/preference-data.md): ``<out>/pairs.jsonl`` with PNG images under
``<out>/images/``, or with ``--labels`` ``<out>/labels.jsonl`` (the winner desirable, the loser undesirable:
Diffusion-KTO's unpaired form).  Each record's ``meta`` keeps both rewards and both seeds;
``<out>/make_pairs.json`` the options and the pair statistics (prompts with ties, mean reward gap).

On the embedded default with no arguments: GenEval-mini training prompts and its verifier, on a CPU, offline.
A ``--model`` run names its prompts (``--prompts``) and reward (``--reward``).  Rewards are computed on the
images as written (8-bit), so re-scoring the PNG files gives the recorded rewards.

:func:`make_pairs_from_rollouts` is the same in memory (latents rather than files), for a loop of your own;
``train.dpo --online`` makes its pairs each iteration with ``DPOTrainer.make_pairs``, the same best-vs-worst
rule over prompts split across ranks.

Exit codes: 0 done; 1 stopped (a reward failure, non-finite samples, a failed write); 2 bad input, refused
before any work.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from . import common
from .config import ConfigError, leaf_values, parse_cli, to_dict
from .policy import (
    ModelConfig,
    Policy,
    build_policy,
    check_embedded_dir,
    check_model_options,
    check_model_path,
    check_resolution,
    check_schedule,
    read_prompt_file,
    resolve_solver,
)

__all__ = [
    "PairsConfig",
    "RolloutPair",
    "make_pairs_from_rollouts",
    "pair_statistics",
    "pairs_solver",
    "validate",
    "main",
    "PRESETS",
]

SOLVERS = ("auto", "dpm2", "euler", "flow-sde", "cps", "ddim")
OUTPUTS = ("pairs.jsonl", "labels.jsonl", "make_pairs.json", "images")


def _h(text):
    return field(default=None, metadata={"help": text})


@dataclass
class PairsConfig:
    preset: str = field(default="tiny", metadata={"help": "named setup (see the preset list above)"})
    model: str | None = _h("local diffusers pipeline directory (SD3/SD3.5/FLUX, or an SD1.5-style UNet)")
    prompts: str | None = _h("prompts for a --model run: a text file, one prompt per line")
    tasks: tuple[str, ...] = field(
        default=(), metadata={"help": "embedded default only: GenEval-mini task types to draw prompts from"}
    )
    reward: str | None = field(
        default=None,
        metadata={"help": "reward name(s), comma separated (default: geneval_mini on the embedded default)"},
    )
    reward_weights: tuple[float, ...] = field(default=(), metadata={"help": "one weight per reward"})
    reward_aggregation: str = field(default="zmean", metadata={"help": "zmean, min or mean_minus_std"})
    reward_clip_path: str | None = _h("local CLIP directory for the clip_score reward")
    reward_paths: tuple[str, ...] = field(
        default=(), metadata={"help": "local weights of model rewards, NAME=PATH each"}
    )
    reward_device: str = field(
        default="auto", metadata={"help": "device of model rewards: auto, cpu, cuda, cuda:N"}
    )
    out: str | None = _h("output directory (default: runs/pairs-<timestamp>)")
    overwrite: bool = field(
        default=False, metadata={"help": "replace the pairs, labels and images an --out directory holds"}
    )
    labels: bool = field(
        default=False, metadata={"help": "write labels.jsonl (KTO: winner desirable, loser not) instead"}
    )
    num_prompts: int = field(
        default=64,
        metadata={
            "help": "prompts drawn by the training-prompt sampler (seeded; GenEval-mini: a task, then a "
            "prompt of it); 0: every training prompt once"
        },
    )
    k: int = field(default=8, metadata={"help": "samples per prompt (the best and worst make the pair)"})
    solver: str = field(
        default="auto",
        metadata={"help": "auto (dpm2 for flow models, ddim for UNets), dpm2, euler, flow-sde, cps, ddim"},
    )
    num_steps: int = field(default=10, metadata={"help": "sampler steps"})
    guidance_scale: float = field(default=1.0, metadata={"help": "CFG scale (1: none)"})
    shift: float | None = _h("sigma-schedule shift (none: the model's scheduler config)")
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level a (flow-sde / cps)"})
    eta: float = field(default=0.0, metadata={"help": "DDIM eta (ddim solver)"})
    batch: int = field(default=32, metadata={"help": "images per sampler call"})
    seed: int = field(default=0, metadata={"help": "seed of the prompt draw and of every sample"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    threads: int = field(default=0, metadata={"help": "torch intra-op CPU threads (0: torch's default)"})
    models: ModelConfig = field(default_factory=ModelConfig)


def preset_tiny() -> PairsConfig:
    """The embedded default: GenEval-mini training prompts and verifier, 8 dpm2 samples of 10 steps each, one
    torch thread (as the training loops' tiny presets)."""
    return PairsConfig(threads=1)


def preset_sd35m() -> PairsConfig:
    """SD3.5-M at 512 px (pass the local directory with --model, prompts with --prompts and a --reward):
    bf16, Euler 40 steps at CFG 4.5 (the Flow-GRPO evaluation protocol), 8 samples per prompt."""
    cfg = PairsConfig(preset="sd3.5-m", solver="euler", num_steps=40, guidance_scale=4.5, batch=16)
    cfg.models = ModelConfig(dtype="bfloat16", resolution=512)
    return cfg


PRESETS = {"tiny": preset_tiny, "sd3.5-m": preset_sd35m}


# ------------------------------------------------------------------------------------------------------------
# Pairs in memory (the online mode)
# ------------------------------------------------------------------------------------------------------------
class RolloutPair(NamedTuple):
    """One pair from rollouts: the prompt (as the policy holds it), the winner's and loser's clean latents
    (``x0``, CPU) and their rewards."""

    prompt: object
    x0_w: torch.Tensor
    x0_l: torch.Tensor
    r_w: float
    r_l: float


def pairs_solver(solver: str, policy: Policy) -> str:
    """``auto``: dpm2 (a deterministic ODE, the evaluation's) for flow models, ddim for epsilon UNets; an
    explicit solver must fit the model."""
    if solver not in SOLVERS:
        raise ConfigError(f"--solver: expected one of {', '.join(SOLVERS)}, got {solver!r}")
    pred = getattr(policy.denoiser, "prediction_type", "flow")
    fits = "dpm2, euler, flow-sde or cps"
    return resolve_solver(solver, pred, flow_auto="dpm2", flow_fits=fits, option="--solver")


def _quantize(images: torch.Tensor) -> torch.Tensor:
    """``images`` as an 8-bit PNG stores them (and :func:`train.data.preference.load_image` reads them)."""
    return ((images.float().clamp(-1, 1) + 1.0) * 127.5).round() / 127.5 - 1.0


def _rollout_groups(policy, reward, prompts, k, seed, *, solver, num_steps, guidance_scale, shift,
                    noise_level, eta, batch, quantize, keep_images):
    """Yield, per prompt ``i``: ``(i, x0 [k, ...], images [k, 3, H, W] or None, rewards [k], seeds [k])``.
    Sample ``j`` of prompt ``i`` has the seed ``derive_seed(seed, "make_pairs", i, j)``."""
    solver = pairs_solver(solver, policy)
    per_call = max(1, batch // k)  # prompts per chunk; a chunk's k * per_call samples go in calls of <= batch
    for start in range(0, len(prompts), per_call):
        chunk = list(range(start, min(start + per_call, len(prompts))))
        rows = [(i, j) for i in chunk for j in range(k)]
        seeds = [common.derive_seed(seed, "make_pairs", i, j) for i, j in rows]
        x0s, imgs, rews = [], [], []
        for s in range(0, len(rows), batch):
            sub = rows[s : s + batch]
            ps = [prompts[i] for i, _ in sub]
            x0 = policy.sample(
                ps, seeds[s : s + batch], solver=solver, num_steps=num_steps, shift=shift,
                noise_level=noise_level, guidance_scale=guidance_scale, eta=eta,
            )
            images = policy.decode(x0)
            bad = policy.take_nonfinite()
            if bad[0] or bad[1]:
                raise common.TrainingStopped(
                    f"sampling: {bad[0]} latent(s) and {bad[1]} image(s) of {bad[2]} hold NaN/inf "
                    f"(prompts {sub[0][0]}..{sub[-1][0]}); try --models.dtype float32 or fewer --num-steps"
                )
            if quantize:
                images = _quantize(images)
            r, _ = reward(images, ps)
            x0s.append(x0.detach().cpu())
            imgs.append(images.detach().cpu() if keep_images else None)
            rews.append(r.detach().float().cpu())
        x0, r = torch.cat(x0s), torch.cat(rews)
        images = torch.cat(imgs) if keep_images else None
        for n, i in enumerate(chunk):
            sl = slice(n * k, (n + 1) * k)
            yield i, x0[sl], None if images is None else images[sl], r[sl], seeds[sl]


def _best_worst(r: torch.Tensor) -> tuple[int, int] | None:
    """Indices of the best and worst reward (first of equals), or None for a tie (best == worst)."""
    w, l_ = int(torch.argmax(r)), int(torch.argmin(r))
    return None if r[w] == r[l_] else (w, l_)


def make_pairs_from_rollouts(
    policy,
    reward,
    prompts: Sequence,
    k: int,
    seed: int,
    *,
    solver: str = "auto",
    num_steps: int = 10,
    guidance_scale: float = 1.0,
    shift: float | None = None,
    noise_level: float = 0.7,
    eta: float = 0.0,
    batch: int = 32,
    keep_ties: bool = False,
) -> list[RolloutPair]:
    """Pairs in memory: ``k`` samples of each prompt with the policy's active adapter, scored by
    ``reward`` (``(images, prompts) -> (rewards [B], components)``, e.g. train.rewards.registry's); the best
    and worst of each prompt as ``(prompt, x0_w, x0_l, r_w, r_l)``, prompts in order, ties (best == worst)
    left out (``len(prompts) - len(pairs)`` of them).  Sample ``j`` of ``prompts[i]`` is seeded with
    ``derive_seed(seed, "make_pairs", i, j)``: a loop passes a new ``seed`` each iteration.  ``keep_ties``
    pairs a tied prompt's sample 1 (winner) with its sample 0 instead, as flow_grpo's online DPO does
    (yifan123/flow_grpo@ac4c86e8 flow_grpo/stat_tracking.py, ``type == 'dpo'``)."""
    _check_k(k, "k")
    pairs = []
    for i, x0, _, r, _ in _rollout_groups(
        policy, reward, list(prompts), k, seed, solver=solver, num_steps=num_steps,
        guidance_scale=guidance_scale, shift=shift, noise_level=noise_level, eta=eta, batch=batch,
        quantize=False, keep_images=False,
    ):
        bw = _best_worst(r)
        if bw is None and keep_ties:
            bw = (1, 0)
        if bw is not None:
            w, l_ = bw
            pairs.append(RolloutPair(prompts[i], x0[w], x0[l_], float(r[w]), float(r[l_])))
    return pairs


def pair_statistics(pairs: Sequence, num_prompts: int) -> dict:
    """``{prompts, pairs, ties, tie_fraction, mean_gap, mean_winner, mean_loser}`` of ``pairs`` made from
    ``num_prompts`` prompts (rewards read from ``r_w``/``r_l`` of :class:`RolloutPair` tuples)."""
    gaps = [p[3] - p[4] for p in pairs]
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")
    return {
        "prompts": num_prompts,
        "pairs": len(pairs),
        "ties": num_prompts - len(pairs),
        "tie_fraction": (num_prompts - len(pairs)) / num_prompts if num_prompts else float("nan"),
        "mean_gap": mean(gaps),
        "mean_winner": mean([p[3] for p in pairs]),
        "mean_loser": mean([p[4] for p in pairs]),
    }


# ------------------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------------------
def _check_k(k, option: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ConfigError(f"--{option}: expected an integer >= 2 (a best and a worst sample), got {k!r}")


def _embedded(cfg: PairsConfig) -> bool:
    return cfg.preset == "tiny" and not cfg.model


def check_out_dir(cfg: PairsConfig) -> Path:
    """The output directory: new, empty, or (with --overwrite) one holding earlier pairs."""
    out = Path(cfg.out) if cfg.out else common.default_run_dir("pairs")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: expected a directory, got the file {str(out)!r}")
    found = [name for name in OUTPUTS if (out / name).exists()]
    if found and not cfg.overwrite:
        raise ConfigError(
            f"--out: expected a new or empty directory, got {str(out)!r}, which holds {', '.join(found)} "
            f"(pass --overwrite to replace them)"
        )
    return out


def validate(cfg: PairsConfig) -> None:
    """Every check that needs no model loaded, before any work."""
    # the loops' rule: --reward defaults to GenEval-mini on the embedded default, a --model run names one
    from .loop import check_no_prompt_files, resolve_reward

    for name, val in leaf_values(cfg).items():
        for v in val if isinstance(val, (tuple, list)) else (val,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"--{name.replace('_', '-')}: expected a finite number, got {val}")
    if cfg.preset not in PRESETS:
        raise ConfigError(f"--preset: expected one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    _check_k(cfg.k, "k")
    for option, val in (("--num-steps", cfg.num_steps), ("--batch", cfg.batch)):
        if val < 1:
            raise ConfigError(f"{option}: expected an integer >= 1, got {val}")
    if cfg.num_prompts < 0:
        raise ConfigError(
            f"--num-prompts: expected an integer >= 0 (0: every training prompt), got {cfg.num_prompts}"
        )
    if cfg.solver not in SOLVERS:
        raise ConfigError(f"--solver: expected one of {', '.join(SOLVERS)}, got {cfg.solver!r}")
    if not cfg.guidance_scale >= 0:
        raise ConfigError(f"--guidance-scale: expected a value >= 0 (1: none), got {cfg.guidance_scale}")
    if not cfg.noise_level >= 0:
        raise ConfigError(f"--noise-level: expected a value >= 0, got {cfg.noise_level}")
    if not 0 <= cfg.eta <= 1:
        raise ConfigError(f"--eta: expected a value in [0, 1], got {cfg.eta}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: expected auto, cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: expected a machine with CUDA for 'cuda', found none")
    if cfg.threads < 0:
        raise ConfigError(f"--threads: expected an integer >= 0 (0: torch's default), got {cfg.threads}")
    mc = cfg.models
    check_model_options(mc)
    embedded = _embedded(cfg)
    if cfg.tasks:
        from .data import TASKS

        if not embedded:
            raise ConfigError(
                f"--tasks: selects GenEval-mini task types of the embedded default; a --model run takes "
                f"--prompts instead, got --tasks {','.join(cfg.tasks)}"
            )
        if any(t not in TASKS for t in cfg.tasks) or len(set(cfg.tasks)) != len(cfg.tasks):
            raise ConfigError(
                f"--tasks: expected distinct task types among {', '.join(TASKS)}, got {','.join(cfg.tasks)}"
            )
    check_embedded_dir(mc.embedded_dir, embedded=embedded)
    if embedded:
        check_no_prompt_files(cfg)
        check_resolution(None, mc.resolution, embedded=True)
        if cfg.solver == "ddim":
            raise ConfigError(
                "--solver: expected dpm2, euler, flow-sde or cps (or auto) for a flow model, got 'ddim'"
            )
    else:
        check_model_path(cfg.model, preset=cfg.preset, unet_ok=True)
        check_resolution(cfg.model, mc.resolution, embedded=False)
        read_prompt_file(cfg.prompts, "--prompts")
        if cfg.solver != "auto":
            from models.loader import resolve_model_dir

            epsilon = resolve_model_dir(cfg.model)[1] == "UNet2DConditionModel"
            if (cfg.solver == "ddim") != epsilon:
                fits = "ddim (or auto)" if epsilon else "dpm2, euler, flow-sde or cps (or auto)"
                kind = "an epsilon UNet" if epsilon else "a flow model"
                raise ConfigError(f"--solver: expected {fits} for {kind}, got {cfg.solver!r}")
    check_schedule(None if embedded else cfg.model, cfg.shift, option="--shift")
    resolve_reward(cfg, embedded=embedded)
    check_out_dir(cfg)


def _write_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    from .rewards.basic import to_uint8

    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(to_uint8(image[None])[0]).save(tmp, format="PNG")
    os.replace(tmp, path)


def run(cfg: PairsConfig, reward, *, say=print) -> dict:
    """Load the policy, sample, pick, write; returns the statistics."""
    from .data.preference import LabelRecord, PairRecord, write_preference_jsonl

    out = check_out_dir(cfg)
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    policy = build_policy(
        cfg.models, preset=cfg.preset, model_path=None if _embedded(cfg) else cfg.model, device=device,
        seed=cfg.seed, prompts=cfg.prompts, tasks=cfg.tasks,
    )
    solver = pairs_solver(cfg.solver, policy)
    if cfg.num_prompts:
        draw_seed = common.derive_seed(cfg.seed, "make_pairs-prompts")
        prompts = policy.sample_train_prompts(cfg.num_prompts, draw_seed)
    else:
        prompts = list(policy.train_prompts)
    if cfg.overwrite:
        for name in OUTPUTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    say(
        f"make_pairs: {len(prompts)} prompts x {cfg.k} samples ({solver}, {cfg.num_steps} steps, "
        f"CFG {cfg.guidance_scale:g}, reward {cfg.reward}) -> {out}",
        flush=True,
    )
    records, pairs = [], []
    for i, _, images, r, seeds in _rollout_groups(
        policy, reward, prompts, cfg.k, cfg.seed, solver=solver, num_steps=cfg.num_steps,
        guidance_scale=cfg.guidance_scale, shift=cfg.shift, noise_level=cfg.noise_level, eta=cfg.eta,
        batch=cfg.batch, quantize=True, keep_images=True,
    ):
        bw = _best_worst(r)
        if bw is None:
            continue
        w, l_ = bw
        text = policy.prompt_text(prompts[i])
        pw, pl = images_dir / f"{i:06d}_w.png", images_dir / f"{i:06d}_l.png"
        _write_png(images[w], pw)
        _write_png(images[l_], pl)
        rw, rl = float(r[w]), float(r[l_])
        pairs.append((text, None, None, rw, rl))
        if cfg.labels:
            for path, good, rew, sd in ((pw, True, rw, seeds[w]), (pl, False, rl, seeds[l_])):
                records.append(LabelRecord(text, path, good, {"reward": rew, "seed": sd, "prompt_index": i}))
        else:
            meta = {"reward_winner": rw, "reward_loser": rl, "seed_winner": seeds[w], "seed_loser": seeds[l_],
                    "prompt_index": i}
            records.append(PairRecord(text, pw, pl, meta))
    stats = pair_statistics(pairs, len(prompts))
    stats["minutes"] = (time.perf_counter() - t0) / 60
    if not records:
        images_dir.rmdir()  # written nothing: leave --out as it was, so the same command can run again
        raise common.TrainingStopped(
            f"make_pairs: every one of the {len(prompts)} prompts gave a tie (its {cfg.k} rewards all "
            f"equal): no pairs to write; try a larger --k, more --num-prompts, or a finer reward"
        )
    jsonl = out / ("labels.jsonl" if cfg.labels else "pairs.jsonl")
    write_preference_jsonl(jsonl, records)
    common.atomic_write_text(
        out / "make_pairs.json",
        json.dumps({"config": to_dict(cfg), "solver": solver, "stats": stats}, indent=2) + "\n",
    )
    say(
        f"make_pairs: {stats['pairs']} pairs from {stats['prompts']} prompts; {stats['ties']} prompts tied "
        f"({100 * stats['tie_fraction']:.0f}%); mean reward gap {stats['mean_gap']:.4f} (winners "
        f"{stats['mean_winner']:.4f}, losers {stats['mean_loser']:.4f}); {stats['minutes']:.1f} min; "
        f"wrote {jsonl}",
        flush=True,
    )
    return stats


def main(argv=None) -> int:
    from .loop import check_sampler_options_used
    from .rewards.registry import RewardError, build_reward

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_cli(PairsConfig, argv, prog="train.make_pairs", description=__doc__.split("\n")[0],
                        presets=PRESETS)
        validate(cfg)
        check_sampler_options_used(cfg, PRESETS[cfg.preset](), prefix="--")
        reward = build_reward(cfg.reward, weights=cfg.reward_weights, aggregation=cfg.reward_aggregation,
                              clip_path=cfg.reward_clip_path, paths=cfg.reward_paths,
                              device=cfg.reward_device)
    except (ConfigError, ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        run(cfg, reward)
    except (RewardError, common.TrainingStopped, common.WriteError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: no JSONL written (the images so far are in --out)", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
