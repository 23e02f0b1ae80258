"""DiffusionNFT's training phase on the embedded default: trained timesteps one per forward against stacked,
on one and two torch threads.

One optimizer step of ``train.nft``'s ``tiny`` preset as the loop runs it (``NFTTrainer.train_on``): a
micro-batch of 16 samples (2 prompts x 8) at ``int(0.99 * 10)`` = 9 trained timesteps each, the old-adapter
forward without gradient, the trained forward and its backward, on the shipped 12-block model.  Cases:
``--train.timesteps-per-forward`` 1 (the reference's loop: 9 forwards of 16) or 0 (one forward of 144) x
``--train-threads`` 1 or 2.  Reported: seconds per micro-batch (median over rounds, with the spread) and the
ratio to the one-thread, one-timestep case measured in the same run.  Both give the same gradient up to float
order (``tests/fidelity/test_nft_reference.py``).

CPU numbers on a shared machine vary by 30% or more between machines: compare the ratios of one run.  Under
pytest (CI) the suite runs a quick mode (4 samples, one round, the one-thread cases) that checks they run.
``python -m bench.bench_nft_train`` runs the full comparison and prints it; ``--write PATH`` saves the
records (with the environment) as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bench import _common


@dataclass(frozen=True)
class Case:
    timesteps_per_forward: int  # 1: one trained timestep per forward; 0: all
    threads: int


CASES = [Case(1, 1), Case(0, 1), Case(1, 2), Case(0, 2)]


def _setup(samples: int, tmp: Path):
    """The tiny preset's trainer inputs for one micro-batch of ``samples`` -> (cfg, policy, x0, r)."""
    import train.nft as nft
    from train.policy import build_policy

    cfg = nft.preset_tiny()
    cfg.sample.prompts_per_iter, cfg.sample.images_per_prompt = 2, samples // 2
    cfg.train.batch_size, cfg.train.steps_per_iter = samples, 1
    policy = build_policy(cfg.models, preset="tiny", model_path=None, device=torch.device("cpu"), seed=0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(samples, *policy.latent_shape, generator=g)
    r = torch.rand(samples, generator=g)
    return cfg, policy, x0, r


def measure(case: Case, *, samples: int, rounds: int, tmp: Path, setup=None) -> dict:
    """Seconds for one optimizer step over one micro-batch of ``samples`` (the first call, which warms up
    the allocator, is not counted)."""
    import train.nft as nft

    cfg, policy, x0, r = setup or _setup(samples, tmp)
    cfg.train.timesteps_per_forward = case.timesteps_per_forward
    start = [p.detach().clone() for p in policy.trainable_parameters()]
    before = torch.get_num_threads()
    torch.set_num_threads(case.threads)
    times = []
    try:
        for i in range(rounds + 1):
            trainer = nft.NFTTrainer(cfg, tmp, policy, None, None)
            plan = trainer.iteration_plan(1)
            t0 = time.perf_counter()
            trainer.train_on(1, plan, x0[plan.local], r[plan.local])
            if i:
                times.append(time.perf_counter() - t0)
            with torch.no_grad():
                for p, s in zip(policy.trainable_parameters(), start, strict=True):
                    p.copy_(s)
    finally:
        torch.set_num_threads(before)
    n_train = int(cfg.train.timestep_fraction * cfg.sample.num_steps)
    return {
        "timesteps_per_forward": case.timesteps_per_forward,
        "threads": case.threads,
        "samples": samples,
        "trained_timesteps": n_train,
        "rounds": rounds,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
    }


def summary(records: list[dict]) -> str:
    base = next(
        (r["median_s"] for r in records if r["timesteps_per_forward"] == 1 and r["threads"] == 1), None
    )
    lines = [f"{'timesteps/forward':>18}{'threads':>8}{'s/micro-batch':>15}{'spread':>16}{'vs 1x1':>8}"]
    for r in records:
        spread = "{:.3f}-{:.3f}".format(r["min_s"], r["max_s"])
        ratio = f"{r['median_s'] / base:.2f}" if base else "-"
        k = "all" if r["timesteps_per_forward"] == 0 else str(r["timesteps_per_forward"])
        lines.append(f"{k:>18}{r['threads']:>8}{r['median_s']:>15.3f}{spread:>16}{ratio:>8}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def quick_setup(tmp_path_factory):
    return _setup(4, tmp_path_factory.mktemp("nft_train"))


# one thread only: under pytest-xdist each worker has one core's share (tests/conftest.py)
@pytest.mark.parametrize(
    "case", [c for c in CASES if c.threads == 1], ids=lambda c: f"tpf{c.timesteps_per_forward}-threads1"
)
def test_nft_train_step(benchmark, case, tmp_path, quick_setup):
    rec = measure(case, samples=4, rounds=1, tmp=tmp_path, setup=quick_setup)
    benchmark.extra_info.update(rec)
    assert rec["median_s"] > 0
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def main(argv=None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per case (after one warm-up)")
    parser.add_argument("--samples", type=int, default=16, help="the micro-batch (the tiny preset's: 16)")
    parser.add_argument("--write", type=Path, default=None, help="save the records as JSON here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds: expected an integer >= 1, got {args.rounds}")
    if args.samples < 2 or args.samples % 2:
        parser.error(f"--samples: expected an even integer >= 2 (2 prompts), got {args.samples}")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        setup = _setup(args.samples, Path(tmp))
        for case in CASES:
            rec = measure(case, samples=args.samples, rounds=args.rounds, tmp=Path(tmp), setup=setup)
            records.append(rec)
            print(summary(records).splitlines()[-1], flush=True)
    print(summary(records))
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        payload = {"environment": _common.environment(), "results": records}
        args.write.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"written to {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
