"""torch.profiler of the SD3.5-M NFT train step (bench_e2e's case): device time against wall time.

    python -m bench.diag.train_step_profile      # on a GPU machine (diffusers carried, see bench.gpu_check)

``train_step_overhead`` showed the engine's train step no faster than the reference-style step and its DiT
fast path alone slower (0.69-0.78 s against 0.42 s on an H200).  This tells a host-bound step (kernel time
well under wall time) from a device-bound one, and names the kernels and host ops that take the time, for:
the reference step, the engine step with reference ops, the engine step with the fast path only, and both.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import kernels
from bench import bench_e2e as E
from models import attention
from models.patch import apply_fast_path, revert_fast_path


def _report(name, model, step) -> None:
    step()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    events = prof.key_averages()
    # Kernel rows only: an aten op's self device time is its kernels' time again.
    device_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
    print(f"== {name}: wall {wall:.3f} s (profiled), device self time {device_us / 1e6:.3f} s", flush=True)
    print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60), flush=True)
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60), flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        print("bench.diag.train_step_profile: needs a CUDA device", file=sys.stderr)
        return 2
    case = next(c for c in E.cases() if c.preset == "sd3.5-medium")
    model = E.build_model(case)
    den = E.models.as_denoiser(model)
    inputs = E.make_inputs(case, case.train_batch, seed=2)
    _report("reference step", model, lambda: E.reference_train_step(den, model, case, *inputs))
    engine = lambda: E.engine_train_step(den, model, case, *inputs)
    with kernels.use_backend("reference"):
        _report("engine step, reference ops", model, engine)
    apply_fast_path(model)
    _report("engine step, fast path only", model, engine)
    attention.set_attention_backend(model, "auto")
    _report("engine step, fast path + attention auto", model, engine)
    revert_fast_path(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
