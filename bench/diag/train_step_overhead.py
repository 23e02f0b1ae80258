"""The engine's SD3.5-M NFT train step (bench_e2e's case) timed piece by piece, before and after a rollout.

    python -m bench.diag.train_step_overhead      # on a GPU machine (diffusers carried, see bench.gpu_check)

bench_e2e's engine train step was host-bound on the first H200 run (0.554 s median, 501 ms of launch gaps
against 226 ms of kernels).  This times the step (best of 3 after one warm-up, seconds) with the reference
ops, with only the attention backend, with only the DiT fast path, with both, and again with both after one
CUDA-graph rollout; then prints a cProfile of the last step's host time.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

import torch

import kernels
from bench import bench_e2e as E
from engine.rollout import RolloutEngine
from models import attention
from models.patch import apply_fast_path, revert_fast_path


def main() -> int:
    if not torch.cuda.is_available():
        print("bench.diag.train_step_overhead: needs a CUDA device", file=sys.stderr)
        return 2
    case = next(c for c in E.cases() if c.preset == "sd3.5-medium")
    model = E.build_model(case)
    den = E.models.as_denoiser(model)
    inputs = E.make_inputs(case, case.train_batch, seed=2)
    rollout_cond = E.make_inputs(case, case.rollout_batch, seed=1)[0]

    def timed(step, rounds=3):
        step()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(round(time.perf_counter() - t0, 4))
            model.zero_grad(set_to_none=True)
        return times

    reference = lambda: E.reference_train_step(den, model, case, *inputs)
    engine = lambda: E.engine_train_step(den, model, case, *inputs)
    print("reference step", timed(reference), flush=True)
    with kernels.use_backend("reference"):
        print("engine step, reference ops", timed(engine), flush=True)
    print("engine step, Triton loss ops", timed(engine), flush=True)
    print("attention auto ->", attention.set_attention_backend(model, "auto"))
    print("engine step, + attention auto", timed(engine), flush=True)
    attention.set_attention_backend(model, "sdpa")
    apply_fast_path(model)
    print("engine step, + fast path only", timed(engine), flush=True)
    attention.set_attention_backend(model, "auto")
    print("engine step, both", timed(engine), flush=True)
    t0 = time.perf_counter()
    E.engine_rollout(den, model, case, rollout_cond, RolloutEngine())
    torch.cuda.synchronize()
    print("engine rollout with capture", round(time.perf_counter() - t0, 3), flush=True)
    print("engine step, both, after the rollout", timed(engine), flush=True)
    profile = cProfile.Profile()
    profile.enable()
    engine()
    torch.cuda.synchronize()
    profile.disable()
    model.zero_grad(set_to_none=True)
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue(), flush=True)
    revert_fast_path(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
