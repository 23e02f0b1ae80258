"""Research probes of the embedded default model (out of ``train.pretrain`` since 2026-12-03): none trains.

* :func:`evaluate` -- held-out GenEval-mini at several CFG scales: ``train.pretrain.evaluate``, the
  training loops' :class:`train.evaluation.Evaluator` sampling through the engine;
* :func:`restart_scores` -- where the model decides its images: held-out renders noised to ``t`` and
  brought back with the Euler ODE on the model's schedule;
* :func:`relation_offsets` / :func:`relation_response` -- whether it places objects by the relation words.

All sample on the model's own diffusers schedule (``models/embedded/scheduler_config.json``, math.md §0)
with per-sample Philox noise (``engine.rollout``; math.md §A), through ``train.pretrain.ModelPolicy``.

    python -m bench.embedded_probes --probe relation              (--help lists the options)
    python -m bench.embedded_probes --probe evaluate --cfg-scales 1,4.5 --per-task 64
    python -m bench.embedded_probes --probe restart --model runs/embedded_4block

prints the probe's result as JSON.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import kernels
from engine.rollout import per_sample_randn
from models.embedded import DEFAULT_DIR, EmbeddedDefault
from train.common import derive_seed
from train.config import ConfigError, parse_cli
from train.data import RELATIONS, Prompt, all_prompts, parse_prompt, render_batch, test_prompts
from train.pretrain import ModelPolicy, PretrainEvalConfig
from train.pretrain import evaluate as _evaluate
from train.rewards import GenEvalMini

__all__ = ["evaluate", "restart_scores", "relation_offsets", "relation_response", "ProbeConfig", "main"]


def evaluate(
    model: EmbeddedDefault,
    cfg_scales: tuple[float, ...] = (1.0,),
    per_task: int = 32,
    num_steps: int = 10,
    solver: str = "euler",
    seed: int = 1234,
) -> dict[str, dict[str, float]]:
    """Held-out GenEval-mini strict score (mean over task types), per task type and partial, of ``model`` at
    each of ``cfg_scales`` (1: CFG-free) -> ``{"cfg<scale>": {...}}``; what ``train.pretrain --eval.every``
    logs."""
    ec = PretrainEvalConfig(cfg_scales=tuple(cfg_scales), per_task=per_task, solver=solver,
                            num_steps=num_steps, seed=seed)
    return _evaluate(model, ec)


@torch.no_grad()
def restart_scores(
    model: EmbeddedDefault,
    starts: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9),
    n_per_task: int = 32,
    steps: int = 20,
    shift: float | None = None,
    seed: int = 1234,
) -> dict[float, float]:
    """Where the model decides its images: held-out renders noised to ``t = start`` (``x_t = (1 - t) x0 +
    t noise``, per-render Philox noise), brought back to ``t = 0`` with the CFG-free Euler ODE
    (``kernels.euler_step``) over the part of the model's ``steps``-step schedule below ``start`` (``shift``
    None: its scheduler's), and scored like :func:`evaluate`.  A start from which the score is still ~1 is
    one the model denoises correctly; where it falls is where the model's own decisions begin.
    -> ``{start: strict score}``."""
    for t in starts:
        if not 0.0 < t <= 1.0:
            raise ValueError(f"starts: expected values in (0, 1], got {t}")
    policy = ModelPolicy(model)
    verifier = GenEvalMini()
    prompts = test_prompts(n_per_task)
    x0 = render_batch(prompts, seed).to(model.device, model.dtype)
    seeds = torch.tensor([derive_seed(seed, "restart", i) for i in range(len(prompts))], device=x0.device)
    noise = per_sample_randn(x0.shape[1:], seeds, 0).to(x0)
    model.text_encoder.clear_cache()
    cond = policy.encode(prompts)
    schedule = policy.sigmas(steps, shift).tolist()
    out = {}
    for start in starts:
        sigmas = [start] + [s for s in schedule if s < start]
        x = (1 - start) * x0 + start * noise
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            v = policy.denoiser(x, torch.full((len(x),), 1000.0 * sigma, device=x.device), cond)
            x = kernels.euler_step(x, v, sigma, sigma_next)
        strict = verifier.score(policy.decode(x).cpu(), prompts)["strict"]
        out[start] = verifier.summarize(strict, prompts)["score"]
    return out


def relation_offsets(
    images: torch.Tensor, prompts: list[Prompt | str], verifier: GenEvalMini | None = None
) -> dict[str, dict[str, float]]:
    """Where the first object of each position prompt lies relative to the second, per relation: the mean
    ``dx``/``dy`` (px, x to the right, y down) of ``objects[0]``'s centre minus ``objects[1]``'s, over the
    images of ``images [B, 3, H, W]`` in which the verifier finds exactly one of each (their number is ``n``).
    Rendered ground truth gives about -16 px in x for "left of", +16 for "right of", and the same in y for
    "above" and "below"."""
    if len(prompts) != len(images):
        raise ValueError(f"prompts: expected {len(images)} prompts (one per image), got {len(prompts)}")
    verifier = verifier or GenEvalMini()
    found: dict[str, list[tuple[float, float]]] = {r: [] for r in RELATIONS}
    for objects, p in zip(verifier.detect(images), prompts, strict=True):
        p = parse_prompt(p) if isinstance(p, str) else p
        if p.relation is None:
            raise ValueError(f"prompts: expected position prompts, got {p.text!r}")
        a, b = (verifier.matching(objects, spec) for spec in p.objects)
        if len(a) == 1 and len(b) == 1:
            found[p.relation].append((a[0].cx - b[0].cx, a[0].cy - b[0].cy))
    out = {}
    for rel, d in found.items():
        t = torch.tensor(d, dtype=torch.float64).view(-1, 2)
        mean = t.mean(0).tolist() if len(t) else [float("nan")] * 2
        out[rel] = {"dx": mean[0], "dy": mean[1], "n": len(t)}
    return out


@torch.no_grad()
def relation_response(
    model: EmbeddedDefault,
    n_pairs: int = 8,
    samples: int = 16,
    steps: int = 10,
    shift: float | None = None,
    seed: int = 1234,
) -> dict:
    """Whether the model follows the relation words.  ``n_pairs`` object pairs of the position task (a
    seeded choice over both splits), each asked as "A left of B", "A right of B", "A above B" and "A below
    B", ``samples`` CFG-free Euler samples per prompt through the engine (``steps`` on the model's schedule),
    with the same per-sample noise for all four relations, then :func:`relation_offsets`.  Adds
    ``x_separation`` = dx(right of) - dx(left of) and ``y_separation`` = dy(below) - dy(above): about 32 px on
    rendered ground truth, about 0 for a model that draws the same layout whatever the relation."""
    if n_pairs < 1 or samples < 1:
        raise ValueError(f"n_pairs, samples: expected >= 1, got {n_pairs}, {samples}")
    pool = [p for p in all_prompts()["position"] if p.relation == RELATIONS[0]]
    pick = np.random.default_rng(seed).choice(len(pool), size=min(n_pairs, len(pool)), replace=False)
    pairs = [pool[i].objects for i in sorted(pick)]
    seeds = [derive_seed(seed, "relation", i, j) for i in range(len(pairs)) for j in range(samples)]
    policy = ModelPolicy(model)
    model.text_encoder.clear_cache()
    prompts, images = [], []
    for rel in RELATIONS:
        batch = [Prompt("position", objs, rel) for objs in pairs for _ in range(samples)]
        x0 = policy.sample(batch, seeds, solver="euler", num_steps=steps, shift=shift)
        images.append(policy.decode(x0).cpu())
        prompts += batch
    out: dict = relation_offsets(torch.cat(images), prompts)
    out["x_separation"] = out["right of"]["dx"] - out["left of"]["dx"]
    out["y_separation"] = out["below"]["dy"] - out["above"]["dy"]
    return out


# -------------------------------------------------------------------------------------------------- CLI
def _h(default, text: str):
    return field(default=default, metadata={"help": text})


@dataclass
class ProbeConfig:
    probe: str = _h("relation", "evaluate, restart or relation")
    model: str = _h(str(DEFAULT_DIR), "the model's directory (default.safetensors + default.json)")
    threads: int = _h(1, "torch.set_num_threads")
    seed: int = _h(1234, "seed of the prompts' choice and the noise")
    num_steps: int | None = _h(None, "sampler steps (none: evaluate and relation 10, restart 20)")
    cfg_scales: tuple[float, ...] = _h((1.0,), "evaluate: CFG scales, comma separated (1: CFG-free)")
    per_task: int = _h(32, "evaluate, restart: held-out prompts per task type")
    starts: tuple[float, ...] = _h((0.1, 0.25, 0.5, 0.75, 0.9), "restart: noise levels t in (0, 1]")
    pairs: int = _h(8, "relation: object pairs")
    samples: int = _h(16, "relation: samples per prompt")


def _check(cfg: ProbeConfig) -> None:
    if cfg.probe not in ("evaluate", "restart", "relation"):
        raise ConfigError(f"--probe: expected evaluate, restart or relation, got {cfg.probe!r}")
    for name, val in (("--threads", cfg.threads), ("--per-task", cfg.per_task), ("--pairs", cfg.pairs),
                      ("--samples", cfg.samples), ("--num-steps", cfg.num_steps or 1)):
        if val < 1:
            raise ConfigError(f"{name}: expected an integer >= 1, got {val}")
    if not cfg.cfg_scales or any(not 0 <= s < float("inf") for s in cfg.cfg_scales):
        raise ConfigError(f"--cfg-scales: expected one or more finite scales >= 0, got {cfg.cfg_scales}")
    if not cfg.starts or any(not 0 < t <= 1 for t in cfg.starts):
        raise ConfigError(f"--starts: expected one or more noise levels in (0, 1], got {cfg.starts}")
    if not (Path(cfg.model) / "default.safetensors").is_file():
        raise ConfigError(f"--model: expected a directory with default.safetensors, got {cfg.model!r}")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_cli(ProbeConfig, argv, prog="bench.embedded_probes", description=__doc__.split("\n")[0],
                        presets={"default": ProbeConfig})
        _check(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(cfg.threads)
    model = EmbeddedDefault.from_pretrained(cfg.model)
    if cfg.probe == "evaluate":
        result = evaluate(model, cfg.cfg_scales, cfg.per_task, cfg.num_steps or 10, seed=cfg.seed)
    elif cfg.probe == "restart":
        result = restart_scores(model, cfg.starts, cfg.per_task, cfg.num_steps or 20, seed=cfg.seed)
    else:
        result = relation_response(model, cfg.pairs, cfg.samples, cfg.num_steps or 10, seed=cfg.seed)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
