"""Rollout throughput: eager vs CUDA graphs vs ``torch.compile``, side by side (issue 3's benchmark).

Providers (all through ``engine.rollout`` with the fused solver step):

* ``eager``          ``RolloutEngine(cuda_graphs=False)`` around the plain transformer;
* ``cuda_graphs``    ``RolloutEngine(cuda_graphs=True)``: forward + solver step captured once per shape and
  replayed for every step (CUDA only);
* ``torch_compile``  the transformer under ``torch.compile`` (compile time reported apart), eager engine.

Cases: the ``sd3.5-medium`` preset (random weights) at 512 px (latents ``[B, 16, 64, 64]``, batch 8 and 16,
10 dpm2 steps, bf16, fixed random prompt embeddings ``[B, 333, 4096]`` / ``[B, 2048]``) and the embedded
default model (pixels ``[B, 3, 32, 32]``, batch 16 and 128, fp32).  Reported: images/s (median over rounds,
with the spread), seconds per rollout, peak memory, compile/capture time.  Large batches are where graphs stop
paying: the point is to know, so every case is measured, whatever it shows.

Without a GPU the suite runs a quick mode (the embedded default, batch 4, 2 steps, eager only) so that the
ordinary ``pytest`` over ``bench/`` stays fast.  ``python -m bench.bench_rollout`` runs the full comparison
and writes ``bench/results/rollout-<device>.json`` (device, versions, commit, date); ``--models``,
``--batches``, ``--providers`` and ``--rounds`` narrow it to a time budget (``bench.gpu_check``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

from bench import _common
from engine import RolloutEngine
from models.conditioning import Conditioning

CUDA = _common.has_cuda()
MODE = "full" if CUDA else "quick"


@dataclass(frozen=True)
class Case:
    model: str  # "sd3.5-medium" or "embedded"
    batch: int
    steps: int
    dtype: str


def cases() -> list[Case]:
    if MODE == "quick":
        return [Case("embedded", 4, 2, "float32")]
    return [
        Case("sd3.5-medium", 8, 10, "bfloat16"),
        Case("sd3.5-medium", 16, 10, "bfloat16"),
        Case("embedded", 16, 10, "float32"),
        Case("embedded", 128, 10, "float32"),
    ]


def providers() -> list[str]:
    return ["eager", "cuda_graphs", "torch_compile"] if CUDA else ["eager"]


_MODELS: dict = {}


def _model(name: str, dtype: torch.dtype, device: str):
    """``(denoiser, cond_factory, latent_shape)`` for a case, built once per process."""
    key = (name, dtype)
    if key not in _MODELS:
        import models

        if name == "embedded":
            from models.embedded import load_default

            bundle = load_default(device=device, dtype=dtype)
            den = models.as_denoiser(bundle.transformer)
            enc = bundle.text_encoder
            prompts = ["a red circle left of a blue square", "three triangles", "a green square", "a circle"]

            def make_cond(b, enc=enc, prompts=prompts):
                return enc.encode([prompts[i % len(prompts)] for i in range(b)]).to(device)

            shape = (3, 32, 32)
        else:
            transformer = models.load_transformer(name, dtype=dtype, device=device, seed=0)
            den = models.as_denoiser(transformer)
            cfg = transformer.config
            g = torch.Generator(device="cpu").manual_seed(0)

            def make_cond(b, cfg=cfg, g=g):
                pe = torch.randn(b, 333, cfg.joint_attention_dim, generator=g).to(device, dtype)
                pooled = torch.randn(b, cfg.pooled_projection_dim, generator=g).to(device, dtype)
                return Conditioning(pe, pooled)

            f = 8
            shape = (cfg.in_channels, 512 // f, 512 // f)
        _MODELS[key] = (den, make_cond, shape)
    return _MODELS[key]


def measure(case: Case, provider: str, rounds: int) -> dict:
    device = "cuda" if CUDA else "cpu"
    dtype = getattr(torch, case.dtype)
    den, make_cond, shape = _model(case.model, dtype, device)
    cond = make_cond(case.batch)
    if provider == "torch_compile":
        import models

        inner = getattr(den, "transformer", None)
        t0 = time.perf_counter()
        den = models.as_denoiser(torch.compile(inner))
        engine = RolloutEngine(cuda_graphs=False)
    else:
        engine = RolloutEngine(cuda_graphs=provider == "cuda_graphs")
        t0 = time.perf_counter()

    def run(seed):
        with torch.no_grad():
            return engine.rollout(
                den,
                cond,
                num_steps=case.steps,
                latent_shape=shape,
                solver="dpm2",
                seed=seed,
                dtype=dtype,
                device=device,
            ).x0

    run(0)  # warm-up: compile / capture happen here
    _common.sync()
    setup_s = time.perf_counter() - t0
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for r in range(rounds):
        _common.sync()
        t = time.perf_counter()
        run(r + 1)
        _common.sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {
        **asdict(case),
        "provider": provider,
        "rounds": rounds,
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "images_per_s": case.batch / med,
        "setup_s": setup_s,
        "peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20) if CUDA else None,
        "graphs_captured": len(engine.graphs),
    }


@pytest.mark.parametrize("provider", providers())
@pytest.mark.parametrize("case", cases(), ids=lambda c: f"{c.model}-b{c.batch}-s{c.steps}-{c.dtype}")
def test_rollout(benchmark, case, provider):
    rec = measure(case, provider, rounds=3 if MODE == "quick" else 10)
    benchmark.extra_info.update({k: v for k, v in rec.items() if isinstance(v, (int, float, str))})
    assert rec["images_per_s"] > 0
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def summary(records: list[dict]) -> str:
    lines = [
        f"{'model':<14}{'batch':>6}{'steps':>6} {'provider':<14}{'img/s':>9}{'s/rollout':>11}{'spread':>16}"
        f"{'setup s':>9}{'peak MB':>9}"
    ]
    for r in records:
        peak = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
        spread = "{:.3f}-{:.3f}".format(r["min_s"], r["max_s"])
        lines.append(
            f"{r['model']:<14}{r['batch']:>6}{r['steps']:>6} {r['provider']:<14}{r['images_per_s']:>9.1f}"
            f"{r['median_s']:>11.3f}{spread:>16}{r['setup_s']:>9.1f}{peak:>9}"
        )
    return "\n".join(lines)


def _names(parser, option: str, value: str | None, allowed: list) -> list | None:
    """The comma-separated ``value`` of ``option`` checked against ``allowed``; ``None`` when not given."""
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    allowed_s = [str(a) for a in allowed]
    if not names or any(n not in allowed_s for n in names):
        parser.error(f"{option}: expected comma-separated values from {allowed_s} ({MODE} mode), "
                     f"got {value!r}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10 if CUDA else 3)
    parser.add_argument("--write", action="store_true", help="write the results file even without a GPU")
    parser.add_argument(
        "--out", default=None, help="results file (default bench/results/rollout-<device>.json)"
    )
    parser.add_argument("--models", default=None, help="only these models, e.g. sd3.5-medium")
    parser.add_argument("--batches", default=None, help="only these batch sizes, e.g. 16")
    parser.add_argument("--providers", default=None, help="only these providers, e.g. eager,cuda_graphs")
    parser.add_argument(
        "--stream", default=None, help="append each record to this JSON-lines file as it is measured"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds: expected a positive integer, got {args.rounds}")
    all_cases = cases()
    want_models = _names(parser, "--models", args.models, sorted({c.model for c in all_cases}))
    want_batches = _names(parser, "--batches", args.batches, sorted({c.batch for c in all_cases}))
    chosen_providers = _names(parser, "--providers", args.providers, providers()) or providers()
    chosen = [
        c
        for c in all_cases
        if (want_models is None or c.model in want_models)
        and (want_batches is None or str(c.batch) in want_batches)
    ]
    if not chosen:
        parser.error(
            f"--models / --batches: expected a case that exists, got {args.models!r} / {args.batches!r}"
        )
    if args.stream:
        os.environ["NFT_BENCH_STREAM"] = args.stream
    records = []
    for c in chosen:
        for p in chosen_providers:
            records.append(measure(c, p, args.rounds))
            _common.stream_record("rollout", records[-1])
    print(summary(records))
    if CUDA or args.write or args.out:
        path = (
            Path(args.out)
            if args.out
            else _common.results_path().with_name("rollout-" + _common.results_path().name)
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps({"environment": _common.environment(), "mode": MODE, "results": records}, indent=1)
            + "\n"
        )
        print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
